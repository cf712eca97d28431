//! `TtLinear` against the dense layer of its reconstructed weight: outputs within 1e-5 and
//! input / core / rank-variable / bias gradients within 1e-4 (f32), and far tighter in f64.
//! The reference weight is rebuilt here with `einsum` from the raw variables, independently of
//! the crate's contraction code.

use frugal_tt::TtLinear;
use tch::{nn, Device, Kind, Tensor};

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// A layer 24 -> 20 with input modes [2, 3, 4], output modes [4, 5], ranks
/// [1, 2, 3, 3, 4, 1], random rank variables in [0.5, 1.5) and a random bias.
fn layer(vs: &nn::VarStore, kind: Kind) -> TtLinear {
    tch::manual_seed(11);
    let opts = (Kind::Float, Device::Cpu);
    let ranks = [1i64, 2, 3, 3, 4, 1];
    let modes = [2i64, 3, 4, 4, 5];
    let cores: Vec<Tensor> = (0..5)
        .map(|k| Tensor::randn([ranks[k], modes[k], ranks[k + 1]], opts) * 0.6)
        .collect();
    let d: Vec<Tensor> = ranks[1..5]
        .iter()
        .map(|&r| Tensor::rand([r], opts) + 0.5)
        .collect();
    let bias = Tensor::randn([20], opts);
    TtLinear::from_cores(&vs.root().sub("fc"), 3, cores, Some(d), Some(bias), kind).unwrap()
}

/// The weight Wᵀ (in, out) from the raw variables, by einsum.
fn reference_wt(layer: &TtLinear) -> Tensor {
    let r = layer.ranked();
    let c = r.cores();
    let d = r.rank_vars();
    let g: Vec<Tensor> = (0..5)
        .map(|k| {
            if k < 4 {
                &c[k] * &d[k]
            } else {
                c[k].shallow_clone()
            }
        })
        .collect();
    Tensor::einsum("aib,bjc,ckd,dle,emf->ijklm", &g, None::<i64>).reshape([24, 20])
}

fn check(kind: Kind, out_tol: f64, grad_tol: f64) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    if kind == Kind::Double {
        vs.set_kind(Kind::Double);
    }
    let layer = layer(&vs, kind);
    assert_eq!(layer.ranks(), vec![1, 2, 3, 3, 4, 1]);
    let x = Tensor::randn([2, 3, 24], (kind, Device::Cpu)).set_requires_grad(true);
    let g = Tensor::randn([2, 3, 20], (kind, Device::Cpu));
    let mut leaves: Vec<Tensor> = vec![x.shallow_clone()];
    leaves.extend(layer.ranked().cores().iter().map(|t| t.shallow_clone()));
    leaves.extend(layer.ranked().rank_vars().iter().map(|t| t.shallow_clone()));
    leaves.push(layer.bias().unwrap().shallow_clone());

    let y = layer.forward(&x);
    assert_eq!(y.size(), vec![2, 3, 20]);
    assert_eq!(y.kind(), kind);
    let y_ref = x.matmul(&reference_wt(&layer).to_kind(kind)) + layer.bias().unwrap().to_kind(kind);
    let out = max_diff(&y, &y_ref);
    assert!(out < out_tol, "{kind:?}: outputs differ by {out}");
    assert!(
        y_ref.abs().max().double_value(&[]) > 0.5,
        "reference too small to test"
    );

    let grads = Tensor::run_backward(&[(&y * &g).sum(Kind::Float)], &leaves, false, false);
    let grads_ref = Tensor::run_backward(&[(&y_ref * &g).sum(Kind::Float)], &leaves, false, false);
    for (i, (a, b)) in grads.iter().zip(&grads_ref).enumerate() {
        let diff = max_diff(a, b);
        assert!(diff < grad_tol, "{kind:?}: gradient {i} differs by {diff}");
        assert!(
            b.abs().max().double_value(&[]) > 1e-2,
            "gradient {i} vanishes"
        );
    }
    // to_dense is the same weight, (out, in).
    let w = layer.to_dense();
    assert_eq!(w.size(), vec![20, 24]);
    assert!(max_diff(&w.tr(), &reference_wt(&layer)) < out_tol);
}

#[test]
fn output_and_gradients_match_dense_f32() {
    check(Kind::Float, 1e-5, 1e-4);
}

#[test]
fn output_and_gradients_match_dense_f64() {
    check(Kind::Double, 1e-12, 1e-11);
}

