//! BitLinear's input path of `kernels/bitlinear.cu`, RMSNorm with a gain fused with per-token
//! int8 activation quantization, its straight-through backward, and their CPU references.
//!
//! For each row `x` of `n` values: `r = 1 / sqrt(mean(x²) + eps)`, `n = x r g`,
//! `s = 127 / max(max|n|, 1e-5)`, `out = clamp(round(n s), -128, 127) / s` (round half to
//! even). The backward treats the quantizer as the identity: with `dn` the gradient of `out`
//! and `x^ = x r`, `dx = r (dn g - x^ mean(dn g x^))` and `dg = Σ_rows dn x^`.

use tch::{Device, Kind, Tensor};

use crate::error::{KernelError, Result};
use crate::gpu::{cuda_input, expect_numel, same_device, to_i64, Kernels, Scalar};
use crate::registry::BITLINEAR;

fn rows_of(len: usize, n: usize, what: &str) -> Result<usize> {
    if len.checked_rem(n) != Some(0) {
        return Err(KernelError::Invalid(format!(
            "{what} has {len} values, not a whole number of rows of {n}"
        )));
    }
    Ok(len / n)
}

/// CPU reference of the forward: `(out, rstd)` for `x` of rows of `gain.len()` values.
pub fn rmsnorm_quant(x: &[f32], gain: &[f32], eps: f32) -> Result<(Vec<f32>, Vec<f32>)> {
    let n = gain.len();
    let rows = rows_of(x.len(), n, "x")?;
    let mut out = vec![0f32; x.len()];
    let mut rstd = vec![0f32; rows];
    for (row, (xr, outr)) in x.chunks(n).zip(out.chunks_mut(n)).enumerate() {
        let ss: f64 = xr.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let r = 1.0 / ((ss / n as f64) as f32 + eps).sqrt();
        let amax = xr
            .iter()
            .zip(gain)
            .fold(0f32, |m, (&v, &g)| m.max((v * r * g).abs()));
        let scale = (1.0 / amax.max(1e-5)) * 127.0;
        for ((o, &v), &g) in outr.iter_mut().zip(xr).zip(gain) {
            *o = (v * r * g * scale).round_ties_even().clamp(-128.0, 127.0) / scale;
        }
        rstd[row] = r;
    }
    Ok((out, rstd))
}

/// CPU reference of the backward: `(dx, dgain)` from `dn` (the gradient of the forward's
/// `out`), `x`, the gain and the forward's `rstd`.
pub fn rmsnorm_quant_backward(
    dn: &[f32],
    x: &[f32],
    gain: &[f32],
    rstd: &[f32],
) -> Result<(Vec<f32>, Vec<f32>)> {
    let n = gain.len();
    let rows = rows_of(x.len(), n, "x")?;
    if dn.len() != x.len() || rstd.len() != rows {
        return Err(KernelError::Invalid(format!(
            "dn has {} values and rstd {}, for x of {rows} rows of {n}",
            dn.len(),
            rstd.len()
        )));
    }
    let mut dx = vec![0f32; x.len()];
    let mut dgain = vec![0f64; n];
    for (row, ((dnr, xr), dxr)) in dn
        .chunks(n)
        .zip(x.chunks(n))
        .zip(dx.chunks_mut(n))
        .enumerate()
    {
        let r = rstd[row];
        let dot: f64 = (0..n)
            .map(|i| f64::from(dnr[i] * gain[i] * xr[i] * r))
            .sum();
        let mean = (dot / n as f64) as f32;
        for i in 0..n {
            dxr[i] = r * (dnr[i] * gain[i] - xr[i] * r * mean);
            dgain[i] += f64::from(dnr[i] * xr[i] * r);
        }
    }
    Ok((dx, dgain.into_iter().map(|v| v as f32).collect()))
}

