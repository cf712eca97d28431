//! NF4 / FP4 products: codes looked up block by block in the 16-entry table times the block's
//! absmax, dotted in f32 with every row of X (AVX-512: fused, two rows at a time from 4
//! activation rows up; AVX2 and scalar: each row decoded into a buffer, then dotted).

use super::dense::dot_rows_scalar;
use super::{check_x, dispatch_nb, par_rows, Kernel};
use crate::fourbit::FourBit;
use crate::{QuantError, Result};

/// Columns per slab of the AVX-512 kernel from 4 activation rows up (8 rows of f32: 64 KiB).
const SLAB: usize = 2048;

/// Y = X Wᵀ for a 4-bit (NF4 or FP4) weight W of shape (out, in) and X of shape (batch, in),
/// both row-major; returns Y (batch, out) row-major. Uses the SIMD kernel where the CPU has
/// AVX2 and FMA.
///
/// When `in` is a multiple of the block size every block lies within one row and rows are
/// decoded on the fly; otherwise the weight is dequantized whole first (slower, same result).
/// Errors when W is not 2-D or `x.len() != batch * in` (or `batch == 0`).
pub fn nf4_matmul(w: &FourBit, x: &[f32], batch: usize) -> Result<Vec<f32>> {
    nf4_matmul_with(w, x, batch, Kernel::Auto)
}

