//! `cargo xtask bench tt`: tensor-train layers (CoMERA, issue 5) against dense and PyTorch.
//!
//! Part 1, single linear layers (`--parts layers`, the default) at the paper's shapes: 32 x 128
//! = 4096 tokens, d 768, ffn 3072, rank 30; `768x768` (modes [12, 8, 8 | 8, 8, 12]),
//! `768x3072` ([12, 8, 8 | 12, 16, 16]) and `3072x768` ([16, 16, 12 | 8, 8, 12], the mirror of
//! the previous). For each layer, each configuration runs in its own child process, f32 on the
//! CPU, `--threads` threads (default 2) everywhere, with a bias:
//!
//! - `dense`: tch's `nn::linear` (torch's `Linear` semantics), example `tt_layer_bench`;
//! - `tt`: our `frugal_tt::TtLinear` (f32), example `tt_layer_bench`;
//! - `same-order`: `scripts/bench_tt_torch.py --impl same-order`, plain PyTorch that builds `L`
//!   and `R` from the cores every step and computes `(X L) R`, under autograd;
//! - `tltorch`: tensorly-torch's `FactorizedLinear` with its TT factorization (`blocktt`, a
//!   TT-matrix; `FactorizedLinear` has no plain `tt`) at rank `--rank`, with
//!   `tensorly.plugins.use_opt_einsum()`;
//! - `tltorch-torch-einsum`: the same through tensorly's default, `torch.einsum` (which itself
//!   takes opt_einsum's path when opt_einsum is installed);
//! - `tltorch-no-opt-einsum`: the same with `torch.backends.opt_einsum.enabled = False` (left to
//!   right, as without opt_einsum); slow, so it runs `--slow-steps` timed steps after one
//!   warm-up step;
//! - `torch-dense`: `torch.nn.Linear` in the script, a check of tch's dense row.
//!
//! A step is `y = layer(x)`, `loss = mean(y * y)` and the gradients of the input and every
//! parameter, fresh tensors each step (nothing accumulated: `run_backward` in Rust, gradients
//! set to None in PyTorch); time is the mean of `--steps` steps after `--warmup` untimed ones;
//! with `--rounds N` every configuration runs in N processes, round-robin, and the fastest is
//! kept (tltorch without opt_einsum runs once). Peak memory is the child's peak resident set
//! (`VmHWM`) above its idle baseline (resident memory after libtorch started, before the layer
//! and input). Reported: the weight's parameters (TT cores
//! or the dense matrix, bias excluded) and the compression, the ratios TT / dense, ours /
//! same-order PyTorch and tltorch / dense, and the goal "our TT layers no slower than the
//! same-order PyTorch script". The table goes to stdout (and `target/bench/tt.md`), the JSON to
//! `target/bench/tt.json`.
//!
//! Part 2, one encoder layer (`--parts encoder-layer`): block 0 of `frugal_models::encoder`
//! (post-LN BERT block, d 768, 12 heads, ffn 3072) on a `(--batch, --seq-len, 768)` = 32 x 128
//! input, its six projections dense or `LinearKind::Tt { rank: --rank, order: 3 }`, example
//! `encoder_layer_bench` of frugal-models, each in its own process; a step as above (gradients of
//! the input and every parameter of the block), mean of `--steps` after `--warmup`. Goal: TT at
//! least 3x faster than dense.
//!
//! Part 3, the whole model (`--parts model`): `frugal train` with `model.kind = "encoder"`,
//! `model.size = "encoder-6"`, masked-LM, AdamW, batch `--batch`, `--seq-len`, f32 on the CPU,
//! `--model-warmup + --model-steps` steps (eval only at the end, one batch), dense against
//! `model.linear = {kind = "tt", rank = --rank, order = 3}` and (`--model-embedding tt`, the
//! default; `dense` keeps it dense) `model.embedding = {kind = "tt"}` (a TT-matrix word table,
//! rank 32, order 4), both with activation checkpointing when `--model-checkpointing on`
//! (default off), each its own process, into
//! `target/bench/tt/model-{dense,tt}`. Step time is the mean `step_time_s` of `metrics.jsonl`
//! after the warm-up steps; peak memory is `memory.json`'s `steps_peak_above_baseline_bytes`
//! (the peak when the last training step ended; else the whole run's
//! `peak_above_baseline_bytes`); parameters are counted from `memory.json`'s per-tensor list:
//! the blocks' linear weights (TT cores or dense matrices; biases and rank variables apart) and
//! the whole model. Goals: peak at most 0.65x dense's; 45x fewer parameters in the compressed
//! part (the blocks' linear weights).
//!
//! Parts 2 and 3 always run `dense` and `tt` (`--configs` selects part 1's configurations).
//! Every part runs by default.
//!
//! ```text
//! cargo xtask bench tt [-- --parts layers,encoder-layer,model
//!                          --layers 768x768,768x3072,3072x768 --configs dense,tt,same-order,...
//!                          --steps 10 --warmup 2 --slow-steps 3 --threads 2 --tokens 4096
//!                          --rank 30 --rounds 1 --batch 32 --seq-len 128 --model-steps 3
//!                          --model-warmup 1 --model-embedding tt --model-checkpointing off]
//! ```

use crate::report::{
    find_key, frugal_train, json_num, json_number, json_object, json_opt, json_str, last_json_line,
    load_average, mean_step_time, mib, read_memory, read_metrics, utc_date, Machine,
};
use crate::setup::TorchEnv;
use crate::{Failure, Result};
use frugal_records::{MemoryReport, MetricsLine};
use std::path::Path;
use std::process::{Command, Stdio};

/// The PyTorch script.
const SCRIPT: &str = "scripts/bench_tt_torch.py";
/// The example of frugal-tt that runs our configurations.
const EXAMPLE: &str = "tt_layer_bench";
/// The result file.
const RESULT: &str = "target/bench/tt.json";
/// The markdown table.
const TABLE: &str = "target/bench/tt.md";
/// The example of frugal-models that runs one encoder layer.
const LAYER_EXAMPLE: &str = "encoder_layer_bench";
/// TT order (modes per side) of parts 2 and 3.
const ORDER: u64 = 3;
/// The encoder's width, heads and feed-forward width (CoMERA's encoder-6).
const D: u64 = 768;
/// Attention heads.
const HEADS: u64 = 12;
/// Feed-forward width.
const FFN: u64 = 3072;
/// Blocks of the whole model.
const BLOCKS: u64 = 6;
/// Where the model runs go.
const MODEL_OUT: &str = "target/bench/tt";
/// What to install when the script finds tltorch missing.
const PIP: &str = "tensorly-torch opt_einsum";

/// A linear layer shape and its modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layer {
    /// `INxOUT`, as on the command line.
    name: &'static str,
    /// Input features.
    in_dim: u64,
    /// Output features.
    out_dim: u64,
    /// Input modes (multiply to `in_dim`).
    in_modes: &'static [u64],
    /// Output modes.
    out_modes: &'static [u64],
}

/// The paper's layers (d 768, ffn 3072).
const LAYERS: [Layer; 3] = [
    Layer {
        name: "768x768",
        in_dim: 768,
        out_dim: 768,
        in_modes: &[12, 8, 8],
        out_modes: &[8, 8, 12],
    },
    Layer {
        name: "768x3072",
        in_dim: 768,
        out_dim: 3072,
        in_modes: &[12, 8, 8],
        out_modes: &[12, 16, 16],
    },
    Layer {
        name: "3072x768",
        in_dim: 3072,
        out_dim: 768,
        in_modes: &[16, 16, 12],
        out_modes: &[8, 8, 12],
    },
];

impl Layer {
    /// `in->out` for tables.
    fn label(&self) -> String {
        format!("{}->{}", self.in_dim, self.out_dim)
    }

    /// `[a, b, c] x [d, e, f]` (no `|`: it goes into markdown tables).
    fn modes(&self) -> String {
        let j = |m: &[u64]| m.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
        format!("[{}] x [{}]", j(self.in_modes), j(self.out_modes))
    }
}

/// One configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Config {
    /// tch dense `Linear`.
    Dense,
    /// Our `TtLinear`.
    Tt,
    /// The same-order PyTorch script.
    SameOrder,
    /// tltorch with `use_opt_einsum()`.
    Tltorch,
    /// tltorch through `torch.einsum` (tensorly's default).
    TltorchTorchEinsum,
    /// tltorch without opt_einsum.
    TltorchNoOptEinsum,
    /// `torch.nn.Linear` in the script.
    TorchDense,
}

impl Config {
    /// Every configuration, in the order they run.
    const ALL: [Config; 7] = [
        Config::Dense,
        Config::Tt,
        Config::SameOrder,
        Config::Tltorch,
        Config::TltorchTorchEinsum,
        Config::TltorchNoOptEinsum,
        Config::TorchDense,
    ];

