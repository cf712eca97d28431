//! GPTQ int4 products, dequantized on the fly per group: several output rows at a time (8 per
//! AVX2 register, 16 per AVX-512 register, 128 per pass at batch 1), so that the words of
//! `qweight` (eight input columns each, laid out along the output dimension) are read
//! contiguously.

use super::dense::dot_rows_scalar;
use super::{check_x, dispatch_nb, par_rows, Kernel};
use crate::int4::Int4Gptq;
use crate::Result;

/// How many word rows of `qweight` ahead the AVX-512 kernel prefetches.
const PREFETCH: usize = 8;
/// Output rows per pass of the one-activation-row AVX-512 kernel (8 registers of 16).
const WIDE: usize = 128;

/// Y = X Wᵀ for a GPTQ int4 weight W (out, in) and X (batch, in) row-major; returns Y
/// (batch, out) row-major, with `W[o, i] = scale[g, o] · (q[i, o] − zero[g, o])`,
/// `g = g_idx[i]`.
///
/// The SIMD kernel needs the plain group order (`g_idx[i] = i / group_size`); act-order weights
/// run the scalar kernel. Errors when `x.len() != batch * in` (or `batch == 0`).
pub fn int4_matmul(w: &Int4Gptq, x: &[f32], batch: usize) -> Result<Vec<f32>> {
    int4_matmul_with(w, x, batch, Kernel::Auto)
}

/// [`int4_matmul`] with the kernel chosen.
pub fn int4_matmul_with(w: &Int4Gptq, x: &[f32], batch: usize, kernel: Kernel) -> Result<Vec<f32>> {
    let (rows, cols, gs) = (w.rows, w.cols, w.group_size);
    check_x(x, batch, cols)?;
    let plain = gs % 8 == 0
        && cols % gs == 0
        && w.g_idx
            .iter()
            .enumerate()
            .all(|(i, &g)| g as usize == i / gs);
    let groups = w.groups();
    // Per (group, row): scale and -scale * zero, row-major (groups, rows).
    let neg_sz: Vec<f32> = (0..groups * rows)
        .map(|k| -w.scales[k] * w.zero(k / rows, k % rows))
        .collect();
    #[cfg(target_arch = "x86_64")]
    if plain && batch == 1 && rows % WIDE == 0 && kernel.avx512() {
        return Ok(par_rows(rows, 1, WIDE, |r0, n, yt| {
            for t in (0..n).step_by(WIDE) {
                // SAFETY: the CPU has AVX-512 F, AVX2 and FMA (kernel.avx512()); rows is a
                // multiple of WIDE so rows r0 + t..+WIDE exist; x holds cols values; the group
                // order is plain and gs a multiple of 8.
                unsafe { wide_avx512(w, &neg_sz, r0 + t, x, &mut yt[t..t + WIDE]) };
            }
        }));
    }
    #[cfg(target_arch = "x86_64")]
    if plain && rows % 16 == 0 && kernel.avx512() {
        return Ok(par_rows(rows, batch, 16, |r0, n, yt| {
            let mut tile = [0f32; 16 * 8];
            for t in (0..n).step_by(16) {
                let o0 = r0 + t;
                let mut b0 = 0;
                while b0 < batch {
                    let nb = (batch - b0).min(8);
                    let xs = &x[b0 * cols..];
                    // SAFETY: the CPU has AVX-512 F, AVX2 and FMA (kernel.avx512()); rows is a
                    // multiple of 16 so rows o0..o0 + 16 exist; xs holds nb rows of cols; the
                    // group order is plain and gs a multiple of 8.
                    unsafe { dispatch_nb!(nb, tile16_avx512::<NB>(w, &neg_sz, o0, xs, &mut tile)) };
                    for r in 0..16 {
                        for b in 0..nb {
                            yt[(t + r) * batch + b0 + b] = tile[b * 16 + r];
                        }
                    }
                    b0 += nb;
                }
            }
        }));
    }
    #[cfg(target_arch = "x86_64")]
    if plain && kernel.simd() {
        return Ok(par_rows(rows, batch, 8, |r0, n, yt| {
            let mut tile = [0f32; 8 * 8];
            for t in (0..n).step_by(8) {
                let o0 = r0 + t;
                let mut b0 = 0;
                while b0 < batch {
                    let nb = (batch - b0).min(8);
                    let xs = &x[b0 * cols..];
                    // SAFETY: the CPU has AVX2 and FMA (kernel.simd()); rows is a multiple of
                    // 8 so rows o0..o0 + 8 exist; xs holds nb rows of cols; the group order
                    // is plain and gs a multiple of 8.
                    unsafe { dispatch_nb!(nb, tile_avx2::<NB>(w, &neg_sz, o0, xs, &mut tile)) };
                    for r in 0..8 {
                        for b in 0..nb {
                            yt[(t + r) * batch + b0 + b] = tile[b * 8 + r];
                        }
                    }
                    b0 += nb;
                }
            }
        }));
    }
    let _ = (plain, kernel);
    Ok(par_rows(rows, batch, 8, |r0, n, yt| {
        // Eight rows decoded at a time (contiguous words), then dotted with X.
        let mut buf = vec![0f32; 8 * cols];
        for t in (0..n).step_by(8) {
            let o0 = r0 + t;
            for i in 0..cols {
                let g = w.g_idx[i] as usize;
                let words = &w.qweight[(i / 8) * rows + o0..(i / 8) * rows + o0 + 8];
                for (r, &word) in words.iter().enumerate() {
                    let q = ((word as u32 >> (4 * (i % 8))) & 0xF) as f32;
                    buf[r * cols + i] = q * w.scales[g * rows + o0 + r] + neg_sz[g * rows + o0 + r];
                }
            }
            for r in 0..8 {
                let out = &mut yt[(t + r) * batch..(t + r + 1) * batch];
                dot_rows_scalar(&buf[r * cols..(r + 1) * cols], x, cols, out);
            }
        }
    }))
}

