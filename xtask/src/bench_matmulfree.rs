//! `cargo xtask bench matmulfree`: the MatMul-free LM (HGRN-bit) against f32 and the LLaMA, on
//! the CPU, in three parts, each side in a fresh child process:
//!
//! - `generate`: greedy generation at batch 1 from random (seeded) weights, a `--prompt`-token
//!   random prompt then `--tokens` new tokens, by the example `generate_bench` of frugal-models:
//!   the 370M HGRN-bit with packed ternary BitLinear layers (`packed`), the same shape with plain
//!   f32 matmuls (`f32`, "the same model unpacked"), and the LLaMA 350M in f32 (`llama`, with its
//!   KV cache). Tokens per second of the generation (after the prompt), the prompt's time, the
//!   model's bytes, the bytes of its projection matrices (blocks and head: packed ternary for
//!   `packed`, f32 otherwise), the state or cache at the end, and resident memory. libtorch and
//!   the ternary kernel run on their default thread counts (one per core).
//! - `train`: `frugal train` steps of HGRN-bit `tiny` and `370m` against the LLaMA `tiny` and
//!   `350m`, sequence 256, batch 4, f32, CPU, AdamW, evaluation and periodic saving off; the
//!   first `--warmup` steps are not timed, the next `--steps` are.
//! - `quality`: `configs/default.toml` as shipped (the `tiny` LLaMA, 500 steps on the default
//!   corpus), and the same with `model.kind = "hgrn-bit"` (same data, seed and so tokens): the
//!   final validation losses and the unigram loss of the run's summary.
//!
//! Goals (issue 7): the packed model's tokens/s at least 5x the f32 model's; its BitLinear
//! matrices at most a tenth of their f32 bytes. The result is printed as markdown tables (stdout)
//! and written to `target/bench/matmulfree.json`.
//!
//! ```text
//! cargo xtask bench matmulfree [-- --parts generate,train,quality --steps 3 --warmup 1
//!                                  --tokens 256 --prompt 16 --checkpointing]
//! ```
//!
//! `--checkpointing` trains every side of the training part with activation checkpointing
//! (`train.checkpointing = true`).

use crate::report::{
    failures, find_key, frugal_train, json_num as num, json_number, json_opt, json_str as string,
    last_json_line, load_average, loads, mean_step_time, metric_points, mib, row_of, utc_date,
    Machine, Outcome,
};
use crate::setup::TorchEnv;
use crate::{Failure, Result};
use frugal_records::MetricsLine;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The example of frugal-models that generates.
const EXAMPLE: &str = "generate_bench";
/// Where the runs go.
const OUT_DIR: &str = "target/bench/matmulfree";
/// The result file.
const RESULT: &str = "target/bench/matmulfree.json";
/// Training part: batch and sequence length.
const BATCH: u64 = 4;
const SEQ: u64 = 256;
/// Goal: the packed model's tokens/s over the f32 model's, at least.
const GOAL_SPEEDUP: f64 = 5.0;
/// Goal: the packed BitLinear matrices' bytes over their f32 bytes, at most.
const GOAL_MATRIX_FRACTION: f64 = 0.1;

const USAGE: &str = "usage: cargo xtask bench matmulfree [-- --parts generate,train,quality \
                     --steps N --warmup W --tokens N --prompt N --checkpointing]";

/// The benchmark's parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Generate,
    Train,
    Quality,
}

impl Part {
    fn key(self) -> &'static str {
        match self {
            Part::Generate => "generate",
            Part::Train => "train",
            Part::Quality => "quality",
        }
    }
}

const PARTS: [Part; 3] = [Part::Generate, Part::Train, Part::Quality];

/// The benchmark's options.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Options {
    /// The parts to run, in [`PARTS`] order.
    parts: Vec<Part>,
    /// Timed training steps.
    steps: u64,
    /// Untimed training steps before them.
    warmup: u64,
    /// New tokens generated.
    tokens: u64,
    /// Prompt tokens.
    prompt: u64,
    /// Train with activation checkpointing.
    checkpointing: bool,
}

impl Options {
    fn has(&self, p: Part) -> bool {
        self.parts.contains(&p)
    }
}

fn parse_args(args: &[String]) -> Result<Options> {
    let mut parts: Option<Vec<Part>> = None;
    let (mut tokens, mut prompt) = (256u64, 16u64);
    let mut checkpointing = false;
    // `--steps` and `--warmup`, for the shared reader of those two.
    let mut rest = Vec::new();
    let known = ["--steps", "--warmup", "--parts", "--tokens", "--prompt"];
    let pairs = crate::report::named_args("matmulfree", USAGE, args, &known, &["--checkpointing"])?;
    for (name, value) in pairs {
        match name.as_str() {
            "--checkpointing" => checkpointing = true,
            "--parts" => {
                let mut chosen = Vec::new();
                for p in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    let part = PARTS
                        .iter()
                        .copied()
                        .find(|x| x.key() == p)
                        .ok_or_else(|| {
                            Failure::new(format!(
                                "bench matmulfree: unknown part '{p}' (parts: generate, train, \
                                 quality)"
                            ))
                        })?;
                    chosen.push(part);
                }
                if chosen.is_empty() {
                    return Err(Failure::new(
                        "bench matmulfree: --parts wants one or more of generate,train,quality",
                    ));
                }
                parts = Some(chosen);
            }
            "--tokens" => tokens = crate::report::whole_arg("matmulfree", &name, &value, 1)?,
            "--prompt" => prompt = crate::report::whole_arg("matmulfree", &name, &value, 1)?,
            _ => rest.push(format!("{name}={value}")),
        }
    }
    let (steps, warmup) = crate::report::parse_steps_warmup("matmulfree", &rest, (3, 1))?;
    let chosen = parts.unwrap_or_else(|| PARTS.to_vec());
    Ok(Options {
        parts: PARTS
            .iter()
            .copied()
            .filter(|p| chosen.contains(p))
            .collect(),
        steps,
        warmup,
        tokens,
        prompt,
        checkpointing,
    })
}

// ---------------------------------------------------------------------------------------------
// Part (a): generation.

/// The generating models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GenModel {
    Packed,
    F32,
    Llama,
}

const GEN_MODELS: [GenModel; 3] = [GenModel::Packed, GenModel::F32, GenModel::Llama];

impl GenModel {
    /// `--model` of the example and the key in the JSON.
    fn key(self) -> &'static str {
        match self {
            GenModel::Packed => "packed",
            GenModel::F32 => "f32",
            GenModel::Llama => "llama",
        }
    }

    /// The preset.
    fn size(self) -> &'static str {
        match self {
            GenModel::Packed | GenModel::F32 => "370m",
            GenModel::Llama => "350m",
        }
    }

    fn label(self) -> &'static str {
        match self {
            GenModel::Packed => "HGRN-bit 370M, packed ternary",
            GenModel::F32 => "HGRN-bit 370M, f32 matmuls",
            GenModel::Llama => "LLaMA 350M, f32",
        }
    }
}

