//! Fast CPU products straight from packed weights: Y = X Wᵀ for a quantized weight W of shape
//! (out, in) and row-major f32 activations X of shape (batch, in), giving Y of shape
//! (batch, out), row-major.
//!
//! Each format has a portable scalar kernel, an AVX2 + FMA kernel and, where it pays, an
//! AVX-512 one (F for NF4 and int4, VNNI for int8 and ternary); the best the CPU has is chosen
//! at run time ([`Kernel::Auto`]), and all are tested against each other and against
//! dequantize-then-matmul. Output rows are spread over rayon's threads. Batches of any size
//! work; the kernels take up to 8 activation rows per pass.
//!
//! - [`nf4_matmul`]: NF4/FP4 codes looked up in the 16-entry table scaled once per block by
//!   its absmax (AVX-512: one `vpermps` for 16 codes; AVX2: two 8-lane halves and a blend),
//!   then fused multiply-adds with X in f32. Two output rows share each activation load from
//!   4 activation rows up.
//! - [`int4_matmul`]: GPTQ int4, dequantized on the fly per group (w = q · scale − scale ·
//!   zero), output rows in the lanes so that the GPTQ layout (eight input columns per word,
//!   words along the output dimension) is read contiguously: 8 rows per AVX2 register, 16 per
//!   AVX-512 register, 128 rows per pass at batch 1.
//! - [`int8_matmul`]: LLM.int8 weights times activations quantized per row to int8
//!   (q = round(x · 127 / max|x|)), exact int8 × int8 → i32 dot products (AVX2: `vpsignb` +
//!   `vpmaddubsw` + `vpmaddwd`; VNNI: `vpdpbusd` on w + 128, minus 128 Σx), then one scale
//!   `SCB[o] / 127 · max|x| / 127`.
//! - [`ternary_matmul`]: BitNet b1.58 ternary weights times int8 activations
//!   (127 / max(|x|, 1e-5)); no multiplication per weight in the scalar kernel (add, subtract
//!   or skip), and in the SIMD kernels bitnet.cpp's trick: multiply-add of the offset codes
//!   c = q + 1 ∈ {0, 1, 2} with the activations (`vpmaddubsw` or `vpdpbusd`, the activations
//!   reordered once to match the 2-bit packing), minus the sum of the activations.
//!
//! bf16 compute, as bitsandbytes' CPU kernel does it (activations rounded once to bf16, round
//! to nearest even; products of bf16 values accumulated in f32): an AVX512-BF16 kernel
//! (`vdpbf16ps`, 32 multiply-adds per instruction, bf16 weights looked up with one `vpermw` per
//! 32 codes) where the CPU has AVX-512 F, BW and BF16 ([`bf16_available`]), else a portable
//! kernel with the same arithmetic up to the order of the f32 additions.
//!
//! - [`nf4_matmul_bf16`]: the 16-entry table rounded to bf16 (NF4's values are not bf16
//!   numbers: each moves by at most 2⁻⁹ relative), Σ x · code per block accumulated in f32,
//!   then times the block's f32 absmax (the dequantized one for double quant). The absmax is
//!   not rounded to bf16, so each weight is bf16(code) · absmax, not bf16(code · absmax).
//! - [`int4_matmul_bf16`]: the codes 0..15 are exact in bf16, so per group
//!   y += scale · Σ x q − scale · zero · Σ x, with Σ x q accumulated in f32 by `vdpbf16ps`
//!   (each 32-bit lane a row's code pair (q[8k + j], q[8k + j + 4]) against the broadcast
//!   activation pair) and Σ x of the rounded activations per group computed once. Any `g_idx`
//!   (act-order) is honored: the portable kernel sums per group wherever its columns lie.

// The SIMD kernels index arrays of registers by batch row and unrolled step on purpose.
#![allow(clippy::needless_range_loop)]

mod bf16;
mod dense;
mod int4;
mod int4_bf16;
mod int8;
mod nf4;
mod nf4_bf16;
mod ternary;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_bf16;

pub use bf16::bf16_available;
pub use int4::{int4_matmul, int4_matmul_with};
pub use int4_bf16::{int4_matmul_bf16, int4_matmul_bf16_with};
pub use int8::{int8_matmul, int8_matmul_with};
pub use nf4::{nf4_matmul, nf4_matmul_with};
pub use nf4_bf16::{nf4_matmul_bf16, nf4_matmul_bf16_with};
pub use ternary::{ternary_matmul, ternary_matmul_with};

use crate::{QuantError, Result};
use rayon::prelude::*;

/// Which kernels to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// The fastest the CPU runs: AVX-512 (F for NF4 and int4, VNNI for int8 and ternary,
    /// BF16 for the bf16 products), else AVX2 + FMA, else scalar.
    Auto,
    /// The AVX2 + FMA kernels where the CPU has them (never AVX-512), else scalar (the bf16
    /// products have no AVX2 kernel: their portable one).
    Avx2,
    /// The portable scalar kernels.
    Scalar,
}

