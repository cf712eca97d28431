//! Behaviour every optimizer shares through the `Optimizer` trait: bit-identical resume after
//! save/load (with and without a projector), shape checks on load, gradient accumulation, and
//! stepping a subset.

mod common;

use common::{leaf, randn, set_grad};
use frugal_galore::{GaloreConfig, GaloreProjector};
use frugal_optim::{
    Adafactor, AdafactorConfig, AdamW, AdamW8bit, AdamW8bitConfig, AdamWConfig, AdamWVariant,
    Optimizer,
};
use tch::Tensor;

/// Which optimizer and whether its 2-D parameter gets a projector.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Torch,
    Hf,
    Adafactor,
    AdafactorBeta1,
    Eight,
}

const ALL: [Kind; 5] = [
    Kind::Torch,
    Kind::Hf,
    Kind::Adafactor,
    Kind::AdafactorBeta1,
    Kind::Eight,
];

/// Parameters: a 96 x 64 matrix (8-bit state for AdamW8bit; projected to rank 8 when asked)
/// and a 1-D vector.
fn params(seed: i64) -> Vec<(String, Tensor)> {
    vec![
        ("w".to_string(), leaf(&(randn(&[96, 64], seed) * 0.1))),
        ("b".to_string(), leaf(&(randn(&[7], seed + 1) * 0.1))),
    ]
}

fn make(kind: Kind, ps: &[(String, Tensor)], projected: bool) -> Box<dyn Optimizer> {
    let ps: Vec<(String, Tensor)> = ps
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    let proj = || {
        let c = GaloreConfig {
            rank: 8,
            update_proj_gap: 3,
            reproject_moments: true,
            ..Default::default()
        };
        Box::new(GaloreProjector::new(c).unwrap())
    };
    let lr = 1e-2;
    match kind {
        Kind::Torch | Kind::Hf => {
            let variant = if matches!(kind, Kind::Hf) {
                AdamWVariant::Hf
            } else {
                AdamWVariant::Torch
            };
            let c = AdamWConfig {
                lr,
                weight_decay: 0.1,
                variant,
                ..Default::default()
            };
            let o = AdamW::new(ps, c);
            Box::new(if projected {
                o.with_projector("w", proj()).unwrap()
            } else {
                o
            })
        }
        Kind::Adafactor | Kind::AdafactorBeta1 => {
            let beta1 = matches!(kind, Kind::AdafactorBeta1).then_some(0.9);
            // Relative to rms(w) = 0.1 (scale_parameter), so 10x AdamW's lr.
            let c = AdafactorConfig {
                lr: 10.0 * lr,
                beta1,
                weight_decay: 0.1,
                ..Default::default()
            };
            let o = Adafactor::new(ps, c).unwrap();
            Box::new(if projected {
                o.with_projector("w", proj()).unwrap()
            } else {
                o
            })
        }
        Kind::Eight => {
            // Projected state is 96 x 8 = 768 values: lower the 8-bit threshold so it is 8-bit.
            let c = AdamW8bitConfig {
                lr,
                weight_decay: 0.1,
                min_8bit_size: 512,
                ..Default::default()
            };
            let o = AdamW8bit::new(ps, c);
            Box::new(if projected {
                o.with_projector("w", proj()).unwrap()
            } else {
                o
            })
        }
    }
}

fn grads(t: i64) -> Vec<Tensor> {
    let scale = if t < 3 { 0.01 } else { 1.0 };
    vec![
        randn(&[96, 64], 100 + t) * scale,
        randn(&[7], 200 + t) * scale,
    ]
}

fn step_with(opt: &mut dyn Optimizer, ps: &[(String, Tensor)], t: i64) {
    for ((_, p), g) in ps.iter().zip(grads(t)) {
        set_grad(p, &g);
    }
    opt.step().unwrap();
}

