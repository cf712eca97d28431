//! Training the BERT-style encoder (`model.kind = "encoder"`):
//!
//! - **masked-LM pre-training** (`train.objective = "mlm"`, the default for encoders) on the
//!   text pipeline of the llama runs (same corpus, same packing, the same tokenizer with the
//!   encoder's special tokens appended, see [`tokenize::add_encoder_tokens`]). Each sequence is
//!   `<|cls|>` followed by `seq_len - 1` tokens of the packed stream; BERT's rule selects
//!   `train.mlm_probability` of the non-special tokens (80% mask, 10% random, 10% kept). The
//!   masks of micro-batch k of step s are drawn from a seed of (`train.seed`, s, k), so a resumed
//!   run draws the masks of an uninterrupted one; validation batch i always gets the same masks
//!   (a seed of i alone), so validation losses compare across evaluations, runs and
//!   `frugal eval`.
//! - **sequence classification** (`train.objective = "classification"`) on TSV examples
//!   (`data.task_path`, `data.task_val_path`, see [`crate::tsv`]), usually from a pre-trained
//!   encoder (`model.from_pretrained`: a run folder or a model folder; its masked-LM head is
//!   dropped, pooler and classifier start fresh).
//!
//! The loop has the llama loop's schedule, gradient accumulation, clipping, evaluation,
//! `metrics.jsonl`, `loss.png`, checkpoints, exact resume, Ctrl-C and `memory.json`. Per-layer
//! updates, activation checkpointing and the chunked cross-entropy are llama-only (refused by
//! the config). The run folder also holds `config.json` (the shape, Hugging Face `BertConfig`
//! names) and, for classification, `labels.json` (labels by class id).

use crate::checkpoint::{self, TrainerState};
use crate::config::{Config, Dtype};
use crate::data::{Document, Sampler, SplitMix64, TokenDataset};
use crate::progress::Progress;
use crate::run;
use crate::schedule::lr_at;
use crate::tokenize::{self, EncoderTokens};
use crate::train::{line_has_val, Metrics, Summary, INTERRUPTED};
use crate::tsv::{self, EncodedSet, LabelMap};
use frugal_core::memory::{self, Accounting};
use frugal_core::safetensors_io::SafetensorsFile;
use frugal_core::{atomic, Error, Result};
use frugal_models::encoder::{
    mask_tokens, Encoder, EncoderConfig, EncoderForClassification, EncoderForMaskedLm, IGNORE_INDEX,
};
use frugal_models::linear::Linear;
use frugal_optim::clip_grad_norm;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Kind, Reduction, Tensor};
use tokenizers::Tokenizer;

/// The network of an encoder run.
#[derive(Debug)]
pub enum Net {
    /// With the masked-LM head.
    Mlm(EncoderForMaskedLm),
    /// With the classification head.
    Cls(EncoderForClassification),
}

/// An encoder and the variables it lives in.
pub struct EncoderModel {
    /// The variables, by Hugging Face name.
    pub vs: VarStore,
    /// The network.
    pub net: Net,
}

fn linears_mut_of(net: &mut Net) -> Vec<(String, &mut Box<dyn Linear>)> {
    match net {
        Net::Mlm(m) => m.linears_mut(),
        Net::Cls(m) => m.linears_mut(),
    }
}

impl EncoderModel {
    /// Builds the configured encoder of shape `shape` on `device`, seeded by `train.seed`: with
    /// the masked-LM head, or with a classification head of `num_labels` classes.
    pub fn new(
        cfg: &Config,
        shape: &EncoderConfig,
        num_labels: Option<i64>,
        device: tch::Device,
    ) -> Result<Self> {
        tch::manual_seed(cfg.train.seed as i64);
        let mut vs = VarStore::new(device);
        if cfg.train.param_dtype == Dtype::Bf16 {
            vs.set_kind(Kind::BFloat16);
        }
        let compute = match cfg.train.dtype {
            Dtype::F32 => Kind::Float,
            Dtype::Bf16 => Kind::BFloat16,
        };
        let root = vs.root();
        let kind = &cfg.model.linear;
        let net = match num_labels {
            None => Net::Mlm(EncoderForMaskedLm::new(&root, shape, kind, compute)?),
            Some(n) => Net::Cls(EncoderForClassification::new(
                &root, shape, n, kind, compute,
            )?),
        };
        Ok(Self { vs, net })
    }

