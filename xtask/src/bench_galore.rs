//! `cargo xtask bench galore`: GaLore's memory and speed against AdamW and galore-torch.
//!
//! For each LLaMA preset of the GaLore paper chosen (`--sizes`: 60m, 130m, 350m, 1b) at
//! sequence 256 and batch `--batch` (default 1), and for 60M also at `--speed-batch` (default 16,
//! the 4096 tokens per step of the step-time goal), each configuration trains in a fresh child
//! process, f32 on the CPU, lr 1e-3 with no warm-up, on the default corpus:
//!
//! - `adamw`: `frugal train` with AdamW, clipping at 1.0;
//! - `galore-adamw`: GaLore-AdamW (rank 128 / 256 / 256 / 512 for 60M / 130M / 350M / 1B as in
//!   the paper, gap 200, scale 0.25, `std`), clipping at 1.0;
//! - `galore-adamw8bit-layerwise`: GaLore over 8-bit AdamW with per-layer updates (no clipping,
//!   as in galore-torch's per-layer mode, where the gradients are gone before it could run);
//! - `galore-adamw8bit-layerwise-ckpt`: the same with activation checkpointing and the
//!   cross-entropy in chunks of 256 tokens (1B only);
//! - `galore-torch`: `scripts/bench_galore_torch.py`, a transformers `LlamaForCausalLM` of the
//!   same shape with galore-torch's `GaLoreAdamW8bit` in their per-layer hook mode.
//!
//! Before each `frugal train`, `frugal train --dry-run` with the same settings gives the
//! accounting by category; a configuration whose accounting does not fit in the memory available
//! is not run, and its row shows the accounting alone. Reported per configuration: seconds per
//! step after `--warmup` untimed steps (mean of `--steps`), tokens/s, peak resident memory of the
//! process and the same above its idle baseline, the accounting of the run's `memory.json`
//! (categories it lacks come from its plan), and the ratios to AdamW of the same size and
//! batch. The table goes to stdout, the JSON to `target/bench/galore.json`.
//!
//! The default, `--sizes 60m,130m`, takes about half an hour on two CPU cores; `--sizes 1b`
//! takes about as long again (steps of about a minute, two minutes of SVD, and a 5 GB model to
//! initialise, evaluate once and checkpoint per run; AdamW itself does not fit in 24 GB and is
//! shown by its accounting). The exact SVD of a 1B weight takes about 20 s on two cores, so by
//! default (`--svd auto`) the 1B runs take their bases from a randomized SVD, ours and
//! galore-torch's alike.
//!
//! ```text
//! cargo xtask bench galore [-- --sizes 60m,130m --batch 1 --speed-batch 16 --steps 3
//!                              --warmup 1 --configs adamw,galore-adamw,... --svd auto]
//! ```

use crate::report::{
    frugal_dry_run, frugal_train, json_num, json_number, json_opt, json_str, load_average,
    mean_step_time, mem_available_bytes, metric_points, mib, parse_human_bytes, python_json,
    read_memory, read_metrics, utc_date, Machine,
};
use crate::setup::TorchEnv;
use crate::{Failure, Result};
use frugal_records::MemoryReport;
use std::collections::BTreeMap;
use std::path::Path;

/// Tokens per sequence.
const SEQ: u64 = 256;
/// Tokens per cross-entropy chunk of the checkpointing configuration.
const CE_CHUNK: u64 = 256;
/// The galore-torch script.
const SCRIPT: &str = "scripts/bench_galore_torch.py";
/// Where the runs go.
const OUT_DIR: &str = "target/bench/galore";
/// The result file.
const RESULT: &str = "target/bench/galore.json";
/// Bytes a run needs beyond its accounting (libtorch, data, workspace), for the fit check.
const OVERHEAD_BYTES: u64 = 2 << 30;

/// A model preset and its GaLore rank (the paper's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Size {
    /// The `model.size` preset.
    name: &'static str,
    /// GaLore rank.
    rank: u64,
}

/// The presets this benchmark knows.
const SIZES: [Size; 4] = [
    Size {
        name: "60m",
        rank: 128,
    },
    Size {
        name: "130m",
        rank: 256,
    },
    Size {
        name: "350m",
        rank: 256,
    },
    Size {
        name: "1b",
        rank: 512,
    },
];

/// One configuration of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Config {
    /// `frugal train`, AdamW.
    AdamW,
    /// `frugal train`, GaLore-AdamW.
    Galore,
    /// `frugal train`, GaLore over 8-bit AdamW, per-layer updates.
    Galore8bitLayerwise,
    /// The same with activation checkpointing and a chunked cross-entropy (1B only).
    Galore8bitLayerwiseCkpt,
    /// galore-torch's 8-bit GaLore-AdamW, per-layer hooks.
    Torch,
}

impl Config {
    /// Every configuration, in the order they run.
    const ALL: [Config; 5] = [
        Config::AdamW,
        Config::Galore,
        Config::Galore8bitLayerwise,
        Config::Galore8bitLayerwiseCkpt,
        Config::Torch,
    ];

    /// The name used on the command line, in the JSON and in run folders.
    fn name(self) -> &'static str {
        match self {
            Config::AdamW => "adamw",
            Config::Galore => "galore-adamw",
            Config::Galore8bitLayerwise => "galore-adamw8bit-layerwise",
            Config::Galore8bitLayerwiseCkpt => "galore-adamw8bit-layerwise-ckpt",
            Config::Torch => "galore-torch",
        }
    }

    /// Whether this configuration runs at `size`.
    fn applies(self, size: Size) -> bool {
        self != Config::Galore8bitLayerwiseCkpt || size.name == "1b"
    }
}