impl Kernel {
    /// Whether this choice runs the AVX2 (or better) kernels on this CPU.
    pub(crate) fn simd(self) -> bool {
        self != Kernel::Scalar && simd_available()
    }

    /// Whether this choice runs the AVX-512 kernels on this CPU.
    pub(crate) fn avx512(self) -> bool {
        self == Kernel::Auto && avx512_available()
    }

    /// Whether this choice runs the AVX-512 VNNI (integer dot product) kernels on this CPU.
    pub(crate) fn vnni(self) -> bool {
        self == Kernel::Auto && vnni_available()
    }

    /// Whether this choice runs the AVX512-BF16 kernels on this CPU.
    pub(crate) fn bf16(self) -> bool {
        self == Kernel::Auto && bf16_available()
    }
}

/// Whether this CPU runs the AVX-512 VNNI kernels (AVX-512 F, BW and VNNI, plus AVX2, FMA).
pub fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx512_available()
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU runs the AVX-512 kernels (AVX-512 F, plus AVX2 and FMA).
pub fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        simd_available() && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU runs the AVX2 + FMA kernels (x86-64 with both features).
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Errors unless `x` holds `batch` rows of `cols` values and `batch >= 1`.
pub(crate) fn check_x(x: &[f32], batch: usize, cols: usize) -> Result<()> {
    if batch == 0 || x.len() != batch * cols {
        return Err(QuantError::Shape {
            name: "activations".into(),
            shape: vec![batch as i64, cols as i64],
            reason: format!(
                "does not match the {} values given (x must be (batch >= 1, in) row-major)",
                x.len()
            ),
        });
    }
    Ok(())
}

/// Runs `f(row0, nrows, out)` over chunks of output rows in parallel, each chunk a multiple of
/// `tile` rows (except possibly the last), where `out` is the chunk's slice of Yᵀ laid out
/// (row, batch); returns Y laid out (batch, rows).
pub(crate) fn par_rows<F>(rows: usize, batch: usize, tile: usize, f: F) -> Vec<f32>
where
    F: Fn(usize, usize, &mut [f32]) + Sync + Send,
{
    let mut yt = vec![0f32; rows * batch];
    let threads = rayon::current_num_threads().max(1);
    let per = (rows / (threads * 8)).clamp(1, 256).div_ceil(tile) * tile;
    yt.par_chunks_mut(per * batch)
        .enumerate()
        .for_each(|(c, chunk)| f(c * per, chunk.len() / batch, chunk));
    if batch == 1 {
        return yt;
    }
    let mut y = vec![0f32; rows * batch];
    for (o, r) in yt.chunks_exact(batch).enumerate() {
        for (b, &v) in r.iter().enumerate() {
            y[b * rows + o] = v;
        }
    }
    y
}

/// Activations quantized per row to int8: q = round_half_even(x · 127 / m) with
/// m = max(max|x|, `floor`), and the factor m / 127 that brings the products back.
pub(crate) struct QuantRows {
    /// Codes, row-major (batch, cols).
    pub q: Vec<i8>,
    /// m / 127 per row (0 for an all-zero row when `floor` is 0).
    pub unscale: Vec<f32>,
}

/// Quantizes each of the `batch` rows of `x` to int8 (see [`QuantRows`]).
pub(crate) fn quantize_rows(x: &[f32], batch: usize, cols: usize, floor: f32) -> QuantRows {
    let mut q = vec![0i8; batch * cols];
    let mut unscale = vec![0f32; batch];
    for b in 0..batch {
        let row = &x[b * cols..(b + 1) * cols];
        let m = row.iter().fold(0f32, |m, v| m.max(v.abs())).max(floor);
        if m == 0.0 {
            continue;
        }
        let mul = 127.0f32 / m;
        for (o, &v) in q[b * cols..(b + 1) * cols].iter_mut().zip(row) {
            *o = (v * mul).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
        unscale[b] = m / 127.0;
    }
    QuantRows { q, unscale }
}

/// Dispatches a runtime batch-chunk size `nb` (1..=8) to a const-generic call (`NB` the last
/// const parameter, after any literal ones).
macro_rules! dispatch_nb {
    ($nb:expr, $f:ident :: <$($pre:literal ,)* NB> ( $($arg:expr),* $(,)? )) => {
        match $nb {
            1 => $f::<$($pre,)* 1>($($arg),*),
            2 => $f::<$($pre,)* 2>($($arg),*),
            3 => $f::<$($pre,)* 3>($($arg),*),
            4 => $f::<$($pre,)* 4>($($arg),*),
            5 => $f::<$($pre,)* 5>($($arg),*),
            6 => $f::<$($pre,)* 6>($($arg),*),
            7 => $f::<$($pre,)* 7>($($arg),*),
            _ => $f::<$($pre,)* 8>($($arg),*),
        }
    };
}
pub(crate) use dispatch_nb;