/// [`nf4_matmul`] with the kernel chosen.
pub fn nf4_matmul_with(w: &FourBit, x: &[f32], batch: usize, kernel: Kernel) -> Result<Vec<f32>> {
    if w.shape.len() != 2 {
        return Err(QuantError::Shape {
            name: "weight".into(),
            shape: w.shape.clone(),
            reason: "is not 2-D (out, in)".into(),
        });
    }
    let (rows, cols) = (w.shape[0] as usize, w.shape[1] as usize);
    check_x(x, batch, cols)?;
    let simd = kernel.simd();
    let dot = move |wr: &[f32], out: &mut [f32]| {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: simd is true only when the CPU has AVX2 and FMA; wr holds cols values
            // and x batch * cols.
            unsafe { super::dense::dot_rows_avx2(wr, x, cols, out) };
            return;
        }
        let _ = simd;
        dot_rows_scalar(wr, x, cols, out)
    };
    let bs = w.block_size;
    if cols % bs != 0 {
        let dense = w.dequantize();
        return Ok(par_rows(rows, batch, 1, |r0, n, yt| {
            for r in 0..n {
                let o = r0 + r;
                dot(
                    &dense[o * cols..(o + 1) * cols],
                    &mut yt[r * batch..(r + 1) * batch],
                );
            }
        }));
    }
    let absmax = w.absmax_values();
    let lut = w.kind.codes();
    let bpr = cols / bs; // blocks per row
    let avx512 = kernel.avx512();
    // Two rows at a time (sharing the activation loads) from 4 activation rows up.
    let pair = batch >= 4;
    // For AVX-512: x with each 32 columns reordered as the 16 high nibbles (even columns),
    // then the 16 low nibbles (odd columns) of 16 packed bytes.
    let xe: Vec<f32> = if avx512 {
        let mut xe = x.to_vec();
        for (d, s) in xe.chunks_exact_mut(32).zip(x.chunks_exact(32)) {
            for k in 0..16 {
                d[k] = s[2 * k];
                d[16 + k] = s[2 * k + 1];
            }
        }
        xe
    } else {
        Vec::new()
    };
    let xe = &xe;
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        // From 4 activation rows up, column slabs of SLAB columns (whole blocks), so that the
        // activations of a slab stay in cache while every row of the chunk goes over them;
        // partial sums add up in yt. Fewer rows read each weight row straight through.
        let slab = if pair {
            (bs * (SLAB / bs).max(1)).min(cols)
        } else {
            cols
        };
        return Ok(par_rows(rows, batch, 2, |r0, n, yt| {
            for s0 in (0..cols).step_by(slab) {
                let len = slab.min(cols - s0);
                let (blk0, nblk) = (s0 / bs, len / bs);
                let step = if pair { 2 } else { 1 };
                for r in (0..n).step_by(step) {
                    let o = r0 + r;
                    let two = pair && r + 1 < n;
                    let p0 = &w.packed[(o * cols + s0) / 2..(o * cols + s0 + len) / 2];
                    let a0 = &absmax[o * bpr + blk0..o * bpr + blk0 + nblk];
                    let (p1, a1) = if two {
                        let o1 = o + 1;
                        (
                            &w.packed[(o1 * cols + s0) / 2..(o1 * cols + s0 + len) / 2],
                            &absmax[o1 * bpr + blk0..o1 * bpr + blk0 + nblk],
                        )
                    } else {
                        (p0, a0)
                    };
                    let mut b0 = 0;
                    while b0 < batch {
                        let nb = (batch - b0).min(8);
                        let xs = &xe[b0 * cols + s0..];
                        let mut acc = [0f32; 16];
                        // SAFETY: avx512 is true only when the CPU has AVX-512 F, AVX2 and FMA;
                        // p0 and p1 hold len / 2 bytes, a0 and a1 len / bs values (bs a power
                        // of two >= 32 dividing len), xs reaches nb rows of stride cols from
                        // column s0 (s0 + len <= cols), acc holds 2 · nb values.
                        unsafe {
                            if two {
                                dispatch_nb!(
                                    nb,
                                    row2_avx512::<NB>(
                                        [p0, p1],
                                        [a0, a1],
                                        bs,
                                        &lut,
                                        xs,
                                        cols,
                                        &mut acc
                                    )
                                )
                            } else {
                                dispatch_nb!(
                                    nb,
                                    row1_avx512::<NB>(p0, a0, bs, &lut, xs, cols, &mut acc)
                                )
                            }
                        };
                        for k in 0..(if two { 2 } else { 1 }) {
                            for b in 0..nb {
                                yt[(r + k) * batch + b0 + b] += acc[k * nb + b];
                            }
                        }
                        b0 += nb;
                    }
                }
            }
        }));
    }
    let _ = (avx512, pair, xe);
    Ok(par_rows(rows, batch, 1, |r0, n, yt| {
        let mut buf = vec![0f32; cols];
        for r in 0..n {
            let o = r0 + r;
            let packed = &w.packed[o * cols / 2..(o + 1) * cols / 2];
            let amax = &absmax[o * bpr..(o + 1) * bpr];
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: the CPU has AVX2 (simd); packed holds cols / 2 bytes, buf cols
                // values, amax cols / bs values, and bs is a power of two >= 32.
                unsafe { decode_avx2(packed, amax, bs, &lut, &mut buf) };
            } else {
                decode_scalar(packed, amax, bs, &lut, &mut buf);
            }
            #[cfg(not(target_arch = "x86_64"))]
            decode_scalar(packed, amax, bs, &lut, &mut buf);
            dot(&buf, &mut yt[r * batch..(r + 1) * batch]);
        }
    }))
}

/// Decodes one row: out[2k] = lut[hi(packed[k])] · absmax, out[2k + 1] = lut[lo] · absmax.
fn decode_scalar(packed: &[u8], absmax: &[f32], bs: usize, lut: &[f32; 16], out: &mut [f32]) {
    for ((o, p), &a) in out
        .chunks_exact_mut(bs)
        .zip(packed.chunks_exact(bs / 2))
        .zip(absmax)
    {
        for (o2, &byte) in o.chunks_exact_mut(2).zip(p) {
            o2[0] = lut[(byte >> 4) as usize] * a;
            o2[1] = lut[(byte & 0xF) as usize] * a;
        }
    }
}