/// Where GaLore's bases come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Svd {
    /// Exact below 1B, randomized at 1B.
    Auto,
    /// Always the exact SVD.
    Exact,
    /// Always a randomized SVD.
    Randomized,
}

impl Svd {
    /// Whether `size` uses the exact SVD.
    fn exact_at(self, size: Size) -> bool {
        match self {
            Svd::Auto => size.name != "1b",
            Svd::Exact => true,
            Svd::Randomized => false,
        }
    }
}

/// The benchmark's options.
#[derive(Debug, Clone, PartialEq)]
struct Options {
    /// Presets to run.
    sizes: Vec<Size>,
    /// Sequences per step.
    batch: u64,
    /// The extra batch of the 60M step-time runs (0: none).
    speed_batch: u64,
    /// Timed steps.
    steps: u64,
    /// Untimed steps before them.
    warmup: u64,
    /// Configurations to run.
    configs: Vec<Config>,
    /// Where the bases come from.
    svd: Svd,
}

/// One model size at one batch.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Case {
    /// The preset.
    size: Size,
    /// Sequences per step.
    batch: u64,
}

/// Bytes by category (None: not known).
#[derive(Debug, Clone, Default, PartialEq)]
struct Accounting {
    /// Parameters (and frozen quantized weights).
    weights: Option<u64>,
    /// Gradients alive at once.
    gradients: Option<u64>,
    /// Optimizer state, projections included.
    optimizer_state: Option<u64>,
    /// Activations and logits.
    activations: Option<u64>,
    /// Where the numbers come from.
    source: String,
}

impl Accounting {
    /// Gradients plus optimizer state.
    fn grads_and_state(&self) -> Option<u64> {
        Some(self.gradients? + self.optimizer_state?)
    }

    /// The sum of the known categories.
    fn total(&self) -> u64 {
        [
            self.weights,
            self.gradients,
            self.optimizer_state,
            self.activations,
        ]
        .iter()
        .flatten()
        .sum()
    }
}

/// What `frugal train --dry-run` says: this configuration, and AdamW with full gradients.
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    /// This configuration.
    ours: Accounting,
    /// Plain AdamW on the same model and batch.
    adamw: Accounting,
}

/// What a finished run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Measured {
    /// Mean seconds per timed step.
    step_s: f64,
    /// Resident memory before the model.
    baseline_rss_bytes: u64,
    /// Peak resident memory of the process.
    peak_rss_bytes: u64,
    /// Seconds spent computing GaLore bases over the whole run (warm-up included), if logged.
    svd_s: Option<f64>,
}

impl Measured {
    /// Peak above the idle baseline.
    fn above(&self) -> u64 {
        self.peak_rss_bytes.saturating_sub(self.baseline_rss_bytes)
    }
}

/// One configuration at one case.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    /// Size and batch.
    case: Case,
    /// The configuration.
    config: Config,
    /// The measurement, when it ran.
    measured: Option<Measured>,
    /// Its accounting.
    accounting: Accounting,
    /// The dry run's accounting (`frugal` configurations).
    plan: Option<Plan>,
    /// Why it did not run, or what to watch.
    note: String,
    /// The 1-minute load average when it started.
    load: Option<f64>,
}

/// A goal of the issue and how this run did.
#[derive(Debug, Clone, PartialEq)]
struct Goal {
    /// What is compared.
    name: String,
    /// The ratio measured (None: not measured).
    value: Option<f64>,
    /// The largest ratio that meets the goal.
    limit: f64,
}

impl Goal {
    /// Whether the goal is met (None: not measured).
    fn met(&self) -> Option<bool> {
        self.value.map(|v| v <= self.limit)
    }
}

/// Runs the benchmark.
pub fn run(env: &TorchEnv, args: &[String]) -> Result<()> {
    let opts = parse_args(args)?;
    let root = crate::root();
    std::fs::create_dir_all(root.join(OUT_DIR))
        .map_err(|e| Failure::new(format!("cannot create {OUT_DIR}: {e}")))?;
    eprintln!("bench galore: building frugal (release)");
    let bin = crate::build_frugal(env)?;
    let vars = env.vars();
    let mut rows = Vec::new();
    for case in cases(&opts) {
        for &config in opts.configs.iter().filter(|c| c.applies(case.size)) {
            eprintln!(
                "bench galore: {} batch {}: {}",
                case.size.name,
                case.batch,
                config.name()
            );
            let row = if config == Config::Torch {
                run_torch(&env.python, &vars, &root, &opts, case, &rows)
            } else {
                run_frugal(&bin, &vars, &root, &opts, case, config)
            };
            if !row.note.is_empty() {
                eprintln!("bench galore: note: {}", row.note);
            }
            rows.push(row);
        }
    }
    let goals = goals(&rows);
    let machine = Machine::detect();
    let date = utc_date();
    println!(
        "LLaMA presets, seq {SEQ}, f32, CPU: {} x {}, {} timed steps after {} warmup, {date}\n",
        machine.nproc, machine.model, opts.steps, opts.warmup
    );
    print!("{}", table(&rows, &goals));
    let json = result_json(&opts, &rows, &goals, &machine, &date);
    std::fs::write(root.join(RESULT), json)
        .map_err(|e| Failure::new(format!("cannot write {RESULT}: {e}")))?;
    eprintln!("bench galore: wrote {RESULT}");
    Ok(())
}

/// The usage line.
const USAGE: &str = "usage: cargo xtask bench galore [-- --sizes 60m,130m,1b --batch N \
                     --speed-batch N --steps N --warmup N --configs A,B --svd auto|exact|randomized]";

