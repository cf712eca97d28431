//! `cargo xtask bench adapters-gqa` (and the second part of `cargo xtask bench adapters`):
//! QLoRA on a grouped-query model, Frugal against PEFT + bitsandbytes.
//!
//! One random Llama-3.2-1B-shaped base (hidden 2048, intermediate 8192, 16 layers, 32 heads, 8
//! KV heads, vocabulary 128256, tied embeddings, rope_theta 5e5, Llama 3 RoPE scaling), made
//! once in bf16 by `scripts/bench_adapters_peft.py --make-base-gqa` in
//! `target/bench/adapters/gqa-base`, is fine-tuned as QLoRA on the CPU: NF4 base with double
//! quantization, LoRA r 16, alpha 32 on the seven projections, sequence 512, batch 1, bf16
//! compute, activation checkpointing, AdamW at lr 1e-4, each side in a fresh child process:
//! PEFT with bitsandbytes (`--qlora`: `BitsAndBytesConfig` NF4, `prepare_model_for_kbit_training`
//! with gradient checkpointing), then `frugal train` (`adapter.kind = "qlora"`, `train.dtype =
//! "bf16"`, `train.checkpointing = true`, and its chunked cross-entropy, `train.ce_chunk = 128`,
//! which PEFT has no counterpart of). The first `--warmup` steps are not timed; the next
//! `--steps` are. Goals: our step no slower than PEFT's, our peak RSS above the idle baseline at
//! most 0.7x PEFT's. The table goes to stdout, the record to `target/bench/adapters_gqa.json`.
//!
//! ```text
//! cargo xtask bench adapters-gqa [-- --steps 2 --warmup 1]
//! ```

use crate::report::{
    frugal_train, json_num as num, json_number, json_opt, json_str as string, last_json_line,
    load_average, mib, python_json, utc_date, Machine,
};
use crate::setup::TorchEnv;
use crate::{Failure, Result};
use std::path::Path;

const BATCH: u64 = 1;
const SEQ: u64 = 512;
const R: u64 = 16;
/// Our side's `train.ce_chunk`.
const CE_CHUNK: u64 = 128;
const ALPHA: u64 = 32;
const SCRIPT: &str = "scripts/bench_adapters_peft.py";
const BASE: &str = "target/bench/adapters/gqa-base";
const RESULT: &str = "target/bench/adapters_gqa.json";

/// Goal: our QLoRA step time over PEFT + bitsandbytes', at most.
const GOAL_STEP: f64 = 1.0;
/// Goal: our peak RSS above the idle baseline over PEFT + bitsandbytes', at most.
const GOAL_PEAK: f64 = 0.7;

/// The two sides, in the table's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Frugal,
    Peft,
}

impl Side {
    fn key(self) -> &'static str {
        match self {
            Side::Frugal => "frugal_qlora",
            Side::Peft => "peft_qlora_bnb",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Side::Frugal => "Frugal QLoRA",
            Side::Peft => "PEFT + bitsandbytes QLoRA",
        }
    }
}

/// One side's measurements.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    step_s: f64,
    baseline_rss_bytes: u64,
    peak_rss_bytes: u64,
}

impl Row {
    fn peak_above_baseline(&self) -> u64 {
        self.peak_rss_bytes.saturating_sub(self.baseline_rss_bytes)
    }
}

type Outcome = crate::report::Outcome<Side, Row>;

/// Both outcomes and what PEFT reported beyond its row.
struct Results {
    outcomes: Vec<Outcome>,
    /// Parameters of PEFT's model, its trainable ones, bitsandbytes' version.
    peft: (u64, u64, String),
}

impl Results {
    fn row(&self, side: Side) -> Option<&Row> {
        crate::report::row_of(&self.outcomes, side)
    }

    /// `(key, goal, measured)` of the two goals.
    fn goals(&self) -> [crate::report::AtMost; 2] {
        let (ours, theirs) = (self.row(Side::Frugal), self.row(Side::Peft));
        let ratio = |f: fn(&Row) -> f64| Some(f(ours?) / f(theirs?));
        [
            ("step_over_peft_bnb_at_most", GOAL_STEP, ratio(|r| r.step_s)),
            (
                "peak_above_baseline_over_peft_bnb_at_most",
                GOAL_PEAK,
                ratio(|r| r.peak_above_baseline() as f64),
            ),
        ]
    }
}

