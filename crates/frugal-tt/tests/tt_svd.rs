//! TT-SVD, TT-matrix and TT rounding against tensorly (fixtures written by
//! `tests/fixtures/gen_tt.py`) and against the accuracy guarantees they state.
//!
//! Cores are unique only up to signs, so reconstructions and ranks are compared; both are
//! computed in float64 on both sides, so they agree to rounding (tolerance 1e-5 absolute).

use frugal_core::safetensors_io::SafetensorsFile;
use frugal_tt::{Tt, TtMatrix};
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

fn fixture() -> SafetensorsFile {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tt_svd.safetensors");
    SafetensorsFile::open(&path).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

fn rel_err(a: &Tensor, approx: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    (approx.to_kind(Kind::Double) - &a).norm().double_value(&[]) / a.norm().double_value(&[])
}

fn ints(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn meta(f: &SafetensorsFile) -> serde_json::Value {
    serde_json::from_str(&f.metadata()["meta"]).unwrap()
}

/// Our TT-SVD with tensorly's per-bond caps reproduces tensorly's ranks and reconstruction.
#[test]
fn tt_svd_matches_tensorly() {
    let f = fixture();
    let meta = meta(&f);
    let cases = meta["tt"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for case in cases {
        let name = case["case"].as_str().unwrap();
        let input = f.tensor(&format!("{name}.input"), Device::Cpu).unwrap();
        let expected = f.tensor(&format!("{name}.full"), Device::Cpu).unwrap();
        let caps = ints(&case["caps"]);
        let tt = Tt::svd_with_caps(&input, &caps[1..caps.len() - 1], None).unwrap();
        assert_eq!(tt.ranks(), ints(&case["ranks"]), "{name}: ranks");
        assert_eq!(tt.cores[0].kind(), Kind::Double);
        let diff = max_diff(&tt.full(), &expected);
        assert!(
            diff < 1e-5,
            "{name}: reconstruction differs from tensorly by {diff}"
        );
        // Truncated cases must really truncate (the fixture is not trivially exact).
        if !name.ends_with("full") {
            assert!(
                rel_err(&input, &expected) > 1e-3,
                "{name}: fixture not truncated"
            );
        }
    }
}

/// A single cap (`Tt::svd`) gives the same as per-bond caps of that value.
#[test]
fn single_cap_matches_tensorly() {
    let f = fixture();
    let input = f.tensor("b4_r3.input", Device::Cpu).unwrap();
    let expected = f.tensor("b4_r3.full", Device::Cpu).unwrap();
    let tt = Tt::svd(&input, Some(3), None).unwrap();
    assert_eq!(tt.ranks(), vec![1, 3, 3, 2, 1]);
    assert!(max_diff(&tt.full(), &expected) < 1e-5);
}

/// TT-matrix decomposition against tensorly's `tensor_train_matrix`.
#[test]
fn tt_matrix_matches_tensorly() {
    let f = fixture();
    for case in meta(&f)["ttm"].as_array().unwrap() {
        let name = case["case"].as_str().unwrap();
        let input = f.tensor(&format!("{name}.input"), Device::Cpu).unwrap();
        let expected = f.tensor(&format!("{name}.full"), Device::Cpu).unwrap();
        let caps = ints(&case["caps"]);
        let rows = ints(&case["row_modes"]);
        let cols = ints(&case["col_modes"]);
        let ttm = TtMatrix::from_dense(&input, &rows, &cols, Some(caps[1]), None).unwrap();
        assert_eq!(ttm.ranks(), ints(&case["ranks"]), "{name}");
        assert_eq!(ttm.row_modes(), rows);
        assert_eq!(ttm.col_modes(), cols);
        let diff = max_diff(&ttm.full(), &expected);
        assert!(diff < 1e-5, "{name}: {diff}");
        assert!(
            rel_err(&input, &expected) > 1e-3,
            "{name}: fixture not truncated"
        );
        let exact = TtMatrix::from_dense(&input, &rows, &cols, None, None).unwrap();
        assert!(
            max_diff(&exact.full(), &input) < 1e-10,
            "{name}: full rank not exact"
        );
    }
}

/// At full rank the decomposition is exact (float64 rounding), and f32 in gives f32 out.
#[test]
fn full_rank_is_exact() {
    tch::manual_seed(1);
    let a = Tensor::randn([3, 4, 5, 6], (Kind::Double, Device::Cpu));
    let tt = Tt::svd(&a, None, None).unwrap();
    assert_eq!(tt.ranks(), vec![1, 3, 12, 6, 1]);
    assert!(max_diff(&tt.full(), &a) < 1e-12);
    assert_eq!(tt.num_params(), 3 * 3 + 3 * 4 * 12 + 12 * 5 * 6 + 6 * 6);
    let b = a.to_kind(Kind::Float);
    let tt32 = Tt::svd(&b, None, None).unwrap();
    assert_eq!(tt32.cores[0].kind(), Kind::Float);
    assert!(max_diff(&tt32.full(), &b) < 1e-5);
}

/// A low-TT-rank tensor plus small noise: eps truncation finds the true ranks and stays within
/// eps; the ranks are the smallest that do (one rank less on any bond breaks the per-bond bound).
#[test]
fn eps_truncation_keeps_error_within_eps() {
    tch::manual_seed(2);
    let opts = (Kind::Double, Device::Cpu);
    let cores = vec![
        Tensor::randn([1, 6, 2], opts),
        Tensor::randn([2, 7, 3], opts),
        Tensor::randn([3, 5, 2], opts),
        Tensor::randn([2, 4, 1], opts),
    ];
    let clean = Tt::from_cores(cores).unwrap().full();
    let noise =
        Tensor::randn([6, 7, 5, 4], opts) * (1e-4 * clean.norm().double_value(&[]) / 840f64.sqrt());
    let a = &clean + noise;
    for eps in [1e-2, 1e-1, 3e-1] {
        let tt = Tt::svd(&a, None, Some(eps)).unwrap();
        let err = rel_err(&a, &tt.full());
        assert!(err <= eps * (1.0 + 1e-9), "eps {eps}: error {err}");
        if eps == 1e-2 {
            assert_eq!(tt.ranks(), vec![1, 2, 3, 2, 1]);
        }
    }
    // A tensor without low-rank structure: looser eps, fewer parameters, error still within eps.
    let b = Tensor::randn([6, 7, 5, 4], opts);
    let mut last = i64::MAX;
    for eps in [0.05, 0.2, 0.5] {
        let tt = Tt::svd(&b, None, Some(eps)).unwrap();
        let err = rel_err(&b, &tt.full());
        assert!(err <= eps * (1.0 + 1e-9), "eps {eps}: error {err}");
        assert!(
            tt.num_params() < last,
            "eps {eps}: {} parameters",
            tt.num_params()
        );
        last = tt.num_params();
    }
    // A cap below the eps rank wins.
    assert_eq!(
        Tt::svd(&a, Some(1), Some(1e-2)).unwrap().ranks(),
        vec![1, 1, 1, 1, 1]
    );
}

/// Rounding a TT with inflated ranks (a sum of two copies, ranks doubled) brings the ranks back
/// down and keeps the error within eps; rounding with a cap obeys the cap.
#[test]
fn rounding_reduces_ranks_within_eps() {
    tch::manual_seed(3);
    let opts = (Kind::Double, Device::Cpu);
    let a = Tt::from_cores(vec![
        Tensor::randn([1, 5, 3], opts),
        Tensor::randn([3, 6, 3], opts),
        Tensor::randn([3, 4, 1], opts),
    ])
    .unwrap();
    // The TT of 2A with doubled ranks: block-diagonal middle cores.
    let c0 = Tensor::cat(&[&a.cores[0], &a.cores[0]], 2);
    let z = Tensor::zeros([3, 6, 3], opts);
    let c1 = Tensor::cat(
        &[
            Tensor::cat(&[&a.cores[1], &z], 2),
            Tensor::cat(&[&z, &a.cores[1]], 2),
        ],
        0,
    );
    let c2 = Tensor::cat(&[&a.cores[2], &a.cores[2]], 0);
    let doubled = Tt::from_cores(vec![c0, c1, c2]).unwrap();
    assert_eq!(doubled.ranks(), vec![1, 6, 6, 1]);
    let full = doubled.full();
    assert!(max_diff(&full, &(a.full() * 2.0)) < 1e-10);
    let rounded = doubled.round(None, Some(1e-8)).unwrap();
    assert_eq!(rounded.ranks(), vec![1, 3, 3, 1]);
    assert!(rel_err(&full, &rounded.full()) < 1e-8);
    for eps in [0.05, 0.3] {
        let r = doubled.round(None, Some(eps)).unwrap();
        assert!(rel_err(&full, &r.full()) <= eps);
    }
    let capped = doubled.round(Some(2), None).unwrap();
    assert_eq!(capped.ranks(), vec![1, 2, 2, 1]);
    // Capped rounding equals TT-SVD of the full tensor with the same cap (both are the
    // quasi-optimal sequential truncation of the same tensor).
    let direct = Tt::svd(&full, Some(2), None).unwrap();
    assert!(max_diff(&capped.full(), &direct.full()) < 1e-8);
}

/// Bad input: errors name the problem.
#[test]
fn bad_input_errors_name_the_problem() {
    let opts = (Kind::Double, Device::Cpu);
    let a = Tensor::randn([4, 5, 6], opts);
    let e = Tt::svd(&a, Some(0), None).unwrap_err().to_string();
    assert!(e.contains("max_rank = 0"), "{e}");
    let e = Tt::svd(&a, None, Some(-1.0)).unwrap_err().to_string();
    assert!(e.contains("eps = -1"), "{e}");
    let e = Tt::svd_with_caps(&a, &[2], None).unwrap_err().to_string();
    assert!(e.contains("1 rank caps") && e.contains("[4, 5, 6]"), "{e}");
    let e = Tt::from_cores(vec![
        Tensor::zeros([1, 4, 2], opts),
        Tensor::zeros([3, 5, 1], opts),
    ])
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("left rank 3") && e.contains("right rank 2"),
        "{e}"
    );
    let e = Tt::from_cores(vec![Tensor::zeros([1, 4, 2], opts)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("right rank is 2"), "{e}");
    let m = Tensor::randn([12, 20], opts);
    let e = TtMatrix::from_dense(&m, &[3, 5], &[4, 5], None, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[3, 5] multiply to 15") && e.contains("12"),
        "{e}"
    );
    let e = TtMatrix::from_dense(&m, &[3, 4], &[20], None, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("same number of modes"), "{e}");
}
