//! NF4 / FP4 products computed in bf16: activations rounded once to bf16, the 16-entry table
//! rounded to bf16, Σ x · code per block accumulated in f32 and then times the block's f32
//! absmax (AVX512-BF16: `vpermw` lookups and `vdpbf16ps`; elsewhere a portable kernel).

use super::bf16::{from_bf16, to_bf16};
use super::{check_x, dispatch_nb, par_rows, Kernel};
use crate::fourbit::FourBit;
use crate::{QuantError, Result};

/// Columns per chunk of the AVX512-BF16 kernel: one 64-byte load of codes.
const CHUNK: usize = 128;
/// Columns per slab of the AVX512-BF16 kernel from 4 activation rows up (8 rows of bf16:
/// 16 KiB, half of a typical L1 data cache).
#[cfg(target_arch = "x86_64")]
const SLAB: usize = 1024;

/// Y = X Wᵀ for a 4-bit (NF4 or FP4) weight W of shape (out, in) and X of shape (batch, in),
/// both row-major, computed in bf16 like bitsandbytes' CPU kernel; returns Y (batch, out)
/// row-major.
///
/// Each activation is rounded to bf16 (nearest, ties to even) and each code stands for its
/// table value rounded to bf16; per block of the weight, Σ x · code is accumulated in f32
/// and multiplied by the block's absmax in f32 (decoded first when double-quantized). So the
/// weight used is bf16(code) · absmax: NF4's table values move by at most 2⁻⁹ relative
/// against [`super::nf4_matmul`]. Uses the AVX512-BF16 kernel where the CPU has it and `in`
/// is a multiple of 128 and of the block size; otherwise a portable kernel (same arithmetic,
/// f32 sums in another order). Errors when W is not 2-D or `x.len() != batch * in` (or
/// `batch == 0`).
pub fn nf4_matmul_bf16(w: &FourBit, x: &[f32], batch: usize) -> Result<Vec<f32>> {
    nf4_matmul_bf16_with(w, x, batch, Kernel::Auto)
}

/// [`nf4_matmul_bf16`] with the kernel chosen ([`Kernel::Auto`] runs the AVX512-BF16 kernel
/// where it can; the others the portable one).
pub fn nf4_matmul_bf16_with(
    w: &FourBit,
    x: &[f32],
    batch: usize,
    kernel: Kernel,
) -> Result<Vec<f32>> {
    if w.shape.len() != 2 {
        return Err(QuantError::Shape {
            name: "weight".into(),
            shape: w.shape.clone(),
            reason: "is not 2-D (out, in)".into(),
        });
    }
    let (rows, cols) = (w.shape[0] as usize, w.shape[1] as usize);
    check_x(x, batch, cols)?;
    let bs = w.block_size;
    let absmax = w.absmax_values();
    let lut: [u16; 16] = w.kind.codes().map(to_bf16);
    let xb: Vec<u16> = x.iter().map(|&v| to_bf16(v)).collect();
    #[cfg(target_arch = "x86_64")]
    if kernel.bf16() && bs.is_power_of_two() && bs >= 32 && cols % CHUNK == 0 && cols % bs == 0 {
        return Ok(simd(w, &absmax, &lut, &xb, rows, cols, batch));
    }
    let _ = kernel;
    Ok(portable(w, &absmax, &lut, &xb, rows, cols, batch))
}

