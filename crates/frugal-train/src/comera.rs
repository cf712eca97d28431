//! CoMERA's rank-adaptive two-stage training (arXiv 2405.14377, Sec. 3.2) as the trainer runs
//! it (`tt.rank_adapt = true`; `docs/comera.md`). The math (penalty, size, proxy, the late
//! stage's choice, slicing) is `frugal_tt`'s; this module is the glue the loop calls:
//!
//! - [`Comera::new`] takes the rank variables (`{layer}.rank_vars.{i}`) out of the model's
//!   parameters into their own plain AdamW (`tt.rank_lr`, constant, no weight decay); the cores
//!   and every other parameter stay with `optim`.
//! - [`Comera::loss_term`], per micro-batch: the **early stage** (steps `1..=tt.early_steps`)
//!   backpropagates `loss + penalty_weight · penalty`, the penalty being the mean over the TT
//!   layers of each layer's [`frugal_tt::RankedCores::penalty`] (the mean magnitude of its live
//!   rank variables); the **late stage** lets [`ComeraSchedule::objective`] pick, from the
//!   first micro-batch's loss and the live size, `Loss` (an ordinary step of everything) or
//!   `Size` (no loss gradient: the loop skips the rest of the step's micro-batches and the
//!   main optimizer).
//! - [`Comera::after_step`], after the main optimizer: on a `Size` step the gradient of the
//!   size proxy (summed over layers) divided by the live size at the late stage's start; then
//!   the rank variables' step. Entries that were at the threshold before the step are set back
//!   to 0 after it (Adam's momentum would otherwise carry a pruned entry across zero and revive
//!   it), and a bond whose last live entry falls to the threshold keeps it at twice the
//!   threshold (a layer never loses a whole bond). Then, at the end of the early stage, every
//!   `tt.prune_every` late steps and at the last step, **physical pruning**: every TT layer
//!   whose live ranks are below its ranks is sliced ([`TtLayer::prune`]) and both optimizers
//!   swap their parameters for the sliced ones, slicing their moments
//!   ([`Optimizer::replace_parameter`]), so memory and time shrink and the state is kept.
//!
//! Checkpoints: the rank variables' optimizer state goes to [`TT_OPTIMIZER_FILE`] beside
//! `optimizer.safetensors`; the size latched at the late stage's start to `trainer_state.json`
//! (`tt_late_start_size`); pruned cores are in `model.safetensors` at their ranks.

use crate::checkpoint::TrainerState;
use crate::config::{OptimConfig, TtConfig};
use crate::plot::{self, Series};
use crate::task::{AfterStep, Hook, Task};
use frugal_core::{Error, Result};
use frugal_optim::{AdamW, AdamWConfig, Optimizer};
use frugal_records::{MemoryReport, MetricsLine, TtMetrics};
use frugal_tt::{ComeraSchedule, Objective, RankedCores, TtLayer};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// The rank variables' optimizer state in a checkpoint folder (AdamW's format, as
/// `optimizer.safetensors`).
pub const TT_OPTIMIZER_FILE: &str = "optimizer_tt.safetensors";

/// The model's rank penalty: the mean over the layers of each layer's
/// [`RankedCores::penalty`] (differentiable in the rank variables).
pub fn penalty(layers: &[(String, &dyn TtLayer)]) -> Tensor {
    let mut total = Tensor::zeros([], (Kind::Float, layers[0].1.ranked().device()));
    for (_, l) in layers {
        total += l.ranked().penalty();
    }
    total / layers.len().max(1) as f64
}

/// The model's live TT size: the sum of the layers' [`RankedCores::live_size`].
pub fn live_size(layers: &[(String, &dyn TtLayer)]) -> i64 {
    layers.iter().map(|(_, l)| l.ranked().live_size()).sum()
}

/// The cores' parameters as stored (pruned entries included until physically pruned).
pub fn stored_params(layers: &[(String, &dyn TtLayer)]) -> i64 {
    layers.iter().map(|(_, l)| l.ranked().num_params()).sum()
}

/// The parameters the layers would have as dense weights ([`TtLayer::dense_params`]).
pub fn dense_params(layers: &[(String, &dyn TtLayer)]) -> i64 {
    layers.iter().map(|(_, l)| l.dense_params()).sum()
}