/// What `generate_bench` reports.
#[derive(Debug, Clone, PartialEq)]
struct GenRow {
    tokens_per_s: f64,
    ms_per_token_median: f64,
    prompt_s: f64,
    decode_s: f64,
    params: u64,
    model_bytes: u64,
    variable_bytes: u64,
    quantized_bytes: u64,
    matrix_params: u64,
    matrix_bytes: u64,
    state_bytes: u64,
    state_positions: u64,
    baseline_rss_bytes: u64,
    model_rss_bytes: u64,
    peak_rss_bytes: u64,
    torch_threads: u64,
    kernel_threads: u64,
}

impl GenRow {
    fn peak_above_baseline(&self) -> u64 {
        self.peak_rss_bytes.saturating_sub(self.baseline_rss_bytes)
    }

    /// The projection matrices' bytes over their f32 bytes.
    fn matrix_fraction(&self) -> Option<f64> {
        (self.matrix_params > 0).then(|| self.matrix_bytes as f64 / (4 * self.matrix_params) as f64)
    }
}

/// The row of the example's JSON line.
fn parse_gen(line: &str) -> Option<GenRow> {
    let f = |k| json_number(line, k);
    let int = |k| json_number(line, k).map(|v| v as u64);
    let row = GenRow {
        tokens_per_s: f("tokens_per_s")?,
        ms_per_token_median: f("ms_per_token_median")?,
        prompt_s: f("prompt_s")?,
        decode_s: f("decode_s")?,
        params: int("params")?,
        model_bytes: int("model_bytes")?,
        variable_bytes: int("variable_bytes")?,
        quantized_bytes: int("quantized_bytes")?,
        matrix_params: int("matrix_params")?,
        matrix_bytes: int("matrix_bytes")?,
        state_bytes: int("state_bytes")?,
        state_positions: int("state_positions").unwrap_or(0),
        baseline_rss_bytes: int("baseline_rss_bytes")?,
        model_rss_bytes: int("model_rss_bytes").unwrap_or(0),
        peak_rss_bytes: int("peak_rss_bytes")?,
        torch_threads: int("torch_threads").unwrap_or(0),
        kernel_threads: int("kernel_threads").unwrap_or(0),
    };
    (row.tokens_per_s > 0.0).then_some(row)
}

/// The arguments of the example for `model`.
fn gen_args(opts: &Options, model: GenModel) -> Vec<String> {
    [
        "--model",
        model.key(),
        "--tokens",
        &opts.tokens.to_string(),
        "--prompt",
        &opts.prompt.to_string(),
        "--size",
        model.size(),
        "--seed",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
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

/// The string value of key `key` in `line` (a JSON object), for a child's `"error"` (escapes
/// kept as written but for `\"` and `\\`).
fn json_string(line: &str, key: &str) -> Option<String> {
    let (_, after) = find_key(line, key)?;
    let rest = line[after..].trim_start().strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                c => out.push(c),
            },
            c => out.push(c),
        }
    }
    None
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
        return Err(Failure::new(format!("{what}: {msg}")));
    }
    if !out.status.success() {
        return Err(Failure::new(format!("{what} exited with {}", out.status)));
    }
    line.map(str::to_string)
        .ok_or_else(|| Failure::new(format!("{what} printed no JSON line")))
}

fn run_gen(
    env: &TorchEnv,
    root: &Path,
    bin: &Path,
    opts: &Options,
    model: GenModel,
) -> Result<GenRow> {
    let what = format!("examples/{EXAMPLE} --model {}", model.key());
    let mut c = example_command(env, bin);
    c.current_dir(root).args(gen_args(opts, model));
    c.envs(env.vars());
    let line = child_json(c, &what)?;
    parse_gen(&line)
        .ok_or_else(|| Failure::new(format!("{what} printed an incomplete JSON line: {line}")))
}

/// `a`'s tokens/s over `b`'s.
fn speedup(gen: &[Outcome<GenModel, GenRow>], a: GenModel, b: GenModel) -> Option<f64> {
    Some(row_of(gen, a)?.tokens_per_s / row_of(gen, b)?.tokens_per_s)
}

/// `a`'s whole-model bytes over `b`'s.
fn bytes_ratio(gen: &[Outcome<GenModel, GenRow>], a: GenModel, b: GenModel) -> Option<f64> {
    Some(row_of(gen, a)?.model_bytes as f64 / row_of(gen, b)?.model_bytes as f64)
}

// ---------------------------------------------------------------------------------------------
// Part (b): training steps.

/// A trained model and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TrainSide {
    /// `model.kind`.
    kind: &'static str,
    /// `model.size`.
    size: &'static str,
}

const TRAIN_SIDES: [TrainSide; 4] = [
    TrainSide {
        kind: "hgrn-bit",
        size: "tiny",
    },
    TrainSide {
        kind: "llama",
        size: "tiny",
    },
    TrainSide {
        kind: "hgrn-bit",
        size: "370m",
    },
    TrainSide {
        kind: "llama",
        size: "350m",
    },
];

/// `(name, HGRN-bit side, LLaMA side)` of the compared pairs.
const TRAIN_PAIRS: [(&str, TrainSide, TrainSide); 2] = [
    ("tiny", TRAIN_SIDES[0], TRAIN_SIDES[1]),
    ("370m_vs_350m", TRAIN_SIDES[2], TRAIN_SIDES[3]),
];

impl TrainSide {
    fn key(self) -> String {
        format!("{}-{}", self.kind, self.size)
    }

    fn label(self) -> &'static str {
        if self.kind == "llama" {
            "LLaMA"
        } else {
            "HGRN-bit"
        }
    }
}

/// One training side's measurements.
#[derive(Debug, Clone, PartialEq)]
struct TrainRow {
    step_s: f64,
    baseline_rss_bytes: u64,
    peak_rss_bytes: u64,
    /// Bytes of the model's parameters (`memory.json`'s accounting).
    param_bytes: Option<u64>,
}

impl TrainRow {
    fn tokens_per_s(&self) -> f64 {
        (BATCH * SEQ) as f64 / self.step_s
    }

    fn peak_above_baseline(&self) -> u64 {
        self.peak_rss_bytes.saturating_sub(self.baseline_rss_bytes)
    }
}

/// The `--set` values of one training side.
fn train_sets(opts: &Options, side: TrainSide) -> Vec<String> {
    let mut sets = vec![
        format!("model.kind=\"{}\"", side.kind),
        format!("model.size=\"{}\"", side.size),
    ];
    sets.extend(crate::report::timing_sets(
        SEQ,
        BATCH,
        opts.warmup + opts.steps,
    ));
    if opts.checkpointing {
        sets.push("train.checkpointing=true".into());
    }
    sets
}

fn run_train(
    vars: &[(String, String)],
    root: &Path,
    bin: &Path,
    opts: &Options,
    side: TrainSide,
) -> Result<TrainRow> {
    let total = opts.warmup + opts.steps;
    let out = format!("{OUT_DIR}/train-{}", side.key());
    let out_dir = frugal_train(bin, vars, root, &out, &train_sets(opts, side))?;
    let run = crate::report::read_train_run(&out_dir, &out, opts.warmup, total)?;
    // The trainer checkpoints the last step: gigabytes at 370M, of no use here.
    let _ = std::fs::remove_dir_all(out_dir.join("checkpoints"));
    Ok(TrainRow {
        step_s: run.step_s,
        baseline_rss_bytes: run.baseline_rss_bytes,
        peak_rss_bytes: run.peak_rss_bytes,
        param_bytes: run.memory.accounting.get("parameters").copied(),
    })
}

