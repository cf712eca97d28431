//! `frugal export --run RUN_DIR --out DIR`: packs a trained MatMul-free LM (hgrn-bit) for
//! inference: every BitLinear's latent weight becomes its ternary codes, four per byte, with one
//! absmean scale (frugal-quant's ternary format), beside the input gains, norms, lower bounds and
//! embeddings in f32. The folder (`config.json`, `model.safetensors`, `tokenizer.json`) runs
//! with `frugal generate --model DIR` and `frugal eval --model DIR` through the ternary kernels,
//! with int8 activations and the recurrent state.

use crate::{checkpoint, run, tokenize};
use frugal_core::memory::human_bytes;
use frugal_core::{atomic, Error, Result};
use frugal_models::decoder::{Decoder, DecoderConfig};
use frugal_models::{EmbeddingKind, LinearKind};
use std::path::Path;
use tch::nn::VarStore;

/// The value of `config.json`'s `model_type` for the MatMul-free LM (the reference code's).
pub const MODEL_TYPE: &str = "hgrn_bit";

/// What an export wrote.
#[derive(Debug)]
pub struct ExportReport {
    /// Bytes of the packed BitLinear matrices (codes and scales).
    pub packed_bytes: u64,
    /// Their bytes in f32.
    pub f32_bytes: u64,
    /// Bytes of `model.safetensors`.
    pub file_bytes: u64,
}

/// Packs the latest checkpoint of hgrn-bit run `run_dir` into model folder `out` (replaced as a
/// whole, atomically).
pub fn export_run(run_dir: &Path, out: &Path) -> Result<ExportReport> {
    let cfg = run::read_config(run_dir, &[])?;
    if cfg.model.kind != crate::config::ModelKind::HgrnBit {
        return Err(Error::Msg(format!(
            "{}: `frugal export` packs hgrn-bit runs; this run's model.kind is \"{}\" (for a \
             LLaMA, see `frugal quantize`)",
            run_dir.display(),
            cfg.model.kind
        )));
    }
    let tok_path = run_dir.join("tokenizer.json");
    let tok = tokenize::load_tokenizer_file(&tok_path)?;
    let DecoderConfig::HgrnBit(shape) = cfg.decoder_config(tok.get_vocab_size(true) as i64)? else {
        unreachable!("an hgrn-bit config")
    };
    let ck = checkpoint::latest(run_dir)?.join("model.safetensors");
    let mut vs = VarStore::new(tch::Device::Cpu);
    let kind = LinearKind::PackedBitLinear { eps: 1e-8 };
    let mut net = Decoder::new(
        &vs.root(),
        &DecoderConfig::HgrnBit(shape.clone()),
        &kind,
        &EmbeddingKind::Dense,
        tch::Kind::Float,
    )?;
    frugal_models::weights::load_model(&mut vs, &mut net.linears_mut(), &ck)?;
    let (mut packed_bytes, mut f32_bytes) = (0u64, 0u64);
    for (_, l) in net.linears() {
        if let Some(q) = l.quantized() {
            packed_bytes += q.weight.stored_bytes();
            f32_bytes += 4 * q.weight.numel() as u64;
        }
    }
    let mut json = serde_json::to_value(&shape).expect("plain struct");
    json["model_type"] = MODEL_TYPE.into();
    json["architectures"] = serde_json::json!(["HGRNBitForCausalLM"]);
    json["quantization_config"] =
        frugal_quant::convert::quantization_config(&frugal_quant::convert::Format::Ternary);
    let text = serde_json::to_string_pretty(&json).expect("json");
    atomic::write_dir(out, |tmp| {
        frugal_models::weights::save_model(&vs, &net.linears(), &tmp.join("model.safetensors"))?;
        atomic::write(&tmp.join("config.json"), text.as_bytes())?;
        std::fs::copy(&tok_path, tmp.join("tokenizer.json"))
            .map(|_| ())
            .map_err(|e| Error::io(tmp.join("tokenizer.json"), e))
    })?;
    let file_bytes = std::fs::metadata(out.join("model.safetensors"))
        .map(|m| m.len())
        .unwrap_or(0);
    Ok(ExportReport {
        packed_bytes,
        f32_bytes,
        file_bytes,
    })
}

/// `frugal export`.
pub fn export(run_dir: &Path, out: &Path) -> Result<u8> {
    let r = export_run(run_dir, out)?;
    eprintln!(
        "frugal: packed the BitLinear matrices: {} -> {} ({:.1}x smaller); wrote {} ({})",
        human_bytes(r.f32_bytes),
        human_bytes(r.packed_bytes),
        r.f32_bytes as f64 / r.packed_bytes.max(1) as f64,
        out.join("model.safetensors").display(),
        human_bytes(r.file_bytes)
    );
    Ok(0)
}

/// The shape of an exported hgrn-bit folder's `config.json` value, when it is one.
pub fn hgrn_config(
    v: &serde_json::Value,
) -> Option<Result<frugal_models::hgrn_bit::HgrnBitConfig>> {
    (v.get("model_type").and_then(|t| t.as_str()) == Some(MODEL_TYPE)).then(|| {
        serde_json::from_value(v.clone())
            .map_err(|e| Error::Msg(format!("config.json: not an hgrn-bit config: {e}")))
    })
}