/// Runs the benchmark.
pub fn run(env: &TorchEnv, args: &[String]) -> Result<()> {
    let (steps, warmup) = crate::report::parse_steps_warmup("adapters-gqa", args, (2, 1))?;
    let root = crate::root();
    std::fs::create_dir_all(root.join("target/bench/adapters"))
        .map_err(|e| Failure::new(format!("cannot create target/bench/adapters: {e}")))?;
    if !crate::setup::ensure_bench_packages(env) {
        return Err(Failure::new(format!(
            "{} could not be installed: PEFT + bitsandbytes cannot run; nothing was measured",
            crate::setup::BENCH_PACKAGES.join(" ")
        )));
    }
    eprintln!("bench adapters-gqa: building frugal (release)");
    let frugal_bin = crate::build_frugal(env);

    eprintln!("bench adapters-gqa: the Llama-3.2-1B-shaped base in {BASE}");
    python_json(
        &env.python,
        &env.vars(),
        &root,
        SCRIPT,
        &["--make-base-gqa".to_string(), BASE.to_string()],
    )
    .map_err(|f| {
        Failure::new(format!(
            "could not make the base model in {BASE} ({}); nothing was measured",
            f.message
        ))
    })?;

    let mut outcomes = Vec::new();
    let mut peft = (0, 0, String::new());
    for side in [Side::Peft, Side::Frugal] {
        eprintln!(
            "bench adapters-gqa: {}, {steps} timed steps after {warmup} warmup steps",
            side.label()
        );
        let load = load_average();
        let row = match side {
            Side::Peft => {
                run_peft(&env.python, &env.vars(), &root, steps, warmup).map(|(row, extra)| {
                    peft = extra;
                    row
                })
            }
            Side::Frugal => match &frugal_bin {
                Ok(bin) => run_frugal(&env.vars(), &root, bin, steps, warmup),
                Err(f) => Err(Failure::new(format!("frugal was not built: {}", f.message))),
            },
        };
        if let Err(f) = &row {
            eprintln!("bench adapters-gqa: {} failed: {}", side.label(), f.message);
        }
        outcomes.push(Outcome {
            side,
            row: row.map_err(|f| f.message),
            load,
        });
    }
    let results = Results { outcomes, peft };
    let machine = Machine::detect();
    let date = utc_date();
    println!(
        "Llama-3.2-1B-shaped QLoRA, seq {SEQ}, batch {BATCH}, bf16 compute, activation \
         checkpointing, CPU: {} x {}, {steps} timed steps after {warmup} warmup, {date}\n",
        machine.nproc, machine.model
    );
    print!("{}", table(&results));
    let json = result_json(&results, steps, warmup, &machine, &date);
    std::fs::write(root.join(RESULT), json)
        .map_err(|e| Failure::new(format!("cannot write {RESULT}: {e}")))?;
    eprintln!("bench adapters-gqa: wrote {RESULT}");
    let failed: Vec<(String, String)> = crate::report::failures(&results.outcomes)
        .iter()
        .map(|(s, e)| (s.label().to_string(), e.to_string()))
        .collect();
    crate::report::sides_failed(RESULT, &failed)
}