/// Guarantee: for each optimizer, with and without a projector (whose basis changes and
/// re-projects the moments every 3 steps), saving after 4 steps, loading into a fresh optimizer
/// over copies of the parameters and continuing gives bit-identical parameters to never
/// stopping; and the hyper-parameters come back.
#[test]
fn save_load_continue_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    for kind in ALL {
        for projected in [false, true] {
            let ps = params(1);
            let mut a = make(kind, &ps, projected);
            for t in 0..8 {
                step_with(a.as_mut(), &ps, t);
            }
            let qs = params(1);
            let mut b = make(kind, &qs, projected);
            for t in 0..4 {
                step_with(b.as_mut(), &qs, t);
            }
            let lr0 = b.lr();
            b.set_lr(lr0 / 2.0);
            let path = dir.path().join(format!("{kind:?}-{projected}.safetensors"));
            b.save(&path).unwrap();
            let rs: Vec<(String, Tensor)> = qs.iter().map(|(n, t)| (n.clone(), leaf(t))).collect();
            let mut c = make(kind, &rs, projected);
            c.load(&path).unwrap();
            assert_eq!(c.lr(), lr0 / 2.0, "{kind:?}: hyper-parameters come back");
            c.set_lr(lr0);
            let names: Vec<String> = c.state_tensors().into_iter().map(|(n, _)| n).collect();
            assert!(names.contains(&"w.step".to_string()), "{kind:?}: {names:?}");
            if projected {
                assert!(
                    names.contains(&"w.projector.ortho".to_string()),
                    "{names:?}"
                );
            }
            for t in 4..8 {
                step_with(c.as_mut(), &rs, t);
            }
            for ((n, x), (_, y)) in ps.iter().zip(&rs) {
                assert!(
                    x.equal(y),
                    "{kind:?} projected={projected}: '{n}' differs after resume"
                );
            }
            let moved = common::max_abs(&ps[0].1, &params(1)[0].1);
            assert!(
                moved > 1e-3,
                "{kind:?} projected={projected}: barely moved ({moved:e})"
            );
        }
    }
}

/// Guarantee: loading a state whose shapes do not fit errors with the file and tensor names.
#[test]
fn load_rejects_other_shapes_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    for kind in ALL {
        let ps = params(2);
        let mut a = make(kind, &ps, false);
        step_with(a.as_mut(), &ps, 0);
        let path = dir.path().join(format!("{kind:?}.safetensors"));
        a.save(&path).unwrap();
        // Same names, other shapes.
        let other = vec![
            ("w".to_string(), leaf(&randn(&[64, 96], 3))),
            ("b".to_string(), leaf(&randn(&[7], 4))),
        ];
        let mut b = make(kind, &other, false);
        let err = b.load(&path).unwrap_err().to_string();
        assert!(
            err.contains(&format!("{kind:?}.safetensors")) && err.contains("'w."),
            "{kind:?}: {err}"
        );
    }
}

/// Guarantee: accumulating micro-batch gradients with `accumulate_indices`, then stepping with
/// `step_indices` (the last micro-batch still in `.grad`), gives the parameters of summing the
/// gradients and stepping, within 1e-7; with a projector too (the sum is taken in the projected
/// space, which is linear); the gradients are zeroed by the accumulation.
#[test]
fn accumulate_then_step_equals_summed_gradients() {
    for kind in ALL {
        for projected in [false, true] {
            let ps = params(5);
            let qs = params(5);
            let rs = params(5);
            let mut a = make(kind, &ps, projected);
            let mut b = make(kind, &qs, projected);
            // c: the same as a, with the gradients handed over instead of read from `.grad`.
            let mut c = make(kind, &rs, projected);
            for t in 0..4 {
                // With a projector, GaLore computes a refresh step's basis from the first
                // micro-batch, so the micro-batches are multiples of one gradient there (the
                // basis of the sum is then the same); elsewhere they are independent.
                let refresh = projected && t % 3 == 0;
                let micro: Vec<Vec<Tensor>> = (0..3)
                    .map(|k| {
                        if refresh {
                            grads(10 * t).iter().map(|g| g * (k + 1) as f64).collect()
                        } else {
                            grads(10 * t + k)
                        }
                    })
                    .collect();
                // a: accumulate two micro-batches, the third is in .grad at the step.
                for (k, m) in micro.iter().enumerate() {
                    for ((_, p), g) in ps.iter().zip(m) {
                        set_grad(p, g);
                    }
                    if k < 2 {
                        a.accumulate_indices(&[0, 1]).unwrap();
                        let g = ps[0].1.grad();
                        assert_eq!(g.abs().max().double_value(&[]), 0.0, "grad is zeroed");
                    }
                }
                a.step_indices(&[0, 1]).unwrap();
                for m in &micro[..2] {
                    c.accumulate_with_grads(&[0, 1], m.iter().map(|g| g.copy()).collect())
                        .unwrap();
                }
                c.step_with_grads(&[0, 1], micro[2].iter().map(|g| g.copy()).collect())
                    .unwrap();
                assert!(!rs[0].1.grad().defined(), "nothing went into .grad");
                // b: the summed gradient.
                for (i, (_, p)) in qs.iter().enumerate() {
                    let sum = &micro[0][i] + &micro[1][i] + &micro[2][i];
                    set_grad(p, &sum);
                }
                b.step().unwrap();
                for ((n, x), (_, z)) in ps.iter().zip(&rs) {
                    assert_eq!(common::max_abs(x, z), 0.0, "{kind:?} {projected} '{n}'");
                }
                // Projecting each micro-batch and summing differs from projecting the sum by
                // float reassociation only, which Adam's normalisation amplifies a little (and
                // 8-bit state turns into an occasional neighbouring code).
                let tol = match (projected, kind) {
                    (false, _) => 1e-7,
                    (true, Kind::Eight) => 1e-4,
                    (true, _) => 1e-5,
                };
                for ((n, x), (_, y)) in ps.iter().zip(&qs) {
                    let d = common::max_abs(x, y);
                    assert!(
                        d <= tol,
                        "{kind:?} projected={projected} step {t}: '{n}' {d:e} {x} {y}"
                    );
                }
            }
            let moved = common::max_abs(&ps[0].1, &params(5)[0].1);
            assert!(
                moved > 1e-3,
                "{kind:?} projected={projected}: barely moved ({moved:e})"
            );
        }
    }
}

