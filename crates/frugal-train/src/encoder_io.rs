//! The inputs and files of an encoder run: the pre-trained folder, the shape
//! (`config.json`), the tokenizer with the encoder's tokens, masked-LM inputs and their seeds,
//! and the classification examples and labels (see [`crate::task_encoder`]).

use crate::checkpoint;
use crate::config::Config;
use crate::data::{SplitMix64, TokenDataset};
use crate::run;
use crate::tokenize::{self, EncoderTokens};
use crate::tsv::{self, EncodedSet, LabelMap};
use frugal_core::{atomic, Error, Result};
use frugal_models::encoder::{mask_tokens, EncoderConfig};
use serde_json::json;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};
use tokenizers::Tokenizer;

/// The folder `model.from_pretrained` names, if set.
pub(crate) fn pretrained_dir(cfg: &Config) -> Option<PathBuf> {
    (!cfg.model.from_pretrained.is_empty()).then(|| PathBuf::from(&cfg.model.from_pretrained))
}

/// The weights of a pre-trained encoder folder: its `model.safetensors`, or for a run folder
/// its latest checkpoint's.
pub(crate) fn pretrained_weights(dir: &Path) -> Result<PathBuf> {
    let file = dir.join("model.safetensors");
    if file.is_file() {
        return Ok(file);
    }
    if checkpoint::dir(dir).join("latest").is_file() {
        return Ok(checkpoint::latest(dir)?.join("model.safetensors"));
    }
    Err(Error::config(
        "model.from_pretrained",
        format!(
            "{}: neither model.safetensors nor a run checkpoint",
            dir.display()
        ),
    ))
}

/// Reads an encoder shape from a `config.json` (`key` names what pointed there), which must
/// name `model_type` `bert`.
pub(crate) fn read_shape(dir: &Path, key: &str) -> Result<EncoderConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::config(key, format!("cannot read {}: {e}", path.display())))?;
    let in_file = |e: Error| Error::Msg(format!("{}: {e}", path.display()));
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| in_file(Error::Msg(e.to_string())))?;
    frugal_models::hf::expect_family(&v, frugal_models::hf::Family::Bert).map_err(in_file)?;
    EncoderConfig::from_hf_json(&text).map_err(in_file)
}

/// Writes the run's `config.json`: the shape with `BertConfig` names, and for a classifier
/// its labels.
pub(crate) fn write_shape(
    run_dir: &Path,
    shape: &EncoderConfig,
    t: &EncoderTokens,
    labels: Option<&LabelMap>,
) -> Result<()> {
    let mut v = serde_json::to_value(shape).expect("plain struct");
    v["model_type"] = json!("bert");
    v["pad_token_id"] = json!(t.pad);
    match labels {
        None => v["architectures"] = json!(["BertForMaskedLM"]),
        Some(l) => {
            v["architectures"] = json!(["BertForSequenceClassification"]);
            v["num_labels"] = json!(l.labels.len());
            let id2label: serde_json::Map<String, serde_json::Value> = l
                .labels
                .iter()
                .enumerate()
                .map(|(i, s)| (i.to_string(), json!(s)))
                .collect();
            let label2id: serde_json::Map<String, serde_json::Value> = l
                .labels
                .iter()
                .enumerate()
                .map(|(i, s)| (s.clone(), json!(i)))
                .collect();
            v["id2label"] = json!(id2label);
            v["label2id"] = json!(label2id);
        }
    }
    atomic::write(
        &run_dir.join("config.json"),
        serde_json::to_string_pretty(&v).expect("json").as_bytes(),
    )
}

/// The run's tokenizer with the encoder's tokens. Resuming: the run's own. Otherwise
/// `tokenizer.path`, else the pre-trained model's `tokenizer.json`, else a BPE trained on
/// `texts` (cached as for llama runs); written to the run folder.
pub(crate) fn tokenizer(
    cfg: &Config,
    run_dir: &Path,
    resume: bool,
    texts: &dyn Fn() -> Vec<String>,
) -> Result<(Tokenizer, EncoderTokens)> {
    let saved = run_dir.join("tokenizer.json");
    let mut tok = if resume {
        tokenize::load_tokenizer_file(&saved)?
    } else if !cfg.tokenizer.path.is_empty() {
        tokenize::load_tokenizer_file(Path::new(&cfg.tokenizer.path))?
    } else if let Some(dir) = pretrained_dir(cfg) {
        let file = dir.join("tokenizer.json");
        if !file.is_file() {
            return Err(Error::config(
                "model.from_pretrained",
                format!(
                    "{}: no tokenizer.json (or set tokenizer.path)",
                    dir.display()
                ),
            ));
        }
        tokenize::load_tokenizer_file(&file)?
    } else {
        let owned = texts();
        let refs: Vec<&str> = owned.iter().map(|s| s.as_str()).collect();
        tokenize::load_or_train_tokenizer(
            None,
            &refs,
            cfg.tokenizer.vocab_size,
            &run::tokenizer_cache(),
        )?
    };
    let tokens = tokenize::add_encoder_tokens(&mut tok);
    if !resume {
        let json = tok
            .to_string(false)
            .map_err(|e| Error::Msg(format!("cannot serialize tokenizer: {e}")))?;
        atomic::write(&saved, json.as_bytes())?;
    }
    Ok((tok, tokens))
}

