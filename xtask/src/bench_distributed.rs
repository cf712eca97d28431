//! `cargo xtask bench distributed`: data-parallel training with MPI on the CPU, the LLaMA `60m`
//! preset, GaLore-AdamW (rank 128, one basis refresh at step 1), sequence 256, f32, each side in
//! a fresh child process with one libtorch thread per process:
//!
//! - `one`: one process, micro-batch B (`--batch`, default 4);
//! - `two-full`: `mpirun --oversubscribe -n 2`, micro-batch B on each rank (twice the tokens per
//!   step), the full gradients all-reduced (`dist.galore_projected = false`);
//! - `two-projected`: the same, GaLore's projected gradients all-reduced between basis refreshes
//!   (`dist.galore_projected = true`);
//! - `two-overlap`: as `two-full`, each block's all-reduce started as soon as the backward pass
//!   has its gradients (`dist.overlap = true`).
//!
//! The first `--warmup` steps (default 1: the basis refresh and its SVDs) are not timed, the next
//! `--steps` (default 3) are. Reported per side: the mean step time, tokens per second (all
//! ranks' tokens), the bytes each rank all-reduced per step after the refresh (`metrics.jsonl`'s
//! `allreduce_bytes`: gradients plus 12 bytes of loss, stop flag and tokens) and rank 0's peak resident
//! memory; then the throughput of the two-process sides over one process's, and the bytes
//! all-reduced per step with full and with projected gradients, for the whole model and for the
//! projected matrices alone (those of GaLore's default `target_modules`, from `memory.json`'s
//! variables).
//!
//! Goals (issue 9): two processes with full gradients at least 1.6x one process's tokens/s; the
//! projected matrices' all-reduced bytes reduced by `min(m, n) / rank` (4x at 60m), computed from
//! the shapes. The result is printed as markdown (stdout) and written to
//! `target/bench/distributed.json`.
//!
//! ```text
//! cargo xtask bench distributed [-- --steps 3 --warmup 1 --batch 4]
//! ```
//!
//! The `frugal` binary is built with MPI (`--features mpi`), which needs Open MPI and libclang
//! (`crate::setup::ensure_mpi` installs them where it can).

use crate::report::{
    frugal_train_command, json_num as num, json_opt, json_str as string, load_average,
    metric_points, mib, utc_date, Machine,
};
use crate::setup::TorchEnv;
use crate::{Failure, Result};
use frugal_records::{MemoryReport, MetricsLine};
use std::path::Path;
use std::process::{Command, Stdio};

/// Where the runs go.
const OUT_DIR: &str = "target/bench/distributed";
/// The result file.
const RESULT: &str = "target/bench/distributed.json";
/// The LLaMA preset.
const SIZE: &str = "60m";
/// Sequence length.
const SEQ: u64 = 256;
/// GaLore's rank.
const RANK: u64 = 128;
/// GaLore's steps between basis refreshes, at least (more than the steps run: step 1 is the
/// only refresh).
const PROJ_GAP: u64 = 1000;
/// Processes of the distributed sides.
const WORLD: u64 = 2;
/// Goal: two processes' tokens/s (full gradients) over one process's, at least.
const GOAL_SPEEDUP: f64 = 1.6;
/// Bytes every rank all-reduces per step besides the gradients: the loss and the stop flag
/// (two f32).
const LOSS_FLAG_BYTES: u64 = 8;
/// The alternatives of GaLore's default `optim.galore.target_modules`,
/// `\.(self_attn|attn|mlp|attention|intermediate|output)\.` (`DEFAULT_TARGET_MODULES` of
/// crates/frugal-train/src/config.rs): a 2-D variable whose name contains `.X.` for one of them
/// is projected. xtask has no regex engine; a test checks the two agree.
const TARGET_MODULES: [&str; 6] = [
    "self_attn",
    "attn",
    "mlp",
    "attention",
    "intermediate",
    "output",
];

const USAGE: &str = "usage: cargo xtask bench distributed [-- --steps N --warmup W --batch B]";

/// The benchmark's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Options {
    /// Timed steps.
    steps: u64,
    /// Untimed steps before them.
    warmup: u64,
    /// Micro-batch per process.
    batch: u64,
}

impl Options {
    fn total(self) -> u64 {
        self.warmup + self.steps
    }

    /// `optim.galore.update_proj_gap`: more than the steps run.
    fn proj_gap(self) -> u64 {
        PROJ_GAP.max(self.total() + 1)
    }
}

fn parse_args(args: &[String]) -> Result<Options> {
    let mut batch = 4u64;
    // `--steps` and `--warmup`, for the shared reader of those two.
    let mut rest = Vec::new();
    let known = ["--steps", "--warmup", "--batch"];
    for (name, value) in crate::report::named_args("distributed", USAGE, args, &known, &[])? {
        match name.as_str() {
            "--batch" => batch = crate::report::whole_arg("distributed", &name, &value, 1)?,
            _ => rest.push(format!("{name}={value}")),
        }
    }
    let (steps, warmup) = crate::report::parse_steps_warmup("distributed", &rest, (3, 1))?;
    Ok(Options {
        steps,
        warmup,
        batch,
    })
}

/// The three sides, in the table's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    One,
    TwoFull,
    TwoProjected,
    TwoOverlap,
}

const SIDES: [Side; 4] = [
    Side::One,
    Side::TwoFull,
    Side::TwoProjected,
    Side::TwoOverlap,
];