/// Guarantee: stepping a subset leaves the others (and their state) untouched; an index out of
/// range is an error; names come in order.
#[test]
fn step_indices_touches_only_the_subset() {
    for kind in ALL {
        let ps = params(6);
        let mut opt = make(kind, &ps, false);
        assert_eq!(opt.names(), vec!["w", "b"]);
        for ((_, p), g) in ps.iter().zip(grads(0)) {
            set_grad(p, &g);
        }
        let w0 = ps[0].1.detach().copy();
        opt.step_indices(&[1]).unwrap();
        assert!(ps[0].1.equal(&w0), "{kind:?}");
        let names: Vec<String> = opt.state_tensors().into_iter().map(|(n, _)| n).collect();
        assert!(
            names.iter().all(|n| n.starts_with("b.")),
            "{kind:?}: {names:?}"
        );
        assert!(
            opt.step_indices(&[2]).is_err(),
            "{kind:?}: index out of range"
        );
        assert!(opt.state_bytes() > 0);
    }
}

/// Replacing a parameter by a slice of itself slices its moments: the next step of the
/// replaced parameter equals the same columns of a step of the whole one (AdamW is
/// element-wise); a slicer that gives the wrong shape is an error naming the parameter.
#[test]
fn replaced_parameter_keeps_its_sliced_state() {
    use frugal_optim::{AdamW, AdamW8bit, AdamW8bitConfig, AdamWConfig, Optimizer};
    use tch::{Device, Kind, Tensor};
    type Build = Box<dyn Fn(Tensor) -> Box<dyn Optimizer>>;
    let keep = Tensor::from_slice(&[0i64, 2, 5]);
    let slice = |t: &Tensor| Ok(t.index_select(1, &keep));
    let cases: Vec<(&str, Build, f64)> = vec![
        (
            "adamw",
            Box::new(|w| Box::new(AdamW::new(vec![("w".into(), w)], AdamWConfig::default()))),
            1e-7,
        ),
        (
            "adamw8bit",
            Box::new(|w| {
                Box::new(AdamW8bit::new(
                    vec![("w".into(), w)],
                    AdamW8bitConfig {
                        min_8bit_size: 16,
                        ..Default::default()
                    },
                ))
            }),
            // Requantizing in new blocks moves the moments by about a code step.
            5e-5,
        ),
    ];
    for (name, build, tol) in cases {
        tch::manual_seed(0);
        let w = Tensor::randn([64, 6], (Kind::Float, Device::Cpu));
        let whole_w = w.copy().set_requires_grad(true);
        let other_w = w.copy().set_requires_grad(true);
        let mut whole = build(whole_w.shallow_clone());
        let mut other = build(other_w.shallow_clone());
        let grads: Vec<Tensor> = (0..3)
            .map(|_| Tensor::randn([64, 6], (Kind::Float, Device::Cpu)))
            .collect();
        for g in &grads[..2] {
            whole.step_with_grads(&[0], vec![g.copy()]).unwrap();
            other.step_with_grads(&[0], vec![g.copy()]).unwrap();
        }
        let bad = |t: &Tensor| Ok(t.narrow(0, 0, 2));
        let small_bad = tch::no_grad(|| other_w.index_select(1, &keep));
        let err = other
            .replace_parameter("w", small_bad, &bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'w'") && err.contains("shape"),
            "{name}: {err}"
        );

        let small = tch::no_grad(|| whole_w.index_select(1, &keep)).set_requires_grad(true);
        whole
            .replace_parameter("w", small.shallow_clone(), &slice)
            .unwrap();
        whole
            .step_with_grads(&[0], vec![grads[2].index_select(1, &keep)])
            .unwrap();
        // `other` kept the whole parameter (its failed replacement changed nothing): step it.
        other.step_with_grads(&[0], vec![grads[2].copy()]).unwrap();
        let expected = other_w.index_select(1, &keep);
        let diff = (&small - &expected).abs().max().double_value(&[]);
        assert!(diff <= tol, "{name}: replaced step differs by {diff}");
        let moved = (&small - &w.index_select(1, &keep))
            .abs()
            .max()
            .double_value(&[]);
        assert!(
            moved > 1e-3,
            "{name}: the steps must move the weights ({moved})"
        );
    }
}
