//! What the benchmarks share: reading a run's records (`metrics.jsonl` and `memory.json`,
//! through `frugal-records`' types), reading numbers and objects out of other JSON by key (the
//! Python scripts' and the examples' last lines) and writing JSON values, running
//! `frugal train` and Python scripts as child processes, and describing the machine and the date
//! of a run.

use crate::{Failure, Result};
use frugal_records::{MemoryReport, MetricsLine, RecordsError, MEMORY_FILE, METRICS_FILE};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where `"key"` occurs as an object key in `text`: its start and the index just after its `:`.
pub fn find_key(text: &str, key: &str) -> Option<(usize, usize)> {
    let quoted = format!("\"{key}\"");
    let mut from = 0;
    while let Some(i) = text[from..].find(&quoted) {
        let start = from + i;
        let after = start + quoted.len();
        let rest = &text[after..];
        let trimmed = rest.trim_start();
        if let Some(value) = trimmed.strip_prefix(':') {
            return Some((start, text.len() - value.len()));
        }
        from = after;
    }
    None
}

/// The number that is the value of the first key `key` in `text` (a JSON object), if any.
pub fn json_number(text: &str, key: &str) -> Option<f64> {
    let (_, after) = find_key(text, key)?;
    let value = text[after..].trim_start();
    let end = value
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E')))
        .unwrap_or(value.len());
    value[..end].parse().ok().filter(|v: &f64| v.is_finite())
}

/// The machine the benchmark ran on.
pub struct Machine {
    /// Logical CPUs.
    pub nproc: usize,
    /// The CPU model name.
    pub model: String,
}

impl Machine {
    /// The machine this runs on.
    pub fn detect() -> Self {
        let nproc = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| cpu_model(&s))
            .unwrap_or_else(|| "unknown CPU".into());
        Self { nproc, model }
    }
}

/// The first `model name` of `/proc/cpuinfo`.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "model name").then(|| v.trim().to_string())
    })
}

/// The date and time now, UTC, ISO 8601.
pub fn utc_date() -> String {
    Command::new("date")
        .args(["-u", "+%FT%TZ"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// `x` as a JSON number (`null` when not finite).
pub fn json_num(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "null".into()
    }
}

/// `x` as a JSON number, `null` when absent or not finite.
pub fn json_opt(x: Option<f64>) -> String {
    x.map_or_else(|| "null".into(), json_num)
}

/// `s` as a JSON string.
pub fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Bytes as whole MiB, for tables.
pub fn mib(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / (1024.0 * 1024.0))
}

/// The text of the JSON object that is the value of the first key `key` in `text` (braces
/// included), if that value is an object. Braces inside strings are skipped.
pub fn json_object<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let (_, after) = find_key(text, key)?;
    let start = after + text[after..].find(|c: char| !c.is_whitespace())?;
    if !text[start..].starts_with('{') {
        return None;
    }
    json_balanced(text, start)
}

/// The text of the JSON value (an array or object, brackets included) that starts at byte
/// `start` of `text`; brackets inside strings are skipped.
pub fn json_balanced(text: &str, start: usize) -> Option<&str> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, c) in text[start..].char_indices() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '[' | '{' => depth += 1,
            ']' | '}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(&text[start..start + i + 1]);
                }
            }
            _ => {}
        }
    }
    None
}

