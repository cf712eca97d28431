//! `cargo xtask bench train-step`: our trainer against plain PyTorch on the 60M LLaMA.
//!
//! Both train the LLaMA 60M configuration at sequence 256, batch 4, f32, on the CPU, with AdamW
//! (lr 1e-3, betas 0.9/0.95, eps 1e-8, no weight decay) and gradient clipping at 1.0, each in a
//! fresh child process: first `scripts/bench_train_step.py` (plain PyTorch), then `frugal train`.
//! The first `--warmup` steps are not timed; the next `--steps` are. The result is printed as a
//! markdown table (stdout) and written to `target/bench/train-step.json`.
//!
//! ```text
//! cargo xtask bench train-step [-- --steps 8 --warmup 2]
//! ```

use crate::report::{
    frugal_train, json_num as num, json_number, json_str as string, last_json_line, mib,
    python_json, utc_date, Machine,
};
use crate::setup::TorchEnv;
use crate::{Failure, Result};
use std::path::Path;

const BATCH: u64 = 4;
const SEQ: u64 = 256;
const SCRIPT: &str = "scripts/bench_train_step.py";
const FRUGAL_OUT: &str = "target/bench/train-step/frugal-run";
const RESULT: &str = "target/bench/train-step.json";

/// The benchmark's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Options {
    steps: u64,
    warmup: u64,
}

/// One side's measurements.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    step_s: f64,
    baseline_rss_bytes: u64,
    peak_rss_bytes: u64,
}

impl Row {
    fn tokens_per_s(&self) -> f64 {
        (BATCH * SEQ) as f64 / self.step_s
    }

    fn peak_above_baseline(&self) -> u64 {
        self.peak_rss_bytes.saturating_sub(self.baseline_rss_bytes)
    }
}

/// What the PyTorch script reports beyond its row.
struct PytorchExtra {
    params: u64,
    threads: u64,
}

/// Runs the benchmark.
pub fn run(env: &TorchEnv, args: &[String]) -> Result<()> {
    let opts = parse_args(args)?;
    let root = crate::root();
    std::fs::create_dir_all(root.join("target/bench"))
        .map_err(|e| Failure::new(format!("cannot create target/bench: {e}")))?;

    // Build first, so that the compiler does not share the CPU with either timed run.
    eprintln!("bench train-step: building frugal (release)");
    let frugal_bin = crate::build_frugal(env);

    eprintln!(
        "bench train-step: PyTorch, {} timed steps after {} warmup steps",
        opts.steps, opts.warmup
    );
    let (torch_row, extra) = run_pytorch(&env.python, &env.vars(), &root, opts)?;

    let frugal = frugal_bin.and_then(|bin| {
        eprintln!(
            "bench train-step: frugal, {} timed steps after {} warmup steps",
            opts.steps, opts.warmup
        );
        run_frugal(&env.vars(), &root, &bin, opts)
    });
    let machine = Machine::detect();
    let date = utc_date();
    println!(
        "LLaMA 60M, seq {SEQ}, batch {BATCH}, f32, CPU: {} x {}, {} timed steps after {} \
         warmup, {date}\n",
        machine.nproc, machine.model, opts.steps, opts.warmup
    );
    let frugal_row = match frugal {
        Ok(row) => row,
        Err(f) => {
            print!("{}", table(opts, &torch_row, None, &extra));
            return Err(Failure::new(format!(
                "frugal did not complete the benchmark ({}); only the PyTorch row was measured, \
                 {RESULT} was not written",
                f.message
            )));
        }
    };

    let json = result_json(opts, &torch_row, &frugal_row, &extra, &machine, &date);
    std::fs::write(root.join(RESULT), json)
        .map_err(|e| Failure::new(format!("cannot write {RESULT}: {e}")))?;
    print!("{}", table(opts, &torch_row, Some(&frugal_row), &extra));
    eprintln!("bench train-step: wrote {RESULT}");
    Ok(())
}

fn parse_args(args: &[String]) -> Result<Options> {
    let (steps, warmup) = crate::report::parse_steps_warmup("train-step", args, (8, 2))?;
    Ok(Options { steps, warmup })
}

