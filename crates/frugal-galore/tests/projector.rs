//! Behaviour of `GaloreProjector`: refresh schedule, randomized SVD, SVD failures, lazy
//! refresh, moment re-projection, shapes galore-torch cannot handle, state, bad input.

use frugal_galore::{GaloreConfig, GaloreProjector, GradientProjector, ProjType, SvdMethod};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// A Gaussian matrix from `seed` (our own generator: tests run in parallel, and tch's RNG is
/// global).
fn randn(shape: &[i64], seed: u64) -> Tensor {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (((z ^ (z >> 31)) >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    };
    let count: i64 = shape.iter().product();
    let values: Vec<f32> = (0..count)
        .map(|_| ((-2.0 * next().ln()).sqrt() * (2.0 * std::f64::consts::PI * next()).cos()) as f32)
        .collect();
    Tensor::from_slice(&values).reshape(shape)
}

/// Rank-`k` signal with decaying singular values plus `noise`.
fn low_rank_plus_noise(m: i64, n: i64, k: i64, noise: f64, seed: u64) -> Tensor {
    let weights = Tensor::from_slice(&(0..k).map(|i| 10.0f32 / (1 + i) as f32).collect::<Vec<_>>());
    (randn(&[m, k], seed) * weights.unsqueeze(0)).matmul(&randn(&[k, n], seed + 1))
        + randn(&[m, n], seed + 2) * noise
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

fn config(rank: i64, gap: i64, proj_type: ProjType) -> GaloreConfig {
    GaloreConfig {
        rank,
        update_proj_gap: gap,
        proj_type,
        ..GaloreConfig::default()
    }
}

fn basis(p: &GaloreProjector) -> Tensor {
    p.left_basis().or(p.right_basis()).unwrap().copy()
}

#[test]
fn refreshes_at_multiples_of_the_gap_once_per_step() {
    let mut p = GaloreProjector::new(config(4, 5, ProjType::Std)).unwrap();
    let mut refreshed_at = Vec::new();
    for step in 0..=12 {
        let before = p.refresh_count();
        let b0 = p.right_basis().map(Tensor::copy);
        let _low = p.project(&randn(&[20, 12], step as u64), step).unwrap();
        if p.refresh_count() > before {
            refreshed_at.push(step);
            if let Some(b0) = b0 {
                assert!(max_diff(&b0, &basis(&p)) > 1e-3, "step {step}: same basis");
            }
        } else {
            assert!(
                max_diff(&b0.unwrap(), &basis(&p)) == 0.0,
                "step {step}: basis moved"
            );
        }
        // Gradient accumulation: another project at the same step keeps the basis.
        let b1 = basis(&p);
        let _low = p
            .project(&randn(&[20, 12], 1000 + step as u64), step)
            .unwrap();
        assert_eq!(
            max_diff(&b1, &basis(&p)),
            0.0,
            "step {step}: recomputed twice"
        );
    }
    assert_eq!(refreshed_at, vec![0, 5, 10]);
    assert_eq!(p.refresh_count(), 3);
    assert_eq!(p.last_refresh_step(), Some(10));

    // A projector first used at step 3 computes its basis there, then follows the gap.
    let mut p = GaloreProjector::new(config(4, 5, ProjType::Std)).unwrap();
    let mut refreshed_at = Vec::new();
    for step in 3..12 {
        let before = p.refresh_count();
        let _low = p.project(&randn(&[20, 12], step as u64), step).unwrap();
        if p.refresh_count() > before {
            refreshed_at.push(step);
        }
    }
    assert_eq!(refreshed_at, vec![3, 5, 10]);
}

/// Cosines of the principal angles between the column spaces of `a` and `b` (orthonormal).
fn principal_cosines(a: &Tensor, b: &Tensor) -> Tensor {
    let (_u, s, _v) = a
        .transpose(0, 1)
        .matmul(b)
        .to_kind(Kind::Double)
        .svd(true, false);
    s
}

#[test]
fn randomized_svd_finds_the_exact_subspace() {
    let g = low_rank_plus_noise(200, 120, 8, 0.05, 7);
    for proj_type in [ProjType::Left, ProjType::Right] {
        let mut exact = GaloreProjector::new(config(8, 200, proj_type)).unwrap();
        let mut cfg = config(8, 200, proj_type);
        cfg.svd = SvdMethod::randomized();
        let mut fast = GaloreProjector::new(cfg.clone()).unwrap();
        let _ = (exact.project(&g, 0).unwrap(), fast.project(&g, 0).unwrap());
        let (e, f) = match proj_type {
            ProjType::Left => (basis(&exact), basis(&fast)),
            _ => (basis(&exact).transpose(0, 1), basis(&fast).transpose(0, 1)),
        };
        let orth = max_diff(
            &f.transpose(0, 1).matmul(&f),
            &Tensor::eye(8, (Kind::Float, Device::Cpu)),
        );
        assert!(
            orth < 1e-4,
            "{proj_type:?}: randomized basis not orthonormal ({orth})"
        );
        let cos = principal_cosines(&e, &f);
        let worst = cos.min().double_value(&[]);
        assert!(
            worst > 0.999,
            "{proj_type:?}: smallest principal cosine {worst}"
        );
        // The same seed and step give the same basis; another seed another sketch.
        let mut again = GaloreProjector::new(cfg.clone()).unwrap();
        let _ = again.project(&g, 0).unwrap();
        assert_eq!(max_diff(&basis(&again), &basis(&fast)), 0.0);
        cfg.seed = 99;
        let mut other = GaloreProjector::new(cfg).unwrap();
        let _ = other.project(&g, 0).unwrap();
        assert!(max_diff(&basis(&other), &basis(&fast)) > 0.0);
    }
    // Without power iterations or oversampling the noise shows: the test can tell.
    let g = low_rank_plus_noise(200, 120, 8, 2.0, 8);
    let mut cfg = config(8, 200, ProjType::Left);
    let mut exact = GaloreProjector::new(cfg.clone()).unwrap();
    cfg.svd = SvdMethod::Randomized {
        oversampling: 0,
        power_iters: 0,
    };
    let mut crude = GaloreProjector::new(cfg).unwrap();
    let _ = (exact.project(&g, 0).unwrap(), crude.project(&g, 0).unwrap());
    let worst = principal_cosines(&basis(&exact), &basis(&crude))
        .min()
        .double_value(&[]);
    assert!(worst < 0.99, "crude sketch too good: {worst}");
}

#[test]
fn svd_failure_keeps_the_previous_basis_or_errors() {
    let bad = randn(&[16, 10], 3);
    let _ = bad.get(2).get(3).fill_(f64::NAN);
    let inf = randn(&[16, 10], 4);
    let _ = inf.get(0).get(0).fill_(f64::INFINITY);
    for method in [SvdMethod::Exact, SvdMethod::randomized()] {
        // No previous basis: an error that names the tensor and the shape.
        let mut cfg = config(4, 2, ProjType::Std);
        cfg.svd = method;
        let mut p = GaloreProjector::new(cfg.clone())
            .unwrap()
            .with_name("layer.w");
        let err = p.project(&bad, 0).unwrap_err().to_string();
        assert!(err.contains("layer.w") && err.contains("[16, 10]"), "{err}");
        assert!(err.contains("NaN or Inf"), "{err}");

        // With a basis: kept, at each failing refresh, and the projection goes on.
        let mut p = GaloreProjector::new(cfg).unwrap().with_name("layer.w");
        let good = randn(&[16, 10], 5);
        let _ = p.project(&good, 0).unwrap();
        let b0 = basis(&p);
        for (step, g) in [(2, &bad), (4, &inf)] {
            let low = p.project(g, step).unwrap();
            assert_eq!(low.size(), vec![16, 4]);
            assert_eq!(max_diff(&b0, &basis(&p)), 0.0, "{method:?} step {step}");
            assert_eq!(p.last_refresh_step(), Some(step));
        }
        assert_eq!(p.refresh_count(), 1);
        // A good gradient at the next refresh recovers.
        let _ = p.project(&randn(&[16, 10], 6), 6).unwrap();
        assert_eq!(p.refresh_count(), 2);
        assert!(max_diff(&b0, &basis(&p)) > 1e-3);
    }
}

#[test]
fn lazy_refresh_doubles_the_gap_on_a_stationary_gradient() {
    let mut cfg = config(4, 2, ProjType::Std);
    cfg.lazy_refresh = true;
    let signal = low_rank_plus_noise(24, 16, 4, 0.0, 11);
    let mut p = GaloreProjector::new(cfg.clone()).unwrap();
    let mut refreshed_at = Vec::new();
    for step in 0..40 {
        // Stationary: the same subspace, small noise.
        let g = &signal + randn(&[24, 16], 500 + step as u64) * 0.01;
        let before = p.refresh_count();
        let _ = p.project(&g, step).unwrap();
        if p.refresh_count() > before {
            refreshed_at.push(step);
        }
    }
    // Refreshes at 0, 2, ..., 10: five comparisons (2..10) agree, so at 10 the gap becomes 4;
    // 14, 18, 22, 26, 30: five more, the gap becomes 8 at 30; then 38.
    assert_eq!(
        refreshed_at,
        vec![0, 2, 4, 6, 8, 10, 14, 18, 22, 26, 30, 38]
    );
    assert_eq!(p.gap(), 8);

    // A gradient whose subspace changes every step: the gap stays.
    let mut p = GaloreProjector::new(cfg).unwrap();
    for step in 0..40 {
        let _ = p
            .project(&randn(&[24, 16], 900 + step as u64), step)
            .unwrap();
    }
    assert_eq!(p.gap(), 2);
    assert_eq!(p.refresh_count(), 20);

    // Off: never doubles.
    let mut p = GaloreProjector::new(config(4, 2, ProjType::Std)).unwrap();
    for step in 0..40 {
        let _ = p.project(&signal, step).unwrap();
    }
    assert_eq!(p.gap(), 2);
}

#[test]
fn moments_are_reprojected_into_the_new_basis() {
    for (proj_type, shape, low_shape) in [
        (ProjType::Left, [10i64, 14i64], [3i64, 14i64]),
        (ProjType::Right, [14, 10], [14, 3]),
        (ProjType::Full, [12, 9], [3, 3]),
    ] {
        let mut cfg = config(3, 4, proj_type);
        cfg.reproject_moments = true;
        let mut p = GaloreProjector::new(cfg).unwrap();
        let m = randn(&low_shape, 20);
        let v = randn(&low_shape, 21).square();
        let _ = p.project(&randn(&shape, 1), 0).unwrap();
        // The first basis replaces nothing.
        assert!(p.reproject_first_moment(&m).is_none());
        let (l_old, r_old) = (
            p.left_basis().map(Tensor::copy),
            p.right_basis().map(Tensor::copy),
        );
        let _ = p.project(&randn(&shape, 2), 1).unwrap();
        assert!(
            p.reproject_first_moment(&m).is_none(),
            "no change at step 1"
        );
        let _ = p.project(&randn(&shape, 3), 4).unwrap();
        let m1 = p.reproject_first_moment(&m).expect("changed at step 4");
        let v1 = p.reproject_second_moment(&v).expect("changed at step 4");
        let (l_new, r_new) = (
            p.left_basis().map(Tensor::copy),
            p.right_basis().map(Tensor::copy),
        );
        let (mut want_m, mut want_v) = (m.copy(), v.copy());
        if let (Some(lo), Some(ln)) = (&l_old, &l_new) {
            let t = ln.transpose(0, 1).matmul(lo);
            want_m = t.matmul(&want_m);
            want_v = t.square().matmul(&want_v);
        }
        if let (Some(ro), Some(rn)) = (&r_old, &r_new) {
            let t = ro.matmul(&rn.transpose(0, 1));
            want_m = want_m.matmul(&t);
            want_v = want_v.matmul(&t.square());
        }
        assert!(max_diff(&m1, &want_m) < 1e-5, "{proj_type:?}");
        assert!(max_diff(&v1, &want_v) < 1e-5, "{proj_type:?}");
        assert!(v1.min().double_value(&[]) >= 0.0);
        // m' = P_newᵀ (P_old m): back-projecting m with the old basis, then projecting with the
        // new one, gives the same thing (checked through the full-space matrices).
        if proj_type == ProjType::Left {
            let (lo, ln) = (l_old.as_ref().unwrap(), l_new.as_ref().unwrap());
            let full = lo.matmul(&m);
            assert!(max_diff(&ln.transpose(0, 1).matmul(&full), &m1) < 1e-5);
        }
        // Gradient accumulation: another project at step 4 still reports the change.
        let _ = p.project(&randn(&shape, 4), 4).unwrap();
        assert!(p.reproject_first_moment(&m).is_some());
        // A moment of another shape is not reprojected.
        assert!(p.reproject_first_moment(&randn(&[2, 2], 5)).is_none());
        // The next step: no change any more.
        let _ = p.project(&randn(&shape, 6), 5).unwrap();
        assert!(p.reproject_first_moment(&m).is_none());
        assert!(p.reproject_second_moment(&v).is_none());
    }
    // Off: None even when the basis changes.
    let mut p = GaloreProjector::new(config(3, 4, ProjType::Left)).unwrap();
    let _ = p.project(&randn(&[10, 14], 1), 0).unwrap();
    let _ = p.project(&randn(&[10, 14], 2), 4).unwrap();
    assert!(p.reproject_first_moment(&randn(&[3, 14], 3)).is_none());
}

#[test]
fn tensors_of_more_than_two_dims_are_flattened() {
    let g = randn(&[6, 4, 5], 30);
    let mut p = GaloreProjector::new(config(3, 10, ProjType::Std)).unwrap();
    let low = p.project(&g, 0).unwrap();
    assert_eq!(low.size(), vec![3, 20]); // (6, 20) is wide: left
    let back = p.project_back(&low).unwrap();
    assert_eq!(back.size(), vec![6, 4, 5]);
    let mut q = GaloreProjector::new(config(3, 10, ProjType::Std)).unwrap();
    let low2 = q.project(&g.reshape([6, 20]), 0).unwrap();
    let back2 = q.project_back(&low2).unwrap();
    assert_eq!(max_diff(&back.reshape([6, 20]), &back2), 0.0);
    // A conv-like (out, in, kh, kw) weight.
    let g = randn(&[8, 3, 3, 3], 31);
    let mut p = GaloreProjector::new(config(4, 10, ProjType::Right)).unwrap();
    let low = p.project(&g, 0).unwrap();
    assert_eq!(low.size(), vec![8, 4]);
    assert_eq!(p.project_back(&low).unwrap().size(), vec![8, 3, 3, 3]);
}

#[test]
fn rank_is_clamped_where_galore_torch_fails() {
    // reverse_std on a wide matrix with rank >= rows: galore-torch's project_back fails.
    let g = randn(&[5, 12], 40);
    let mut p = GaloreProjector::new(config(8, 10, ProjType::ReverseStd)).unwrap();
    let low = p.project(&g, 0).unwrap();
    assert_eq!(low.size(), vec![5, 5]);
    assert_eq!(p.rank_in_use(), Some(5));
    assert_eq!(p.right_basis().unwrap().size(), vec![5, 12]);
    // The basis spans G's whole row space: back = scale · G.
    let back = p.project_back(&low).unwrap();
    assert!(max_diff(&back, &(&g * 0.25)) < 1e-5);
    // Every side, rank above min(m, n).
    for proj_type in [
        ProjType::Std,
        ProjType::Left,
        ProjType::Right,
        ProjType::Full,
    ] {
        for shape in [[5i64, 12i64], [12, 5]] {
            let g = randn(&shape, 41);
            let mut p = GaloreProjector::new(config(100, 10, proj_type)).unwrap();
            let low = p.project(&g, 0).unwrap();
            assert_eq!(p.rank_in_use(), Some(5), "{proj_type:?} {shape:?}");
            let back = p.project_back(&low).unwrap();
            assert!(
                max_diff(&back, &(&g * 0.25)) < 1e-5,
                "{proj_type:?} {shape:?}"
            );
        }
    }
}

fn run(p: &mut GaloreProjector, steps: std::ops::Range<i64>, seed: u64) -> Vec<Tensor> {
    let signal = low_rank_plus_noise(12, 9, 3, 0.0, 50);
    steps
        .map(|step| {
            let g = &signal + randn(&[12, 9], seed + step as u64) * 0.05;
            let low = p.project(&g, step).unwrap();
            let m = p.reproject_first_moment(&low).unwrap_or(low);
            p.project_back(&m).unwrap()
        })
        .collect()
}

#[test]
fn state_round_trips_bit_exactly() {
    for proj_type in [ProjType::Std, ProjType::Full] {
        let mut cfg = config(3, 2, proj_type);
        cfg.lazy_refresh = true;
        cfg.lazy_window = 2;
        cfg.reproject_moments = true;
        cfg.svd = SvdMethod::randomized();
        let mut a = GaloreProjector::new(cfg.clone()).unwrap();
        let _ = run(&mut a, 0..9, 60);
        assert!(a.gap() > 2, "the lazy refresh moved the gap");
        // Through a safetensors file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.safetensors");
        let state = a.state_tensors("opt.w");
        frugal_core::safetensors_io::save(&path, &state, None).unwrap();
        let loaded: HashMap<String, Tensor> = frugal_core::safetensors_io::load(&path, Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
        let mut b = GaloreProjector::new(cfg).unwrap();
        b.load_state("opt.w", &|k| loaded.get(k).map(Tensor::shallow_clone))
            .unwrap();
        assert_eq!(a.state_bytes(), b.state_bytes());
        let again = b.state_tensors("opt.w");
        assert_eq!(state.len(), again.len());
        for ((ka, ta), (kb, tb)) in state.iter().zip(&again) {
            assert_eq!(ka, kb);
            assert_eq!(ta.kind(), tb.kind(), "{ka}");
            assert!(ta.equal(tb), "{ka}");
        }
        // Same continuation, bit for bit, refreshes and re-projections included.
        let (xa, xb) = (run(&mut a, 8..20, 70), run(&mut b, 8..20, 70));
        for (i, (ya, yb)) in xa.iter().zip(&xb).enumerate() {
            assert!(ya.equal(yb), "{proj_type:?} step {}", 8 + i);
        }
    }
}

#[test]
fn state_tensors_are_named_and_checked() {
    let mut p = GaloreProjector::new(config(4, 10, ProjType::Std)).unwrap();
    assert_eq!(p.state_bytes(), 0);
    let _ = p.project(&randn(&[32, 20], 1), 0).unwrap();
    assert_eq!(p.state_bytes(), 4 * 20 * 4);
    let state: HashMap<String, Tensor> = p.state_tensors("w").into_iter().collect();
    assert_eq!(state["w.ortho"].size(), vec![4, 20]);
    assert_eq!(state["w.gap"].kind(), Kind::Int64);
    assert_eq!(state["w.gap"].dim(), 0);
    assert_eq!(state["w.gap"].int64_value(&[]), 10);

    let mut full = GaloreProjector::new(config(4, 10, ProjType::Full)).unwrap();
    let _ = full.project(&randn(&[32, 20], 1), 0).unwrap();
    let names: Vec<String> = full
        .state_tensors("w")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert!(names.contains(&"w.ortho_left".into()) && names.contains(&"w.ortho_right".into()));

    let load = |drop: &str, replace: Option<(&str, Tensor)>| {
        let mut s: HashMap<String, Tensor> = state
            .iter()
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect();
        s.remove(drop);
        if let Some((k, v)) = replace {
            s.insert(k.to_string(), v);
        }
        let mut q = GaloreProjector::new(config(4, 10, ProjType::Std))
            .unwrap()
            .with_name("w");
        q.load_state("w", &|k| s.get(k).map(Tensor::shallow_clone))
            .map_err(|e| e.to_string())
    };
    assert!(load("", None).is_ok());
    let err = load("w.gap", None).unwrap_err();
    assert!(err.contains("'w.gap'"), "{err}");
    let err = load("w.ortho", None).unwrap_err();
    assert!(err.contains("'w.ortho'"), "{err}");
    let err = load("", Some(("w.ortho", randn(&[5, 20], 1)))).unwrap_err();
    assert!(err.contains("w.ortho") && err.contains("[5, 20]"), "{err}");
    let err = load(
        "",
        Some(("w.gap", Tensor::from_slice(&[1.5f32]).reshape([]))),
    )
    .unwrap_err();
    assert!(err.contains("w.gap") && err.contains("int64"), "{err}");
    let err = load("", Some(("w.gap", Tensor::from_slice(&[0i64]).reshape([])))).unwrap_err();
    assert!(err.contains("w.gap"), "{err}");
    // A fresh projector's state loads into a fresh projector.
    let fresh = GaloreProjector::new(config(4, 10, ProjType::Std)).unwrap();
    let s: HashMap<String, Tensor> = fresh.state_tensors("w").into_iter().collect();
    let mut q = GaloreProjector::new(config(4, 10, ProjType::Std)).unwrap();
    q.load_state("w", &|k| s.get(k).map(Tensor::shallow_clone))
        .unwrap();
    assert!(q.rank_in_use().is_none());
}

#[test]
fn bad_input_is_an_error_naming_it() {
    let err = |r: frugal_core::Result<GaloreProjector>| r.unwrap_err().to_string();
    let e = err(GaloreProjector::new(config(0, 10, ProjType::Std)));
    assert!(e.contains("galore.rank"), "{e}");
    let e = err(GaloreProjector::new(config(4, 0, ProjType::Std)));
    assert!(e.contains("galore.update_proj_gap"), "{e}");
    let e = err(GaloreProjector::new(GaloreConfig {
        scale: f64::NAN,
        ..GaloreConfig::default()
    }));
    assert!(e.contains("galore.scale"), "{e}");
    let e = err(GaloreProjector::new(GaloreConfig {
        svd: SvdMethod::Randomized {
            oversampling: -1,
            power_iters: 2,
        },
        ..GaloreConfig::default()
    }));
    assert!(e.contains("oversampling"), "{e}");

    let mut p = GaloreProjector::new(config(4, 10, ProjType::Std))
        .unwrap()
        .with_name("model.bias");
    let e = p.project(&randn(&[7], 1), 0).unwrap_err().to_string();
    assert!(e.contains("model.bias") && e.contains("[7]"), "{e}");
    let e = p.project(&Tensor::from(1.0f64), 0).unwrap_err().to_string();
    assert!(e.contains("model.bias"), "{e}");
    let e = p.project(&randn(&[0, 4], 1), 0).unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");
    let e = p.project(&randn(&[8, 4], 1), -1).unwrap_err().to_string();
    assert!(e.contains("step"), "{e}");
    let e = p.project_back(&randn(&[8, 4], 1)).unwrap_err().to_string();
    assert!(e.contains("model.bias") && e.contains("before"), "{e}");
    let _ = p.project(&randn(&[8, 6], 1), 0).unwrap();
    let e = p.project_back(&randn(&[8, 5], 1)).unwrap_err().to_string();
    assert!(
        e.contains("model.bias") && e.contains("[8, 4]") && e.contains("[8, 5]"),
        "{e}"
    );
    let e = p.project(&randn(&[8, 7], 1), 1).unwrap_err().to_string();
    assert!(
        e.contains("model.bias") && e.contains("[8, 6]") && e.contains("[8, 7]"),
        "{e}"
    );
}

#[test]
fn config_reads_like_galore_torch() {
    let c: GaloreConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(c, GaloreConfig::default());
    assert_eq!(
        (c.rank, c.update_proj_gap, c.scale, c.proj_type),
        (128, 200, 0.25, ProjType::Std)
    );
    assert_eq!(c.svd, SvdMethod::Exact);
    let c: GaloreConfig = serde_json::from_str(
        r#"{"rank": 8, "proj_type": "reverse_std", "svd": {"randomized": {"power_iters": 1}}}"#,
    )
    .unwrap();
    assert_eq!(c.proj_type, ProjType::ReverseStd);
    assert_eq!(
        c.svd,
        SvdMethod::Randomized {
            oversampling: 8,
            power_iters: 1
        }
    );
    let e = serde_json::from_str::<GaloreConfig>(r#"{"rnak": 8}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rnak"), "{e}");
    let e = serde_json::from_str::<GaloreConfig>(r#"{"svd": {"randomized": {"power": 1}}}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("power"), "{e}");
    assert!(serde_json::from_str::<GaloreConfig>(r#"{"proj_type": "diagonal"}"#).is_err());
    // The JSON written reads back.
    let s = serde_json::to_string(&c).unwrap();
    assert_eq!(serde_json::from_str::<GaloreConfig>(&s).unwrap(), c);
}

/// Guarantee: between refreshes, `project_current` is `project` without its side effects, and
/// `project` of `lift(low)` gives `low` back (orthonormal basis), on both sides and with both
/// sides projected; `refresh_due` says when `project` would compute a new basis.
#[test]
fn project_current_and_lift_invert_between_refreshes() {
    use frugal_galore::{GaloreConfig, GaloreProjector, GradientProjector, ProjType};
    use tch::{Device, Kind, Tensor};
    tch::manual_seed(5);
    for (shape, proj_type) in [
        ([12i64, 20i64], ProjType::Std),
        ([20, 12], ProjType::Std),
        ([12, 20], ProjType::Full),
    ] {
        let config = GaloreConfig {
            rank: 4,
            update_proj_gap: 3,
            proj_type,
            ..GaloreConfig::default()
        };
        let mut p = GaloreProjector::new(config).unwrap().with_name("w");
        let g0 = Tensor::randn(shape, (Kind::Float, Device::Cpu));
        assert!(p.refresh_due(0));
        assert!(p.project_current(&g0).is_none(), "no basis yet");
        let _ = p.project(&g0, 0).unwrap();
        assert!(!p.refresh_due(1) && !p.refresh_due(2) && p.refresh_due(3));
        let g1 = Tensor::randn(shape, (Kind::Float, Device::Cpu));
        let current = p.project_current(&g1).unwrap().unwrap();
        let low = p.project(&g1, 1).unwrap();
        assert_eq!(current.size(), low.size());
        assert!((&current - &low).abs().max().double_value(&[]) < 1e-6);
        let lifted = p.lift(&low).unwrap();
        assert_eq!(lifted.size(), shape.to_vec());
        let again = p.project(&lifted, 1).unwrap();
        let err = (&again - &low).abs().max().double_value(&[]);
        assert!(
            err < 1e-5 * low.abs().max().double_value(&[]),
            "{proj_type:?}: {err}"
        );
        // The lift is not the gradient: the part outside the subspace is gone.
        assert!((&lifted - &g1).abs().max().double_value(&[]) > 1e-2);
        let wrong = Tensor::randn([shape[0] + 1, shape[1]], (Kind::Float, Device::Cpu));
        assert!(p.project_current(&wrong).unwrap().is_err());
    }
}
