//! A frozen quantized layer's weight on a GPU, multiplied with this crate's kernels: packed
//! NF4, GPTQ int4 and ternary weights stay packed in GPU memory; a product of few rows runs the
//! matrix-vector kernels row by row, a larger one dequantizes the weight on the GPU for one
//! matmul in the input's dtype.
//!
//! Formats without a kernel (int8, FP4, int4 with act-order or float zero points, ternary with
//! a scale per row group) are not uploaded ([`DeviceQuantized::upload`] returns None), and the
//! layer keeps its CPU path.

use tch::{Device, Kind, Tensor};

use crate::error::{KernelError, Result};
use crate::gpu::Kernels;
use frugal_quant::fourbit::FourBitKind;
use frugal_quant::layer::{QuantizedLinear, QuantizedWeight};

/// Rows up to which a product runs the matrix-vector kernels (one launch per row); above, the
/// weight is dequantized on the GPU and multiplied in one matmul.
pub const GEMV_MAX_ROWS: i64 = 4;

/// The packed weight in GPU memory.
#[derive(Debug)]
enum Packed {
    Nf4 {
        packed: Tensor,
        absmax: Tensor,
        block: usize,
    },
    Int4 {
        qweight: Tensor,
        qzeros: Tensor,
        scales: Tensor,
        group: usize,
    },
    Ternary {
        packed: Tensor,
        scale: f32,
    },
}

/// A quantized linear layer's packed weight on one GPU.
#[derive(Debug)]
pub struct DeviceQuantized {
    packed: Packed,
    out_features: usize,
    in_features: usize,
    device: Device,
}

impl DeviceQuantized {
    /// Copies the packed weight of `q` to CUDA device `device`; None for a format this crate
    /// has no kernels for (see the module's documentation).
    pub fn upload(q: &QuantizedLinear, device: Device) -> Option<Self> {
        if !device.is_cuda() {
            return None;
        }
        let packed = match &q.weight {
            QuantizedWeight::FourBit(f) if f.kind == FourBitKind::Nf4 => Packed::Nf4 {
                packed: Tensor::from_slice(&f.packed).to_device(device),
                absmax: Tensor::from_slice(&f.absmax_values()).to_device(device),
                block: f.block_size,
            },
            QuantizedWeight::Int4(g)
                if g.zeros_f32.is_none()
                    && g.g_idx
                        .iter()
                        .enumerate()
                        .all(|(i, &gi)| gi as usize == i / g.group_size) =>
            {
                Packed::Int4 {
                    qweight: Tensor::from_slice(&g.qweight).to_device(device),
                    qzeros: Tensor::from_slice(&g.qzeros).to_device(device),
                    scales: Tensor::from_slice(&g.scales).to_device(device),
                    group: g.group_size,
                }
            }
            QuantizedWeight::Ternary(t) if t.rows_per_scale == t.rows && t.scales.len() == 1 => {
                Packed::Ternary {
                    packed: Tensor::from_slice(&t.packed).to_device(device),
                    scale: t.scales[0],
                }
            }
            _ => return None,
        };
        Some(Self {
            packed,
            out_features: q.out_features,
            in_features: q.in_features,
            device,
        })
    }

    /// The device the weight lives on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The weight, dequantized on the GPU to f32 `(out, in)`.
    pub fn dequantize(&self) -> Result<Tensor> {
        let k = Kernels::global();
        let shape = [self.out_features as i64, self.in_features as i64];
        match &self.packed {
            Packed::Nf4 {
                packed,
                absmax,
                block,
            } => k.dequant_nf4_f32(packed, absmax, &shape, *block),
            Packed::Int4 {
                qweight,
                qzeros,
                scales,
                group,
            } => k.dequant_int4_gptq_f32(qweight, qzeros, scales, *group),
            Packed::Ternary { packed, scale } => k.dequant_ternary_f32(packed, *scale, &shape),
        }
    }

    /// `x W^T` for `x` `(..., in)` on this weight's device, in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device() != self.device {
            return Err(KernelError::Invalid(format!(
                "input on {:?}, the weight on {:?}",
                x.device(),
                self.device
            )));
        }
        let size = x.size();
        let cols = *size.last().unwrap_or(&0);
        if cols != self.in_features as i64 {
            return Err(KernelError::Invalid(format!(
                "input has {cols} features, the weight takes {}",
                self.in_features
            )));
        }
        let rows = x.numel() as i64 / cols.max(1);
        let mut out_shape = size.clone();
        *out_shape.last_mut().expect("checked above") = self.out_features as i64;
        if rows > GEMV_MAX_ROWS {
            let w = self.dequantize()?.to_kind(x.kind());
            return Ok(x.matmul(&w.tr()));
        }
        let flat = x.to_kind(Kind::Float).reshape([rows, cols]);
        let k = Kernels::global();
        let mut ys = Vec::with_capacity(rows as usize);
        for r in 0..rows {
            let xr = flat.get(r).contiguous();
            ys.push(match &self.packed {
                Packed::Nf4 {
                    packed,
                    absmax,
                    block,
                } => k.gemv_nf4_f32(packed, absmax, &xr, self.out_features, *block)?,
                Packed::Int4 {
                    qweight,
                    qzeros,
                    scales,
                    group,
                } => k.gemv_int4_gptq_f32(qweight, qzeros, scales, &xr, *group)?,
                Packed::Ternary { packed, scale } => {
                    k.gemv_ternary_f32(packed, *scale, &xr, self.out_features)?
                }
            });
        }
        Ok(Tensor::stack(&ys, 0).reshape(&out_shape).to_kind(x.kind()))
    }
}
