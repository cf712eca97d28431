//! What a run records: the per-step bookkeeping ([`StepClock`]: counters, peaks, the step's
//! `metrics.jsonl` line), `metrics.jsonl` itself with the loss curve (`loss.png`), the memory
//! report (`memory.json`), and the end-of-run [`Summary`].

use crate::checkpoint::TrainerState;
use crate::data::Sampler;
use crate::plot::{self, Series};
use frugal_core::memory::{self, human_bytes, Accounting};
use frugal_core::{atomic, Error, Result};
use frugal_records::{GpuMemory, MeasuredMemory, MemoryReport, MetricsLine, TensorBytes};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a finished (or interrupted) run reports.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The run folder.
    pub run_dir: PathBuf,
    /// Optimizer steps done.
    pub steps: u64,
    /// Training tokens seen.
    pub tokens: u64,
    /// Mean training loss over the last few steps.
    pub train_loss: f64,
    /// Validation loss at the end.
    pub val_loss: f64,
    /// Validation loss of a unigram model on the same tokens, for comparison.
    pub unigram_val_loss: f64,
    /// Peak resident memory of the process.
    pub peak_rss_bytes: u64,
    /// Resident memory before the model was built.
    pub baseline_rss_bytes: u64,
    /// True when Ctrl-C stopped the run early (a checkpoint was saved).
    pub interrupted: bool,
    /// Validation accuracy at the end (classification runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_accuracy: Option<f64>,
    /// What `unigram_val_loss` is, when not the unigram model (classification: the loss of
    /// predicting the training label frequencies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_name: Option<String>,
}

/// The bookkeeping every training loop does once a step's update is done: the trainer state's
/// counters, the peak memory so far, the GaLore bases' share of the step, and the step's
/// `metrics.jsonl` line.
pub struct StepClock {
    started: Instant,
    svd_seen: f64,
    /// The process's peak resident memory when the last step ended (before its evaluation and
    /// checkpoint).
    pub steps_peak: u64,
    galore: bool,
    /// The CUDA device whose caching allocator the steps' GPU peaks are read from.
    cuda: Option<usize>,
    /// The allocator's peak of allocated bytes when the last step ended.
    steps_gpu_peak: Option<i64>,
}

/// The caching allocator's statistics of `device` when it is a CUDA device whose statistics
/// Frugal's libtorch extension can read.
fn gpu_stats(device: tch::Device) -> Option<frugal_kernels::torch_cuda::MemoryStats> {
    match device {
        tch::Device::Cuda(i) => frugal_kernels::torch_cuda::memory_stats(i).ok(),
        _ => None,
    }
}

impl StepClock {
    /// Starts the clock of a run that has already trained for `state.elapsed_s` seconds;
    /// `galore`: report `svd_s` (seconds of the step spent computing bases).
    pub fn new(state: &TrainerState, galore: bool, device: tch::Device) -> Self {
        let cuda = match device {
            tch::Device::Cuda(i) => Some(i),
            _ => None,
        };
        Self {
            started: Instant::now() - std::time::Duration::from_secs_f64(state.elapsed_s),
            svd_seen: 0.0,
            steps_peak: 0,
            galore,
            cuda,
            steps_gpu_peak: None,
        }
    }

    /// Records step `step` (begun at `t0`, `tokens` trained) in `state` and returns its metrics
    /// line and tokens per second.
    #[allow(clippy::too_many_arguments)]
    pub fn finish(
        &mut self,
        state: &mut TrainerState,
        sampler: &Sampler,
        opt: &dyn frugal_optim::Optimizer,
        t0: Instant,
        step: u64,
        tokens: u64,
        (loss, lr, grad_norm): (f64, f64, f64),
    ) -> (MetricsLine, f64) {
        let step_time = t0.elapsed().as_secs_f64();
        self.steps_peak = memory::peak_rss_bytes();
        let svd_total = opt.projection_seconds();
        let svd_s = svd_total - self.svd_seen;
        self.svd_seen = svd_total;
        state.step = step;
        state.tokens += tokens;
        state.sampler = sampler.state();
        state.elapsed_s = self.started.elapsed().as_secs_f64();
        let tps = tokens as f64 / step_time;
        let mut line = MetricsLine::new(
            step,
            loss,
            lr,
            state.tokens,
            tps,
            step_time,
            grad_norm,
            self.steps_peak,
        );
        if self.galore {
            // Seconds of this step spent computing GaLore bases (part of step_time_s).
            line.svd_s = Some(svd_s);
        }
        if let Some(stats) = self.cuda.and_then(|i| gpu_stats(tch::Device::Cuda(i))) {
            // The caching allocator's peak so far: what the GPU's memory must hold.
            self.steps_gpu_peak = Some(stats.peak_allocated);
            line.gpu_peak_allocated_bytes = Some(u64::try_from(stats.peak_allocated).unwrap_or(0));
        }
        (line, tps)
    }