/// `(step time, peak above baseline)` of the HGRN-bit side over the LLaMA side's.
fn train_ratio(
    train: &[Outcome<TrainSide, TrainRow>],
    hgrn: TrainSide,
    llama: TrainSide,
) -> (Option<f64>, Option<f64>) {
    match (row_of(train, hgrn), row_of(train, llama)) {
        (Some(h), Some(l)) => (
            Some(h.step_s / l.step_s),
            (l.peak_above_baseline() > 0)
                .then(|| h.peak_above_baseline() as f64 / l.peak_above_baseline() as f64),
        ),
        _ => (None, None),
    }
}

/// The LLaMA side a HGRN-bit side is compared with (or itself, for a LLaMA side).
fn train_partner(side: TrainSide) -> Option<(TrainSide, TrainSide)> {
    TRAIN_PAIRS
        .iter()
        .find(|(_, h, l)| *h == side || *l == side)
        .map(|(_, h, l)| (*h, *l))
}

// ---------------------------------------------------------------------------------------------
// Part (c): quality.

/// The two models of the quality part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QualSide {
    Llama,
    Hgrn,
}

const QUAL_SIDES: [QualSide; 2] = [QualSide::Llama, QualSide::Hgrn];

impl QualSide {
    fn key(self) -> &'static str {
        match self {
            QualSide::Llama => "llama-tiny",
            QualSide::Hgrn => "hgrn-bit-tiny",
        }
    }

    fn label(self) -> &'static str {
        match self {
            QualSide::Llama => "LLaMA tiny",
            QualSide::Hgrn => "HGRN-bit tiny",
        }
    }

    /// The `--set` values over `configs/default.toml`.
    fn sets(self) -> Vec<String> {
        match self {
            QualSide::Llama => Vec::new(),
            QualSide::Hgrn => vec!["model.kind=\"hgrn-bit\"".into()],
        }
    }
}

/// One quality run's results.
#[derive(Debug, Clone, PartialEq)]
struct QualRow {
    /// `val_loss` of the last line of `metrics.jsonl` that has one.
    val_loss: f64,
    /// The step of that line.
    val_step: u64,
    /// The summary's unigram validation loss, if printed.
    unigram: Option<f64>,
    /// Tokens trained on (the last line's `tokens`).
    tokens: Option<u64>,
    /// Mean step time of all training steps.
    step_s: Option<f64>,
    /// The run's wall time, start to exit.
    wall_s: f64,
}

