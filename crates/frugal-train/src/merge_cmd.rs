//! `frugal merge --base DIR --adapter DIR --out DIR [--format safetensors|int4]`: folds an
//! adapter into its base and writes a Hugging Face model folder.
//!
//! - `safetensors`: every adapted layer becomes `W + s B A` (DoRA: scaled to its magnitude),
//!   computed in f32 from the base weight (dequantized first for a quantized base) and stored
//!   in the base's float dtype; the folder is an ordinary dense model.
//! - `int4` (QA-LoRA adapters): every adapted layer stays int4 with the same codes and scales,
//!   the adapter folded into its zero points, which become fractional (Frugal's float-zero
//!   GPTQ variant, `docs/formats.md`); the merged model computes what the base and adapter
//!   computed, without loss.

use crate::config::Config;
use crate::quantize_cmd::{copy_side_files, edit_config};
use crate::run;
use frugal_adapters::peft;
use frugal_core::memory::human_bytes;
use frugal_core::safetensors_io::{self, SafetensorsFile};
use frugal_core::{atomic, Error, Result};
use frugal_models::llama::LlamaConfig;
use frugal_models::LinearKind;
use frugal_quant::layer::QuantizedWeight;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// What `frugal merge` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeFormat {
    /// Dense weights in the base's float dtype.
    Safetensors,
    /// int4 weights with float zero points (QA-LoRA).
    Int4,
}

impl MergeFormat {
    /// Parses `--format`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "safetensors" => Ok(Self::Safetensors),
            "int4" => Ok(Self::Int4),
            other => Err(Error::Msg(format!(
                "--format {other}: expected safetensors or int4"
            ))),
        }
    }
}

/// What the merge did.
#[derive(Debug)]
pub struct MergeReport {
    /// Layers whose adapter was folded in.
    pub merged_layers: usize,
    /// Bytes of the written `model.safetensors`.
    pub bytes: u64,
}

/// The base model of a merge, with the adapter loaded: its layers are built as the adapter was
/// trained (an int4 base for a QA-LoRA adapter, the stored quantization for a quantized base
/// folder).
fn load(base: &Path, adapter: &Path) -> Result<(run::Model, peft::AdapterFile)> {
    let cfg_path = base.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let shape = LlamaConfig::from_hf_file(&cfg_path)?;
    let file = peft::read(adapter)?;
    file.without_modules()?;
    let hf: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Msg(format!("{}: {e}", cfg_path.display())))?;
    let mut cfg = Config::default();
    cfg.model.linear = crate::run::stored_linear_kind(&hf).unwrap_or(LinearKind::Dense);
    if file.config.pool > 1 {
        let want = LinearKind::Quantized {
            format: "int4".into(),
            block_size: 64,
            group_size: file.config.pool as usize,
            double_quant: false,
        };
        match &cfg.model.linear {
            LinearKind::Dense => cfg.model.linear = want,
            k if *k == want => {}
            k => {
                return Err(Error::Msg(format!(
                    "{}: a QA-LoRA adapter of group size {} needs an int4 base of that group \
                     size (or a dense one to quantize), the base is {k:?}",
                    adapter.display(),
                    file.config.pool
                )))
            }
        }
    }
    let weights = safetensors_io::model_weights(base)
        .ok_or_else(|| Error::Msg(format!("{}: no model.safetensors", base.display())))?;
    let shape = frugal_models::decoder::DecoderConfig::Llama(shape);
    let mut m = run::model(&cfg.model_build(), &shape, tch::Device::Cpu, Some(&weights))?;
    frugal_models::adapted::load_adapter(&m.vs, m.net.linears_mut(), "default", &file)?;
    m.adapter = Some(file.config.clone());
    Ok((m, file))
}

