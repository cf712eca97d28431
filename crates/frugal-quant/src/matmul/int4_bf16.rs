//! GPTQ int4 products computed in bf16: activations rounded once to bf16, the codes 0..15
//! (exact in bf16) multiplied with them and summed in f32 per group, then per group
//! y += scale · Σ x q − scale · zero · Σ x (AVX512-BF16: output rows in the lanes, code pairs
//! dotted with broadcast activation pairs by `vdpbf16ps`; elsewhere a portable kernel).

use super::bf16::{from_bf16, to_bf16};
use super::{check_x, dispatch_nb, par_rows, Kernel};
use crate::int4::Int4Gptq;
use crate::Result;

/// How many word rows of `qweight` ahead the AVX512-BF16 kernel prefetches.
#[cfg(target_arch = "x86_64")]
const PREFETCH: usize = 8;
/// 16-lane registers of output rows per pass of the one-activation-row kernel (128 rows).
#[cfg(target_arch = "x86_64")]
const WIDE: usize = 8;

/// Y = X Wᵀ for a GPTQ int4 weight W (out, in) and X (batch, in) row-major, computed in bf16;
/// returns Y (batch, out) row-major.
///
/// Each activation is rounded to bf16 (nearest, ties to even); with
/// `W[o, i] = scale[g, o] · (q[i, o] − zero[g, o])`, `g = g_idx[i]`, each output is
/// Σ_g scale · Σ_{i in g} x q − scale · zero · Σ_{i in g} x, the inner sums in f32 (the
/// products x q are exact). Uses the AVX512-BF16 kernel where the CPU has it, the group order
/// is plain (`g_idx[i] = i / group_size`, group size a multiple of 8) and `out` a multiple of
/// 16; otherwise a portable kernel (any `g_idx`; same arithmetic, f32 sums in another order).
/// Errors when `x.len() != batch * in` (or `batch == 0`).
pub fn int4_matmul_bf16(w: &Int4Gptq, x: &[f32], batch: usize) -> Result<Vec<f32>> {
    int4_matmul_bf16_with(w, x, batch, Kernel::Auto)
}

/// [`int4_matmul_bf16`] with the kernel chosen ([`Kernel::Auto`] runs the AVX512-BF16 kernel
/// where it can; the others the portable one).
pub fn int4_matmul_bf16_with(
    w: &Int4Gptq,
    x: &[f32],
    batch: usize,
    kernel: Kernel,
) -> Result<Vec<f32>> {
    let (rows, cols, gs) = (w.rows, w.cols, w.group_size);
    check_x(x, batch, cols)?;
    let groups = w.groups();
    let xb: Vec<u16> = x.iter().map(|&v| to_bf16(v)).collect();
    // Per (group, row): -scale * zero, row-major (groups, rows), as the f32 kernels.
    let neg_sz: Vec<f32> = (0..groups * rows)
        .map(|k| -w.scales[k] * w.zero(k / rows, k % rows))
        .collect();
    // Σ x per (batch row, group) of the rounded activations, summed in f64.
    let mut sx64 = vec![0f64; batch * groups];
    for b in 0..batch {
        for i in 0..cols {
            sx64[b * groups + w.g_idx[i] as usize] += from_bf16(xb[b * cols + i]) as f64;
        }
    }
    let sx: Vec<f32> = sx64.iter().map(|&v| v as f32).collect();
    #[cfg(target_arch = "x86_64")]
    {
        let plain = gs % 8 == 0
            && cols % gs == 0
            && groups == cols / gs
            && w.g_idx
                .iter()
                .enumerate()
                .all(|(i, &g)| g as usize == i / gs);
        if plain && rows % 16 == 0 && kernel.bf16() {
            return Ok(simd(w, &neg_sz, &sx, &xb, batch));
        }
    }
    let _ = (kernel, gs);
    Ok(portable(w, &neg_sz, &sx, &xb, batch))
}