impl Side {
    /// The key in the JSON and the run folder's name.
    fn key(self) -> &'static str {
        match self {
            Side::One => "one",
            Side::TwoFull => "two-full",
            Side::TwoProjected => "two-projected",
            Side::TwoOverlap => "two-overlap",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Side::One => "1 process",
            Side::TwoFull => "2 processes, full gradients",
            Side::TwoProjected => "2 processes, projected gradients",
            Side::TwoOverlap => "2 processes, full gradients, overlapped",
        }
    }

    /// Processes.
    fn ranks(self) -> u64 {
        match self {
            Side::One => 1,
            Side::TwoFull | Side::TwoProjected | Side::TwoOverlap => WORLD,
        }
    }

    /// `dist.galore_projected` of a multi-process side.
    fn projected(self) -> Option<bool> {
        match self {
            Side::One => None,
            Side::TwoFull | Side::TwoOverlap => Some(false),
            Side::TwoProjected => Some(true),
        }
    }
}

/// The `--set` values of one side.
fn sets(opts: Options, side: Side) -> Vec<String> {
    let mut s = vec![
        "model.kind=\"llama\"".to_string(),
        format!("model.size=\"{SIZE}\""),
    ];
    s.extend(crate::report::timing_sets(SEQ, opts.batch, opts.total()));
    s.extend([
        "train.threads=1".to_string(),
        "optim.name=\"galore-adamw\"".into(),
        format!("optim.galore.rank={RANK}"),
        format!("optim.galore.update_proj_gap={}", opts.proj_gap()),
    ]);
    if let Some(p) = side.projected() {
        s.push(format!("dist.galore_projected={p}"));
    }
    if side == Side::TwoOverlap {
        s.push("dist.overlap=true".into());
    }
    s
}

/// `mpirun --oversubscribe -n N` of `single` (a `frugal train` command): its program,
/// arguments, folder and environment, with Open MPI allowed to run as root; stdout to our
/// stderr (our stdout holds only the tables), no stdin.
fn mpirun_command(single: &Command, n: u64) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "-n", &n.to_string()])
        .arg(single.get_program())
        .args(single.get_args());
    if let Some(dir) = single.get_current_dir() {
        c.current_dir(dir);
    }
    for (k, v) in single.get_envs() {
        if let Some(v) = v {
            c.env(k, v);
        }
    }
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c.stdin(Stdio::null())
        .stdout(Stdio::from(std::io::stderr()))
        .stderr(Stdio::inherit());
    c
}

/// A variable of `memory.json`'s `parameters` list.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Variable {
    name: String,
    shape: Vec<u64>,
}

impl Variable {
    fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Bytes of its f32 gradient, as the all-reduce sends it.
    fn f32_bytes(&self) -> u64 {
        4 * self.numel()
    }

    /// Whether GaLore projects it by default: 2-D, and its name matches `target_modules`.
    fn projected(&self) -> bool {
        self.shape.len() == 2
            && TARGET_MODULES
                .iter()
                .any(|m| self.name.contains(&format!(".{m}.")))
    }

    /// Bytes of its projected f32 gradient at `rank`: `min(rank, min(m, n)) x max(m, n)`.
    fn projected_bytes(&self, rank: u64) -> u64 {
        let (lo, hi) = (
            self.shape[0].min(self.shape[1]),
            self.shape[0].max(self.shape[1]),
        );
        4 * rank.min(lo) * hi
    }
}

