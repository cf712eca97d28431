//! Tests of the packed-weight products against dequantize-then-matmul (f64 reference) and of
//! the SIMD kernels against the scalar ones.

use super::int4::int4_matmul_with;
use super::int8::int8_matmul_with;
use super::nf4::nf4_matmul_with;
use super::ternary::ternary_matmul_with;
use super::*;
use crate::fourbit::{FourBit, FourBitConfig, FourBitKind};
use crate::int4::Int4Gptq;
use crate::int8::Int8Rowwise;
use crate::ternary::Ternary;
use crate::QuantError;

const BATCHES: [usize; 4] = [1, 3, 8, 11];

/// Deterministic pseudo-random values in about [-1, 1] (a 64-bit LCG), with a few larger ones.
pub(super) fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|k| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = ((s >> 40) as f64 / (1u64 << 24) as f64) * 2.0 - 1.0;
            (if k % 97 == 5 { u * 4.0 } else { u }) as f32
        })
        .collect()
}

/// Y = X Wᵀ in f64 from a dense (rows, cols) weight.
fn reference(w: &[f32], rows: usize, cols: usize, x: &[f32], batch: usize) -> Vec<f64> {
    let mut y = vec![0f64; batch * rows];
    for b in 0..batch {
        for o in 0..rows {
            y[b * rows + o] = (0..cols)
                .map(|i| w[o * cols + i] as f64 * x[b * cols + i] as f64)
                .sum();
        }
    }
    y
}

/// Every |y - want| <= tol · max|want|.
fn assert_close(y: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(y.len(), want.len(), "{what}");
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    for (k, (&a, &b)) in y.iter().zip(want).enumerate() {
        let err = (a as f64 - b).abs() / scale;
        assert!(
            err <= tol,
            "{what}: element {k}: {a} vs {b} (relative {err:e})"
        );
    }
}

fn as_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}

/// NF4 and FP4, plain and double-quantized absmax, block sizes 32..1024, `in` a multiple of
/// the block (fast path, one or several column slabs, odd row counts) or not (fallback),
/// against dequantize-then-matmul; the AVX-512 (where the CPU has it) and AVX2 kernels against
/// the scalar one.
#[test]
fn nf4_matches_dequantized() {
    let cases = [
        (24, 128, 64, FourBitKind::Nf4, false),
        (7, 96, 32, FourBitKind::Nf4, true),
        (10, 256, 128, FourBitKind::Fp4, false),
        (5, 100, 64, FourBitKind::Nf4, false),
        (3, 45, 32, FourBitKind::Fp4, true),
        (5, 1280, 64, FourBitKind::Nf4, true),
        (3, 2048, 1024, FourBitKind::Nf4, false),
    ];
    for (rows, cols, bs, kind, dq) in cases {
        let wf = data(rows * cols, 1);
        let cfg = FourBitConfig {
            kind,
            block_size: bs,
            double_quant: dq,
        };
        let q = FourBit::quantize(&wf, &[rows as i64, cols as i64], &cfg).unwrap();
        let dense = q.dequantize();
        for batch in BATCHES {
            let x = data(batch * cols, 2 + batch as u64);
            let want = reference(&dense, rows, cols, &x, batch);
            let what = format!("{kind:?} {rows}x{cols} bs {bs} batch {batch}");
            let auto = nf4_matmul(&q, &x, batch).unwrap();
            let avx2 = nf4_matmul_with(&q, &x, batch, Kernel::Avx2).unwrap();
            let scalar = nf4_matmul_with(&q, &x, batch, Kernel::Scalar).unwrap();
            assert_close(&auto, &want, 1e-4, &what);
            assert_close(&avx2, &want, 1e-4, &what);
            assert_close(&scalar, &want, 1e-4, &what);
            assert_close(&auto, &as_f64(&scalar), 1e-5, &what);
            assert_close(&avx2, &as_f64(&scalar), 1e-5, &what);
        }
    }
}

