//! BitLinear against the formulas of the MatMul-free LM's paper and reference code (fixtures
//! from `fixtures/gen_bitlinear.py`): output, the straight-through gradients with respect to the
//! input, the latent weight and the norm gain, and the int8 / ternary parts themselves.

use frugal_core::safetensors_io::SafetensorsFile;
use frugal_models::linear::{self, activation_quant, LinearKind};
use std::path::Path;
use tch::{nn::VarStore, Device, Kind, Tensor};

fn fixture(name: &str) -> Tensor {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bitlinear.safetensors");
    SafetensorsFile::open(&path)
        .unwrap()
        .tensor(name, Device::Cpu)
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Guarantee: BitLinear's output and its gradients (input, latent weight, norm gain) equal the
/// reference formulas' within 1e-5, and its int8 activations and ternary weight are the
/// reference's exactly.
#[test]
fn bitlinear_matches_the_reference_formulas() {
    let vs = VarStore::new(Device::Cpu);
    let layer = linear::build(
        &vs.root().sub("proj"),
        48,
        24,
        &LinearKind::BitLinear { eps: 1e-8 },
        Kind::Float,
    )
    .unwrap();
    let names: Vec<String> = {
        let mut v: Vec<String> = vs.variables().keys().cloned().collect();
        v.sort();
        v
    };
    assert_eq!(names, vec!["proj.norm.weight", "proj.weight"]);
    tch::no_grad(|| {
        vs.variables()["proj.weight"]
            .shallow_clone()
            .copy_(&fixture("weight"));
        vs.variables()["proj.norm.weight"]
            .shallow_clone()
            .copy_(&fixture("norm"));
    });
    let x = fixture("x").set_requires_grad(true);
    let y = layer.forward(&x);
    assert!(
        max_diff(&y, &fixture("y")) < 1e-5,
        "{}",
        max_diff(&y, &fixture("y"))
    );
    (&y * fixture("upstream")).sum(Kind::Float).backward();
    for (got, want) in [
        (x.grad(), "grad_x"),
        (vs.variables()["proj.weight"].grad(), "grad_weight"),
        (vs.variables()["proj.norm.weight"].grad(), "grad_norm"),
    ] {
        let d = max_diff(&got, &fixture(want));
        assert!(d < 1e-5, "{want}: {d}");
    }

    // The quantized parts: the same integers.
    let bit = tch::no_grad(|| {
        let w = &vs.variables()["proj.weight"];
        let (q, s) = linear::weight_quant(w);
        (q, s)
    });
    assert!(bit.0.to_kind(Kind::Int8).equal(&fixture("w_ternary")));
    assert!(max_diff(&bit.1.reshape([1]), &fixture("w_scale")) < 1e-7);
    let xn = tch::no_grad(|| {
        let x = fixture("x");
        let var = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        x * (var + 1e-8).rsqrt() * fixture("norm")
    });
    let (q, scale) = activation_quant(&xn);
    assert!(q.to_kind(Kind::Int8).equal(&fixture("x_int8")));
    assert!(max_diff(&scale.squeeze_dim(-1), &fixture("x_scale")) < 1e-3);
}

/// Guarantee: a bad epsilon is a config error naming the key.
#[test]
fn bad_epsilon_is_named() {
    let err = LinearKind::BitLinear { eps: 0.0 }
        .validate()
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.linear.eps"), "{err}");
}