    /// The encoder without its head.
    pub fn encoder(&self) -> &Encoder {
        match &self.net {
            Net::Mlm(m) => &m.encoder,
            Net::Cls(m) => &m.encoder,
        }
    }

    /// Every linear layer of the blocks, with its full name.
    pub fn linears(&self) -> Vec<(String, &dyn Linear)> {
        match &self.net {
            Net::Mlm(m) => m.linears(),
            Net::Cls(m) => m.linears(),
        }
    }

    /// Saves the weights (variables and quantized layers) to `file`, atomically.
    pub fn save(&self, file: &Path) -> Result<()> {
        frugal_models::weights::save_model(&self.vs, &self.linears(), file)
    }

    /// Loads every weight of the model from `file` (a checkpoint of the same model).
    pub fn load(&mut self, file: &Path) -> Result<()> {
        let mut linears = linears_mut_of(&mut self.net);
        frugal_models::weights::load_model(&mut self.vs, &mut linears, file)
    }

    /// Loads a pre-trained encoder body from `file`: every `bert.embeddings.*` and
    /// `bert.encoder.*` weight (required), and the masked-LM head when this model has one and
    /// the file too. The pooler and classifier keep their fresh initialisation.
    pub fn load_pretrained(&mut self, file: &Path) -> Result<()> {
        let names = SafetensorsFile::open(file)?.names();
        let head_in_file = names.iter().any(|n| n.starts_with("cls.predictions."));
        let mlm = matches!(self.net, Net::Mlm(_));
        let mut body = VarStore::new(self.vs.device());
        {
            let mut v = body.variables_.lock().expect("fresh store");
            for (n, t) in frugal_models::weights::named_variables(&self.vs) {
                let wanted = n.starts_with("bert.embeddings.")
                    || n.starts_with("bert.encoder.")
                    || (mlm && head_in_file && n.starts_with("cls.predictions."));
                if wanted {
                    // Shallow: loading into `body` fills this model's tensors.
                    v.named_variables.insert(n, t.shallow_clone());
                }
            }
        }
        let mut linears = linears_mut_of(&mut self.net);
        frugal_models::weights::load_model(&mut body, &mut linears, file)
    }
}

/// The folder `model.from_pretrained` names, if set.
fn pretrained_dir(cfg: &Config) -> Option<PathBuf> {
    (!cfg.model.from_pretrained.is_empty()).then(|| PathBuf::from(&cfg.model.from_pretrained))
}

/// The weights of a pre-trained encoder folder: its `model.safetensors`, or for a run folder
/// its latest checkpoint's.
fn pretrained_weights(dir: &Path) -> Result<PathBuf> {
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

/// Reads an encoder shape from a `config.json` (`key` names what pointed there).
fn read_shape(dir: &Path, key: &str) -> Result<EncoderConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::config(key, format!("cannot read {}: {e}", path.display())))?;
    EncoderConfig::from_hf_json(&text).map_err(|e| Error::Msg(format!("{}: {e}", path.display())))
}

