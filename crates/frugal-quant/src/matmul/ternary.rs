//! Ternary (BitNet b1.58) products: int8 activations, no multiplication per weight in the
//! scalar kernel, multiply-add of the offset codes in the SIMD one.

use super::{check_x, dispatch_nb, par_rows, quantize_rows, Kernel};
use crate::ternary::{Ternary, MIN_SCALE};
use crate::Result;

/// Weights per AVX2 block: 32 packed bytes.
const BLOCK: usize = 128;
/// Weights per AVX-512 block: 64 packed bytes.
const VBLOCK: usize = 256;
/// How many rows ahead the batch-1 kernels prefetch the codes (16 measured best of 8, 16, 32).
const PREFETCH: usize = 16;

/// The activations in the order the codes come out of a block of `block / 4` bytes: shift j
/// (j = 0..4) of byte k holds element 4k + j, so out[.., (block / 4) j + k] = q[.., 4k + j];
/// columns past the last full block stay in place.
fn permute_blocks(q: &[i8], batch: usize, cols: usize, block: usize) -> Vec<i8> {
    let nb = block / 4;
    let mut xp = q.to_vec();
    for b in 0..batch {
        for blk in 0..cols / block {
            let base = b * cols + blk * block;
            for k in 0..nb {
                for j in 0..4 {
                    xp[base + nb * j + k] = q[base + 4 * k + j];
                }
            }
        }
    }
    xp
}

/// Σ_i q[b, i] per row.
fn row_sums(q: &[i8], cols: usize) -> Vec<i32> {
    q.chunks_exact(cols)
        .map(|r| r.iter().map(|&v| v as i32).sum())
        .collect()
}

/// Y = X Wᵀ for a ternary weight W (out, in) and X (batch, in) row-major; returns Y
/// (batch, out) row-major.
///
/// Each row of X is quantized to int8 as BitNet b1.58 does: q = round_half_even(x · 127 / m),
/// m = max(max|x|, 1e-5); then Y[b, o] = (Σ_i c[o, i] · q[b, i]) · (s_o · m_b / 127) with
/// c ∈ {−1, 0, 1} and s_o the scale of row o, the integer sum exact in i32. Errors when
/// `x.len() != batch * in` (or `batch == 0`).
pub fn ternary_matmul(w: &Ternary, x: &[f32], batch: usize) -> Result<Vec<f32>> {
    ternary_matmul_with(w, x, batch, Kernel::Auto)
}

