//! `cargo xtask bench adapters`: fine-tuning the LLaMA 130M with our adapters against PEFT LoRA.
//!
//! One random LLaMA 130M base (hidden 768, intermediate 2048, 12 layers, 12 heads, vocabulary
//! 32000, max positions 1024), made once by `scripts/bench_adapters_peft.py --make-base` in
//! `target/bench/adapters/base` (a transformers `LlamaForCausalLM`, one `model.safetensors`), is
//! fine-tuned at sequence 256, batch 4, f32, on the CPU, with AdamW at lr 1e-4, each side in a
//! fresh child process: PEFT LoRA (`scripts/bench_adapters_peft.py`: r 8, alpha 16 on
//! q/k/v/o/gate/up/down, random tokens), then `frugal train` with `model.from_pretrained` on the
//! base (default corpus) four times: full fine-tuning (`adapter.kind = "none"`), LoRA, QLoRA
//! (frozen NF4 base, double quantization, block 64) and QA-LoRA (frozen int4 base, group 64),
//! the adapters with r 8, alpha 16 on all linear layers. The first `--warmup` steps are not
//! timed; the next `--steps` are. The result is printed as a markdown table (stdout), with the
//! frozen bases' bytes and the goals, and written to `target/bench/adapters.json`. Then it runs
//! the grouped-query QLoRA comparison against PEFT + bitsandbytes on a Llama-3.2-1B-shaped
//! model ([`crate::bench_adapters_gqa`], also `cargo xtask bench adapters-gqa` alone).
//!
//! ```text
//! cargo xtask bench adapters [-- --steps 5 --warmup 2]
//! ```

use crate::report::{
    frugal_train, json_num as num, json_number, json_opt, json_str as string, last_json_line,
    load_average, mib, python_json, utc_date, Machine,
};
use crate::setup::TorchEnv;
use crate::{Failure, Result};
use frugal_records::FrozenBase;
use std::path::Path;

const BATCH: u64 = 4;
const SEQ: u64 = 256;
const R: u64 = 8;
const ALPHA: u64 = 16;
const GROUP: u64 = 64;
const SCRIPT: &str = "scripts/bench_adapters_peft.py";
const BASE: &str = "target/bench/adapters/base";
const RESULT: &str = "target/bench/adapters.json";

/// Goal: QLoRA's step time over our LoRA's, at most.
const GOAL_QLORA_OVER_LORA: f64 = 1.3;
/// Goal: bytes per parameter of QLoRA's NF4 matrices (double quantization included), at most.
const GOAL_NF4_BYTES_PER_PARAM: f64 = 0.52;
/// Goal: our LoRA's step time over PEFT LoRA's, at most.
const GOAL_LORA_OVER_PEFT: f64 = 1.0;

/// The benchmark's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Options {
    steps: u64,
    warmup: u64,
}

/// The five sides, in the table's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Full,
    Lora,
    Qlora,
    Qalora,
    Peft,
}

const SIDES: [Side; 5] = [
    Side::Full,
    Side::Lora,
    Side::Qlora,
    Side::Qalora,
    Side::Peft,
];

impl Side {
    /// The key in the JSON and the run folder's name.
    fn key(self) -> &'static str {
        match self {
            Side::Full => "full",
            Side::Lora => "lora",
            Side::Qlora => "qlora",
            Side::Qalora => "qalora",
            Side::Peft => "peft_lora",
        }
    }

    /// The row's name in the table.
    fn label(self) -> &'static str {
        match self {
            Side::Full => "full fine-tuning",
            Side::Lora => "LoRA",
            Side::Qlora => "QLoRA (NF4 base)",
            Side::Qalora => "QA-LoRA (int4 base)",
            Side::Peft => "PEFT LoRA",
        }
    }

    /// `adapter.kind` of a `frugal train` side; None for PEFT.
    fn adapter_kind(self) -> Option<&'static str> {
        match self {
            Side::Full => Some("none"),
            Side::Lora => Some("lora"),
            Side::Qlora => Some("qlora"),
            Side::Qalora => Some("qalora"),
            Side::Peft => None,
        }
    }
}