/// The variables of `memory.json`'s `parameters` list; None when it is empty or a dimension is
/// negative.
fn variables(memory: &MemoryReport) -> Option<Vec<Variable>> {
    let vars = memory
        .parameters
        .iter()
        .map(|p| {
            Some(Variable {
                name: p.name.clone(),
                shape: p
                    .shape
                    .iter()
                    .map(|&d| u64::try_from(d).ok())
                    .collect::<Option<_>>()?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    (!vars.is_empty()).then_some(vars)
}

/// What the shapes say about the all-reduce: bytes of all variables, of the projected matrices
/// (f32, full), of the others, and of the projected matrices' projected gradients at [`RANK`].
#[derive(Debug, Clone, PartialEq)]
struct Shapes {
    variables: usize,
    matrices: usize,
    total_bytes: u64,
    matrix_bytes: u64,
    other_bytes: u64,
    matrix_projected_bytes: u64,
    /// The smallest and largest `min(m, n) / rank` of the projected matrices.
    ratio_range: (f64, f64),
}

impl Shapes {
    fn of(vars: &[Variable], rank: u64) -> Self {
        let total_bytes = vars.iter().map(Variable::f32_bytes).sum();
        let matrices: Vec<&Variable> = vars.iter().filter(|v| v.projected()).collect();
        let matrix_bytes = matrices.iter().map(|v| v.f32_bytes()).sum();
        let matrix_projected_bytes = matrices.iter().map(|v| v.projected_bytes(rank)).sum();
        let ratios = matrices
            .iter()
            .map(|v| v.shape[0].min(v.shape[1]) as f64 / rank as f64);
        let ratio_range = ratios.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), r| {
            (lo.min(r), hi.max(r))
        });
        Self {
            variables: vars.len(),
            matrices: matrices.len(),
            total_bytes,
            matrix_bytes,
            other_bytes: total_bytes - matrix_bytes,
            matrix_projected_bytes,
            ratio_range,
        }
    }

    /// The goal: the projected matrices' full bytes over their projected bytes, that is
    /// `min(m, n) / rank` when every matrix has the same (the bytes-weighted mean otherwise).
    fn goal_ratio(&self) -> Option<f64> {
        (self.matrix_projected_bytes > 0)
            .then(|| self.matrix_bytes as f64 / self.matrix_projected_bytes as f64)
    }

    /// The projected matrices' share of a projected run's bytes per step: what is left once
    /// the other variables' full gradients and the loss and stop flag are taken away.
    fn matrix_bytes_in(&self, per_step: f64) -> Option<f64> {
        let b = per_step - (self.other_bytes + LOSS_FLAG_BYTES) as f64;
        (b > 0.0).then_some(b)
    }

    /// The bytes per step of a full all-reduce: every variable's gradient, loss and flag.
    fn full_step_bytes(&self) -> u64 {
        self.total_bytes + LOSS_FLAG_BYTES
    }
}

/// One side's measurements.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    /// Mean step time of the timed steps.
    step_s: f64,
    /// Tokens per step, all ranks together.
    tokens_per_step: u64,
    baseline_rss_bytes: u64,
    /// Rank 0's peak (it alone writes `memory.json`).
    peak_rss_bytes: u64,
    /// `allreduce_bytes` of step 1, the basis refresh (multi-process runs only).
    refresh_bytes: Option<u64>,
    /// Mean `allreduce_bytes` of the timed steps after the refresh.
    bytes_per_step: Option<f64>,
    /// The variables of `memory.json`.
    variables: Vec<Variable>,
}

impl Row {
    fn tokens_per_s(&self) -> f64 {
        self.tokens_per_step as f64 / self.step_s
    }
}

/// `(allreduce_bytes of step 1, mean allreduce_bytes of the steps after max(warmup, 1))` of
/// `metrics.jsonl`.
fn allreduce_bytes(metrics: &[MetricsLine], warmup: u64) -> (Option<u64>, Option<f64>) {
    let points = metric_points(metrics, |l| l.allreduce_bytes.map(|b| b as f64));
    let refresh = points.iter().find(|p| p.0 == 1.0).map(|p| p.1 as u64);
    let after: Vec<f64> = points
        .iter()
        .filter(|p| p.0 > warmup.max(1) as f64)
        .map(|p| p.1)
        .collect();
    let mean = (!after.is_empty()).then(|| after.iter().sum::<f64>() / after.len() as f64);
    (refresh, mean)
}

fn run_side(
    vars: &[(String, String)],
    root: &Path,
    bin: &Path,
    opts: Options,
    side: Side,
) -> Result<Row> {
    let out = format!("{OUT_DIR}/{}", side.key());
    let (single, out_dir) = frugal_train_command(bin, vars, root, &out, &sets(opts, side))?;
    let (c, what) = if side.ranks() > 1 {
        (mpirun_command(&single, side.ranks()), "mpirun frugal train")
    } else {
        let mut c = single;
        c.stdout(Stdio::from(std::io::stderr()));
        (c, "frugal train")
    };
    let ran = crate::status(c, what);
    // The trainer checkpoints the last step: hundreds of MiB at 60M, of no use here.
    let _ = std::fs::remove_dir_all(out_dir.join("checkpoints"));
    ran?;
    let run = crate::report::read_train_run(&out_dir, &out, opts.warmup, opts.total())?;
    let (refresh_bytes, bytes_per_step) = allreduce_bytes(&run.metrics, opts.warmup);
    if side.ranks() > 1 && bytes_per_step.is_none() {
        return Err(Failure::new(format!(
            "{out}/metrics.jsonl has no allreduce_bytes after step {}: was frugal built \
             without MPI, or did it run fewer than 2 steps?",
            opts.warmup.max(1)
        )));
    }
    let variables = variables(&run.memory)
        .ok_or_else(|| Failure::new(format!("{out}/memory.json has no list of parameters")))?;
    Ok(Row {
        step_s: run.step_s,
        tokens_per_step: side.ranks() * opts.batch * SEQ,
        baseline_rss_bytes: run.baseline_rss_bytes,
        peak_rss_bytes: run.peak_rss_bytes,
        refresh_bytes,
        bytes_per_step,
        variables,
    })
}

/// One side's outcome: its row or why it has none, and the load when it started.
type Outcome = crate::report::Outcome<Side, Row>;

struct Results {
    outcomes: Vec<Outcome>,
}

/// A goal: its key, its value, the measured value; met when the measure is at least the goal.
struct Goal {
    key: &'static str,
    goal: Option<f64>,
    measured: Option<f64>,
}

impl Goal {
    fn met(&self) -> bool {
        // The byte ratio is exact arithmetic on whole numbers; allow for rounding only.
        matches!((self.goal, self.measured), (Some(g), Some(m)) if m >= g * (1.0 - 1e-9))
    }
}

impl Results {
    fn row(&self, side: Side) -> Option<&Row> {
        crate::report::row_of(&self.outcomes, side)
    }

    /// `a`'s tokens/s over `b`'s.
    fn speedup(&self, a: Side, b: Side) -> Option<f64> {
        Some(self.row(a)?.tokens_per_s() / self.row(b)?.tokens_per_s())
    }

    /// The shapes of the first side that read them.
    fn shapes(&self) -> Option<Shapes> {
        self.outcomes
            .iter()
            .filter_map(|o| o.row.as_ref().ok())
            .find(|r| !r.variables.is_empty())
            .map(|r| Shapes::of(&r.variables, RANK))
    }

    /// The projected matrices' bytes per step in the projected run (measured).
    fn matrix_projected_measured(&self) -> Option<f64> {
        let per_step = self.row(Side::TwoProjected)?.bytes_per_step?;
        self.shapes()?.matrix_bytes_in(per_step)
    }

    /// The projected matrices' full bytes over their measured projected bytes.
    fn matrix_ratio(&self) -> Option<f64> {
        Some(self.shapes()?.matrix_bytes as f64 / self.matrix_projected_measured()?)
    }

    /// The whole model's bytes per step, full over projected.
    fn whole_ratio(&self) -> Option<f64> {
        Some(
            self.row(Side::TwoFull)?.bytes_per_step?
                / self.row(Side::TwoProjected)?.bytes_per_step?,
        )
    }

    fn goals(&self) -> [Goal; 2] {
        [
            Goal {
                key: "two_full_tokens_per_s_over_one_at_least",
                goal: Some(GOAL_SPEEDUP),
                measured: self.speedup(Side::TwoFull, Side::One),
            },
            Goal {
                key: "projected_matrix_bytes_full_over_projected_at_least",
                goal: self.shapes().and_then(|s| s.goal_ratio()),
                measured: self.matrix_ratio(),
            },
        ]
    }

    fn failures(&self) -> Vec<(Side, &str)> {
        crate::report::failures(&self.outcomes)
    }
}

/// Runs the benchmark.
pub fn run(env: &TorchEnv, args: &[String]) -> Result<()> {
    let opts = parse_args(args)?;
    if !crate::setup::ensure_mpi() {
        return Err(Failure::new(format!(
            "bench distributed needs Open MPI (mpirun, mpicc) and libclang to build and run \
             frugal with MPI: install {} (Debian) and run it again",
            crate::setup::MPI_PACKAGES.join(" ")
        )));
    }
    let root = crate::root();
    std::fs::create_dir_all(root.join(OUT_DIR))
        .map_err(|e| Failure::new(format!("cannot create {OUT_DIR}: {e}")))?;
    let vars = env.vars();

    // Build first, so that the compiler does not share the CPU with any timed run.
    eprintln!("bench distributed: building frugal with MPI (release, --features mpi)");
    let bin = crate::build_frugal_with(env, &["mpi"])?;

    let mut outcomes = Vec::new();
    for side in SIDES {
        eprintln!(
            "bench distributed: {}: LLaMA {SIZE}, micro-batch {} per process, {} timed steps \
             after {} warmup",
            side.label(),
            opts.batch,
            opts.steps,
            opts.warmup
        );
        let load = load_average();
        let row = run_side(&vars, &root, &bin, opts, side).map_err(|f| f.message);
        if let Err(e) = &row {
            eprintln!("bench distributed: {} failed: {e}", side.label());
        }
        outcomes.push(Outcome { side, row, load });
    }
    let res = Results { outcomes };

    let machine = Machine::detect();
    let date = utc_date();
    print!("{}", tables(opts, &res, &machine, &date));
    std::fs::write(root.join(RESULT), result_json(opts, &res, &machine, &date))
        .map_err(|e| Failure::new(format!("cannot write {RESULT}: {e}")))?;
    eprintln!("bench distributed: wrote {RESULT}");

    let failed: Vec<(String, String)> = res
        .failures()
        .iter()
        .map(|(s, e)| (s.key().to_string(), e.to_string()))
        .collect();
    crate::report::sides_failed(RESULT, &failed)
}

// ---------------------------------------------------------------------------------------------
// Tables.

/// A ratio for the table, empty when a side is missing.
fn ratio_cell(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}x")).unwrap_or_default()
}