    /// The part of `memory.json` every run writes: the accounting `acc`, the measured peaks
    /// (the whole run's, read now, and the steps') against `baseline_rss`, and every variable
    /// of `vs` with its shape and bytes. Returns it with the whole run's peak.
    pub fn memory_report(
        &self,
        device: tch::Device,
        baseline_rss: u64,
        acc: &Accounting,
        vs: &tch::nn::VarStore,
    ) -> (MemoryReport, u64) {
        let peak = memory::peak_rss_bytes();
        let parameters: Vec<TensorBytes> = frugal_models::weights::named_variables(vs)
            .iter()
            .map(|(n, t)| TensorBytes {
                name: n.clone(),
                shape: t.size(),
                bytes: memory::tensor_bytes(t),
            })
            .collect();
        let mut measured = MeasuredMemory::new(baseline_rss, peak, self.steps_peak);
        measured.note = Some("baseline: resident memory after libtorch started and the data was loaded, before the model was built; peak: the whole run's (evaluations and checkpoints included); steps_peak: the peak when the last training step ended, before its evaluation and checkpoint; activations and workspace are the measured peak above the baseline minus the accounted bytes".into());
        let accounting = acc.bytes.clone();
        let mut activations = peak
            .saturating_sub(baseline_rss)
            .saturating_sub(acc.total());
        if let Some(stats) = gpu_stats(device) {
            let bytes = |v: i64| u64::try_from(v).unwrap_or(0);
            measured.gpu = Some(GpuMemory {
                allocated_bytes: bytes(stats.allocated),
                peak_allocated_bytes: bytes(stats.peak_allocated),
                reserved_bytes: bytes(stats.reserved),
                peak_reserved_bytes: bytes(stats.peak_reserved),
                steps_peak_allocated_bytes: self.steps_gpu_peak.map(bytes),
                note: Some("libtorch's CUDA caching allocator: allocated counts live tensors, reserved what it holds from the driver (its cache too); peaks since the run started".into()),
            });
            // On a GPU the model, its state and the activations live in the allocator's memory.
            activations = bytes(stats.peak_allocated).saturating_sub(acc.total());
        }
        let report = MemoryReport::new(
            format!("{device:?}"),
            accounting,
            measured,
            activations,
            parameters,
        );
        (report, peak)
    }
}

/// Whether the last line of `m` holds a validation loss.
pub fn line_has_val(m: &Metrics) -> bool {
    m.lines.last().is_some_and(|l| l.val_loss.is_some())
}

/// `metrics.jsonl`, kept in memory for the plot; on resume, lines past the checkpoint's step
/// are dropped so that the file reads as one uninterrupted run.
pub struct Metrics {
    path: PathBuf,
    lines: Vec<MetricsLine>,
    file: Option<std::fs::File>,
}