    /// The name on the command line and in the JSON.
    fn name(self) -> &'static str {
        match self {
            Config::Dense => "dense",
            Config::Tt => "tt",
            Config::SameOrder => "same-order",
            Config::Tltorch => "tltorch",
            Config::TltorchTorchEinsum => "tltorch-torch-einsum",
            Config::TltorchNoOptEinsum => "tltorch-no-opt-einsum",
            Config::TorchDense => "torch-dense",
        }
    }

    /// A longer description for tables.
    fn describe(self) -> &'static str {
        match self {
            Config::Dense => "dense (tch Linear)",
            Config::Tt => "ours: TtLinear f32",
            Config::SameOrder => "PyTorch, same order (X L) R",
            Config::Tltorch => "tltorch blocktt, opt_einsum plugin",
            Config::TltorchTorchEinsum => "tltorch blocktt, torch.einsum",
            Config::TltorchNoOptEinsum => "tltorch blocktt, no opt_einsum",
            Config::TorchDense => "PyTorch nn.Linear",
        }
    }

    /// Whether the Python script runs it.
    fn is_python(self) -> bool {
        !matches!(self, Config::Dense | Config::Tt)
    }

    /// The script's arguments that select it.
    fn script_args(self) -> &'static [&'static str] {
        match self {
            Config::SameOrder => &["--impl", "same-order"],
            Config::Tltorch => &["--impl", "tltorch", "--einsum", "opt-einsum"],
            Config::TltorchTorchEinsum => &["--impl", "tltorch", "--einsum", "torch"],
            Config::TltorchNoOptEinsum => &["--impl", "tltorch", "--einsum", "none"],
            Config::TorchDense => &["--impl", "dense"],
            Config::Dense => &["--impl", "dense"],
            Config::Tt => &["--impl", "tt"],
        }
    }
}

/// What the benchmark covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Single linear layers.
    Layers,
    /// One encoder layer.
    EncoderLayer,
    /// The whole model's training step.
    Model,
}

impl Part {
    /// Every part, in the order they run.
    const ALL: [Part; 3] = [Part::Layers, Part::EncoderLayer, Part::Model];

    /// The name on the command line and in the JSON.
    fn name(self) -> &'static str {
        match self {
            Part::Layers => "layers",
            Part::EncoderLayer => "encoder-layer",
            Part::Model => "model",
        }
    }
}

/// The benchmark's options.
#[derive(Debug, Clone, PartialEq)]
struct Options {
    /// Parts to run.
    parts: Vec<Part>,
    /// Layers to run.
    layers: Vec<Layer>,
    /// Configurations to run.
    configs: Vec<Config>,
    /// Timed steps.
    steps: u64,
    /// Untimed steps before them.
    warmup: u64,
    /// Timed steps of the slow configuration (tltorch without opt_einsum).
    slow_steps: u64,
    /// Threads of every child.
    threads: u64,
    /// Rows of the input.
    tokens: u64,
    /// TT rank.
    rank: u64,
    /// Processes per configuration (round-robin; the fastest is kept).
    rounds: u64,
    /// Sequences per batch (parts 2 and 3).
    batch: u64,
    /// Tokens per sequence (parts 2 and 3).
    seq_len: u64,
    /// Timed training steps of the whole model.
    model_steps: u64,
    /// Untimed training steps before them.
    model_warmup: u64,
    /// The TT model's word table is a TT-matrix too (`--model-embedding tt`, the default).
    tt_table: bool,
    /// Both models train with activation checkpointing (`--model-checkpointing on`).
    checkpointing: bool,
}

/// What a child measured.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Measured {
    /// Mean seconds of the forward pass (loss included).
    forward_s: f64,
    /// Mean seconds of forward + backward.
    step_s: f64,
    /// Median seconds of forward + backward (the mean is what the ratios use).
    step_median_s: Option<f64>,
    /// Resident memory before the layer.
    baseline_rss_bytes: u64,
    /// Peak resident memory of the process.
    peak_rss_bytes: u64,
}

impl Measured {
    /// Peak above the idle baseline.
    fn above(&self) -> u64 {
        self.peak_rss_bytes.saturating_sub(self.baseline_rss_bytes)
    }
}

/// One configuration at one layer.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    /// The layer.
    layer: Layer,
    /// The configuration.
    config: Config,
    /// The measurement, when it ran.
    measured: Option<Measured>,
    /// Weight parameters (bias excluded).
    params: Option<u64>,
    /// TT ranks, as the child printed them (empty for dense).
    ranks: String,
    /// Timed steps it ran (per process).
    steps: u64,
    /// Processes that measured it (the fastest is shown).
    runs: u64,
    /// Why it failed, or what to watch.
    note: String,
    /// The 1-minute load average when it started.
    load: Option<f64>,
}

/// A goal and how this run did.
#[derive(Debug, Clone, PartialEq)]
struct Goal {
    /// What is compared.
    name: String,
    /// The ratio measured.
    value: Option<f64>,
    /// The largest ratio that meets the goal (the smallest, with `at_least`).
    limit: f64,
    /// The ratio must be at least `limit` (a speed-up, a compression).
    at_least: bool,
}

impl Goal {
    /// Whether the goal is met (None: not measured).
    fn met(&self) -> Option<bool> {
        self.value.map(|v| {
            if self.at_least {
                v >= self.limit
            } else {
                v <= self.limit
            }
        })
    }

    /// `- name: 0.80x (goal <= 1.00x): met`.
    fn line(&self) -> String {
        let verdict = match self.met() {
            Some(true) => "met",
            Some(false) => "not met",
            None => "not measured",
        };
        format!(
            "- {}: {} (goal {} {:.2}x): {verdict}\n",
            self.name,
            times(self.value),
            if self.at_least { ">=" } else { "<=" },
            self.limit
        )
    }

    /// The goal as a JSON object.
    fn json(&self) -> String {
        format!(
            "{{\"goal\": {}, \"value\": {}, \"{}\": {}, \"met\": {}}}",
            json_str(&self.name),
            json_opt(self.value),
            if self.at_least { "at_least" } else { "at_most" },
            json_num(self.limit),
            self.met().map_or_else(|| "null".into(), |m| m.to_string())
        )
    }
}

/// The usage line.
const USAGE: &str = "usage: cargo xtask bench tt [-- --parts layers,encoder-layer,model --layers \
                     768x768,768x3072,3072x768 --configs dense,tt,same-order,tltorch,\
                     tltorch-torch-einsum,tltorch-no-opt-einsum,torch-dense --steps N --warmup N \
                     --slow-steps N --threads N --tokens N --rank N --rounds N --batch N --seq-len N \
                     --model-steps N --model-warmup N --model-embedding tt|dense --model-checkpointing \
                     on|off] (parts: layers, encoder-layer, model)";

/// Runs the benchmark.
pub fn run(env: &TorchEnv, args: &[String]) -> Result<()> {
    let opts = parse_args(args)?;
    let root = crate::root();
    std::fs::create_dir_all(root.join("target/bench"))
        .map_err(|e| Failure::new(format!("cannot create target/bench: {e}")))?;
    let vars = env.vars();
    let has = |p| opts.parts.contains(&p);
    let layers_part = has(Part::Layers);
    let bin = if layers_part && opts.configs.iter().any(|c| !c.is_python()) {
        eprintln!("bench tt: building the example {EXAMPLE} of frugal-tt (release)");
        let mut c = crate::cargo(env);
        c.args([
            "build",
            "--release",
            "-p",
            "frugal-tt",
            "--example",
            EXAMPLE,
        ]);
        crate::status(c, "cargo build")?;
        Some(root.join("target/release/examples").join(EXAMPLE))
    } else {
        None
    };
    let layer_bin = if has(Part::EncoderLayer) {
        eprintln!("bench tt: building the example {LAYER_EXAMPLE} of frugal-models (release)");
        let mut c = crate::cargo(env);
        c.args([
            "build",
            "--release",
            "-p",
            "frugal-models",
            "--example",
            LAYER_EXAMPLE,
        ]);
        crate::status(c, "cargo build")?;
        Some(root.join("target/release/examples").join(LAYER_EXAMPLE))
    } else {
        None
    };
    let frugal = if has(Part::Model) {
        eprintln!("bench tt: building frugal (release)");
        Some(crate::build_frugal(env)?)
    } else {
        None
    };
    if layers_part && opts.configs.iter().any(|c| c.is_python()) && !env.python.exists() {
        eprintln!(
            "bench tt: warning: {} does not exist; the PyTorch configurations will fail (run \
             cargo xtask setup, then {} -m pip install {PIP})",
            env.python.display(),
            env.python.display()
        );
    }
    let mut rows: Vec<Row> = Vec::new();
    let mut big: Vec<BigRow> = Vec::new();
    for part in &opts.parts {
        match part {
            Part::Layers => {
                for &layer in &opts.layers {
                    for round in 0..opts.rounds {
                        for &config in &opts.configs {
                            if round > 0 && config == Config::TltorchNoOptEinsum {
                                continue;
                            }
                            eprintln!(
                                "bench tt: {} {} (round {}/{})",
                                layer.label(),
                                config.name(),
                                round + 1,
                                opts.rounds
                            );
                            let row =
                                run_one(env, &vars, &root, bin.as_deref(), &opts, layer, config);
                            if !row.note.is_empty() {
                                eprintln!("bench tt: note: {}", row.note);
                            }
                            keep_fastest(&mut rows, row);
                        }
                    }
                }
            }
            Part::EncoderLayer | Part::Model => {
                for config in [Config::Dense, Config::Tt] {
                    eprintln!("bench tt: {} {}", part.name(), config.name());
                    let load = load_average();
                    let got = if *part == Part::EncoderLayer {
                        layer_bin
                            .as_deref()
                            .ok_or_else(|| Failure::new("the example was not built"))
                            .and_then(|b| run_encoder_layer(env, &vars, &root, b, &opts, config))
                    } else {
                        frugal
                            .as_deref()
                            .ok_or_else(|| Failure::new("frugal was not built"))
                            .and_then(|b| run_model(b, &vars, &root, &opts, config))
                    };
                    let (measured, note) = match got {
                        Ok(m) => (Some(m), String::new()),
                        Err(f) => (None, format!("{} failed: {}", config.name(), f.message)),
                    };
                    if !note.is_empty() {
                        eprintln!("bench tt: note: {note}");
                    }
                    big.push(BigRow {
                        part: *part,
                        config,
                        measured,
                        note,
                        load,
                    });
                }
            }
        }
    }
    let goals = goals(&rows);
    let machine = Machine::detect();
    let date = utc_date();
    let mut text = String::new();
    if layers_part {
        text.push_str(&format!(
            "TT linear layers, {} tokens x d, rank {}, f32, CPU: {} x {}, {} threads, forward + \
             backward, mean of {} steps after {} warm-up, fastest of {} process(es) per \
             configuration, {date}\n\n",
            opts.tokens,
            opts.rank,
            machine.nproc,
            machine.model,
            opts.threads,
            opts.steps,
            opts.warmup,
            opts.rounds
        ));
        text.push_str(&table(&rows, &goals));
    }
    let big_goals = big_goals(&big);
    for part in [Part::EncoderLayer, Part::Model] {
        if has(part) {
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(&big_table(part, &opts, &big, &big_goals, &machine, &date));
        }
    }
    print!("{text}");
    let _ = std::fs::write(root.join(TABLE), &text);
    let json = result_json(&opts, &rows, &goals, &big, &big_goals, &machine, &date);
    std::fs::write(root.join(RESULT), json)
        .map_err(|e| Failure::new(format!("cannot write {RESULT}: {e}")))?;
    eprintln!("bench tt: wrote {RESULT} and {TABLE}");
    let failed = rows.iter().filter(|r| r.measured.is_none()).count()
        + big.iter().filter(|r| r.measured.is_none()).count();
    if failed > 0 {
        eprintln!("bench tt: {failed} configuration(s) did not run; see the notes under the table");
    }
    Ok(())
}

