//! The encoder's tasks (`model.kind = "encoder"`):
//!
//! - **masked LM** (`train.objective = "mlm"`, the encoders' default) on the text pipeline of
//!   the causal-LM task (same corpus, same packing, the same tokenizer with the encoder's special
//!   tokens appended, see [`crate::tokenize::add_encoder_tokens`]). Each sequence is `<|cls|>`
//!   followed by `seq_len - 1` tokens of the packed stream; BERT's rule selects
//!   `train.mlm_probability` of the non-special tokens (80% mask, 10% random, 10% kept). Each
//!   example's masks draw from a seed of (`train.seed`, the step, its position among the step's
//!   examples), so a resumed run draws the masks of an uninterrupted one, and two data-parallel
//!   ranks those of one process with twice the batch; validation sequence i always gets the
//!   same masks (a seed of i alone), so validation losses compare across evaluations, runs and
//!   `frugal eval`.
//! - **sequence classification** (`train.objective = "classification"`) on TSV examples
//!   (`data.task_path`, `data.task_val_path`, see [`crate::tsv`]), usually from a pre-trained
//!   encoder (`model.from_pretrained`: a run folder or a model folder; its masked-LM head is
//!   dropped, pooler and classifier start fresh). Under `train.cuda_graph` batches are padded
//!   to the longest example (one shape).
//!
//! With `adapter.kind` set, an adapter trains on the frozen pre-trained base (see
//! [`crate::encoder_adapter`]); checkpoints hold the adapter alone (with a classifier's new
//! head), and the run folder's `adapter/` the latest one.
//!
//! The run folder also holds `config.json` (the shape, Hugging Face `BertConfig` names) and,
//! for classification, `labels.json` (labels by class id). Activation checkpointing
//! (`train.checkpointing`) keeps only the blocks' inputs and recomputes them in the backward
//! pass ([`frugal_models::encoder::Checkpointed`]).

use crate::config::{Config, Objective};
use crate::data::Document;
use crate::encoder_eval::{evaluate_cls, evaluate_mlm};
use crate::encoder_io::{
    example_texts, label_map, mlm_inputs, pretrained_dir, pretrained_weights, prior_loss, shape,
    task_examples, tokenizer, train_mask_seed, write_shape, Data,
};
use crate::encoder_model::{micro_loss, EncoderModel, Net};
use crate::run;
use crate::step::BlockModel;
use crate::task::{Baseline, Batch, BatchAt, Evaluation, Forward, Task};
use crate::task_setup::{
    baseline_now, frozen_base_bytes, rank0_first, write_resolved_config, Built,
};
use crate::tokenize::EncoderTokens;
use crate::tsv;
use frugal_core::{atomic, Error, Result};
use frugal_dist::Collective;
use frugal_models::encoder::IGNORE_INDEX;
use frugal_records::{MemoryReport, ModelInfo};
use frugal_tt::TtLayer;
use std::path::Path;
use tch::nn::VarStore;
use tch::Tensor;

/// A masked-LM or classification task of the encoder (see the module documentation).
pub struct EncoderTask {
    model: EncoderModel,
    data: Data,
    toks: EncoderTokens,
    vocab: i64,
    baseline: f64,
    /// The padded length of every classification batch (0: each batch its own longest).
    pad_to: usize,
    /// What the optimizer trains in an adapter run (None: every variable).
    adapter_params: Option<Vec<(String, Tensor)>>,
    cfg: Config,
    device: tch::Device,
}

