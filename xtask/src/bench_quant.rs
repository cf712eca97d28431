//! `cargo xtask bench quant`: products straight from packed weights (NF4, int4, int8, ternary,
//! and NF4 and int4 computed in bf16) against libtorch's dense f32 and bf16 matmul and bitsandbytes' NF4 CPU kernel.
//!
//! First `scripts/bench_quant_bnb.py` times `bnb.nn.Linear4bit(in, out, quant_type="nf4")`
//! (eval, no_grad) with `$FRUGAL_PYTHON`; then the example `bench_quant` of frugal-quant
//! (release build) times our kernels and `x.matmul(w.tr())` through tch, and quantize
//! throughput. Each prints one JSON line; the result is printed as a markdown table and written
//! to `target/bench/quant.json`.
//!
//! ```text
//! cargo xtask bench quant [-- --runs 10 --warmup 2 --shapes 4096x4096,4096x11008 --batches 1,8]
//! ```

use crate::report::{find_key, json_number, utc_date, Machine};
use crate::setup::TorchEnv;
use crate::{Failure, Result};
use std::process::Command;

const SCRIPT: &str = "scripts/bench_quant_bnb.py";
const RESULT: &str = "target/bench/quant.json";
const OURS: &[&str] = &["nf4", "int4", "int8", "ternary", "nf4_bf16", "int4_bf16"];
/// The formats with a quantizer of their own (the bf16 products use NF4's and int4's).
const QUANTIZERS: &[&str] = &["nf4", "int4", "int8", "ternary"];

/// The benchmark's options.
struct Options {
    runs: u64,
    warmup: u64,
    shapes: String,
    batches: String,
}

/// Runs the benchmark.
pub fn run(env: &TorchEnv, args: &[String]) -> Result<()> {
    let opts = parse_args(args)?;
    let root = crate::root();
    std::fs::create_dir_all(root.join("target/bench"))
        .map_err(|e| Failure::new(format!("cannot create target/bench: {e}")))?;
    eprintln!("bench quant: building the example bench_quant (release)");
    let mut c = crate::cargo(env);
    c.args([
        "build",
        "--release",
        "--example",
        "bench_quant",
        "-p",
        "frugal-quant",
    ]);
    crate::status(c, "cargo build")?;

    eprintln!("bench quant: bitsandbytes NF4 ({SCRIPT})");
    let mut c = Command::new(&env.python);
    c.current_dir(&root).arg(root.join(SCRIPT)).args([
        "--shapes",
        &opts.shapes,
        "--batches",
        &opts.batches,
        "--runs",
        &opts.runs.to_string(),
        "--warmup",
        &opts.warmup.to_string(),
    ]);
    let bnb = json_line(c, "bench_quant_bnb.py").unwrap_or_else(|f| {
        eprintln!("bench quant: {}", f.message);
        format!(
            "{{\"bnb\": null, \"reason\": \"{}\"}}",
            f.message.replace('"', "'")
        )
    });

    eprintln!("bench quant: frugal kernels and libtorch dense (examples/bench_quant)");
    let mut c = Command::new(root.join("target/release/examples/bench_quant"));
    c.current_dir(&root)
        .env("BENCH_QUANT_SHAPES", &opts.shapes)
        .env("BENCH_QUANT_BATCHES", &opts.batches)
        .env("BENCH_QUANT_RUNS", opts.runs.to_string())
        .env("BENCH_QUANT_WARMUP", opts.warmup.to_string());
    for (k, v) in env.vars() {
        c.env(k, v);
    }
    let ours = json_line(c, "bench_quant example")?;

    let date = utc_date();
    let cpu = Machine::detect().model.replace('"', "'");
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let json = format!(
        "{{\"date\": \"{date}\", \"cpu\": \"{cpu}\", \"nproc\": {nproc}, \"frugal\": {ours}, \
         \"bitsandbytes\": {bnb}}}\n"
    );
    std::fs::write(root.join(RESULT), json)
        .map_err(|e| Failure::new(format!("cannot write {RESULT}: {e}")))?;
    println!(
        "Y = X Wᵀ on the CPU ({nproc} x {cpu}), median of {} runs after {} warmup, {date}; \
         times in ms, ratios = other / ours (higher is better for us)\n",
        opts.runs, opts.warmup
    );
    print!("{}", table(&opts, &ours, &bnb));
    println!();
    print!("{}", quantize_table(&ours));
    eprintln!("bench quant: wrote {RESULT}");
    Ok(())
}

/// The markdown table of products: per shape and batch, one row per format.
fn table(opts: &Options, ours: &str, bnb: &str) -> String {
    let ms = |v: Option<f64>| v.map_or("-".into(), |s| format!("{:.3}", s * 1e3));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    };
    let mut t = String::from(
        "| weight (out x in) | batch | kernel | ms | bf16 / ours | f32 / ours | bnb nf4 / ours |\n\
         |---|---:|---|---:|---:|---:|---:|\n",
    );
    for shape in opts.shapes.split(',') {
        for batch in opts.batches.split(',') {
            let key = |name: &str| format!("{shape} b{batch} {name}");
            let f32_ = json_number(ours, &key("torch_f32"));
            let bf16 = json_number(ours, &key("torch_bf16"));
            // bitsandbytes: the faster of its f32 and bf16 activations.
            let bnb_t = [
                json_number(bnb, &key("f32")),
                json_number(bnb, &key("bf16")),
            ]
            .into_iter()
            .flatten()
            .reduce(f64::min);
            for name in OURS {
                let v = json_number(ours, &key(name));
                t += &format!(
                    "| {shape} | {batch} | {name} | {} | {} | {} | {} |\n",
                    ms(v),
                    ratio(bf16, v),
                    ratio(f32_, v),
                    ratio(bnb_t, v)
                );
            }
            for (name, v) in [
                ("torch f32", f32_),
                ("torch bf16", bf16),
                ("bnb nf4", bnb_t),
            ] {
                t += &format!("| {shape} | {batch} | {name} | {} | | | |\n", ms(v));
            }
        }
    }
    t
}

