//! Shared helpers of frugal-models' integration tests.

#![allow(dead_code)]

use frugal_core::safetensors_io::{self, SafetensorsFile};
use frugal_models::llama::Llama;
use std::path::Path;
use tch::{Device, Tensor};

/// The weights of safetensors file `src` with every quantized layer of `model` replaced by its
/// dequantized values, written to `out`: the dense model the quantized one must equal.
pub fn dequantized_copy(src: &Path, model: &Llama, out: &Path) {
    let file = SafetensorsFile::open(src).unwrap();
    let mut tensors: Vec<(String, Tensor)> = file
        .names()
        .into_iter()
        .map(|n| {
            let t = file.tensor(&n, Device::Cpu).unwrap();
            (n, t)
        })
        .collect();
    for (name, layer) in model.linears() {
        let q = layer.quantized().expect("quantized layer");
        let key = format!("{name}.weight");
        let slot = tensors.iter_mut().find(|(n, _)| *n == key).unwrap();
        slot.1 = q.dequantize();
    }
    safetensors_io::save(out, &tensors, None).unwrap();
}