impl EncoderTask {
    /// Sets the task up for `cfg` in `run_dir` on `device`, from checkpoint `checkpoint` when
    /// resuming; every rank of `dist` calls it (rank 0 alone writes files, after the others
    /// have read what they need).
    pub fn build(
        cfg: &Config,
        run_dir: &Path,
        checkpoint: Option<&Path>,
        device: tch::Device,
        dist: &mut dyn Collective,
    ) -> Result<Built<Self>> {
        let t = &cfg.train;
        let resume = checkpoint.is_some();
        let main = dist.is_main();
        let classification = cfg.objective() == Objective::Classification;
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
        // Rank 0 makes the tokenizer and writes it; the others read that file.
        let (tok, toks) = rank0_first(dist, resume, |resume| {
            tokenizer(cfg, run_dir, resume, &texts)
        })?;
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
        if main && !resume {
            write_resolved_config(cfg, run_dir)?;
            let labels = match &data {
                Data::Cls { labels, .. } => {
                    atomic::write(&run_dir.join("labels.json"), labels.to_json().as_bytes())?;
                    Some(labels)
                }
                Data::Mlm { .. } => None,
            };
            write_shape(run_dir, &shape, &toks, labels)?;
        }
        if main {
            match &data {
                Data::Mlm { train, val } => eprintln!(
                    "frugal: {} training tokens ({} sequences of {}), {} validation tokens, \
                     vocabulary {vocab}",
                    train.tokens().len(),
                    train.num_sequences(),
                    t.seq_len,
                    val.tokens().len()
                ),
                Data::Cls { train, val, labels } => eprintln!(
                    "frugal: {} training and {} validation examples, {} labels, vocabulary \
                     {vocab}",
                    train.len(),
                    val.len(),
                    labels.labels.len()
                ),
            }
        }

        let baseline_rss_bytes = baseline_now(device);
        let adapter = cfg.adapter.enabled();
        let mut model = EncoderModel::new(&cfg.model_build(), &shape, num_labels, device)?;
        // An adapter run's base is always the pre-trained model's; its checkpoints hold the
        // adapter alone.
        match (checkpoint, pretrained_dir(cfg)) {
            (Some(ck), _) if !adapter => model.load(&ck.join("model.safetensors"))?,
            (_, Some(dir)) => {
                let file = pretrained_weights(&dir)?;
                let head = model.load_pretrained(&file)?;
                if adapter && num_labels.is_none() && !head {
                    return Err(Error::config(
                        "model.from_pretrained",
                        format!(
                            "{}: no masked-LM head (cls.predictions.*): a masked-LM adapter \
                             trains on the base's head, frozen",
                            file.display()
                        ),
                    ));
                }
            }
            (_, None) => {
                if adapter && main && !resume {
                    eprintln!(
                        "frugal: warning: an adapter on a randomly initialised base \
                         (model.from_pretrained is not set)"
                    );
                }
            }
        }
        let adapter_params = if adapter {
            let p = match checkpoint {
                Some(ck) => model.load_adapter(ck, &cfg.adapter.name)?,
                None => model.add_adapter(cfg)?,
            };
            model.set_training(true);
            Some(p)
        } else {
            None
        };
        let pad_to = match &data {
            Data::Cls { train, .. } if t.cuda_graph => train.longest(),
            _ => 0,
        };
        Ok(Built {
            task: Self {
                model,
                data,
                toks,
                vocab,
                baseline,
                pad_to,
                adapter_params,
                cfg: cfg.clone(),
                device,
            },
            baseline_rss_bytes,
        })
    }

    /// The model.
    pub fn model(&self) -> &EncoderModel {
        &self.model
    }

    /// The validation loss (and accuracy) of up to `max_batches` batches (0: all).
    fn score(&self, max_batches: usize) -> Result<Evaluation> {
        let t = &self.cfg.train;
        match (&self.model.net, &self.data) {
            (Net::Mlm(mlm), Data::Mlm { val, .. }) => {
                let (loss, _) = evaluate_mlm(
                    mlm,
                    val,
                    &self.toks,
                    self.vocab,
                    t.mlm_probability,
                    t.batch_size,
                    max_batches,
                    self.device,
                )?;
                Ok(Evaluation {
                    loss,
                    accuracy: None,
                })
            }
            (Net::Cls(c), Data::Cls { val, .. }) => {
                let (loss, acc, _) = evaluate_cls(c, val, t.batch_size, max_batches, self.device);
                Ok(Evaluation {
                    loss,
                    accuracy: Some(acc),
                })
            }
            _ => Err(Error::Msg("model and data of two objectives".into())),
        }
    }
}

impl Task for EncoderTask {
    fn objective(&self) -> Objective {
        match self.data {
            Data::Mlm { .. } => Objective::Mlm,
            Data::Cls { .. } => Objective::Classification,
        }
    }

    fn vs(&self) -> &VarStore {
        &self.model.vs
    }

    fn trainable(&self) -> Vec<(String, Tensor)> {
        match &self.adapter_params {
            Some(p) => p
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
            None => frugal_models::weights::named_variables(&self.model.vs),
        }
    }

    fn save(&self, file: &Path) -> Result<()> {
        self.model.save(file)
    }

