//! `QuantizedLinear`: a frozen quantized weight used as a linear layer, differentiable with
//! respect to its input (so adapters can train on top of it).
//!
//! Two paths, chosen per call:
//! - inference (the input needs no gradient, CPU, at most [`FAST_MAX_ROWS`] rows): the packed
//!   products of [`crate::matmul`], straight from the packed weight; int8 and ternary
//!   quantize the activations to int8 there (LLM.int8 and BitNet b1.58 as published), and a
//!   bf16 input runs the bf16-compute NF4 and int4 kernels;
//! - otherwise: dequantize to f32, then an ordinary product that autograd differentiates with
//!   respect to the input; the weight never gets a gradient.

use crate::convert::Format;
use crate::fourbit::FourBit;
use crate::int4::Int4Gptq;
use crate::int8::Int8Rowwise;
use crate::matmul;
use crate::ternary::Ternary;
use crate::Result;
use tch::{Device, Kind, Tensor};

/// Rows (tokens) up to which the packed CPU products are used at inference.
pub const FAST_MAX_ROWS: i64 = 16;

/// A quantized weight of one of the formats.
#[derive(Debug, Clone, PartialEq)]
pub enum QuantizedWeight {
    /// LLM.int8.
    Int8(Int8Rowwise),
    /// GPTQ int4.
    Int4(Int4Gptq),
    /// NF4 / FP4.
    FourBit(FourBit),
    /// Ternary.
    Ternary(Ternary),
}

impl QuantizedWeight {
    /// Reads the quantized weight of module `prefix`, if the file holds one: `has` says whether
    /// a key exists, `get` reads it. Which format is told by its keys: a bitsandbytes 4-bit
    /// quant state, a Frugal ternary one, GPTQ's `qweight`, or LLM.int8's `SCB`.
    pub fn read(
        prefix: &str,
        has: &dyn Fn(&str) -> bool,
        get: impl Fn(&str) -> Option<Tensor>,
    ) -> Result<Option<Self>> {
        let key = |suffix: &str| has(&format!("{prefix}.{suffix}"));
        Ok(Some(
            if key("weight.quant_state.bitsandbytes__nf4")
                || key("weight.quant_state.bitsandbytes__fp4")
            {
                QuantizedWeight::FourBit(FourBit::from_tensors(&format!("{prefix}.weight"), get)?)
            } else if key("weight.quant_state.frugal__ternary") {
                QuantizedWeight::Ternary(Ternary::from_tensors(prefix, get)?)
            } else if key("qweight") {
                QuantizedWeight::Int4(Int4Gptq::from_tensors(prefix, false, get)?)
            } else if key("SCB") {
                QuantizedWeight::Int8(Int8Rowwise::from_tensors(prefix, get)?)
            } else {
                return Ok(None);
            },
        ))
    }

    /// Quantizes a dense 2-D weight `(out, in)` into `format`; a 4-bit weight records the
    /// weight's dtype, so that dequantizing restores it.
    pub fn quantize(weight: &Tensor, format: &Format) -> Result<Self> {
        let size = weight.size();
        let (rows, cols) = (size[0] as usize, size[1] as usize);
        let w = Vec::<f32>::try_from(
            weight
                .detach()
                .to_device(Device::Cpu)
                .to_kind(Kind::Float)
                .flatten(0, -1),
        )?;
        Ok(match format {
            Format::Int8 => QuantizedWeight::Int8(Int8Rowwise::quantize(&w, rows, cols)?),
            Format::Int4 { group_size } => {
                QuantizedWeight::Int4(Int4Gptq::quantize(&w, rows, cols, *group_size)?)
            }
            Format::FourBit(cfg) => {
                let mut q = FourBit::quantize(&w, &size, cfg)?;
                q.dtype = match weight.kind() {
                    Kind::BFloat16 => "bfloat16",
                    Kind::Half => "float16",
                    _ => "float32",
                }
                .into();
                QuantizedWeight::FourBit(q)
            }
            Format::Ternary => QuantizedWeight::Ternary(Ternary::quantize(&w, rows, cols, None)?),
        })
    }