/// The shape of the run's encoder: resuming, the run's `config.json`; from a pre-trained
/// model, its `config.json`; otherwise the preset with the config's overrides.
pub(crate) fn shape(
    cfg: &Config,
    run_dir: &Path,
    resume: bool,
    vocab: i64,
) -> Result<EncoderConfig> {
    let s = if resume {
        read_shape(run_dir, "--resume")?
    } else if let Some(dir) = pretrained_dir(cfg) {
        read_shape(&dir, "model.from_pretrained")?
    } else {
        return cfg.encoder_config(vocab);
    };
    cfg.check_encoder_fits(&s, vocab)?;
    Ok(s)
}

/// Masked-LM inputs and labels of packed windows `x` `(B, S)`: `<|cls|>` and the first
/// `S - 1` tokens, row `i` masked with BERT's rule from `seeds[i]` (so an example's masks do
/// not depend on the batch it sits in); special tokens are never selected.
pub fn mlm_inputs(
    x: &Tensor,
    t: &EncoderTokens,
    vocab: i64,
    prob: f64,
    seeds: &[u64],
) -> Result<(Tensor, Tensor)> {
    let (b, s) = x.size2().map_err(|e| Error::Msg(format!("batch: {e}")))?;
    let cls = Tensor::full([b, 1], i64::from(t.cls), (Kind::Int64, x.device()));
    let ids = Tensor::cat(&[cls, x.narrow(1, 0, s - 1)], 1);
    let mut never = ids.zeros_like().to_kind(Kind::Bool);
    for sp in t.special() {
        never = never.logical_or(&ids.eq(i64::from(sp)));
    }
    if seeds.len() as i64 != b {
        return Err(Error::Msg(format!(
            "masked-LM batch of {b} rows with {} mask seeds",
            seeds.len()
        )));
    }
    let mut rows_ids = Vec::with_capacity(seeds.len());
    let mut rows_labels = Vec::with_capacity(seeds.len());
    for (r, &seed) in seeds.iter().enumerate() {
        let row = |t: &Tensor| t.narrow(0, r as i64, 1);
        let (i, l) = mask_tokens(
            &row(&ids),
            &row(&never),
            i64::from(t.mask),
            vocab,
            prob,
            seed,
        )?;
        rows_ids.push(i);
        rows_labels.push(l);
    }
    Ok((Tensor::cat(&rows_ids, 0), Tensor::cat(&rows_labels, 0)))
}

/// The mask seed of the example at position `position` among the examples step `step` draws
/// (over its micro-batches and ranks): the same whether the step runs in one process or
/// several, and on resume.
pub(crate) fn train_mask_seed(seed: u64, step: u64, position: usize) -> u64 {
    let base = SplitMix64::new(seed ^ 0x6d6c_6d5f_7472_6169).next_u64();
    SplitMix64::new(
        base ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ (position as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f),
    )
    .next_u64()
}

