//! The projector against galore-torch's `GaLoreProjector` (fixtures written by
//! `tests/fixtures/gen_galore.py`).
//!
//! `back` (= scale · P Pᵀ G and its variants) does not depend on the signs of the singular
//! vectors, so it is compared directly. `ortho` and `low` do: they are compared up to one sign
//! per basis vector, and then exactly, since we call the same libtorch (MKL's LAPACK) on the same
//! float32 input, which must give the same vectors, signs included.

use frugal_core::safetensors_io::SafetensorsFile;
use frugal_galore::{GaloreConfig, GaloreProjector, GradientProjector, ProjType};
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> SafetensorsFile {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    SafetensorsFile::open(&path).unwrap()
}

fn get(f: &SafetensorsFile, name: &str) -> Tensor {
    f.tensor(name, Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

fn proj_type(s: &str) -> ProjType {
    serde_json::from_value(serde_json::Value::String(s.to_string())).unwrap()
}

/// Signs (±1) that turn the vectors of `ours` into those of `theirs`, along `dim` (0: rows are
/// the vectors, 1: columns are).
fn signs(ours: &Tensor, theirs: &Tensor, dim: i64) -> Tensor {
    let other = 1 - dim;
    (ours * theirs)
        .sum_dim_intlist([other].as_slice(), true, Kind::Float)
        .sign()
}

#[test]
fn projector_matches_galore_torch() {
    let f = fixture("projector.safetensors");
    let meta: serde_json::Value = serde_json::from_str(&f.metadata()["meta"]).unwrap();
    let cases = meta["cases"].as_array().unwrap();
    assert!(cases.len() >= 17, "{} cases", cases.len());
    for case in cases {
        let name = case["case"].as_str().unwrap();
        let bf16 = case["dtype"] == "bfloat16";
        // LAPACK's results differ by a few 1e-5 between CPUs (bases of nearly equal singular
        // values most).
        let tol = if bf16 { 2e-2 } else { 1e-4 };
        let config = GaloreConfig {
            rank: case["rank"].as_i64().unwrap(),
            scale: case["scale"].as_f64().unwrap(),
            proj_type: proj_type(case["proj_type"].as_str().unwrap()),
            ..GaloreConfig::default()
        };
        let mut p = GaloreProjector::new(config).unwrap().with_name(name);
        let grad = get(&f, &format!("{name}.grad"));
        let low = p.project(&grad, 0).unwrap();
        let back = p.project_back(&low).unwrap();
        assert_eq!(back.kind(), grad.kind(), "{name}");
        let d = max_diff(&back, &get(&f, &format!("{name}.back")));
        assert!(d <= tol, "{name}: back differs by {d}");

        let their_low = get(&f, &format!("{name}.low"));
        assert_eq!(low.size(), their_low.size(), "{name}");
        // Up to sign first, then exactly.
        let (left, right) = (p.left_basis(), p.right_basis());
        let mut low_fixed = low.to_kind(Kind::Float);
        if let Some(l) = left {
            let key = if right.is_some() {
                "ortho_left"
            } else {
                "ortho"
            };
            let theirs = get(&f, &format!("{name}.{key}")).to_kind(Kind::Float);
            let s = signs(&l.to_kind(Kind::Float), &theirs, 1); // (1, r)
            let d = max_diff(&(l.to_kind(Kind::Float) * &s), &theirs);
            assert!(d <= tol, "{name}: left basis differs up to sign by {d}");
            low_fixed *= s.transpose(0, 1);
            assert!(
                max_diff(l, &get(&f, &format!("{name}.{key}"))) <= tol,
                "{name}: signs"
            );
        }
        if let Some(r) = right {
            let key = if left.is_some() {
                "ortho_right"
            } else {
                "ortho"
            };
            let theirs = get(&f, &format!("{name}.{key}")).to_kind(Kind::Float);
            let s = signs(&r.to_kind(Kind::Float), &theirs, 0); // (r, 1)
            let d = max_diff(&(r.to_kind(Kind::Float) * &s), &theirs);
            assert!(d <= tol, "{name}: right basis differs up to sign by {d}");
            low_fixed *= s.transpose(0, 1);
            assert!(
                max_diff(r, &get(&f, &format!("{name}.{key}"))) <= tol,
                "{name}: signs"
            );
        }
        let d = max_diff(&low_fixed, &their_low);
        assert!(d <= tol, "{name}: low differs up to sign by {d}");
        let d = max_diff(&low, &their_low);
        assert!(d <= tol, "{name}: low differs by {d}");
    }
}

/// The bases galore-torch's GaLoreAdamW used on the optimizer fixture (refreshes at steps 0,
/// 10 and 20 of 30; signs fixed by `gen_galore.py` as this projector fixes them) are the ones
/// this projector computes from the same gradients, within what LAPACK varies across CPUs.
#[test]
fn optimizer_fixture_bases_match() {
    let grads = fixture("optim_grads.safetensors");
    let adamw = fixture("optim_adamw.safetensors");
    for w in ["w1", "w2"] {
        let g = get(&grads, &format!("grads.{w}")).to_kind(Kind::Float);
        let config = GaloreConfig {
            rank: 8,
            update_proj_gap: 10,
            scale: 0.25,
            ..GaloreConfig::default()
        };
        let mut p = GaloreProjector::new(config).unwrap().with_name(w);
        for step in 0..30 {
            let _low = p.project(&g.get(step), step).unwrap();
            if step % 10 == 0 {
                let ours = p.left_basis().or(p.right_basis()).unwrap();
                let theirs = get(&adamw, &format!("ortho{step}.{w}"));
                let d = max_diff(ours, &theirs);
                assert!(d <= 1e-4, "{w} step {step}: basis differs by {d}");
            }
        }
        assert_eq!(p.refresh_count(), 3);
    }
}

/// The fixture is usable as frugal-optim will use it: galore-torch's GaLoreAdamW written out
/// over this projector (REFERENCE.md's update rule) follows the stored trajectory.
#[test]
fn adamw_trajectory_over_the_projector_matches() {
    let grads = fixture("optim_grads.safetensors");
    let want = fixture("optim_adamw.safetensors");
    let meta: serde_json::Value = serde_json::from_str(&want.metadata()["meta"]).unwrap();
    let lr = meta["lr"].as_f64().unwrap();
    let (b1, b2) = (
        meta["betas"][0].as_f64().unwrap(),
        meta["betas"][1].as_f64().unwrap(),
    );
    let (eps, wd) = (
        meta["eps"].as_f64().unwrap(),
        meta["weight_decay"].as_f64().unwrap(),
    );
    let galore: GaloreConfig = serde_json::from_value(meta["galore"].clone()).unwrap();
    for name in ["w1", "b", "w2"] {
        let g = get(&grads, &format!("grads.{name}")).to_kind(Kind::Float);
        let mut p = get(&grads, &format!("init.{name}"));
        let mut projector = (name != "b").then(|| GaloreProjector::new(galore.clone()).unwrap());
        let (mut m, mut v): (Option<Tensor>, Option<Tensor>) = (None, None);
        let mut compared = 0;
        for step in 0..30i64 {
            let mut grad = g.get(step);
            if let Some(pr) = projector.as_mut() {
                grad = pr.project(&grad, step).unwrap();
            }
            let m1 = m.get_or_insert_with(|| grad.zeros_like());
            let _ = m1.g_mul_scalar_(b1).g_add_(&(&grad * (1.0 - b1)));
            let v1 = v.get_or_insert_with(|| grad.zeros_like());
            let _ = v1.g_mul_scalar_(b2).g_add_(&(&grad * &grad * (1.0 - b2)));
            let t = (step + 1) as i32;
            let step_size = lr * (1.0 - b2.powi(t)).sqrt() / (1.0 - b1.powi(t));
            let mut norm = &*m1 / (v1.sqrt() + eps);
            if let Some(pr) = projector.as_ref() {
                norm = pr.project_back(&norm).unwrap();
            }
            p -= norm * step_size;
            p = &p - &p * (lr * wd);
            let key = format!("after{}.{name}", step + 1);
            if want.names().contains(&key) {
                let d = max_diff(&p, &get(&want, &key));
                assert!(d < 1e-5, "{key}: differs by {d}");
                compared += 1;
            }
        }
        assert_eq!(compared, 6, "{name}");
    }
}