    /// The tensors of module `prefix` in the format's layout (see `docs/formats.md`).
    pub fn to_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        match self {
            QuantizedWeight::Int8(q) => q.to_tensors(prefix),
            QuantizedWeight::Int4(q) => q.to_tensors(prefix),
            QuantizedWeight::FourBit(q) => q.to_tensors(&format!("{prefix}.weight")),
            QuantizedWeight::Ternary(q) => q.to_tensors(prefix),
        }
    }

    /// The format and options the weight is stored with.
    pub fn format(&self) -> Format {
        match self {
            QuantizedWeight::Int8(_) => Format::Int8,
            QuantizedWeight::Int4(q) => Format::Int4 {
                group_size: q.group_size,
            },
            QuantizedWeight::FourBit(q) => Format::FourBit(crate::fourbit::FourBitConfig {
                kind: q.kind,
                block_size: q.block_size,
                double_quant: matches!(q.absmax, crate::fourbit::Absmax::Double { .. }),
            }),
            QuantizedWeight::Ternary(_) => Format::Ternary,
        }
    }

    /// The family: `"4bit"` (NF4 or FP4), `"ternary"`, `"int4"` or `"int8"`.
    pub fn family(&self) -> &'static str {
        match self {
            QuantizedWeight::FourBit(_) => "4bit",
            QuantizedWeight::Ternary(_) => "ternary",
            QuantizedWeight::Int4(_) => "int4",
            QuantizedWeight::Int8(_) => "int8",
        }
    }

    /// Format and options, e.g. `nf4 block 64 double-quant`, `int4 group 128`.
    pub fn describe(&self) -> String {
        match self {
            QuantizedWeight::FourBit(q) => {
                let dq = match q.absmax {
                    crate::fourbit::Absmax::Double { .. } => " double-quant",
                    crate::fourbit::Absmax::Plain(_) => "",
                };
                format!("{} block {}{dq}", q.kind.name(), q.block_size)
            }
            QuantizedWeight::Int4(q) => format!("int4 group {}", q.group_size),
            QuantizedWeight::Int8(_) => "int8".into(),
            QuantizedWeight::Ternary(_) => "ternary".into(),
        }
    }

    /// The dense shape `(out, in)` (4-bit: the shape recorded in its quant state).
    pub fn shape(&self) -> Vec<i64> {
        let rc = |r: usize, c: usize| vec![r as i64, c as i64];
        match self {
            QuantizedWeight::FourBit(q) => q.shape.clone(),
            QuantizedWeight::Int4(q) => rc(q.rows, q.cols),
            QuantizedWeight::Int8(q) => rc(q.rows, q.cols),
            QuantizedWeight::Ternary(q) => rc(q.rows, q.cols),
        }
    }

    /// Number of weight values.
    pub fn numel(&self) -> usize {
        self.shape().iter().product::<i64>() as usize
    }

    /// The kind to restore: the 4-bit quant state's recorded dtype, else f32.
    pub fn dtype(&self) -> Kind {
        match self {
            QuantizedWeight::FourBit(q) => match q.dtype.as_str() {
                "bfloat16" => Kind::BFloat16,
                "float16" => Kind::Half,
                _ => Kind::Float,
            },
            _ => Kind::Float,
        }
    }

    /// The values, row-major f32.
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            QuantizedWeight::Int8(q) => q.dequantize(),
            QuantizedWeight::Int4(q) => q.dequantize(),
            QuantizedWeight::FourBit(q) => q.dequantize(),
            QuantizedWeight::Ternary(q) => q.dequantize(),
        }
    }

    /// Bits per parameter as stored.
    pub fn bits_per_param(&self) -> f64 {
        match self {
            QuantizedWeight::Int8(q) => q.bits_per_param(),
            QuantizedWeight::Int4(q) => q.bits_per_param(),
            QuantizedWeight::FourBit(q) => q.bits_per_param(),
            QuantizedWeight::Ternary(q) => q.bits_per_param(),
        }
    }

    /// Bytes as stored (from the bits per parameter; 4-bit counts its parts exactly).
    pub fn stored_bytes(&self) -> u64 {
        match self {
            QuantizedWeight::FourBit(q) => q.bytes() as u64,
            _ => (self.bits_per_param() * self.numel() as f64 / 8.0) as u64,
        }
    }
}

/// A frozen, quantized, bias-free linear layer `y = x Wᵀ` with W of shape `(out, in)`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedLinear {
    /// The packed weight.
    pub weight: QuantizedWeight,
    /// Output features.
    pub out_features: usize,
    /// Input features.
    pub in_features: usize,
}

impl QuantizedLinear {
    /// Quantizes a dense weight `(out, in)` into `format`.
    pub fn quantize(weight: &Tensor, format: &Format) -> Result<Self> {
        let size = weight.size();
        let (rows, cols) = (size[0] as usize, size[1] as usize);
        let q = QuantizedWeight::quantize(weight, format)?;
        Ok(Self {
            weight: q,
            out_features: rows,
            in_features: cols,
        })
    }

    /// The weight as f32 `(out, in)`.
    pub fn dequantize(&self) -> Tensor {
        Tensor::from_slice(&self.weight.dequantize())
            .reshape([self.out_features as i64, self.in_features as i64])
    }

    /// Bits per parameter as stored.
    pub fn bits_per_param(&self) -> f64 {
        self.weight.bits_per_param()
    }