/// The live ranks of every layer, by name.
pub fn live_ranks(layers: &[(String, &dyn TtLayer)]) -> BTreeMap<String, Vec<i64>> {
    layers
        .iter()
        .map(|(n, l)| (n.clone(), l.ranked().live_ranks()))
        .collect()
}

/// Reborrows mutable layers as shared ones.
fn shared<'a>(layers: &'a [(String, &mut dyn TtLayer)]) -> Vec<(String, &'a dyn TtLayer)> {
    layers.iter().map(|(n, l)| (n.clone(), &**l)).collect()
}

/// `"early"` or `"late"`.
pub fn stage_name(o: Objective) -> &'static str {
    match o {
        Objective::LossPlusPenalty(_) => "early",
        _ => "late",
    }
}

/// `"loss+penalty"`, `"loss"` or `"size"` (the `tt_objective` of `metrics.jsonl`).
pub fn objective_name(o: Objective) -> &'static str {
    match o {
        Objective::LossPlusPenalty(_) => "loss+penalty",
        Objective::Loss => "loss",
        Objective::Size => "size",
    }
}

/// What [`Comera::after_step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// The step's objective.
    pub objective: Objective,
    /// Whether layers were physically pruned (the model's parameters are new tensors: the loop
    /// must fetch them again).
    pub pruned: bool,
}

/// The rank-adaptation state of a run (see the module documentation).
#[derive(Debug)]
pub struct Comera {
    schedule: ComeraSchedule,
    threshold: f64,
    prune_every: u64,
    max_steps: u64,
    rank_opt: AdamW,
    current: Option<(u64, Objective)>,
}

impl Comera {
    /// Sets `tt.threshold` (of section `tt`) on every TT layer of `layers` and takes their rank
    /// variables out of `params` (the model's named parameters) into their own AdamW (the
    /// moments' settings of section `optim`, `tt.rank_lr`, no weight decay); `max_steps`: the
    /// run's last step, where it prunes. Returns the state and the other parameters, for the
    /// main optimizer. No TT layer is an error naming `model.linear`.
    pub fn new(
        tt: &TtConfig,
        optim: &OptimConfig,
        max_steps: u64,
        layers: &mut [(String, &mut dyn TtLayer)],
        params: Vec<(String, Tensor)>,
    ) -> Result<(Self, Vec<(String, Tensor)>)> {
        if layers.is_empty() {
            return Err(Error::config(
                "model.linear",
                "tt.rank_adapt = true, but the model has no tensor-train layer \
                 (model.linear.kind = \"tt\" or model.embedding.kind = \"tt\")",
            ));
        }
        let schedule = ComeraSchedule::new(tt.comera())?;
        let mut rank_names = HashSet::new();
        for (_, l) in layers.iter_mut() {
            l.ranked_mut().set_threshold(tt.threshold);
            rank_names.extend(l.ranked().rank_var_names().iter().cloned());
        }
        let (rank, main): (Vec<_>, Vec<_>) = params
            .into_iter()
            .partition(|(n, _)| rank_names.contains(n));
        if rank.len() != rank_names.len() {
            return Err(Error::Msg(format!(
                "tt.rank_adapt: {} rank variables in the layers, {} among the parameters",
                rank_names.len(),
                rank.len()
            )));
        }
        let rank_opt = AdamW::new(
            rank,
            AdamWConfig {
                weight_decay: 0.0,
                ..optim.adamw(tt.rank_lr)
            },
        );
        Ok((
            Comera {
                schedule,
                threshold: tt.threshold,
                prune_every: tt.prune_every,
                max_steps,
                rank_opt,
                current: None,
            },
            main,
        ))
    }

    /// The schedule (config, latched size).
    pub fn schedule(&self) -> &ComeraSchedule {
        &self.schedule
    }

    /// The rank variables' optimizer.
    pub fn rank_optimizer(&self) -> &dyn Optimizer {
        &self.rank_opt
    }

    /// The objective of step `step` (counted from 1, as the loop's): decided once per step,
    /// from `loss` (the step's first micro-batch) and the live size, by
    /// [`ComeraSchedule::objective`]; later calls for the same step return the same.
    pub fn objective(
        &mut self,
        step: u64,
        loss: f64,
        layers: &[(String, &dyn TtLayer)],
    ) -> Objective {
        if let Some((s, o)) = self.current {
            if s == step {
                return o;
            }
        }
        let size = live_size(layers) as f64;
        let o = self.schedule.objective(step.saturating_sub(1), loss, size);
        self.current = Some((step, o));
        o
    }