/// Writes the run's `config.json`: the shape with `BertConfig` names, and for a classifier
/// its labels.
fn write_shape(
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
fn tokenizer(
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
fn shape(cfg: &Config, run_dir: &Path, resume: bool, vocab: i64) -> Result<EncoderConfig> {
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
/// `S - 1` tokens, masked with BERT's rule from `seed`; special tokens are never selected.
pub fn mlm_inputs(
    x: &Tensor,
    t: &EncoderTokens,
    vocab: i64,
    prob: f64,
    seed: u64,
) -> Result<(Tensor, Tensor)> {
    let (b, s) = x.size2().map_err(|e| Error::Msg(format!("batch: {e}")))?;
    let cls = Tensor::full([b, 1], i64::from(t.cls), (Kind::Int64, x.device()));
    let ids = Tensor::cat(&[cls, x.narrow(1, 0, s - 1)], 1);
    let mut never = ids.zeros_like().to_kind(Kind::Bool);
    for sp in t.special() {
        never = never.logical_or(&ids.eq(i64::from(sp)));
    }
    mask_tokens(&ids, &never, i64::from(t.mask), vocab, prob, seed)
}

/// The mask seed of micro-batch `micro` of step `step`.
fn train_mask_seed(seed: u64, step: u64, micro: usize) -> u64 {
    let base = SplitMix64::new(seed ^ 0x6d6c_6d5f_7472_6169).next_u64();
    SplitMix64::new(
        base ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ (micro as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f),
    )
    .next_u64()
}

/// The mask seed of validation batch `batch`: fixed, so every evaluation scores the same masks.
fn val_mask_seed(batch: usize) -> u64 {
    SplitMix64::new(0x7661_6c5f_6d61_736b ^ (batch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .next_u64()
}

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
            let (ids, labels) = mlm_inputs(&x, t, vocab, prob, val_mask_seed(i))?;
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

/// Cross-entropy of `val` labels under the training label frequencies (add-one): the loss of
/// a classifier that ignores the text.
fn prior_loss(train: &[i64], val: &[i64], classes: usize) -> f64 {
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
enum Data {
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
fn task_examples(cfg: &Config) -> Result<(Vec<tsv::Example>, Vec<tsv::Example>)> {
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

fn example_texts(rows: &[tsv::Example]) -> Vec<String> {
    rows.iter()
        .flat_map(|e| std::iter::once(e.text.clone()).chain(e.text2.clone()))
        .collect()
}

/// The labels of a classification run: resuming, the run's `labels.json`; otherwise those of
/// the training examples, checked against `model.num_labels`.
fn label_map(
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

/// Trains an encoder as `cfg` says into `run_dir` (see the module documentation).
pub fn train(cfg: &Config, run_dir: &Path, resume: bool) -> Result<Summary> {
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    if cfg.train.threads > 0 {
        tch::set_num_threads(cfg.train.threads as i32);
    }
    let device = cfg.train.device.resolve()?;
    let t = &cfg.train;
    let classification = cfg.objective() == "classification";

    eprintln!("frugal: loading data");
    let (docs, rows) = if classification {
        (None, Some(task_examples(cfg)?))
    } else {
        (Some(run::documents(cfg)?), None)
    };
    let texts = || -> Vec<String> {
        match (&docs, &rows) {
            (Some((train, _)), _) => train.iter().map(|d: &Document| d.text.clone()).collect(),
            (_, Some((train, _))) => example_texts(train),
            _ => Vec::new(),
        }
    };
    let (tok, toks) = tokenizer(cfg, run_dir, resume, &texts)?;
    let vocab = tok.get_vocab_size(true) as i64;
    let shape = shape(cfg, run_dir, resume, vocab)?;

    let (data, baseline) = match (docs, rows) {
        (Some((train_docs, val_docs)), _) => {
            let train = run::dataset(&tok, &train_docs, t.seq_len, "training data")?;
            let val = run::dataset(&tok, &val_docs, t.seq_len, "validation data")?;
            let unigram = run::unigram_loss(train.tokens(), val.tokens(), vocab as usize);
            (Data::Mlm { train, val }, unigram)
        }
        (_, Some((train_rows, val_rows))) => {
            let labels = label_map(cfg, run_dir, resume, &train_rows)?;
            let train_ids = labels.ids(&train_rows, &cfg.data.task_path)?;
            let val_file = if cfg.data.task_val_path.is_empty() {
                &cfg.data.task_path
            } else {
                &cfg.data.task_val_path
            };
            let val_ids = labels.ids(&val_rows, val_file)?;
            let prior = prior_loss(&train_ids, &val_ids, labels.labels.len());
            let train = tsv::encode(&tok, &toks, &train_rows, train_ids, t.seq_len)?;
            let val = tsv::encode(&tok, &toks, &val_rows, val_ids, t.seq_len)?;
            (Data::Cls { train, val, labels }, prior)
        }
        _ => unreachable!("one kind of data"),
    };
    let num_labels = match &data {
        Data::Cls { labels, .. } => Some(if cfg.model.num_labels > 0 {
            cfg.model.num_labels
        } else {
            labels.labels.len() as i64
        }),
        Data::Mlm { .. } => None,
    };
    // Inputs are known good: mark the folder as a run.
    if !resume {
        let resolved = toml::to_string(cfg).map_err(|e| Error::Msg(format!("config: {e}")))?;
        atomic::write(&run_dir.join("config.toml"), resolved.as_bytes())?;
        let labels = match &data {
            Data::Cls { labels, .. } => {
                atomic::write(&run_dir.join("labels.json"), labels.to_json().as_bytes())?;
                Some(labels)
            }
            Data::Mlm { .. } => None,
        };
        write_shape(run_dir, &shape, &toks, labels)?;
    }
    let num_examples = match &data {
        Data::Mlm { train, val } => {
            eprintln!(
                "frugal: {} training tokens ({} sequences of {}), {} validation tokens, vocabulary {vocab}",
                train.tokens().len(),
                train.num_sequences(),
                t.seq_len,
                val.tokens().len()
            );
            train.num_sequences()
        }
        Data::Cls { train, val, labels } => {
            eprintln!(
                "frugal: {} training and {} validation examples, {} labels, vocabulary {vocab}",
                train.len(),
                val.len(),
                labels.labels.len()
            );
            train.len()
        }
    };

    let baseline_rss = memory::current_rss_bytes();
    let checkpoint = if resume {
        Some(checkpoint::latest(run_dir)?)
    } else {
        None
    };
    let mut m = EncoderModel::new(cfg, &shape, num_labels, device)?;
    match (&checkpoint, pretrained_dir(cfg)) {
        (Some(ck), _) => m.load(&ck.join("model.safetensors"))?,
        (None, Some(dir)) => m.load_pretrained(&pretrained_weights(&dir)?)?,
        (None, None) => {}
    }
    let params = frugal_models::weights::named_variables(&m.vs);
    let tensors: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
    let n_params: i64 = tensors.iter().map(|t| t.numel() as i64).sum();
    eprintln!(
        "frugal: encoder {} ({}, {:.2}M parameters) on {device:?}, {:?}",
        cfg.model.size,
        cfg.objective(),
        n_params as f64 / 1e6,
        t.dtype
    );
    let mut opt = crate::optimizers::build(cfg, params, t.lr)?;

    let mut state = TrainerState {
        step: 0,
        tokens: 0,
        sampler: Sampler::new(num_examples, t.seed).state(),
        elapsed_s: 0.0,
        prev_grad_norm: None,
    };
    if let Some(ck) = &checkpoint {
        opt.load(&ck.join("optimizer.safetensors"))?;
        state = checkpoint::read_state(ck)?;
        eprintln!(
            "frugal: resuming from {} (step {})",
            ck.display(),
            state.step
        );
    }
    let mut history = Metrics::open(&run_dir.join("metrics.jsonl"), state.step)?;
    let mut sampler = Sampler::from_state(num_examples, state.sampler);
    let baseline_name = match &data {
        Data::Mlm { .. } => "unigram (val)",
        Data::Cls { .. } => "label prior (val)",
    };

    let evaluate = |m: &EncoderModel, batches: usize| -> Result<(f64, Option<f64>)> {
        match (&m.net, &data) {
            (Net::Mlm(mlm), Data::Mlm { val, .. }) => {
                let (l, _) = evaluate_mlm(
                    mlm,
                    val,
                    &toks,
                    vocab,
                    t.mlm_probability,
                    t.batch_size,
                    batches,
                    device,
                )?;
                Ok((l, None))
            }
            (Net::Cls(c), Data::Cls { val, .. }) => {
                let (l, acc, _) = evaluate_cls(c, val, t.batch_size, batches, device);
                Ok((l, Some(acc)))
            }
            _ => unreachable!("model and data of one objective"),
        }
    };

    let mut progress = Progress::new(t.max_steps, state.step);
    let started = Instant::now() - std::time::Duration::from_secs_f64(state.elapsed_s);
    let (mut val_loss, mut val_acc) = (f64::NAN, None);
    let mut interrupted = false;
    let mut steps_peak = 0;
    let mut svd_seen = 0.0;
    while state.step < t.max_steps {
        let step = state.step + 1;
        let lr = lr_at(step, t.lr, t.warmup_steps, t.max_steps, t.min_lr_ratio);
        opt.set_lr(lr);
        let t0 = Instant::now();
        let (mut loss_sum, mut tokens, mut correct, mut seen) = (0.0, 0u64, 0i64, 0i64);
        let scale = 1.0 / t.grad_accum as f64;
        for k in 0..t.grad_accum {
            let idx = sampler.next_indices(t.batch_size);
            let loss = match (&m.net, &data) {
                (Net::Mlm(mlm), Data::Mlm { train, .. }) => {
                    let (x, _) = train.batch(&idx);
                    tokens += x.numel() as u64;
                    let seed = train_mask_seed(t.seed, step, k);
                    let (ids, labels) = mlm_inputs(&x, &toks, vocab, t.mlm_probability, seed)?;
                    mlm.mlm_loss(
                        &ids.to_device(device),
                        None,
                        None,
                        &labels.to_device(device),
                    )
                }
                (Net::Cls(c), Data::Cls { train, .. }) => {
                    let b = train.batch(&idx);
                    tokens += b.tokens;
                    let logits = c.classify_logits(
                        &b.ids.to_device(device),
                        Some(&b.types.to_device(device)),
                        Some(&b.mask.to_device(device)),
                    );
                    let labels = b.labels.to_device(device);
                    correct += tch::no_grad(|| {
                        logits
                            .argmax(1, false)
                            .eq_tensor(&labels)
                            .sum(Kind::Int64)
                            .int64_value(&[])
                    });
                    seen += idx.len() as i64;
                    logits.cross_entropy_loss::<Tensor>(
                        &labels,
                        None,
                        Reduction::Mean,
                        IGNORE_INDEX,
                        0.0,
                    )
                }
                _ => unreachable!("model and data of one objective"),
            };
            loss_sum += loss.double_value(&[]);
            (loss * scale).backward();
        }
        let loss = loss_sum / t.grad_accum as f64;
        if !loss.is_finite() {
            return Err(Error::Msg(format!(
                "step {step}: loss is {loss}; lower train.lr (now {}) or check the data",
                t.lr
            )));
        }
        let grad_norm = if t.max_grad_norm > 0.0 {
            clip_grad_norm(&tensors, t.max_grad_norm)
        } else {
            frugal_optim::grad_norm(&tensors)
        };
        opt.step()?;
        opt.zero_grad();
        let step_time = t0.elapsed().as_secs_f64();
        steps_peak = memory::peak_rss_bytes();
        let svd_total = opt.projection_seconds();
        let svd_s = svd_total - svd_seen;
        svd_seen = svd_total;
        state.step = step;
        state.tokens += tokens;
        state.sampler = sampler.state();
        state.elapsed_s = started.elapsed().as_secs_f64();
        let tps = tokens as f64 / step_time;
        let mut line = json!({
            "step": step, "loss": loss, "lr": lr, "tokens": state.tokens,
            "tokens_per_s": tps, "step_time_s": step_time, "grad_norm": grad_norm,
            "rss_peak_bytes": steps_peak,
        });
        if seen > 0 {
            line["accuracy"] = json!(correct as f64 / seen as f64);
        }
        if cfg.optim.is_galore() {
            line["svd_s"] = json!(svd_s);
        }
        progress.update(step, loss, tps);

        let last = step == t.max_steps;
        let stop = INTERRUPTED.load(Ordering::SeqCst);
        if (t.eval_every > 0 && step.is_multiple_of(t.eval_every)) || last {
            let batches = if last {
                t.final_eval_batches
            } else {
                t.eval_batches
            };
            let (vl, acc) = evaluate(&m, batches)?;
            val_loss = vl;
            val_acc = acc;
            line["val_loss"] = json!(vl);
            match acc {
                Some(a) => {
                    line["val_accuracy"] = json!(a);
                    progress.message(&format!(
                        "step {step}: val_loss {vl:.4}, val_accuracy {a:.4}, label prior {baseline:.4}"
                    ));
                }
                None => {
                    line["val_ppl"] = json!(vl.exp());
                    progress.message(&format!(
                        "step {step}: val_loss {vl:.4} (ppl {:.2}), unigram {baseline:.4}",
                        vl.exp()
                    ));
                }
            }
        }
        history.push(line)?;
        if line_has_val(&history) {
            history.plot_with(&run_dir.join("loss.png"), baseline, baseline_name);
        }
        if (t.save_every > 0 && step.is_multiple_of(t.save_every)) || last || stop {
            checkpoint::save_with(
                run_dir,
                &|file: &Path| m.save(file),
                opt.as_ref(),
                &state,
                t.keep_checkpoints,
            )?;
        }
        if stop && !last {
            progress.message(&format!(
                "interrupted: checkpoint saved at step {step}; resume with --resume {}",
                run_dir.display()
            ));
            interrupted = true;
            break;
        }
    }
    progress.finish();
    if val_loss.is_nan() && !interrupted {
        (val_loss, val_acc) = evaluate(&m, t.final_eval_batches)?;
    }
    history.plot_with(&run_dir.join("loss.png"), baseline, baseline_name);

    let peak = memory::peak_rss_bytes();
    let mut acc = Accounting::default();
    acc.add_tensors("parameters", tensors.iter());
    acc.add_tensors("gradients", tensors.iter());
    acc.add("optimizer_state", opt.state_bytes());
    let by_tensor: Vec<serde_json::Value> = frugal_models::weights::named_variables(&m.vs)
        .iter()
        .map(|(n, t)| json!({"name": n, "shape": t.size(), "bytes": memory::tensor_bytes(t)}))
        .collect();
    let report = json!({
        "device": format!("{device:?}"),
        "model": {"kind": "encoder", "size": cfg.model.size, "objective": cfg.objective()},
        "accounting": acc.bytes,
        "accounting_total_bytes": acc.total(),
        "measured": {
            "baseline_rss_bytes": baseline_rss,
            "peak_rss_bytes": peak,
            "peak_above_baseline_bytes": peak.saturating_sub(baseline_rss),
            "steps_peak_rss_bytes": steps_peak,
            "steps_peak_above_baseline_bytes": steps_peak.saturating_sub(baseline_rss),
            "note": "baseline: resident memory after libtorch started and the data was loaded, before the model was built; peak: the whole run's (evaluations and checkpoints included); steps_peak: the peak when the last training step ended, before its evaluation and checkpoint",
        },
        "activations_and_workspace_bytes": peak.saturating_sub(baseline_rss).saturating_sub(acc.total()),
        "parameters": by_tensor,
    });
    atomic::write(
        &run_dir.join("memory.json"),
        serde_json::to_string_pretty(&report)
            .expect("json")
            .as_bytes(),
    )?;
    let _ = m.encoder();
    Ok(Summary {
        run_dir: run_dir.to_path_buf(),
        steps: state.step,
        tokens: state.tokens,
        train_loss: history.recent_loss(10),
        val_loss,
        unigram_val_loss: baseline,
        peak_rss_bytes: peak,
        baseline_rss_bytes: baseline_rss,
        interrupted,
        val_accuracy: val_acc,
        baseline_name: match &data {
            Data::Mlm { .. } => None,
            Data::Cls { .. } => Some("label prior loss".into()),
        },
    })
}

/// `frugal eval --run DIR [--data FILE]` for an encoder run: `{"loss", "perplexity",
/// "tokens"}` (masked tokens scored, with the fixed validation masks) for a masked-LM run;
/// `{"loss", "accuracy", "examples", "tokens"}` for a classifier (`--data`: a TSV file).
/// `None` when `run_dir` is not an encoder run (the llama path then handles it).
pub fn eval_command(run_dir: &Path, data_spec: Option<&str>) -> Result<Option<serde_json::Value>> {
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
    let ck = checkpoint::latest(run_dir)?;
    let out = if cfg.objective() == "classification" {
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
        let mut m = EncoderModel::new(&cfg, &shape, Some(n), device)?;
        m.load(&ck.join("model.safetensors"))?;
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
        let mut m = EncoderModel::new(&cfg, &shape, None, device)?;
        m.load(&ck.join("model.safetensors"))?;
        let Net::Mlm(mlm) = &m.net else {
            unreachable!("built without labels")
        };
        let (loss, tokens) = evaluate_mlm(
            mlm,
            &ds,
            &toks,
            vocab,
            t.mlm_probability,
            t.batch_size,
            0,
            device,
        )?;
        json!({"loss": loss, "perplexity": loss.exp(), "tokens": tokens})
    };
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guarantee: masked-LM inputs start with the summary token, never select special tokens,
    /// depend on the seed only, and select about `prob` of the other tokens.
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
        let _ = x.narrow(1, 10, 1).fill_(0);
        let (ids, labels) = mlm_inputs(&x, &t, 103, 0.15, 7).unwrap();
        assert_eq!(ids.size(), [8, 64]);
        assert!(ids.select(1, 0).eq(101).all().int64_value(&[]) == 1);
        // Position 11 holds eos (x's column 10): never a label.
        assert!(labels.select(1, 11).eq(IGNORE_INDEX).all().int64_value(&[]) == 1);
        assert!(labels.select(1, 0).eq(IGNORE_INDEX).all().int64_value(&[]) == 1);
        let picked = labels.ne(IGNORE_INDEX).sum(Kind::Int64).int64_value(&[]);
        assert!((40..=120).contains(&picked), "{picked} of ~75");
        let (ids2, labels2) = mlm_inputs(&x, &t, 103, 0.15, 7).unwrap();
        assert!(ids2.equal(&ids) && labels2.equal(&labels));
        let (_, labels3) = mlm_inputs(&x, &t, 103, 0.15, 8).unwrap();
        assert!(!labels3.equal(&labels));
        assert_ne!(train_mask_seed(0, 1, 0), train_mask_seed(0, 2, 0));
        assert_ne!(train_mask_seed(0, 1, 0), train_mask_seed(0, 1, 1));
        assert_ne!(train_mask_seed(0, 1, 0), train_mask_seed(1, 1, 0));
        assert_eq!(val_mask_seed(3), val_mask_seed(3));
    }

    /// Guarantee: a classifier built over a masked-LM checkpoint takes its encoder body (every
    /// `bert.embeddings.*` / `bert.encoder.*` tensor, equal to the file's) and keeps its own
    /// fresh pooler and classifier; a file without the body is an error naming a tensor.
    #[test]
    fn pretrained_body_loads_and_the_head_is_new() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.model.kind = "encoder".into();
        cfg.model.size = "encoder-tiny".into();
        let shape = EncoderConfig::new(50, 16, 2, 2, 32, 32);
        let file = dir.path().join("model.safetensors");
        let mlm = EncoderModel::new(&cfg, &shape, None, tch::Device::Cpu).unwrap();
        mlm.save(&file).unwrap();
        cfg.train.seed = 9;
        let fresh = EncoderModel::new(&cfg, &shape, Some(3), tch::Device::Cpu).unwrap();
        let mut cls = EncoderModel::new(&cfg, &shape, Some(3), tch::Device::Cpu).unwrap();
        cls.load_pretrained(&file).unwrap();
        let want = frugal_models::weights::named_variables(&mlm.vs);
        let before = frugal_models::weights::named_variables(&fresh.vs);
        let mut body = 0;
        for ((n, t), (n0, t0)) in frugal_models::weights::named_variables(&cls.vs)
            .iter()
            .zip(&before)
        {
            assert_eq!(n, n0);
            if n.starts_with("bert.embeddings.") || n.starts_with("bert.encoder.") {
                let (_, w) = want.iter().find(|(m, _)| m == n).unwrap();
                assert!(t.equal(w), "{n} not loaded");
                body += 1;
            } else {
                assert!(
                    n.starts_with("bert.pooler.") || n.starts_with("classifier."),
                    "{n}"
                );
                assert!(t.equal(t0), "{n} changed");
            }
        }
        assert_eq!(body, 5 + 2 * 16);
        let empty = dir.path().join("empty.safetensors");
        frugal_core::safetensors_io::save(
            &empty,
            &[(
                "x".to_string(),
                Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)),
            )],
            None,
        )
        .unwrap();
        let err = cls.load_pretrained(&empty).unwrap_err().to_string();
        assert!(err.contains("bert."), "{err}");
    }
}
