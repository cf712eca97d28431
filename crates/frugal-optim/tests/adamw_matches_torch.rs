//! AdamW against `torch.optim.AdamW` (fixture from `fixtures/gen_adamw.py`), its state round
//! trip, and stepping a subset of parameters.

use frugal_optim::{clip_grad_norm, AdamW, AdamWConfig};
use serde_json::Value;
use tch::{Kind, Tensor};

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn tensor(v: &Value, shape: &Value) -> Tensor {
    let shape: Vec<i64> = shape
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    Tensor::from_slice(&floats(v)).reshape(shape)
}

fn fixture() -> Value {
    let text = include_str!("fixtures/adamw_20_steps.json");
    serde_json::from_str(text).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn set_grad(p: &Tensor, g: &Tensor) {
    let mut grad = p.grad();
    if grad.defined() {
        grad.copy_(g);
    } else {
        // First step: make a grad through a backward pass of <p, g>.
        (p * g).sum(Kind::Float).backward();
    }
}

/// Guarantee: 20 steps of our AdamW give the parameters torch.optim.AdamW gives, within 1e-6,
/// with decoupled weight decay on the 2-D tensor only.
#[test]
fn twenty_steps_match_torch_within_1e_6() {
    let fx = fixture();
    let c = &fx["config"];
    let config = AdamWConfig {
        lr: c["lr"].as_f64().unwrap(),
        beta1: c["beta1"].as_f64().unwrap(),
        beta2: c["beta2"].as_f64().unwrap(),
        eps: c["eps"].as_f64().unwrap(),
        weight_decay: c["weight_decay"].as_f64().unwrap(),
        ..Default::default()
    };
    let w = tensor(&fx["w0"], &fx["w_shape"]).set_requires_grad(true);
    let b = tensor(&fx["b0"], &fx["b_shape"]).set_requires_grad(true);
    let mut opt = AdamW::new(
        vec![
            ("w".into(), w.shallow_clone()),
            ("b".into(), b.shallow_clone()),
        ],
        config,
    );
    let mut worst: f64 = 0.0;
    for (t, s) in fx["steps"].as_array().unwrap().iter().enumerate() {
        set_grad(&w, &tensor(&s["grad_w"], &fx["w_shape"]));
        set_grad(&b, &tensor(&s["grad_b"], &fx["b_shape"]));
        opt.step().unwrap();
        let dw = max_abs_diff(&w, &tensor(&s["w"], &fx["w_shape"]));
        let db = max_abs_diff(&b, &tensor(&s["b"], &fx["b_shape"]));
        worst = worst.max(dw).max(db);
        assert!(
            dw <= 1e-6 && db <= 1e-6,
            "step {}: |dw| {dw:e}, |db| {db:e}",
            t + 1
        );
    }
    // The parameters moved far more than the tolerance, so the comparison means something.
    let moved = max_abs_diff(&w, &tensor(&fx["w0"], &fx["w_shape"]));
    assert!(moved > 1e-2, "parameters barely moved ({moved})");
    eprintln!("worst difference to torch over 20 steps: {worst:e}");
}

/// Guarantee: saving and loading the state, then stepping, is bit-identical to never stopping.
#[test]
fn state_round_trip_resumes_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let make = || {
        Tensor::arange(12, (Kind::Float, tch::Device::Cpu))
            .reshape([3, 4])
            .set_requires_grad(true)
    };
    let grads: Vec<Tensor> = (0..6)
        .map(|i| {
            Tensor::full(
                [3, 4],
                (i as f64 - 2.5) * 0.3,
                (Kind::Float, tch::Device::Cpu),
            )
        })
        .collect();
    let config = AdamWConfig {
        weight_decay: 0.05,
        ..Default::default()
    };

    let a = make();
    let mut opt_a = AdamW::new(vec![("a".into(), a.shallow_clone())], config);
    for g in &grads {
        set_grad(&a, g);
        opt_a.step().unwrap();
    }

    let b = make();
    let mut opt_b = AdamW::new(vec![("a".into(), b.shallow_clone())], config);
    for g in &grads[..3] {
        set_grad(&b, g);
        opt_b.step().unwrap();
    }
    let path = dir.path().join("optimizer.safetensors");
    opt_b.save(&path).unwrap();
    let c = b.detach().copy().set_requires_grad(true);
    let mut opt_c = AdamW::new(
        vec![("a".into(), c.shallow_clone())],
        AdamWConfig::default(),
    );
    opt_c.load(&path).unwrap();
    assert_eq!(
        opt_c.config, config,
        "hyper-parameters come back with the state"
    );
    for g in &grads[3..] {
        set_grad(&c, g);
        opt_c.step().unwrap();
    }
    assert!(
        a.equal(&c),
        "resumed parameters differ from uninterrupted ones"
    );
}

/// Guarantee: loading a state whose shapes do not match names the file and the tensor.
#[test]
fn load_rejects_other_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");
    let p = Tensor::zeros([2, 2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let mut opt = AdamW::new(
        vec![("p".into(), p.shallow_clone())],
        AdamWConfig::default(),
    );
    set_grad(&p, &Tensor::ones([2, 2], (Kind::Float, tch::Device::Cpu)));
    opt.step().unwrap();
    opt.save(&path).unwrap();
    let q = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let mut other = AdamW::new(vec![("p".into(), q)], AdamWConfig::default());
    let err = other.load(&path).unwrap_err().to_string();
    assert!(
        err.contains("optimizer.safetensors") && err.contains("p.exp_avg"),
        "{err}"
    );
}

/// Guarantee: stepping a subset leaves the other parameters and their step counts untouched.
#[test]
fn step_indices_touches_only_the_subset() {
    let x = Tensor::ones([2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let y = Tensor::ones([2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let mut opt = AdamW::new(
        vec![
            ("x".into(), x.shallow_clone()),
            ("y".into(), y.shallow_clone()),
        ],
        AdamWConfig::default(),
    );
    (&x + &y).sum(Kind::Float).backward();
    opt.step_indices(&[1]).unwrap();
    assert!(x.equal(&Tensor::ones([2], (Kind::Float, tch::Device::Cpu))));
    assert!(!y.equal(&Tensor::ones([2], (Kind::Float, tch::Device::Cpu))));
    let names: Vec<String> = opt.state_tensors().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, vec!["y.exp_avg", "y.exp_avg_sq", "y.step"]);
}

/// Guarantee: clipping scales gradients to the global norm like torch's clip_grad_norm_.
#[test]
fn clip_grad_norm_scales_to_max_norm() {
    let x = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let y = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    ((&x * Tensor::from_slice(&[3.0f32, 0.0])).sum(Kind::Float) + (&y * 4.0).sum(Kind::Float))
        .backward();
    let norm = clip_grad_norm(&[x.shallow_clone(), y.shallow_clone()], 1.0);
    assert!((norm - 5.0).abs() < 1e-6);
    let expect = 3.0 / (5.0 + 1e-6);
    assert!((x.grad().double_value(&[0]) - expect).abs() < 1e-6);
    let norm2 = clip_grad_norm(&[x.shallow_clone(), y.shallow_clone()], 10.0);
    assert!(
        (norm2 - 1.0).abs() < 1e-5,
        "already below max: untouched ({norm2})"
    );
}
