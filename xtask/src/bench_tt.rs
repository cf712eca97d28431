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
//! Later parts (`--parts encoder-layer,model`: one encoder layer, and the whole 6-encoder
//! model's training step, TT against dense) are not built yet; asking for them is an error.
//!
//! ```text
//! cargo xtask bench tt [-- --layers 768x768,768x3072,3072x768 --configs dense,tt,same-order,...
//!                          --steps 10 --warmup 2 --slow-steps 3 --threads 2 --tokens 4096
//!                          --rank 30 --rounds 1 --parts layers]
//! ```

use crate::report::{
    find_key, json_num, json_number, json_opt, json_str, last_json_line, load_average, mib,
    utc_date, Machine,
};
use crate::setup::TorchEnv;
use crate::{Failure, Result};
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
    /// The largest ratio that meets the goal.
    limit: f64,
}

impl Goal {
    /// Whether the goal is met (None: not measured).
    fn met(&self) -> Option<bool> {
        self.value.map(|v| v <= self.limit)
    }
}

/// The usage line.
const USAGE: &str = "usage: cargo xtask bench tt [-- --parts layers --layers \
                     768x768,768x3072,3072x768 --configs dense,tt,same-order,tltorch,\
                     tltorch-torch-einsum,tltorch-no-opt-einsum,torch-dense --steps N --warmup N \
                     --slow-steps N --threads N --tokens N --rank N --rounds N] (parts encoder-layer and \
                     model: not built yet)";

/// Runs the benchmark.
pub fn run(env: &TorchEnv, args: &[String]) -> Result<()> {
    let opts = parse_args(args)?;
    let root = crate::root();
    std::fs::create_dir_all(root.join("target/bench"))
        .map_err(|e| Failure::new(format!("cannot create target/bench: {e}")))?;
    let vars = env.vars();
    let bin = if opts.configs.iter().any(|c| !c.is_python()) {
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
    if opts.configs.iter().any(|c| c.is_python()) && !env.python.exists() {
        eprintln!(
            "bench tt: warning: {} does not exist; the PyTorch configurations will fail (run \
             cargo xtask setup, then {} -m pip install {PIP})",
            env.python.display(),
            env.python.display()
        );
    }
    let mut rows: Vec<Row> = Vec::new();
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
        }
    }
    let goals = goals(&rows);
    let machine = Machine::detect();
    let date = utc_date();
    let header = format!(
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
    );
    let text = format!("{header}{}", table(&rows, &goals));
    print!("{text}");
    let _ = std::fs::write(root.join(TABLE), &text);
    let json = result_json(&opts, &rows, &goals, &machine, &date);
    std::fs::write(root.join(RESULT), json)
        .map_err(|e| Failure::new(format!("cannot write {RESULT}: {e}")))?;
    eprintln!("bench tt: wrote {RESULT} and {TABLE}");
    let failed = rows.iter().filter(|r| r.measured.is_none()).count();
    if failed > 0 {
        eprintln!("bench tt: {failed} configuration(s) did not run; see the notes under the table");
    }
    Ok(())
}

/// Parses the command line.
fn parse_args(args: &[String]) -> Result<Options> {
    let mut opts = Options {
        parts: vec![Part::Layers],
        layers: LAYERS.to_vec(),
        configs: Config::ALL.to_vec(),
        steps: 10,
        warmup: 2,
        slow_steps: 3,
        threads: 2,
        tokens: 4096,
        rank: 30,
        rounds: 1,
    };
    let bad = |m: String| Failure::new(format!("bench tt: {m}; {USAGE}"));
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (a.as_str(), None),
        };
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
        ];
        if !known.contains(&name) {
            return Err(bad(format!("unknown argument '{a}'")));
        }
        let value = inline
            .or_else(|| it.next().cloned())
            .ok_or_else(|| bad(format!("{name} wants a value")))?;
        let whole = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| bad(format!("{name} wants a whole number, got '{v}'")))
        };
        let items = || value.split(',').map(str::trim).filter(|s| !s.is_empty());
        match name {
            "--parts" => {
                opts.parts = items()
                    .map(|p| match p {
                        "layers" => Ok(Part::Layers),
                        "encoder-layer" | "model" => Err(bad(format!(
                            "part '{p}' is not built yet (issue 5: the encoder layer and the \
                             whole model come later); only 'layers' runs"
                        ))),
                        other => Err(bad(format!("unknown part '{other}'"))),
                    })
                    .collect::<Result<_>>()?
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
            _ => opts.rank = whole(&value)?,
        }
    }
    if [
        opts.steps,
        opts.slow_steps,
        opts.threads,
        opts.tokens,
        opts.rounds,
    ]
    .contains(&0)
    {
        return Err(bad(
            "--steps, --slow-steps, --threads, --tokens and --rounds must be at least 1".into(),
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
        let mut c = Command::new(bin);
        // The example links libtorch dynamically.
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
        (c, format!("examples/{EXAMPLE}"))
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
        let verdict = match g.met() {
            Some(true) => "met",
            Some(false) => "not met",
            None => "not measured",
        };
        s.push_str(&format!(
            "- {}: {} (goal <= {:.2}x): {verdict}\n",
            g.name,
            times(g.value),
            g.limit
        ));
    }
    s
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
    format!(
        "{{\n  \"benchmark\": \"tt\",\n  \"part\": \"layers\",\n  \"dtype\": \"f32\",\n  \
         \"device\": \"cpu\",\n  \"tokens\": {},\n  \"rank\": {},\n  \"steps\": {},\n  \
         \"warmup\": {},\n  \"slow_steps\": {},\n  \"rounds\": {},\n  \"threads\": {},\n  \"machine\": {{\"nproc\": \
         {}, \"cpu\": {}}},\n  \"date\": {},\n  \"rows\": [\n{}\n  ],\n  \"goals\": [\n{}\n  \
         ]\n}}\n",
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
        rows_json.join(",\n"),
        goals_json.join(",\n")
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
        let e = args(&["--parts", "model"]).err().unwrap();
        assert!(e.message.contains("not built yet"), "{}", e.message);
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
        let j = result_json(&o, &rows, &g, &machine, "2026-01-01T00:00:00Z");
        assert!(j.contains("\"config\": \"same-order\""), "{j}");
        assert_eq!(json_number(&j, "step_s"), Some(0.08));
        assert!(
            j.contains("\"met\": true") && j.contains("\"met\": false"),
            "{j}"
        );
    }
}