    /// The penalty weight of step `step` in the early stage, `None` in the late stage (known
    /// before the step's loss: what a captured step backpropagates).
    pub fn penalty_weight_at(&self, step: u64) -> Option<f64> {
        let c = self.schedule.config();
        (step.saturating_sub(1) < c.early_steps).then_some(c.penalty_weight)
    }

    /// The step's current objective, once decided.
    pub fn current(&self, step: u64) -> Option<Objective> {
        self.current.filter(|(s, _)| *s == step).map(|(_, o)| o)
    }

    /// What to backpropagate for a micro-batch of step `step` whose (mean) loss is `loss`:
    /// `loss + w · penalty` early, `loss` on a late `Loss` step, nothing on a `Size` step
    /// (then the rest of the step's micro-batches and the main optimizer's step are skipped).
    pub fn loss_term(
        &mut self,
        step: u64,
        loss: &Tensor,
        layers: &[(String, &dyn TtLayer)],
    ) -> (Option<Tensor>, Objective) {
        let o = self.objective(step, loss.double_value(&[]), layers);
        let term = match o {
            Objective::LossPlusPenalty(w) => Some(loss + penalty(layers) * w),
            Objective::Loss => Some(loss.shallow_clone()),
            Objective::Size => None,
        };
        (term, o)
    }

    /// Whether the main optimizer steps at `step` (not on a `Size` step).
    pub fn steps_main(&self, step: u64) -> bool {
        self.current(step) != Some(Objective::Size)
    }

    /// After the step's backward passes (and the main optimizer's step): the size gradient on a
    /// `Size` step, the rank variables' step, and physical pruning when due (`opt` holds the
    /// cores, `vs` the model's variables).
    pub fn after_step(
        &mut self,
        step: u64,
        opt: &mut dyn Optimizer,
        layers: &mut [(String, &mut dyn TtLayer)],
        vs: &VarStore,
    ) -> Result<StepReport> {
        let objective = self.current(step).ok_or_else(|| {
            Error::Msg(format!(
                "step {step}: no objective decided (loss_term not called)"
            ))
        })?;
        if objective == Objective::Size {
            self.rank_opt.zero_grad();
            let start = self
                .schedule
                .late_start_size()
                .expect("latched by the first late step");
            let view = shared(layers);
            let mut proxy = Tensor::zeros([], (Kind::Float, view[0].1.ranked().device()));
            for (_, l) in &view {
                proxy += l.ranked().size_proxy();
            }
            (proxy / start.max(1.0)).backward();
        }
        self.step_rank_vars(layers)?;
        self.rank_opt.zero_grad();
        let pruned = if self.prune_due(step) {
            self.prune(opt, layers, vs)?
        } else {
            false
        };
        Ok(StepReport { objective, pruned })
    }

    /// Whether step `step` ends with physical pruning: the end of the early stage, every
    /// `prune_every` late steps, the last step.
    pub fn prune_due(&self, step: u64) -> bool {
        let early = self.schedule.config().early_steps;
        step == early
            || step == self.max_steps
            || (step > early
                && self.prune_every > 0
                && (step - early).is_multiple_of(self.prune_every))
    }

    /// The rank variables' AdamW step, with pruned entries kept at 0 and one live entry kept
    /// per bond (see the module documentation).
    fn step_rank_vars(&mut self, layers: &[(String, &mut dyn TtLayer)]) -> Result<()> {
        let before: Vec<(Tensor, Tensor)> = layers
            .iter()
            .flat_map(|(_, l)| {
                let r = l.ranked();
                r.rank_vars()
                    .iter()
                    .map(|d| d.shallow_clone())
                    .zip(r.masks())
                    .collect::<Vec<_>>()
            })
            .collect();
        self.rank_opt.step()?;
        let thr = self.threshold;
        tch::no_grad(|| {
            for (d, mask) in before {
                let mut d = d;
                let _ = d.f_mul_(&mask.to_kind(d.kind()));
                let any_live = d.abs().gt(thr).any().int64_value(&[]) != 0;
                let had_live = mask.any().int64_value(&[]) != 0;
                if !any_live && had_live {
                    let i = d.abs().argmax(0, false).reshape([1]);
                    let sign = if d.index_select(0, &i).double_value(&[0]) < 0.0 {
                        -1.0
                    } else {
                        1.0
                    };
                    let _ = d.index_fill_(0, &i, sign * 2.0 * thr);
                }
            }
        });
        Ok(())
    }