/// [`decode_scalar`] with AVX2: 32 codes per 16 bytes, looked up with `vpermps` in the two
/// halves of the table and blended on bit 3 of the code.
///
/// # Safety
/// The CPU must have AVX2; `bs` a multiple of 32, `packed.len() * 2 == out.len()`,
/// `absmax.len() * bs == out.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_avx2(packed: &[u8], absmax: &[f32], bs: usize, lut: &[f32; 16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    debug_assert!(bs & 31 == 0 && packed.len() * 2 == out.len() && absmax.len() * bs == out.len());
    // SAFETY: loads read packed[k..k + 16] with k + 16 <= packed.len(), stores write
    // out[2k..2k + 32] <= out.len() (bs a multiple of 32 divides the row); lut has 16 values.
    unsafe {
        let lo_t = _mm256_loadu_ps(lut.as_ptr());
        let hi_t = _mm256_loadu_ps(lut.as_ptr().add(8));
        let m0f = _mm_set1_epi8(0x0F);
        let pp = packed.as_ptr();
        let op = out.as_mut_ptr();
        let mut k = 0;
        for &am in absmax {
            // The table times the block's absmax: the same products as the scalar decode.
            let a = _mm256_set1_ps(am);
            let (lo_t, hi_t) = (_mm256_mul_ps(lo_t, a), _mm256_mul_ps(hi_t, a));
            let end = k + bs / 2;
            while k < end {
                let v = _mm_loadu_si128(pp.add(k) as *const __m128i);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), m0f);
                let lo = _mm_and_si128(v, m0f);
                let c0 = _mm_unpacklo_epi8(hi, lo);
                let c1 = _mm_unpackhi_epi8(hi, lo);
                let o = op.add(2 * k);
                _mm256_storeu_ps(o, look8(c0, lo_t, hi_t));
                _mm256_storeu_ps(o.add(8), look8(_mm_srli_si128::<8>(c0), lo_t, hi_t));
                _mm256_storeu_ps(o.add(16), look8(c1, lo_t, hi_t));
                _mm256_storeu_ps(o.add(24), look8(_mm_srli_si128::<8>(c1), lo_t, hi_t));
                k += 16;
            }
        }
    }
}

/// Eight codes (the low 8 bytes of `c`) looked up in the table (`lo`, `hi`: entries 0..8,
/// 8..16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn look8(
    c: std::arch::x86_64::__m128i,
    lo: std::arch::x86_64::__m256,
    hi: std::arch::x86_64::__m256,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let idx = _mm256_cvtepu8_epi32(c);
    let l = _mm256_permutevar8x32_ps(lo, idx);
    let h = _mm256_permutevar8x32_ps(hi, idx);
    // Bit 3 of the code moved to the sign bit picks the upper half of the table.
    _mm256_blendv_ps(l, h, _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx)))
}

/// One row times NB rows of x with AVX-512, fused: per block the 16-entry table is scaled by
/// the block's absmax (one register); 16 packed bytes are widened to 32-bit lanes, and
/// `vpermps` (which reads only the low 4 bits of each index) looks up the low nibbles directly
/// and the high nibbles after a shift: 32 weights, in the column order of `x` (see the caller),
/// multiply-added with each activation row (two accumulators per row). Writes out[b].
///
/// The row's columns are `len = packed.len() * 2`, a multiple of `bs`; activation row b
/// starts at `x[b * stride]`.
///
/// # Safety
/// The CPU must have AVX-512 F, AVX2 and FMA; `bs` a multiple of 32,
/// `absmax.len() * bs == len`, `x.len() >= (NB - 1) * stride + len`, `out.len() >= NB`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn row1_avx512<const NB: usize>(
    packed: &[u8],
    absmax: &[f32],
    bs: usize,
    lut: &[f32; 16],
    x: &[f32],
    stride: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let len = packed.len() * 2;
    debug_assert!(bs & 31 == 0 && absmax.len() * bs == len);
    debug_assert!(x.len() >= (NB - 1) * stride + len && out.len() >= NB);
    // SAFETY: loads read packed[k..k + 16] with k + 16 <= packed.len() (blocks of bs / 2 bytes
    // tile the row) and x[b * stride + 2k..+32] with b < NB, 2k + 32 <= len; lut has 16
    // values.
    unsafe {
        let table = _mm512_loadu_ps(lut.as_ptr());
        let pp = packed.as_ptr();
        let xp = x.as_ptr();
        let mut acc = [[_mm512_setzero_ps(); 2]; NB];
        let mut k = 0;
        for &am in absmax {
            let t = _mm512_mul_ps(table, _mm512_set1_ps(am));
            let end = k + bs / 2;
            while k < end {
                let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(pp.add(k) as *const __m128i));
                let wh = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), t);
                let wl = _mm512_permutexvar_ps(v, t);
                for b in 0..NB {
                    let xb = xp.add(b * stride + 2 * k);
                    acc[b][0] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(xb), acc[b][0]);
                    acc[b][1] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(xb.add(16)), acc[b][1]);
                }
                k += 16;
            }
        }
        for b in 0..NB {
            out[b] = _mm512_reduce_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]));
        }
    }
}