/// Bytes as MiB with two decimals.
fn mib2(bytes: f64) -> String {
    format!("{:.2}", bytes / (1024.0 * 1024.0))
}

fn opt_bytes(b: Option<f64>) -> String {
    b.map_or_else(String::new, |b| format!("{b:.0}"))
}

/// The markdown: the sides, the bytes, the goals and the load averages.
fn tables(opts: Options, res: &Results, machine: &Machine, date: &str) -> String {
    let mut s = format!(
        "Data-parallel training, LLaMA {SIZE}, GaLore-AdamW rank {RANK}, seq {SEQ}, \
         micro-batch {} per process, f32, CPU, 1 thread per process: {} x {}, {} timed steps \
         after {} warmup, {date}\n\n",
        opts.batch, machine.nproc, machine.model, opts.steps, opts.warmup
    );
    s.push_str(
        "| side | processes | tokens/step | step time (s) | tokens/s | tokens/s / one's | \
         all-reduced per step (MiB) | at the refresh (MiB) | peak RSS, rank 0 (MiB) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for o in &res.outcomes {
        match &o.row {
            Ok(r) => s.push_str(&format!(
                "| {} | {} | {} | {:.3} | {:.0} | {} | {} | {} | {} |\n",
                o.side.label(),
                o.side.ranks(),
                r.tokens_per_step,
                r.step_s,
                r.tokens_per_s(),
                ratio_cell(res.speedup(o.side, Side::One)),
                r.bytes_per_step.map_or_else(String::new, mib2),
                r.refresh_bytes.map_or_else(String::new, |b| mib2(b as f64)),
                mib(r.peak_rss_bytes),
            )),
            Err(_) => s.push_str(&format!(
                "| {} | {} | failed | | | | | | |\n",
                o.side.label(),
                o.side.ranks()
            )),
        }
    }
    if let Some(sh) = res.shapes() {
        let full = res.row(Side::TwoFull).and_then(|r| r.bytes_per_step);
        let proj = res.row(Side::TwoProjected).and_then(|r| r.bytes_per_step);
        let matrix_proj = res.matrix_projected_measured();
        s.push_str(&format!(
            "\nAll-reduced bytes per step after the refresh (each rank sends its gradients and \
             8 bytes of loss and stop flag):\n\n\
             | | full gradients | projected gradients | full / projected |\n\
             |---|---:|---:|---:|\n\
             | whole model ({} variables) | {} | {} | {} |\n\
             | projected matrices ({}) | {} | {} | {} |\n\
             | other variables, loss and flag | {} | {} | |\n\n",
            sh.variables,
            opt_bytes(full),
            opt_bytes(proj),
            ratio_cell(res.whole_ratio()),
            sh.matrices,
            sh.matrix_bytes,
            opt_bytes(matrix_proj),
            ratio_cell(res.matrix_ratio()),
            sh.other_bytes + LOSS_FLAG_BYTES,
            sh.other_bytes + LOSS_FLAG_BYTES,
        ));
        s.push_str(&format!(
            "From the shapes: a full all-reduce is {} bytes per step{}; the projected matrices' \
             gradients at rank {RANK} are {} bytes (min(m, n) / rank from {} to {}).\n",
            sh.full_step_bytes(),
            match full {
                Some(f) if (f - sh.full_step_bytes() as f64).abs() < 0.5 => " (as measured)",
                Some(_) => " (the measure differs)",
                None => "",
            },
            sh.matrix_projected_bytes,
            sh.ratio_range.0,
            sh.ratio_range.1,
        ));
    }
    for o in &res.outcomes {
        if let Err(e) = &o.row {
            s.push_str(&format!("{} failed: {e}\n", o.side.key()));
        }
    }
    let x = |r: Option<f64>| r.map_or_else(|| "not measured".to_string(), |r| format!("{r:.3}x"));
    s.push_str(&format!(
        "Throughput over one process's: two-full {}, two-projected {}, two-overlap {}.\n",
        x(res.speedup(Side::TwoFull, Side::One)),
        x(res.speedup(Side::TwoProjected, Side::One)),
        x(res.speedup(Side::TwoOverlap, Side::One)),
    ));
    s.push_str("\nGoals:\n");
    for g in res.goals() {
        let got = g
            .measured
            .map_or_else(|| "not measured".to_string(), |m| format!("{m:.3}"));
        let goal = g
            .goal
            .map_or_else(|| "unknown".to_string(), |g| format!("{g}"));
        s.push_str(&format!(
            "- {} {goal}: {got} ({})\n",
            g.key,
            if g.met() { "met" } else { "not met" }
        ));
    }
    s.push_str(&format!(
        "\nLoad average (1 min) when each side started: {}.\n",
        crate::report::loads(&res.outcomes, |s| s.key().to_string())
    ));
    s
}