    fn after_checkpoint(&self, run_dir: &Path) -> Result<()> {
        if self.model.adapter.is_some() {
            self.model.save_adapter(&run_dir.join("adapter"))?;
        }
        Ok(())
    }

    fn set_training(&mut self, training: bool) {
        if self.model.adapter.is_some() {
            self.model.set_training(training);
        }
    }

    fn tt_layers(&self) -> Vec<(String, &dyn TtLayer)> {
        self.model.tt_layers()
    }

    fn tt_layers_mut(&mut self) -> (Vec<(String, &mut dyn TtLayer)>, &VarStore) {
        self.model.tt_layers_mut()
    }

    fn num_examples(&self) -> usize {
        match &self.data {
            Data::Mlm { train, .. } => train.num_sequences(),
            Data::Cls { train, .. } => train.len(),
        }
    }

    fn batch(&self, idx: &[usize], at: BatchAt) -> Result<Batch> {
        let device = self.device;
        match &self.data {
            Data::Mlm { train, .. } => {
                let (x, _) = train.batch(idx);
                let seeds: Vec<u64> = (0..idx.len())
                    .map(|i| train_mask_seed(self.cfg.train.seed, at.step, at.first + i))
                    .collect();
                let prob = self.cfg.train.mlm_probability;
                let (ids, labels) = mlm_inputs(&x, &self.toks, self.vocab, prob, &seeds)?;
                let scored = labels
                    .ne(IGNORE_INDEX)
                    .sum(tch::Kind::Int64)
                    .int64_value(&[]);
                Ok(Batch {
                    tokens: x.numel() as u64,
                    inputs: vec![ids.to_device(device), labels.to_device(device)],
                    examples: 0,
                    scored: Some(scored as u64),
                })
            }
            Data::Cls { train, .. } => {
                let pad = if at.fixed_shape { self.pad_to } else { 0 };
                let b = train.batch_padded(idx, pad);
                Ok(Batch {
                    tokens: b.tokens,
                    inputs: [b.ids, b.types, b.mask, b.labels]
                        .iter()
                        .map(|x| x.to_device(device))
                        .collect(),
                    examples: idx.len() as u64,
                    scored: None,
                })
            }
        }
    }

    fn forward(
        &self,
        inputs: &[Tensor],
        checkpointing: bool,
        recordable: bool,
    ) -> Result<Forward<'_>> {
        let (loss, correct, ck) = micro_loss(&self.model, inputs, checkpointing, recordable);
        let encoder = self.model.encoder();
        Ok(Forward {
            loss,
            correct,
            rest: ck.map(|ck| Box::new(move || ck.backward(encoder)) as Box<dyn FnOnce()>),
        })
    }

    fn blocks(&self) -> Option<&dyn BlockModel> {
        Some(&self.model)
    }

    fn evaluate(&mut self, max_batches: usize) -> Result<Evaluation> {
        let training = self.model.adapter.is_some();
        self.model.set_training(false);
        let e = self.score(max_batches);
        if training {
            self.model.set_training(true);
        }
        e
    }

    fn baseline(&self) -> Baseline {
        match self.data {
            Data::Mlm { .. } => Baseline {
                loss: self.baseline,
                name: "unigram",
                summary_name: None,
            },
            Data::Cls { .. } => Baseline {
                loss: self.baseline,
                name: "label prior",
                summary_name: Some("label prior loss"),
            },
        }
    }

    fn describe(&self) -> String {
        let n: i64 = self.trainable().iter().map(|(_, t)| t.numel() as i64).sum();
        let m = &self.cfg.model;
        format!(
            "encoder {} ({}, {:.2}M {}parameters)",
            if m.from_pretrained.is_empty() {
                &m.size
            } else {
                &m.from_pretrained
            },
            self.objective(),
            n as f64 / 1e6,
            if self.model.adapter.is_some() {
                "trainable "
            } else {
                ""
            },
        )
    }

    fn add_memory_report(&self, report: &mut MemoryReport) {
        report.model = Some(ModelInfo {
            kind: "encoder".into(),
            size: self.cfg.model.size.clone(),
            objective: self.objective().as_str().into(),
        });
        if self.model.adapter.is_some() {
            report.frozen_base = Some(frozen_base_bytes(&self.model.linears(), &self.model.vs));
        }
    }
}
