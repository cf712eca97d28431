//! The causal-LM task (`train.objective = "lm"`): the decoders (llama, hgrn-bit) learn the next
//! token of packed sequences of the training text. Its setup makes the tokenizer (rank 0 trains
//! or copies it, the other ranks read it), tokenizes both splits, writes the resolved config,
//! and builds the model: from a checkpoint, a pre-trained folder or a random initialisation,
//! with an adapter when `adapter.kind` asks for one (the frozen base is always the pre-trained
//! model's; checkpoints hold the adapter alone). It runs block by block ([`crate::step`]).

use crate::config::{Config, Objective};
use crate::data::TokenDataset;
use crate::memplan::MemoryPlan;
use crate::run;
use crate::step::BlockModel;
use crate::task::{Baseline, Batch, BatchAt, Evaluation, Forward, Task};
use crate::task_setup::{
    baseline_now, frozen_base_bytes, rank0_first, write_resolved_config, Built,
};
use frugal_core::{Error, Result};
use frugal_dist::Collective;
use frugal_models::decoder::DecoderConfig;
use frugal_records::MemoryReport;
use frugal_tt::TtLayer;
use std::path::Path;
use tch::nn::VarStore;
use tch::Tensor;

/// The causal-LM task (see the module documentation).
pub struct CausalLm {
    model: run::Model,
    shape: DecoderConfig,
    train: TokenDataset,
    val: TokenDataset,
    unigram: f64,
    params: Vec<(String, Tensor)>,
    cfg: Config,
    device: tch::Device,
}

impl CausalLm {
    /// Sets the task up for `cfg` in `run_dir` on `device`, from checkpoint `checkpoint` when
    /// resuming; every rank of `dist` calls it (rank 0 alone writes files).
    pub fn build(
        cfg: &Config,
        run_dir: &Path,
        checkpoint: Option<&Path>,
        device: tch::Device,
        dist: &mut dyn Collective,
    ) -> Result<Built<Self>> {
        let (main, world) = (dist.is_main(), dist.size());
        let t = &cfg.train;
        let resume = checkpoint.is_some();
        let (train_docs, val_docs) = run::documents(cfg)?;
        // Rank 0 makes the tokenizer (trained or copied) and writes it into the run folder;
        // the other ranks then read that file.
        let tok = rank0_first(dist, resume, |resume| {
            run::tokenizer(cfg, run_dir, &train_docs, resume)
        })?;
        let vocab = tok.get_vocab_size(true) as i64;
        let shape = cfg.decoder_config(vocab)?;
        if main {
            write_resolved_config(cfg, run_dir)?;
        }
        let train = run::dataset(&tok, &train_docs, t.seq_len, "training data")?;
        let val = run::dataset(&tok, &val_docs, t.seq_len, "validation data")?;
        drop((train_docs, val_docs));
        let unigram = run::unigram_loss(train.tokens(), val.tokens(), vocab as usize);
        if main {
            eprintln!(
                "frugal: {} training tokens ({} sequences of {}), {} validation tokens, \
                 vocabulary {vocab}{}",
                train.tokens().len(),
                train.num_sequences(),
                t.seq_len,
                val.tokens().len(),
                if world > 1 {
                    format!(
                        "; {world} processes, each {} sequences per micro-batch",
                        t.batch_size
                    )
                } else {
                    String::new()
                }
            );
        }

        let baseline_rss_bytes = baseline_now(device);
        let adapter = cfg.adapter.enabled();
        let weights = match checkpoint {
            Some(ck) if !adapter => Some(ck.join("model.safetensors")),
            _ => run::pretrained_weights(cfg),
        };
        if adapter && weights.is_none() {
            eprintln!(
                "frugal: warning: an adapter on a randomly initialised base \
                 (model.from_pretrained is not set)"
            );
        }
        let mut model = run::model(&cfg.model_build(), &shape, device, weights.as_deref())?;
        let params = if adapter {
            let p = match checkpoint {
                Some(ck) => model.load_adapter(ck, &cfg.adapter.name)?,
                None => model.add_adapter(cfg)?,
            };
            model.set_training(true);
            p
        } else {
            frugal_models::weights::named_variables(&model.vs)
        };
        Ok(Built {
            task: Self {
                model,
                shape,
                train,
                val,
                unigram,
                params,
                cfg: cfg.clone(),
                device,
            },
            baseline_rss_bytes,
        })
    }
}

impl Task for CausalLm {
    fn objective(&self) -> Objective {
        Objective::Lm
    }

    fn vs(&self) -> &VarStore {
        &self.model.vs
    }

    fn trainable(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()
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

    fn tt_layers(&self) -> Vec<(String, &dyn TtLayer)> {
        self.model.net.tt_layers()
    }

    fn tt_layers_mut(&mut self) -> (Vec<(String, &mut dyn TtLayer)>, &VarStore) {
        (self.model.net.tt_layers_mut(), &self.model.vs)
    }

    fn set_training(&mut self, training: bool) {
        self.model.set_training(training);
    }

    fn num_examples(&self) -> usize {
        self.train.num_sequences()
    }

    fn batch(&self, idx: &[usize], _at: BatchAt) -> Result<Batch> {
        let (x, y) = self.train.batch(idx);
        let scored = self
            .train
            .has_scored()
            .then(|| y.ne(-100).sum(tch::Kind::Int64).int64_value(&[]) as u64);
        Ok(Batch {
            tokens: x.numel() as u64,
            inputs: vec![x.to_device(self.device), y.to_device(self.device)],
            examples: 0,
            scored,
        })
    }

    fn forward(
        &self,
        inputs: &[Tensor],
        _checkpointing: bool,
        _recordable: bool,
    ) -> Result<Forward<'_>> {
        let [ids, targets] = inputs else {
            return Err(Error::Msg("a causal-LM batch is [ids, targets]".into()));
        };
        Ok(Forward {
            loss: self.model.net.loss(ids, targets),
            correct: None,
            rest: None,
        })
    }

    fn blocks(&self) -> Option<&dyn BlockModel> {
        Some(&self.model.net)
    }

    fn evaluate(&mut self, max_batches: usize) -> Result<Evaluation> {
        let training = self.model.adapter.is_some();
        self.model.set_training(false);
        let (loss, _) = run::evaluate(
            &self.model.net,
            &self.val,
            self.cfg.train.batch_size,
            max_batches,
            self.device,
        );
        if training {
            self.model.set_training(true);
        }
        Ok(Evaluation {
            loss,
            accuracy: None,
        })
    }

    fn baseline(&self) -> Baseline {
        Baseline {
            loss: self.unigram,
            name: "unigram",
            summary_name: None,
        }
    }

    fn describe(&self) -> String {
        let m = &self.cfg.model;
        let n: i64 = self.params.iter().map(|(_, t)| t.numel() as i64).sum();
        format!(
            "{} {} ({:.2}M {}parameters)",
            m.kind,
            if m.from_pretrained.is_empty() {
                &m.size
            } else {
                &m.from_pretrained
            },
            n as f64 / 1e6,
            if self.model.adapter.is_some() {
                "trainable "
            } else {
                ""
            },
        )
    }

    fn memory_plan(&self) -> Option<(MemoryPlan, MemoryPlan)> {
        self.shape
            .llama()
            .map(|s| crate::memplan::plan(&self.cfg, s))
    }

    fn add_memory_report(&self, report: &mut MemoryReport) {
        if self.model.adapter.is_some() {
            report.frozen_base = Some(frozen_base_bytes(&self.model.net.linears(), &self.model.vs));
        }
    }
}
