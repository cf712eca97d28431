//! Whole-file conversion: quantize the linear weights of a safetensors file (or a Hugging Face
//! model folder) into one of the formats, and back to floats. Used by `frugal quantize` and
//! `frugal dequantize`; usable alone.

use crate::fourbit::{FourBitConfig, FourBitKind};
use crate::layer::QuantizedWeight;
use crate::{QuantError, Result};
use frugal_core::safetensors_io::{self, SafetensorsFile};
use regex::Regex;
use std::path::Path;
use tch::Tensor;

/// A target format with its options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Format {
    /// LLM.int8 per-row absmax (bitsandbytes `Linear8bitLt` layout).
    Int8,
    /// Group-wise asymmetric 4-bit in the GPTQ layout (v2 zeros).
    Int4 {
        /// Input columns per group: 32, 64 or 128.
        group_size: usize,
    },
    /// NF4 or FP4 in bitsandbytes' layout.
    FourBit(FourBitConfig),
    /// BitNet b1.58 ternary, one absmean scale per tensor.
    Ternary,
}

impl Format {
    /// Parses `int8|int4|nf4|fp4|ternary` with its options.
    pub fn parse(
        name: &str,
        block_size: usize,
        group_size: usize,
        double_quant: bool,
    ) -> Result<Self> {
        let four = |kind| {
            Format::FourBit(FourBitConfig {
                kind,
                block_size,
                double_quant,
            })
        };
        Ok(match name {
            "int8" => Format::Int8,
            "int4" => Format::Int4 { group_size },
            "nf4" => four(FourBitKind::Nf4),
            "fp4" => four(FourBitKind::Fp4),
            "ternary" => Format::Ternary,
            other => {
                return Err(QuantError::Option {
                    name: "--format".into(),
                    reason: format!("unknown format '{other}' (int8, int4, nf4, fp4, ternary)"),
                })
            }
        })
    }

    /// The format's name.
    pub fn name(&self) -> &'static str {
        match self {
            Format::Int8 => "int8",
            Format::Int4 { .. } => "int4",
            Format::FourBit(c) => c.kind.name(),
            Format::Ternary => "ternary",
        }
    }
}

impl Format {
    /// The format a Hugging Face `config.json`'s `quantization_config` names (as
    /// [`quantization_config`] writes it: bitsandbytes 4-bit or 8-bit, GPTQ 4-bit, Frugal
    /// ternary); `None` for anything else.
    pub fn from_quantization_config(qc: &serde_json::Value) -> Option<Format> {
        let flag = |k: &str| qc.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
        match qc.get("quant_method")?.as_str()? {
            "bitsandbytes" if flag("load_in_4bit") => {
                let kind = match qc.get("bnb_4bit_quant_type").and_then(|v| v.as_str()) {
                    Some("fp4") => crate::fourbit::FourBitKind::Fp4,
                    _ => crate::fourbit::FourBitKind::Nf4,
                };
                Some(Format::FourBit(FourBitConfig {
                    kind,
                    block_size: 64,
                    double_quant: flag("bnb_4bit_use_double_quant"),
                }))
            }
            "bitsandbytes" if flag("load_in_8bit") => Some(Format::Int8),
            "gptq" if qc.get("bits").and_then(|v| v.as_u64()) == Some(4) => Some(Format::Int4 {
                group_size: qc.get("group_size").and_then(|v| v.as_u64()).unwrap_or(128) as usize,
            }),
            "frugal" if qc.get("format").and_then(|v| v.as_str()) == Some("ternary") => {
                Some(Format::Ternary)
            }
            _ => None,
        }
    }

    /// The format's options as `(name, block_size, group_size, double_quant)`, the arguments
    /// of [`Format::parse`] (defaults where the format has no such option).
    pub fn options(&self) -> (&'static str, usize, usize, bool) {
        match self {
            Format::FourBit(c) => (self.name(), c.block_size, 128, c.double_quant),
            Format::Int4 { group_size } => (self.name(), 64, *group_size, false),
            _ => (self.name(), 64, 128, false),
        }
    }
}

