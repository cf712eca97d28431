//! LLM.int8 products: activations quantized per row to int8, int8 × int8 → i32 dot products,
//! one float scale per output.

use super::{check_x, dispatch_nb, par_rows, quantize_rows, Kernel};
use crate::int8::Int8Rowwise;
use crate::Result;

/// Y = X Wᵀ for an LLM.int8 weight W (out, in) and X (batch, in) row-major; returns Y
/// (batch, out) row-major.
///
/// Each row of X is quantized to int8 with q = round_half_even(x · 127 / max|x|) (an all-zero
/// row gives 0); then `Y[b, o] = (Σ_i W_q[o, i] · q[b, i]) · (SCB[o] · max|x_b| / 127²)`, the
/// integer dot product exact in i32. Errors when `x.len() != batch * in` (or `batch == 0`).
pub fn int8_matmul(w: &Int8Rowwise, x: &[f32], batch: usize) -> Result<Vec<f32>> {
    int8_matmul_with(w, x, batch, Kernel::Auto)
}

/// [`int8_matmul`] with the kernel chosen.
pub fn int8_matmul_with(
    w: &Int8Rowwise,
    x: &[f32],
    batch: usize,
    kernel: Kernel,
) -> Result<Vec<f32>> {
    let (rows, cols) = (w.rows, w.cols);
    check_x(x, batch, cols)?;
    let qx = quantize_rows(x, batch, cols, 0.0);
    let simd = kernel.simd();
    let vnni = kernel.vnni();
    // For VNNI: Σ_i (w_i + 128) · x_i = Σ w x + 128 Σ x, with w + 128 unsigned.
    let sums: Vec<i32> =
        qx.q.chunks_exact(cols)
            .map(|r| r.iter().map(|&v| v as i32).sum())
            .collect();
    Ok(par_rows(rows, batch, 1, |r0, n, yt| {
        let mut dots = vec![0i32; batch];
        for r in 0..n {
            let o = r0 + r;
            let wr = &w.codes[o * cols..(o + 1) * cols];
            #[cfg(target_arch = "x86_64")]
            if vnni {
                let mut b0 = 0;
                while b0 < batch {
                    let nb = (batch - b0).min(8);
                    let xs = &qx.q[b0 * cols..];
                    let d = &mut dots[b0..b0 + nb];
                    // SAFETY: vnni is true only when the CPU has AVX-512 F/BW/VNNI and AVX2;
                    // wr holds cols codes and xs at least nb rows of cols.
                    unsafe { dispatch_nb!(nb, dot_i8_vnni::<NB>(wr, xs, cols, d)) };
                    for (d, s) in d.iter_mut().zip(&sums[b0..b0 + nb]) {
                        *d -= 128 * s;
                    }
                    b0 += nb;
                }
            } else {
                dot_i8(wr, &qx.q, cols, &mut dots, simd);
            }
            #[cfg(not(target_arch = "x86_64"))]
            dot_i8(wr, &qx.q, cols, &mut dots, simd);
            let s = w.scb[o] / 127.0;
            for b in 0..batch {
                yt[r * batch + b] = dots[b] as f32 * (s * qx.unscale[b]);
            }
        }
    }))
}

/// out[b] = Σ_i w[i] · x[b · cols + i] exactly, in i32.
pub(crate) fn dot_i8(w: &[i8], x: &[i8], cols: usize, out: &mut [i32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        let mut b0 = 0;
        while b0 < out.len() {
            let nb = (out.len() - b0).min(8);
            let xs = &x[b0 * cols..];
            let o = &mut out[b0..b0 + nb];
            // SAFETY: simd is true only when the CPU has AVX2; w holds cols codes and xs at
            // least nb rows of cols.
            unsafe { dispatch_nb!(nb, dot_i8_avx2::<NB>(w, xs, cols, o)) };
            b0 += nb;
        }
        return;
    }
    let _ = simd;
    for (b, o) in out.iter_mut().enumerate() {
        *o = w
            .iter()
            .zip(&x[b * cols..(b + 1) * cols])
            .map(|(&a, &c)| a as i32 * c as i32)
            .sum();
    }
}

/// NB rows of x: |w| (unsigned) times x with w's sign (`vpsignb`), `vpmaddubsw` into i16 pairs
/// (at most 2 · 127² in size, no saturation), `vpmaddwd` with ones into i32.
///
/// # Safety
/// The CPU must have AVX2; `w.len() == cols`, `x.len() >= NB * cols`, `out.len() == NB`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_i8_avx2<const NB: usize>(w: &[i8], x: &[i8], cols: usize, out: &mut [i32]) {
    use std::arch::x86_64::*;
    debug_assert!(w.len() == cols && x.len() >= NB * cols && out.len() == NB);
    let main = cols / 32 * 32;
    // SAFETY: loads read w[i..i + 32] and x[b * cols + i..+32] with i + 32 <= main <= cols and
    // b < NB, inside the slices.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_si256(); NB];
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        let mut i = 0;
        while i < main {
            let wv = _mm256_loadu_si256(wp.add(i) as *const __m256i);
            let wa = _mm256_sign_epi8(wv, wv);
            for b in 0..NB {
                let xv = _mm256_loadu_si256(xp.add(b * cols + i) as *const __m256i);
                let p = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(xv, wv));
                acc[b] = _mm256_add_epi32(acc[b], _mm256_madd_epi16(p, ones));
            }
            i += 32;
        }
        for b in 0..NB {
            let mut s = super::dense::hsum_epi32(acc[b]);
            for k in main..cols {
                s += *wp.add(k) as i32 * *xp.add(b * cols + k) as i32;
            }
            out[b] = s;
        }
    }
}

/// Σ_i (w_i + 128) · x[b, i] for NB rows of x with AVX-512 VNNI: `w ^ 0x80` is w + 128 as an
/// unsigned byte, and `vpdpbusd` multiplies 64 unsigned by signed bytes and adds groups of four
/// into 16 i32 lanes (sums of four products, at most 4 · 255 · 127, cannot overflow). The
/// caller subtracts 128 Σ x. The tail past the last 64 columns is done in scalar.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI; `w.len() == cols`, `x.len() >= NB * cols`,
/// `out.len() == NB`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
unsafe fn dot_i8_vnni<const NB: usize>(w: &[i8], x: &[i8], cols: usize, out: &mut [i32]) {
    use std::arch::x86_64::*;
    debug_assert!(w.len() == cols && x.len() >= NB * cols && out.len() == NB);
    let main = cols / 64 * 64;
    // SAFETY: loads read w[i..i + 64] and x[b * cols + i..+64] with i + 64 <= main <= cols and
    // b < NB, inside the slices.
    unsafe {
        let flip = _mm512_set1_epi8(-128);
        let mut acc = [_mm512_setzero_si512(); NB];
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        let mut i = 0;
        while i < main {
            let wu = _mm512_xor_si512(_mm512_loadu_si512(wp.add(i) as *const __m512i), flip);
            for b in 0..NB {
                let xv = _mm512_loadu_si512(xp.add(b * cols + i) as *const __m512i);
                acc[b] = _mm512_dpbusd_epi32(acc[b], wu, xv);
            }
            i += 64;
        }
        for b in 0..NB {
            let mut s = _mm512_reduce_add_epi32(acc[b]);
            for k in main..cols {
                s += (*wp.add(k) as i32 + 128) * *xp.add(b * cols + k) as i32;
            }
            out[b] = s;
        }
    }
}