/// Rows o0..o0 + 8 (one per lane) times NB rows of x: per word row k (input columns 8k..8k+8)
/// one 256-bit load holds the 8 × 8 codes; w = q · scale − scale · zero; one FMA per batch row
/// with the broadcast activation. Writes tile[b * 8 + r].
///
/// # Safety
/// The CPU must have AVX2 and FMA; o0 + 8 <= rows; x holds NB rows of cols; the group order is
/// plain with group_size a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const NB: usize>(
    w: &Int4Gptq,
    neg_sz: &[f32],
    o0: usize,
    x: &[f32],
    tile: &mut [f32; 64],
) {
    use std::arch::x86_64::*;
    let (rows, cols, gs) = (w.rows, w.cols, w.group_size);
    debug_assert!(o0 + 8 <= rows && x.len() >= NB * cols && gs % 8 == 0);
    // SAFETY: qweight holds (cols / 8) · rows words, so reading 8 words at k · rows + o0 with
    // k < cols / 8 and o0 + 8 <= rows stays inside; scales and neg_sz hold groups · rows
    // values; x reads are at b · cols + i with b < NB, i < cols.
    unsafe {
        let m = _mm256_set1_epi32(0xF);
        let mut acc = [_mm256_setzero_ps(); NB];
        let qp = w.qweight.as_ptr();
        let xp = x.as_ptr();
        for g in 0..cols / gs {
            let s = _mm256_loadu_ps(w.scales.as_ptr().add(g * rows + o0));
            let nz = _mm256_loadu_ps(neg_sz.as_ptr().add(g * rows + o0));
            for k in g * gs / 8..(g + 1) * gs / 8 {
                let mut v = _mm256_loadu_si256(qp.add(k * rows + o0) as *const __m256i);
                for j in 0..8 {
                    let q = _mm256_cvtepi32_ps(_mm256_and_si256(v, m));
                    v = _mm256_srli_epi32::<4>(v);
                    let wv = _mm256_fmadd_ps(q, s, nz);
                    for b in 0..NB {
                        let xv = _mm256_broadcast_ss(&*xp.add(b * cols + 8 * k + j));
                        acc[b] = _mm256_fmadd_ps(wv, xv, acc[b]);
                    }
                }
            }
        }
        for b in 0..NB {
            _mm256_storeu_ps(tile.as_mut_ptr().add(b * 8), acc[b]);
        }
    }
}