/// [`ternary_matmul`] with the kernel chosen.
pub fn ternary_matmul_with(
    w: &Ternary,
    x: &[f32],
    batch: usize,
    kernel: Kernel,
) -> Result<Vec<f32>> {
    let (rows, cols) = (w.rows, w.cols);
    check_x(x, batch, cols)?;
    let qx = quantize_rows(x, batch, cols, MIN_SCALE);
    let finish = |o: usize, dots: &[i32], out: &mut [f32]| {
        let s = w.scales[o / w.rows_per_scale];
        for b in 0..batch {
            out[b] = dots[b] as f32 * (s * qx.unscale[b]);
        }
    };
    #[cfg(target_arch = "x86_64")]
    if cols % 4 == 0 && (kernel.vnni() || kernel.simd()) {
        let vnni = kernel.vnni();
        let xp = permute_blocks(&qx.q, batch, cols, if vnni { VBLOCK } else { BLOCK });
        let sums = row_sums(&qx.q, cols);
        if batch == 1 {
            // R rows per pass, R independent accumulators sharing each activation load.
            const R: usize = 8;
            let rb = cols / 4;
            return Ok(par_rows(rows, 1, R, |r0, n, yt| {
                let mut dots = [0i32; R];
                let mut r = 0;
                while r < n {
                    let k = (n - r).min(R);
                    let codes = &w.packed[(r0 + r) * rb..(r0 + r + k) * rb];
                    let d = &mut dots[..k];
                    // SAFETY: the CPU has AVX-512 F/BW/VNNI and AVX2 when `vnni`, else AVX2
                    // (kernel.simd()); codes holds k rows of cols / 4 bytes, xp one row of cols
                    // permuted for the block size of the kernel called.
                    unsafe {
                        match (k, vnni) {
                            (R, true) => rows_vnni::<R>(codes, &xp, cols, d),
                            (R, false) => rows_avx2::<R>(codes, &xp, cols, d),
                            (_, true) => {
                                for (c, d) in codes.chunks_exact(rb).zip(d.chunks_exact_mut(1)) {
                                    rows_vnni::<1>(c, &xp, cols, d)
                                }
                            }
                            (_, false) => {
                                for (c, d) in codes.chunks_exact(rb).zip(d.chunks_exact_mut(1)) {
                                    rows_avx2::<1>(c, &xp, cols, d)
                                }
                            }
                        }
                    }
                    for (j, d) in d.iter().enumerate() {
                        finish(r0 + r + j, &[d - sums[0]], &mut yt[r + j..r + j + 1]);
                    }
                    r += k;
                }
            }));
        }
        return Ok(par_rows(rows, batch, 1, |r0, n, yt| {
            let mut dots = vec![0i32; batch];
            for r in 0..n {
                let o = r0 + r;
                let row = &w.packed[o * cols / 4..(o + 1) * cols / 4];
                let mut b0 = 0;
                while b0 < batch {
                    let nb = (batch - b0).min(8);
                    let xs = &xp[b0 * cols..];
                    let d = &mut dots[b0..b0 + nb];
                    // SAFETY: the CPU has AVX-512 F/BW/VNNI and AVX2 when `vnni`
                    // (kernel.vnni()), else AVX2 (kernel.simd()); row holds cols / 4 bytes and
                    // xs nb rows of cols, permuted for the block size of the kernel called.
                    unsafe {
                        if vnni {
                            dispatch_nb!(nb, row_vnni::<NB>(row, xs, cols, d))
                        } else {
                            dispatch_nb!(nb, row_avx2::<NB>(row, xs, cols, d))
                        }
                    };
                    for (d, s) in d.iter_mut().zip(&sums[b0..b0 + nb]) {
                        *d -= s;
                    }
                    b0 += nb;
                }
                finish(o, &dots, &mut yt[r * batch..(r + 1) * batch]);
            }
        }));
    }
    let _ = kernel;
    Ok(par_rows(rows, batch, 1, |r0, n, yt| {
        let mut dots = vec![0i32; batch];
        for r in 0..n {
            let o = r0 + r;
            for (b, d) in dots.iter_mut().enumerate() {
                let xr = &qx.q[b * cols..(b + 1) * cols];
                let mut acc = 0i32;
                for (i, &v) in xr.iter().enumerate() {
                    let k = o * cols + i;
                    // Code q + 1: add, skip or subtract; no multiplication.
                    match (w.packed[k / 4] >> (2 * (k % 4))) & 3 {
                        2 => acc += v as i32,
                        0 => acc -= v as i32,
                        _ => {}
                    }
                }
                *d = acc;
            }
            finish(o, &dots, &mut yt[r * batch..(r + 1) * batch]);
        }
    }))
}

/// Σ_i c_i · x[b, i] with the offset codes c = q + 1 ∈ {0, 1, 2} (the caller subtracts Σ x),
/// for NB rows of the block-permuted activations. Per 32 bytes: four shifts by 2 bits and a
/// mask give 32 codes each, `vpmaddubsw` (codes unsigned, activations signed, pairs at most
/// 2 · 2 · 127) into i16, summed over up to 16 blocks (at most 32 512) before `vpmaddwd` widens
/// them into i32. The tail past the last full block is done in scalar, in natural order.
///
/// # Safety
/// The CPU must have AVX2; `row.len() * 4 == cols`, `x.len() >= NB * cols`, `out.len() == NB`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2<const NB: usize>(row: &[u8], x: &[i8], cols: usize, out: &mut [i32]) {
    use std::arch::x86_64::*;
    debug_assert!(row.len() * 4 == cols && x.len() >= NB * cols && out.len() == NB);
    let nblk = cols / BLOCK;
    // SAFETY: code loads read row[32 · blk..+32] with blk < nblk (32 · nblk <= row.len());
    // activation loads read x[b · cols + 128 · blk + 32 j..+32] with b < NB, inside x.
    unsafe {
        let mask = _mm256_set1_epi8(3);
        let ones = _mm256_set1_epi16(1);
        let mut acc32 = [_mm256_setzero_si256(); NB];
        let rp = row.as_ptr();
        let xp = x.as_ptr();
        let mut blk = 0;
        while blk < nblk {
            let end = (blk + 16).min(nblk);
            let mut acc16 = [_mm256_setzero_si256(); NB];
            while blk < end {
                let mut v = _mm256_loadu_si256(rp.add(32 * blk) as *const __m256i);
                for j in 0..4 {
                    let c = _mm256_and_si256(v, mask);
                    v = _mm256_srli_epi16::<2>(v);
                    for b in 0..NB {
                        let xv = _mm256_loadu_si256(
                            xp.add(b * cols + BLOCK * blk + 32 * j) as *const __m256i
                        );
                        acc16[b] = _mm256_add_epi16(acc16[b], _mm256_maddubs_epi16(c, xv));
                    }
                }
                blk += 1;
            }
            for b in 0..NB {
                acc32[b] = _mm256_add_epi32(acc32[b], _mm256_madd_epi16(acc16[b], ones));
            }
        }
        for b in 0..NB {
            let mut s = super::dense::hsum_epi32(acc32[b]);
            for i in nblk * BLOCK..cols {
                let c = ((*rp.add(i / 4) >> (2 * (i % 4))) & 3) as i32;
                s += c * *xp.add(b * cols + i) as i32;
            }
            out[b] = s;
        }
    }
}