/// The portable kernel: each row's codes looked up as f32 (bf16 values), then per block (the
/// blocks run over the flattened weight, so one may span two rows) an f32 dot product with
/// each activation row, times the block's absmax.
fn portable(
    w: &FourBit,
    absmax: &[f32],
    lut: &[u16; 16],
    xb: &[u16],
    rows: usize,
    cols: usize,
    batch: usize,
) -> Vec<f32> {
    let bs = w.block_size;
    let table = lut.map(from_bf16);
    let xf: Vec<f32> = xb.iter().map(|&h| from_bf16(h)).collect();
    par_rows(rows, batch, 1, |r0, n, yt| {
        let mut buf = vec![0f32; cols];
        for r in 0..n {
            let o = r0 + r;
            let e0 = o * cols;
            for (i, v) in buf.iter_mut().enumerate() {
                let e = e0 + i;
                let byte = w.packed[e / 2];
                let code = if e.is_multiple_of(2) {
                    byte >> 4
                } else {
                    byte & 0xF
                };
                *v = table[code as usize];
            }
            for b in 0..batch {
                let xr = &xf[b * cols..(b + 1) * cols];
                let mut y = 0f32;
                let mut i = 0;
                while i < cols {
                    let blk = (e0 + i) / bs;
                    let end = ((blk + 1) * bs - e0).min(cols);
                    y += dot(&buf[i..end], &xr[i..end]) * absmax[blk];
                    i = end;
                }
                yt[r * batch + b] = y;
            }
        }
    })
}