/// The markdown table of quantize throughput.
fn quantize_table(ours: &str) -> String {
    let mut t = String::from("| quantize | GB/s of f32 input |\n|---|---:|\n");
    let scoped = find_key(ours, "quantize_gbps").map_or(ours, |(_, after)| &ours[after..]);
    for name in QUANTIZERS {
        let v = json_number(scoped, name).map_or("-".into(), |v| format!("{v:.2}"));
        t += &format!("| {name} | {v} |\n");
    }
    t
}

fn parse_args(args: &[String]) -> Result<Options> {
    let mut opts = Options {
        runs: 10,
        warmup: 2,
        shapes: "4096x4096,4096x11008".into(),
        batches: "1,8".into(),
    };
    let usage = "usage: cargo xtask bench quant [-- --runs N --warmup W --shapes OUTxIN,... \
                 --batches B,...]";
    let known = ["--runs", "--warmup", "--shapes", "--batches"];
    for (name, value) in crate::report::named_args("quant", usage, args, &known, &[])? {
        match name.as_str() {
            "--runs" => opts.runs = crate::report::whole_arg("quant", &name, &value, 1)?,
            "--warmup" => opts.warmup = crate::report::whole_arg("quant", &name, &value, 0)?,
            "--shapes" => opts.shapes = value,
            _ => opts.batches = value,
        }
    }
    let shape_ok = |s: &str| {
        s.split_once('x')
            .is_some_and(|(a, b)| a.parse::<u64>().is_ok() && b.parse::<u64>().is_ok())
    };
    if !opts.shapes.split(',').all(shape_ok) {
        return Err(Failure::new(format!(
            "bench quant: --shapes wants OUTxIN,..., got '{}'",
            opts.shapes
        )));
    }
    if !opts
        .batches
        .split(',')
        .all(|b| b.parse::<u64>().is_ok_and(|b| b >= 1))
    {
        return Err(Failure::new(format!(
            "bench quant: --batches wants whole numbers >= 1, got '{}'",
            opts.batches
        )));
    }
    Ok(opts)
}

/// Runs `c` and returns the last line of its stdout that starts with `{`.
fn json_line(mut c: Command, what: &str) -> Result<String> {
    let out = c
        .output()
        .map_err(|e| Failure::new(format!("could not start {what}: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(Failure::new(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .map(|l| l.trim().to_string())
        .ok_or_else(|| Failure::new(format!("{what} printed no JSON line")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Numbers are found by key, a table row per kernel carries the ratios, and a missing
    /// bitsandbytes result shows as "-".
    #[test]
    fn table_from_json() {
        let ours = concat!(
            r#"{"time_s":{"8x16 b1 nf4":0.001,"8x16 b1 int4":0.002,"8x16 b1 int8":0.0005,"#,
            r#""8x16 b1 ternary":0.00025,"8x16 b1 nf4_bf16":0.0005,"#,
            r#""8x16 b1 torch_f32":0.004,"8x16 b1 torch_bf16":0.002},"#,
            r#""quantize_gbps":{"nf4":1.5}}"#
        );
        let bnb = r#"{"bnb": {"8x16 b1 f32": 0.003, "8x16 b1 bf16": 0.002}}"#;
        let opts = Options {
            runs: 1,
            warmup: 0,
            shapes: "8x16".into(),
            batches: "1".into(),
        };
        let t = table(&opts, ours, bnb);
        assert!(
            t.contains("| 8x16 | 1 | nf4 | 1.000 | 2.00x | 4.00x | 2.00x |"),
            "{t}"
        );
        assert!(t.contains("| 8x16 | 1 | bnb nf4 | 2.000 |"), "{t}");
        assert!(
            t.contains("| 8x16 | 1 | nf4_bf16 | 0.500 | 4.00x | 8.00x | 4.00x |"),
            "{t}"
        );
        assert!(
            t.contains("| 8x16 | 1 | int4_bf16 | - | - | - | - |"),
            "{t}"
        );
        let t = table(&opts, ours, r#"{"bnb": null}"#);
        assert!(
            t.contains("| 8x16 | 1 | nf4 | 1.000 | 2.00x | 4.00x | - |"),
            "{t}"
        );
        let q = quantize_table(ours);
        assert!(
            q.contains("| nf4 | 1.50 |") && q.contains("| int8 | - |") && !q.contains("bf16"),
            "{q}"
        );
        assert!(parse_args(&["--shapes".into(), "4x".into()]).is_err());
        assert!(parse_args(&["--runs=3".into()]).is_ok_and(|o| o.runs == 3));
    }
}