fn run_peft(
    python: &Path,
    vars: &[(String, String)],
    root: &Path,
    steps: u64,
    warmup: u64,
) -> Result<(Row, (u64, u64, String))> {
    let args: Vec<String> = [
        "--qlora",
        "--steps",
        &steps.to_string(),
        "--warmup",
        &warmup.to_string(),
        "--batch",
        &BATCH.to_string(),
        "--seq",
        &SEQ.to_string(),
        "--base",
        BASE,
        "--r",
        &R.to_string(),
        "--alpha",
        &ALPHA.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let stdout = python_json(python, vars, root, SCRIPT, &args)?;
    parse_peft(&stdout).ok_or_else(|| {
        Failure::new(format!(
            "{SCRIPT} printed no usable JSON line; its stdout was:\n{stdout}"
        ))
    })
}

/// The row and extras from the script's last JSON line.
fn parse_peft(stdout: &str) -> Option<(Row, (u64, u64, String))> {
    let line = last_json_line(stdout)?;
    let row = Row {
        step_s: json_number(line, "step_s")?,
        baseline_rss_bytes: json_number(line, "baseline_rss_bytes")? as u64,
        peak_rss_bytes: json_number(line, "peak_rss_bytes")? as u64,
    };
    // A version string: no escapes to undo.
    let key = "\"bitsandbytes_version\":";
    let bnb = line
        .find(key)
        .map(|i| line[i + key.len()..].trim_start())
        .and_then(|rest| rest.strip_prefix('"'))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default()
        .to_string();
    let extra = (
        json_number(line, "params").unwrap_or(0.0) as u64,
        json_number(line, "trainable_params").unwrap_or(0.0) as u64,
        bnb,
    );
    (row.step_s > 0.0).then_some((row, extra))
}

/// The `--set` values of our side.
fn frugal_sets(steps: u64, warmup: u64) -> Vec<String> {
    let mut sets = vec![format!("model.from_pretrained=\"{BASE}\"")];
    sets.extend(crate::report::timing_sets(SEQ, BATCH, warmup + steps));
    sets.extend([
        "train.dtype=\"bf16\"".into(),
        "train.checkpointing=true".into(),
        // Chunked cross-entropy: the 128256-wide logits of 128 tokens at a time.
        format!("train.ce_chunk={CE_CHUNK}"),
        "train.lr=0.0001".into(),
        "adapter.kind=\"qlora\"".into(),
        format!("adapter.r={R}"),
        format!("adapter.alpha={ALPHA}.0"),
        "adapter.target_modules=\"all-linear\"".into(),
    ]);
    sets
}

fn run_frugal(
    vars: &[(String, String)],
    root: &Path,
    bin: &Path,
    steps: u64,
    warmup: u64,
) -> Result<Row> {
    let out = "target/bench/adapters/gqa-qlora-run";
    let out_dir = frugal_train(bin, vars, root, out, &frugal_sets(steps, warmup))?;
    let run = crate::report::read_train_run(&out_dir, out, warmup, warmup + steps)?;
    Ok(Row {
        step_s: run.step_s,
        baseline_rss_bytes: run.baseline_rss_bytes,
        peak_rss_bytes: run.peak_rss_bytes,
    })
}

/// The markdown table and the goals.
fn table(res: &Results) -> String {
    let mut s = String::from(
        "| | step time (s) | tokens/s | peak RSS (MiB) | peak above baseline (MiB) |\n\
         |---|---:|---:|---:|---:|\n",
    );
    for o in &res.outcomes {
        match &o.row {
            Ok(r) => s.push_str(&format!(
                "| {} | {:.2} | {:.1} | {} | {} |\n",
                o.side.label(),
                r.step_s,
                (BATCH * SEQ) as f64 / r.step_s,
                mib(r.peak_rss_bytes),
                mib(r.peak_above_baseline()),
            )),
            Err(_) => s.push_str(&format!("| {} | failed | | | |\n", o.side.label())),
        }
    }
    s.push_str("\nGoals (ours over PEFT + bitsandbytes):\n");
    s.push_str(&crate::report::at_most_lines(&res.goals()));
    s.push_str(&format!(
        "\n{} parameters in PEFT's model ({} trainable), bitsandbytes {}.\nLoad average (1 min) \
         when each side started: {}.\n",
        res.peft.0,
        res.peft.1,
        res.peft.2,
        crate::report::loads(&res.outcomes, |s| s.key().to_string())
    ));
    s
}

fn result_json(res: &Results, steps: u64, warmup: u64, machine: &Machine, date: &str) -> String {
    let side = |o: &Outcome| {
        let load = json_opt(o.load);
        match &o.row {
            Ok(r) => format!(
                "{{\"step_s\": {}, \"tokens_per_s\": {}, \"peak_rss_bytes\": {}, \
                 \"baseline_rss_bytes\": {}, \"peak_above_baseline_bytes\": {}, \
                 \"load_average\": {load}}}",
                num(r.step_s),
                num((BATCH * SEQ) as f64 / r.step_s),
                r.peak_rss_bytes,
                r.baseline_rss_bytes,
                r.peak_above_baseline()
            ),
            Err(e) => format!("{{\"error\": {}, \"load_average\": {load}}}", string(e)),
        }
    };
    let sides = res
        .outcomes
        .iter()
        .map(|o| format!("    \"{}\": {}", o.side.key(), side(o)))
        .collect::<Vec<_>>()
        .join(",\n");
    let goals = crate::report::at_most_json(&res.goals());
    format!(
        "{{\n  \"benchmark\": \"adapters-gqa\",\n  \"model\": \"llama-3.2-1b-shaped\",\n  \
         \"base\": {},\n  \"compute\": \"bf16\",\n  \"checkpointing\": true,\n  \"device\": \
         \"cpu\",\n  \"steps\": {steps},\n  \"warmup\": {warmup},\n  \"batch\": {BATCH},\n  \
         \"seq\": {SEQ},\n  \"ce_chunk\": {CE_CHUNK},\n  \"lr\": 0.0001,\n  \"adapter\": {{\"kind\": \"qlora\", \"r\": {R}, \
         \"alpha\": {ALPHA}, \"target_modules\": \"all-linear\", \"double_quant\": true}},\n  \
         \"peft\": {{\"params\": {}, \"trainable_params\": {}, \"bitsandbytes\": {}}},\n  \
         \"machine\": {{\"nproc\": {}, \"cpu\": {}}},\n  \"date\": {},\n  \"sides\": {{\n{sides}\n  \
         }},\n  \"goals\": {{\n{goals}\n  }}\n}}\n",
        string(BASE),
        res.peft.0,
        res.peft.1,
        string(&res.peft.2),
        machine.nproc,
        string(&machine.model),
        string(date),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(side: Side, step_s: f64, peak: u64) -> Outcome {
        Outcome {
            side,
            row: Ok(Row {
                step_s,
                baseline_rss_bytes: 1000,
                peak_rss_bytes: 1000 + peak,
            }),
            load: Some(0.5),
        }
    }

    /// Guarantee: the goals are our step time and our peak above the baseline over PEFT's,
    /// judged against 1.0 and 0.7; a failed side leaves both unmeasured, and the record is
    /// JSON that says so.
    #[test]
    fn goals_are_the_ratios_to_peft() {
        let res = Results {
            outcomes: vec![
                outcome(Side::Peft, 10.0, 4000),
                outcome(Side::Frugal, 8.0, 2000),
            ],
            peft: (10, 2, "0.50.2".into()),
        };
        let g = res.goals();
        assert_eq!(g[0].2, Some(0.8));
        assert_eq!(g[1].2, Some(0.5));
        let text = table(&res);
        assert!(
            text.contains("step_over_peft_bnb_at_most 1: 0.800 (met)"),
            "{text}"
        );
        assert!(text.contains("at_most 0.7: 0.500 (met)"), "{text}");
        let res = Results {
            outcomes: vec![
                Outcome {
                    side: Side::Peft,
                    row: Err("no bitsandbytes".into()),
                    load: None,
                },
                outcome(Side::Frugal, 8.0, 2000),
            ],
            peft: (0, 0, String::new()),
        };
        assert!(res.goals().iter().all(|g| g.2.is_none()));
        let line = r#"{"impl":"peft-qlora-bnb","step_s":2.5,"baseline_rss_bytes":10,"peak_rss_bytes":30,"params":7,"bitsandbytes_version":"0.50.2"}"#;
        let (row, extra) = parse_peft(&format!("noise\n{line}\n")).unwrap();
        assert_eq!((row.step_s, row.peak_above_baseline()), (2.5, 20));
        assert_eq!(extra, (7, 0, "0.50.2".to_string()));
        let machine = Machine {
            nproc: 2,
            model: "cpu".into(),
        };
        let json = result_json(&res, 2, 1, &machine, "2026-12-07");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["sides"]["peft_qlora_bnb"]["error"], "no bitsandbytes");
        assert_eq!(
            v["goals"]["step_over_peft_bnb_at_most"]["met"],
            serde_json::Value::Bool(false)
        );
    }
}