/// The merged model's tensors, sorted by name, floats in `dtype`.
fn merged_tensors(
    m: &run::Model,
    format: MergeFormat,
    dtype: Kind,
) -> Result<(Vec<(String, Tensor)>, usize)> {
    let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, t) in frugal_models::weights::named_variables(&m.vs) {
        if !frugal_models::adapted::is_adapter_variable(&name) {
            out.insert(name, t.detach().to_kind(dtype));
        }
    }
    let mut merged = 0;
    for (name, layer) in m.net.linears() {
        let adapted = layer.adapted();
        match (format, layer.quantized(), adapted) {
            (MergeFormat::Int4, Some(q), Some(a)) => {
                let (_, lora) = a
                    .active()
                    .ok_or_else(|| Error::Msg(format!("{name}: no active adapter")))?;
                let QuantizedWeight::Int4(w) = &q.weight else {
                    return Err(Error::Msg(format!(
                        "{name}: --format int4 needs an int4 base, this one is {}",
                        q.weight.family()
                    )));
                };
                let folded = frugal_adapters::qalora::merge_into_int4(&name, w, lora)?;
                out.extend(QuantizedWeight::Int4(folded).to_tensors(&name));
                merged += 1;
            }
            (MergeFormat::Int4, Some(q), None) => out.extend(q.weight.to_tensors(&name)),
            (MergeFormat::Int4, None, _) => {
                return Err(Error::Msg(format!(
                    "{name}: --format int4 needs an int4 base layer, this one is dense"
                )))
            }
            (MergeFormat::Safetensors, _, Some(a)) => {
                out.insert(format!("{name}.weight"), a.merged_weight().to_kind(dtype));
                merged += 1;
            }
            (MergeFormat::Safetensors, Some(_), None) => {
                out.insert(format!("{name}.weight"), layer.weight_f32().to_kind(dtype));
            }
            (MergeFormat::Safetensors, None, None) => {}
        }
    }
    Ok((out.into_iter().collect(), merged))
}

/// Merges adapter folder `adapter` into base model folder `base` and writes the model folder
/// `out` (replaced as a whole, atomically): `model.safetensors`, `config.json` (with the
/// `quantization_config` of the int4 result, or without any for a dense one) and the base's
/// other files (tokenizer...).
pub fn merge_folders(
    base: &Path,
    adapter: &Path,
    out: &Path,
    format: MergeFormat,
) -> Result<MergeReport> {
    let (m, file) = load(base, adapter)?;
    if format == MergeFormat::Int4 && file.config.pool <= 1 {
        return Err(Error::Msg(format!(
            "{}: --format int4 takes a QA-LoRA adapter (use_qalora): only its change is \
             constant per group and folds into the int4 zero points without loss; merge this \
             LoRA adapter with --format safetensors",
            adapter.display()
        )));
    }
    let weights = safetensors_io::model_weights(base).expect("checked by load");
    let stored = SafetensorsFile::open(&weights)?;
    let dtype = stored
        .info("model.embed_tokens.weight")
        .ok()
        .and_then(|(_, d)| safetensors_io::kind_of(d))
        .filter(|k| matches!(k, Kind::Float | Kind::BFloat16 | Kind::Half))
        .unwrap_or(Kind::Float);
    let (tensors, merged) = merged_tensors(&m, format, dtype)?;
    let int4 = match (
        format,
        &m.net.linears().first().and_then(|(_, l)| l.quantized()),
    ) {
        (MergeFormat::Int4, Some(q)) => Some(q.weight.format()),
        _ => None,
    };
    atomic::write_dir(out, |tmp| {
        safetensors_io::save(&tmp.join("model.safetensors"), &tensors, None)?;
        copy_side_files(base, tmp)?;
        edit_config(base, tmp, |obj| {
            obj.remove("quantization_config");
            if let Some(f) = &int4 {
                obj.insert(
                    "quantization_config".into(),
                    frugal_quant::convert::quantization_config(f),
                );
            }
        })
    })?;
    let bytes = std::fs::metadata(out.join("model.safetensors"))
        .map(|m| m.len())
        .unwrap_or(0);
    Ok(MergeReport {
        merged_layers: merged,
        bytes,
    })
}

/// `frugal merge`.
pub fn merge(base: &Path, adapter: &Path, out: &Path, format: &str) -> Result<u8> {
    let format = MergeFormat::parse(format)?;
    let report = merge_folders(base, adapter, out, format)?;
    eprintln!(
        "frugal: merged the adapter into {} layers; wrote {} ({})",
        report.merged_layers,
        out.join("model.safetensors").display(),
        human_bytes(report.bytes)
    );
    Ok(0)
}
