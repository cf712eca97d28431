//! The one training loop. [`Trainer::fit`] runs any [`Task`] (causal LM, masked LM,
//! classification) with one optimizer through the same steps:
//!
//! - the learning-rate schedule ([`crate::schedule`]), gradient accumulation over
//!   `train.grad_accum` micro-batches, global clipping (`train.max_grad_norm`; with per-layer
//!   updates by the previous step's norm, the first step unclipped);
//! - each micro-batch either block by block ([`Task::blocks`], where the task has blocks and
//!   no hook needs the loss: per-layer updates, activation checkpointing, a chunked
//!   cross-entropy, all-reduces overlapped with the backward pass), or as a forward pass whose
//!   loss the hooks may change ([`Hook::loss_term`]) before its backward pass;
//! - with `train.cuda_graph` on CUDA, after two eager steps the step captured as a CUDA graph
//!   and replayed ([`crate::cuda_graph`]), captured again when a hook's stage or the parameters
//!   change;
//! - gradient synchronisation through one component ([`GradSync`]), whatever the launch;
//! - the hooks' steps after the update (CoMERA's rank variables and pruning);
//! - evaluation, `metrics.jsonl`, `loss.png`, checkpoints (one function:
//!   [`checkpoint::save`]), exact resume, a stop request ([`Interrupter`]) and `memory.json`.
//!
//! Where a new method or model plugs in: `docs/architecture.md`.

use crate::checkpoint::{self, TrainerState};
use crate::config::{DistConfig, TrainConfig};
use crate::cuda_graph::{self, StepGraph};
use crate::data::Sampler;
use crate::interrupt::Interrupter;
use crate::progress::Progress;
use crate::records::{line_has_val, Metrics, StepClock, Summary};
use crate::schedule::lr_at;
use crate::step::{self, Plan};
use crate::sync::GradSync;
use crate::task::{BatchAt, Hook, Task};
use frugal_core::memory::{self, Accounting};
use frugal_core::{atomic, Error, Result};
use frugal_dist::Collective;
use frugal_optim::{clip_grad_norm, Optimizer};
use frugal_records::DistSetup;
use std::path::Path;
use std::time::Instant;
use tch::Tensor;

/// The loop's settings: the `[train]` and `[dist]` sections, and what it needs to know of the
/// optimizer.
#[derive(Debug, Clone)]
pub struct Trainer<'a> {
    /// `[train]`.
    pub train: &'a TrainConfig,
    /// `[dist]`.
    pub dist: &'a DistConfig,
    /// `optim.layerwise`: per-layer updates.
    pub layerwise: bool,
    /// The optimizer projects gradients (GaLore): `svd_s` in the metrics, projected
    /// all-reduces, no optimizer inside a CUDA graph.
    pub galore: bool,
}

/// Where a run lives and what it starts from.
#[derive(Debug, Clone)]
pub struct Run<'a> {
    /// The run folder.
    pub dir: &'a Path,
    /// The checkpoint it resumes from.
    pub checkpoint: Option<&'a Path>,
    /// The device of the model.
    pub device: tch::Device,
    /// Resident memory before the model was built (the memory report's baseline).
    pub baseline_rss_bytes: u64,
    /// The stop request.
    pub stop: Interrupter,
}