/// Ok when every side completed; else the error that names the `failed` sides (name, why) and
/// says that `result` holds the sides that were measured.
pub fn sides_failed(result: &str, failed: &[(String, String)]) -> crate::Result<()> {
    if failed.is_empty() {
        return Ok(());
    }
    Err(crate::Failure::new(format!(
        "{} did not complete the benchmark ({}); {result} holds the sides that were measured",
        failed
            .iter()
            .map(|(s, _)| s.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        failed
            .iter()
            .map(|(s, e)| format!("{s}: {e}"))
            .collect::<Vec<_>>()
            .join("; ")
    )))
}

/// The last line of a child's stdout that is a JSON object.
pub fn last_json_line(stdout: &str) -> Option<&str> {
    stdout
        .lines()
        .map(str::trim)
        .rev()
        .find(|l| l.starts_with('{'))
}

/// A run record that could not be read, as a failure that names it `{out}/{name}`.
fn record_failure(e: RecordsError, out: &str, name: &str) -> Failure {
    Failure::new(match e {
        RecordsError::Read { source, .. } => format!("cannot read {out}/{name}: {source}"),
        RecordsError::Parse {
            line: Some(n),
            source,
            ..
        } => format!("{out}/{name} line {n}: {source}"),
        RecordsError::Parse {
            line: None, source, ..
        } => format!("{out}/{name}: {source}"),
    })
}

/// The lines of `metrics.jsonl` of the run in `out_dir` (shown as `out` in errors).
pub fn read_metrics(out_dir: &Path, out: &str) -> Result<Vec<MetricsLine>> {
    MetricsLine::read_jsonl(out_dir.join(METRICS_FILE))
        .map_err(|e| record_failure(e, out, METRICS_FILE))
}

/// `memory.json` of the run in `out_dir` (shown as `out` in errors).
pub fn read_memory(out_dir: &Path, out: &str) -> Result<MemoryReport> {
    MemoryReport::read(out_dir.join(MEMORY_FILE)).map_err(|e| record_failure(e, out, MEMORY_FILE))
}

/// `(step, value)` of every metrics line whose `value` is present and finite, in file order.
pub fn metric_points(
    lines: &[MetricsLine],
    value: impl Fn(&MetricsLine) -> Option<f64>,
) -> Vec<(f64, f64)> {
    lines
        .iter()
        .filter_map(|l| Some((l.step as f64, value(l).filter(|v| v.is_finite())?)))
        .collect()
}

/// Mean `step_time_s` of the metrics lines after the first `warmup` steps (by step).
///
/// Lines whose step time is not finite are skipped; None when no timed step is left.
pub fn mean_step_time(lines: &[MetricsLine], warmup: u64) -> Option<f64> {
    let mut steps = metric_points(lines, |l| Some(l.step_time_s));
    // Stable: lines of equal step (should there be any) keep their order.
    steps.sort_by(|a, b| a.0.total_cmp(&b.0));
    let timed: Vec<f64> = steps.iter().skip(warmup as usize).map(|s| s.1).collect();
    if timed.is_empty() {
        return None;
    }
    Some(timed.iter().sum::<f64>() / timed.len() as f64)
}

/// The `--set`s of a timed CPU run at sequence `seq`, batch `batch`, for `steps` steps: f32,
/// no learning-rate warmup, no evaluation or checkpoint along the way, and a final evaluation
/// of one batch (by default it scores the whole split: hours at 1B on a CPU).
pub fn timing_sets(seq: u64, batch: u64, steps: u64) -> Vec<String> {
    vec![
        format!("train.seq_len={seq}"),
        format!("train.batch_size={batch}"),
        "train.dtype=\"f32\"".into(),
        "train.device=\"cpu\"".into(),
        format!("train.max_steps={steps}"),
        "train.warmup_steps=0".into(),
        "train.eval_every=0".into(),
        "train.eval_batches=1".into(),
        "train.final_eval_batches=1".into(),
        "train.save_every=0".into(),
    ]
}

/// `frugal train --config configs/default.toml --set S... --out OUT` in `root`, with `vars` in
/// its environment and no stdin, after removing a stale `OUT`: the command (stdout and stderr
/// for the caller to choose) and the run folder.
pub fn frugal_train_command(
    bin: &Path,
    vars: &[(String, String)],
    root: &Path,
    out: &str,
    sets: &[String],
) -> Result<(Command, PathBuf)> {
    let out_dir = root.join(out);
    if out_dir.exists() {
        std::fs::remove_dir_all(&out_dir)
            .map_err(|e| Failure::new(format!("cannot remove {out}: {e}")))?;
    }
    let mut c = Command::new(bin);
    c.current_dir(root)
        .args(["train", "--config", "configs/default.toml"]);
    for s in sets {
        c.arg("--set").arg(s);
    }
    c.arg("--out").arg(out);
    c.envs(vars.iter().map(|(k, v)| (k, v)));
    c.stdin(Stdio::null()).stderr(Stdio::inherit());
    Ok((c, out_dir))
}

/// [`frugal_train_command`] run to its end; its output goes to our stderr, so that our stdout
/// holds only the benchmark's table. Returns the run folder.
pub fn frugal_train(
    bin: &Path,
    vars: &[(String, String)],
    root: &Path,
    out: &str,
    sets: &[String],
) -> Result<PathBuf> {
    let (mut c, out_dir) = frugal_train_command(bin, vars, root, out, sets)?;
    c.stdout(Stdio::from(std::io::stderr()));
    crate::status(c, "frugal train")?;
    Ok(out_dir)
}

/// `frugal train --dry-run` with the same arguments as [`frugal_train`]: its stdout (the
/// accounting).
pub fn frugal_dry_run(
    bin: &Path,
    vars: &[(String, String)],
    root: &Path,
    sets: &[String],
) -> Result<String> {
    let mut c = Command::new(bin);
    c.current_dir(root)
        .args(["train", "--dry-run", "--config", "configs/default.toml"]);
    for s in sets {
        c.arg("--set").arg(s);
    }
    c.envs(vars.iter().map(|(k, v)| (k, v)));
    c.stdin(Stdio::null()).stderr(Stdio::inherit());
    let out = c
        .output()
        .map_err(|e| Failure::new(format!("could not start frugal train --dry-run: {e}")))?;
    if !out.status.success() {
        return Err(Failure::new(format!(
            "frugal train --dry-run failed ({})",
            out.status
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `python script args...` in `root` and returns the last JSON line of its stdout (its
/// stderr passes through).
pub fn python_json(
    python: &Path,
    vars: &[(String, String)],
    root: &Path,
    script: &str,
    args: &[String],
) -> Result<String> {
    let mut c = Command::new(python);
    c.current_dir(root).arg(root.join(script)).args(args);
    c.envs(vars.iter().map(|(k, v)| (k, v)));
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let out = c.output().map_err(|e| {
        Failure::new(format!(
            "could not start {} {script}: {e}",
            python.display()
        ))
    })?;
    if !out.status.success() {
        return Err(Failure::new(format!("{script} failed ({})", out.status)));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    last_json_line(&stdout).map(str::to_string).ok_or_else(|| {
        Failure::new(format!(
            "{script} printed no JSON line; its stdout was:\n{stdout}"
        ))
    })
}

/// Memory available to new processes now (`MemAvailable` of `/proc/meminfo`), if known.
pub fn mem_available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Parses a size as `frugal_core::memory::human_bytes` prints it (`1.23 GB`, `456.0 MB`,
/// `12.0 kB`, decimal units) back to bytes (to its printed precision).
pub fn parse_human_bytes(s: &str) -> Option<u64> {
    let mut parts = s.split_whitespace();
    let value: f64 = parts.next()?.parse().ok()?;
    let unit = match parts.next()? {
        "B" => 1.0,
        "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        _ => return None,
    };
    (value >= 0.0).then(|| (value * unit).round() as u64)
}

/// The 1-minute load average (`/proc/loadavg`), if known: how busy the machine was when a timed
/// child started.
pub fn load_average() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// A benchmark's command line as `(name, value)` pairs, in order: `--name value` or
/// `--name=value` for each name of `known`, `--flag` alone (value `""`) for each of `flags`.
/// An unknown argument, a missing value or a flag given one is an error naming `bench` and
/// ending with `usage`.
pub fn named_args(
    bench: &str,
    usage: &str,
    args: &[String],
    known: &[&str],
    flags: &[&str],
) -> Result<Vec<(String, String)>> {
    let bad = |m: String| Failure::new(format!("bench {bench}: {m}; {usage}"));
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (a.as_str(), None),
        };
        if flags.contains(&name) {
            if inline.is_some() {
                return Err(bad(format!("{name} takes no value")));
            }
            out.push((name.to_string(), String::new()));
        } else if known.contains(&name) {
            let value = inline
                .or_else(|| it.next().cloned())
                .ok_or_else(|| bad(format!("{name} wants a value")))?;
            out.push((name.to_string(), value));
        } else {
            return Err(bad(format!("unknown argument '{a}'")));
        }
    }
    Ok(out)
}

/// The value `value` of option `name` of benchmark `bench` as a whole number of at least
/// `min`; the error names both.
pub fn whole_arg(bench: &str, name: &str, value: &str, min: u64) -> Result<u64> {
    value.parse().ok().filter(|&n| n >= min).ok_or_else(|| {
        Failure::new(format!(
            "bench {bench}: {name} wants a whole number of at least {min}, got '{value}'"
        ))
    })
}

/// Parses a benchmark's `--steps N --warmup W` (also `--steps=N`) over the defaults
/// `(steps, warmup)`; `bench` names it in errors. Returns `(steps, warmup)`; steps must be at
/// least 1.
pub fn parse_steps_warmup(
    bench: &str,
    args: &[String],
    defaults: (u64, u64),
) -> Result<(u64, u64)> {
    let usage = format!("usage: cargo xtask bench {bench} [-- --steps N --warmup W]");
    let (mut steps, mut warmup) = defaults;
    for (name, value) in named_args(bench, &usage, args, &["--steps", "--warmup"], &[])? {
        if name == "--steps" {
            steps = whole_arg(bench, &name, &value, 1)?;
        } else {
            warmup = whole_arg(bench, &name, &value, 0)?;
        }
    }
    Ok((steps, warmup))
}

/// What a finished `frugal train` run measured, and its records.
#[derive(Debug, Clone)]
pub struct TrainRun {
    /// Mean step time after the warm-up steps (seconds).
    pub step_s: f64,
    /// `memory.json`'s measured baseline (bytes).
    pub baseline_rss_bytes: u64,
    /// `memory.json`'s measured peak of the whole run (bytes).
    pub peak_rss_bytes: u64,
    /// `metrics.jsonl`.
    pub metrics: Vec<MetricsLine>,
    /// `memory.json`.
    pub memory: MemoryReport,
}

/// What a finished `frugal train` run in `out_dir` (shown as `out`) measured: the mean step
/// time after `warmup` steps (of `total`), baseline and peak resident memory, and its records
/// for more. Errors name the file that lacks them.
pub fn read_train_run(out_dir: &Path, out: &str, warmup: u64, total: u64) -> Result<TrainRun> {
    let metrics = read_metrics(out_dir, out)?;
    let step_s = mean_step_time(&metrics, warmup).ok_or_else(|| {
        Failure::new(format!(
            "{out}/metrics.jsonl has fewer than {total} training steps with step_time_s"
        ))
    })?;
    let memory = read_memory(out_dir, out)?;
    Ok(TrainRun {
        step_s,
        baseline_rss_bytes: memory.measured.baseline_rss_bytes,
        peak_rss_bytes: memory.measured.peak_rss_bytes,
        metrics,
        memory,
    })
}

/// One side's outcome in a benchmark: its row or why it has none, and the 1-minute load average
/// when it started.
#[derive(Debug, Clone)]
pub struct Outcome<S, R> {
    /// Which side.
    pub side: S,
    /// Its measurements, or why there are none.
    pub row: std::result::Result<R, String>,
    /// The load average when it started.
    pub load: Option<f64>,
}

/// The row of `side` among `outcomes`, when it was measured.
pub fn row_of<S: PartialEq + Copy, R>(outcomes: &[Outcome<S, R>], side: S) -> Option<&R> {
    outcomes
        .iter()
        .find(|o| o.side == side)
        .and_then(|o| o.row.as_ref().ok())
}

/// The sides among `outcomes` that failed, with why.
pub fn failures<S: Copy, R>(outcomes: &[Outcome<S, R>]) -> Vec<(S, &str)> {
    outcomes
        .iter()
        .filter_map(|o| o.row.as_ref().err().map(|e| (o.side, e.as_str())))
        .collect()
}

/// `key(side) load` of every outcome, comma-separated (`?` for an unknown load).
pub fn loads<S: Copy, R>(outcomes: &[Outcome<S, R>], key: impl Fn(S) -> String) -> String {
    outcomes
        .iter()
        .map(|o| {
            format!(
                "{} {}",
                key(o.side),
                o.load.map_or_else(|| "?".into(), |l| format!("{l:.2}"))
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Run records as the trainer writes them, for the benchmarks' tests.
#[cfg(test)]
pub mod fixtures {
    use frugal_records::{MeasuredMemory, MemoryReport, MetricsLine, TensorBytes};
    use std::collections::BTreeMap;

    /// A training step's line with `step`, `loss` and `step_time_s` as given (1024 tokens a
    /// step) and the other fields every line has.
    pub fn line(step: u64, loss: f64, step_time_s: f64) -> MetricsLine {
        MetricsLine::new(
            step,
            loss,
            1e-3,
            step * 1024,
            1024.0 / step_time_s,
            step_time_s,
            1.0,
            1 << 30,
        )
    }

    /// `lines` as the text of `metrics.jsonl`.
    pub fn jsonl(lines: &[MetricsLine]) -> String {
        lines
            .iter()
            .map(|l| serde_json::to_string(l).unwrap() + "\n")
            .collect()
    }

    /// A CPU run's report: baseline and peak as given (the steps' peak the same), a parameter
    /// accounting of `parameters` bytes and no variables.
    pub fn memory(baseline_rss_bytes: u64, peak_rss_bytes: u64, parameters: u64) -> MemoryReport {
        let accounting = BTreeMap::from([("parameters".to_string(), parameters)]);
        let measured = MeasuredMemory::new(baseline_rss_bytes, peak_rss_bytes, peak_rss_bytes);
        MemoryReport::new("Cpu", accounting, measured, 0, Vec::new())
    }

    /// A variable of `memory.json`'s `parameters` list, f32.
    pub fn variable(name: &str, shape: &[i64]) -> TensorBytes {
        TensorBytes {
            name: name.into(),
            shape: shape.to_vec(),
            bytes: 4 * shape.iter().product::<i64>() as u64,
        }
    }

    /// `report` as the text of `memory.json`.
    pub fn memory_json(report: &MemoryReport) -> String {
        serde_json::to_string_pretty(report).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guarantee: a run's records read through their types; a missing file or a line that is
    /// not a metrics line is an error that names the file as the benchmark shows it, and the
    /// line.
    #[test]
    fn run_records_and_their_errors() {
        use fixtures::{jsonl, line, memory, memory_json};
        let dir = std::env::temp_dir().join(format!("xtask-report-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let lines = [line(1, 9.0, 4.0), line(2, 8.0, 2.0), line(3, 7.0, 3.0)];
        std::fs::write(dir.join(METRICS_FILE), jsonl(&lines)).unwrap();
        let err = |r: Result<TrainRun>| r.err().unwrap().message;
        let missing = err(read_train_run(&dir, "out", 1, 3));
        assert!(
            missing.starts_with("cannot read out/memory.json: "),
            "{missing}"
        );
        std::fs::write(dir.join(MEMORY_FILE), memory_json(&memory(10, 30, 5))).unwrap();
        let run = read_train_run(&dir, "out", 1, 3)
            .map_err(|f| f.message)
            .unwrap();
        assert_eq!(
            (run.step_s, run.baseline_rss_bytes, run.peak_rss_bytes),
            (2.5, 10, 30)
        );
        assert_eq!(run.metrics, lines);
        let few = err(read_train_run(&dir, "out", 3, 4));
        assert!(few.contains("fewer than 4 training steps"), "{few}");
        let text = jsonl(&lines) + "{\"step\": 4, \"loss\": 6.0}\n";
        std::fs::write(dir.join(METRICS_FILE), text).unwrap();
        let bad = err(read_train_run(&dir, "out", 1, 3));
        assert!(
            bad.starts_with("out/metrics.jsonl line 4: missing field"),
            "{bad}"
        );
        std::fs::write(dir.join(MEMORY_FILE), "{}").unwrap();
        let bad = read_memory(&dir, "out").err().unwrap().message;
        assert!(bad.starts_with("out/memory.json: missing field"), "{bad}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn named_args_reads_both_forms_flags_and_refuses_the_rest() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let read = |a: &[&str]| named_args("b", "usage", &v(a), &["--n", "--m"], &["--f"]);
        let got = read(&["--n", "3", "--f", "--m=x"]).ok().unwrap();
        let want =
            [("--n", "3"), ("--f", ""), ("--m", "x")].map(|(a, b)| (a.to_string(), b.to_string()));
        assert_eq!(got, want);
        for bad in [&["--n"][..], &["--f=1"], &["--other", "1"], &["3"]] {
            let e = read(bad).err().unwrap().message;
            assert!(e.contains("bench b: ") && e.ends_with("; usage"), "{e}");
        }
        assert_eq!(whole_arg("b", "--n", "4", 1).ok(), Some(4));
        assert!(whole_arg("b", "--n", "0", 1).is_err());
        assert!(whole_arg("b", "--n", "x", 0).is_err());
    }
}

/// A goal that a measured ratio meets when it is at most `goal`: `(key, goal, measured)`.
pub type AtMost = (&'static str, f64, Option<f64>);

/// Goals `goals` as the tables print them: `- key goal: measured (met|not met)`, one a line.
pub fn at_most_lines(goals: &[AtMost]) -> String {
    goals
        .iter()
        .map(|(key, goal, measured)| {
            let got = measured.map_or_else(|| "not measured".to_string(), |m| format!("{m:.3}"));
            let met = measured.is_some_and(|m| m <= *goal);
            format!(
                "- {key} {goal}: {got} ({})\n",
                if met { "met" } else { "not met" }
            )
        })
        .collect()
}

/// Goals `goals` as JSON members (`"key": {"goal", "measured", "met"}`), four-space indented,
/// joined by `,\n`.
pub fn at_most_json(goals: &[AtMost]) -> String {
    goals
        .iter()
        .map(|(key, goal, measured)| {
            format!(
                "    \"{key}\": {{\"goal\": {}, \"measured\": {}, \"met\": {}}}",
                json_num(*goal),
                json_opt(*measured),
                measured.is_some_and(|m| m <= *goal)
            )
        })
        .collect::<Vec<_>>()
        .join(",\n")
}
