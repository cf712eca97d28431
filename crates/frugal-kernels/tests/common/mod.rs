//! Helpers shared by the kernel tests.
#![allow(dead_code)]

use tch::{Device, Tensor};

/// A tensor's values, flattened, as f32 on the host.
pub fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.reshape([-1]).to_device(Device::Cpu)).expect("f32 tensor")
}

/// The largest element-wise difference of two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