    /// The packed product; `bf16` picks the bf16-compute NF4 and int4 kernels (activations
    /// rounded to bf16, f32 accumulation, as bitsandbytes computes for bf16 inputs).
    fn packed_product(&self, x: &[f32], rows: usize, bf16: bool) -> Result<Vec<f32>> {
        match &self.weight {
            QuantizedWeight::Int8(q) => matmul::int8_matmul(q, x, rows),
            QuantizedWeight::Int4(q) if bf16 => matmul::int4_matmul_bf16(q, x, rows),
            QuantizedWeight::Int4(q) => matmul::int4_matmul(q, x, rows),
            QuantizedWeight::FourBit(q) if bf16 => matmul::nf4_matmul_bf16(q, x, rows),
            QuantizedWeight::FourBit(q) => matmul::nf4_matmul(q, x, rows),
            QuantizedWeight::Ternary(q) => matmul::ternary_matmul(q, x, rows),
        }
    }

    /// Applies the layer to `x` of shape `(..., in)`; the result has `x`'s kind.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let rows: i64 = size[..size.len() - 1].iter().product();
        if !x.requires_grad() && x.device() == Device::Cpu && rows <= FAST_MAX_ROWS {
            let flat =
                Vec::<f32>::try_from(x.to_kind(Kind::Float).reshape([-1])).expect("f32 input");
            let bf16 = x.kind() == Kind::BFloat16;
            if let Ok(y) = self.packed_product(&flat, rows as usize, bf16) {
                let mut out_shape = size.clone();
                *out_shape.last_mut().expect("at least 1-D") = self.out_features as i64;
                return Tensor::from_slice(&y).reshape(&out_shape).to_kind(x.kind());
            }
        }
        let w = self.dequantize().to_device(x.device()).to_kind(x.kind());
        x.linear(&w, None::<Tensor>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fourbit::{FourBitConfig, FourBitKind};

    fn formats() -> Vec<Format> {
        vec![
            Format::Int8,
            Format::Int4 { group_size: 64 },
            Format::FourBit(FourBitConfig {
                kind: FourBitKind::Nf4,
                block_size: 64,
                double_quant: true,
            }),
            Format::Ternary,
        ]
    }

    /// Guarantee: the gradient reaches the input (equal to the dense-dequantized layer's), and
    /// the training path equals dequantize-then-matmul.
    #[test]
    fn differentiable_with_respect_to_the_input() {
        tch::manual_seed(1);
        let w = Tensor::randn([64, 128], (Kind::Float, Device::Cpu));
        for f in formats() {
            let layer = QuantizedLinear::quantize(&w, &f).unwrap();
            let x = Tensor::randn([3, 5, 128], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let y = layer.forward(&x);
            assert_eq!(y.size(), vec![3, 5, 64]);
            let dense = layer.dequantize();
            let want = x.detach().matmul(&dense.tr());
            assert!(
                (&y.detach() - &want).abs().max().double_value(&[]) < 1e-4,
                "{f:?}"
            );
            y.sum(Kind::Float).backward();
            let g = x.grad();
            let want_g = dense
                .sum_dim_intlist([0i64].as_slice(), false, Kind::Float)
                .expand([3, 5, 128], false);
            assert!((&g - &want_g).abs().max().double_value(&[]) < 1e-4, "{f:?}");
        }
    }

    /// Guarantee: the inference path (packed products) agrees with dequantize-then-matmul within
    /// the format's activation rounding (none for NF4 and int4; int8 activations for int8 and
    /// ternary).
    #[test]
    fn inference_path_agrees() {
        tch::manual_seed(2);
        let w = Tensor::randn([64, 128], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([4, 128], (Kind::Float, Device::Cpu));
        for (f, tol) in formats().into_iter().zip([0.02, 1e-4, 1e-4, 0.02]) {
            let layer = QuantizedLinear::quantize(&w, &f).unwrap();
            let fast = tch::no_grad(|| layer.forward(&x));
            let slow = x.matmul(&layer.dequantize().tr());
            let rel = (&fast - &slow).norm().double_value(&[]) / slow.norm().double_value(&[]);
            assert!(rel < tol, "{f:?}: relative difference {rel}");
            // bf16 input: bf16 compute (bf16-rounded activations and 4-bit codebook), a bf16
            // result; within bf16's rounding of the f32 product, and not the f32 path.
            let xb = x.to_kind(Kind::BFloat16);
            let fast = tch::no_grad(|| layer.forward(&xb));
            assert_eq!(fast.kind(), Kind::BFloat16);
            let slow = xb.to_kind(Kind::Float).matmul(&layer.dequantize().tr());
            let d = (&fast.to_kind(Kind::Float) - &slow)
                .norm()
                .double_value(&[]);
            let rel = d / slow.norm().double_value(&[]);
            assert!(rel < tol.max(1e-2), "{f:?} bf16: relative difference {rel}");
        }
    }
}