/// bf16 compute (f32 masters): outputs within bf16 rounding of the f32 layer.
#[test]
fn bf16_compute_is_close_to_f32() {
    let vs = nn::VarStore::new(Device::Cpu);
    let l32 = layer(&vs, Kind::Float);
    // The same variables (not re-drawn: tests share the global RNG across threads).
    let vs16 = nn::VarStore::new(Device::Cpu);
    let r = l32.ranked();
    let l16 = TtLinear::from_cores(
        &vs16.root().sub("fc"),
        3,
        r.cores().iter().map(|t| t.detach()).collect(),
        Some(r.rank_vars().iter().map(|t| t.detach()).collect()),
        l32.bias().map(|t| t.detach()),
        Kind::BFloat16,
    )
    .unwrap();
    assert_eq!(l16.ranked().cores()[0].kind(), Kind::Float);
    let x = Tensor::randn([8, 24], (Kind::Float, Device::Cpu));
    let y32 = l32.forward(&x);
    let y16 = l16.forward(&x);
    assert_eq!(y16.kind(), Kind::BFloat16);
    let scale = y32.abs().max().double_value(&[]);
    let diff = max_diff(&y16, &y32);
    assert!(
        diff < 3e-2 * scale && diff > 0.0,
        "bf16 differs by {diff} (scale {scale})"
    );
}

/// from_dense at full rank reproduces the weight and the layer; with a rank cap it compresses.
#[test]
fn from_dense_round_trip() {
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let w = Tensor::randn([20, 24], (Kind::Float, Device::Cpu));
    let b = Tensor::randn([20], (Kind::Float, Device::Cpu));
    let full = TtLinear::from_dense(
        &vs.root().sub("a"),
        &w,
        Some(&b),
        &[4, 6],
        &[5, 4],
        None,
        None,
        Kind::Float,
    )
    .unwrap();
    assert_eq!(full.ranks(), vec![1, 4, 20, 4, 1]);
    assert!(max_diff(&full.to_dense(), &w) < 1e-5);
    let x = Tensor::randn([7, 24], (Kind::Float, Device::Cpu));
    assert!(max_diff(&full.forward(&x), &(x.matmul(&w.tr()) + &b)) < 1e-4);
    let small = TtLinear::from_dense(
        &vs.root().sub("b"),
        &w,
        None,
        &[4, 6],
        &[5, 4],
        Some(3),
        None,
        Kind::Float,
    )
    .unwrap();
    assert_eq!(small.ranks(), vec![1, 3, 3, 3, 1]);
    assert!(small.num_params() < full.num_params());
    assert!(small.bias().is_none());
    // Variables are registered by name.
    let names: Vec<String> = vs.variables().keys().cloned().collect();
    for n in [
        "a.cores.0",
        "a.cores.3",
        "a.rank_vars.0",
        "a.rank_vars.2",
        "a.bias",
        "b.cores.1",
    ] {
        assert!(names.contains(&n.to_string()), "{n} missing from {names:?}");
    }
    assert_eq!(vs.trainable_variables().len(), 4 + 3 + 1 + 4 + 3);
}

/// Bad input: modes that do not match the dimension, too few modes, a bad rank.
#[test]
fn bad_modes_and_ranks_are_errors() {
    let vs = nn::VarStore::new(Device::Cpu);
    let p = vs.root();
    let e = TtLinear::new(
        &p.sub("a"),
        24,
        20,
        &[2, 3, 5],
        &[4, 5],
        3,
        false,
        Kind::Float,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("input") && e.contains("[2, 3, 5] multiply to 30") && e.contains("24"),
        "{e}"
    );
    let e = TtLinear::new(
        &p.sub("b"),
        24,
        20,
        &[4, 6],
        &[2, 2, 4],
        3,
        false,
        Kind::Float,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("output") && e.contains("multiply to 16") && e.contains("20"),
        "{e}"
    );
    let e = TtLinear::new(&p.sub("c"), 24, 20, &[24], &[4, 5], 3, false, Kind::Float)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least 2 modes"), "{e}");
    let e = TtLinear::new(&p.sub("d"), 24, 20, &[4, 6], &[4, 5], 0, false, Kind::Float)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 0"), "{e}");
    let w = Tensor::zeros([20, 24], (Kind::Float, Device::Cpu));
    let e = TtLinear::from_dense(
        &p.sub("e"),
        &w,
        None,
        &[4, 6],
        &[4, 4],
        Some(2),
        None,
        Kind::Float,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("[4, 4] multiply to 16") && e.contains("20"),
        "{e}"
    );
    let opts = (Kind::Float, Device::Cpu);
    let bad = vec![
        Tensor::zeros([1, 2, 2], opts),
        Tensor::zeros([3, 3, 2], opts),
        Tensor::zeros([2, 4, 1], opts),
        Tensor::zeros([1, 5, 1], opts),
    ];
    let e = TtLinear::from_cores(&p.sub("f"), 2, bad, None, None, Kind::Float)
        .unwrap_err()
        .to_string();
    assert!(e.contains("core 1") && e.contains("left rank 3"), "{e}");
    let cores = vec![
        Tensor::zeros([1, 2, 2], opts),
        Tensor::zeros([2, 3, 2], opts),
        Tensor::zeros([2, 4, 2], opts),
        Tensor::zeros([2, 5, 1], opts),
    ];
    let e = TtLinear::from_cores(
        &p.sub("g"),
        2,
        cores,
        Some(vec![Tensor::ones([2], opts)]),
        None,
        Kind::Float,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("rank variables") && e.contains("[2, 2, 2]"),
        "{e}"
    );
}