/// Σ a · b in f32 with four partial sums.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 4];
    let mut ac = a.chunks_exact(4);
    let mut bc = b.chunks_exact(4);
    for (p, q) in (&mut ac).zip(&mut bc) {
        for k in 0..4 {
            acc[k] += p[k] * q[k];
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (p, q) in ac.remainder().iter().zip(bc.remainder()) {
        s += p * q;
    }
    s
}

/// Where the AVX512-BF16 kernel wants activation `4 w + NIBBLE[s]` of a 128-column chunk:
/// at `32 s + w` (s: which nibble of a 16-bit lane of codes, lowest first; w: the lane).
const NIBBLE: [usize; 4] = [1, 0, 3, 2];

/// Runs [`rows_avx512bf16`] over all rows; `cols` is a multiple of [`CHUNK`] and of the block
/// size, a power of two >= 32.
#[cfg(target_arch = "x86_64")]
fn simd(
    w: &FourBit,
    absmax: &[f32],
    lut: &[u16; 16],
    xb: &[u16],
    rows: usize,
    cols: usize,
    batch: usize,
) -> Vec<f32> {
    let bs = w.block_size;
    // Each chunk of 128 activations reordered to match the four nibbles of the 16-bit lanes
    // of 64 packed bytes (byte 2w low: column 4w + 1, high: 4w; byte 2w + 1 low: 4w + 3,
    // high: 4w + 2).
    let mut xr = vec![0u16; xb.len()];
    for (d, s) in xr.chunks_exact_mut(CHUNK).zip(xb.chunks_exact(CHUNK)) {
        for (g, &e) in NIBBLE.iter().enumerate() {
            for l in 0..32 {
                d[32 * g + l] = s[4 * l + e];
            }
        }
    }
    // The table twice: `vpermw` reads 5 index bits, and the fifth is the next nibble's lowest.
    let mut table = [0u16; 32];
    for (k, t) in table.iter_mut().enumerate() {
        *t = lut[k % 16];
    }
    let bpr = cols / bs;
    // From 4 activation rows up, two weight rows share each activation load, over column slabs
    // whose activations stay in L1 while every row of the chunk goes over them (partial sums
    // add up in yt). Fewer activation rows: one weight row straight through.
    let pair = batch >= 4;
    let unit = bs.max(CHUNK);
    let slab = if pair {
        (unit * (SLAB / unit).max(1)).min(cols)
    } else {
        cols
    };
    par_rows(rows, batch, 2, |r0, n, yt| {
        let mut acc = [0f32; 16];
        for s0 in (0..cols).step_by(slab) {
            let len = slab.min(cols - s0);
            let (blk0, nblk) = (s0 / bs, len / bs);
            let step = if pair { 2 } else { 1 };
            for r in (0..n).step_by(step) {
                let two = pair && r + 1 < n;
                let o = r0 + r;
                let o1 = if two { o + 1 } else { o };
                let packed =
                    [o, o1].map(|o| &w.packed[(o * cols + s0) / 2..(o * cols + s0 + len) / 2]);
                let amax = [o, o1].map(|o| &absmax[o * bpr + blk0..o * bpr + blk0 + nblk]);
                let mut b0 = 0;
                while b0 < batch {
                    let nb = (batch - b0).min(8);
                    let xs = &xr[b0 * cols + s0..];
                    // SAFETY: kernel.bf16() held (AVX-512 F, BW, BF16, AVX2, FMA); packed[k]
                    // holds len / 2 bytes, amax[k] len / bs values, with bs a power of two >= 32
                    // and len a multiple of CHUNK and of bs; xs reaches nb rows of stride cols
                    // from column s0 (s0 + len <= cols); acc holds 16 values.
                    unsafe {
                        if two {
                            dispatch_nb!(
                                nb,
                                rows_avx512bf16::<2, NB>(
                                    packed, amax, bs, &table, xs, cols, &mut acc
                                )
                            )
                        } else {
                            dispatch_nb!(
                                nb,
                                rows_avx512bf16::<1, NB>(
                                    [packed[0]],
                                    [amax[0]],
                                    bs,
                                    &table,
                                    xs,
                                    cols,
                                    &mut acc
                                )
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
    })
}

/// P weight rows (1 or 2) times NB activation rows (bf16, reordered per chunk, row b at
/// `x[b * stride]`): per chunk of 128 columns, one 64-byte load of codes per weight row, four
/// `vpermw` lookups (the codes shifted by 0, 4, 8, 12 bits in each 16-bit lane) give 4 × 32
/// bf16 weights, each `vdpbf16ps`-ed with 32 activations (each load shared by the P rows)
/// into a per-block f32 sum; at the end of each block (or chunk, when blocks are shorter:
/// then lane l of a chunk belongs to block 8 l / bs of the chunk) the sum times the absmax is
/// added to the row's accumulator. Writes out[p * NB + b].
///
/// # Safety
/// The CPU must have AVX-512 F, BW, BF16, AVX2 and FMA; for every p, `len =
/// packed[p].len() * 2` the same, a multiple of 128 and of `bs` (a power of two >= 32),
/// `absmax[p].len() * bs == len`; `x.len() >= (NB - 1) * stride + len`, `out.len() >= P NB`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_avx512bf16<const P: usize, const NB: usize>(
    packed: [&[u8]; P],
    absmax: [&[f32]; P],
    bs: usize,
    table: &[u16; 32],
    x: &[u16],
    stride: usize,
    out: &mut [f32],
) {
    use super::bf16::as_bh;
    use std::arch::x86_64::*;
    let len = packed[0].len() * 2;
    debug_assert!(
        bs.is_power_of_two() && bs >= 32 && len.is_multiple_of(bs) && len.is_multiple_of(CHUNK)
    );
    debug_assert!((0..P).all(|p| packed[p].len() * 2 == len && absmax[p].len() * bs == len));
    debug_assert!(x.len() >= (NB - 1) * stride + len && out.len() >= P * NB);
    let unit = bs.max(CHUNK);
    // SAFETY: loads read packed[p][c / 2..c / 2 + 64] with c + 128 <= len,
    // x[b * stride + c..+128] with b < NB, absmax[p][c / bs..] under a mask of the CHUNK / bs
    // blocks of the chunk (bs < CHUNK) or absmax[p][c / bs] (c < len); table has 32 values.
    unsafe {
        let t = _mm512_loadu_si512(table.as_ptr() as *const __m512i);
        // Lane l of a chunk's sums covers columns 8 l..8 l + 8: block 8 l / bs of the chunk.
        let lane_blk = _mm512_srlv_epi32(
            _mm512_slli_epi32::<3>(_mm512_setr_epi32(
                0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
            )),
            _mm512_set1_epi32(bs.trailing_zeros() as i32),
        );
        let small_mask: __mmask16 = ((1u32 << (CHUNK / bs.min(CHUNK))) - 1) as __mmask16;
        let xp = x.as_ptr();
        let mut acc = [[_mm512_setzero_ps(); NB]; P];
        let mut u0 = 0;
        while u0 < len {
            let mut sv = [_mm512_setzero_ps(); P];
            for p in 0..P {
                let ap = absmax[p].as_ptr().add(u0 / bs);
                sv[p] = if bs >= CHUNK {
                    _mm512_set1_ps(*ap)
                } else {
                    _mm512_permutexvar_ps(lane_blk, _mm512_maskz_loadu_ps(small_mask, ap))
                };
            }
            if unit == CHUNK {
                // One chunk per block (or several blocks per chunk): sums per batch row.
                let mut wv = [[as_bh(_mm512_setzero_si512()); 4]; P];
                for p in 0..P {
                    wv[p] = decode(packed[p].as_ptr().add(u0 / 2), t);
                }
                for b in 0..NB {
                    let xv = load4(xp.add(b * stride + u0));
                    for p in 0..P {
                        let mut s = _mm512_setzero_ps();
                        for g in 0..4 {
                            s = _mm512_dpbf16_ps(s, wv[p][g], xv[g]);
                        }
                        acc[p][b] = _mm512_fmadd_ps(s, sv[p], acc[p][b]);
                    }
                }
            } else {
                let mut blk = [[_mm512_setzero_ps(); NB]; P];
                for c in (u0..u0 + unit).step_by(CHUNK) {
                    let mut wv = [[as_bh(_mm512_setzero_si512()); 4]; P];
                    for p in 0..P {
                        wv[p] = decode(packed[p].as_ptr().add(c / 2), t);
                    }
                    for b in 0..NB {
                        let xv = load4(xp.add(b * stride + c));
                        for p in 0..P {
                            for g in 0..4 {
                                blk[p][b] = _mm512_dpbf16_ps(blk[p][b], wv[p][g], xv[g]);
                            }
                        }
                    }
                }
                for p in 0..P {
                    for b in 0..NB {
                        acc[p][b] = _mm512_fmadd_ps(blk[p][b], sv[p], acc[p][b]);
                    }
                }
            }
            u0 += unit;
        }
        for p in 0..P {
            for b in 0..NB {
                out[p * NB + b] = _mm512_reduce_add_ps(acc[p][b]);
            }
        }
    }
}

/// 128 codes (64 bytes at `p`) as four vectors of 32 bf16 weights: the codes in bits 0..4,
/// 4..8, 8..12 and 12..16 of each 16-bit lane, looked up in the doubled table `t`.
///
/// # Safety
/// The CPU must have AVX-512 F and BW; `p` must be readable for 64 bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn decode(p: *const u8, t: std::arch::x86_64::__m512i) -> [std::arch::x86_64::__m512bh; 4] {
    use super::bf16::as_bh;
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees 64 readable bytes at p.
    let v = unsafe { _mm512_loadu_si512(p as *const __m512i) };
    [
        as_bh(_mm512_permutexvar_epi16(v, t)),
        as_bh(_mm512_permutexvar_epi16(_mm512_srli_epi16::<4>(v), t)),
        as_bh(_mm512_permutexvar_epi16(_mm512_srli_epi16::<8>(v), t)),
        as_bh(_mm512_permutexvar_epi16(_mm512_srli_epi16::<12>(v), t)),
    ]
}

/// 128 bf16 activations at `p` as four vectors of 32.
///
/// # Safety
/// The CPU must have AVX-512 F; `p` must be readable for 128 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load4(p: *const u16) -> [std::arch::x86_64::__m512bh; 4] {
    use super::bf16::as_bh;
    use std::arch::x86_64::*;
    let p = p as *const __m512i;
    // SAFETY: the caller guarantees 128 readable values at p.
    unsafe {
        [
            as_bh(_mm512_loadu_si512(p)),
            as_bh(_mm512_loadu_si512(p.add(1))),
            as_bh(_mm512_loadu_si512(p.add(2))),
            as_bh(_mm512_loadu_si512(p.add(3))),
        ]
    }
}