/// [`row_avx2`] with AVX-512 VNNI: per 64 bytes (256 weights) four shifts and masks give 64
/// offset codes each, and `vpdpbusd` multiplies them (unsigned) with 64 activations (signed)
/// and adds groups of four into 16 i32 lanes, no 16-bit stage.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI; `row.len() * 4 == cols`, `x.len() >= NB * cols`,
/// `out.len() == NB`; x permuted by [`permute_blocks`] with [`VBLOCK`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
unsafe fn row_vnni<const NB: usize>(row: &[u8], x: &[i8], cols: usize, out: &mut [i32]) {
    use std::arch::x86_64::*;
    debug_assert!(row.len() * 4 == cols && x.len() >= NB * cols && out.len() == NB);
    let nblk = cols / VBLOCK;
    // SAFETY: code loads read row[64 · blk..+64] with blk < nblk (64 · nblk <= row.len());
    // activation loads read x[b · cols + 256 · blk + 64 j..+64] with b < NB, inside x.
    unsafe {
        let mask = _mm512_set1_epi8(3);
        let mut acc = [_mm512_setzero_si512(); NB];
        let rp = row.as_ptr();
        let xp = x.as_ptr();
        for blk in 0..nblk {
            let mut v = _mm512_loadu_si512(rp.add(64 * blk) as *const __m512i);
            for j in 0..4 {
                let c = _mm512_and_si512(v, mask);
                v = _mm512_srli_epi16::<2>(v);
                for b in 0..NB {
                    let xv = _mm512_loadu_si512(
                        xp.add(b * cols + VBLOCK * blk + 64 * j) as *const __m512i
                    );
                    acc[b] = _mm512_dpbusd_epi32(acc[b], c, xv);
                }
            }
        }
        for b in 0..NB {
            let mut s = _mm512_reduce_add_epi32(acc[b]);
            for i in nblk * VBLOCK..cols {
                let c = ((*rp.add(i / 4) >> (2 * (i % 4))) & 3) as i32;
                s += c * *xp.add(b * cols + i) as i32;
            }
            out[b] = s;
        }
    }
}

