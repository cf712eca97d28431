//! The seams of the one training loop ([`crate::trainer`]):
//!
//! - a [`Task`] is a model with its data and objective: what a micro-batch is, how its loss is
//!   computed (and, where the model is built of blocks, the block-by-block step of
//!   [`crate::step`]), how it is evaluated, what a checkpoint holds of it, and what its memory
//!   report adds. The tasks: causal LM ([`crate::task_lm`]: llama, hgrn-bit), masked LM and
//!   sequence classification ([`crate::task_encoder`]: the BERT-style encoder).
//! - a [`Hook`] is a method's steps inside the loop (CoMERA's rank adaptation in
//!   [`crate::comera`], the adapters' dropout seeding in [`AdapterSeed`]): it may change the
//!   term a micro-batch backpropagates, skip the main update, act after it (and change the
//!   parameters, as pruning does), add metrics, files to checkpoints and memory to the report.
//!
//! A new objective is a new `Task`; a new method that acts around the update is a new `Hook`;
//! neither touches the loop.

use crate::checkpoint::TrainerState;
use crate::config::Objective;
use crate::memplan::MemoryPlan;
use crate::step::BlockModel;
use frugal_core::Result;
use frugal_optim::Optimizer;
use frugal_records::{MemoryReport, MetricsLine};
use frugal_tt::TtLayer;
use std::path::Path;
use tch::nn::VarStore;
use tch::Tensor;

/// A micro-batch on the model's device.
#[derive(Debug)]
pub struct Batch {
    /// The model's inputs (causal LM `[ids, targets]`, masked LM `[ids, labels]`,
    /// classification `[ids, types, mask, labels]`).
    pub inputs: Vec<Tensor>,
    /// Tokens in the micro-batch (padding included, as the model computes them).
    pub tokens: u64,
    /// Examples of the micro-batch that count towards a training accuracy (classification).
    pub examples: u64,
    /// What the loss is a mean over (masked tokens, scored targets), where that count varies
    /// from batch to batch: data parallelism then weighs each rank's loss by its share of the
    /// count, so that the ranks together compute one process's mean. None: every batch of the
    /// same size scores as many.
    pub scored: Option<u64>,
}

/// Where a micro-batch sits in the run: what masks or dropout draw from, so that a resumed
/// run, and a data-parallel one, draw what one uninterrupted process would.
#[derive(Debug, Clone, Copy)]
pub struct BatchAt {
    /// The optimizer step (counted from 1).
    pub step: u64,
    /// The position of the micro-batch's first example among all the examples the step
    /// draws (over micro-batches and ranks).
    pub first: usize,
    /// Pad to the longest example of the split (one shape for every batch: CUDA graphs).
    pub fixed_shape: bool,
}

/// A forward pass whose backward pass is still to run.
pub struct Forward<'a> {
    /// The mean loss of the micro-batch, with its graph.
    pub loss: Tensor,
    /// Examples classified right (a 0-dim tensor; classification only).
    pub correct: Option<Tensor>,
    /// The rest of the backward pass, after the loss's (blocks recomputed under activation
    /// checkpointing).
    pub rest: Option<Box<dyn FnOnce() + 'a>>,
}

/// The result of an evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Mean loss over the scored tokens or examples.
    pub loss: f64,
    /// Share of the examples classified right (classification).
    pub accuracy: Option<f64>,
}

/// The loss a model without training would reach, drawn beside the curve.
#[derive(Debug, Clone, Copy)]
pub struct Baseline {
    /// The loss.
    pub loss: f64,
    /// Its name in messages ("unigram", "label prior").
    pub name: &'static str,
    /// Its name in the summary, when not the unigram model's.
    pub summary_name: Option<&'static str>,
}

/// A model, its data and its objective, as the trainer drives them (see the module
/// documentation).
pub trait Task {
    /// The objective (never `Auto`).
    fn objective(&self) -> Objective;

    /// The model's variables.
    fn vs(&self) -> &VarStore;

    /// The parameters the optimizer steps, by name (every variable, or an adapter's).
    fn trainable(&self) -> Vec<(String, Tensor)>;

    /// Saves the weights a checkpoint holds (`model.safetensors`; an adapter run: the adapter
    /// in PEFT's files beside it).
    fn save(&self, file: &Path) -> Result<()>;

    /// After a checkpoint (rank 0): files the run folder keeps beside the checkpoints (the
    /// adapter's `adapter/` folder).
    fn after_checkpoint(&self, _run_dir: &Path) -> Result<()> {
        Ok(())
    }

    /// Every tensor-train layer (word table, linear layers) with its full name.
    fn tt_layers(&self) -> Vec<(String, &dyn TtLayer)>;

    /// [`Task::tt_layers`], mutable, with the variables they live in (to prune them).
    fn tt_layers_mut(&mut self) -> (Vec<(String, &mut dyn TtLayer)>, &VarStore);

    /// Training mode (dropout) on or off.
    fn set_training(&mut self, _training: bool) {}

    /// Examples the sampler draws from.
    fn num_examples(&self) -> usize;

    /// The micro-batch of the examples `idx`, on the model's device.
    fn batch(&self, idx: &[usize], at: BatchAt) -> Result<Batch>;

    /// The forward pass of a micro-batch. `checkpointing`: keep only each block's input and
    /// recompute the block in the backward pass; `recordable`: shapes that do not depend on
    /// the data and no read back to the host (what a CUDA graph records), the same loss.
    fn forward(
        &self,
        inputs: &[Tensor],
        checkpointing: bool,
        recordable: bool,
    ) -> Result<Forward<'_>>;