impl Trainer<'_> {
    /// Trains `task` with `opt` (over the parameters `params`, in the optimizer's order) and
    /// `hooks` as one rank of `dist`: every rank holds the whole model, trains on its own
    /// share of each step's examples and averages the gradients with the others; rank 0 alone
    /// evaluates and writes the run's files.
    #[allow(clippy::too_many_arguments)]
    pub fn fit(
        &self,
        task: &mut dyn Task,
        mut opt: Box<dyn Optimizer>,
        params: Vec<(String, Tensor)>,
        mut hooks: Vec<Box<dyn Hook>>,
        dist: &mut dyn Collective,
        run: &Run<'_>,
    ) -> Result<Summary> {
        let t = self.train;
        let (world, rank, main) = (dist.size(), dist.rank(), dist.is_main());
        let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
        let mut tensors: Vec<Tensor> = params.into_iter().map(|(_, t)| t).collect();
        let needs_loss = hooks.iter().any(|h| h.needs_loss());
        // The block-by-block step where the model has blocks and no hook needs the loss.
        let groups = match task.blocks() {
            Some(model) if !needs_loss => Some(model.groups(&names)?),
            _ => None,
        };
        let sizes: Vec<usize> = tensors.iter().map(|t| t.numel()).collect();
        let mut sync = GradSync::new(dist, self.dist, &sizes, self.galore, self.layerwise);
        // Overlap needs the gradients announced block by block.
        sync.overlap &= groups.is_some();
        // Every rank starts from rank 0's weights.
        let trainable: Vec<Tensor> = task.trainable().into_iter().map(|(_, t)| t).collect();
        sync.broadcast_initial(&trainable)?;
        drop(trainable);
        let plan = Plan {
            layerwise: self.layerwise,
            checkpointing: t.checkpointing,
            ce_chunk: t.ce_chunk as i64,
            blockwise: false,
        };

        let mut state = TrainerState {
            step: 0,
            tokens: 0,
            sampler: Sampler::new(task.num_examples(), t.seed).state(),
            elapsed_s: 0.0,
            prev_grad_norm: None,
            tt_late_start_size: None,
        };
        if let Some(ck) = run.checkpoint {
            // With a sharded state, each rank its own shard.
            opt.load(&sync.optimizer_file(ck)?)?;
            state = checkpoint::read_state(ck)?;
            for h in &mut hooks {
                h.restore(ck, &state)?;
            }
            if main {
                eprintln!(
                    "frugal: resuming from {} (step {})",
                    ck.display(),
                    state.step
                );
            }
        }
        let mut history = if main {
            Metrics::open(&run.dir.join("metrics.jsonl"), state.step)?
        } else {
            Metrics::in_memory()
        };
        let mut sampler = Sampler::from_state(task.num_examples(), state.sampler);
        let mut progress = if main {
            Progress::new(t.max_steps, state.step)
        } else {
            Progress::with_writer(t.max_steps, state.step, false, Box::new(std::io::sink()))
        };
        let mut clock = StepClock::new(&state, self.galore, run.device);
        let baseline = task.baseline();
        let plot_name = format!("{} (val)", baseline.name);
        let (mut val_loss, mut val_acc) = (f64::NAN, None);
        let mut interrupted = false;
        // `train.cuda_graph`: the captured step with the hooks' key it was captured for, and
        // the eager steps since the parameters last changed.
        let mut step_graph: Option<(u64, StepGraph)> = None;
        let mut eager_since = 0u64;
        let scale = 1.0 / t.grad_accum as f64;
        while state.step < t.max_steps {
            let step = state.step + 1;
            for h in &mut hooks {
                h.begin_step(step);
            }
            let lr = lr_at(step, t.lr, t.warmup_steps, t.max_steps, t.min_lr_ratio);
            opt.set_lr(lr);
            let t0 = Instant::now();
            let reduced_before = sync.bytes_reduced();
            let (mut loss_sum, mut tokens, mut correct, mut seen) = (0.0, 0u64, 0i64, 0u64);
            let mut micro = 0usize;
            // Per-layer updates clip by the previous step's norm (the first step is not
            // clipped).
            let clip = match state.prev_grad_norm {
                Some(n) if plan.layerwise && t.max_grad_norm > 0.0 && n > t.max_grad_norm => {
                    t.max_grad_norm / (n + 1e-6)
                }
                _ => 1.0,
            };
            let mut micro_norms = 0.0;
            // The gradient norm, where the replayed graph clipped and stepped.
            let mut graph_norm: Option<f64> = None;
            for k in 0..t.grad_accum {
                let last = k + 1 == t.grad_accum;
                // The step's examples for all ranks, drawn alike on every rank; this rank's
                // share.
                let all = sampler.next_indices(t.batch_size * world);
                let mine = &all[rank * t.batch_size..(rank + 1) * t.batch_size];
                let at = BatchAt {
                    step,
                    first: (k * world + rank) * t.batch_size,
                    fixed_shape: t.cuda_graph,
                };
                let batch = task.batch(mine, at)?;
                // Where the loss is a mean over a count that varies by batch (masked tokens),
                // each rank's share of the count weighs its loss.
                let share = match batch.scored {
                    Some(n) => sync.share_of(n)?,
                    None => 1.0,
                };
                tokens += batch.tokens;
                seen += batch.examples;
                micro += 1;
                if t.cuda_graph && eager_since >= cuda_graph::WARMUP_STEPS {
                    let key = hooks
                        .iter()
                        .fold(0u64, |a, h| a.rotate_left(7) ^ h.graph_key(step));
                    if step_graph.as_ref().is_some_and(|(k, _)| *k != key) {
                        step_graph = None;
                    }
                    let inputs: Vec<&Tensor> = batch.inputs.iter().collect();
                    if step_graph.is_none() {
                        let host_between = world > 1 || hooks.iter().any(|h| h.acts_between());
                        let with_opt = cuda_graph::recordable_optimizer(
                            opt.as_mut(),
                            self.galore,
                            host_between,
                        )?;
                        let (task_ref, hooks_ref): (&dyn Task, _) = (&*task, &hooks);
                        let (params, max_norm) = (&tensors, t.max_grad_norm);
                        let graph = StepGraph::capture(
                            &tensors,
                            &inputs,
                            with_opt.then_some(opt.as_mut()),
                            |inputs| {
                                let f = task_ref.forward(inputs, false, true)?;
                                let mut term = f.loss.shallow_clone();
                                for h in hooks_ref.iter() {
                                    term = h.recorded_term(step, &term, task_ref);
                                }
                                (term * scale).backward();
                                let mut out = vec![f.loss.detach()];
                                out.extend(f.correct);
                                if with_opt {
                                    out.extend(frugal_optim::clip_grad_norm_on_device(
                                        params, max_norm,
                                    ));
                                }
                                Ok(out)
                            },
                        )?;
                        if main {
                            progress.message(&graph.captured_message(step));
                        }
                        step_graph = Some((key, graph));
                    }
                    let (_, graph) = step_graph.as_mut().expect("captured above");
                    graph.prepare(opt.as_mut())?;
                    let with_opt = graph.has_optimizer();
                    let out = graph.replay(&inputs)?;
                    let loss = out[0].double_value(&[]);
                    loss_sum += loss * share;
                    if share != 1.0 {
                        // The graph's backward pass has its scale built in. (A share other
                        // than 1 means several processes, so the optimizer is not in the graph:
                        // the gradients are still to be averaged and stepped.)
                        for g in tensors.iter().map(Tensor::grad).filter(Tensor::defined) {
                            let _ = g.shallow_clone().g_mul_scalar_(share);
                        }
                    }
                    // [loss, examples right (classification), norm (optimizer in the graph)]
                    if out.len() > 1 + usize::from(with_opt) {
                        correct += out[1].int64_value(&[]);
                    }
                    if with_opt {
                        graph_norm = Some(out.last().map_or(0.0, |n| n.double_value(&[])));
                    }
                    if hooks.iter_mut().any(|h| h.skips_rest(step, loss, &*task)) {
                        break;
                    }
                    continue;
                }
                if let Some(groups) = &groups {
                    let mut sq = 0.0;
                    let plan = Plan {
                        blockwise: sync.overlap && last,
                        ..plan
                    };
                    let tensors = &tensors;
                    let (opt, sync) = (&mut opt, &mut sync);
                    let mut sink = |idx: &[usize], grads: Option<Vec<Tensor>>| -> Result<()> {
                        let Some(grads) = grads else {
                            // The group's `.grad` is complete: start averaging it while the
                            // backward pass goes on.
                            return sync.start_group(tensors, idx);
                        };
                        // Each group's gradients averaged over the ranks before its update.
                        sync.reduce(opt.as_ref(), idx, &grads.iter().collect::<Vec<_>>())?;
                        for g in &grads {
                            // As `grad_norm`: each tensor's norm in f32, squares summed.
                            let n = g.to_kind(tch::Kind::Float).norm().double_value(&[]);
                            sq += n * n;
                        }
                        if clip < 1.0 {
                            // In place: these gradients are this step's own.
                            for g in &grads {
                                let _ = g.shallow_clone().g_mul_scalar_(clip);
                            }
                        }
                        // This rank's share (all of them without a sharded state).
                        let (mine, grads): (Vec<usize>, Vec<Tensor>) = idx
                            .iter()
                            .zip(grads)
                            .filter(|(i, _)| sync.owns(**i))
                            .map(|(i, g)| (*i, g))
                            .unzip();
                        if last {
                            opt.step_with_grads(&mine, grads)?;
                            sync.share_updated(tensors, idx)
                        } else {
                            opt.accumulate_with_grads(&mine, grads)
                        }
                    };
                    let s = scale * share;
                    let model = task.blocks().expect("groups come from the blocks");
                    let batch = step::Batch {
                        inputs: &batch.inputs,
                        scale: s,
                    };
                    let out = step::micro_step(model, tensors, groups, &plan, &batch, &mut sink)?;
                    loss_sum += out.loss * share;
                    correct += out.correct.unwrap_or(0);
                    micro_norms += sq.sqrt();
                    continue;
                }
                let f = task.forward(&batch.inputs, t.checkpointing, false)?;
                if let Some(ok) = &f.correct {
                    correct += ok.int64_value(&[]);
                }
                loss_sum += f.loss.double_value(&[]) * share;
                // The hooks' term: loss + penalty, the loss, or (no loss gradient) nothing.
                let mut term = Some(f.loss.shallow_clone());
                for h in &mut hooks {
                    term = match term {
                        Some(l) => h.loss_term(step, &l, &*task),
                        None => None,
                    };
                }
                let Some(term) = term else {
                    break;
                };
                (term * (scale * share)).backward();
                if let Some(rest) = f.rest {
                    rest();
                }
            }
            // The overlapped all-reduces: wait for each, in the order started.
            sync.finish_started(&tensors)?;
            let (loss, stop, tokens) = sync.mean_loss_stop_tokens(
                loss_sum / micro.max(1) as f64,
                run.stop.requested(),
                tokens,
            )?;
            if !loss.is_finite() {
                return Err(Error::Msg(format!(
                    "step {step}: loss is {loss}; lower train.lr (now {}) or check the data",
                    t.lr
                )));
            }
            let steps_main = hooks.iter().all(|h| h.steps_main(step));
            let grad_norm = if plan.layerwise && groups.is_some() {
                state.prev_grad_norm = Some(micro_norms);
                micro_norms
            } else if let Some(n) = graph_norm {
                n
            } else {
                // The gradients averaged over the ranks (every rank has the same defined
                // ones), unless that overlapped the backward pass.
                let (idx, grads): (Vec<usize>, Vec<Tensor>) = tensors
                    .iter()
                    .map(|t| t.grad())
                    .enumerate()
                    .filter(|(_, g)| g.defined())
                    .unzip();
                if !sync.overlap {
                    sync.reduce(opt.as_ref(), &idx, &grads.iter().collect::<Vec<_>>())?;
                }
                let n = if !steps_main {
                    0.0
                } else if t.max_grad_norm > 0.0 {
                    clip_grad_norm(&tensors, t.max_grad_norm)
                } else {
                    frugal_optim::grad_norm(&tensors)
                };
                if steps_main {
                    sync.step(opt.as_mut(), &tensors)?;
                }
                opt.zero_grad();
                n
            };
            let mut changed = false;
            for h in &mut hooks {
                let after = h.after_step(step, opt.as_mut(), task)?;
                changed |= after.params_changed;
                if let (true, Some(m)) = (main, after.message) {
                    progress.message(&m);
                }
                h.save_state(&mut state);
            }
            eager_since += 1;
            if changed {
                // The changed parameters are new tensors: fetched again by name, and a captured
                // step is captured again after warm-up steps on them.
                step_graph = None;
                eager_since = 0;
                let vars = task.vs().variables();
                tensors = opt
                    .names()
                    .iter()
                    .map(|n| {
                        vars.get(n).map(Tensor::shallow_clone).ok_or_else(|| {
                            Error::Msg(format!("parameter '{n}' is no longer in the model"))
                        })
                    })
                    .collect::<Result<_>>()?;
            }
            let (mut line, tps) = clock.finish(
                &mut state,
                &sampler,
                opt.as_ref(),
                t0,
                step,
                tokens,
                (loss, lr, grad_norm),
            );
            if seen > 0 {
                line.accuracy = Some(correct as f64 / seen as f64);
            }
            if sync.active() {
                // Payload bytes this rank all-reduced in the step (gradients, loss, stop flag
                // and tokens).
                line.allreduce_bytes = Some(sync.bytes_reduced() - reduced_before);
            }
            progress.update(step, loss, tps);

            let last = step == t.max_steps;
            let eval_now = (t.eval_every > 0 && step.is_multiple_of(t.eval_every)) || last;
            for h in &hooks {
                h.add_metrics(step, &*task, eval_now || changed, &mut line);
            }
            // Rank 0 alone evaluates and writes; the others go on to the next all-reduce.
            if main && eval_now {
                // The last evaluation scores the whole split (as `frugal eval` does) unless
                // told otherwise.
                let batches = if last {
                    t.final_eval_batches
                } else {
                    t.eval_batches
                };
                let e = task.evaluate(batches)?;
                (val_loss, val_acc) = (e.loss, e.accuracy);
                line.val_loss = Some(e.loss);
                let (vl, base) = (e.loss, baseline.loss);
                match e.accuracy {
                    Some(a) => {
                        line.val_accuracy = Some(a);
                        progress.message(&format!(
                            "step {step}: val_loss {vl:.4}, val_accuracy {a:.4}, {} {base:.4}",
                            baseline.name
                        ));
                    }
                    None => {
                        line.val_ppl = Some(vl.exp());
                        progress.message(&format!(
                            "step {step}: val_loss {vl:.4} (ppl {:.2}), {} {base:.4}",
                            vl.exp(),
                            baseline.name
                        ));
                    }
                }
            }
            history.push(line)?;
            if main && line_has_val(&history) {
                history.plot_with(&run.dir.join("loss.png"), baseline.loss, &plot_name);
            }
            if main && (eval_now || changed) {
                for h in &hooks {
                    h.plot(history.lines(), run.dir);
                }
            }
            if (t.save_every > 0 && step.is_multiple_of(t.save_every)) || last || stop {
                let extra: Vec<(&str, &dyn Optimizer)> =
                    hooks.iter().flat_map(|h| h.optimizers()).collect();
                let task_ref: &dyn Task = &*task;
                sync.save_checkpoint(run.dir, opt.as_ref(), &state, |files| {
                    let parts = checkpoint::Parts {
                        model: &|file: &Path| task_ref.save(file),
                        optimizer: opt.as_ref(),
                        extra_optimizers: &extra,
                        files,
                        state: &state,
                    };
                    checkpoint::save(run.dir, &parts, t.keep_checkpoints).map(|_| ())
                })?;
                if main {
                    task.after_checkpoint(run.dir)?;
                }
            }
            if stop && !last {
                progress.message(&format!(
                    "interrupted: checkpoint saved at step {step}; resume with --resume {}",
                    run.dir.display()
                ));
                interrupted = true;
                break;
            }
        }
        progress.finish();
        task.set_training(false);
        let summary = |val_loss: f64, val_accuracy: Option<f64>, peak_rss_bytes: u64| Summary {
            run_dir: run.dir.to_path_buf(),
            steps: state.step,
            tokens: state.tokens,
            train_loss: history.recent_loss(10),
            val_loss,
            unigram_val_loss: baseline.loss,
            peak_rss_bytes,
            baseline_rss_bytes: run.baseline_rss_bytes,
            interrupted,
            val_accuracy,
            baseline_name: baseline.summary_name.map(String::from),
        };
        if !main {
            return Ok(summary(val_loss, val_acc, memory::peak_rss_bytes()));
        }
        if val_loss.is_nan() && !interrupted {
            // Nothing left to train (a resume at or past max_steps): still report the model.
            let e = task.evaluate(t.final_eval_batches)?;
            (val_loss, val_acc) = (e.loss, e.accuracy);
        }
        history.plot_with(&run.dir.join("loss.png"), baseline.loss, &plot_name);

        let plans = task.memory_plan();
        let mut acc = Accounting::default();
        acc.add_tensors("parameters", tensors.iter());
        if let (true, Some((planned, _))) = (plan.layerwise, &plans) {
            // One group's gradients at a time, never kept in `.grad`.
            acc.add("gradients", planned.get("gradients"));
        } else {
            acc.add_tensors("gradients", tensors.iter());
        }
        let hooks_state: u64 = hooks
            .iter()
            .flat_map(|h| h.optimizers())
            .map(|(_, o)| o.state_bytes())
            .sum();
        acc.add("optimizer_state", opt.state_bytes() + hooks_state);
        let (mut report, peak) =
            clock.memory_report(run.device, run.baseline_rss_bytes, &acc, task.vs());
        task.add_memory_report(&mut report);
        for h in &hooks {
            h.add_memory_report(state.step, &*task, &mut report);
        }
        if world > 1 {
            // The accounting is rank 0's: with a sharded state, its share of the optimizer
            // state.
            report.dist = Some(DistSetup {
                processes: world as u64,
                zero1: sync.zero1,
                galore_projected: sync.projected,
                overlap: sync.overlap,
            });
        }
        if let Some((planned, adamw)) = &plans {
            report.plan = Some(planned.to_record());
            report.adamw_full_gradients = Some(adamw.to_record());
            report.plan_note = Some("plan: the accounting computed from shapes (activations and logits estimated), as `frugal train --dry-run` prints it; adamw_full_gradients: the same for plain AdamW with full gradients, no checkpointing, no chunking".into());
        }
        atomic::write(
            &run.dir.join("memory.json"),
            serde_json::to_string_pretty(&report)
                .expect("json")
                .as_bytes(),
        )?;
        Ok(summary(val_loss, val_acc, peak))
    }
}