/// Parses the command line.
fn parse_args(args: &[String]) -> Result<Options> {
    let mut opts = Options {
        sizes: ["60m", "130m"].iter().filter_map(|n| size(n)).collect(),
        batch: 1,
        speed_batch: 16,
        steps: 3,
        warmup: 1,
        configs: Config::ALL.to_vec(),
        svd: Svd::Auto,
    };
    let bad = |m: String| Failure::new(format!("bench galore: {m}; {USAGE}"));
    let known = [
        "--sizes",
        "--batch",
        "--speed-batch",
        "--steps",
        "--warmup",
        "--configs",
        "--svd",
    ];
    for (name, value) in crate::report::named_args("galore", USAGE, args, &known, &[])? {
        let whole = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| bad(format!("{name} wants a whole number, got '{v}'")))
        };
        match name.as_str() {
            "--sizes" => {
                opts.sizes = value
                    .split(',')
                    .map(|s| size(s.trim()).ok_or_else(|| bad(format!("unknown size '{s}'"))))
                    .collect::<Result<_>>()?
            }
            "--configs" => {
                opts.configs = value
                    .split(',')
                    .map(|s| {
                        Config::ALL
                            .into_iter()
                            .find(|c| c.name() == s.trim())
                            .ok_or_else(|| bad(format!("unknown configuration '{s}'")))
                    })
                    .collect::<Result<_>>()?
            }
            "--svd" => {
                opts.svd = match value.as_str() {
                    "auto" => Svd::Auto,
                    "exact" => Svd::Exact,
                    "randomized" => Svd::Randomized,
                    v => return Err(bad(format!("unknown --svd '{v}'"))),
                }
            }
            "--batch" => opts.batch = whole(&value)?,
            "--speed-batch" => opts.speed_batch = whole(&value)?,
            "--steps" => opts.steps = whole(&value)?,
            _ => opts.warmup = whole(&value)?,
        }
    }
    if opts.steps == 0 || opts.batch == 0 || opts.sizes.is_empty() || opts.configs.is_empty() {
        return Err(bad(
            "--steps and --batch must be at least 1, --sizes and --configs not empty".into(),
        ));
    }
    Ok(opts)
}

/// The preset named `name`.
fn size(name: &str) -> Option<Size> {
    SIZES.into_iter().find(|s| s.name == name)
}

/// The cases to run: every size at `batch`, and 60M also at `speed_batch`.
fn cases(opts: &Options) -> Vec<Case> {
    let mut out = Vec::new();
    for &size in &opts.sizes {
        out.push(Case {
            size,
            batch: opts.batch,
        });
        if size.name == "60m" && opts.speed_batch > 0 && opts.speed_batch != opts.batch {
            out.push(Case {
                size,
                batch: opts.speed_batch,
            });
        }
    }
    out
}

/// The `--set` overrides of `frugal train` for `config` at `case`.
fn frugal_sets(opts: &Options, case: Case, config: Config) -> Vec<String> {
    let mut s = vec![format!("model.size=\"{}\"", case.size.name)];
    s.extend(crate::report::timing_sets(
        SEQ,
        case.batch,
        opts.warmup + opts.steps,
    ));
    s.push("train.lr=0.001".into());
    let galore = |s: &mut Vec<String>, name: &str| {
        s.push(format!("optim.name=\"{name}\""));
        s.push(format!("optim.galore.rank={}", case.size.rank));
        s.push("optim.galore.update_proj_gap=200".into());
        s.push("optim.galore.scale=0.25".into());
        s.push("optim.galore.proj_type=\"std\"".into());
        let svd = if opts.svd.exact_at(case.size) {
            "exact"
        } else {
            "randomized"
        };
        s.push(format!("optim.galore.svd=\"{svd}\""));
    };
    match config {
        Config::AdamW | Config::Torch => s.push("optim.name=\"adamw\"".into()),
        Config::Galore => galore(&mut s, "galore-adamw"),
        Config::Galore8bitLayerwise | Config::Galore8bitLayerwiseCkpt => {
            galore(&mut s, "galore-adamw8bit");
            s.push("optim.layerwise=true".into());
            s.push("train.max_grad_norm=0".into());
            if config == Config::Galore8bitLayerwiseCkpt {
                s.push("train.checkpointing=true".into());
                s.push(format!("train.ce_chunk={CE_CHUNK}"));
            }
        }
    }
    s
}

/// Runs one `frugal` configuration (its dry run first) and reads its reports.
fn run_frugal(
    bin: &Path,
    vars: &[(String, String)],
    root: &Path,
    opts: &Options,
    case: Case,
    config: Config,
) -> Row {
    let mut row = Row {
        case,
        config,
        measured: None,
        accounting: Accounting::default(),
        plan: None,
        note: String::new(),
        load: load_average(),
    };
    let sets = frugal_sets(opts, case, config);
    match frugal_dry_run(bin, vars, root, &sets) {
        Ok(text) => row.plan = parse_dry_run(&text),
        Err(f) => row.note = format!("dry run failed: {}", f.message),
    }
    if let Some(plan) = &row.plan {
        row.accounting = plan.ours.clone();
        let need = plan.ours.total() + OVERHEAD_BYTES;
        if let Some(avail) = mem_available_bytes().filter(|&a| a < need) {
            row.note = format!(
                "not run: needs about {:.1} GB by the accounting (plus {:.1} GB for libtorch \
                 and workspace), {:.1} GB available; accounting from frugal train --dry-run",
                plan.ours.total() as f64 / 1e9,
                OVERHEAD_BYTES as f64 / 1e9,
                avail as f64 / 1e9
            );
            return row;
        }
    }
    let out = format!(
        "{OUT_DIR}/{}-b{}-{}",
        case.size.name,
        case.batch,
        config.name()
    );
    match measure_frugal(bin, vars, root, &out, &sets, opts.warmup) {
        Ok((measured, memory)) => {
            row.measured = Some(measured);
            if let Some(plan) = plan_from_memory(&memory) {
                row.plan = Some(plan);
            }
            row.accounting = run_accounting(&memory, row.plan.as_ref());
            if let Some(note) = plan_mismatch(&row.accounting, row.plan.as_ref()) {
                row.note = note;
            }
        }
        Err(f) => row.note = format!("failed: {}", f.message),
    }
    // The final checkpoint is not needed, and at 1B it is gigabytes.
    let _ = std::fs::remove_dir_all(root.join(&out).join("checkpoints"));
    row
}