    /// The model block by block ([`crate::step`]: per-layer updates, activation checkpointing,
    /// a chunked cross-entropy, gradients announced as they complete), where it runs so; None
    /// where it does not.
    fn blocks(&self) -> Option<&dyn BlockModel> {
        None
    }

    /// Scores the validation split (`max_batches` batches; 0: all of it).
    fn evaluate(&mut self, max_batches: usize) -> Result<Evaluation>;

    /// The baseline loss of the validation split.
    fn baseline(&self) -> Baseline;

    /// The model in one line ("llama tiny (1.2M parameters)").
    fn describe(&self) -> String;

    /// The memory plan computed from shapes (`frugal train --dry-run`) and the same for plain
    /// AdamW, where the model has one.
    fn memory_plan(&self) -> Option<(MemoryPlan, MemoryPlan)> {
        None
    }

    /// Adds the task's own parts to `memory.json` (the frozen base of an adapter run, the
    /// model).
    fn add_memory_report(&self, _report: &mut MemoryReport) {}
}

/// What a hook did after the update.
#[derive(Debug, Clone, Default)]
pub struct AfterStep {
    /// The model's parameters are new tensors (pruned): the loop fetches them again and
    /// captures a CUDA graph again.
    pub params_changed: bool,
    /// A message for the progress display.
    pub message: Option<String>,
}

/// A method's steps inside the loop (see the module documentation). Every method has a
/// default that does nothing.
pub trait Hook {
    /// Before step `step`'s first micro-batch.
    fn begin_step(&mut self, _step: u64) {}

    /// Whether the hook needs each micro-batch's loss as a tensor before its backward pass
    /// ([`Hook::loss_term`]); the loop then runs the forward pass and the backward pass apart
    /// (no per-layer updates: the config refuses them with such hooks).
    fn needs_loss(&self) -> bool {
        false
    }

    /// The term micro-batch `loss` of step `step` backpropagates (the loss itself by
    /// default); None: no loss gradient this step (the loop skips the step's other
    /// micro-batches).
    fn loss_term(&mut self, _step: u64, loss: &Tensor, _task: &dyn Task) -> Option<Tensor> {
        Some(loss.shallow_clone())
    }

    /// [`Hook::loss_term`] inside a CUDA graph capture (no read back to the host), for the
    /// stage [`Hook::graph_key`] names.
    fn recorded_term(&self, _step: u64, loss: &Tensor, _task: &dyn Task) -> Tensor {
        loss.shallow_clone()
    }

    /// What a captured graph depends on at step `step` (a graph is captured again when it
    /// changes).
    fn graph_key(&self, _step: u64) -> u64 {
        0
    }

    /// After a replayed graph: whether step `step` skips its other micro-batches, given the
    /// loss of its first.
    fn skips_rest(&mut self, _step: u64, _loss: f64, _task: &dyn Task) -> bool {
        false
    }

    /// Whether something happens on the host between the backward pass and the update (the
    /// optimizer then stays out of a CUDA graph).
    fn acts_between(&self) -> bool {
        false
    }

    /// Whether the main optimizer steps at step `step`.
    fn steps_main(&self, _step: u64) -> bool {
        true
    }

    /// Gradients of the hook's own parameters that data parallelism must average before
    /// [`Hook::after_step`].
    fn own_grads(&self) -> Vec<Tensor> {
        Vec::new()
    }

    /// After the main update of step `step`.
    fn after_step(
        &mut self,
        _step: u64,
        _opt: &mut dyn Optimizer,
        _task: &mut dyn Task,
    ) -> Result<AfterStep> {
        Ok(AfterStep::default())
    }

    /// Adds the hook's fields to step `step`'s `metrics.jsonl` line; `full`: an evaluation or
    /// a change of the parameters (the expensive fields too).
    fn add_metrics(&self, _step: u64, _task: &dyn Task, _full: bool, _line: &mut MetricsLine) {}

    /// Draws the hook's plots from the metrics so far into the run folder.
    fn plot(&self, _lines: &[MetricsLine], _run_dir: &Path) {}

    /// Optimizers whose state checkpoints hold beside `optimizer.safetensors`, by file name.
    fn optimizers(&self) -> Vec<(&'static str, &dyn Optimizer)> {
        Vec::new()
    }

    /// Writes the hook's state into the trainer state (saved with each checkpoint).
    fn save_state(&self, _state: &mut TrainerState) {}

    /// Restores the hook's state from checkpoint `ck`.
    fn restore(&mut self, _ck: &Path, _state: &TrainerState) -> Result<()> {
        Ok(())
    }

    /// Adds the hook's parts to `memory.json` at the end of a run of `step` steps.
    fn add_memory_report(&self, _step: u64, _task: &dyn Task, _report: &mut MemoryReport) {}
}

/// The adapters' dropout draws from torch's generator: seeded per step, so that a resumed run
/// draws what the uninterrupted one drew.
#[derive(Debug, Clone, Copy)]
pub struct AdapterSeed {
    /// `train.seed`.
    pub seed: u64,
}

impl Hook for AdapterSeed {
    fn begin_step(&mut self, step: u64) {
        tch::manual_seed(self.seed as i64 ^ (step as i64).wrapping_mul(0x9E37_79B9));
    }
}