/// [`row1_avx512`] for two rows at once (codes `packed[r]`, scales `absmax[r]`), each
/// activation load serving both (one accumulator per row and activation row). Writes
/// out[r * NB + b].
///
/// # Safety
/// As [`row1_avx512`] for both rows, with `packed[0].len() == packed[1].len()`,
/// `out.len() >= 2 * NB`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn row2_avx512<const NB: usize>(
    packed: [&[u8]; 2],
    absmax: [&[f32]; 2],
    bs: usize,
    lut: &[f32; 16],
    x: &[f32],
    stride: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let len = packed[0].len() * 2;
    debug_assert!(bs & 31 == 0 && packed[1].len() * 2 == len);
    debug_assert!(absmax[0].len() * bs == len && absmax[1].len() * bs == len);
    debug_assert!(x.len() >= (NB - 1) * stride + len && out.len() >= 2 * NB);
    // SAFETY: loads read packed[r][k..k + 16] with k + 16 <= len / 2, and
    // x[b * stride + 2k..+32] with b < NB, 2k + 32 <= len; absmax[r] holds len / bs values.
    unsafe {
        let table = _mm512_loadu_ps(lut.as_ptr());
        let (p0, p1) = (packed[0].as_ptr(), packed[1].as_ptr());
        let xp = x.as_ptr();
        let mut acc = [[_mm512_setzero_ps(); NB]; 2];
        let mut k = 0;
        for (&a0, &a1) in absmax[0].iter().zip(absmax[1]) {
            let t0 = _mm512_mul_ps(table, _mm512_set1_ps(a0));
            let t1 = _mm512_mul_ps(table, _mm512_set1_ps(a1));
            let end = k + bs / 2;
            while k < end {
                let v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(p0.add(k) as *const __m128i));
                let v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(p1.add(k) as *const __m128i));
                let wh0 = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v0), t0);
                let wl0 = _mm512_permutexvar_ps(v0, t0);
                let wh1 = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v1), t1);
                let wl1 = _mm512_permutexvar_ps(v1, t1);
                for b in 0..NB {
                    let xb = xp.add(b * stride + 2 * k);
                    let xh = _mm512_loadu_ps(xb);
                    let xl = _mm512_loadu_ps(xb.add(16));
                    acc[0][b] = _mm512_fmadd_ps(wl0, xl, _mm512_fmadd_ps(wh0, xh, acc[0][b]));
                    acc[1][b] = _mm512_fmadd_ps(wl1, xl, _mm512_fmadd_ps(wh1, xh, acc[1][b]));
                }
                k += 16;
            }
        }
        for r in 0..2 {
            for b in 0..NB {
                out[r * NB + b] = _mm512_reduce_add_ps(acc[r][b]);
            }
        }
    }
}