/// Runs `frugal train` into `out` and returns its measurement and its `memory.json`.
fn measure_frugal(
    bin: &Path,
    vars: &[(String, String)],
    root: &Path,
    out: &str,
    sets: &[String],
    warmup: u64,
) -> Result<(Measured, MemoryReport)> {
    let dir = frugal_train(bin, vars, root, out, sets)?;
    let metrics = read_metrics(&dir, out)?;
    let svd: Vec<(f64, f64)> = metric_points(&metrics, |l| l.svd_s);
    let svd_s = (!svd.is_empty()).then(|| svd.iter().map(|p| p.1).sum());
    let step_s = mean_step_time(&metrics, warmup)
        .ok_or_else(|| Failure::new(format!("{out}/metrics.jsonl has too few timed steps")))?;
    let memory = read_memory(&dir, out)?;
    let measured = Measured {
        step_s,
        baseline_rss_bytes: memory.measured.baseline_rss_bytes,
        // The peak of the training steps, before the final evaluation and checkpoint, as
        // galore-torch's script measures it.
        peak_rss_bytes: memory.measured.steps_peak_rss_bytes,
        svd_s,
    };
    Ok((measured, memory))
}

/// The categories of bytes by category (`parameters`, `frozen_quantized`, `gradients`,
/// `optimizer_state`, `activations`, `logits`), as they appear in `memory.json`.
fn accounting_of(bytes: &BTreeMap<String, u64>, source: &str) -> Accounting {
    let get = |k: &str| bytes.get(k).copied();
    let sum = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
    };
    Accounting {
        weights: sum(get("parameters"), get("frozen_quantized")),
        gradients: get("gradients"),
        optimizer_state: get("optimizer_state"),
        activations: sum(get("activations"), get("logits")),
        source: source.into(),
    }
}

/// The plan a run's `memory.json` holds (`"plan"`, and `"adamw_full_gradients"` for AdamW),
/// exact where the dry run's table is rounded.
fn plan_from_memory(memory: &MemoryReport) -> Option<Plan> {
    let source = "memory.json plan";
    Some(Plan {
        ours: accounting_of(&memory.plan.as_ref()?.by_category, source),
        adamw: accounting_of(&memory.adamw_full_gradients.as_ref()?.by_category, source),
    })
}

/// The accounting of a run's `memory.json`: its `"accounting"` object (the tensors the run
/// held); categories it lacks (activations, logits) come from `plan`.
fn run_accounting(memory: &MemoryReport, plan: Option<&Plan>) -> Accounting {
    let from_run = accounting_of(&memory.accounting, "memory.json");
    let Some(plan) = plan else {
        return from_run;
    };
    let p = &plan.ours;
    let missing = [
        from_run.weights.is_none(),
        from_run.gradients.is_none(),
        from_run.optimizer_state.is_none(),
        from_run.activations.is_none(),
    ];
    Accounting {
        weights: from_run.weights.or(p.weights),
        gradients: from_run.gradients.or(p.gradients),
        optimizer_state: from_run.optimizer_state.or(p.optimizer_state),
        activations: from_run.activations.or(p.activations),
        source: if missing.iter().any(|&m| m) {
            format!("memory.json accounting, the rest from the {}", p.source)
        } else {
            "memory.json accounting".into()
        },
    }
}

/// A warning when the run's optimizer state is more than 25% away from the dry run's: a sign
/// that the trainer did not apply the configuration asked for.
fn plan_mismatch(run: &Accounting, plan: Option<&Plan>) -> Option<String> {
    let (got, want) = (run.optimizer_state?, plan?.ours.optimizer_state?);
    let off = (got as f64 - want as f64).abs() > 0.25 * want as f64;
    off.then(|| {
        format!(
            "optimizer state in memory.json ({:.1} MB) differs from the dry run's ({:.1} MB): \
             was the optimizer configuration applied?",
            got as f64 / 1e6,
            want as f64 / 1e6
        )
    })
}

/// Parses the table of `frugal train --dry-run`: `category  this-run  AdamW-(full)  ratio`.
fn parse_dry_run(text: &str) -> Option<Plan> {
    let mut ours = std::collections::HashMap::new();
    let mut adamw = std::collections::HashMap::new();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.len() != 6 {
            continue;
        }
        let (Some(a), Some(b)) = (
            parse_human_bytes(&format!("{} {}", w[1], w[2])),
            parse_human_bytes(&format!("{} {}", w[3], w[4])),
        ) else {
            continue;
        };
        ours.insert(w[0].to_string(), a);
        adamw.insert(w[0].to_string(), b);
    }
    let acc = |m: &std::collections::HashMap<String, u64>| -> Option<Accounting> {
        Some(Accounting {
            weights: Some(m.get("parameters")? + m.get("frozen_quantized").unwrap_or(&0)),
            gradients: Some(*m.get("gradients")?),
            optimizer_state: Some(*m.get("optimizer_state")?),
            activations: Some(m.get("activations")? + m.get("logits").unwrap_or(&0)),
            source: "frugal train --dry-run".into(),
        })
    };
    Some(Plan {
        ours: acc(&ours)?,
        adamw: acc(&adamw)?,
    })
}

