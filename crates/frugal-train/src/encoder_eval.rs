//! Evaluation of encoder runs: masked-LM loss with fixed validation masks, classification
//! loss and accuracy, `frugal eval --run` for encoder runs (adapter runs and `--adapter`
//! included), and `frugal eval --model DIR [--adapter DIR]` for a masked-LM encoder folder.

use crate::checkpoint;
use crate::config::Config;
use crate::data::TokenDataset;
use crate::encoder_io::{
    mlm_inputs, pretrained_dir, pretrained_weights, read_shape, task_examples, val_mask_seed,
};
use crate::encoder_model::{EncoderModel, Net};
use crate::run;
use crate::tokenize::{self, EncoderTokens};
use crate::tsv::{self, EncodedSet, LabelMap};
use frugal_core::{Error, Result};
use frugal_models::encoder::{
    EncoderConfig, EncoderForClassification, EncoderForMaskedLm, IGNORE_INDEX,
};
use serde_json::json;
use std::path::Path;
use tch::{Kind, Reduction, Tensor};

/// Masked-LM validation: mean cross-entropy over the masked tokens of up to `max_batches`
/// batches (all when 0), with the fixed validation masks; and the masked tokens scored.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_mlm(
    model: &EncoderForMaskedLm,
    ds: &TokenDataset,
    t: &EncoderTokens,
    vocab: i64,
    prob: f64,
    batch_size: usize,
    max_batches: usize,
    device: tch::Device,
) -> Result<(f64, u64)> {
    tch::no_grad(|| {
        let (mut total, mut n) = (0.0, 0u64);
        for (i, (x, _)) in ds.sequential_batches(batch_size).enumerate() {
            if max_batches > 0 && i >= max_batches {
                break;
            }
            let rows = x.size()[0] as usize;
            let seeds: Vec<u64> = (0..rows)
                .map(|r| val_mask_seed(i * batch_size + r))
                .collect();
            let (ids, labels) = mlm_inputs(&x, t, vocab, prob, &seeds)?;
            let k = labels.ne(IGNORE_INDEX).sum(Kind::Int64).int64_value(&[]) as u64;
            if k == 0 {
                continue;
            }
            let loss = model
                .mlm_loss(
                    &ids.to_device(device),
                    None,
                    None,
                    &labels.to_device(device),
                )
                .double_value(&[]);
            total += loss * k as f64;
            n += k;
        }
        Ok((total / n.max(1) as f64, n))
    })
}

/// Classification validation: mean cross-entropy and accuracy over up to `max_batches`
/// batches (all when 0); and the examples scored.
pub fn evaluate_cls(
    model: &EncoderForClassification,
    set: &EncodedSet,
    batch_size: usize,
    max_batches: usize,
    device: tch::Device,
) -> (f64, f64, u64) {
    tch::no_grad(|| {
        let (mut loss, mut correct, mut n) = (0.0, 0i64, 0u64);
        let all: Vec<usize> = (0..set.len()).collect();
        for (i, idx) in all.chunks(batch_size.max(1)).enumerate() {
            if max_batches > 0 && i >= max_batches {
                break;
            }
            let b = set.batch(idx);
            let logits = model.classify_logits(
                &b.ids.to_device(device),
                Some(&b.types.to_device(device)),
                Some(&b.mask.to_device(device)),
            );
            let labels = b.labels.to_device(device);
            loss += logits
                .cross_entropy_loss::<Tensor>(&labels, None, Reduction::Sum, IGNORE_INDEX, 0.0)
                .double_value(&[]);
            correct += logits
                .argmax(1, false)
                .eq_tensor(&labels)
                .sum(Kind::Int64)
                .int64_value(&[]);
            n += idx.len() as u64;
        }
        let d = n.max(1) as f64;
        (loss / d, correct as f64 / d, n)
    })
}