/// Which tensors to quantize: by default the 2-D `*.weight` tensors of linear layers, not
/// embeddings, norms or the output head; `include` / `exclude` regexes refine that.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only names matching this (when set).
    pub include: Option<Regex>,
    /// Never names matching this.
    pub exclude: Option<Regex>,
}

impl Selection {
    /// True when the tensor `name` of `shape` is to be quantized.
    pub fn wants(&self, name: &str, shape: &[i64]) -> bool {
        let default = shape.len() == 2
            && name.ends_with(".weight")
            && ![
                "embed_tokens",
                "lm_head",
                "norm",
                "wte",
                "wpe",
                "embeddings",
            ]
            .iter()
            .any(|s| name.contains(s));
        let included = match &self.include {
            Some(r) => r.is_match(name) && shape.len() == 2 && name.ends_with(".weight"),
            None => default,
        };
        included && !self.exclude.as_ref().is_some_and(|r| r.is_match(name))
    }
}

/// One line of the conversion report.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The tensor (a weight's name).
    pub name: String,
    /// `"int8"`, ..., or the dtype of a tensor left alone.
    pub format: String,
    /// Its shape.
    pub shape: Vec<i64>,
    /// Bytes before.
    pub bytes_before: u64,
    /// Bytes after (all stored parts).
    pub bytes_after: u64,
}

fn nbytes(t: &Tensor) -> u64 {
    frugal_core::memory::tensor_bytes(t)
}

/// Quantizes one weight `name` (2-D, `(out, in)`) into the tensors of `format`.
pub fn quantize_weight(name: &str, w: &Tensor, format: &Format) -> Result<Vec<(String, Tensor)>> {
    let prefix = name.strip_suffix(".weight").unwrap_or(name);
    let q = QuantizedWeight::quantize(w, format).map_err(|e| match e {
        QuantError::Shape { reason, shape, .. } => QuantError::Shape {
            name: name.to_string(),
            shape,
            reason,
        },
        other => other,
    })?;
    Ok(q.to_tensors(prefix))
}

/// Quantizes the selected tensors of safetensors file `input` into `output` (atomically);
/// the others are copied as they are.
pub fn quantize_file(
    input: &Path,
    output: &Path,
    format: &Format,
    sel: &Selection,
) -> Result<Vec<Row>> {
    let f = SafetensorsFile::open(input).map_err(core_err)?;
    let mut out = Vec::new();
    let mut rows = Vec::new();
    for name in f.names() {
        let t = f.tensor(&name, tch::Device::Cpu).map_err(core_err)?;
        let shape = t.size();
        if sel.wants(&name, &shape) && t.is_floating_point() {
            let parts = quantize_weight(&name, &t, format)?;
            let after: u64 = parts.iter().map(|(_, p)| nbytes(p)).sum();
            rows.push(Row {
                name,
                format: format.name().into(),
                shape,
                bytes_before: nbytes(&t),
                bytes_after: after,
            });
            out.extend(parts);
        } else {
            rows.push(Row {
                name: name.clone(),
                format: format!("{:?}", t.kind()).to_lowercase(),
                shape,
                bytes_before: nbytes(&t),
                bytes_after: nbytes(&t),
            });
            out.push((name, t));
        }
    }
    if !rows.iter().any(|r| r.format == format.name()) {
        return Err(QuantError::Inconsistent {
            name: input.display().to_string(),
            reason: "no tensor was selected for quantization (2-D linear weights; see --include)"
                .into(),
        });
    }
    safetensors_io::save(output, &out, None).map_err(core_err)?;
    Ok(rows)
}

fn core_err(e: frugal_core::Error) -> QuantError {
    QuantError::Inconsistent {
        name: "file".into(),
        reason: e.to_string(),
    }
}