/// The mask seed of the validation split's sequence `row`: fixed, so every evaluation scores
/// the same masks, whatever the batch size.
pub(crate) fn val_mask_seed(row: usize) -> u64 {
    SplitMix64::new(0x7661_6c5f_6d61_736b ^ (row as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .next_u64()
}

/// Cross-entropy of `val` labels under the training label frequencies (add-one): the loss of
/// a classifier that ignores the text.
pub(crate) fn prior_loss(train: &[i64], val: &[i64], classes: usize) -> f64 {
    let mut counts = vec![1.0f64; classes.max(1)];
    for &l in train {
        counts[l as usize] += 1.0;
    }
    let total: f64 = counts.iter().sum();
    val.iter()
        .map(|&l| -(counts[l as usize] / total).ln())
        .sum::<f64>()
        / val.len().max(1) as f64
}

/// The data of a run.
pub(crate) enum Data {
    Mlm {
        train: TokenDataset,
        val: TokenDataset,
    },
    Cls {
        train: EncodedSet,
        val: EncodedSet,
        labels: LabelMap,
    },
}

/// Training and validation examples of a classification run (unencoded).
pub(crate) fn task_examples(cfg: &Config) -> Result<(Vec<tsv::Example>, Vec<tsv::Example>)> {
    let rows = tsv::read("data.task_path", Path::new(&cfg.data.task_path))?;
    if cfg.data.task_val_path.is_empty() {
        let (train, val) = tsv::split(rows, cfg.data.val_every);
        if val.is_empty() {
            return Err(Error::config(
                "data.task_path",
                format!(
                    "{}: too few rows for a validation split (every {}th; or set data.task_val_path)",
                    cfg.data.task_path, cfg.data.val_every
                ),
            ));
        }
        Ok((train, val))
    } else {
        let val = tsv::read("data.task_val_path", Path::new(&cfg.data.task_val_path))?;
        Ok((rows, val))
    }
}

pub(crate) fn example_texts(rows: &[tsv::Example]) -> Vec<String> {
    rows.iter()
        .flat_map(|e| std::iter::once(e.text.clone()).chain(e.text2.clone()))
        .collect()
}

/// The labels of a classification run: resuming, the run's `labels.json`; otherwise those of
/// the training examples, checked against `model.num_labels`.
pub(crate) fn label_map(
    cfg: &Config,
    run_dir: &Path,
    resume: bool,
    train: &[tsv::Example],
) -> Result<LabelMap> {
    if resume {
        return LabelMap::read(&run_dir.join("labels.json"));
    }
    let map = LabelMap::from_examples(train);
    if map.labels.len() < 2 {
        return Err(Error::config(
            "data.task_path",
            format!(
                "{}: needs at least 2 distinct labels, found {:?}",
                cfg.data.task_path, map.labels
            ),
        ));
    }
    let n = cfg.model.num_labels;
    if n > 0 && (n as usize) < map.labels.len() {
        return Err(Error::config(
            "model.num_labels",
            format!(
                "{n} is fewer than the {} labels of {}",
                map.labels.len(),
                cfg.data.task_path
            ),
        ));
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use frugal_models::encoder::IGNORE_INDEX;

    /// Guarantee: masked-LM inputs start with the summary token, never select special tokens,
    /// depend on each row's seed only (not on the rows beside it), and select about `prob` of
    /// the other tokens.
    #[test]
    fn mlm_inputs_follow_the_rule() {
        let t = EncoderTokens {
            mask: 100,
            cls: 101,
            sep: 102,
            pad: 1,
            eos: 0,
        };
        let x = Tensor::randint_low(2, 99, [8, 64], (Kind::Int64, tch::Device::Cpu));
        let seeds = |s: u64| -> Vec<u64> { (0..8).map(|r| train_mask_seed(s, 1, r)).collect() };
        let _ = x.narrow(1, 10, 1).fill_(0);
        let (ids, labels) = mlm_inputs(&x, &t, 103, 0.15, &seeds(7)).unwrap();
        assert_eq!(ids.size(), [8, 64]);
        assert!(ids.select(1, 0).eq(101).all().int64_value(&[]) == 1);
        // Position 11 holds eos (x's column 10): never a label.
        assert!(labels.select(1, 11).eq(IGNORE_INDEX).all().int64_value(&[]) == 1);
        assert!(labels.select(1, 0).eq(IGNORE_INDEX).all().int64_value(&[]) == 1);
        let picked = labels.ne(IGNORE_INDEX).sum(Kind::Int64).int64_value(&[]);
        assert!((40..=120).contains(&picked), "{picked} of ~75");
        let (ids2, labels2) = mlm_inputs(&x, &t, 103, 0.15, &seeds(7)).unwrap();
        assert!(ids2.equal(&ids) && labels2.equal(&labels));
        let (_, labels3) = mlm_inputs(&x, &t, 103, 0.15, &seeds(8)).unwrap();
        assert!(!labels3.equal(&labels));
        assert_ne!(train_mask_seed(0, 1, 0), train_mask_seed(0, 2, 0));
        assert_ne!(train_mask_seed(0, 1, 0), train_mask_seed(0, 1, 1));
        assert_ne!(train_mask_seed(0, 1, 0), train_mask_seed(1, 1, 0));
        assert_eq!(val_mask_seed(3), val_mask_seed(3));
        // A row's masks are its own seed's, whatever batch it sits in (data parallelism splits
        // a step's examples over ranks).
        let (ids4, labels4) =
            mlm_inputs(&x.narrow(0, 2, 3), &t, 103, 0.15, &seeds(7)[2..5]).unwrap();
        assert!(ids4.equal(&ids.narrow(0, 2, 3)) && labels4.equal(&labels.narrow(0, 2, 3)));
    }
}