/// Parses the command line.
fn parse_args(args: &[String]) -> Result<Options> {
    let mut opts = Options {
        parts: Part::ALL.to_vec(),
        layers: LAYERS.to_vec(),
        configs: Config::ALL.to_vec(),
        steps: 10,
        warmup: 2,
        slow_steps: 3,
        threads: 2,
        tokens: 4096,
        rank: 30,
        rounds: 1,
        batch: 32,
        seq_len: 128,
        model_steps: 3,
        model_warmup: 1,
        tt_table: true,
        checkpointing: false,
    };
    let bad = |m: String| Failure::new(format!("bench tt: {m}; {USAGE}"));
    let known = [
        "--parts",
        "--layers",
        "--configs",
        "--steps",
        "--warmup",
        "--slow-steps",
        "--threads",
        "--tokens",
        "--rank",
        "--rounds",
        "--batch",
        "--seq-len",
        "--model-steps",
        "--model-warmup",
        "--model-embedding",
        "--model-checkpointing",
    ];
    for (name, value) in crate::report::named_args("tt", USAGE, args, &known, &[])? {
        let whole = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| bad(format!("{name} wants a whole number, got '{v}'")))
        };
        // One of two words: true for `yes`, false for `no`.
        let either = |v: &str, yes: &str, no: &str| match v {
            _ if v == yes => Ok(true),
            _ if v == no => Ok(false),
            _ => Err(bad(format!("{name} wants {yes} or {no}, got '{v}'"))),
        };
        let items = || value.split(',').map(str::trim).filter(|s| !s.is_empty());
        match name.as_str() {
            "--parts" => {
                let mut parts = Vec::new();
                for p in items() {
                    let part = Part::ALL
                        .into_iter()
                        .find(|q| q.name() == p)
                        .ok_or_else(|| bad(format!("unknown part '{p}'")))?;
                    if !parts.contains(&part) {
                        parts.push(part);
                    }
                }
                // Run in the fixed order, whatever the order asked.
                opts.parts = Part::ALL
                    .into_iter()
                    .filter(|p| parts.contains(p))
                    .collect();
            }
            "--layers" => {
                opts.layers = items()
                    .map(|s| {
                        LAYERS
                            .into_iter()
                            .find(|l| l.name == s || l.label() == s)
                            .ok_or_else(|| bad(format!("unknown layer '{s}'")))
                    })
                    .collect::<Result<_>>()?
            }
            "--configs" => {
                opts.configs = items()
                    .map(|s| {
                        Config::ALL
                            .into_iter()
                            .find(|c| c.name() == s)
                            .ok_or_else(|| bad(format!("unknown configuration '{s}'")))
                    })
                    .collect::<Result<_>>()?
            }
            "--steps" => opts.steps = whole(&value)?,
            "--warmup" => opts.warmup = whole(&value)?,
            "--slow-steps" => opts.slow_steps = whole(&value)?,
            "--threads" => opts.threads = whole(&value)?,
            "--tokens" => opts.tokens = whole(&value)?,
            "--rounds" => opts.rounds = whole(&value)?,
            "--batch" => opts.batch = whole(&value)?,
            "--seq-len" => opts.seq_len = whole(&value)?,
            "--model-steps" => opts.model_steps = whole(&value)?,
            "--model-warmup" => opts.model_warmup = whole(&value)?,
            "--model-checkpointing" => opts.checkpointing = either(&value, "on", "off")?,
            "--model-embedding" => opts.tt_table = either(&value, "tt", "dense")?,
            _ => opts.rank = whole(&value)?,
        }
    }
    if [
        opts.steps,
        opts.slow_steps,
        opts.threads,
        opts.tokens,
        opts.rounds,
        opts.batch,
        opts.seq_len,
        opts.model_steps,
    ]
    .contains(&0)
    {
        return Err(bad(
            "--steps, --slow-steps, --threads, --tokens, --rounds, --batch, --seq-len and \
             --model-steps must be at least 1"
                .into(),
        ));
    }
    if opts.rank == 0 || opts.parts.is_empty() || opts.layers.is_empty() || opts.configs.is_empty()
    {
        return Err(bad(
            "--rank must be at least 1, --parts, --layers and --configs not empty".into(),
        ));
    }
    Ok(opts)
}

/// `(timed steps, warm-up steps)` of `config`.
fn steps_of(opts: &Options, config: Config) -> (u64, u64) {
    if config == Config::TltorchNoOptEinsum {
        (opts.steps.min(opts.slow_steps), opts.warmup.min(1))
    } else {
        (opts.steps, opts.warmup)
    }
}

/// The arguments both the example and the script take for `layer`.
fn child_args(opts: &Options, layer: Layer, config: Config) -> Vec<String> {
    let list = |m: &[u64]| m.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let (steps, warmup) = steps_of(opts, config);
    let mut a: Vec<String> = config.script_args().iter().map(|s| s.to_string()).collect();
    if !config.is_python() {
        a.extend([
            "--in".into(),
            layer.in_dim.to_string(),
            "--out".into(),
            layer.out_dim.to_string(),
        ]);
    }
    a.extend([
        "--in-modes".into(),
        list(layer.in_modes),
        "--out-modes".into(),
        list(layer.out_modes),
        "--rank".into(),
        opts.rank.to_string(),
        "--tokens".into(),
        opts.tokens.to_string(),
        "--steps".into(),
        steps.to_string(),
        "--warmup".into(),
        warmup.to_string(),
        "--threads".into(),
        opts.threads.to_string(),
    ]);
    a
}

/// Runs one configuration in a child process.
fn run_one(
    env: &TorchEnv,
    vars: &[(String, String)],
    root: &Path,
    bin: Option<&Path>,
    opts: &Options,
    layer: Layer,
    config: Config,
) -> Row {
    let mut row = Row {
        layer,
        config,
        measured: None,
        params: None,
        ranks: String::new(),
        steps: steps_of(opts, config).0,
        runs: 0,
        note: String::new(),
        load: load_average(),
    };
    let args = child_args(opts, layer, config);
    let (mut c, what) = if config.is_python() {
        let mut c = Command::new(&env.python);
        c.arg(root.join(SCRIPT));
        (c, SCRIPT.to_string())
    } else {
        let Some(bin) = bin else {
            row.note = "failed: the example was not built".into();
            return row;
        };
        (example_command(env, bin), format!("examples/{EXAMPLE}"))
    };
    c.current_dir(root).args(&args);
    c.envs(vars.iter().map(|(k, v)| (k, v)));
    match child_json(c, &what).and_then(|line| parse_child(&line, &what)) {
        Ok((m, params, ranks)) => {
            row.measured = Some(m);
            row.runs = 1;
            row.params = params;
            row.ranks = ranks;
        }
        Err(f) => row.note = format!("{} failed: {}", config.name(), f.message),
    }
    row
}

/// A command that runs the example `bin`, which links libtorch dynamically.
fn example_command(env: &TorchEnv, bin: &Path) -> Command {
    let mut c = Command::new(bin);
    let lib = env.libtorch.join("lib");
    if lib.is_dir() {
        let old = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
        let path = if old.is_empty() {
            lib.display().to_string()
        } else {
            format!("{}:{old}", lib.display())
        };
        c.env("LD_LIBRARY_PATH", path);
    }
    c
}