/// The unigram validation loss of `frugal train`'s summary (`  unigram val loss     7.1234 (ppl
/// ...)`), if printed.
fn parse_unigram(stdout: &str) -> Option<f64> {
    stdout.lines().find_map(|l| {
        let rest = l.trim_start().strip_prefix("unigram val loss")?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// `(val_loss, step)` of the last line of `metrics.jsonl` with a `val_loss`, the last line's
/// `tokens`, and the mean `step_time_s`.
fn parse_quality_metrics(metrics: &[MetricsLine]) -> Option<(f64, u64, Option<u64>, Option<f64>)> {
    let (step, val) = *metric_points(metrics, |l| l.val_loss).last()?;
    let tokens = metrics.last().map(|l| l.tokens);
    let step_s = mean_step_time(metrics, 0);
    Some((val, step as u64, tokens, step_s))
}

/// [`frugal_train`] with its stdout captured (and copied to our stderr as it comes): the run
/// folder and the stdout.
fn frugal_train_capture(
    bin: &Path,
    vars: &[(String, String)],
    root: &Path,
    out: &str,
    sets: &[String],
) -> Result<(PathBuf, String)> {
    let (mut c, out_dir) = crate::report::frugal_train_command(bin, vars, root, out, sets)?;
    c.stdout(Stdio::piped());
    let mut child = c
        .spawn()
        .map_err(|e| Failure::new(format!("could not start frugal train: {e}")))?;
    let mut captured = String::new();
    if let Some(stdout) = child.stdout.take() {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            eprintln!("{line}");
            captured.push_str(&line);
            captured.push('\n');
        }
    }
    let st = child
        .wait()
        .map_err(|e| Failure::new(format!("frugal train: {e}")))?;
    if !st.success() {
        return Err(Failure::new(format!("frugal train failed ({st})")));
    }
    Ok((out_dir, captured))
}

fn run_quality(
    vars: &[(String, String)],
    root: &Path,
    bin: &Path,
    side: QualSide,
) -> Result<QualRow> {
    let out = format!("{OUT_DIR}/quality-{}", side.key());
    let t0 = Instant::now();
    let (out_dir, stdout) = frugal_train_capture(bin, vars, root, &out, &side.sets())?;
    let wall_s = t0.elapsed().as_secs_f64();
    let metrics = crate::report::read_metrics(&out_dir, &out)?;
    let (val_loss, val_step, tokens, step_s) = parse_quality_metrics(&metrics)
        .ok_or_else(|| Failure::new(format!("{out}/metrics.jsonl has no val_loss")))?;
    Ok(QualRow {
        val_loss,
        val_step,
        unigram: parse_unigram(&stdout),
        tokens,
        step_s,
        wall_s,
    })
}

/// HGRN-bit's final validation loss minus the LLaMA's, and over it.
fn quality_gap(q: &[Outcome<QualSide, QualRow>]) -> (Option<f64>, Option<f64>) {
    match (row_of(q, QualSide::Hgrn), row_of(q, QualSide::Llama)) {
        (Some(h), Some(l)) => (Some(h.val_loss - l.val_loss), Some(h.val_loss / l.val_loss)),
        _ => (None, None),
    }
}

// ---------------------------------------------------------------------------------------------
// The whole benchmark.

/// Every part's outcomes (None: the part was not run).
#[derive(Debug, Default)]
struct Results {
    gen: Option<Vec<Outcome<GenModel, GenRow>>>,
    train: Option<Vec<Outcome<TrainSide, TrainRow>>>,
    quality: Option<Vec<Outcome<QualSide, QualRow>>>,
}

/// A goal: its key, its value, the measured value, whether the measure must be at least
/// (true) or at most (false) the goal.
struct Goal {
    key: &'static str,
    goal: f64,
    measured: Option<f64>,
    at_least: bool,
}

impl Goal {
    fn met(&self) -> bool {
        self.measured.is_some_and(|m| {
            if self.at_least {
                m >= self.goal
            } else {
                m <= self.goal
            }
        })
    }
}

impl Results {
    fn gen(&self) -> &[Outcome<GenModel, GenRow>] {
        self.gen.as_deref().unwrap_or_default()
    }

    fn goals(&self) -> [Goal; 2] {
        let gen = self.gen();
        [
            Goal {
                key: "packed_tokens_per_s_over_f32_at_least",
                goal: GOAL_SPEEDUP,
                measured: speedup(gen, GenModel::Packed, GenModel::F32),
                at_least: true,
            },
            Goal {
                key: "bitlinear_matrix_bytes_over_f32_at_most",
                goal: GOAL_MATRIX_FRACTION,
                measured: row_of(gen, GenModel::Packed).and_then(GenRow::matrix_fraction),
                at_least: false,
            },
        ]
    }

    /// `(part, side, error)` of every side that failed.
    fn failures(&self) -> Vec<(&'static str, String, &str)> {
        let mut v = Vec::new();
        for (s, e) in failures(self.gen()) {
            v.push(("generate", s.key().to_string(), e));
        }
        for (s, e) in failures(self.train.as_deref().unwrap_or_default()) {
            v.push(("train", s.key(), e));
        }
        for (s, e) in failures(self.quality.as_deref().unwrap_or_default()) {
            v.push(("quality", s.key().to_string(), e));
        }
        v
    }
}

/// Runs the benchmark.
pub fn run(env: &TorchEnv, args: &[String]) -> Result<()> {
    let opts = parse_args(args)?;
    let root = crate::root();
    std::fs::create_dir_all(root.join(OUT_DIR))
        .map_err(|e| Failure::new(format!("cannot create {OUT_DIR}: {e}")))?;
    let vars = env.vars();

    // Build first, so that the compiler does not share the CPU with any timed run.
    let example = if opts.has(Part::Generate) {
        eprintln!("bench matmulfree: building the example {EXAMPLE} of frugal-models (release)");
        let mut c = crate::cargo(env);
        c.args([
            "build",
            "--release",
            "-p",
            "frugal-models",
            "--example",
            EXAMPLE,
        ]);
        Some(
            crate::status(c, "cargo build")
                .map(|()| root.join("target/release/examples").join(EXAMPLE)),
        )
    } else {
        None
    };
    let frugal = (opts.has(Part::Train) || opts.has(Part::Quality)).then(|| {
        eprintln!("bench matmulfree: building frugal (release)");
        crate::build_frugal(env)
    });
    let not_built = |what: &str, f: &Failure| format!("{what} was not built: {}", f.message);

    let mut res = Results::default();
    if let Some(example) = &example {
        let mut gen = Vec::new();
        for model in GEN_MODELS {
            eprintln!(
                "bench matmulfree: generate, {}: {} new tokens after a {}-token prompt",
                model.label(),
                opts.tokens,
                opts.prompt
            );
            let load = load_average();
            let row = match example {
                Ok(bin) => run_gen(env, &root, bin, &opts, model).map_err(|f| f.message),
                Err(f) => Err(not_built(EXAMPLE, f)),
            };
            if let Err(e) = &row {
                eprintln!("bench matmulfree: generate, {} failed: {e}", model.label());
            }
            gen.push(Outcome {
                side: model,
                row,
                load,
            });
        }
        res.gen = Some(gen);
    }
    if opts.has(Part::Train) {
        let mut train = Vec::new();
        for side in TRAIN_SIDES {
            eprintln!(
                "bench matmulfree: train, {} {}: {} timed steps after {} warmup steps",
                side.label(),
                side.size,
                opts.steps,
                opts.warmup
            );
            let load = load_average();
            let row = match frugal.as_ref().expect("built for train") {
                Ok(bin) => run_train(&vars, &root, bin, &opts, side).map_err(|f| f.message),
                Err(f) => Err(not_built("frugal", f)),
            };
            if let Err(e) = &row {
                eprintln!("bench matmulfree: train, {} failed: {e}", side.key());
            }
            train.push(Outcome { side, row, load });
        }
        res.train = Some(train);
    }
    if opts.has(Part::Quality) {
        let mut quality = Vec::new();
        for side in QUAL_SIDES {
            eprintln!(
                "bench matmulfree: quality, {}: configs/default.toml {}",
                side.label(),
                side.sets()
                    .iter()
                    .map(|s| format!("--set {s}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            let load = load_average();
            let row = match frugal.as_ref().expect("built for quality") {
                Ok(bin) => run_quality(&vars, &root, bin, side).map_err(|f| f.message),
                Err(f) => Err(not_built("frugal", f)),
            };
            if let Err(e) = &row {
                eprintln!("bench matmulfree: quality, {} failed: {e}", side.label());
            }
            quality.push(Outcome { side, row, load });
        }
        res.quality = Some(quality);
    }

    let machine = Machine::detect();
    let date = utc_date();
    print!("{}", tables(&opts, &res, &machine, &date));
    let json = result_json(&opts, &res, &machine, &date);
    std::fs::write(root.join(RESULT), json)
        .map_err(|e| Failure::new(format!("cannot write {RESULT}: {e}")))?;
    eprintln!("bench matmulfree: wrote {RESULT}");

    let failed: Vec<(String, String)> = res
        .failures()
        .iter()
        .map(|(p, s, e)| (format!("{p} {s}"), e.to_string()))
        .collect();
    crate::report::sides_failed(RESULT, &failed)
}

// ---------------------------------------------------------------------------------------------
// Tables.

/// A ratio for the table, empty when a side is missing.
fn ratio_cell(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}x")).unwrap_or_default()
}

/// Bytes as MiB with one decimal.
fn mib1(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

/// Bytes as KiB with one decimal.
fn kib1(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1024.0)
}

fn gen_table(opts: &Options, gen: &[Outcome<GenModel, GenRow>]) -> String {
    let mut s = String::from(
        "| model | tokens/s | ms/token (median) | prompt (s) | parameters | model (MiB) | \
         projection matrices + head (MiB) | matrices / f32 bytes | state or cache at end (KiB) | \
         baseline RSS (MiB) | peak RSS (MiB) | peak above baseline (MiB) | tokens/s / f32's | \
         tokens/s / LLaMA's |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for o in gen {
        match &o.row {
            Ok(r) => s.push_str(&format!(
                "| {} | {:.2} | {:.1} | {:.3} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                o.side.label(),
                r.tokens_per_s,
                r.ms_per_token_median,
                r.prompt_s,
                r.params,
                mib1(r.model_bytes),
                mib1(r.matrix_bytes),
                r.matrix_fraction()
                    .map_or_else(String::new, |f| format!("{f:.4}")),
                kib1(r.state_bytes),
                mib(r.baseline_rss_bytes),
                mib(r.peak_rss_bytes),
                mib(r.peak_above_baseline()),
                ratio_cell(speedup(gen, o.side, GenModel::F32)),
                ratio_cell(speedup(gen, o.side, GenModel::Llama)),
            )),
            Err(_) => s.push_str(&format!(
                "| {} | failed | | | | | | | | | | | | |\n",
                o.side.label()
            )),
        }
    }
    let threads = gen
        .iter()
        .filter_map(|o| o.row.as_ref().ok())
        .map(|r| (r.torch_threads, r.kernel_threads))
        .next();
    s.push_str(&format!(
        "\nBatch 1, greedy, a {}-token random prompt then {} new tokens (tokens/s: the new tokens \
         over their time, after the prompt), random weights (seed 0), under no_grad.",
        opts.prompt, opts.tokens
    ));
    if let Some((t, k)) = threads {
        s.push_str(&format!(
            " libtorch on {t} threads, the ternary kernel on {k}."
        ));
    }
    s.push('\n');
    if let (Some(p), Some(f)) = (row_of(gen, GenModel::Packed), row_of(gen, GenModel::F32)) {
        s.push_str(&format!(
            "Whole model: packed {} MiB ({} MiB packed ternary matrices + {} MiB f32 variables: \
             embeddings, norms, gains), f32 {} MiB: {:.3} of it",
            mib1(p.model_bytes),
            mib1(p.quantized_bytes),
            mib1(p.variable_bytes),
            mib1(f.model_bytes),
            p.model_bytes as f64 / f.model_bytes as f64
        ));
        if let Some(l) = row_of(gen, GenModel::Llama) {
            s.push_str(&format!(
                "; LLaMA {} MiB: packed {:.3} of it",
                mib1(l.model_bytes),
                p.model_bytes as f64 / l.model_bytes as f64
            ));
        }
        s.push_str(".\n");
    }
    for o in gen {
        if let Err(e) = &o.row {
            s.push_str(&format!("{} failed: {e}\n", o.side.label()));
        }
    }
    s.push_str(&format!(
        "Load average (1 min) when each model started: {}.\n",
        loads(gen, |m| m.key().to_string())
    ));
    s
}

fn train_table(opts: &Options, train: &[Outcome<TrainSide, TrainRow>]) -> String {
    let mut s = String::from(
        "| model | size | parameters | step time (s) | tokens/s | peak RSS (MiB) | \
         peak above baseline (MiB) | step / LLaMA's | peak above baseline / LLaMA's |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for o in train {
        match &o.row {
            Ok(r) => {
                let (step, peak) = train_partner(o.side).map_or((None, None), |(h, l)| {
                    if o.side == h {
                        train_ratio(train, h, l)
                    } else {
                        (Some(1.0), Some(1.0))
                    }
                });
                s.push_str(&format!(
                    "| {} | {} | {} | {:.3} | {:.0} | {} | {} | {} | {} |\n",
                    o.side.label(),
                    o.side.size,
                    r.param_bytes
                        .map_or_else(String::new, |b| (b / 4).to_string()),
                    r.step_s,
                    r.tokens_per_s(),
                    mib(r.peak_rss_bytes),
                    mib(r.peak_above_baseline()),
                    ratio_cell(step),
                    ratio_cell(peak),
                ));
            }
            Err(_) => s.push_str(&format!(
                "| {} | {} | failed | | | | | | |\n",
                o.side.label(),
                o.side.size
            )),
        }
    }
    s.push_str(&format!(
        "\n`frugal train`, seq {SEQ}, batch {BATCH}, f32, CPU, AdamW{}, {} timed steps after {} \
         warmup; HGRN-bit 370m is compared with LLaMA 350m.\n",
        if opts.checkpointing {
            ", activation checkpointing"
        } else {
            ""
        },
        opts.steps,
        opts.warmup
    ));
    for o in train {
        if let Err(e) = &o.row {
            s.push_str(&format!("{} failed: {e}\n", o.side.key()));
        }
    }
    s.push_str(&format!(
        "Load average (1 min) when each side started: {}.\n",
        loads(train, TrainSide::key)
    ));
    s
}

fn quality_table(q: &[Outcome<QualSide, QualRow>]) -> String {
    let mut s = String::from(
        "| model | final val loss | val ppl | at step | unigram val loss | tokens | mean step (s) | \
         wall (min) |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for o in q {
        match &o.row {
            Ok(r) => s.push_str(&format!(
                "| {} | {:.4} | {:.2} | {} | {} | {} | {} | {:.1} |\n",
                o.side.label(),
                r.val_loss,
                r.val_loss.exp(),
                r.val_step,
                r.unigram.map_or_else(String::new, |u| format!("{u:.4}")),
                r.tokens.map_or_else(String::new, |t| t.to_string()),
                r.step_s.map_or_else(String::new, |t| format!("{t:.3}")),
                r.wall_s / 60.0,
            )),
            Err(_) => s.push_str(&format!("| {} | failed | | | | | | |\n", o.side.label())),
        }
    }
    s.push_str(
        "\n`frugal train --config configs/default.toml` as shipped (tiny, 500 steps, default \
         corpus), the HGRN-bit run with `--set model.kind=\"hgrn-bit\"`.\n",
    );
    if let (Some(d), Some(r)) = quality_gap(q) {
        s.push_str(&format!(
            "HGRN-bit's final val loss minus the LLaMA's: {d:+.4} ({r:.3}x).\n"
        ));
    }
    for o in q {
        if let Err(e) = &o.row {
            s.push_str(&format!("{} failed: {e}\n", o.side.label()));
        }
    }
    s.push_str(&format!(
        "Load average (1 min) when each run started: {}.\n",
        loads(q, |x| x.key().to_string())
    ));
    s
}

/// The markdown tables of the parts run, then the goals.
fn tables(opts: &Options, res: &Results, machine: &Machine, date: &str) -> String {
    let mut s = format!(
        "MatMul-free LM (HGRN-bit) benchmark, CPU: {} x {}, {date}\n",
        machine.nproc, machine.model
    );
    if let Some(gen) = &res.gen {
        s.push_str("\n## Generation\n\n");
        s.push_str(&gen_table(opts, gen));
    }
    if let Some(train) = &res.train {
        s.push_str("\n## Training step\n\n");
        s.push_str(&train_table(opts, train));
    }
    if let Some(q) = &res.quality {
        s.push_str("\n## Quality\n\n");
        s.push_str(&quality_table(q));
    }
    s.push_str("\nGoals:\n");
    for g in res.goals() {
        let got = g
            .measured
            .map_or_else(|| "not measured".to_string(), |m| format!("{m:.4}"));
        s.push_str(&format!(
            "- {} {}: {got} ({})\n",
            g.key,
            g.goal,
            if g.met() { "met" } else { "not met" }
        ));
    }
    s
}

// ---------------------------------------------------------------------------------------------
// JSON.

fn gen_json(opts: &Options, gen: &[Outcome<GenModel, GenRow>]) -> String {
    let models = gen
        .iter()
        .map(|o| {
            let load = json_opt(o.load);
            let body = match &o.row {
                Ok(r) => format!(
                    "{{\"size\": {}, \"tokens_per_s\": {}, \"ms_per_token_median\": {}, \
                     \"prompt_s\": {}, \"decode_s\": {}, \"params\": {}, \"model_bytes\": {}, \
                     \"variable_bytes\": {}, \"quantized_bytes\": {}, \"matrix_params\": {}, \
                     \"matrix_bytes\": {}, \"matrix_f32_bytes\": {}, \"matrix_over_f32\": {}, \
                     \"state_bytes\": {}, \"state_positions\": {}, \"baseline_rss_bytes\": {}, \
                     \"model_rss_bytes\": {}, \"peak_rss_bytes\": {}, \
                     \"peak_above_baseline_bytes\": {}, \"torch_threads\": {}, \
                     \"kernel_threads\": {}, \"tokens_per_s_over_f32\": {}, \
                     \"tokens_per_s_over_llama\": {}, \"load_average\": {load}}}",
                    string(o.side.size()),
                    num(r.tokens_per_s),
                    num(r.ms_per_token_median),
                    num(r.prompt_s),
                    num(r.decode_s),
                    r.params,
                    r.model_bytes,
                    r.variable_bytes,
                    r.quantized_bytes,
                    r.matrix_params,
                    r.matrix_bytes,
                    4 * r.matrix_params,
                    json_opt(r.matrix_fraction()),
                    r.state_bytes,
                    r.state_positions,
                    r.baseline_rss_bytes,
                    r.model_rss_bytes,
                    r.peak_rss_bytes,
                    r.peak_above_baseline(),
                    r.torch_threads,
                    r.kernel_threads,
                    json_opt(speedup(gen, o.side, GenModel::F32)),
                    json_opt(speedup(gen, o.side, GenModel::Llama)),
                ),
                Err(e) => format!(
                    "{{\"size\": {}, \"error\": {}, \"load_average\": {load}}}",
                    string(o.side.size()),
                    string(e)
                ),
            };
            format!("      \"{}\": {body}", o.side.key())
        })
        .collect::<Vec<_>>()
        .join(",\n");
    format!(
        "{{\n    \"batch\": 1, \"prompt_tokens\": {}, \"new_tokens\": {}, \"greedy\": true, \
         \"seed\": 0,\n    \"models\": {{\n{models}\n    }},\n    \"ratios\": \
         {{\"packed_tokens_per_s_over_f32\": {}, \"packed_tokens_per_s_over_llama\": {}, \
         \"packed_model_bytes_over_f32\": {}, \"packed_model_bytes_over_llama\": {}, \
         \"packed_matrix_bytes_over_f32\": {}}}\n  }}",
        opts.prompt,
        opts.tokens,
        json_opt(speedup(gen, GenModel::Packed, GenModel::F32)),
        json_opt(speedup(gen, GenModel::Packed, GenModel::Llama)),
        json_opt(bytes_ratio(gen, GenModel::Packed, GenModel::F32)),
        json_opt(bytes_ratio(gen, GenModel::Packed, GenModel::Llama)),
        json_opt(row_of(gen, GenModel::Packed).and_then(GenRow::matrix_fraction)),
    )
}

fn train_json(opts: &Options, train: &[Outcome<TrainSide, TrainRow>]) -> String {
    let sides = train
        .iter()
        .map(|o| {
            let load = json_opt(o.load);
            let body = match &o.row {
                Ok(r) => format!(
                    "{{\"kind\": {}, \"size\": {}, \"step_s\": {}, \"tokens_per_s\": {}, \
                     \"param_bytes\": {}, \"peak_rss_bytes\": {}, \"baseline_rss_bytes\": {}, \
                     \"peak_above_baseline_bytes\": {}, \"load_average\": {load}}}",
                    string(o.side.kind),
                    string(o.side.size),
                    num(r.step_s),
                    num(r.tokens_per_s()),
                    r.param_bytes
                        .map_or_else(|| "null".to_string(), |b| b.to_string()),
                    r.peak_rss_bytes,
                    r.baseline_rss_bytes,
                    r.peak_above_baseline(),
                ),
                Err(e) => format!(
                    "{{\"kind\": {}, \"size\": {}, \"error\": {}, \"load_average\": {load}}}",
                    string(o.side.kind),
                    string(o.side.size),
                    string(e)
                ),
            };
            format!("      \"{}\": {body}", o.side.key())
        })
        .collect::<Vec<_>>()
        .join(",\n");
    let ratios = TRAIN_PAIRS
        .iter()
        .map(|(name, h, l)| {
            let (step, peak) = train_ratio(train, *h, *l);
            format!(
                "\"{name}\": {{\"hgrn_step_over_llama\": {}, \
                 \"hgrn_peak_above_baseline_over_llama\": {}}}",
                json_opt(step),
                json_opt(peak)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{{\n    \"steps\": {}, \"warmup\": {}, \"batch\": {BATCH}, \"seq\": {SEQ}, \
         \"optimizer\": \"adamw\", \"checkpointing\": {},\n    \"sides\": {{\n{sides}\n    \
         }},\n    \"ratios\": {{{ratios}}}\n  }}",
        opts.steps, opts.warmup, opts.checkpointing
    )
}

fn quality_json(q: &[Outcome<QualSide, QualRow>]) -> String {
    let sides = q
        .iter()
        .map(|o| {
            let load = json_opt(o.load);
            let body = match &o.row {
                Ok(r) => format!(
                    "{{\"final_val_loss\": {}, \"val_step\": {}, \"unigram_val_loss\": {}, \
                     \"tokens\": {}, \"step_s\": {}, \"wall_s\": {}, \"load_average\": {load}}}",
                    num(r.val_loss),
                    r.val_step,
                    json_opt(r.unigram),
                    r.tokens
                        .map_or_else(|| "null".to_string(), |t| t.to_string()),
                    json_opt(r.step_s),
                    num(r.wall_s),
                ),
                Err(e) => format!("{{\"error\": {}, \"load_average\": {load}}}", string(e)),
            };
            format!("      \"{}\": {body}", o.side.key())
        })
        .collect::<Vec<_>>()
        .join(",\n");
    let (diff, ratio) = quality_gap(q);
    format!(
        "{{\n    \"config\": \"configs/default.toml\",\n    \"sides\": {{\n{sides}\n    }},\n    \
         \"hgrn_val_loss_minus_llama\": {},\n    \"hgrn_val_loss_over_llama\": {}\n  }}",
        json_opt(diff),
        json_opt(ratio)
    )
}

fn result_json(opts: &Options, res: &Results, machine: &Machine, date: &str) -> String {
    let goals = res.goals();
    let goals_json = goals
        .iter()
        .map(|g| {
            format!(
                "    \"{}\": {{\"goal\": {}, \"measured\": {}, \"met\": {}}}",
                g.key,
                num(g.goal),
                json_opt(g.measured),
                g.met()
            )
        })
        .collect::<Vec<_>>()
        .join(",\n");
    let all_met = goals.iter().all(Goal::met);
    let threads = res
        .gen()
        .iter()
        .filter_map(|o| o.row.as_ref().ok())
        .map(|r| r.torch_threads)
        .next();
    format!(
        "{{\n  \"benchmark\": \"matmulfree\",\n  \"dtype\": \"f32\",\n  \"device\": \"cpu\",\n  \
         \"parts\": [{}],\n  \"machine\": {{\"nproc\": {}, \"cpu\": {}, \"torch_threads\": {}}},\n  \
         \"date\": {},\n  \"generate\": {},\n  \"train\": {},\n  \"quality\": {},\n  \"goals\": \
         {{\n{goals_json},\n    \"all_met\": {all_met}\n  }}\n}}\n",
        opts.parts
            .iter()
            .map(|p| string(p.key()))
            .collect::<Vec<_>>()
            .join(", "),
        machine.nproc,
        string(&machine.model),
        threads.map_or_else(|| "null".to_string(), |t| t.to_string()),
        string(date),
        res.gen
            .as_deref()
            .map_or_else(|| "null".to_string(), |g| gen_json(opts, g)),
        res.train
            .as_deref()
            .map_or_else(|| "null".to_string(), |t| train_json(opts, t)),
        res.quality
            .as_deref()
            .map_or_else(|| "null".to_string(), quality_json),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::fixtures::{jsonl, line, memory, memory_json};
    use crate::report::json_object;

    fn args(v: &[&str]) -> Result<Options> {
        parse_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options() {
        let d = args(&[]).ok().unwrap();
        assert_eq!(d.parts, PARTS.to_vec());
        assert_eq!((d.steps, d.warmup, d.tokens, d.prompt), (3, 1, 256, 16));
        let o = args(&[
            "--parts",
            "quality,generate",
            "--steps=5",
            "--warmup",
            "0",
            "--tokens=32",
            "--prompt",
            "4",
        ])
        .ok()
        .unwrap();
        assert_eq!(o.parts, vec![Part::Generate, Part::Quality]);
        assert_eq!((o.steps, o.warmup, o.tokens, o.prompt), (5, 0, 32, 4));
        assert!(!o.checkpointing);
        let c = args(&["--checkpointing", "--parts", "train"]).ok().unwrap();
        assert!(c.checkpointing);
        assert!(train_sets(&c, TRAIN_SIDES[0]).contains(&"train.checkpointing=true".to_string()));
        assert!(!train_sets(&o, TRAIN_SIDES[0])
            .iter()
            .any(|s| s.contains("checkpointing")));
        assert!(args(&["--checkpointing=yes"]).is_err());
        assert!(args(&["--parts", "bogus"]).is_err());
        assert!(args(&["--parts", ""]).is_err());
        assert!(args(&["--steps", "0"]).is_err());
        assert!(args(&["--tokens", "0"]).is_err());
        assert!(args(&["--size", "1b"]).is_err());
        assert!(args(&["--warmup"]).is_err());
    }

    const PACKED: &str = r#"{"baseline_rss_bytes":363515904,"decode_s":0.5,"generated":[1,2],"kernel_threads":2,"matrix_bytes":85262916,"matrix_f32_bytes":1364197376,"matrix_params":341049344,"model":"packed","model_bytes":217498180,"model_rss_bytes":1369915392,"ms_per_token_median":28.5,"params":374108160,"peak_rss_bytes":1631993856,"prompt":16,"prompt_s":0.5,"quantized_bytes":85262916,"seed":0,"size":"370m","state_bytes":98304,"state_positions":0,"tokens":16,"tokens_per_s":32.0,"torch_threads":2,"variable_bytes":132235264}"#;

    fn gen_row(tps: f64, matrix_bytes: u64, model_bytes: u64) -> GenRow {
        GenRow {
            tokens_per_s: tps,
            ms_per_token_median: 1000.0 / tps,
            prompt_s: 0.5,
            decode_s: 256.0 / tps,
            params: 374108160,
            model_bytes,
            variable_bytes: 132235264,
            quantized_bytes: 0,
            matrix_params: 341049344,
            matrix_bytes,
            state_bytes: 98304,
            state_positions: 0,
            baseline_rss_bytes: 100 << 20,
            model_rss_bytes: 200 << 20,
            peak_rss_bytes: 300 << 20,
            torch_threads: 2,
            kernel_threads: 2,
        }
    }

    #[test]
    fn example_line() {
        let r = parse_gen(&format!("noise\n{PACKED}\n")).unwrap();
        assert_eq!(r.tokens_per_s, 32.0);
        assert_eq!(r.matrix_params, 341049344);
        assert_eq!(r.peak_above_baseline(), 1631993856 - 363515904);
        let f = r.matrix_fraction().unwrap();
        assert!((f - 85262916.0 / 1364197376.0).abs() < 1e-12, "{f}");
        assert!(parse_gen("{\"tokens_per_s\": 3.0}").is_none());
        assert_eq!(
            json_string(r#"{"error": "bad \"size\"\n"}"#, "error").as_deref(),
            Some("bad \"size\"\n")
        );
    }

    fn results(f32_row: std::result::Result<GenRow, String>) -> Results {
        let gen = vec![
            Outcome {
                side: GenModel::Packed,
                row: Ok(gen_row(40.0, 85262916, 217498180)),
                load: Some(1.0),
            },
            Outcome {
                side: GenModel::F32,
                row: f32_row,
                load: Some(1.5),
            },
            Outcome {
                side: GenModel::Llama,
                row: Ok(gen_row(4.0, 1340604416, 1471877120)),
                load: None,
            },
        ];
        let train_row = |step_s: f64, peak: u64| TrainRow {
            step_s,
            baseline_rss_bytes: 100 << 20,
            peak_rss_bytes: peak << 20,
            param_bytes: Some(4000),
        };
        let train = vec![
            Outcome {
                side: TRAIN_SIDES[0],
                row: Ok(train_row(0.5, 300)),
                load: Some(0.5),
            },
            Outcome {
                side: TRAIN_SIDES[1],
                row: Ok(train_row(0.25, 200)),
                load: Some(0.5),
            },
            Outcome {
                side: TRAIN_SIDES[2],
                row: Err("frugal train failed (exit status: 1)".into()),
                load: Some(0.5),
            },
            Outcome {
                side: TRAIN_SIDES[3],
                row: Ok(train_row(16.0, 8000)),
                load: Some(0.5),
            },
        ];
        let quality = vec![
            Outcome {
                side: QualSide::Llama,
                row: Ok(QualRow {
                    val_loss: 4.0,
                    val_step: 500,
                    unigram: Some(6.5),
                    tokens: Some(1024000),
                    step_s: Some(0.5),
                    wall_s: 300.0,
                }),
                load: Some(1.0),
            },
            Outcome {
                side: QualSide::Hgrn,
                row: Ok(QualRow {
                    val_loss: 4.4,
                    val_step: 500,
                    unigram: None,
                    tokens: Some(1024000),
                    step_s: Some(0.6),
                    wall_s: 360.0,
                }),
                load: Some(1.0),
            },
        ];
        Results {
            gen: Some(gen),
            train: Some(train),
            quality: Some(quality),
        }
    }

    fn opts() -> Options {
        Options {
            parts: PARTS.to_vec(),
            steps: 3,
            warmup: 1,
            tokens: 256,
            prompt: 16,
            checkpointing: false,
        }
    }

    fn machine() -> Machine {
        Machine {
            nproc: 2,
            model: "Test CPU".into(),
        }
    }

    #[test]
    fn tables_and_json() {
        let res = results(Ok(gen_row(5.0, 1364197376, 1495666688)));
        let t = tables(&opts(), &res, &machine(), "2025-01-01T00:00:00Z");
        assert!(
            t.contains("| HGRN-bit 370M, packed ternary | 40.00 | 25.0 | 0.500 | 374108160 | 207.4 | 81.3 | 0.0625 |"),
            "{t}"
        );
        assert!(t.contains("| 8.00x | 10.00x |"), "{t}");
        assert!(
            t.contains("| HGRN-bit | tiny | 1000 | 0.500 | 2048 | 300 | 200 | 2.00x | 2.00x |"),
            "{t}"
        );
        assert!(t.contains("| LLaMA | tiny | 1000 | 0.250 | 4096 | 200 | 100 | 1.00x | 1.00x |"));
        assert!(t.contains("| HGRN-bit | 370m | failed |"), "{t}");
        assert!(t.contains("| LLaMA | 350m | 1000 | 16.000 | 64 | 8000 | 7900 | 1.00x | 1.00x |"));
        assert!(
            t.contains("| LLaMA tiny | 4.0000 | 54.60 | 500 | 6.5000 | 1024000 | 0.500 | 5.0 |")
        );
        assert!(t.contains("| HGRN-bit tiny | 4.4000 | 81.45 | 500 |  | 1024000 | 0.600 | 6.0 |"));
        assert!(t.contains("minus the LLaMA's: +0.4000 (1.100x)"), "{t}");
        assert!(
            t.contains("- packed_tokens_per_s_over_f32_at_least 5: 8.0000 (met)"),
            "{t}"
        );
        assert!(
            t.contains("- bitlinear_matrix_bytes_over_f32_at_most 0.1: 0.0625 (met)"),
            "{t}"
        );
        assert!(t.contains("packed 1.00, f32 1.50, llama ?"), "{t}");

        let j = result_json(&opts(), &res, &machine(), "d");
        let goals = json_object(&j, "goals").unwrap();
        let g = json_object(goals, "packed_tokens_per_s_over_f32_at_least").unwrap();
        assert_eq!(json_number(g, "measured"), Some(8.0));
        assert!(g.contains("\"met\": true"));
        assert!(goals.contains("\"all_met\": true"));
        let gen = json_object(&j, "generate").unwrap();
        let packed = json_object(json_object(gen, "models").unwrap(), "packed").unwrap();
        let frac = json_number(packed, "matrix_over_f32").unwrap();
        assert!((frac - 85262916.0 / 1364197376.0).abs() < 1e-12, "{frac}");
        assert_eq!(json_number(packed, "tokens_per_s_over_llama"), Some(10.0));
        assert_eq!(
            json_number(
                json_object(gen, "ratios").unwrap(),
                "packed_tokens_per_s_over_f32"
            ),
            Some(8.0)
        );
        let train = json_object(&j, "train").unwrap();
        let tiny = json_object(json_object(train, "ratios").unwrap(), "tiny").unwrap();
        assert_eq!(json_number(tiny, "hgrn_step_over_llama"), Some(2.0));
        let big = json_object(json_object(train, "ratios").unwrap(), "370m_vs_350m").unwrap();
        assert!(big.contains("\"hgrn_step_over_llama\": null"), "{big}");
        let failed = json_object(json_object(train, "sides").unwrap(), "hgrn-bit-370m").unwrap();
        assert!(
            failed.contains("\"error\": \"frugal train failed"),
            "{failed}"
        );
        let q = json_object(&j, "quality").unwrap();
        let h = json_object(json_object(q, "sides").unwrap(), "hgrn-bit-tiny").unwrap();
        assert!(h.contains("\"unigram_val_loss\": null"));
        assert_eq!(json_number(q, "hgrn_val_loss_over_llama"), Some(4.4 / 4.0));
        assert_eq!(json_number(&j, "torch_threads"), Some(2.0));
        let f = res.failures();
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].0, f[0].1.as_str()), ("train", "hgrn-bit-370m"));
    }

    #[test]
    fn failed_generation_and_parts_not_run() {
        let mut res = results(Err("examples/generate_bench exited with 2".into()));
        res.quality = None;
        let t = tables(&opts(), &res, &machine(), "d");
        assert!(t.contains("| HGRN-bit 370M, f32 matmuls | failed |"), "{t}");
        assert!(t.contains("HGRN-bit 370M, f32 matmuls failed: examples/generate_bench"));
        assert!(
            t.contains("- packed_tokens_per_s_over_f32_at_least 5: not measured (not met)"),
            "{t}"
        );
        assert!(!t.contains("## Quality"));
        let j = result_json(&opts(), &res, &machine(), "d");
        assert!(j.contains("\"quality\": null"), "{j}");
        let goals = json_object(&j, "goals").unwrap();
        assert!(goals.contains("\"all_met\": false"));
        let f32 = json_object(json_object(&j, "models").unwrap(), "f32").unwrap();
        assert!(f32.contains("\"error\": \"examples/generate_bench exited"));
        assert_eq!(res.failures().len(), 2);
    }

    #[test]
    fn quality_parsing() {
        let summary = "\nrun finished\n  steps                500\n  validation loss      4.1 (ppl 60.3)\n  unigram val loss     6.4321 (ppl 622.00), the loss of a model that ignores context\n";
        assert_eq!(parse_unigram(summary), Some(6.4321));
        assert_eq!(parse_unigram("no summary"), None);
        let mut metrics = [line(1, 9.0, 0.5), line(2, 8.0, 0.7), line(3, 7.0, 0.6)];
        metrics[1].val_loss = Some(7.5);
        let (val, step, tokens, step_s) = parse_quality_metrics(&metrics).unwrap();
        assert_eq!((val, step, tokens), (7.5, 2, Some(3 * 1024)));
        assert!((step_s.unwrap() - 0.6).abs() < 1e-12);
        assert!(parse_quality_metrics(&[line(1, 9.0, 0.5)]).is_none());
    }

    #[test]
    fn train_sets_per_side() {
        let s = train_sets(&opts(), TRAIN_SIDES[2]);
        for want in [
            "model.kind=\"hgrn-bit\"",
            "model.size=\"370m\"",
            "train.seq_len=256",
            "train.batch_size=4",
            "train.max_steps=4",
            "train.eval_every=0",
            "train.save_every=0",
            "train.device=\"cpu\"",
        ] {
            assert!(s.contains(&want.to_string()), "{want}: {s:?}");
        }
        assert_eq!(
            train_partner(TRAIN_SIDES[3]),
            Some((TRAIN_SIDES[2], TRAIN_SIDES[3]))
        );
    }

    /// The quality and training runs end to end, with a shell script standing in for `frugal`.
    #[cfg(unix)]
    #[test]
    fn frugal_child_processes() {
        use std::os::unix::fs::PermissionsExt;
        let root = std::env::temp_dir().join(format!(
            "xtask-bench-matmulfree-test-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let bin = root.join("fake-frugal");
        let script = r#"#!/bin/sh
[ "$1 $2 $3" = "train --config configs/default.toml" ] || exit 3
case "$*" in *'model.kind="hgrn-bit"'*) ;; *) exit 4 ;; esac
while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
mkdir -p "$out"
printf '%s' 'METRICS' > "$out/metrics.jsonl"
printf '%s' 'MEMORY' > "$out/memory.json"
echo "run finished"
echo "  unigram val loss     6.5000 (ppl 665.14), the loss of a model that ignores context"
"#;
        let mut lines = [line(1, 10.0, 5.0), line(2, 9.0, 1.5), line(3, 8.0, 2.5)];
        lines[1].val_loss = Some(8.25);
        let script = script
            .replace("METRICS", &jsonl(&lines))
            .replace("MEMORY", &memory_json(&memory(10, 30, 4000)));
        std::fs::write(&bin, script).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let q = run_quality(&[], &root, &bin, QualSide::Hgrn)
            .map_err(|f| f.message)
            .unwrap();
        assert_eq!((q.val_loss, q.val_step, q.unigram), (8.25, 2, Some(6.5)));
        assert!(root.join(OUT_DIR).join("quality-hgrn-bit-tiny").is_dir());
        let err = run_quality(&[], &root, &bin, QualSide::Llama)
            .err()
            .unwrap();
        assert!(
            err.message.contains("frugal train failed"),
            "{}",
            err.message
        );
        let o = Options {
            steps: 2,
            warmup: 1,
            ..opts()
        };
        let t = run_train(&[], &root, &bin, &o, TRAIN_SIDES[0])
            .map_err(|f| f.message)
            .unwrap();
        assert_eq!(t.step_s, 2.0);
        assert_eq!(t.param_bytes, Some(4000));
        assert_eq!(t.peak_above_baseline(), 20);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