/// The model of encoder run `run_dir` (config `cfg`) for evaluation, from its latest
/// checkpoint: its weights; for an adapter run, the pre-trained base with the checkpoint's
/// adapter. `adapter`: another adapter folder on top of a run that trained none (the run's own
/// adapter is refused: give `--model BASE --adapter DIR` to try another).
fn run_model(
    run_dir: &Path,
    cfg: &Config,
    shape: &EncoderConfig,
    num_labels: Option<i64>,
    adapter: Option<&Path>,
    device: tch::Device,
) -> Result<EncoderModel> {
    let ck = checkpoint::latest(run_dir)?;
    let mut m = EncoderModel::new(&cfg.model_build(), shape, num_labels, device)?;
    if cfg.adapter.enabled() {
        if adapter.is_some() {
            return Err(Error::Msg(format!(
                "{}: the run trained an adapter already; give --model BASE --adapter DIR to \
                 try another",
                run_dir.display()
            )));
        }
        if let Some(dir) = pretrained_dir(cfg) {
            m.load_pretrained(&pretrained_weights(&dir)?)?;
        }
        m.load_adapter(&ck, &cfg.adapter.name)?;
    } else {
        m.load(&ck.join("model.safetensors"))?;
        if let Some(dir) = adapter {
            m.load_adapter(dir, "default")?;
        }
    }
    m.set_training(false);
    Ok(m)
}

/// `frugal eval --run DIR [--adapter DIR] [--data FILE]` for an encoder run: `{"loss",
/// "perplexity", "tokens"}` (masked tokens scored, with the fixed validation masks) for a
/// masked-LM run; `{"loss", "accuracy", "examples", "tokens"}` for a classifier (`--data`: a
/// TSV file). `None` when `run_dir` is not an encoder run (the llama path then handles it).
pub fn eval_command(
    run_dir: &Path,
    adapter: Option<&Path>,
    data_spec: Option<&str>,
) -> Result<Option<serde_json::Value>> {
    let Ok(cfg) = run::read_config(run_dir, &[]) else {
        return Ok(None);
    };
    if !cfg.is_encoder() {
        return Ok(None);
    }
    let t = &cfg.train;
    let device = t.device.resolve()?;
    let mut tok = tokenize::load_tokenizer_file(&run_dir.join("tokenizer.json"))?;
    let toks = tokenize::add_encoder_tokens(&mut tok);
    let vocab = tok.get_vocab_size(true) as i64;
    let shape = read_shape(run_dir, "--run")?;
    // A run without a checkpoint fails before its data is read.
    checkpoint::latest(run_dir)?;
    let out = if cfg.objective() == crate::config::Objective::Classification {
        let labels = LabelMap::read(&run_dir.join("labels.json"))?;
        let (rows, file) = match data_spec {
            Some(spec) => (tsv::read("--data", Path::new(spec))?, spec.to_string()),
            None => {
                let (_, val) = task_examples(&cfg)?;
                let file = if cfg.data.task_val_path.is_empty() {
                    cfg.data.task_path.clone()
                } else {
                    cfg.data.task_val_path.clone()
                };
                (val, file)
            }
        };
        let ids = labels.ids(&rows, &file)?;
        let set = tsv::encode(&tok, &toks, &rows, ids, t.seq_len)?;
        let tokens: usize = set.ids.iter().map(|r| r.len()).sum();
        let n = if cfg.model.num_labels > 0 {
            cfg.model.num_labels
        } else {
            labels.labels.len() as i64
        };
        let m = run_model(run_dir, &cfg, &shape, Some(n), adapter, device)?;
        let Net::Cls(c) = &m.net else {
            unreachable!("built with labels")
        };
        let (loss, acc, examples) = evaluate_cls(c, &set, t.batch_size, 0, device);
        json!({"loss": loss, "accuracy": acc, "examples": examples, "tokens": tokens})
    } else {
        let docs = match data_spec {
            Some(spec) => crate::data::load_documents_for("--data", spec)?,
            None => run::documents(&cfg)?.1,
        };
        let ds = run::dataset(&tok, &docs, t.seq_len, "evaluation data")?;
        let m = run_model(run_dir, &cfg, &shape, None, adapter, device)?;
        mlm_report(&m, &ds, &toks, vocab, t, device)?
    };
    Ok(Some(out))
}

