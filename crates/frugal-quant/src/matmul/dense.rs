//! Dot products of one f32 weight row with every row of X (shared by the NF4 kernel, which
//! decodes a row into f32 first, and by the dequantize-then-matmul fallbacks).

/// out[b] = Σ_i w[i] · x[b · cols + i] for b in 0..batch, with f32 accumulation (scalar).
pub(crate) fn dot_rows_scalar(w: &[f32], x: &[f32], cols: usize, out: &mut [f32]) {
    for (b, o) in out.iter_mut().enumerate() {
        let xr = &x[b * cols..(b + 1) * cols];
        // Four partial sums, as a compiler would not reassociate.
        let mut acc = [0f32; 4];
        let mut wc = w.chunks_exact(4);
        let mut xc = xr.chunks_exact(4);
        for (a, c) in (&mut wc).zip(&mut xc) {
            for k in 0..4 {
                acc[k] += a[k] * c[k];
            }
        }
        let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        for (a, c) in wc.remainder().iter().zip(xc.remainder()) {
            s += a * c;
        }
        *o = s;
    }
}

/// [`dot_rows_scalar`] with AVX2 + FMA.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `w.len() == cols`, `x.len() >= out.len() * cols`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot_rows_avx2(w: &[f32], x: &[f32], cols: usize, out: &mut [f32]) {
    debug_assert!(w.len() == cols && x.len() >= out.len() * cols);
    let batch = out.len();
    let mut b0 = 0;
    while b0 < batch {
        let nb = (batch - b0).min(4);
        let xs = &x[b0 * cols..];
        let o = &mut out[b0..b0 + nb];
        // SAFETY: AVX2 and FMA are enabled on this function; the lengths were checked above.
        unsafe {
            match nb {
                1 => chunk::<1, 4>(w, xs, cols, o),
                2 => chunk::<2, 2>(w, xs, cols, o),
                3 => chunk::<3, 2>(w, xs, cols, o),
                _ => chunk::<4, 1>(w, xs, cols, o),
            }
        }
        b0 += nb;
    }
}

/// NB rows of x, U independent accumulators each (to cover the FMA latency).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn chunk<const NB: usize, const U: usize>(
    w: &[f32],
    x: &[f32],
    cols: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let step = 8 * U;
    let main = cols / step * step;
    let wp = w.as_ptr();
    let xp = x.as_ptr();
    // SAFETY: every load reads w[i..i + 8] or x[b * cols + i..+8] with i + 8 <= main <= cols
    // and b < NB, inside the slices (x holds at least NB rows of cols values).
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); U]; NB];
        let mut i = 0;
        while i < main {
            for u in 0..U {
                let wv = _mm256_loadu_ps(wp.add(i + 8 * u));
                for b in 0..NB {
                    let xv = _mm256_loadu_ps(xp.add(b * cols + i + 8 * u));
                    acc[b][u] = _mm256_fmadd_ps(wv, xv, acc[b][u]);
                }
            }
            i += step;
        }
        for b in 0..NB {
            let mut a = acc[b][0];
            for u in 1..U {
                a = _mm256_add_ps(a, acc[b][u]);
            }
            let mut s = hsum_ps(a);
            for k in main..cols {
                s += *wp.add(k) * *xp.add(b * cols + k);
            }
            out[b] = s;
        }
    }
}

/// Sum of the eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) fn hsum_ps(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Sum of the eight i32 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) fn hsum_epi32(v: std::arch::x86_64::__m256i) -> i32 {
    use std::arch::x86_64::*;
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}
