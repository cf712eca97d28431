//! The Hugging Face AdamW variant against galore-torch's AdamW and Adafactor against
//! `transformers.optimization.Adafactor` (fixtures from `fixtures/gen_optim.py`).

mod common;

use common::{leaf, set_grad, shape, tensor};
use frugal_optim::{Adafactor, AdafactorConfig, AdamW, AdamWConfig, AdamWVariant, Optimizer};
use serde_json::Value;
use tch::Tensor;

fn load(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

/// Runs `opt` over the fixture's gradients and compares the parameters after every step;
/// returns the worst relative difference (max |a - b| / max |b| per tensor) and how far the
/// parameters moved (relative).
fn compare(
    fx: &Value,
    names: &[&str],
    params: &[Tensor],
    opt: &mut dyn Optimizer,
    steps: &Value,
    tol_rel: f64,
) -> (f64, f64) {
    let shapes: Vec<Vec<i64>> = names.iter().map(|n| shape(&fx["shapes"][n])).collect();
    let mut worst: f64 = 0.0;
    for (t, g) in fx["grads"].as_array().unwrap().iter().enumerate() {
        for ((n, p), s) in names.iter().zip(params).zip(&shapes) {
            set_grad(p, &tensor(&g[n], s));
        }
        opt.step().unwrap();
        for ((n, p), s) in names.iter().zip(params).zip(&shapes) {
            let want = tensor(&steps[t][n], s);
            let scale = want.abs().max().double_value(&[]);
            let d = common::max_abs(p, &want) / scale;
            worst = worst.max(d);
            assert!(
                d <= tol_rel,
                "step {}, {n}: relative difference {d:e}",
                t + 1
            );
        }
    }
    let mut moved: f64 = 0.0;
    for ((n, p), s) in names.iter().zip(params).zip(&shapes) {
        let init = tensor(&fx["init"][n], s);
        moved = moved.max(common::max_abs(p, &init) / init.abs().max().double_value(&[]));
    }
    (worst, moved)
}

/// Guarantee: 20 steps of the Hf AdamW variant (decay after the update, eps on the raw root)
/// give galore-torch's AdamW parameters within 1e-6.
#[test]
fn hf_adamw_matches_galore_torch_within_1e_6() {
    let fx = load(include_str!("fixtures/adamw_hf_20_steps.json"));
    let c = &fx["config"];
    let config = AdamWConfig {
        lr: c["lr"].as_f64().unwrap(),
        beta1: c["beta1"].as_f64().unwrap(),
        beta2: c["beta2"].as_f64().unwrap(),
        eps: c["eps"].as_f64().unwrap(),
        weight_decay: c["weight_decay"].as_f64().unwrap(),
        variant: AdamWVariant::Hf,
    };
    let names = ["w", "b"];
    let params: Vec<Tensor> = names
        .iter()
        .map(|n| leaf(&tensor(&fx["init"][n], &shape(&fx["shapes"][n]))))
        .collect();
    let mut opt = AdamW::new(
        names
            .iter()
            .map(|n| n.to_string())
            .zip(params.iter().map(|p| p.shallow_clone()))
            .collect(),
        config,
    );
    // Absolute 1e-6 on parameters of magnitude ~1: the relative bound below is the same here.
    let (worst, moved) = compare(&fx, &names, &params, &mut opt, &fx["params"], 1e-6);
    assert!(moved > 1e-2, "parameters barely moved ({moved})");
    eprintln!("hf adamw: worst relative difference {worst:e}");

    // The torch variant differs measurably on the same data, so the test can tell them apart.
    let params2: Vec<Tensor> = names
        .iter()
        .map(|n| leaf(&tensor(&fx["init"][n], &shape(&fx["shapes"][n]))))
        .collect();
    let mut torch = AdamW::new(
        names
            .iter()
            .map(|n| n.to_string())
            .zip(params2.iter().map(|p| p.shallow_clone()))
            .collect(),
        AdamWConfig {
            variant: AdamWVariant::Torch,
            ..config
        },
    );
    for g in fx["grads"].as_array().unwrap() {
        for (n, p) in names.iter().zip(&params2) {
            set_grad(p, &tensor(&g[n], &shape(&fx["shapes"][n])));
        }
        torch.step().unwrap();
    }
    let d = common::max_abs(&params2[0], &params[0]);
    assert!(d > 1e-6, "torch and hf variants agree ({d:e})");
}

/// Guarantee: Adafactor gives transformers' parameters within 1e-6 (relative) over 20 steps,
/// for factored 2-D and 3-D parameters and an unfactored 1-D one, with and without
/// scale_parameter, with beta1, with relative_step + warmup_init, and with weight decay.
#[test]
fn adafactor_matches_transformers_within_1e_6() {
    let fx = load(include_str!("fixtures/adafactor_20_steps.json"));
    let names = ["w", "t", "b"];
    for (k, run) in fx["runs"].as_array().unwrap().iter().enumerate() {
        let c = &run["config"];
        let config = AdafactorConfig {
            lr: c["lr"].as_f64().unwrap_or(0.0),
            beta1: c["beta1"].as_f64(),
            weight_decay: c["weight_decay"].as_f64().unwrap(),
            scale_parameter: c["scale_parameter"].as_bool().unwrap(),
            relative_step: c["relative_step"].as_bool().unwrap(),
            warmup_init: c["warmup_init"].as_bool().unwrap(),
            clip_threshold: c["clip_threshold"].as_f64().unwrap(),
            ..Default::default()
        };
        let params: Vec<Tensor> = names
            .iter()
            .map(|n| leaf(&tensor(&fx["init"][n], &shape(&fx["shapes"][n]))))
            .collect();
        let mut opt = Adafactor::new(
            names
                .iter()
                .map(|n| n.to_string())
                .zip(params.iter().map(|p| p.shallow_clone()))
                .collect(),
            config,
        )
        .unwrap();
        let (worst, moved) = compare(&fx, &names, &params, &mut opt, &run["params"], 1e-6);
        // warmup_init's step sizes are 1e-6 t: that run moves least, still 100x the tolerance.
        assert!(moved > 1e-4, "run {k}: parameters barely moved ({moved})");
        eprintln!("adafactor run {k}: worst relative difference {worst:e}, moved {moved:e}");
    }
}

/// Guarantee: an inconsistent Adafactor configuration is an error, not a panic.
#[test]
fn adafactor_rejects_warmup_without_relative_step() {
    let cfg = AdafactorConfig {
        warmup_init: true,
        ..Default::default()
    };
    let err = Adafactor::new(vec![], cfg).unwrap_err().to_string();
    assert!(err.contains("warmup_init"), "{err}");
}