    /// Physical pruning of every TT layer whose live ranks are below its ranks: the layer is
    /// sliced in `vs` and both optimizers swap its cores and rank variables for the sliced
    /// ones, moments sliced alike. Returns whether any layer was pruned.
    pub fn prune(
        &mut self,
        opt: &mut dyn Optimizer,
        layers: &mut [(String, &mut dyn TtLayer)],
        vs: &VarStore,
    ) -> Result<bool> {
        let mut any = false;
        for (name, layer) in layers.iter_mut() {
            let r = layer.ranked();
            if r.live_ranks() == r.ranks() {
                continue;
            }
            let kept = layer.prune(vs)?;
            let r = layer.ranked();
            let context = |e: Error| Error::Msg(format!("pruning {name}: {e}"));
            for (k, (n, core)) in r.core_names().iter().zip(r.cores()).enumerate() {
                let slice = |t: &Tensor| Ok(RankedCores::slice_core_state(&kept, k, t));
                opt.replace_parameter(n, core.shallow_clone(), &slice)
                    .map_err(context)?;
            }
            for (i, (n, d)) in r.rank_var_names().iter().zip(r.rank_vars()).enumerate() {
                let slice = |t: &Tensor| Ok(RankedCores::slice_rank_state(&kept, i, t));
                self.rank_opt
                    .replace_parameter(n, d.shallow_clone(), &slice)
                    .map_err(context)?;
            }
            any = true;
        }
        Ok(any)
    }

    /// Adds the step's `tt_*` fields to a `metrics.jsonl` line: `tt_size` (live TT parameters),
    /// `tt_params` (stored core parameters), `tt_compression` (dense parameters of the TT layers
    /// over `tt_size`), `tt_stage`, `tt_objective`, `tt_size_target` once latched, and with
    /// `ranks` the live ranks per layer (`tt_ranks`).
    pub fn add_metrics(
        &self,
        step: u64,
        layers: &[(String, &dyn TtLayer)],
        ranks: bool,
        line: &mut MetricsLine,
    ) {
        line.set_tt(self.metrics(step, layers, ranks));
    }

    /// The `tt_*` fields of [`Comera::add_metrics`].
    pub fn metrics(&self, step: u64, layers: &[(String, &dyn TtLayer)], ranks: bool) -> TtMetrics {
        let size = live_size(layers);
        let current = self.current(step);
        TtMetrics {
            tt_size: size,
            tt_params: stored_params(layers),
            tt_compression: dense_params(layers) as f64 / size.max(1) as f64,
            tt_stage: current.map(|o| stage_name(o).into()),
            tt_objective: current.map(|o| objective_name(o).into()),
            tt_size_target: self.schedule.size_target(),
            tt_ranks: ranks.then(|| live_ranks(layers)),
        }
    }

    /// Records what a checkpoint needs beyond the optimizers: the latched size.
    pub fn save_state(&self, state: &mut TrainerState) {
        state.tt_late_start_size = self.schedule.late_start_size();
    }

    /// Restores the rank variables' optimizer from checkpoint folder `ck` and the latched size
    /// from its trainer state.
    pub fn restore(&mut self, ck: &Path, state: &TrainerState) -> Result<()> {
        self.rank_opt.load(&ck.join(TT_OPTIMIZER_FILE))?;
        self.schedule.set_late_start_size(state.tt_late_start_size);
        Ok(())
    }
}

/// CoMERA as a hook of the one loop ([`crate::trainer`]): each micro-batch backpropagates
/// [`Comera::loss_term`]'s term, a size step skips the rest of the step and the main update,
/// [`Comera::after_step`] follows the main update, and the rank variables' optimizer and the
/// latched size go into checkpoints.
impl Hook for Comera {
    fn needs_loss(&self) -> bool {
        true
    }