/// One side's measurements.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    step_s: f64,
    baseline_rss_bytes: u64,
    peak_rss_bytes: u64,
    /// Adapter runs of our trainer: what the frozen base holds (`memory.json`'s `frozen_base`).
    frozen: Option<FrozenBase>,
}

impl Row {
    fn tokens_per_s(&self) -> f64 {
        (BATCH * SEQ) as f64 / self.step_s
    }

    fn peak_above_baseline(&self) -> u64 {
        self.peak_rss_bytes.saturating_sub(self.baseline_rss_bytes)
    }
}

/// What the PEFT script reports beyond its row.
#[derive(Debug, Clone, PartialEq, Default)]
struct PeftExtra {
    params: u64,
    trainable_params: u64,
    threads: u64,
}

/// One side's outcome: its row or why it has none, and the load when it started.
type Outcome = crate::report::Outcome<Side, Row>;

/// All five outcomes (in [`SIDES`] order) and the PEFT extras.
struct Results {
    outcomes: Vec<Outcome>,
    peft: PeftExtra,
}

impl Results {
    fn row(&self, side: Side) -> Option<&Row> {
        crate::report::row_of(&self.outcomes, side)
    }

    /// `a`'s step time over `b`'s, when both were measured.
    fn step_ratio(&self, a: Side, b: Side) -> Option<f64> {
        Some(self.row(a)?.step_s / self.row(b)?.step_s)
    }

    fn nf4_bytes_per_param(&self) -> Option<f64> {
        let f = self.row(Side::Qlora)?.frozen.as_ref()?;
        (f.quantized_params > 0).then_some(f.quantized_bytes_per_param)
    }

    /// `(key, goal, measured)` of the three goals.
    fn goals(&self) -> [crate::report::AtMost; 3] {
        [
            (
                "qlora_step_over_lora_at_most",
                GOAL_QLORA_OVER_LORA,
                self.step_ratio(Side::Qlora, Side::Lora),
            ),
            (
                "nf4_bytes_per_param_at_most",
                GOAL_NF4_BYTES_PER_PARAM,
                self.nf4_bytes_per_param(),
            ),
            (
                "lora_step_over_peft_lora_at_most",
                GOAL_LORA_OVER_PEFT,
                self.step_ratio(Side::Lora, Side::Peft),
            ),
        ]
    }

    fn failures(&self) -> Vec<(Side, &str)> {
        crate::report::failures(&self.outcomes)
    }
}