/// [`row_avx2`] at batch 1 for `R` consecutive rows: `R` independent accumulators share each
/// activation load, and the codes [`PREFETCH`] rows ahead are prefetched (one 64-byte line per
/// two blocks).
///
/// # Safety
/// The CPU must have AVX2; `rows.len() * 4 == R * cols`, `x.len() >= cols`, `out.len() == R`;
/// x permuted by [`permute_blocks`] with [`BLOCK`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2<const R: usize>(rows: &[u8], x: &[i8], cols: usize, out: &mut [i32]) {
    use std::arch::x86_64::*;
    debug_assert!(rows.len() * 4 == R * cols && x.len() >= cols && out.len() == R);
    let (nblk, rb) = (cols / BLOCK, cols / 4);
    // SAFETY: code loads read rows[r · rb + 32 · blk..+32] with r < R, blk < nblk
    // (32 · nblk <= rb); activation loads read x[128 · blk + 32 j..+32], inside x.
    unsafe {
        let mask = _mm256_set1_epi8(3);
        let ones = _mm256_set1_epi16(1);
        let mut acc32 = [_mm256_setzero_si256(); R];
        let rp = rows.as_ptr();
        let xp = x.as_ptr();
        let mut blk = 0;
        while blk < nblk {
            let end = (blk + 16).min(nblk);
            let mut acc16 = [_mm256_setzero_si256(); R];
            while blk < end {
                let mut v = [_mm256_setzero_si256(); R];
                for r in 0..R {
                    let p = rp.add(r * rb + 32 * blk);
                    if blk % 2 == 0 {
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH * rb) as *const i8);
                    }
                    v[r] = _mm256_loadu_si256(p as *const __m256i);
                }
                for j in 0..4 {
                    let xv = _mm256_loadu_si256(xp.add(BLOCK * blk + 32 * j) as *const __m256i);
                    for r in 0..R {
                        let c = _mm256_and_si256(v[r], mask);
                        v[r] = _mm256_srli_epi16::<2>(v[r]);
                        acc16[r] = _mm256_add_epi16(acc16[r], _mm256_maddubs_epi16(c, xv));
                    }
                }
                blk += 1;
            }
            for r in 0..R {
                acc32[r] = _mm256_add_epi32(acc32[r], _mm256_madd_epi16(acc16[r], ones));
            }
        }
        for r in 0..R {
            let mut s = super::dense::hsum_epi32(acc32[r]);
            for i in nblk * BLOCK..cols {
                let c = ((*rp.add(r * rb + i / 4) >> (2 * (i % 4))) & 3) as i32;
                s += c * *xp.add(i) as i32;
            }
            out[r] = s;
        }
    }
}

/// [`row_vnni`] at batch 1 for `R` consecutive rows: `R` independent accumulators (no chain of
/// dependent `vpdpbusd` through one register) share each activation load, and the codes
/// [`PREFETCH`] rows ahead are prefetched. At batch 1 the product streams the codes once with
/// little arithmetic per byte, so it waits on memory: the prefetch took a 370M HGRN-bit's
/// generation from about 90 to about 115-145 tokens/s on 2 Xeon cores.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI; `rows.len() * 4 == R * cols`, `x.len() >= cols`,
/// `out.len() == R`; x permuted by [`permute_blocks`] with [`VBLOCK`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
unsafe fn rows_vnni<const R: usize>(rows: &[u8], x: &[i8], cols: usize, out: &mut [i32]) {
    use std::arch::x86_64::*;
    debug_assert!(rows.len() * 4 == R * cols && x.len() >= cols && out.len() == R);
    let (nblk, rb) = (cols / VBLOCK, cols / 4);
    // SAFETY: code loads read rows[r · rb + 64 · blk..+64] with r < R, blk < nblk
    // (64 · nblk <= rb); activation loads read x[256 · blk + 64 j..+64], inside x.
    unsafe {
        let mask = _mm512_set1_epi8(3);
        let mut acc = [_mm512_setzero_si512(); R];
        let rp = rows.as_ptr();
        let xp = x.as_ptr();
        for blk in 0..nblk {
            let mut v = [_mm512_setzero_si512(); R];
            for r in 0..R {
                let p = rp.add(r * rb + 64 * blk);
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH * rb) as *const i8);
                v[r] = _mm512_loadu_si512(p as *const __m512i);
            }
            for j in 0..4 {
                let xv = _mm512_loadu_si512(xp.add(VBLOCK * blk + 64 * j) as *const __m512i);
                for r in 0..R {
                    let c = _mm512_and_si512(v[r], mask);
                    v[r] = _mm512_srli_epi16::<2>(v[r]);
                    acc[r] = _mm512_dpbusd_epi32(acc[r], c, xv);
                }
            }
        }
        for r in 0..R {
            let mut s = _mm512_reduce_add_epi32(acc[r]);
            for i in nblk * VBLOCK..cols {
                let c = ((*rp.add(r * rb + i / 4) >> (2 * (i % 4))) & 3) as i32;
                s += c * *xp.add(i) as i32;
            }
            out[r] = s;
        }
    }
}