/// Runs `c` (stderr passed through) and returns the last JSON line of its stdout; a line with
/// an `"error"` key becomes the error.
fn child_json(mut c: Command, what: &str) -> Result<String> {
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let out = c
        .output()
        .map_err(|e| Failure::new(format!("could not start {what}: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = last_json_line(&stdout);
    if let Some(msg) = line.and_then(|l| json_string(l, "error")) {
        return Err(Failure::new(msg));
    }
    if !out.status.success() {
        return Err(Failure::new(format!("{what} exited with {}", out.status)));
    }
    line.map(str::to_string)
        .ok_or_else(|| Failure::new(format!("{what} printed no JSON line")))
}

/// The string value of the first key `key` in `text` (common escapes undone), if it is one.
fn json_string(text: &str, key: &str) -> Option<String> {
    let (_, after) = find_key(text, key)?;
    let rest = text[after..].trim_start().strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

/// The text of the JSON array that is the value of `key` (brackets included), if any.
fn json_array<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let (_, after) = find_key(text, key)?;
    let start = after + text[after..].find(|c: char| !c.is_whitespace())?;
    if !text[start..].starts_with('[') {
        return None;
    }
    let end = start + text[start..].find(']')?;
    Some(&text[start..=end])
}

/// The measurement, weight parameters and ranks of a child's JSON line.
fn parse_child(line: &str, what: &str) -> Result<(Measured, Option<u64>, String)> {
    let get = |k: &str| {
        json_number(line, k)
            .ok_or_else(|| Failure::new(format!("{what} reported no '{k}': {line}")))
    };
    let m = Measured {
        forward_s: get("forward_s")?,
        step_s: get("step_s")?,
        step_median_s: json_number(line, "step_median_s"),
        baseline_rss_bytes: get("baseline_rss_bytes")? as u64,
        peak_rss_bytes: get("peak_rss_bytes")? as u64,
    };
    let params = json_number(line, "params").map(|v| v as u64);
    let ranks = json_array(line, "ranks")
        .unwrap_or("[]")
        .replace(' ', "")
        .replace(',', ", ");
    Ok((m, params, ranks))
}

/// Adds `row` to `rows`, or, where its layer and configuration are there already, keeps the
/// faster measurement (others' work only ever adds time) and counts the runs.
fn keep_fastest(rows: &mut Vec<Row>, row: Row) {
    let Some(old) = rows
        .iter_mut()
        .find(|r| r.layer == row.layer && r.config == row.config)
    else {
        rows.push(row);
        return;
    };
    let runs = old.runs + row.runs;
    let faster = match (old.measured, row.measured) {
        (None, Some(_)) => true,
        (Some(a), Some(b)) => b.step_s < a.step_s,
        _ => false,
    };
    if faster {
        let note = std::mem::take(&mut old.note);
        *old = row;
        if old.note.is_empty() {
            old.note = note;
        }
    } else if old.note.is_empty() && !row.note.is_empty() {
        old.note = row.note;
    }
    old.runs = runs;
}

/// The row of `config` at `layer`, if it ran.
fn find(rows: &[Row], layer: Layer, config: Config) -> Option<&Row> {
    rows.iter().find(|r| r.layer == layer && r.config == config)
}

/// `a / b` of two measurements.
fn ratio(rows: &[Row], layer: Layer, a: Config, b: Config, f: fn(&Measured) -> f64) -> Option<f64> {
    let x = find(rows, layer, a)?.measured?;
    let y = find(rows, layer, b)?.measured?;
    let d = f(&y);
    (d > 0.0).then(|| f(&x) / d)
}

/// Step time.
fn step(m: &Measured) -> f64 {
    m.step_s
}

/// Peak above baseline.
fn above(m: &Measured) -> f64 {
    m.above() as f64
}

/// The goals: our TT layer no slower than the same-order PyTorch script, per layer.
fn goals(rows: &[Row]) -> Vec<Goal> {
    let mut layers: Vec<Layer> = Vec::new();
    for r in rows {
        if !layers.contains(&r.layer) {
            layers.push(r.layer);
        }
    }
    layers
        .into_iter()
        .filter(|&l| {
            find(rows, l, Config::Tt).is_some() && find(rows, l, Config::SameOrder).is_some()
        })
        .map(|l| Goal {
            name: format!(
                "{}: forward + backward time of our TtLinear / the same-order PyTorch script's",
                l.label()
            ),
            value: ratio(rows, l, Config::Tt, Config::SameOrder, step),
            limit: 1.0,
            at_least: false,
        })
        .collect()
}

/// `x` as `0.00x`, or `-`.
fn times(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{v:.2}x"))
}

/// Milliseconds, or `-`.
fn ms(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{:.1}", v * 1e3))
}

/// The markdown tables (per configuration, then ratios per layer) and the goals.
fn table(rows: &[Row], goals: &[Goal]) -> String {
    let mut s = String::from(
        "| layer | configuration | ranks | weight params | compression | forward (ms) | \
         fwd+bwd (ms) | fwd+bwd median (ms) | peak RSS above baseline (MiB) | fwd+bwd / dense | \
         above baseline / dense |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut notes = Vec::new();
    for r in rows {
        let m = r.measured;
        let mut name = r.config.describe().to_string();
        if r.config == Config::TltorchNoOptEinsum {
            name.push_str(&format!(" ({} steps)", r.steps));
        }
        if r.runs > 1 {
            name.push_str(&format!(" (best of {})", r.runs));
        }
        if !r.note.is_empty() {
            notes.push(r.note.clone());
            name.push_str(&format!(" [{}]", notes.len()));
        }
        let dense_params = r.layer.in_dim * r.layer.out_dim;
        s.push_str(&format!(
            "| {} | {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.layer.label(),
            if r.ranks.is_empty() || r.ranks == "[]" {
                "-".into()
            } else {
                r.ranks.clone()
            },
            r.params.map_or_else(|| "-".into(), |p| p.to_string()),
            r.params.filter(|&p| p > 0).map_or_else(
                || "-".into(),
                |p| format!("{:.1}x", dense_params as f64 / p as f64)
            ),
            ms(m.map(|m| m.forward_s)),
            ms(m.map(|m| m.step_s)),
            ms(m.and_then(|m| m.step_median_s)),
            m.map_or_else(|| "-".into(), |m| mib(m.above())),
            times(ratio(rows, r.layer, r.config, Config::Dense, step)),
            times(ratio(rows, r.layer, r.config, Config::Dense, above)),
        ));
    }
    s.push('\n');
    for (i, n) in notes.iter().enumerate() {
        s.push_str(&format!("[{}] {n}\n", i + 1));
    }
    if !notes.is_empty() {
        s.push('\n');
    }
    s.push_str(
        "| layer | modes | dense params | TT params | compression | dense (ms) | ours (ms) | \
         same-order PyTorch (ms) | tltorch (ms) | TT / dense | ours / same-order | \
         same-order / dense | tltorch / dense | tltorch no opt_einsum / dense |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut layers: Vec<Layer> = Vec::new();
    for r in rows {
        if !layers.contains(&r.layer) {
            layers.push(r.layer);
        }
    }
    for l in layers {
        let t = |c| find(rows, l, c).and_then(|r| r.measured).map(|m| m.step_s);
        let tt_params = find(rows, l, Config::Tt)
            .or_else(|| find(rows, l, Config::SameOrder))
            .and_then(|r| r.params);
        let dense_params = l.in_dim * l.out_dim;
        s.push_str(&format!(
            "| {} | {} | {dense_params} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            l.label(),
            l.modes(),
            tt_params.map_or_else(|| "-".into(), |p| p.to_string()),
            tt_params.filter(|&p| p > 0).map_or_else(
                || "-".into(),
                |p| format!("{:.1}x", dense_params as f64 / p as f64)
            ),
            ms(t(Config::Dense)),
            ms(t(Config::Tt)),
            ms(t(Config::SameOrder)),
            ms(t(Config::Tltorch)),
            times(ratio(rows, l, Config::Tt, Config::Dense, step)),
            times(ratio(rows, l, Config::Tt, Config::SameOrder, step)),
            times(ratio(rows, l, Config::SameOrder, Config::Dense, step)),
            times(ratio(rows, l, Config::Tltorch, Config::Dense, step)),
            times(ratio(
                rows,
                l,
                Config::TltorchNoOptEinsum,
                Config::Dense,
                step
            )),
        ));
    }
    s.push('\n');
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
    s.push_str("Goals (issue 5, single layers):\n\n");
    for g in goals {
        s.push_str(&g.line());
    }
    s
}

/// The result file.
fn result_json(
    opts: &Options,
    rows: &[Row],
    goals: &[Goal],
    big: &[BigRow],
    big_goals: &[(Part, Goal)],
    machine: &Machine,
    date: &str,
) -> String {
    let rows_json: Vec<String> = rows
        .iter()
        .map(|r| {
            let measured = r.measured.map_or_else(
                || "null".into(),
                |m| {
                    format!(
                        "{{\"forward_s\": {}, \"step_s\": {}, \"step_median_s\": {}, \
                         \"baseline_rss_bytes\": {}, \
                         \"peak_rss_bytes\": {}, \"peak_above_baseline_bytes\": {}}}",
                        json_num(m.forward_s),
                        json_num(m.step_s),
                        json_opt(m.step_median_s),
                        m.baseline_rss_bytes,
                        m.peak_rss_bytes,
                        m.above()
                    )
                },
            );
            let l = r.layer;
            let ranks = if r.ranks.is_empty() { "[]" } else { &r.ranks };
            format!(
                "    {{\"layer\": {}, \"in\": {}, \"out\": {}, \"modes\": {}, \"config\": {}, \
                 \"steps\": {}, \"runs\": {}, \"params\": {}, \"dense_params\": {}, \"ranks\": {ranks}, \
                 \"measured\": {measured}, \"ratios\": {{\"step_vs_dense\": {}, \
                 \"peak_above_baseline_vs_dense\": {}, \"step_vs_same_order\": {}}}, \
                 \"load_average\": {}, \"note\": {}}}",
                json_str(l.name),
                l.in_dim,
                l.out_dim,
                json_str(&l.modes()),
                json_str(r.config.name()),
                r.steps,
                r.runs,
                r.params.map_or_else(|| "null".into(), |p| p.to_string()),
                l.in_dim * l.out_dim,
                json_opt(ratio(rows, l, r.config, Config::Dense, step)),
                json_opt(ratio(rows, l, r.config, Config::Dense, above)),
                json_opt(ratio(rows, l, r.config, Config::SameOrder, step)),
                json_opt(r.load),
                json_str(&r.note)
            )
        })
        .collect();
    let goals_json: Vec<String> = goals.iter().map(|g| format!("    {}", g.json())).collect();
    let parts: Vec<String> = opts.parts.iter().map(|p| json_str(p.name())).collect();
    let part_json = |p: Part| {
        if opts.parts.contains(&p) {
            big_json(p, opts, big, big_goals)
        } else {
            "null".into()
        }
    };
    format!(
        "{{\n  \"benchmark\": \"tt\",\n  \"parts\": [{}],\n  \"dtype\": \"f32\",\n  \
         \"device\": \"cpu\",\n  \"tokens\": {},\n  \"rank\": {},\n  \"steps\": {},\n  \
         \"warmup\": {},\n  \"slow_steps\": {},\n  \"rounds\": {},\n  \"threads\": {},\n  \"machine\": {{\"nproc\": \
         {}, \"cpu\": {}}},\n  \"date\": {},\n  \"load_average_at_end\": {},\n  \
         \"rows\": [\n{}\n  ],\n  \"goals\": [\n{}\n  ],\n  \"encoder_layer\": {},\n  \
         \"model\": {}\n}}\n",
        parts.join(", "),
        opts.tokens,
        opts.rank,
        opts.steps,
        opts.warmup,
        opts.slow_steps,
        opts.rounds,
        opts.threads,
        machine.nproc,
        json_str(&machine.model),
        json_str(date),
        json_opt(load_average()),
        rows_json.join(",\n"),
        goals_json.join(",\n"),
        part_json(Part::EncoderLayer),
        part_json(Part::Model)
    )
}

/// What a run of part 2 (one encoder layer) or 3 (the whole model) measured.
#[derive(Debug, Clone, PartialEq, Default)]
struct BigMeasured {
    /// Mean seconds of the forward pass (encoder layer only).
    forward_s: Option<f64>,
    /// Mean seconds of a step (forward + backward; for the model a full training step).
    step_s: f64,
    /// Median seconds of a step (encoder layer only).
    step_median_s: Option<f64>,
    /// Resident memory before the layer / model.
    baseline_rss_bytes: u64,
    /// Peak resident memory (for the model: when the last training step ended, if known).
    peak_rss_bytes: u64,
    /// Where the peak comes from.
    peak_source: String,
    /// Weights of the compressed linear layers (TT cores or dense matrices).
    linear_params: Option<u64>,
    /// TT rank variables.
    rank_var_params: Option<u64>,
    /// Every parameter (of the layer, or of the model).
    total_params: Option<u64>,
    /// Vocabulary (the model's word embeddings' rows).
    vocab: Option<u64>,
    /// The TT ranks, distinct lists.
    ranks: String,
}

impl BigMeasured {
    /// Peak above the idle baseline.
    fn above(&self) -> u64 {
        self.peak_rss_bytes.saturating_sub(self.baseline_rss_bytes)
    }
}

/// One configuration of part 2 or 3.
#[derive(Debug, Clone, PartialEq)]
struct BigRow {
    /// Which part.
    part: Part,
    /// Dense or TT.
    config: Config,
    /// The measurement, when it ran.
    measured: Option<BigMeasured>,
    /// Why it failed.
    note: String,
    /// The 1-minute load average when it started.
    load: Option<f64>,
}

/// The arguments of the example `encoder_layer_bench`.
fn layer_args(opts: &Options, config: Config) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--impl".into(),
        if config == Config::Tt { "tt" } else { "dense" }.into(),
    ];
    for (k, v) in [
        ("--rank", opts.rank),
        ("--order", ORDER),
        ("--batch", opts.batch),
        ("--seq-len", opts.seq_len),
        ("--d", D),
        ("--heads", HEADS),
        ("--ffn", FFN),
        ("--steps", opts.steps),
        ("--warmup", opts.warmup),
        ("--threads", opts.threads),
    ] {
        a.push(k.into());
        a.push(v.to_string());
    }
    a
}

/// The distinct arrays inside a JSON object's text, `[1, 12, 30, 12, 1]; [...]`.
fn distinct_arrays(object: &str) -> String {
    let mut seen: Vec<String> = Vec::new();
    let mut rest = object;
    while let Some(i) = rest.find('[') {
        let Some(j) = rest[i..].find(']') else { break };
        let a = rest[i..=i + j].replace(' ', "").replace(',', ", ");
        if !seen.contains(&a) {
            seen.push(a);
        }
        rest = &rest[i + j + 1..];
    }
    seen.join("; ")
}

/// The measurement of `encoder_layer_bench`'s JSON line.
fn parse_layer_child(line: &str, what: &str) -> Result<BigMeasured> {
    let get = |k: &str| {
        json_number(line, k)
            .ok_or_else(|| Failure::new(format!("{what} reported no '{k}': {line}")))
    };
    let count = |k: &str| json_number(line, k).map(|v| v as u64);
    Ok(BigMeasured {
        forward_s: Some(get("forward_s")?),
        step_s: get("step_s")?,
        step_median_s: json_number(line, "step_median_s"),
        baseline_rss_bytes: get("baseline_rss_bytes")? as u64,
        peak_rss_bytes: get("peak_rss_bytes")? as u64,
        peak_source: "VmHWM".into(),
        linear_params: count("params"),
        rank_var_params: count("rank_var_params"),
        total_params: count("layer_params"),
        vocab: None,
        ranks: json_object(line, "ranks")
            .map(distinct_arrays)
            .unwrap_or_default(),
    })
}

/// Runs one encoder layer in a child process.
fn run_encoder_layer(
    env: &TorchEnv,
    vars: &[(String, String)],
    root: &Path,
    bin: &Path,
    opts: &Options,
    config: Config,
) -> Result<BigMeasured> {
    let what = format!("examples/{LAYER_EXAMPLE}");
    let mut c = example_command(env, bin);
    c.current_dir(root).args(layer_args(opts, config));
    c.envs(vars.iter().map(|(k, v)| (k, v)));
    child_json(c, &what).and_then(|line| parse_layer_child(&line, &what))
}

/// The `--set` arguments of `frugal train` for the whole model.
fn model_sets(opts: &Options, config: Config) -> Vec<String> {
    let mut s: Vec<String> = vec![
        "model.kind=\"encoder\"".into(),
        "model.size=\"encoder-6\"".into(),
        "train.objective=\"mlm\"".into(),
        format!("train.batch_size={}", opts.batch),
        format!("train.seq_len={}", opts.seq_len),
        "train.dtype=\"f32\"".into(),
        "train.device=\"cpu\"".into(),
        format!("train.threads={}", opts.threads),
        format!("train.max_steps={}", opts.model_warmup + opts.model_steps),
        "train.warmup_steps=0".into(),
        "train.eval_every=0".into(),
        "train.eval_batches=1".into(),
        "train.final_eval_batches=1".into(),
        "train.save_every=0".into(),
        "train.lr=0.0001".into(),
        "optim.name=\"adamw\"".into(),
        format!("train.checkpointing={}", opts.checkpointing),
    ];
    if config == Config::Tt {
        s.push("model.linear.kind=\"tt\"".into());
        s.push(format!("model.linear.rank={}", opts.rank));
        s.push(format!("model.linear.order={ORDER}"));
        if opts.tt_table {
            s.push("model.embedding.kind=\"tt\"".into());
        }
    }
    s
}

/// Parameter counts of a run's `memory.json` (its per-tensor `parameters` list):
/// `(blocks' linear weights, rank variables, all, vocabulary)`; None when the list is empty.
fn model_params(memory: &MemoryReport) -> Option<(u64, u64, u64, Option<u64>)> {
    let (mut linear, mut rank_vars, mut total, mut vocab) = (0u64, 0u64, 0u64, None);
    for p in &memory.parameters {
        let name = &p.name;
        let n: u64 = p.shape.iter().map(|&d| d.max(0) as u64).product();
        total += n;
        if name.contains(".rank_vars.") {
            rank_vars += n;
        } else if name.contains("encoder.layer.")
            && !name.contains("LayerNorm")
            && !name.ends_with(".bias")
        {
            linear += n;
        } else if name.ends_with("word_embeddings.weight") {
            vocab = p.shape.first().map(|&d| d.max(0) as u64);
        }
    }
    (!memory.parameters.is_empty()).then_some((linear, rank_vars, total, vocab))
}

/// Runs the whole model's training in a `frugal train` child.
fn run_model(
    bin: &Path,
    vars: &[(String, String)],
    root: &Path,
    opts: &Options,
    config: Config,
) -> Result<BigMeasured> {
    let out = format!("{MODEL_OUT}/model-{}", config.name());
    let dir = frugal_train(bin, vars, root, &out, &model_sets(opts, config))?;
    // The final checkpoint is not needed.
    let _ = std::fs::remove_dir_all(dir.join("checkpoints"));
    let metrics = read_metrics(&dir, &out)?;
    let memory = read_memory(&dir, &out)?;
    parse_model_run(&metrics, &memory, opts.model_warmup, &out)
}

/// The measurement of a model run from its `metrics.jsonl` and `memory.json`.
fn parse_model_run(
    metrics: &[MetricsLine],
    memory: &MemoryReport,
    warmup: u64,
    out: &str,
) -> Result<BigMeasured> {
    let step_s = mean_step_time(metrics, warmup)
        .ok_or_else(|| Failure::new(format!("{out}/metrics.jsonl has too few timed steps")))?;
    let m = &memory.measured;
    // The steps' peak is 0 when no step ran in the process that wrote the report.
    let (peak, source) = match m.steps_peak_rss_bytes {
        0 => (m.peak_rss_bytes, "peak_above_baseline_bytes"),
        p => (p, "steps_peak_above_baseline_bytes"),
    };
    let params = model_params(memory);
    Ok(BigMeasured {
        forward_s: None,
        step_s,
        step_median_s: None,
        baseline_rss_bytes: m.baseline_rss_bytes,
        peak_rss_bytes: peak,
        peak_source: source.into(),
        linear_params: params.map(|p| p.0),
        rank_var_params: params.map(|p| p.1),
        total_params: params.map(|p| p.2),
        vocab: params.and_then(|p| p.3),
        ranks: String::new(),
    })
}

/// The measurement of `config` in `part`.
fn big_find(big: &[BigRow], part: Part, config: Config) -> Option<&BigMeasured> {
    big.iter()
        .find(|r| r.part == part && r.config == config)
        .and_then(|r| r.measured.as_ref())
}

/// `f(a) / f(b)` of two configurations of `part`.
fn big_ratio(
    big: &[BigRow],
    part: Part,
    a: Config,
    b: Config,
    f: fn(&BigMeasured) -> Option<f64>,
) -> Option<f64> {
    let x = f(big_find(big, part, a)?)?;
    let y = f(big_find(big, part, b)?)?;
    (y > 0.0).then(|| x / y)
}

/// Step seconds.
fn big_step(m: &BigMeasured) -> Option<f64> {
    Some(m.step_s)
}

/// Peak above baseline.
fn big_above(m: &BigMeasured) -> Option<f64> {
    Some(m.above() as f64)
}

/// Compressed parameters.
fn big_linear(m: &BigMeasured) -> Option<f64> {
    m.linear_params.map(|p| p as f64)
}

/// All parameters.
fn big_total(m: &BigMeasured) -> Option<f64> {
    m.total_params.map(|p| p as f64)
}

/// The goals of parts 2 and 3: `(part, goal)`.
fn big_goals(big: &[BigRow]) -> Vec<(Part, Goal)> {
    let (d, t) = (Config::Dense, Config::Tt);
    let mut g = Vec::new();
    let ran = |p: Part| big.iter().any(|r| r.part == p);
    if ran(Part::EncoderLayer) {
        g.push((
            Part::EncoderLayer,
            Goal {
                name: "encoder layer: fwd+bwd speed-up of TT over dense (dense / TT)".into(),
                value: big_ratio(big, Part::EncoderLayer, d, t, big_step),
                limit: 3.0,
                at_least: true,
            },
        ));
    }
    if ran(Part::Model) {
        g.push((
            Part::Model,
            Goal {
                name: "whole model: training step's peak RSS above baseline, TT / dense".into(),
                value: big_ratio(big, Part::Model, t, d, big_above),
                limit: 0.65,
                at_least: false,
            },
        ));
        g.push((
            Part::Model,
            Goal {
                name: "whole model: fewer parameters in the compressed part (the blocks' linear \
                       weights), dense / TT"
                    .into(),
                value: big_ratio(big, Part::Model, d, t, big_linear),
                limit: 45.0,
                at_least: true,
            },
        ));
    }
    g
}

/// Parameters, or `-`.
fn count(x: Option<u64>) -> String {
    x.map_or_else(|| "-".into(), |v| v.to_string())
}

/// The section of part 2 or 3: header, table, notes, goals.
fn big_table(
    part: Part,
    opts: &Options,
    big: &[BigRow],
    goals: &[(Part, Goal)],
    machine: &Machine,
    date: &str,
) -> String {
    let rows: Vec<&BigRow> = big.iter().filter(|r| r.part == part).collect();
    let dense = big_find(big, part, Config::Dense);
    let mut s = match part {
        Part::EncoderLayer => format!(
            "One encoder layer (post-LN BERT block, d {D}, {HEADS} heads, ffn {FFN}), {} x {} \
             tokens, every projection dense or TT rank {} order {ORDER}, f32, CPU: {} x {}, {} \
             threads, forward + backward (gradients of the input and every parameter), mean of \
             {} steps after {} warm-up, one process per configuration, {date}\n\n\
             | configuration | TT ranks | projection weights | compression | layer params | \
             forward (ms) | fwd+bwd (ms) | fwd+bwd median (ms) | peak RSS above baseline (MiB) \
             | fwd+bwd / dense | above baseline / dense |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            opts.batch,
            opts.seq_len,
            opts.rank,
            machine.nproc,
            machine.model,
            opts.threads,
            opts.steps,
            opts.warmup
        ),
        _ => {
            let vocab = rows
                .iter()
                .find_map(|r| r.measured.as_ref().and_then(|m| m.vocab))
                .map_or_else(|| "the tokenizer's".into(), |v| v.to_string());
            format!(
                "Whole model (encoder-6: {BLOCKS} blocks, d {D}, {HEADS} heads, ffn {FFN}; \
                 vocabulary {vocab}, the default corpus tokenizer's 4096 + specials, not \
                 BERT's 30522), full training step (masked-LM loss, backward, AdamW step) with \
                 `frugal train`, batch {} x {} tokens, f32, activation checkpointing {}, CPU: {} \
                 x {}, {} threads, mean of {} steps after {} warm-up, one process per \
                 configuration, {date}\n\n\
                 | configuration | block linear weights | compression | all parameters | \
                 compression | rank variables | step (s) | peak RSS above baseline (MiB) | \
                 step / dense | peak above baseline / dense |\n\
                 |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
                opts.batch,
                opts.seq_len,
                if opts.checkpointing { "on" } else { "off" },
                machine.nproc,
                machine.model,
                opts.threads,
                opts.model_steps,
                opts.model_warmup
            )
        }
    };
    let mut notes = Vec::new();
    for r in &rows {
        let mut name = match r.config {
            Config::Tt if part == Part::Model && opts.tt_table => {
                format!("TT rank {}, TT word table (rank 32, order 4)", opts.rank)
            }
            Config::Tt => format!("TT rank {}", opts.rank),
            _ => "dense".into(),
        };
        if !r.note.is_empty() {
            notes.push(r.note.clone());
            name.push_str(&format!(" [{}]", notes.len()));
        }
        let m = r.measured.as_ref();
        let comp = |f: fn(&BigMeasured) -> Option<u64>| {
            let (a, b) = (dense.and_then(f)?, m.and_then(f)?);
            (b > 0).then(|| format!("{:.1}x", a as f64 / b as f64))
        };
        let linear = comp(|m| m.linear_params).unwrap_or_else(|| "-".into());
        let total = comp(|m| m.total_params).unwrap_or_else(|| "-".into());
        let step_r = times(big_ratio(big, part, r.config, Config::Dense, big_step));
        let above_r = times(big_ratio(big, part, r.config, Config::Dense, big_above));
        let above = m.map_or_else(|| "-".into(), |m| mib(m.above()));
        s.push_str(&match part {
            Part::EncoderLayer => format!(
                "| {name} | {} | {} | {linear} | {} | {} | {} | {} | {above} | {step_r} | \
                 {above_r} |\n",
                m.map_or("-", |m| if m.ranks.is_empty() { "-" } else { &m.ranks }),
                count(m.and_then(|m| m.linear_params)),
                count(m.and_then(|m| m.total_params)),
                ms(m.and_then(|m| m.forward_s)),
                ms(m.map(|m| m.step_s)),
                ms(m.and_then(|m| m.step_median_s)),
            ),
            _ => format!(
                "| {name} | {} | {linear} | {} | {total} | {} | {} | {above} | {step_r} | \
                 {above_r} |\n",
                count(m.and_then(|m| m.linear_params)),
                count(m.and_then(|m| m.total_params)),
                count(m.and_then(|m| m.rank_var_params)),
                m.map_or_else(|| "-".into(), |m| format!("{:.2}", m.step_s)),
            ),
        });
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
            "1-minute load average when the runs started: {lo:.1} to {hi:.1}.\n\n"
        ));
    }
    if part == Part::Model {
        if let Some(src) = rows
            .iter()
            .find_map(|r| r.measured.as_ref().map(|m| m.peak_source.clone()))
        {
            let tables = if opts.tt_table {
                "the TT model's word table is a TT-matrix (cores, rank variables apart), its \
                 position and token-type tables dense"
            } else {
                "the embeddings stay dense (REFERENCE.md's 45x counts a TT embedding too, so the \
                 whole-model ratio is lower)"
            };
            s.push_str(&format!(
                "Peak: memory.json's `{src}` (baseline: after libtorch started and the data was \
                 loaded, before the model was built). Block linear weights: the six projections \
                 of every block (TT cores, or dense matrices; biases and rank variables apart); \
                 all parameters: embeddings, blocks, masked-LM head (its transform is dense; the \
                 decoder is tied to the word embeddings); {tables}.\n\n"
            ));
        }
    }
    s.push_str(&format!(
        "Goals (issue 5, {}):\n\n",
        if part == Part::Model {
            "whole model"
        } else {
            "encoder layer"
        }
    ));
    for (_, g) in goals.iter().filter(|(p, _)| *p == part) {
        s.push_str(&g.line());
    }
    if part == Part::Model {
        s.push_str(&format!(
            "- (not a goal) whole model, all parameters dense / TT: {}\n",
            times(big_ratio(big, part, Config::Dense, Config::Tt, big_total))
        ));
    }
    s
}

/// The JSON object of part 2 or 3.
fn big_json(part: Part, opts: &Options, big: &[BigRow], goals: &[(Part, Goal)]) -> String {
    let rows: Vec<String> = big
        .iter()
        .filter(|r| r.part == part)
        .map(|r| {
            let m = r.measured.as_ref().map_or_else(
                || "null".into(),
                |m| {
                    let c = |x: Option<u64>| x.map_or_else(|| "null".into(), |v| v.to_string());
                    format!(
                        "{{\"forward_s\": {}, \"step_s\": {}, \"step_median_s\": {}, \
                         \"baseline_rss_bytes\": {}, \"peak_rss_bytes\": {}, \
                         \"peak_above_baseline_bytes\": {}, \"peak_source\": {}, \
                         \"linear_weight_params\": {}, \"rank_var_params\": {}, \
                         \"total_params\": {}, \"vocab\": {}, \"ranks\": {}}}",
                        json_opt(m.forward_s),
                        json_num(m.step_s),
                        json_opt(m.step_median_s),
                        m.baseline_rss_bytes,
                        m.peak_rss_bytes,
                        m.above(),
                        json_str(&m.peak_source),
                        c(m.linear_params),
                        c(m.rank_var_params),
                        c(m.total_params),
                        c(m.vocab),
                        json_str(&m.ranks)
                    )
                },
            );
            format!(
                "      {{\"config\": {}, \"measured\": {m}, \"ratios\": {{\"step_vs_dense\": {}, \
                 \"peak_above_baseline_vs_dense\": {}, \"linear_weight_params_vs_dense\": {}, \
                 \"total_params_vs_dense\": {}}}, \"load_average\": {}, \"note\": {}}}",
                json_str(r.config.name()),
                json_opt(big_ratio(big, part, r.config, Config::Dense, big_step)),
                json_opt(big_ratio(big, part, r.config, Config::Dense, big_above)),
                json_opt(big_ratio(big, part, r.config, Config::Dense, big_linear)),
                json_opt(big_ratio(big, part, r.config, Config::Dense, big_total)),
                json_opt(r.load),
                json_str(&r.note)
            )
        })
        .collect();
    let goals: Vec<String> = goals
        .iter()
        .filter(|(p, _)| *p == part)
        .map(|(_, g)| format!("      {}", g.json()))
        .collect();
    let (steps, warmup, what) = match part {
        Part::EncoderLayer => (
            opts.steps,
            opts.warmup,
            "one encoder layer, forward + backward",
        ),
        _ => (
            opts.model_steps,
            opts.model_warmup,
            "encoder-6 training step with frugal train (mlm, adamw)",
        ),
    };
    format!(
        "{{\n    \"what\": {}, \"batch\": {}, \"seq_len\": {}, \"d\": {D}, \"heads\": {HEADS}, \
         \"ffn\": {FFN}, \"rank\": {}, \"order\": {ORDER}, \"steps\": {steps}, \"warmup\": \
         {warmup},\n    \"rows\": [\n{}\n    ],\n    \"goals\": [\n{}\n    ]\n  }}",
        json_str(what),
        opts.batch,
        opts.seq_len,
        opts.rank,
        rows.join(",\n"),
        goals.join(",\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Result<Options> {
        parse_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options() {
        let o = args(&[]).ok().unwrap();
        assert_eq!(
            (o.steps, o.warmup, o.threads, o.tokens, o.rank),
            (10, 2, 2, 4096, 30)
        );
        assert_eq!(o.layers.len(), 3);
        assert_eq!(o.configs.len(), Config::ALL.len());
        let o = args(&[
            "--layers",
            "768->3072",
            "--configs=tt,same-order",
            "--steps",
            "4",
        ])
        .ok()
        .unwrap();
        assert_eq!(o.layers, [LAYERS[1]]);
        assert_eq!(o.configs, [Config::Tt, Config::SameOrder]);
        assert_eq!(steps_of(&o, Config::TltorchNoOptEinsum), (3, 1));
        assert_eq!(steps_of(&o, Config::Tt), (4, 2));
        assert!(args(&["--layers", "768x1024"]).is_err());
        assert!(args(&["--configs", "tt,nope"]).is_err());
        assert!(args(&["--steps", "0"]).is_err());
        assert!(args(&["--steps"]).is_err());
        assert!(args(&["--bogus", "1"]).is_err());
        assert_eq!(o.parts, Part::ALL);
        let o = args(&["--parts", "model,layers", "--batch=8", "--model-steps", "2"])
            .ok()
            .unwrap();
        assert_eq!(o.parts, [Part::Layers, Part::Model]);
        assert_eq!(
            (o.batch, o.seq_len, o.model_steps, o.model_warmup),
            (8, 128, 2, 1)
        );
        assert!(args(&["--parts", "encoder"]).is_err());
        assert!(args(&["--parts", ""]).is_err());
        assert!(args(&["--model-steps", "0"]).is_err());
        assert_eq!(args(&["--model-warmup", "0"]).ok().unwrap().model_warmup, 0);
        for l in LAYERS {
            assert_eq!(l.in_modes.iter().product::<u64>(), l.in_dim);
            assert_eq!(l.out_modes.iter().product::<u64>(), l.out_dim);
        }
    }

    #[test]
    fn child_arguments() {
        let o = args(&[]).ok().unwrap();
        let a = child_args(&o, LAYERS[1], Config::Tt).join(" ");
        assert!(
            a.starts_with("--impl tt --in 768 --out 3072 --in-modes 12,8,8 --out-modes 12,16,16"),
            "{a}"
        );
        let a = child_args(&o, LAYERS[0], Config::TltorchNoOptEinsum).join(" ");
        assert!(a.contains("--impl tltorch --einsum none"), "{a}");
        assert!(a.contains("--steps 3 --warmup 1"), "{a}");
        assert!(!a.contains("--in "), "{a}");
    }

    #[test]
    fn child_lines() {
        let line = r#"{"impl":"tt","params":20448,"ranks":[1,12,30,30,30,12,1],"forward_s":0.05,
            "step_s":0.1,"baseline_rss_bytes":100,"peak_rss_bytes":1148676}"#;
        let (m, p, r) = parse_child(line, "x").ok().unwrap();
        assert_eq!((m.step_s, m.above(), p), (0.1, 1148576, Some(20448)));
        assert_eq!(r, "[1, 12, 30, 30, 30, 12, 1]");
        assert!(parse_child(r#"{"step_s": 1}"#, "x").is_err());
        let err = r#"{"error": "tltorch is not installed: run pip install \"tensorly-torch\""}"#;
        assert_eq!(
            json_string(err, "error").as_deref(),
            Some("tltorch is not installed: run pip install \"tensorly-torch\"")
        );
        assert_eq!(json_string(line, "impl").as_deref(), Some("tt"));
        assert!(json_string(line, "step_s").is_none());
    }

    fn row(layer: Layer, config: Config, step_s: Option<f64>, params: u64) -> Row {
        Row {
            layer,
            config,
            measured: step_s.map(|s| Measured {
                forward_s: s / 3.0,
                step_s: s,
                step_median_s: Some(s),
                baseline_rss_bytes: 1 << 20,
                peak_rss_bytes: (1 << 20) + (((s * 1000.0).round() as u64) << 20),
            }),
            params: Some(params),
            ranks: String::new(),
            steps: 10,
            runs: u64::from(step_s.is_some()),
            note: if step_s.is_none() {
                "tltorch failed: tltorch is not installed".into()
            } else {
                String::new()
            },
            load: Some(2.5),
        }
    }

    #[test]
    fn fastest_of_rounds() {
        let l = LAYERS[0];
        let mut rows = Vec::new();
        keep_fastest(&mut rows, row(l, Config::Tt, Some(0.03), 20448));
        keep_fastest(&mut rows, row(l, Config::Tt, None, 20448));
        keep_fastest(&mut rows, row(l, Config::Tt, Some(0.02), 20448));
        keep_fastest(&mut rows, row(l, Config::Tt, Some(0.025), 20448));
        keep_fastest(&mut rows, row(l, Config::Dense, Some(0.08), 589824));
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].measured.unwrap().step_s, 0.02);
        assert_eq!(rows[0].runs, 3);
        assert!(rows[0].note.contains("failed"), "{}", rows[0].note);
        let t = table(&rows, &[]);
        assert!(t.contains("ours: TtLinear f32 (best of 3) [1]"), "{t}");
        assert!(args(&["--rounds", "0"]).is_err());
        assert_eq!(args(&["--rounds", "3"]).ok().unwrap().rounds, 3);
    }

    #[test]
    fn goals_table_json() {
        let l = LAYERS[0];
        let rows = vec![
            row(l, Config::Dense, Some(0.08), 589824),
            row(l, Config::Tt, Some(0.02), 20448),
            row(l, Config::SameOrder, Some(0.025), 20448),
            row(l, Config::Tltorch, None, 63360),
            row(LAYERS[1], Config::Tt, Some(0.05), 1),
            row(LAYERS[1], Config::SameOrder, Some(0.04), 1),
        ];
        let g = goals(&rows);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].met(), Some(true));
        assert_eq!(g[1].met(), Some(false));
        assert!((g[0].value.unwrap() - 0.8).abs() < 1e-12);
        let t = table(&rows, &g);
        assert!(
            t.contains("| 768->768 | ours: TtLinear f32 | - | 20448 | 28.8x | 6.7 | 20.0 | 20.0 | 20 | 0.25x | 0.25x |"),
            "{t}"
        );
        assert!(
            t.contains("| 768->768 | [12, 8, 8] x [8, 8, 12] | 589824 | 20448 | 28.8x | 80.0 | 20.0 | 25.0 | - | 0.25x | 0.80x | 0.31x | - | - |"),
            "{t}"
        );
        assert!(
            t.contains("[1] tltorch failed: tltorch is not installed"),
            "{t}"
        );
        assert!(t.contains("0.80x (goal <= 1.00x): met"), "{t}");
        assert!(
            t.contains("load average when the runs started: 2.5 to 2.5"),
            "{t}"
        );
        let machine = Machine {
            nproc: 2,
            model: "Test CPU".into(),
        };
        let o = args(&[]).ok().unwrap();
        let j = result_json(&o, &rows, &g, &[], &[], &machine, "2026-01-01T00:00:00Z");
        assert!(j.contains("\"config\": \"same-order\""), "{j}");
        assert_eq!(json_number(&j, "step_s"), Some(0.08));
        assert!(
            j.contains("\"met\": true") && j.contains("\"met\": false"),
            "{j}"
        );
    }

    #[test]
    fn encoder_layer_child() {
        let o = args(&["--rank", "20"]).ok().unwrap();
        let a = layer_args(&o, Config::Tt).join(" ");
        assert_eq!(
            a,
            "--impl tt --rank 20 --order 3 --batch 32 --seq-len 128 --d 768 --heads 12 --ffn \
             3072 --steps 10 --warmup 2 --threads 2"
        );
        assert!(layer_args(&o, Config::Dense)
            .join(" ")
            .starts_with("--impl dense"));
        let line = r#"{"impl":"tt","params":139712,"dense_params":7077888,"rank_var_params":180,
            "layer_params":150000,"ranks":{"attention.self.query":[1,12,30,30,30,12,1],
            "attention.self.key":[1,12,30,30,30,12,1],"intermediate.dense":[1,12,30,30,30,16,1]},
            "forward_s":0.1,"step_s":0.3,"step_median_s":0.29,"baseline_rss_bytes":100,
            "peak_rss_bytes":1100}"#;
        let m = parse_layer_child(line, "x").ok().unwrap();
        assert_eq!(
            (m.linear_params, m.total_params, m.above()),
            (Some(139712), Some(150000), 1000)
        );
        assert_eq!(
            m.ranks,
            "[1, 12, 30, 30, 30, 12, 1]; [1, 12, 30, 30, 30, 16, 1]"
        );
        assert!(parse_layer_child(r#"{"step_s": 1}"#, "x").is_err());
    }

    /// An encoder run's report: baseline 1000, peak 9000, the steps' peak 5000 bytes.
    fn memory() -> MemoryReport {
        use crate::report::fixtures::variable;
        let mut m = crate::report::fixtures::memory(1000, 9000, 400);
        m.measured = frugal_records::MeasuredMemory::new(1000, 9000, 5000);
        m.parameters = vec![
            variable("bert.embeddings.word_embeddings.weight", &[4, 3]),
            variable("bert.embeddings.LayerNorm.weight", &[2]),
            variable(
                "bert.encoder.layer.0.attention.self.query.cores.0",
                &[1, 12, 2],
            ),
            variable(
                "bert.encoder.layer.0.attention.self.query.rank_vars.0",
                &[2],
            ),
            variable("bert.encoder.layer.0.attention.self.query.bias", &[2]),
            variable("bert.encoder.layer.0.output.dense.weight", &[2, 2]),
            variable("bert.encoder.layer.0.output.LayerNorm.bias", &[2]),
            variable("cls.predictions.bias", &[4]),
        ];
        m
    }

    #[test]
    fn model_runs() {
        let o = args(&[]).ok().unwrap();
        let s = model_sets(&o, Config::Tt).join(" ");
        for want in [
            "model.kind=\"encoder\"",
            "model.size=\"encoder-6\"",
            "train.batch_size=32",
            "train.seq_len=128",
            "train.max_steps=4",
            "train.final_eval_batches=1",
            "train.eval_every=0",
            "train.save_every=0",
            "model.linear.kind=\"tt\"",
            "model.linear.rank=30",
            "model.linear.order=3",
        ] {
            assert!(s.contains(want), "{want}: {s}");
        }
        assert!(!model_sets(&o, Config::Dense).join(" ").contains("linear"));
        assert_eq!(
            model_params(&memory()),
            Some((24 + 4, 2, 12 + 2 + 24 + 2 + 2 + 4 + 2 + 4, Some(4)))
        );
        use crate::report::fixtures::line;
        let mut metrics = [line(1, 6.0, 9.0), line(2, 5.5, 2.0), line(3, 5.0, 4.0)];
        metrics[2].val_loss = Some(5.0);
        let m = parse_model_run(&metrics, &memory(), 1, "x").ok().unwrap();
        assert_eq!((m.step_s, m.above(), m.vocab), (3.0, 4000, Some(4)));
        assert_eq!(m.peak_source, "steps_peak_above_baseline_bytes");
        // No step ran in the process that wrote the report: the whole run's peak.
        let mut resumed = memory();
        resumed.measured = frugal_records::MeasuredMemory::new(1000, 9000, 0);
        let m = parse_model_run(&metrics, &resumed, 1, "x").ok().unwrap();
        assert_eq!(
            (m.above(), m.peak_source.as_str()),
            (8000, "peak_above_baseline_bytes")
        );
        assert!(parse_model_run(&[], &memory(), 1, "x").is_err());
    }

    fn big(part: Part, config: Config, step_s: f64, above: u64, linear: u64, total: u64) -> BigRow {
        BigRow {
            part,
            config,
            measured: Some(BigMeasured {
                forward_s: Some(step_s / 3.0),
                step_s,
                step_median_s: Some(step_s),
                baseline_rss_bytes: 1 << 20,
                peak_rss_bytes: (1 << 20) + (above << 20),
                peak_source: "steps_peak_above_baseline_bytes".into(),
                linear_params: Some(linear),
                rank_var_params: Some(0),
                total_params: Some(total),
                vocab: Some(4099),
                ranks: String::new(),
            }),
            note: String::new(),
            load: Some(1.5),
        }
    }

    #[test]
    fn big_tables_goals_json() {
        let (el, md) = (Part::EncoderLayer, Part::Model);
        let mut rows = vec![
            big(el, Config::Dense, 1.2, 300, 7077888, 7087872),
            big(el, Config::Tt, 0.5, 200, 139712, 150000),
            big(md, Config::Dense, 12.0, 2000, 42467328, 46000000),
            big(md, Config::Tt, 5.0, 1200, 838272, 4400000),
        ];
        let g = big_goals(&rows);
        assert_eq!(g.len(), 3);
        assert!((g[0].1.value.unwrap() - 2.4).abs() < 1e-12);
        assert_eq!(g[0].1.met(), Some(false));
        assert_eq!(g[1].1.met(), Some(true));
        assert_eq!(g[2].1.met(), Some(true));
        let o = args(&[]).ok().unwrap();
        let machine = Machine {
            nproc: 2,
            model: "Test CPU".into(),
        };
        let t = big_table(el, &o, &rows, &g, &machine, "D");
        assert!(
            t.contains("| TT rank 30 | - | 139712 | 50.7x | 150000 | 166.7 | 500.0 | 500.0 | 200 | 0.42x | 0.67x |"),
            "{t}"
        );
        assert!(t.contains("2.40x (goal >= 3.00x): not met"), "{t}");
        let t = big_table(md, &o, &rows, &g, &machine, "D");
        assert!(t.contains("vocabulary 4099"), "{t}");
        assert!(
            t.contains(
                "| TT rank 30, TT word table (rank 32, order 4) | 838272 | 50.7x | 4400000 | \
                 10.5x | 0 | 5.00 | 1200 | 0.42x | 0.60x |"
            ),
            "{t}"
        );
        assert!(
            t.contains("activation checkpointing off") && t.contains("TT-matrix"),
            "{t}"
        );
        let dense_table = args(&["--model-embedding", "dense", "--model-checkpointing", "on"])
            .ok()
            .unwrap();
        let t2 = big_table(md, &dense_table, &rows, &g, &machine, "D");
        assert!(t2.contains("| TT rank 30 | 838272 |"), "{t2}");
        assert!(t2.contains("activation checkpointing on"), "{t2}");
        assert!(t2.contains("the embeddings stay dense"), "{t2}");
        assert!(args(&["--model-embedding", "cp"]).is_err());
        assert!(t.contains("0.60x (goal <= 0.65x): met"), "{t}");
        assert!(t.contains("50.66x (goal >= 45.00x): met"), "{t}");
        assert!(t.contains("all parameters dense / TT: 10.45x"), "{t}");
        rows[3].measured = None;
        rows[3].note = "tt failed: boom".into();
        let g = big_goals(&rows);
        assert_eq!(g[1].1.met(), None);
        let t = big_table(md, &o, &rows, &g, &machine, "D");
        assert!(
            t.contains("| TT rank 30, TT word table (rank 32, order 4) [1] | - |")
                && t.contains("[1] tt failed: boom"),
            "{t}"
        );
        assert!(t.contains("(goal <= 0.65x): not measured"), "{t}");
        let j = result_json(&o, &[], &[], &rows, &g, &machine, "D");
        assert!(
            j.contains("\"parts\": [\"layers\", \"encoder-layer\", \"model\"]"),
            "{j}"
        );
        assert!(
            j.contains("\"at_least\": 3") && j.contains("\"at_most\": 0.65"),
            "{j}"
        );
        assert!(j.contains("\"linear_weight_params\": 139712"), "{j}");
        let model = json_object(&j, "model").unwrap();
        assert!(model.contains("\"note\": \"tt failed: boom\""), "{model}");
    }
}