/// [`tile_avx2`] with AVX-512 and 16 output rows per register: one 64-byte load (a whole cache
/// line of `qweight`) per eight input columns. Writes tile[b * 16 + r].
///
/// # Safety
/// The CPU must have AVX-512 F, AVX2 and FMA; o0 + 16 <= rows; x holds NB rows of cols; the
/// group order is plain with group_size a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn tile16_avx512<const NB: usize>(
    w: &Int4Gptq,
    neg_sz: &[f32],
    o0: usize,
    x: &[f32],
    tile: &mut [f32; 128],
) {
    use std::arch::x86_64::*;
    let (rows, cols, gs) = (w.rows, w.cols, w.group_size);
    debug_assert!(o0 + 16 <= rows && x.len() >= NB * cols && gs % 8 == 0);
    // SAFETY: qweight holds (cols / 8) · rows words, so reading 16 words at k · rows + o0 with
    // k < cols / 8 and o0 + 16 <= rows stays inside; scales and neg_sz hold groups · rows
    // values; x reads are at b · cols + i with b < NB, i < cols.
    unsafe {
        let m = _mm512_set1_epi32(0xF);
        let mut acc = [_mm512_setzero_ps(); NB];
        let qp = w.qweight.as_ptr();
        let xp = x.as_ptr();
        for g in 0..cols / gs {
            let s = _mm512_loadu_ps(w.scales.as_ptr().add(g * rows + o0));
            let nz = _mm512_loadu_ps(neg_sz.as_ptr().add(g * rows + o0));
            for k in g * gs / 8..(g + 1) * gs / 8 {
                // The words of one tile lie a whole row of `qweight` apart (rows · 4 bytes):
                // fetch a few word rows ahead, as the hardware prefetchers do not cross pages.
                // A prefetch past the end is harmless (no fault), but stay inside anyway.
                if k + PREFETCH < cols / 8 {
                    _mm_prefetch::<_MM_HINT_T0>(qp.add((k + PREFETCH) * rows + o0) as *const i8);
                }
                let mut v = _mm512_loadu_si512(qp.add(k * rows + o0) as *const __m512i);
                for j in 0..8 {
                    let q = _mm512_cvtepi32_ps(_mm512_and_si512(v, m));
                    v = _mm512_srli_epi32::<4>(v);
                    let wv = _mm512_fmadd_ps(q, s, nz);
                    for b in 0..NB {
                        let xv = _mm512_set1_ps(*xp.add(b * cols + 8 * k + j));
                        acc[b] = _mm512_fmadd_ps(wv, xv, acc[b]);
                    }
                }
            }
        }
        for b in 0..NB {
            _mm512_storeu_ps(tile.as_mut_ptr().add(b * 16), acc[b]);
        }
    }
}

/// One activation row, WIDE output rows o0..o0 + WIDE at once (eight 16-lane accumulators), so
/// that each word row of `qweight` is read as 512 contiguous bytes (instead of 64 bytes a page
/// apart): per word row k, the eight activations x[8k..8k + 8] are broadcast once and shared by
/// the eight tiles. Writes out[r] for r < WIDE.
///
/// # Safety
/// The CPU must have AVX-512 F, AVX2 and FMA; o0 + WIDE <= rows; `x.len() == cols`; the group
/// order is plain with group_size a multiple of 8; `out.len() >= WIDE`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn wide_avx512(w: &Int4Gptq, neg_sz: &[f32], o0: usize, x: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (rows, cols, gs) = (w.rows, w.cols, w.group_size);
    debug_assert!(o0 + WIDE <= rows && x.len() == cols && gs % 8 == 0 && out.len() >= WIDE);
    // SAFETY: qweight holds (cols / 8) · rows words: reads at k · rows + o0 + 16 t..+16 with
    // k < cols / 8 and o0 + 16 t + 16 <= o0 + WIDE <= rows stay inside; scales and neg_sz hold
    // groups · rows values; x reads are below cols; out holds WIDE values.
    unsafe {
        let m = _mm512_set1_epi32(0xF);
        let mut acc = [_mm512_setzero_ps(); WIDE / 16];
        let qp = w.qweight.as_ptr();
        let xp = x.as_ptr();
        for g in 0..cols / gs {
            let sp = w.scales.as_ptr().add(g * rows + o0);
            let zp = neg_sz.as_ptr().add(g * rows + o0);
            for k in g * gs / 8..(g + 1) * gs / 8 {
                if k + PREFETCH < cols / 8 {
                    let pf = qp.add((k + PREFETCH) * rows + o0) as *const i8;
                    for l in 0..WIDE / 16 {
                        _mm_prefetch::<_MM_HINT_T0>(pf.add(64 * l));
                    }
                }
                let mut xb = [_mm512_setzero_ps(); 8];
                for j in 0..8 {
                    xb[j] = _mm512_set1_ps(*xp.add(8 * k + j));
                }
                let row = qp.add(k * rows + o0);
                for t in 0..WIDE / 16 {
                    let s = _mm512_loadu_ps(sp.add(16 * t));
                    let nz = _mm512_loadu_ps(zp.add(16 * t));
                    let mut v = _mm512_loadu_si512(row.add(16 * t) as *const __m512i);
                    for j in 0..8 {
                        let q = _mm512_cvtepi32_ps(_mm512_and_si512(v, m));
                        v = _mm512_srli_epi32::<4>(v);
                        acc[t] = _mm512_fmadd_ps(_mm512_fmadd_ps(q, s, nz), xb[j], acc[t]);
                    }
                }
            }
        }
        for t in 0..WIDE / 16 {
            _mm512_storeu_ps(out.as_mut_ptr().add(16 * t), acc[t]);
        }
    }
}