/// Runs the benchmark.
pub fn run(env: &TorchEnv, args: &[String]) -> Result<()> {
    let opts = parse_args(args)?;
    let root = crate::root();
    std::fs::create_dir_all(root.join("target/bench/adapters"))
        .map_err(|e| Failure::new(format!("cannot create target/bench/adapters: {e}")))?;

    // Build first, so that the compiler does not share the CPU with any timed run.
    eprintln!("bench adapters: building frugal (release)");
    let frugal_bin = crate::build_frugal(env);

    eprintln!("bench adapters: the LLaMA 130M base in {BASE}");
    python_json(
        &env.python,
        &env.vars(),
        &root,
        SCRIPT,
        &["--make-base".to_string(), BASE.to_string()],
    )
    .map_err(|f| {
        Failure::new(format!(
            "could not make the base model in {BASE} ({}); nothing was measured",
            f.message
        ))
    })?;

    let mut outcomes = Vec::new();
    let mut peft = PeftExtra::default();
    for side in SIDES {
        eprintln!(
            "bench adapters: {}, {} timed steps after {} warmup steps",
            side.label(),
            opts.steps,
            opts.warmup
        );
        let load = load_average();
        let row = match side.adapter_kind() {
            None => run_peft(&env.python, &env.vars(), &root, opts).map(|(row, extra)| {
                peft = extra;
                row
            }),
            Some(_) => match &frugal_bin {
                Ok(bin) => run_frugal(&env.vars(), &root, bin, opts, side),
                Err(f) => Err(Failure::new(format!("frugal was not built: {}", f.message))),
            },
        };
        if let Err(f) = &row {
            eprintln!("bench adapters: {} failed: {}", side.label(), f.message);
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
        "LLaMA 130M fine-tuning, seq {SEQ}, batch {BATCH}, f32, CPU: {} x {}, {} timed steps \
         after {} warmup, {date}\n",
        machine.nproc, machine.model, opts.steps, opts.warmup
    );
    print!("{}", table(opts, &results));

    let json = result_json(opts, &results, &machine, &date);
    std::fs::write(root.join(RESULT), json)
        .map_err(|e| Failure::new(format!("cannot write {RESULT}: {e}")))?;
    eprintln!("bench adapters: wrote {RESULT}");

    let failed: Vec<(String, String)> = results
        .failures()
        .iter()
        .map(|(s, e)| (s.label().to_string(), e.to_string()))
        .collect();
    let small = crate::report::sides_failed(RESULT, &failed);
    // Then the grouped-query QLoRA comparison at its own default steps.
    eprintln!("bench adapters: the grouped-query QLoRA comparison (bench adapters-gqa)");
    let gqa = crate::bench_adapters_gqa::run(env, &[]);
    small.and(gqa)
}

fn parse_args(args: &[String]) -> Result<Options> {
    // Two warmup steps: the first steps of full fine-tuning take several times the settled
    // step (the allocator growing to AdamW's state).
    let (steps, warmup) = crate::report::parse_steps_warmup("adapters", args, (5, 2))?;
    Ok(Options { steps, warmup })
}

fn run_peft(
    python: &Path,
    vars: &[(String, String)],
    root: &Path,
    opts: Options,
) -> Result<(Row, PeftExtra)> {
    let args: Vec<String> = [
        "--steps",
        &opts.steps.to_string(),
        "--warmup",
        &opts.warmup.to_string(),
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

/// The row and extras from the script's stdout: its last line that is a JSON object.
fn parse_peft(stdout: &str) -> Option<(Row, PeftExtra)> {
    let line = last_json_line(stdout)?;
    let row = Row {
        step_s: json_number(line, "step_s")?,
        baseline_rss_bytes: json_number(line, "baseline_rss_bytes")? as u64,
        peak_rss_bytes: json_number(line, "peak_rss_bytes")? as u64,
        frozen: None,
    };
    let extra = PeftExtra {
        params: json_number(line, "params").unwrap_or(0.0) as u64,
        trainable_params: json_number(line, "trainable_params").unwrap_or(0.0) as u64,
        threads: json_number(line, "torch_threads").unwrap_or(0.0) as u64,
    };
    (row.step_s > 0.0).then_some((row, extra))
}

/// The `--set` values of one `frugal train` side.
fn frugal_sets(opts: Options, side: Side) -> Vec<String> {
    let kind = side.adapter_kind().unwrap_or("none");
    let mut sets = vec![format!("model.from_pretrained=\"{BASE}\"")];
    sets.extend(crate::report::timing_sets(
        SEQ,
        BATCH,
        opts.warmup + opts.steps,
    ));
    sets.extend(["train.lr=0.0001".into(), format!("adapter.kind=\"{kind}\"")]);
    if kind != "none" {
        sets.extend([
            format!("adapter.r={R}"),
            format!("adapter.alpha={ALPHA}.0"),
            "adapter.target_modules=\"all-linear\"".into(),
        ]);
    }
    if side == Side::Qalora {
        sets.push(format!("adapter.group_size={GROUP}"));
    }
    sets
}

fn run_frugal(
    vars: &[(String, String)],
    root: &Path,
    bin: &Path,
    opts: Options,
    side: Side,
) -> Result<Row> {
    let total = opts.warmup + opts.steps;
    let out = format!("target/bench/adapters/{}-run", side.key());
    let out_dir = frugal_train(bin, vars, root, &out, &frugal_sets(opts, side))?;

    let run = crate::report::read_train_run(&out_dir, &out, opts.warmup, total)?;
    let frozen = run.memory.frozen_base;
    if side != Side::Full && frozen.is_none() {
        eprintln!("bench adapters: {out}/memory.json has no frozen_base");
    }
    Ok(Row {
        step_s: run.step_s,
        baseline_rss_bytes: run.baseline_rss_bytes,
        peak_rss_bytes: run.peak_rss_bytes,
        frozen,
    })
}

/// A ratio for the table, empty when a side is missing.
fn ratio_cell(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}x")).unwrap_or_default()
}

/// Bytes as MiB with one decimal, for the frozen-base lines.
fn mib1(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The markdown table, then the frozen bases, the goals and the load averages.
fn table(opts: Options, res: &Results) -> String {
    let mut s = String::from(
        "| | step time (s) | tokens/s | peak RSS (MiB) | peak above baseline (MiB) | \
         step / our LoRA's | step / full FT's |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for o in &res.outcomes {
        match &o.row {
            Ok(r) => s.push_str(&format!(
                "| {} | {:.3} | {:.0} | {} | {} | {} | {} |\n",
                o.side.label(),
                r.step_s,
                r.tokens_per_s(),
                mib(r.peak_rss_bytes),
                mib(r.peak_above_baseline()),
                ratio_cell(res.step_ratio(o.side, Side::Lora)),
                ratio_cell(res.step_ratio(o.side, Side::Full)),
            )),
            Err(_) => s.push_str(&format!("| {} | failed | | | | | |\n", o.side.label())),
        }
    }
    s.push('\n');
    for (side, what) in [
        (Side::Lora, "dense f32"),
        (Side::Qlora, "NF4"),
        (Side::Qalora, "int4"),
    ] {
        let Some(f) = res.row(side).and_then(|r| r.frozen.as_ref()) else {
            continue;
        };
        if f.quantized_params > 0 {
            s.push_str(&format!(
                "{} frozen base: {what} matrices {:.4} bytes/parameter ({} for {} parameters); \
                 whole base {} ({} other: {} parameters).\n",
                side.label(),
                f.quantized_bytes_per_param,
                mib1(f.quantized_bytes),
                f.quantized_params,
                mib1(f.total_bytes),
                mib1(f.other_bytes),
                f.other_params,
            ));
        } else {
            s.push_str(&format!(
                "{} frozen base: whole base {} ({what}, {} parameters).\n",
                side.label(),
                mib1(f.total_bytes),
                f.other_params,
            ));
        }
    }
    s.push_str("\nGoals:\n");
    s.push_str(&crate::report::at_most_lines(&res.goals()));
    s.push_str(&format!(
        "\n{} parameters in PEFT's model ({} trainable); {} timed steps after {} warmup; PyTorch \
         on {} threads.\nLoad average (1 min) when each side started: {}.\n",
        res.peft.params,
        res.peft.trainable_params,
        opts.steps,
        opts.warmup,
        res.peft.threads,
        crate::report::loads(&res.outcomes, |s| s.key().to_string())
    ));
    s
}

fn frozen_json(f: &FrozenBase) -> String {
    format!(
        "{{\"quantized_bytes\": {}, \"quantized_params\": {}, \"quantized_bytes_per_param\": {}, \
         \"other_bytes\": {}, \"other_params\": {}, \"total_bytes\": {}}}",
        f.quantized_bytes,
        f.quantized_params,
        num(f.quantized_bytes_per_param),
        f.other_bytes,
        f.other_params,
        f.total_bytes
    )
}

fn outcome_json(o: &Outcome, res: &Results) -> String {
    let load = json_opt(o.load);
    match &o.row {
        Ok(r) => format!(
            "{{\"tokens_per_s\": {}, \"step_s\": {}, \"peak_rss_bytes\": {}, \
             \"baseline_rss_bytes\": {}, \"peak_above_baseline_bytes\": {}, \
             \"step_over_lora\": {}, \"step_over_full\": {}, \"frozen_base\": {}, \
             \"load_average\": {load}}}",
            num(r.tokens_per_s()),
            num(r.step_s),
            r.peak_rss_bytes,
            r.baseline_rss_bytes,
            r.peak_above_baseline(),
            json_opt(res.step_ratio(o.side, Side::Lora)),
            json_opt(res.step_ratio(o.side, Side::Full)),
            r.frozen.as_ref().map_or_else(|| "null".into(), frozen_json),
        ),
        Err(e) => format!("{{\"error\": {}, \"load_average\": {load}}}", string(e)),
    }
}

fn result_json(opts: Options, res: &Results, machine: &Machine, date: &str) -> String {
    let sides = res
        .outcomes
        .iter()
        .map(|o| format!("    \"{}\": {}", o.side.key(), outcome_json(o, res)))
        .collect::<Vec<_>>()
        .join(",\n");
    let goals = crate::report::at_most_json(&res.goals());
    let all_met = res
        .goals()
        .iter()
        .all(|(_, g, m)| m.is_some_and(|m| m <= *g));
    format!(
        "{{\n  \"benchmark\": \"adapters\",\n  \"model\": \"llama-130m\",\n  \"base\": {},\n  \
         \"dtype\": \"f32\",\n  \"device\": \"cpu\",\n  \"steps\": {},\n  \"warmup\": {},\n  \
         \"batch\": {BATCH},\n  \"seq\": {SEQ},\n  \"lr\": 0.0001,\n  \"adapter\": {{\"r\": {R}, \
         \"alpha\": {ALPHA}, \"target_modules\": \"all-linear\", \"qalora_group_size\": {GROUP}, \
         \"qlora_block_size\": {GROUP}}},\n  \"peft\": {{\"params\": {}, \"trainable_params\": \
         {}}},\n  \"machine\": {{\"nproc\": {}, \"cpu\": {}, \"torch_threads\": {}}},\n  \
         \"date\": {},\n  \"sides\": {{\n{sides}\n  }},\n  \"ratios\": {{\"qlora_step_over_lora\": \
         {}, \"qalora_step_over_lora\": {}, \"lora_step_over_peft_lora\": {}, \
         \"lora_step_over_full\": {}, \"nf4_bytes_per_param\": {}}},\n  \"goals\": {{\n{goals},\n    \
         \"all_met\": {all_met}\n  }}\n}}\n",
        string(BASE),
        opts.steps,
        opts.warmup,
        res.peft.params,
        res.peft.trainable_params,
        machine.nproc,
        string(&machine.model),
        res.peft.threads,
        string(date),
        json_opt(res.step_ratio(Side::Qlora, Side::Lora)),
        json_opt(res.step_ratio(Side::Qalora, Side::Lora)),
        json_opt(res.step_ratio(Side::Lora, Side::Peft)),
        json_opt(res.step_ratio(Side::Lora, Side::Full)),
        json_opt(res.nf4_bytes_per_param()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::fixtures::{jsonl, line, memory, memory_json};
    use crate::report::json_object;

    fn row(step_s: f64, frozen: Option<FrozenBase>) -> Row {
        Row {
            step_s,
            baseline_rss_bytes: 100 << 20,
            peak_rss_bytes: 300 << 20,
            frozen,
        }
    }

    fn nf4() -> FrozenBase {
        FrozenBase {
            quantized_bytes: 1032,
            quantized_params: 2000,
            quantized_bytes_per_param: 0.516,
            other_bytes: 4 << 20,
            other_params: 1 << 20,
            total_bytes: 1032 + (4 << 20),
        }
    }

    fn results(qlora: std::result::Result<Row, String>) -> Results {
        let rows = [
            Ok(row(4.0, None)),
            Ok(row(2.0, None)),
            qlora,
            Ok(row(3.0, None)),
            Ok(row(2.5, None)),
        ];
        Results {
            outcomes: SIDES
                .iter()
                .zip(rows)
                .map(|(&side, row)| Outcome {
                    side,
                    row,
                    load: Some(1.5),
                })
                .collect(),
            peft: PeftExtra {
                params: 135506688,
                trainable_params: 1400832,
                threads: 2,
            },
        }
    }

    #[test]
    fn args() {
        let a = |v: &[&str]| parse_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            a(&[]).ok(),
            Some(Options {
                steps: 5,
                warmup: 2
            })
        );
        assert_eq!(
            a(&["--steps", "5", "--warmup=0"]).ok(),
            Some(Options {
                steps: 5,
                warmup: 0
            })
        );
        assert!(a(&["--steps", "0"]).is_err());
        assert!(a(&["--warmup"]).is_err());
        assert!(a(&["--r", "4"]).is_err());
    }

    #[test]
    fn peft_line() {
        let out = "noise\n{\"impl\":\"peft-lora\",\"params\":135506688,\"trainable_params\":\
                   1400832,\"step_s\":2.0,\"tokens_per_s\":512.0,\"baseline_rss_bytes\":\
                   732585984,\"peak_rss_bytes\":3515072512,\"torch_threads\":2}\n";
        let (row, extra) = parse_peft(out).unwrap();
        assert_eq!(row.step_s, 2.0);
        assert_eq!(row.tokens_per_s(), 512.0);
        assert_eq!(row.peak_above_baseline(), 3515072512 - 732585984);
        assert_eq!(
            extra,
            PeftExtra {
                params: 135506688,
                trainable_params: 1400832,
                threads: 2
            }
        );
        assert!(parse_peft("no json\n").is_none());
    }

    #[test]
    fn sets_per_side() {
        let opts = Options {
            steps: 3,
            warmup: 1,
        };
        let full = frugal_sets(opts, Side::Full);
        assert!(full.contains(&"adapter.kind=\"none\"".to_string()));
        assert!(full.contains(&"train.max_steps=4".to_string()));
        assert!(full.contains(&format!("model.from_pretrained=\"{BASE}\"")));
        assert!(!full.iter().any(|s| s.starts_with("adapter.r=")));
        let qalora = frugal_sets(opts, Side::Qalora);
        for s in [
            "adapter.kind=\"qalora\"",
            "adapter.r=8",
            "adapter.alpha=16.0",
            "adapter.target_modules=\"all-linear\"",
            "adapter.group_size=64",
        ] {
            assert!(qalora.contains(&s.to_string()), "{s}: {qalora:?}");
        }
        let qlora = frugal_sets(opts, Side::Qlora);
        assert!(qlora.contains(&"adapter.kind=\"qlora\"".to_string()));
        assert!(!qlora.iter().any(|s| s.starts_with("adapter.group_size")));
    }

    #[test]
    fn table_and_json() {
        let res = results(Ok(row(2.4, Some(nf4()))));
        let opts = Options {
            steps: 3,
            warmup: 1,
        };
        let t = table(opts, &res);
        assert!(
            t.contains("| full fine-tuning | 4.000 | 256 | 300 | 200 | 2.00x | 1.00x |"),
            "{t}"
        );
        assert!(
            t.contains("| QLoRA (NF4 base) | 2.400 | 427 | 300 | 200 | 1.20x | 0.60x |"),
            "{t}"
        );
        assert!(t.contains("NF4 matrices 0.5160 bytes/parameter"), "{t}");
        assert!(
            t.contains("- qlora_step_over_lora_at_most 1.3: 1.200 (met)"),
            "{t}"
        );
        assert!(
            t.contains("- lora_step_over_peft_lora_at_most 1: 0.800 (met)"),
            "{t}"
        );
        let machine = Machine {
            nproc: 2,
            model: "Test CPU".into(),
        };
        let j = result_json(opts, &res, &machine, "2025-01-01T00:00:00Z");
        let goals = json_object(&j, "goals").unwrap();
        let qlora = json_object(goals, "qlora_step_over_lora_at_most").unwrap();
        assert_eq!(json_number(qlora, "goal"), Some(1.3));
        assert_eq!(json_number(qlora, "measured"), Some(1.2));
        assert!(qlora.contains("\"met\": true"));
        let nf4_goal = json_object(goals, "nf4_bytes_per_param_at_most").unwrap();
        assert_eq!(json_number(nf4_goal, "measured"), Some(0.516));
        assert!(goals.contains("\"all_met\": true"));
        let sides = json_object(&j, "sides").unwrap();
        let q = json_object(sides, "qlora").unwrap();
        assert_eq!(json_number(q, "step_over_full"), Some(0.6));
        assert_eq!(
            json_number(json_object(q, "frozen_base").unwrap(), "total_bytes"),
            Some((1032 + (4 << 20)) as f64)
        );
        assert_eq!(json_number(&j, "lora_step_over_peft_lora"), Some(0.8));
        assert!(j.contains("\"load_average\": 1.5"));
    }

    #[test]
    fn failed_side_is_reported() {
        let res = results(Err("frugal train failed (exit status: 1)".into()));
        let t = table(
            Options {
                steps: 3,
                warmup: 1,
            },
            &res,
        );
        assert!(t.contains("| QLoRA (NF4 base) | failed | | | | | |"), "{t}");
        assert!(t.contains("- qlora_step_over_lora_at_most 1.3: not measured (not met)"));
        assert_eq!(res.failures().len(), 1);
        assert_eq!(res.failures()[0].0, Side::Qlora);
        let machine = Machine {
            nproc: 2,
            model: "Test CPU".into(),
        };
        let j = result_json(
            Options {
                steps: 3,
                warmup: 1,
            },
            &res,
            &machine,
            "d",
        );
        let q = json_object(json_object(&j, "sides").unwrap(), "qlora").unwrap();
        assert!(q.contains("\"error\": \"frugal train failed"), "{q}");
        let goals = json_object(&j, "goals").unwrap();
        let g = json_object(goals, "qlora_step_over_lora_at_most").unwrap();
        assert!(g.contains("\"measured\": null") && g.contains("\"met\": false"));
        assert!(goals.contains("\"all_met\": false"));
    }

    /// `run_frugal` end to end, with a shell script standing in for the `frugal` binary.
    #[cfg(unix)]
    #[test]
    fn frugal_child_process() {
        use std::os::unix::fs::PermissionsExt;
        let root =
            std::env::temp_dir().join(format!("xtask-bench-adapters-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let bin = root.join("fake-frugal");
        // Checks its argv, then writes what the real trainer writes into --out.
        let script = r#"#!/bin/sh
[ "$1 $2 $3" = "train --config configs/default.toml" ] || exit 3
case "$*" in *'--set adapter.kind="qlora" '*'--set adapter.target_modules="all-linear"'*) ;; *) exit 4 ;; esac
while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
mkdir -p "$out"
printf '%s' 'METRICS' > "$out/metrics.jsonl"
printf '%s' 'MEMORY' > "$out/memory.json"
"#;
        let lines = [line(1, 10.0, 5.0), line(2, 9.0, 1.5), line(3, 8.0, 2.5)];
        let mut report = memory(10, 30, 4194304);
        report.frozen_base = Some(nf4());
        let script = script
            .replace("METRICS", &jsonl(&lines))
            .replace("MEMORY", &memory_json(&report));
        std::fs::write(&bin, script).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let opts = Options {
            steps: 2,
            warmup: 1,
        };
        let row = run_frugal(&[], &root, &bin, opts, Side::Qlora)
            .map_err(|f| f.message)
            .unwrap();
        assert_eq!(row.step_s, 2.0);
        assert_eq!(row.peak_above_baseline(), 20);
        assert_eq!(row.frozen, Some(nf4()));
        assert!(root.join("target/bench/adapters/qlora-run").is_dir());
        // The script insists on qlora: another side fails, with the trainer named.
        let err = run_frugal(&[], &root, &bin, opts, Side::Lora)
            .err()
            .unwrap();
        assert!(
            err.message.contains("frugal train failed"),
            "{}",
            err.message
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