// ---------------------------------------------------------------------------------------------
// JSON.

fn outcome_json(o: &Outcome, res: &Results) -> String {
    let load = json_opt(o.load);
    let head = format!(
        "\"processes\": {}, \"galore_projected\": {}",
        o.side.ranks(),
        o.side
            .projected()
            .map_or_else(|| "null".to_string(), |p| p.to_string())
    );
    match &o.row {
        Ok(r) => format!(
            "{{{head}, \"step_s\": {}, \"tokens_per_step\": {}, \"tokens_per_s\": {}, \
             \"tokens_per_s_over_one\": {}, \"allreduce_bytes_per_step\": {}, \
             \"allreduce_bytes_refresh_step\": {}, \"peak_rss_bytes\": {}, \
             \"baseline_rss_bytes\": {}, \"load_average\": {load}}}",
            num(r.step_s),
            r.tokens_per_step,
            num(r.tokens_per_s()),
            json_opt(res.speedup(o.side, Side::One)),
            json_opt(r.bytes_per_step),
            r.refresh_bytes
                .map_or_else(|| "null".to_string(), |b| b.to_string()),
            r.peak_rss_bytes,
            r.baseline_rss_bytes,
        ),
        Err(e) => format!(
            "{{{head}, \"error\": {}, \"load_average\": {load}}}",
            string(e)
        ),
    }
}

fn shapes_json(res: &Results) -> String {
    let Some(sh) = res.shapes() else {
        return "null".into();
    };
    format!(
        "{{\"variables\": {}, \"projected_matrices\": {}, \"all_f32_bytes\": {}, \
         \"full_step_bytes\": {}, \"projected_matrix_f32_bytes\": {}, \"other_f32_bytes\": {}, \
         \"projected_matrix_projected_bytes_from_shapes\": {}, \"min_mn_over_rank_min\": {}, \
         \"min_mn_over_rank_max\": {}, \"loss_and_flag_bytes\": {LOSS_FLAG_BYTES}}}",
        sh.variables,
        sh.matrices,
        sh.total_bytes,
        sh.full_step_bytes(),
        sh.matrix_bytes,
        sh.other_bytes,
        sh.matrix_projected_bytes,
        num(sh.ratio_range.0),
        num(sh.ratio_range.1),
    )
}