fn launch_rows(rows: usize) -> Result<cudarc::driver::LaunchConfig> {
    let grid = u32::try_from(rows)
        .ok()
        .filter(|&b| b < i32::MAX as u32)
        .ok_or_else(|| KernelError::Invalid("too many rows".into()))?;
    Ok(cudarc::driver::LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (crate::gpu::THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

impl Kernels {
    /// The forward on a GPU: `x` f32 `(rows, n)` contiguous and `gain` f32 `(n,)`; returns
    /// `out` (`x`'s shape) and `rstd` `(rows,)`. See [`rmsnorm_quant`].
    pub fn rmsnorm_quant_f32(
        &self,
        x: &Tensor,
        gain: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        crate::gpu::check_cuda()?;
        let ordinal = same_device(&[
            (cuda_input(x, "x", Kind::Float)?, "x"),
            (cuda_input(gain, "gain", Kind::Float)?, "gain"),
        ])?;
        let n = gain.numel();
        let rows = rows_of(x.numel(), n, "x")?;
        let dev = Device::Cuda(ordinal);
        let out = Tensor::empty(x.size(), (Kind::Float, dev));
        let rstd = Tensor::empty([to_i64(rows, "rows")?], (Kind::Float, dev));
        if rows == 0 {
            return Ok((out, rstd));
        }
        let (rows64, n64) = (to_i64(rows, "rows")?, to_i64(n, "n")?);
        // SAFETY: the kernel takes x, gain, out, rstd, then rows, n (i64) and eps (f32); the
        // sizes were checked; THREADS is a multiple of 32 as its block reductions need.
        unsafe {
            self.launch_on(
                ordinal,
                &BITLINEAR,
                "rmsnorm_quant_f32",
                &[x, gain, &out, &rstd],
                &[Scalar::I64(rows64), Scalar::I64(n64), Scalar::F32(eps)],
                launch_rows(rows)?,
            )
        }?;
        Ok((out, rstd))
    }

    /// The backward on a GPU: `(dx, dgain)` from `dn` and `x` (f32 `(rows, n)`), `gain` and the
    /// forward's `rstd`. See [`rmsnorm_quant_backward`].
    pub fn rmsnorm_quant_backward_f32(
        &self,
        dn: &Tensor,
        x: &Tensor,
        gain: &Tensor,
        rstd: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        crate::gpu::check_cuda()?;
        let ordinal = same_device(&[
            (cuda_input(dn, "dn", Kind::Float)?, "dn"),
            (cuda_input(x, "x", Kind::Float)?, "x"),
            (cuda_input(gain, "gain", Kind::Float)?, "gain"),
            (cuda_input(rstd, "rstd", Kind::Float)?, "rstd"),
        ])?;
        let n = gain.numel();
        let rows = rows_of(x.numel(), n, "x")?;
        expect_numel(dn, "dn", x.numel())?;
        expect_numel(rstd, "rstd", rows)?;
        let dev = Device::Cuda(ordinal);
        let dx = Tensor::empty(x.size(), (Kind::Float, dev));
        let dgain = Tensor::zeros([to_i64(n, "n")?], (Kind::Float, dev));
        if rows == 0 {
            return Ok((dx, dgain));
        }
        let (rows64, n64) = (to_i64(rows, "rows")?, to_i64(n, "n")?);
        let sizes = [Scalar::I64(rows64), Scalar::I64(n64)];
        // SAFETY: the kernel takes dn, x, gain, rstd, dx, then rows and n; sizes checked above.
        unsafe {
            self.launch_on(
                ordinal,
                &BITLINEAR,
                "rmsnorm_quant_backward_f32",
                &[dn, x, gain, rstd, &dx],
                &sizes,
                launch_rows(rows)?,
            )
        }?;
        // SAFETY: the kernel takes dn, x, rstd, dgain, then rows and n; a grid-stride loop over
        // the n columns.
        unsafe {
            self.launch_on(
                ordinal,
                &BITLINEAR,
                "rmsnorm_gain_grad_f32",
                &[dn, x, rstd, &dgain],
                &sizes,
                crate::gpu::elementwise(n),
            )
        }?;
        Ok((dx, dgain))
    }
}