fn run_pytorch(
    python: &Path,
    vars: &[(String, String)],
    root: &Path,
    opts: Options,
) -> Result<(Row, PytorchExtra)> {
    let args: Vec<String> = [
        "--steps",
        &opts.steps.to_string(),
        "--warmup",
        &opts.warmup.to_string(),
        "--batch",
        &BATCH.to_string(),
        "--seq",
        &SEQ.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let stdout = python_json(python, vars, root, SCRIPT, &args)?;
    parse_pytorch(&stdout).ok_or_else(|| {
        Failure::new(format!(
            "{SCRIPT} printed no usable JSON line; its stdout was:\n{stdout}"
        ))
    })
}

/// The row and extras from the script's stdout: its last line that is a JSON object.
fn parse_pytorch(stdout: &str) -> Option<(Row, PytorchExtra)> {
    let line = last_json_line(stdout)?;
    let row = Row {
        step_s: json_number(line, "step_s")?,
        baseline_rss_bytes: json_number(line, "baseline_rss_bytes")? as u64,
        peak_rss_bytes: json_number(line, "peak_rss_bytes")? as u64,
    };
    let extra = PytorchExtra {
        params: json_number(line, "params").unwrap_or(0.0) as u64,
        threads: json_number(line, "torch_threads").unwrap_or(0.0) as u64,
    };
    (row.step_s > 0.0).then_some((row, extra))
}

fn run_frugal(vars: &[(String, String)], root: &Path, bin: &Path, opts: Options) -> Result<Row> {
    let total = opts.warmup + opts.steps;
    let mut sets = vec!["model.size=\"60m\"".to_string()];
    sets.extend(crate::report::timing_sets(SEQ, BATCH, total));
    sets.push("train.lr=0.001".into());
    let out_dir = frugal_train(bin, vars, root, FRUGAL_OUT, &sets)?;

    let run = crate::report::read_train_run(&out_dir, FRUGAL_OUT, opts.warmup, total)?;
    Ok(Row {
        step_s: run.step_s,
        baseline_rss_bytes: run.baseline_rss_bytes,
        peak_rss_bytes: run.peak_rss_bytes,
    })
}

/// How a table row shows one side.
type Cell = fn(&Row) -> String;
/// How a table row compares Frugal (first) with PyTorch (second).
type Ratio = fn(&Row, &Row) -> f64;

/// The markdown table; without `frugal`, the PyTorch column alone.
fn table(opts: Options, torch: &Row, frugal: Option<&Row>, extra: &PytorchExtra) -> String {
    let rows: [(&str, Cell, Option<Ratio>); 5] = [
        (
            "tokens/s (higher is better)",
            |r| format!("{:.0}", r.tokens_per_s()),
            Some(|f, t| f.tokens_per_s() / t.tokens_per_s()),
        ),
        ("step time (s)", |r| format!("{:.3}", r.step_s), None),
        ("baseline RSS (MiB)", |r| mib(r.baseline_rss_bytes), None),
        ("peak RSS (MiB)", |r| mib(r.peak_rss_bytes), None),
        (
            "peak above baseline (MiB, lower is better)",
            |r| mib(r.peak_above_baseline()),
            Some(|f, t| f.peak_above_baseline() as f64 / t.peak_above_baseline().max(1) as f64),
        ),
    ];
    let mut s = String::new();
    match frugal {
        Some(_) => s.push_str("| | PyTorch | Frugal | Frugal / PyTorch |\n|---|---:|---:|---:|\n"),
        None => s.push_str("| | PyTorch |\n|---|---:|\n"),
    }
    for (name, value, ratio) in rows {
        match frugal {
            Some(f) => {
                let r = ratio
                    .map(|g| format!("{:.2}x", g(f, torch)))
                    .unwrap_or_default();
                s.push_str(&format!(
                    "| {name} | {} | {} | {r} |\n",
                    value(torch),
                    value(f)
                ));
            }
            None => s.push_str(&format!("| {name} | {} |\n", value(torch))),
        }
    }
    s.push_str(&format!(
        "\n{} parameters; {} timed steps after {} warmup; PyTorch on {} threads.\n",
        extra.params, opts.steps, opts.warmup, extra.threads
    ));
    s
}

fn row_json(r: &Row) -> String {
    format!(
        "{{\"tokens_per_s\": {}, \"step_s\": {}, \"peak_rss_bytes\": {}, \
         \"baseline_rss_bytes\": {}, \"peak_above_baseline_bytes\": {}}}",
        num(r.tokens_per_s()),
        num(r.step_s),
        r.peak_rss_bytes,
        r.baseline_rss_bytes,
        r.peak_above_baseline()
    )
}

fn result_json(
    opts: Options,
    torch: &Row,
    frugal: &Row,
    extra: &PytorchExtra,
    machine: &Machine,
    date: &str,
) -> String {
    let tps = frugal.tokens_per_s() / torch.tokens_per_s();
    let mem = frugal.peak_above_baseline() as f64 / torch.peak_above_baseline().max(1) as f64;
    format!(
        "{{\n  \"benchmark\": \"train-step\",\n  \"model\": \"llama-60m\",\n  \"params\": {},\n  \
         \"dtype\": \"f32\",\n  \"device\": \"cpu\",\n  \"steps\": {},\n  \"warmup\": {},\n  \
         \"batch\": {BATCH},\n  \"seq\": {SEQ},\n  \"machine\": {{\"nproc\": {}, \"cpu\": {}, \
         \"torch_threads\": {}}},\n  \"date\": {},\n  \"pytorch\": {},\n  \"frugal\": {},\n  \
         \"ratios\": {{\"tokens_per_s_frugal_over_pytorch\": {}, \
         \"peak_above_baseline_frugal_over_pytorch\": {}}},\n  \
         \"goals\": {{\"tokens_per_s_ratio_at_least\": 1, \"peak_above_baseline_ratio_at_most\": \
         1, \"met\": {}}}\n}}\n",
        extra.params,
        opts.steps,
        opts.warmup,
        machine.nproc,
        string(&machine.model),
        extra.threads,
        string(date),
        row_json(torch),
        row_json(frugal),
        num(tps),
        num(mem),
        tps >= 1.0 && mem <= 1.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::fixtures::{jsonl, line, memory, memory_json};
    use crate::report::mean_step_time;

    /// Guarantee: the mean skips the first `warmup` steps by step number (not file order), and
    /// steps whose time is not finite.
    #[test]
    fn mean_skips_warmup_and_non_finite_times() {
        let mut lines = vec![
            line(2, 10.4, 2.5),
            line(1, 10.5, 9.0),
            line(3, 10.3, 2.0),
            line(4, 10.2, 3.0),
        ];
        lines[2].val_loss = Some(10.2);
        assert_eq!(mean_step_time(&lines, 1), Some(2.5));
        assert_eq!(mean_step_time(&lines, 3), Some(3.0));
        assert_eq!(mean_step_time(&lines, 4), None);
        assert_eq!(mean_step_time(&[], 0), None);
        lines.push(line(5, 10.1, f64::NAN));
        assert_eq!(mean_step_time(&lines, 3), Some(3.0));
    }

    #[test]
    fn keys_are_not_values() {
        let text = r#"{"name": "step_s", "step_s": 1.5}"#;
        assert_eq!(json_number(text, "step_s"), Some(1.5));
        assert_eq!(json_number(text, "name"), None);
        assert_eq!(json_number(r#"{"x": NaN}"#, "x"), None);
    }

    #[test]
    fn pytorch_line() {
        let out = "noise\n{\"impl\":\"pytorch\",\"params\":58073600,\"step_s\":2.0,\
                   \"tokens_per_s\":512.0,\"baseline_rss_bytes\":495177728,\
                   \"peak_rss_bytes\":2643300352,\"torch_threads\":2}\n";
        let (row, extra) = parse_pytorch(out).unwrap();
        assert_eq!(row.step_s, 2.0);
        assert_eq!(row.tokens_per_s(), 512.0);
        assert_eq!(row.peak_above_baseline(), 2643300352 - 495177728);
        assert_eq!((extra.params, extra.threads), (58073600, 2));
        assert!(parse_pytorch("no json\n").is_none());
    }

    #[test]
    fn args() {
        let a = |v: &[&str]| parse_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            a(&[]).ok(),
            Some(Options {
                steps: 8,
                warmup: 2
            })
        );
        assert_eq!(
            a(&["--steps", "3", "--warmup=0"]).ok(),
            Some(Options {
                steps: 3,
                warmup: 0
            })
        );
        assert!(a(&["--steps", "0"]).is_err());
        assert!(a(&["--steps"]).is_err());
        assert!(a(&["--batch", "2"]).is_err());
    }

    #[test]
    fn cpuinfo_and_json() {
        let info = "processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t: x\n";
        assert_eq!(
            crate::report::cpu_model(info).as_deref(),
            Some("AMD EPYC 9B14")
        );
        assert_eq!(string("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(num(f64::NAN), "null");
    }

    #[test]
    fn result_is_flat_enough_to_read_back() {
        let torch = Row {
            step_s: 2.0,
            baseline_rss_bytes: 100,
            peak_rss_bytes: 300,
        };
        let frugal = Row {
            step_s: 1.0,
            baseline_rss_bytes: 50,
            peak_rss_bytes: 150,
        };
        let extra = PytorchExtra {
            params: 58073600,
            threads: 2,
        };
        let machine = Machine {
            nproc: 2,
            model: "Test CPU".into(),
        };
        let opts = Options {
            steps: 8,
            warmup: 2,
        };
        let j = result_json(
            opts,
            &torch,
            &frugal,
            &extra,
            &machine,
            "2025-01-01T00:00:00Z",
        );
        assert_eq!(
            json_number(&j, "tokens_per_s_frugal_over_pytorch"),
            Some(2.0)
        );
        assert_eq!(
            json_number(&j, "peak_above_baseline_frugal_over_pytorch"),
            Some(0.5)
        );
        assert!(j.contains("\"met\": true"));
        let t = table(opts, &torch, Some(&frugal), &extra);
        assert!(
            t.contains("| tokens/s (higher is better) | 512 | 1024 | 2.00x |"),
            "{t}"
        );
    }

    /// `run_frugal` end to end, with a shell script standing in for the `frugal` binary.
    #[cfg(unix)]
    #[test]
    fn frugal_child_process() {
        use std::os::unix::fs::PermissionsExt;
        let root = std::env::temp_dir().join(format!("xtask-bench-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let stale = root.join(FRUGAL_OUT).join("stale");
        std::fs::create_dir_all(&stale).unwrap();
        let bin = root.join("fake-frugal");
        // Checks its argv, then writes what the real trainer writes into --out.
        let script = r#"#!/bin/sh
[ "$1 $2 $3" = "train --config configs/default.toml" ] || exit 3
case "$*" in *'--set model.size="60m" '*'--set train.max_steps='[35]' '*) ;; *) exit 4 ;; esac
[ "$FRUGAL_TEST_VAR" = yes ] || exit 5
while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
[ -e "$out/stale" ] && exit 6
mkdir -p "$out"
echo "training..."
printf '%s' 'METRICS' > "$out/metrics.jsonl"
printf '%s' 'MEMORY' > "$out/memory.json"
"#;
        let mut lines = [line(1, 10.0, 5.0), line(2, 9.0, 1.5), line(3, 8.0, 2.5)];
        lines[1].val_loss = Some(9.0);
        let script = script
            .replace("METRICS", &jsonl(&lines))
            .replace("MEMORY", &memory_json(&memory(10, 30, 100)));
        std::fs::write(&bin, script).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let vars = [("FRUGAL_TEST_VAR".to_string(), "yes".to_string())];
        let opts = Options {
            steps: 2,
            warmup: 1,
        };
        let row = run_frugal(&vars, &root, &bin, opts)
            .map_err(|f| f.message)
            .unwrap();
        assert_eq!(
            row,
            Row {
                step_s: 2.0,
                baseline_rss_bytes: 10,
                peak_rss_bytes: 30
            }
        );
        // Too few steps for the warmup asked for: a clear error.
        let err = run_frugal(
            &vars,
            &root,
            &bin,
            Options {
                steps: 2,
                warmup: 3,
            },
        )
        .err()
        .unwrap();
        assert!(
            err.message.contains("fewer than 5 training steps"),
            "{}",
            err.message
        );
        std::fs::write(&bin, "#!/bin/sh\nexit 1\n").unwrap();
        let err = run_frugal(&vars, &root, &bin, opts).err().unwrap();
        assert!(
            err.message.contains("frugal train failed"),
            "{}",
            err.message
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