fn result_json(opts: Options, res: &Results, machine: &Machine, date: &str) -> String {
    let sides = res
        .outcomes
        .iter()
        .map(|o| format!("    \"{}\": {}", o.side.key(), outcome_json(o, res)))
        .collect::<Vec<_>>()
        .join(",\n");
    let goals = res.goals();
    let goals_json = goals
        .iter()
        .map(|g| {
            format!(
                "    \"{}\": {{\"goal\": {}, \"measured\": {}, \"met\": {}}}",
                g.key,
                json_opt(g.goal),
                json_opt(g.measured),
                g.met()
            )
        })
        .collect::<Vec<_>>()
        .join(",\n");
    let all_met = goals.iter().all(Goal::met);
    let full = res.row(Side::TwoFull).and_then(|r| r.bytes_per_step);
    let proj = res.row(Side::TwoProjected).and_then(|r| r.bytes_per_step);
    format!(
        "{{\n  \"benchmark\": \"distributed\",\n  \"model\": \"llama-{SIZE}\",\n  \"dtype\": \
         \"f32\",\n  \"device\": \"cpu\",\n  \"optimizer\": \"galore-adamw\",\n  \"galore\": \
         {{\"rank\": {RANK}, \"update_proj_gap\": {}}},\n  \"steps\": {},\n  \"warmup\": {},\n  \
         \"batch_per_process\": {},\n  \"seq\": {SEQ},\n  \"threads_per_process\": 1,\n  \
         \"machine\": {{\"nproc\": {}, \"cpu\": {}}},\n  \"date\": {},\n  \"sides\": {{\n{sides}\n  \
         }},\n  \"shapes\": {},\n  \"bytes\": {{\"whole_full_per_step\": {}, \
         \"whole_projected_per_step\": {}, \"whole_full_over_projected\": {}, \
         \"matrices_full_per_step\": {}, \"matrices_projected_per_step\": {}, \
         \"matrices_full_over_projected\": {}}},\n  \"ratios\": {{\"two_full_tokens_per_s_over_one\": \
         {}, \"two_projected_tokens_per_s_over_one\": {}, \"two_overlap_tokens_per_s_over_one\": \
         {}}},\n  \"goals\": {{\n{goals_json},\n    \
         \"all_met\": {all_met}\n  }}\n}}\n",
        opts.proj_gap(),
        opts.steps,
        opts.warmup,
        opts.batch,
        machine.nproc,
        string(&machine.model),
        string(date),
        shapes_json(res),
        json_opt(full),
        json_opt(proj),
        json_opt(res.whole_ratio()),
        res.shapes()
            .map_or_else(|| "null".to_string(), |s| s.matrix_bytes.to_string()),
        json_opt(res.matrix_projected_measured()),
        json_opt(res.matrix_ratio()),
        json_opt(res.speedup(Side::TwoFull, Side::One)),
        json_opt(res.speedup(Side::TwoProjected, Side::One)),
        json_opt(res.speedup(Side::TwoOverlap, Side::One)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{json_number, json_object};

    fn args(v: &[&str]) -> Result<Options> {
        parse_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options() {
        let d = args(&[]).ok().unwrap();
        assert_eq!((d.steps, d.warmup, d.batch), (3, 1, 4));
        assert_eq!(d.proj_gap(), 1000);
        let o = args(&["--steps=5", "--warmup", "0", "--batch", "2"])
            .ok()
            .unwrap();
        assert_eq!((o.steps, o.warmup, o.batch), (5, 0, 2));
        let o = args(&["--batch=8", "--steps", "2000"]).ok().unwrap();
        assert_eq!((o.steps, o.batch, o.proj_gap()), (2000, 8, 2002));
        assert!(args(&["--batch", "0"]).is_err());
        assert!(args(&["--batch"]).is_err());
        assert!(args(&["--batch=x"]).is_err());
        assert!(args(&["--steps", "0"]).is_err());
        assert!(args(&["--warmup"]).is_err());
        assert!(args(&["--size", "1b"]).is_err());
    }

    #[test]
    fn sets_per_side() {
        let o = args(&[]).ok().unwrap();
        let one = sets(o, Side::One);
        for want in [
            "model.size=\"60m\"",
            "train.seq_len=256",
            "train.batch_size=4",
            "train.max_steps=4",
            "train.threads=1",
            "train.save_every=0",
            "train.eval_every=0",
            "optim.name=\"galore-adamw\"",
            "optim.galore.rank=128",
            "optim.galore.update_proj_gap=1000",
        ] {
            assert!(one.contains(&want.to_string()), "{want}: {one:?}");
        }
        assert!(!one.iter().any(|s| s.starts_with("dist.")));
        assert!(sets(o, Side::TwoFull).contains(&"dist.galore_projected=false".to_string()));
        assert!(sets(o, Side::TwoProjected).contains(&"dist.galore_projected=true".to_string()));
    }

    #[test]
    fn mpirun_wraps_the_single_command() {
        let mut single = Command::new("/bin/frugal");
        single
            .current_dir("/work")
            .args(["train", "--set", "a=1", "--out", "x"])
            .env("LIBTORCH", "/t");
        let c = mpirun_command(&single, 2);
        assert_eq!(c.get_program(), "mpirun");
        let a: Vec<_> = c
            .get_args()
            .map(|a| a.to_string_lossy().to_string())
            .collect();
        assert_eq!(
            a,
            [
                "--oversubscribe",
                "-n",
                "2",
                "/bin/frugal",
                "train",
                "--set",
                "a=1",
                "--out",
                "x"
            ]
        );
        assert_eq!(c.get_current_dir(), Some(Path::new("/work")));
        let envs: Vec<_> = c
            .get_envs()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().to_string(),
                    v.map(|v| v.to_string_lossy().to_string()),
                )
            })
            .collect();
        for k in [
            "LIBTORCH",
            "OMPI_ALLOW_RUN_AS_ROOT",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM",
        ] {
            assert!(envs.iter().any(|(n, v)| n == k && v.is_some()), "{k}");
        }
    }

    /// The alternatives above are those of the trainer's default regex.
    #[test]
    fn target_modules_match_the_trainer() {
        let config =
            std::fs::read_to_string(crate::root().join("crates/frugal-train/src/config.rs"))
                .unwrap();
        let regex = format!(r#"r"\.({})\.""#, TARGET_MODULES.join("|"));
        assert!(
            config.contains(&format!("DEFAULT_TARGET_MODULES: &str = {regex};")),
            "{regex}"
        );
    }

    fn var(name: &str, shape: &[u64]) -> Variable {
        Variable {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn which_variables_are_projected() {
        assert!(var("model.layers.0.mlp.down_proj.weight", &[512, 1376]).projected());
        assert!(var("model.layers.7.self_attn.q_proj.weight", &[512, 512]).projected());
        assert!(!var("model.layers.0.input_layernorm.weight", &[512]).projected());
        assert!(!var("lm_head.weight", &[4096, 512]).projected());
        assert!(!var("model.embed_tokens.weight", &[4096, 512]).projected());
        // A name that merely contains "mlp" without the dots is not a target.
        assert!(!var("model.mlpx.weight", &[4, 4]).projected());
        assert_eq!(
            var("a.mlp.w", &[1376, 512]).projected_bytes(128),
            4 * 128 * 1376
        );
        assert_eq!(
            var("a.mlp.w", &[64, 512]).projected_bytes(128),
            4 * 64 * 512
        );
    }

    #[test]
    fn memory_json_variables() {
        use crate::report::fixtures::{memory, variable};
        let mut m = memory(1000, 5000, 100);
        m.parameters = vec![
            variable("lm_head.weight", &[32, 128]),
            variable("model.layers.0.input_layernorm.weight", &[128]),
            variable("model.layers.0.mlp.down_proj.weight", &[128, 344]),
            variable("model.layers.0.self_attn.q_proj.weight", &[128, 128]),
        ];
        let v = variables(&m).unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(
            v[2],
            var("model.layers.0.mlp.down_proj.weight", &[128, 344])
        );
        assert_eq!(v[1].shape, vec![128]);
        m.parameters[1].shape = vec![-1];
        assert!(variables(&m).is_none());
        m.parameters.clear();
        assert!(variables(&m).is_none());
    }

    /// The 60m preset (it keeps its vocabulary of 32000 whatever the tokenizer's).
    fn llama_60m() -> Vec<Variable> {
        let (d, ffn, vocab) = (512, 1376, 32000);
        let mut v = vec![
            var("lm_head.weight", &[vocab, d]),
            var("model.embed_tokens.weight", &[vocab, d]),
            var("model.norm.weight", &[d]),
        ];
        for l in 0..8 {
            let p = format!("model.layers.{l}");
            v.push(var(&format!("{p}.input_layernorm.weight"), &[d]));
            v.push(var(&format!("{p}.post_attention_layernorm.weight"), &[d]));
            for m in ["q", "k", "v", "o"] {
                v.push(var(&format!("{p}.self_attn.{m}_proj.weight"), &[d, d]));
            }
            v.push(var(&format!("{p}.mlp.gate_proj.weight"), &[ffn, d]));
            v.push(var(&format!("{p}.mlp.up_proj.weight"), &[ffn, d]));
            v.push(var(&format!("{p}.mlp.down_proj.weight"), &[d, ffn]));
        }
        v
    }

    #[test]
    fn bytes_arithmetic() {
        let sh = Shapes::of(&llama_60m(), RANK);
        assert_eq!((sh.variables, sh.matrices), (3 + 8 * 9, 56));
        let matrix = 8 * 4 * (4 * 512 * 512 + 3 * 512 * 1376);
        let other = 4 * (2 * 32000 * 512 + 512 + 16 * 512);
        assert_eq!(sh.matrix_bytes, matrix);
        assert_eq!(sh.other_bytes, other);
        // What `allreduce_bytes` of a full 2-rank run of the 60m preset says.
        assert_eq!(sh.full_step_bytes(), 232294408);
        assert_eq!(sh.full_step_bytes(), matrix + other + 8);
        assert_eq!(sh.ratio_range, (4.0, 4.0));
        assert_eq!(sh.goal_ratio(), Some(4.0));
        // A projected run that sends the matrices at rank 128, the rest in full.
        let per_step = (sh.matrix_projected_bytes + other + 8) as f64;
        assert_eq!(sh.matrix_bytes_in(per_step), Some((matrix / 4) as f64));
        assert_eq!(sh.matrix_bytes_in((other + 8) as f64), None);
        // Matrices of different shapes: the bytes-weighted ratio.
        let mixed = Shapes::of(
            &[var("x.mlp.a", &[256, 1024]), var("x.mlp.b", &[128, 128])],
            64,
        );
        assert_eq!(mixed.ratio_range, (2.0, 4.0));
        let g = mixed.goal_ratio().unwrap();
        let want = (256.0 * 1024.0 + 128.0 * 128.0) / (64.0 * 1024.0 + 64.0 * 128.0);
        assert!((g - want).abs() < 1e-12, "{g}");
    }

    #[test]
    fn metrics_allreduce_bytes() {
        use crate::report::fixtures::line;
        let mut m = [line(1, 9.0, 5.0), line(2, 8.0, 1.0), line(3, 7.0, 1.0)];
        for (l, b) in m.iter_mut().zip([1000, 300, 500]) {
            l.allreduce_bytes = Some(b);
        }
        m[2].val_loss = Some(3.0);
        assert_eq!(allreduce_bytes(&m, 1), (Some(1000), Some(400.0)));
        assert_eq!(allreduce_bytes(&m, 0), (Some(1000), Some(400.0)));
        assert_eq!(allreduce_bytes(&m, 2), (Some(1000), Some(500.0)));
        assert_eq!(allreduce_bytes(&[line(1, 9.0, 5.0)], 1), (None, None));
    }

    fn row(step_s: f64, ranks: u64, bytes: Option<f64>) -> Row {
        Row {
            step_s,
            tokens_per_step: ranks * 4 * SEQ,
            baseline_rss_bytes: 100 << 20,
            peak_rss_bytes: 900 << 20,
            refresh_bytes: bytes.map(|_| 9_000_000),
            bytes_per_step: bytes,
            variables: llama_60m(),
        }
    }

    fn results(projected: std::result::Result<Row, String>) -> Results {
        let rows = [
            Ok(row(4.0, 1, None)),
            Ok(row(
                4.5,
                2,
                Some(Shapes::of(&llama_60m(), RANK).full_step_bytes() as f64),
            )),
            projected,
        ];
        Results {
            outcomes: SIDES
                .iter()
                .zip(rows)
                .map(|(&side, row)| Outcome {
                    side,
                    row,
                    load: Some(1.25),
                })
                .collect(),
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
        let sh = Shapes::of(&llama_60m(), RANK);
        let proj = (sh.matrix_projected_bytes + sh.other_bytes + 8) as f64;
        let res = results(Ok(row(5.0, 2, Some(proj))));
        let opts = args(&[]).ok().unwrap();
        let t = tables(opts, &res, &machine(), "2026-01-01T00:00:00Z");
        assert!(
            t.contains("| 1 process | 1 | 1024 | 4.000 | 256 | 1.00x |  |  | 900 |"),
            "{t}"
        );
        assert!(
            t.contains("| 2 processes, full gradients | 2 | 2048 | 4.500 | 455 | 1.78x |"),
            "{t}"
        );
        assert!(t.contains("| 2 processes, projected gradients | 2 | 2048 | 5.000 | 410 | 1.60x |"));
        assert!(t.contains(&format!(
            "| projected matrices (56) | {} | {} | 4.00x |",
            sh.matrix_bytes,
            sh.matrix_bytes / 4
        )));
        assert!(t.contains("(as measured)"), "{t}");
        assert!(t.contains("- two_full_tokens_per_s_over_one_at_least 1.6: 1.778 (met)"));
        assert!(
            t.contains("- projected_matrix_bytes_full_over_projected_at_least 4: 4.000 (met)"),
            "{t}"
        );
        assert!(t.contains("one 1.25, two-full 1.25, two-projected 1.25"));
        let j = result_json(opts, &res, &machine(), "d");
        let goals = json_object(&j, "goals").unwrap();
        assert!(goals.contains("\"all_met\": true"), "{goals}");
        let bytes = json_object(&j, "bytes").unwrap();
        assert_eq!(
            json_number(bytes, "matrices_full_over_projected"),
            Some(4.0)
        );
        let full = json_object(json_object(&j, "sides").unwrap(), "two-full").unwrap();
        assert_eq!(
            json_number(full, "tokens_per_s_over_one"),
            Some(256.0 * 2.0 * 4.0 / 4.5 / 256.0)
        );
        assert_eq!(
            json_number(json_object(&j, "shapes").unwrap(), "projected_matrices"),
            Some(56.0)
        );
        assert!(res.failures().is_empty());
    }

    #[test]
    fn a_failed_side() {
        let res = results(Err("mpirun frugal train failed (exit status: 1)".into()));
        let opts = args(&[]).ok().unwrap();
        let t = tables(opts, &res, &machine(), "d");
        assert!(
            t.contains("| 2 processes, projected gradients | 2 | failed |"),
            "{t}"
        );
        assert!(t.contains("two-projected failed: mpirun frugal train failed"));
        assert!(t.contains("not measured (not met)"), "{t}");
        let j = result_json(opts, &res, &machine(), "d");
        assert!(json_object(&j, "goals")
            .unwrap()
            .contains("\"all_met\": false"));
        let p = json_object(json_object(&j, "sides").unwrap(), "two-projected").unwrap();
        assert!(p.contains("\"error\": \"mpirun frugal train failed"), "{p}");
        assert_eq!(res.failures().len(), 1);
    }
}