/// Runs galore-torch's per-layer 8-bit GaLore-AdamW at `case`.
fn run_torch(
    python: &Path,
    vars: &[(String, String)],
    root: &Path,
    opts: &Options,
    case: Case,
    done: &[Row],
) -> Row {
    let mut row = Row {
        case,
        config: Config::Torch,
        measured: None,
        accounting: Accounting::default(),
        plan: None,
        note: String::new(),
        load: load_average(),
    };
    // Its memory is about that of our per-layer configuration: skip it where that did not fit.
    let ours = done
        .iter()
        .find(|r| r.case == case && r.config == Config::Galore8bitLayerwise);
    if let Some(plan) = ours.and_then(|r| r.plan.as_ref()) {
        let need = plan.ours.total() + OVERHEAD_BYTES;
        if mem_available_bytes().is_some_and(|a| a < need) {
            row.note = "not run: our per-layer configuration's accounting does not fit".into();
            return row;
        }
    }
    let svd = if opts.svd.exact_at(case.size) {
        "exact"
    } else {
        "lowrank"
    };
    let args: Vec<String> = [
        "--size",
        case.size.name,
        "--batch",
        &case.batch.to_string(),
        "--seq",
        &SEQ.to_string(),
        "--steps",
        &opts.steps.to_string(),
        "--warmup",
        &opts.warmup.to_string(),
        "--optimizer",
        "galore_adamw8bit_per_layer",
        "--rank",
        &case.size.rank.to_string(),
        "--update-proj-gap",
        "200",
        "--scale",
        "0.25",
        "--lr",
        "0.001",
        "--svd",
        svd,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    match python_json(python, vars, root, SCRIPT, &args).and_then(|l| parse_torch(&l)) {
        Ok((measured, accounting)) => {
            row.measured = Some(measured);
            row.accounting = accounting;
        }
        Err(f) => row.note = format!("failed: {}", f.message),
    }
    row
}

/// The measurement and accounting of the script's JSON line.
fn parse_torch(line: &str) -> Result<(Measured, Accounting)> {
    let get = |k: &str| {
        json_number(line, k)
            .ok_or_else(|| Failure::new(format!("{SCRIPT} reported no '{k}': {line}")))
    };
    let measured = Measured {
        step_s: get("step_s")?,
        baseline_rss_bytes: get("baseline_rss_bytes")? as u64,
        peak_rss_bytes: get("peak_rss_bytes")? as u64,
        svd_s: json_number(line, "svd_s"),
    };
    let accounting = Accounting {
        weights: Some(get("weight_bytes")? as u64),
        gradients: Some(get("gradient_bytes")? as u64),
        optimizer_state: Some(get("optimizer_state_bytes")? as u64),
        activations: None,
        source: "galore-torch (tensors it holds)".into(),
    };
    Ok((measured, accounting))
}

/// The ratios of `row` to the AdamW row of its case: step time, peak above baseline (to
/// AdamW's accounting total where AdamW did not run) and gradients + optimizer state.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Ratios {
    /// Seconds per step over AdamW's.
    step: Option<f64>,
    /// Peak above baseline over AdamW's.
    above: Option<f64>,
    /// Whether `above` divides by AdamW's accounting (AdamW was not measured).
    above_vs_accounting: bool,
    /// Gradients + optimizer state over AdamW's (accounting).
    grads_and_state: Option<f64>,
}

/// `row`'s ratios to the AdamW row of its case among `rows`.
fn ratios(row: &Row, rows: &[Row]) -> Ratios {
    let Some(adamw) = rows
        .iter()
        .find(|r| r.case == row.case && r.config == Config::AdamW)
    else {
        return Ratios::default();
    };
    let div = |a: f64, b: f64| (b > 0.0).then(|| a / b);
    let mut out = Ratios::default();
    if let (Some(m), Some(a)) = (row.measured, adamw.measured) {
        out.step = div(m.step_s, a.step_s);
        out.above = div(m.above() as f64, a.above() as f64);
    } else if let Some(m) = row.measured {
        out.above = div(m.above() as f64, adamw.accounting.total() as f64);
        out.above_vs_accounting = out.above.is_some();
    }
    if let (Some(g), Some(a)) = (
        row.accounting.grads_and_state(),
        adamw.accounting.grads_and_state(),
    ) {
        out.grads_and_state = div(g as f64, a as f64);
    }
    out
}

