//! Helpers shared by the integration tests.
#![allow(dead_code)]

use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// A JSON array of numbers as f32.
pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// A JSON array of integers as a shape.
pub fn shape(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// A flat JSON array reshaped.
pub fn tensor(v: &Value, shape: &[i64]) -> Tensor {
    Tensor::from_slice(&floats(v)).reshape(shape)
}

/// Sets `p.grad` to `g` (through a backward pass the first time).
pub fn set_grad(p: &Tensor, g: &Tensor) {
    let mut grad = p.grad();
    if grad.defined() {
        grad.copy_(g);
    } else {
        (p * g).sum(Kind::Float).backward();
    }
}

/// A trainable f32 leaf with the values of `t`.
pub fn leaf(t: &Tensor) -> Tensor {
    t.detach().copy().set_requires_grad(true)
}

/// max |a - b|.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Deterministic pseudo-random values of `shape` (seeded), f32, roughly unit variance. No
/// global RNG: tests run in parallel threads and `tch::manual_seed` is process-wide.
pub fn randn(shape: &[i64], seed: i64) -> Tensor {
    let n: i64 = shape.iter().product();
    let i = Tensor::arange(n, (Kind::Double, Device::Cpu));
    let x = (i * 12.9898 + (seed as f64) * 78.233 + 0.5).sin() * 43758.5453;
    let u = &x - x.floor();
    ((u * 2.0 - 1.0) * 3f64.sqrt())
        .to_kind(Kind::Float)
        .reshape(shape)
}