/// The portable kernel: per row and activation row, Σ x q summed per group (wherever the
/// group's columns lie), then Σ_g scale · Σ x q + (−scale · zero) · Σ x.
fn portable(w: &Int4Gptq, neg_sz: &[f32], sx: &[f32], xb: &[u16], batch: usize) -> Vec<f32> {
    let (rows, cols) = (w.rows, w.cols);
    let groups = w.groups();
    let xf: Vec<f32> = xb.iter().map(|&h| from_bf16(h)).collect();
    par_rows(rows, batch, 1, |r0, n, yt| {
        let mut q = vec![0f32; cols];
        let mut sq = vec![0f32; groups];
        for r in 0..n {
            let o = r0 + r;
            for (i, v) in q.iter_mut().enumerate() {
                *v = w.code(i, o) as f32;
            }
            for b in 0..batch {
                sq.fill(0.0);
                for ((&g, &qi), &xi) in w.g_idx.iter().zip(&q).zip(&xf[b * cols..]) {
                    sq[g as usize] += xi * qi;
                }
                let mut y = 0f32;
                for g in 0..groups {
                    y += w.scales[g * rows + o] * sq[g] + neg_sz[g * rows + o] * sx[b * groups + g];
                }
                yt[r * batch + b] = y;
            }
        }
    })
}

/// Runs the AVX512-BF16 kernels: 128 rows per pass at batch 1 (when `out` is a multiple of
/// 128), else 16 rows times up to 8 activation rows.
#[cfg(target_arch = "x86_64")]
fn simd(w: &Int4Gptq, neg_sz: &[f32], sx: &[f32], xb: &[u16], batch: usize) -> Vec<f32> {
    let (rows, cols) = (w.rows, w.cols);
    let groups = w.groups();
    // Activation pairs as the kernel broadcasts them: (x[8k + j], x[8k + j + 4]) for j < 4,
    // the first in the low half, matching the codes q[8k + j] (bits 4j..) and q[8k + j + 4]
    // (bits 4j + 16..) once a word is shifted right by 4j.
    let half = cols / 2;
    let mut xp = vec![0u32; batch * half];
    for b in 0..batch {
        for k in 0..cols / 8 {
            for j in 0..4 {
                let i = b * cols + 8 * k + j;
                xp[b * half + 4 * k + j] = xb[i] as u32 | (xb[i + 4] as u32) << 16;
            }
        }
    }
    // bf16 of 0..15, twice: `vpermw` reads 5 index bits, the fifth from the next code.
    let mut table = [0u16; 32];
    for (k, t) in table.iter_mut().enumerate() {
        *t = to_bf16((k % 16) as f32);
    }
    let xp = &xp;
    let table = &table;
    if batch == 1 && rows % (16 * WIDE) == 0 {
        return par_rows(rows, 1, 16 * WIDE, |r0, n, yt| {
            for t in (0..n).step_by(16 * WIDE) {
                // SAFETY: the CPU has AVX-512 F, BW, BF16, AVX2 and FMA (kernel.bf16()); rows
                // is a multiple of 16 · WIDE so rows r0 + t..+16 · WIDE exist; xp holds
                // cols / 2 pairs, sx groups sums; the group order is plain, gs a multiple of 8.
                unsafe {
                    tile_avx512bf16::<WIDE, 1>(
                        w,
                        neg_sz,
                        sx,
                        table,
                        r0 + t,
                        xp,
                        &mut yt[t..t + 16 * WIDE],
                    )
                };
            }
        });
    }
    par_rows(rows, batch, 16, |r0, n, yt| {
        let mut tile = [0f32; 16 * 8];
        for t in (0..n).step_by(16) {
            let mut b0 = 0;
            while b0 < batch {
                let nb = (batch - b0).min(8);
                let xs = &xp[b0 * half..];
                let ss = &sx[b0 * groups..];
                // SAFETY: the CPU has AVX-512 F, BW, BF16, AVX2 and FMA (kernel.bf16()); rows
                // is a multiple of 16 so rows r0 + t..+16 exist; xs holds nb rows of
                // cols / 2 pairs, ss nb rows of groups sums; the group order is plain, gs a
                // multiple of 8; tile holds 16 · nb values.
                unsafe {
                    dispatch_nb!(
                        nb,
                        tile_avx512bf16::<1, NB>(w, neg_sz, ss, table, r0 + t, xs, &mut tile)
                    )
                };
                for r in 0..16 {
                    for b in 0..nb {
                        yt[(t + r) * batch + b0 + b] = tile[b * 16 + r];
                    }
                }
                b0 += nb;
            }
        }
    })
}