/// The issue's goals, evaluated on `rows`.
fn goals(rows: &[Row]) -> Vec<Goal> {
    let find = |size: &str, config: Config, min_tokens: u64| {
        rows.iter().find(|r| {
            r.case.size.name == size && r.config == config && r.case.batch * SEQ >= min_tokens
        })
    };
    let mut out = Vec::new();
    if let Some(r) = find("130m", Config::Galore8bitLayerwise, 0) {
        out.push(Goal {
            name: "130M: gradients + optimizer state of GaLore-AdamW8bit per-layer / AdamW's \
                   (accounting)"
                .into(),
            value: ratios(r, rows).grads_and_state,
            limit: 0.20,
        });
    }
    let best_1b = [Config::Galore8bitLayerwiseCkpt, Config::Galore8bitLayerwise]
        .iter()
        .filter_map(|&c| find("1b", c, 0))
        .filter_map(|r| ratios(r, rows).above)
        .reduce(f64::min);
    if rows.iter().any(|r| r.case.size.name == "1b") {
        out.push(Goal {
            name: "1B: peak above baseline of GaLore (best of the per-layer configurations) / \
                   AdamW's (its accounting where it could not run)"
                .into(),
            value: best_1b,
            limit: 0.40,
        });
    }
    for config in [Config::Galore, Config::Galore8bitLayerwise] {
        if let Some(r) = find("60m", config, 4096) {
            out.push(Goal {
                name: format!(
                    "60M, batch {} ({} tokens/step): step time of {} / AdamW's",
                    r.case.batch,
                    r.case.batch * SEQ,
                    config.name()
                ),
                value: ratios(r, rows).step,
                limit: 1.10,
            });
        }
    }
    for torch in rows.iter().filter(|r| r.config == Config::Torch) {
        let ours = rows
            .iter()
            .find(|r| r.case == torch.case && r.config == Config::Galore8bitLayerwise);
        let (Some(t), Some(o)) = (torch.measured, ours.and_then(|r| r.measured)) else {
            continue;
        };
        let at = format!("{} batch {}", torch.case.size.name, torch.case.batch);
        out.push(Goal {
            name: format!("{at}: step time, ours (8-bit per-layer) / galore-torch's"),
            value: Some(o.step_s / t.step_s),
            limit: 1.0,
        });
        out.push(Goal {
            name: format!("{at}: peak above baseline, ours (8-bit per-layer) / galore-torch's"),
            value: Some(o.above() as f64 / t.above().max(1) as f64),
            limit: 1.0,
        });
    }
    out
}

/// `bytes` in MiB, or `-`.
fn mib_or_dash(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "-".into(), mib)
}

/// `x` as `0.00x`, or empty.
fn times(x: Option<f64>) -> String {
    x.map_or_else(String::new, |v| format!("{v:.2}x"))
}

