//! The kernel registry: `.cu` sources under `kernels/`, embedded at compile time, and the entry
//! points each one defines.

/// One `.cu` file: a family of kernels compiled together into one module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSource {
    /// File name under `kernels/`, also the nvrtc program name.
    pub name: &'static str,
    /// The CUDA C++ text, as embedded (`#include "x.cuh"` of [`HEADERS`] not yet expanded).
    pub source: &'static str,
    /// The `extern "C"` kernels the file defines.
    pub entries: &'static [&'static str],
}

/// Headers under `kernels/` that sources may include by name; nvrtc has no file system, so
/// [`expand_includes`] splices them in.
pub const HEADERS: &[(&str, &str)] = &[("common.cuh", include_str!("../../../kernels/common.cuh"))];

/// `kernels/quant.cu`: NF4, GPTQ int4 and ternary dequantization, and GEMVs on each format.
pub const QUANT: KernelSource = KernelSource {
    name: "quant.cu",
    source: include_str!("../../../kernels/quant.cu"),
    entries: &[
        "dequant_nf4_f32",
        "gemv_nf4_f32",
        "dequant_int4_gptq_f32",
        "dequant_ternary_f32",
        "gemv_int4_gptq_f32",
        "gemv_ternary_f32",
    ],
};

/// `kernels/bitlinear.cu`: BitLinear's RMSNorm fused with int8 activation quantization, and
/// its straight-through backward.
pub const BITLINEAR: KernelSource = KernelSource {
    name: "bitlinear.cu",
    source: include_str!("../../../kernels/bitlinear.cu"),
    entries: &[
        "rmsnorm_quant_f32",
        "rmsnorm_quant_backward_f32",
        "rmsnorm_gain_grad_f32",
    ],
};

/// `kernels/adamw8bit.cu`: the 8-bit block-wise AdamW step.
pub const ADAMW8BIT: KernelSource = KernelSource {
    name: "adamw8bit.cu",
    source: include_str!("../../../kernels/adamw8bit.cu"),
    entries: &["adamw8bit_step_f32"],
};

/// Every kernel source of the crate.
pub const ALL: &[KernelSource] = &[QUANT, BITLINEAR, ADAMW8BIT];

/// Replaces each line `#include "NAME"` whose NAME is in [`HEADERS`] by that header's text (once
/// per header; `#pragma once` lines are dropped). Other lines, system includes among them, stay.
pub fn expand_includes(source: &str) -> String {
    let mut done: Vec<&str> = Vec::new();
    let mut out = String::with_capacity(source.len() + 4096);
    expand_into(source, &mut done, &mut out);
    out
}

fn expand_into(source: &str, done: &mut Vec<&'static str>, out: &mut String) {
    for line in source.lines() {
        let trimmed = line.trim();
        if trimmed == "#pragma once" {
            continue;
        }
        let header = trimmed
            .strip_prefix("#include")
            .map(str::trim)
            .and_then(|rest| rest.strip_prefix('"'))
            .and_then(|rest| rest.split('"').next())
            .and_then(|name| HEADERS.iter().find(|(h, _)| *h == name));
        match header {
            Some((name, text)) => {
                if !done.contains(name) {
                    done.push(name);
                    expand_into(text, done, out);
                }
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
}