/// `frugal eval --model DIR [--adapter DIR] --data FILE` for an encoder folder (`config.json`
/// with `model_type` `bert`, `model.safetensors` with the masked-LM head, `tokenizer.json`
/// with the encoder's tokens, as a masked-LM run writes them): the masked-LM loss of FILE's
/// text (`{"loss", "perplexity", "tokens"}`, windows of the default `train.seq_len`, 128
/// tokens, with the fixed validation masks), with the adapter when given. A classifier's
/// adapter is refused (its labels live in its run folder: `--run`). `None` when the folder is
/// not an encoder's.
pub fn eval_model_dir(
    dir: &Path,
    adapter: Option<&Path>,
    data_spec: Option<&str>,
) -> Result<Option<serde_json::Value>> {
    let cfg_path = dir.join("config.json");
    let Ok(text) = std::fs::read_to_string(&cfg_path) else {
        return Ok(None);
    };
    let hf: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Msg(format!("{}: {e}", cfg_path.display())))?;
    if hf.get("model_type").and_then(|t| t.as_str()) != Some("bert") {
        return Ok(None);
    }
    let data =
        data_spec.ok_or_else(|| Error::Msg("--model needs --data FILE to evaluate on".into()))?;
    let shape = read_shape(dir, "--model")?;
    let mut tok = tokenize::load_tokenizer_file(&dir.join("tokenizer.json"))?;
    let toks = tokenize::add_encoder_tokens(&mut tok);
    let vocab = tok.get_vocab_size(true) as i64;
    if vocab > shape.vocab_size {
        return Err(Error::Msg(format!(
            "{}: the tokenizer with the encoder's tokens has {vocab} entries, the model {}",
            dir.display(),
            shape.vocab_size
        )));
    }
    let mut cfg = Config::default();
    cfg.model.kind = crate::config::ModelKind::Encoder;
    if let Some(kind) = run::stored_linear_kind(&hf) {
        cfg.model.linear = kind;
    }
    let device = cfg.train.device.resolve()?;
    let mut m = EncoderModel::new(&cfg.model_build(), &shape, None, device)?;
    let weights = pretrained_weights(dir)?;
    if !m.load_pretrained(&weights)? {
        return Err(Error::Msg(format!(
            "{}: no masked-LM head (cls.predictions.*) to score with",
            weights.display()
        )));
    }
    if let Some(a) = adapter {
        m.load_adapter(a, "default")?;
        m.set_training(false);
    }
    let docs = crate::data::load_documents_for("--data", data)?;
    let t = &cfg.train;
    let seq_len = t.seq_len.min(shape.max_position_embeddings as usize);
    let ds = run::dataset(&tok, &docs, seq_len, "evaluation data")?;
    Ok(Some(mlm_report(&m, &ds, &toks, vocab, t, device)?))
}

/// `frugal eval`'s JSON for a masked-LM encoder `m` over `ds` (the whole split, the run's
/// masking of `t`): loss, perplexity, scored tokens.
fn mlm_report(
    m: &EncoderModel,
    ds: &TokenDataset,
    toks: &EncoderTokens,
    vocab: i64,
    t: &crate::config::TrainConfig,
    device: tch::Device,
) -> Result<serde_json::Value> {
    let Net::Mlm(mlm) = &m.net else {
        return Err(Error::Msg(
            "a masked-LM score needs the masked-LM head".into(),
        ));
    };
    let (loss, tokens) = evaluate_mlm(
        mlm,
        ds,
        toks,
        vocab,
        t.mlm_probability,
        t.batch_size,
        0,
        device,
    )?;
    Ok(json!({"loss": loss, "perplexity": loss.exp(), "tokens": tokens}))
}