/// The markdown table and the goals.
fn table(rows: &[Row], goals: &[Goal]) -> String {
    let mut s = String::from(
        "| size | batch | configuration | step (s) | tokens/s | bases (s, whole run) | peak RSS \
         (MiB) | above baseline (MiB) | weights (MiB) | gradients (MiB) | optimizer state (MiB) | activations (MiB) | \
         step / AdamW | above baseline / AdamW | grads + state / AdamW |\n|---|---:|---|---:|\
         ---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut notes = Vec::new();
    for r in rows {
        let q = ratios(r, rows);
        let m = r.measured;
        let a = &r.accounting;
        let mut above_ratio = times(q.above);
        if q.above_vs_accounting {
            above_ratio.push_str(" (vs accounting)");
        }
        let mut name = r.config.name().to_string();
        if !r.note.is_empty() {
            notes.push(r.note.clone());
            name.push_str(&format!(" [{}]", notes.len()));
        }
        s.push_str(&format!(
            "| {} | {} | {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {above_ratio} | {} \
             |\n",
            r.case.size.name,
            r.case.batch,
            m.map_or_else(|| "-".into(), |m| format!("{:.3}", m.step_s)),
            m.map_or_else(
                || "-".into(),
                |m| format!("{:.0}", (r.case.batch * SEQ) as f64 / m.step_s)
            ),
            m.and_then(|m| m.svd_s)
                .map_or_else(|| "-".into(), |v| format!("{v:.1}")),
            mib_or_dash(m.map(|m| m.peak_rss_bytes)),
            mib_or_dash(m.map(|m| m.above())),
            mib_or_dash(a.weights),
            mib_or_dash(a.gradients),
            mib_or_dash(a.optimizer_state),
            mib_or_dash(a.activations),
            times(q.step),
            times(q.grads_and_state),
        ));
    }
    s.push('\n');
    for (i, n) in notes.iter().enumerate() {
        s.push_str(&format!("[{}] {n}\n", i + 1));
    }
    if !notes.is_empty() {
        s.push('\n');
    }
    let loads: Vec<f64> = rows.iter().filter_map(|r| r.load).collect();
    if let (Some(lo), Some(hi)) = (
        loads.iter().copied().reduce(f64::min),
        loads.iter().copied().reduce(f64::max),
    ) {
        s.push_str(&format!(
            "1-minute load average when the runs started: {lo:.1} to {hi:.1} (others' work \
             on a shared machine slows the timed steps).\n\n"
        ));
    }
    s.push_str("Goals (issue 4):\n\n");
    for g in goals {
        let verdict = match g.met() {
            Some(true) => "met",
            Some(false) => "not met",
            None => "not measured",
        };
        s.push_str(&format!(
            "- {}: {} (goal <= {:.2}x): {verdict}\n",
            g.name,
            g.value.map_or_else(|| "-".into(), |v| format!("{v:.2}x")),
            g.limit
        ));
    }
    s
}

/// An accounting as a JSON object.
fn accounting_json(a: &Accounting) -> String {
    let n = |x: Option<u64>| x.map_or_else(|| "null".into(), |v| v.to_string());
    format!(
        "{{\"weights\": {}, \"gradients\": {}, \"optimizer_state\": {}, \"activations\": {}, \
         \"source\": {}}}",
        n(a.weights),
        n(a.gradients),
        n(a.optimizer_state),
        n(a.activations),
        json_str(&a.source)
    )
}

/// The result file.
fn result_json(
    opts: &Options,
    rows: &[Row],
    goals: &[Goal],
    machine: &Machine,
    date: &str,
) -> String {
    let rows_json: Vec<String> = rows
        .iter()
        .map(|r| {
            let q = ratios(r, rows);
            let m = r.measured;
            let measured = m.map_or_else(
                || "null".into(),
                |m| {
                    format!(
                        "{{\"step_s\": {}, \"tokens_per_s\": {}, \"baseline_rss_bytes\": {}, \
                         \"peak_rss_bytes\": {}, \"peak_above_baseline_bytes\": {}, \"svd_s\": {}}}",
                        json_num(m.step_s),
                        json_num((r.case.batch * SEQ) as f64 / m.step_s),
                        m.baseline_rss_bytes,
                        m.peak_rss_bytes,
                        m.above(),
                        json_opt(m.svd_s)
                    )
                },
            );
            let plan = r.plan.as_ref().map_or_else(
                || "null".into(),
                |p| {
                    format!(
                        "{{\"ours\": {}, \"adamw\": {}}}",
                        accounting_json(&p.ours),
                        accounting_json(&p.adamw)
                    )
                },
            );
            format!(
                "    {{\"size\": {}, \"batch\": {}, \"config\": {}, \"rank\": {}, \
                 \"measured\": {measured}, \"accounting\": {}, \"plan\": {plan}, \
                 \"ratios_vs_adamw\": {{\"step\": {}, \"peak_above_baseline\": {}, \
                 \"peak_above_baseline_vs_accounting\": {}, \"gradients_and_state\": {}}}, \
                 \"load_average\": {}, \"note\": {}}}",
                json_str(r.case.size.name),
                r.case.batch,
                json_str(r.config.name()),
                r.case.size.rank,
                accounting_json(&r.accounting),
                json_opt(q.step),
                json_opt(q.above),
                q.above_vs_accounting,
                json_opt(q.grads_and_state),
                json_opt(r.load),
                json_str(&r.note)
            )
        })
        .collect();
    let goals_json: Vec<String> = goals
        .iter()
        .map(|g| {
            format!(
                "    {{\"goal\": {}, \"value\": {}, \"at_most\": {}, \"met\": {}}}",
                json_str(&g.name),
                json_opt(g.value),
                json_num(g.limit),
                g.met().map_or_else(|| "null".into(), |m| m.to_string())
            )
        })
        .collect();
    let svd = match opts.svd {
        Svd::Auto => "auto",
        Svd::Exact => "exact",
        Svd::Randomized => "randomized",
    };
    format!(
        "{{\n  \"benchmark\": \"galore\",\n  \"dtype\": \"f32\",\n  \"device\": \"cpu\",\n  \
         \"seq\": {SEQ},\n  \"steps\": {},\n  \"warmup\": {},\n  \"svd\": {},\n  \
         \"machine\": {{\"nproc\": {}, \"cpu\": {}}},\n  \"date\": {},\n  \"rows\": [\n{}\n  ],\n  \
         \"goals\": [\n{}\n  ]\n}}\n",
        opts.steps,
        opts.warmup,
        json_str(svd),
        machine.nproc,
        json_str(&machine.model),
        json_str(date),
        rows_json.join(",\n"),
        goals_json.join(",\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use frugal_records::PlannedBytes;

    const DRY: &str = "llama 1b: d 2048, 24 layers, 32 heads, ffn 5461, vocabulary 32000
optimizer galore-adamw8bit (per-layer updates), batch 1 x 256 tokens, F32
accounting (activations and logits are estimates; see docs/config.md):
category               this run   AdamW (full)   ratio
parameters              5.36 GB        5.36 GB   1.00x
frozen_quantized         0.0 kB         0.0 kB       -
gradients              262.2 MB        5.36 GB   0.05x
optimizer_state         1.59 GB       10.71 GB   0.15x
activations             97.9 MB        1.09 GB   0.09x
logits                  98.3 MB        98.3 MB   1.00x
total                   7.40 GB       22.62 GB   0.33x
";

    fn args(v: &[&str]) -> Result<Options> {
        parse_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options_and_cases() {
        let o = args(&[]).ok().unwrap();
        assert_eq!((o.batch, o.speed_batch, o.steps, o.warmup), (1, 16, 3, 1));
        let c = cases(&o);
        let got: Vec<(&str, u64)> = c.iter().map(|c| (c.size.name, c.batch)).collect();
        assert_eq!(got, [("60m", 1), ("60m", 16), ("130m", 1)]);
        let o = args(&[
            "--sizes",
            "130m",
            "--batch=2",
            "--configs",
            "adamw,galore-torch",
        ])
        .ok()
        .unwrap();
        assert_eq!(cases(&o).len(), 1);
        assert_eq!(o.configs, [Config::AdamW, Config::Torch]);
        assert!(args(&["--sizes", "2b"]).is_err());
        assert!(args(&["--steps", "0"]).is_err());
        assert!(args(&["--steps"]).is_err());
        assert!(args(&["--svd", "fast"]).is_err());
        assert!(!Config::Galore8bitLayerwiseCkpt.applies(size("130m").unwrap()));
        assert!(Svd::Auto.exact_at(size("130m").unwrap()));
        assert!(!Svd::Auto.exact_at(size("1b").unwrap()));
    }

    #[test]
    fn sets_follow_the_contract() {
        let o = args(&[]).ok().unwrap();
        let case = Case {
            size: size("1b").unwrap(),
            batch: 1,
        };
        let s = frugal_sets(&o, case, Config::Galore8bitLayerwiseCkpt).join(" ");
        for want in [
            "model.size=\"1b\"",
            "train.max_steps=4",
            "optim.name=\"galore-adamw8bit\"",
            "optim.galore.rank=512",
            "optim.galore.svd=\"randomized\"",
            "optim.layerwise=true",
            "train.checkpointing=true",
            "train.ce_chunk=256",
            "train.final_eval_batches=1",
        ] {
            assert!(s.contains(want), "{want} in {s}");
        }
        let s = frugal_sets(&o, case, Config::AdamW).join(" ");
        assert!(
            s.contains("optim.name=\"adamw\"") && !s.contains("galore"),
            "{s}"
        );
    }

    #[test]
    fn dry_run_and_memory_json() {
        let plan = parse_dry_run(DRY).unwrap();
        assert_eq!(plan.ours.gradients, Some(262_200_000));
        assert_eq!(plan.ours.activations, Some(97_900_000 + 98_300_000));
        assert_eq!(plan.adamw.optimizer_state, Some(10_710_000_000));
        assert!(parse_dry_run("nothing").is_none());
        let bytes = |kv: &[(&str, u64)]| -> BTreeMap<String, u64> {
            kv.iter().map(|&(k, v)| (k.to_string(), v)).collect()
        };
        let mut memory = crate::report::fixtures::memory(1, 2, 5360000000);
        memory.accounting = bytes(&[
            ("gradients", 100),
            ("optimizer_state", 1600000000),
            ("parameters", 5360000000),
        ]);
        let a = run_accounting(&memory, Some(&plan));
        assert_eq!(a.gradients, Some(100));
        assert_eq!(a.activations, plan.ours.activations);
        assert!(a.source.contains("dry-run"), "{}", a.source);
        assert!(plan_from_memory(&memory).is_none());
        let mut with_plan = memory.clone();
        with_plan.accounting = bytes(&[("gradients", 7)]);
        with_plan.plan = Some(PlannedBytes::new(bytes(&[
            ("activations", 5),
            ("logits", 6),
            ("gradients", 7),
            ("optimizer_state", 8),
            ("parameters", 9),
            ("frozen_quantized", 0),
        ])));
        with_plan.adamw_full_gradients = Some(PlannedBytes::new(bytes(&[
            ("activations", 5),
            ("logits", 6),
            ("gradients", 9),
            ("optimizer_state", 18),
            ("parameters", 9),
        ])));
        let p = plan_from_memory(&with_plan).unwrap();
        assert_eq!(
            (p.ours.activations, p.adamw.optimizer_state),
            (Some(11), Some(18))
        );
        let b = run_accounting(&with_plan, Some(&p));
        assert_eq!(
            (b.gradients, b.weights, b.activations),
            (Some(7), Some(9), Some(11))
        );
        assert!(plan_mismatch(&a, Some(&plan)).is_none());
        let bad = Accounting {
            optimizer_state: Some(10_000_000_000),
            ..a
        };
        assert!(plan_mismatch(&bad, Some(&plan)).is_some());
    }

    fn row(size_name: &str, batch: u64, config: Config, m: Option<(f64, u64)>) -> Row {
        Row {
            case: Case {
                size: size(size_name).unwrap(),
                batch,
            },
            config,
            measured: m.map(|(s, above)| Measured {
                step_s: s,
                baseline_rss_bytes: 100,
                peak_rss_bytes: 100 + above,
                svd_s: None,
            }),
            accounting: Accounting {
                weights: Some(10),
                gradients: Some(if config == Config::AdamW { 10 } else { 1 }),
                optimizer_state: Some(if config == Config::AdamW { 20 } else { 2 }),
                activations: Some(1000),
                source: "test".into(),
            },
            plan: None,
            note: String::new(),
            load: Some(1.0),
        }
    }

    #[test]
    fn ratios_goals_table_json() {
        let rows = vec![
            row("60m", 16, Config::AdamW, Some((2.0, 1000))),
            row("60m", 16, Config::Galore, Some((2.1, 800))),
            row("60m", 16, Config::Galore8bitLayerwise, Some((2.4, 500))),
            row("60m", 16, Config::Torch, Some((3.0, 600))),
            row("130m", 1, Config::AdamW, Some((1.0, 1000))),
            row("130m", 1, Config::Galore8bitLayerwise, Some((1.0, 300))),
            row("1b", 1, Config::AdamW, None),
            row("1b", 1, Config::Galore8bitLayerwiseCkpt, Some((9.0, 390))),
        ];
        let q = ratios(&rows[1], &rows);
        assert!((q.step.unwrap() - 1.05).abs() < 1e-12);
        assert_eq!(q.above, Some(0.8));
        let q = ratios(&rows[7], &rows);
        assert!(q.above_vs_accounting);
        assert_eq!(q.above, Some(0.375));
        let g = goals(&rows);
        let met: Vec<Option<bool>> = g.iter().map(Goal::met).collect();
        // 130M state, 1B peak, 60M galore step, 60M 8-bit step, torch step, torch memory.
        assert_eq!(
            met,
            [
                Some(true),
                Some(true),
                Some(true),
                Some(false),
                Some(true),
                Some(true)
            ]
        );
        let t = table(&rows, &g);
        assert!(
            t.contains("| 60m | 16 | galore-adamw | 2.100 | 1950 |"),
            "{t}"
        );
        assert!(t.contains("0.38x (vs accounting)"), "{t}");
        let machine = Machine {
            nproc: 2,
            model: "Test CPU".into(),
        };
        let o = args(&[]).ok().unwrap();
        let j = result_json(&o, &rows, &g, &machine, "2026-01-01T00:00:00Z");
        assert!(j.contains("\"config\": \"galore-torch\""), "{j}");
        assert_eq!(json_number(&j, "step_s"), Some(2.0));
    }

    #[test]
    fn torch_line() {
        let line = r#"{"impl":"galore-torch","step_s":2.5,"baseline_rss_bytes":10,
            "peak_rss_bytes":30,"weight_bytes":4,"gradient_bytes":5,"optimizer_state_bytes":6}"#;
        let (m, a) = parse_torch(line).ok().unwrap();
        assert_eq!(m.above(), 20);
        assert_eq!(a.grads_and_state(), Some(11));
        assert!(parse_torch(r#"{"step_s": 1}"#).is_err());
    }
}