/// Every quantized weight of `file`, by module prefix, read and checked (an inconsistent one
/// is an error).
fn quantized_weights(file: &SafetensorsFile) -> Result<Vec<(String, QuantizedWeight)>> {
    let names = file.names();
    let has = |n: &str| names.binary_search_by(|x| x.as_str().cmp(n)).is_ok();
    let mut out = Vec::new();
    for n in &names {
        for suffix in [".weight", ".qweight"] {
            if let Some(p) = n.strip_suffix(suffix) {
                let get = |k: &str| file.tensor(k, tch::Device::Cpu).ok();
                if let Some(q) = QuantizedWeight::read(p, &has, get)? {
                    out.push((p.to_string(), q));
                }
            }
        }
    }
    Ok(out)
}

/// A quantized weight found in a file: module prefix, format description, values, bits per
/// parameter as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// The module prefix (`model.layers.0.mlp.up_proj`).
    pub prefix: String,
    /// Format and options, e.g. `nf4 block 64 double-quant`.
    pub format: String,
    /// Number of weight values.
    pub numel: usize,
    /// Bits per parameter as stored.
    pub bits_per_param: f64,
}

/// Every quantized weight of `file`, read and checked (an inconsistent one is an error).
pub fn describe(file: &SafetensorsFile) -> Result<Vec<Found>> {
    Ok(quantized_weights(file)?
        .into_iter()
        .map(|(prefix, q)| Found {
            prefix,
            format: q.describe(),
            numel: q.numel(),
            bits_per_param: q.bits_per_param(),
        })
        .collect())
}

/// Restores floats: every quantized weight of `input` becomes `PREFIX.weight` (in the dtype its
/// description records, else f32); other tensors are copied. Written atomically to `output`.
pub fn dequantize_file(input: &Path, output: &Path) -> Result<Vec<Row>> {
    let f = SafetensorsFile::open(input).map_err(core_err)?;
    let names = f.names();
    // Module prefixes that hold a quantized weight, and every key that belongs to them.
    let prefixes = quantized_weights(&f)?;
    let owned = |n: &str| {
        prefixes
            .iter()
            .any(|(p, _)| n.starts_with(&format!("{p}.")))
    };
    let mut out = Vec::new();
    let mut rows = Vec::new();
    for (p, q) in &prefixes {
        let shape = q.shape();
        let t = Tensor::from_slice(&q.dequantize())
            .reshape(&shape)
            .to_kind(q.dtype());
        rows.push(Row {
            name: format!("{p}.weight"),
            format: q.family().into(),
            shape,
            bytes_before: q.stored_bytes(),
            bytes_after: nbytes(&t),
        });
        out.push((format!("{p}.weight"), t));
    }
    for n in &names {
        if !owned(n) && !prefixes.iter().any(|(p, _)| n == &format!("{p}.weight")) {
            let t = f.tensor(n, tch::Device::Cpu).map_err(core_err)?;
            rows.push(Row {
                name: n.clone(),
                format: format!("{:?}", t.kind()).to_lowercase(),
                shape: t.size(),
                bytes_before: nbytes(&t),
                bytes_after: nbytes(&t),
            });
            out.push((n.clone(), t));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    safetensors_io::save(output, &out, None).map_err(core_err)?;
    Ok(rows)
}

/// The `quantization_config` that transformers expects in `config.json` for `format`.
pub fn quantization_config(format: &Format) -> serde_json::Value {
    use serde_json::json;
    let bnb = |four: bool, kind: &str, dq: bool| {
        json!({
            "quant_method": "bitsandbytes",
            "load_in_4bit": four,
            "load_in_8bit": !four,
            "bnb_4bit_quant_type": kind,
            "bnb_4bit_use_double_quant": dq,
            "bnb_4bit_compute_dtype": "float32",
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_threshold": 6.0,
            "llm_int8_skip_modules": null,
            "llm_int8_has_fp16_weight": false,
            "llm_int8_enable_fp32_cpu_offload": false,
        })
    };
    match format {
        Format::Int8 => bnb(false, "fp4", false),
        Format::FourBit(c) => bnb(true, c.kind.name(), c.double_quant),
        Format::Int4 { group_size } => json!({
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group_size,
            "desc_act": false,
            "sym": false,
            "true_sequential": true,
            "format": "gptq_v2",
            "checkpoint_format": "gptq_v2",
        }),
        Format::Ternary => json!({"quant_method": "frugal", "format": "ternary"}),
    }
}