impl Metrics {
    /// Opens `path` for a run at step `upto_step`: the lines up to it are kept, later ones
    /// dropped (written anew, atomically), and new lines are appended.
    pub fn open(path: &Path, upto_step: u64) -> Result<Self> {
        let mut lines = Vec::new();
        if upto_step > 0 {
            if let Ok(text) = std::fs::read_to_string(path) {
                for l in text.lines() {
                    if let Ok(v) = serde_json::from_str::<MetricsLine>(l) {
                        if v.step <= upto_step {
                            lines.push(v);
                        }
                    }
                }
            }
        }
        let body: String = lines
            .iter()
            .map(|l| format!("{}\n", json_line(l)))
            .collect();
        atomic::write(path, body.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            lines,
            file: Some(file),
        })
    }

    /// Lines kept in memory only (the ranks other than 0 of a data-parallel run).
    pub fn in_memory() -> Self {
        Self {
            path: PathBuf::new(),
            lines: Vec::new(),
            file: None,
        }
    }

    /// Appends `line` (to the file, when there is one).
    pub fn push(&mut self, line: MetricsLine) -> Result<()> {
        if let Some(f) = &mut self.file {
            writeln!(f, "{}", json_line(&line)).map_err(|e| Error::io(&self.path, e))?;
        }
        self.lines.push(line);
        Ok(())
    }

    /// The lines so far (this run's, and on resume those before the checkpoint).
    pub fn lines(&self) -> &[MetricsLine] {
        &self.lines
    }

    /// The mean training loss of the last `n` lines.
    pub fn recent_loss(&self, n: usize) -> f64 {
        let tail: Vec<f64> = self.lines.iter().rev().take(n).map(|l| l.loss).collect();
        tail.iter().sum::<f64>() / tail.len().max(1) as f64
    }

    /// The loss curve with a horizontal `baseline` line named `baseline_name`.
    pub fn plot_with(&self, path: &Path, unigram: f64, baseline_name: &str) {
        let train: Vec<(f64, f64)> = self.lines.iter().map(|l| (l.step as f64, l.loss)).collect();
        let val: Vec<(f64, f64)> = self
            .lines
            .iter()
            .filter_map(|l| Some((l.step as f64, l.val_loss?)))
            .collect();
        let base: Vec<(f64, f64)> = match (train.first(), train.last()) {
            (Some(a), Some(b)) => vec![(a.0, unigram), (b.0, unigram)],
            _ => vec![],
        };
        let series = [
            Series {
                name: "train",
                points: &train,
                rgb: [31, 119, 180],
            },
            Series {
                name: "validation",
                points: &val,
                rgb: [214, 39, 40],
            },
            Series {
                name: baseline_name,
                points: &base,
                rgb: [150, 150, 150],
            },
        ];
        if let Err(e) = plot::write_loss_png(path, "loss", "step", "loss (nats/token)", &series) {
            eprintln!("frugal: warning: cannot write {}: {e}", path.display());
        }
    }
}

/// Prints the end-of-run summary.
pub fn print_summary(s: &Summary) {
    let ppl = |l: f64| l.exp();
    println!();
    println!(
        "{}",
        if s.interrupted {
            "run interrupted (checkpoint saved)"
        } else {
            "run finished"
        }
    );
    println!("  steps                {}", s.steps);
    println!("  tokens               {}", s.tokens);
    println!(
        "  train loss           {:.4} (ppl {:.2}, mean of the last 10 steps)",
        s.train_loss,
        ppl(s.train_loss)
    );
    println!(
        "  validation loss      {:.4} (ppl {:.2})",
        s.val_loss,
        ppl(s.val_loss)
    );
    if let Some(acc) = s.val_accuracy {
        println!("  validation accuracy  {acc:.4}");
    }
    match &s.baseline_name {
        Some(name) => println!("  {name:<20} {:.4}", s.unigram_val_loss),
        None => println!(
            "  unigram val loss     {:.4} (ppl {:.2}), the loss of a model that ignores context",
            s.unigram_val_loss,
            ppl(s.unigram_val_loss)
        ),
    }
    println!(
        "  peak memory          {} resident ({} above the {} baseline)",
        human_bytes(s.peak_rss_bytes),
        human_bytes(s.peak_rss_bytes.saturating_sub(s.baseline_rss_bytes)),
        human_bytes(s.baseline_rss_bytes)
    );
    println!("  run directory        {}", s.run_dir.display());
}

/// A metrics line as one line of JSON.
fn json_line(line: &MetricsLine) -> String {
    serde_json::to_string(line).expect("a metrics line serializes")
}