/// A GPTQ int4 quantization of a (rows, cols) weight with group size `gs` in three forms:
/// integer zeros, float zeros, and an act-order `g_idx`.
pub(super) fn int4_variants(rows: usize, cols: usize, gs: usize) -> [(&'static str, Int4Gptq); 3] {
    let wf = data(rows * cols, 3);
    let q = Int4Gptq::quantize(&wf, rows, cols, gs).unwrap();
    let mut fz = q.clone();
    fz.zeros_f32 = Some(
        (0..q.groups() * rows)
            .map(|k| 7.0 + (k % 7) as f32 * 0.13)
            .collect(),
    );
    let mut act = q.clone();
    let groups = q.groups() as i32;
    act.g_idx = (0..cols as i32).map(|i| (i * 7 + 3) % groups).collect();
    [("int", q), ("float zeros", fz), ("act-order", act)]
}

/// GPTQ int4 with groups 32, 64, 128 and one group of 40, integer and float zeros, and an
/// act-order `g_idx` (scalar kernel), against dequantize-then-matmul; AVX-512 (where the CPU
/// has it: 16-row tiles for row counts that are multiples of 16, 128-row passes at batch 1
/// for multiples of 128) and AVX2 against scalar.
#[test]
fn int4_matches_dequantized() {
    let cases = [
        (16, 96, 32),
        (8, 64, 64),
        (24, 256, 128),
        (32, 40, 40),
        (256, 384, 128),
    ];
    for (rows, cols, gs) in cases {
        for (name, w) in &int4_variants(rows, cols, gs) {
            let dense = w.dequantize();
            for batch in BATCHES {
                let x = data(batch * cols, 4 + batch as u64);
                let want = reference(&dense, rows, cols, &x, batch);
                let what = format!("{name} {rows}x{cols} group {gs} batch {batch}");
                let auto = int4_matmul(w, &x, batch).unwrap();
                let avx2 = int4_matmul_with(w, &x, batch, Kernel::Avx2).unwrap();
                let scalar = int4_matmul_with(w, &x, batch, Kernel::Scalar).unwrap();
                assert_close(&auto, &want, 1e-4, &what);
                assert_close(&avx2, &want, 1e-4, &what);
                assert_close(&scalar, &want, 1e-4, &what);
                assert_close(&auto, &as_f64(&scalar), 1e-5, &what);
                assert_close(&avx2, &as_f64(&scalar), 1e-5, &what);
            }
        }
    }
}

/// The activation quantization written out plainly: q = round_half_even(x · (127 / m)) in f32,
/// m = max(max|x|, floor); returns the codes and m.
fn plain_quant(x: &[f32], floor: f32) -> (Vec<i64>, f64) {
    let m = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(floor);
    if m == 0.0 {
        return (vec![0; x.len()], 0.0);
    }
    let mul = 127.0f32 / m;
    (
        x.iter()
            .map(|&v| (v * mul).round_ties_even() as i64)
            .collect(),
        m as f64,
    )
}

/// int8 against the same quantized-activation math in i64 / f64 (equal up to f32 rounding of
/// the final scale), VNNI (where the CPU has it) and AVX2 bit for bit equal to scalar, odd
/// widths, a zero activation row, and ±127 codes everywhere (no saturation in the SIMD sums).
#[test]
fn int8_matches_plain_math() {
    for (rows, cols) in [(13, 100), (8, 64), (5, 31), (9, 1000)] {
        let wf = data(rows * cols, 5);
        let q = Int8Rowwise::quantize(&wf, rows, cols).unwrap();
        for batch in BATCHES {
            let mut x = data(batch * cols, 6 + batch as u64);
            if batch == 3 {
                x[cols..2 * cols].fill(0.0);
            }
            let mut want = vec![0f64; batch * rows];
            for b in 0..batch {
                let (xq, m) = plain_quant(&x[b * cols..(b + 1) * cols], 0.0);
                for o in 0..rows {
                    let dot: i64 = (0..cols)
                        .map(|i| q.codes[o * cols + i] as i64 * xq[i])
                        .sum();
                    want[b * rows + o] = dot as f64 * q.scb[o] as f64 / 127.0 * m / 127.0;
                }
            }
            let what = format!("{rows}x{cols} batch {batch}");
            let auto = int8_matmul(&q, &x, batch).unwrap();
            let avx2 = int8_matmul_with(&q, &x, batch, Kernel::Avx2).unwrap();
            let scalar = int8_matmul_with(&q, &x, batch, Kernel::Scalar).unwrap();
            assert_close(&auto, &want, 1e-6, &what);
            assert_eq!(auto, scalar, "{what}");
            assert_eq!(avx2, scalar, "{what}");
        }
    }
    // Worst case for the 16-bit pair sums: every code ±127 with matching activation signs.
    let cols = 96;
    let wf: Vec<f32> = (0..2 * cols)
        .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
        .collect();
    let q = Int8Rowwise::quantize(&wf, 2, cols).unwrap();
    let x = wf.clone();
    let y = int8_matmul(&q, &x, 2).unwrap();
    assert_eq!(y, int8_matmul_with(&q, &x, 2, Kernel::Scalar).unwrap());
    assert_eq!(y, int8_matmul_with(&q, &x, 2, Kernel::Avx2).unwrap());
    assert!((y[0] - cols as f32).abs() < 1e-3, "{y:?}");
}

/// Ternary against the same quantized-activation math in i64 / f64, VNNI (where the CPU has
/// it) and AVX2 bit for bit equal to scalar; widths that are multiples of 4 (SIMD, with and
/// without a tail past the last 128- or 256-block, and more than 16 blocks) and not (scalar),
/// per-row-group scales.
#[test]
fn ternary_matches_plain_math() {
    for (rows, cols, rps) in [
        (9, 100, None),
        (6, 301, Some(2)),
        (4, 256, Some(1)),
        (3, 16 * 128 * 2 + 384 + 44, None),
        // Batch 1 takes 8 rows per pass: full passes and a remainder.
        (19, 300, Some(1)),
        (17, 16 * 128 + 128 + 4, None),
    ] {
        let wf = data(rows * cols, 7);
        let t = Ternary::quantize(&wf, rows, cols, rps).unwrap();
        let codes = t.codes();
        for batch in BATCHES {
            let x = data(batch * cols, 8 + batch as u64);
            let mut want = vec![0f64; batch * rows];
            for b in 0..batch {
                let (xq, m) = plain_quant(&x[b * cols..(b + 1) * cols], 1e-5);
                for o in 0..rows {
                    let dot: i64 = (0..cols).map(|i| codes[o * cols + i] as i64 * xq[i]).sum();
                    let s = t.scales[o / t.rows_per_scale] as f64;
                    want[b * rows + o] = dot as f64 * s * m / 127.0;
                }
            }
            let what = format!("{rows}x{cols} batch {batch}");
            let auto = ternary_matmul(&t, &x, batch).unwrap();
            let avx2 = ternary_matmul_with(&t, &x, batch, Kernel::Avx2).unwrap();
            let scalar = ternary_matmul_with(&t, &x, batch, Kernel::Scalar).unwrap();
            assert_close(&auto, &want, 1e-6, &what);
            assert_eq!(auto, scalar, "{what}");
            assert_eq!(avx2, scalar, "{what}");
        }
    }
    // Worst case for the 16-bit sums: all codes +1 and all activations 127, 16 blocks long;
    // 9 rows: one pass of 8 and one single row at batch 1.
    let (rows, cols) = (9, 16 * 128 + 128);
    let t = Ternary::quantize(&vec![1.0; rows * cols], rows, cols, None).unwrap();
    let y = ternary_matmul(&t, &vec![1.0; cols], 1).unwrap();
    assert_eq!(y, vec![cols as f32; rows]);
    let y = ternary_matmul_with(&t, &vec![1.0; cols], 1, Kernel::Avx2).unwrap();
    assert_eq!(y, vec![cols as f32; rows]);
}

/// Activations of the wrong length, or a batch of 0, are refused with a shape error.
#[test]
fn shape_errors() {
    let f = FourBit::quantize(&data(64, 1), &[2, 32], &FourBitConfig::default()).unwrap();
    assert!(matches!(
        nf4_matmul(&f, &[0.0; 33], 1),
        Err(QuantError::Shape { .. })
    ));
    assert!(matches!(
        nf4_matmul(&f, &[], 0),
        Err(QuantError::Shape { .. })
    ));
    let q = Int8Rowwise::quantize(&data(64, 1), 2, 32).unwrap();
    assert!(matches!(
        int8_matmul(&q, &[0.0; 63], 2),
        Err(QuantError::Shape { .. })
    ));
    let q = Int4Gptq::quantize(&data(256, 1), 8, 32, 32).unwrap();
    assert!(matches!(
        int4_matmul(&q, &[0.0; 31], 1),
        Err(QuantError::Shape { .. })
    ));
    let t = Ternary::quantize(&data(64, 1), 2, 32, None).unwrap();
    let err = ternary_matmul(&t, &[0.0; 40], 1).unwrap_err();
    assert!(err.to_string().contains("activations"), "{err}");
    let f3 = FourBit::quantize(&data(64, 1), &[64], &FourBitConfig::default()).unwrap();
    assert!(matches!(
        nf4_matmul(&f3, &[0.0; 64], 1),
        Err(QuantError::Shape { .. })
    ));
}