/// Rows o0..o0 + 16 R (one per lane, R registers) times NB activation rows: per word row k of
/// `qweight` (input columns 8k..8k + 8) one 64-byte load per register holds 16 rows' codes;
/// shifted right by 4j (j < 4), each 32-bit lane's two 16-bit halves hold the codes of
/// columns 8k + j and 8k + j + 4 in their low bits, which one `vpermw` turns into bf16 and one
/// `vdpbf16ps` per activation row multiplies with the broadcast activation pair, into a
/// per-group f32 sum; at the end of each group y += scale · Σ x q + (−scale · zero) · Σ x.
/// Writes out[b * 16 R + r].
///
/// # Safety
/// The CPU must have AVX-512 F, BW, BF16, AVX2 and FMA; o0 + 16 R <= rows; `x` holds NB rows
/// of cols / 2 pairs, `sx` NB rows of `groups` sums; the group order is plain with group_size
/// a multiple of 8; `out.len() >= 16 R NB`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_avx512bf16<const R: usize, const NB: usize>(
    w: &Int4Gptq,
    neg_sz: &[f32],
    sx: &[f32],
    table: &[u16; 32],
    o0: usize,
    x: &[u32],
    out: &mut [f32],
) {
    use super::bf16::as_bh;
    use std::arch::x86_64::*;
    let (rows, cols, gs) = (w.rows, w.cols, w.group_size);
    let groups = cols / gs;
    let half = cols / 2;
    debug_assert!(o0 + 16 * R <= rows && gs % 8 == 0 && cols % gs == 0);
    debug_assert!(x.len() >= NB * half && sx.len() >= NB * groups && out.len() >= 16 * R * NB);
    // SAFETY: qweight holds (cols / 8) · rows words: reads at k · rows + o0 + 16 r..+16 with
    // k < cols / 8 and o0 + 16 R <= rows stay inside; scales and neg_sz hold groups · rows
    // values; x reads are at b · half + 4k + j < NB · half, sx at b · groups + g; out holds
    // 16 R NB values.
    unsafe {
        let t = _mm512_loadu_si512(table.as_ptr() as *const __m512i);
        let qp = w.qweight.as_ptr();
        let xq = x.as_ptr() as *const i32;
        let mut acc = [[_mm512_setzero_ps(); NB]; R];
        for g in 0..groups {
            let mut blk = [[_mm512_setzero_ps(); NB]; R];
            for k in g * gs / 8..(g + 1) * gs / 8 {
                if k + PREFETCH < cols / 8 {
                    let pf = qp.add((k + PREFETCH) * rows + o0) as *const i8;
                    for r in 0..R {
                        _mm_prefetch::<_MM_HINT_T0>(pf.add(64 * r));
                    }
                }
                let row = qp.add(k * rows + o0);
                for r in 0..R {
                    let mut v = _mm512_loadu_si512(row.add(16 * r) as *const __m512i);
                    for j in 0..4 {
                        let wv = as_bh(_mm512_permutexvar_epi16(v, t));
                        v = _mm512_srli_epi32::<4>(v);
                        for b in 0..NB {
                            let xv = as_bh(_mm512_set1_epi32(*xq.add(b * half + 4 * k + j)));
                            blk[r][b] = _mm512_dpbf16_ps(blk[r][b], wv, xv);
                        }
                    }
                }
            }
            for r in 0..R {
                let s = _mm512_loadu_ps(w.scales.as_ptr().add(g * rows + o0 + 16 * r));
                let nz = _mm512_loadu_ps(neg_sz.as_ptr().add(g * rows + o0 + 16 * r));
                for b in 0..NB {
                    let a = _mm512_fmadd_ps(s, blk[r][b], acc[r][b]);
                    acc[r][b] = _mm512_fmadd_ps(nz, _mm512_set1_ps(sx[b * groups + g]), a);
                }
            }
        }
        for r in 0..R {
            for b in 0..NB {
                _mm512_storeu_ps(out.as_mut_ptr().add((b * R + r) * 16), acc[r][b]);
            }
        }
    }
}
