//! Tests of the bf16-compute products against f64 references built from the bf16-rounded
//! activations (and, for NF4, the bf16-rounded table times the f32 absmax), and of the
//! AVX512-BF16 kernels (where the CPU has them) against the portable ones.

use super::bf16::round_bf16;
use super::tests::{data, int4_variants};
use super::*;
use crate::fourbit::{FourBit, FourBitConfig, FourBitKind};
use crate::int4::Int4Gptq;

/// ‖y − want‖₂ / ‖want‖₂.
fn rel_l2(y: &[f32], want: &[f64]) -> f64 {
    assert_eq!(y.len(), want.len());
    let num: f64 = y
        .iter()
        .zip(want)
        .map(|(&a, &b)| (a as f64 - b).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

/// `rel_l2(y, want) <= tol`, and every element within 10 · tol of max|want|.
fn assert_close(y: &[f32], want: &[f64], tol: f64, what: &str) {
    let e = rel_l2(y, want);
    assert!(e <= tol, "{what}: relative L2 error {e:e} > {tol:e}");
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    for (k, (&a, &b)) in y.iter().zip(want).enumerate() {
        let err = (a as f64 - b).abs() / scale;
        assert!(
            err <= 10.0 * tol,
            "{what}: element {k}: {a} vs {b} ({err:e})"
        );
    }
}

fn as_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}

/// The NF4 / FP4 product in f64 from bf16(x), bf16(table[code]) and the f32 absmax per block
/// of the flattened weight (`bf16_table` false: the exact f32 table, for comparison).
fn nf4_reference(q: &FourBit, x: &[f32], batch: usize, bf16_table: bool) -> Vec<f64> {
    let (rows, cols) = (q.shape[0] as usize, q.shape[1] as usize);
    let table = q.kind.codes();
    let codes = q.codes();
    let absmax = q.absmax_values();
    let mut y = vec![0f64; batch * rows];
    for b in 0..batch {
        for o in 0..rows {
            y[b * rows + o] = (0..cols)
                .map(|i| {
                    let e = o * cols + i;
                    let c = table[codes[e] as usize];
                    let c = if bf16_table { round_bf16(c) } else { c };
                    round_bf16(x[b * cols + i]) as f64 * c as f64 * absmax[e / q.block_size] as f64
                })
                .sum();
        }
    }
    y
}

/// The GPTQ int4 product in f64 from bf16(x) and scale · (q − zero) per `g_idx`.
fn int4_reference(w: &Int4Gptq, x: &[f32], batch: usize) -> Vec<f64> {
    let (rows, cols) = (w.rows, w.cols);
    let mut y = vec![0f64; batch * rows];
    for b in 0..batch {
        for o in 0..rows {
            y[b * rows + o] = (0..cols)
                .map(|i| {
                    let g = w.g_idx[i] as usize;
                    let wv =
                        w.scales[g * rows + o] as f64 * (w.code(i, o) as f64 - w.zero(g, o) as f64);
                    round_bf16(x[b * cols + i]) as f64 * wv
                })
                .sum();
        }
    }
    y
}

/// NF4 and FP4, plain and double-quantized absmax, block sizes 32..1024, `in` a multiple of
/// 128 (AVX512-BF16 kernel where the CPU has it, one block per chunk, several, or several
/// chunks per block) or not (portable, including blocks that span two rows), batches 1..=9:
/// within 1e-5 (relative L2) of the f64 reference with the bf16 table, the SIMD and portable
/// kernels within 1e-6 of each other, and clearly off (> 1e-4) the exact-table reference, so
/// that the table really is rounded.
#[test]
fn nf4_bf16_matches_reference() {
    let cases = [
        (24, 128, 64, FourBitKind::Nf4, false),
        (7, 256, 32, FourBitKind::Nf4, true),
        (10, 384, 128, FourBitKind::Fp4, false),
        (9, 1024, 256, FourBitKind::Nf4, true),
        (3, 2048, 1024, FourBitKind::Nf4, false),
        (5, 100, 64, FourBitKind::Nf4, false),
        (6, 192, 64, FourBitKind::Fp4, true),
        (3, 45, 32, FourBitKind::Nf4, true),
    ];
    for (rows, cols, bs, kind, dq) in cases {
        let wf = data(rows * cols, 1);
        let cfg = FourBitConfig {
            kind,
            block_size: bs,
            double_quant: dq,
        };
        let q = FourBit::quantize(&wf, &[rows as i64, cols as i64], &cfg).unwrap();
        for batch in 1..=9 {
            let x = data(batch * cols, 2 + batch as u64);
            let want = nf4_reference(&q, &x, batch, true);
            let what = format!("{kind:?} {rows}x{cols} bs {bs} dq {dq} batch {batch}");
            let auto = nf4_matmul_bf16(&q, &x, batch).unwrap();
            let portable = nf4_matmul_bf16_with(&q, &x, batch, Kernel::Scalar).unwrap();
            assert_close(&auto, &want, 1e-5, &what);
            assert_close(&portable, &want, 1e-5, &what);
            assert_close(&auto, &as_f64(&portable), 1e-6, &what);
            let exact = nf4_reference(&q, &x, batch, false);
            if kind == FourBitKind::Nf4 {
                let e = rel_l2(&auto, &exact);
                assert!(e > 1e-4, "{what}: {e:e} from the exact table");
            }
        }
    }
}

/// GPTQ int4 with groups 32..128 and one group of 40, integer and float zeros, row counts
/// that are multiples of 128 (the 128-row batch-1 kernel), of 16 or neither (portable), and
/// an act-order `g_idx` (portable), batches 1..=9: within 1e-5 (relative L2) of the f64
/// reference from the bf16-rounded activations, SIMD and portable within 1e-6 of each other.
#[test]
fn int4_bf16_matches_reference() {
    let cases = [
        (16, 96, 32),
        (8, 64, 64),
        (24, 256, 128),
        (32, 40, 40),
        (256, 384, 128),
        (48, 1024, 64),
    ];
    for (rows, cols, gs) in cases {
        for (name, w) in &int4_variants(rows, cols, gs) {
            for batch in 1..=9 {
                let x = data(batch * cols, 4 + batch as u64);
                let want = int4_reference(w, &x, batch);
                let what = format!("{name} {rows}x{cols} group {gs} batch {batch}");
                let auto = int4_matmul_bf16(w, &x, batch).unwrap();
                let portable = int4_matmul_bf16_with(w, &x, batch, Kernel::Scalar).unwrap();
                assert_close(&auto, &want, 1e-5, &what);
                assert_close(&portable, &want, 1e-5, &what);
                assert_close(&auto, &as_f64(&portable), 1e-6, &what);
            }
        }
    }
}

/// Activations that bf16 rounds: ties go to even, and the result is the product of the
/// rounded values (a weight of all ones in one int4 group, zero 0, scale 1).
#[test]
fn activations_rounded_to_bf16() {
    let (rows, cols) = (16, 32);
    let mut q = Int4Gptq::quantize(&vec![1.0; rows * cols], rows, cols, 32).unwrap();
    q.qweight.fill(0x1111_1111);
    q.scales.fill(1.0);
    q.zeros_f32 = Some(vec![0.0; rows]);
    let mut x = vec![0f32; cols];
    x[0] = 1.0 + 2f32.powi(-8); // a tie: rounds to 1
    x[1] = 1.0 + 3.0 * 2f32.powi(-8); // a tie: rounds to 1 + 2^-6
    x[2] = 2f32.powi(-9); // exact
    let want = 2.0 + 2f32.powi(-6) + 2f32.powi(-9);
    for kernel in [Kernel::Auto, Kernel::Scalar] {
        let y = int4_matmul_bf16_with(&q, &x, 1, kernel).unwrap();
        assert!(y.iter().all(|&v| v == want), "{kernel:?}: {y:?}");
    }
}

/// Activations of the wrong length, or a batch of 0, are refused with a shape error.
#[test]
fn bf16_shape_errors() {
    let f = FourBit::quantize(&data(256, 1), &[2, 128], &FourBitConfig::default()).unwrap();
    assert!(nf4_matmul_bf16(&f, &[0.0; 129], 1).is_err());
    assert!(nf4_matmul_bf16(&f, &[], 0).is_err());
    let q = Int4Gptq::quantize(&data(512, 1), 16, 32, 32).unwrap();
    assert!(int4_matmul_bf16(&q, &[0.0; 31], 1).is_err());
}