    fn loss_term(&mut self, step: u64, loss: &Tensor, task: &dyn Task) -> Option<Tensor> {
        Comera::loss_term(self, step, loss, &task.tt_layers()).0
    }

    fn recorded_term(&self, step: u64, loss: &Tensor, task: &dyn Task) -> Tensor {
        match self.penalty_weight_at(step) {
            Some(w) => loss + penalty(&task.tt_layers()) * w,
            None => loss.shallow_clone(),
        }
    }

    fn graph_key(&self, step: u64) -> u64 {
        // The early stage's weight, or the late stage (the loss alone).
        self.penalty_weight_at(step)
            .map_or(0, |w| w.to_bits().wrapping_add(1))
    }

    fn skips_rest(&mut self, step: u64, loss: f64, task: &dyn Task) -> bool {
        self.objective(step, loss, &task.tt_layers()) == Objective::Size
    }

    fn acts_between(&self) -> bool {
        true
    }

    fn steps_main(&self, step: u64) -> bool {
        Comera::steps_main(self, step)
    }

    fn after_step(
        &mut self,
        step: u64,
        opt: &mut dyn Optimizer,
        task: &mut dyn Task,
    ) -> Result<AfterStep> {
        let report = {
            let (mut layers, vs) = task.tt_layers_mut();
            Comera::after_step(self, step, opt, &mut layers, vs)?
        };
        let message = report.pruned.then(|| {
            let layers = task.tt_layers();
            let size = live_size(&layers);
            format!(
                "step {step}: TT layers pruned to {size} parameters ({:.1}x compression)",
                dense_params(&layers) as f64 / size.max(1) as f64
            )
        });
        Ok(AfterStep {
            params_changed: report.pruned,
            message,
        })
    }

    fn add_metrics(&self, step: u64, task: &dyn Task, full: bool, line: &mut MetricsLine) {
        Comera::add_metrics(self, step, &task.tt_layers(), full, line);
    }

    fn plot(&self, lines: &[MetricsLine], run_dir: &Path) {
        plot_ranks(lines, &run_dir.join("ranks.png"));
    }

    fn optimizers(&self) -> Vec<(&'static str, &dyn Optimizer)> {
        vec![(TT_OPTIMIZER_FILE, &self.rank_opt)]
    }

    fn save_state(&self, state: &mut TrainerState) {
        Comera::save_state(self, state);
    }

    fn restore(&mut self, ck: &Path, state: &TrainerState) -> Result<()> {
        Comera::restore(self, ck, state)
    }

    fn add_memory_report(&self, step: u64, task: &dyn Task, report: &mut MemoryReport) {
        report.tt = Some(self.metrics(step, &task.tt_layers(), true));
    }
}

/// Draws `ranks.png`: the live TT size (as a percentage of the first logged one) and the
/// compression (dense / live TT parameters) over the steps of `lines` (`metrics.jsonl`).
pub fn plot_ranks(lines: &[MetricsLine], path: &Path) {
    let size: Vec<(f64, f64)> = lines
        .iter()
        .filter_map(|l| Some((l.step as f64, l.tt_size? as f64)))
        .collect();
    let Some(&(_, first)) = size.first() else {
        return;
    };
    let size_pct: Vec<(f64, f64)> = size
        .iter()
        .map(|&(s, v)| (s, 100.0 * v / first.max(1.0)))
        .collect();
    let compression: Vec<(f64, f64)> = lines
        .iter()
        .filter_map(|l| Some((l.step as f64, l.tt_compression?)))
        .collect();
    let target: Vec<(f64, f64)> = lines
        .iter()
        .filter_map(|l| Some((l.step as f64, 100.0 * l.tt_size_target? / first.max(1.0))))
        .collect();
    let series = [
        Series {
            name: "live TT size (% of step 1)",
            points: &size_pct,
            rgb: [31, 119, 180],
        },
        Series {
            name: "compression (x, dense / live TT)",
            points: &compression,
            rgb: [214, 39, 40],
        },
        Series {
            name: "size target (%)",
            points: &target,
            rgb: [150, 150, 150],
        },
    ];
    if let Err(e) = plot::write_loss_png(
        path,
        "tensor-train size and compression",
        "step",
        "% of initial size / compression (x)",
        &series,
    ) {
        eprintln!("frugal: warning: cannot write {}: {e}", path.display());
    }
}
