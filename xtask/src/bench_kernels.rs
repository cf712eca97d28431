//! `cargo xtask bench kernels`: Frugal's CUDA kernels against libtorch on the same GPU (the
//! example `bench_kernels` of frugal-kernels), and a training step replayed as a CUDA graph
//! against the eager step (the example `bench_graph_step` of frugal-train), both release
//! builds, written to `target/bench/kernels.json` and printed as tables with the issue's goals.
//!
//! ```text
//! cargo xtask bench kernels [-- --runs 11 --iters 50]
//! ```
//!
//! Without a GPU the examples say so; the command then writes that to the JSON and succeeds.

use crate::report::{json_number, utc_date};
use crate::setup::TorchEnv;
use crate::{Failure, Result};
use std::process::Command;

const RESULT: &str = "target/bench/kernels.json";
const SHAPES: &[&str] = &["4096x4096", "11008x4096", "4096x11008"];

/// Runs the benchmark.
pub fn run(env: &TorchEnv, args: &[String]) -> Result<()> {
    let (mut runs, mut iters) = (11, 50);
    let usage = "usage: cargo xtask bench kernels [-- --runs N --iters N]";
    let known = ["--runs", "--iters"];
    for (name, value) in crate::report::named_args("kernels", usage, args, &known, &[])? {
        let n = crate::report::whole_arg("kernels", &name, &value, 1)?;
        if name == "--runs" {
            runs = n;
        } else {
            iters = n;
        }
    }
    let (runs, iters) = (runs.to_string(), iters.to_string());
    let root = crate::root();
    std::fs::create_dir_all(root.join("target/bench"))
        .map_err(|e| Failure::new(format!("cannot create target/bench: {e}")))?;
    let line = example(env, &runs, &iters, "frugal-kernels", "bench_kernels")?;
    let graph = example(env, &runs, &iters, "frugal-train", "bench_graph_step")?;
    let date = utc_date();
    std::fs::write(
        root.join(RESULT),
        format!("{{\"date\": \"{date}\", \"result\": {line}, \"graph_step\": {graph}}}\n"),
    )
    .map_err(|e| Failure::new(format!("cannot write {RESULT}: {e}")))?;
    print!("{}", report(&line, &graph, &date));
    eprintln!("bench kernels: wrote {RESULT}");
    Ok(())
}

/// Builds (release) and runs the example `name` of `package`; returns its last JSON line.
fn example(env: &TorchEnv, runs: &str, iters: &str, package: &str, name: &str) -> Result<String> {
    let root = crate::root();
    eprintln!("bench kernels: building the example {name} (release)");
    let mut c = crate::cargo(env);
    c.args(["build", "--release", "--example", name, "-p", package]);
    crate::status(c, "cargo build")?;
    let mut c = Command::new(root.join("target/release/examples").join(name));
    c.current_dir(&root)
        .env("BENCH_KERNELS_RUNS", runs)
        .env("BENCH_KERNELS_ITERS", iters);
    for (k, v) in env.vars() {
        c.env(k, v);
    }
    let out = c
        .output()
        .map_err(|e| Failure::new(format!("could not start {name}: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(crate::report::last_json_line(&stdout)
        .ok_or_else(|| {
            Failure::new(format!(
                "{name} printed no JSON line ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        })?
        .to_string())
}

/// The markdown report of the two examples' JSON lines (kernels, graph-replayed steps).
fn report(line: &str, graph: &str, date: &str) -> String {
    if line.contains("\"skipped\"") {
        return format!("bench kernels, {date}: not measured: {line}\n");
    }
    let device = crate::report::find_key(line, "device")
        .and_then(|(_, value)| line[value..].trim_start().strip_prefix('"'))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or("a CUDA GPU")
        .to_string();
    let num = |key: &str| json_number(line, key);
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
    let x = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}x"));
    let mut t = format!(
        "Kernels on {device}, {date}: batch-1 products from packed weights against cuBLAS bf16, \
         and the 8-bit AdamW step against libtorch's fused AdamW (f32 state)\n\n\
         | weight (out x in) | bf16 ms | ternary ms | NF4 ms | bf16 / ternary | bf16 / NF4 |\n\
         |---|---:|---:|---:|---:|---:|\n"
    );
    let (mut worst_ternary, mut worst_nf4) = (f64::INFINITY, f64::INFINITY);
    for shape in SHAPES {
        let key = |k: &str| num(&format!("{shape} {k}"));
        let (rt, rn) = (key("bf16_over_ternary"), key("bf16_over_nf4"));
        worst_ternary = worst_ternary.min(rt.unwrap_or(0.0));
        worst_nf4 = worst_nf4.min(rn.unwrap_or(0.0));
        t += &format!(
            "| {shape} | {} | {} | {} | {} | {} |\n",
            ms(key("bf16_ms")),
            ms(key("ternary_ms")),
            ms(key("nf4_ms")),
            x(rt),
            x(rn)
        );
    }
    let adam = num("adamw8bit_over_fused");
    t += &format!(
        "\n| optimizer step, 16.8M values | ms | state bytes |\n|---|---:|---:|\n\
         | 8-bit AdamW (kernel + weight update) | {} | {} |\n\
         | libtorch fused AdamW, f32 state | {} | {} |\n",
        ms(num("adamw8bit_ms")),
        num("state_bytes_8bit").map_or("-".into(), |v| format!("{v:.0}")),
        ms(num("fused_adamw_f32_ms")),
        num("state_bytes_f32").map_or("-".into(), |v| format!("{v:.0}")),
    );
    let met = |ok: bool| if ok { "met" } else { "not met" };
    t += &format!(
        "\nGoals:\n- ternary at least 3x bf16 at batch 1 (worst shape {worst_ternary:.2}x): {}\n\
         - NF4 at least 2.5x bf16 (worst shape {worst_nf4:.2}x): {}\n\
         - 8-bit AdamW at most 1.1x fused AdamW's time ({}): {}\n",
        met(worst_ternary >= 3.0),
        met(worst_nf4 >= 2.5),
        x(adam),
        met(adam.is_some_and(|a| a <= 1.1)),
    );
    // The graph example's objects, each read from its key on.
    let step = |enc: &str, k: &str| {
        crate::report::find_key(graph, enc).and_then(|(_, at)| json_number(&graph[at..], k))
    };
    if graph.contains("\"skipped\"") {
        t += &format!("- CUDA-graph TT encoder step at least 1.5x eager: not measured: {graph}\n");
        return t;
    }
    t += &format!(
        "- CUDA-graph TT encoder step at least 1.5x eager ({}): {}\n\n\
         | encoder-6 training step, batch 1 x 128 | parameters | eager ms | graph ms | eager / graph |\n\
         |---|---:|---:|---:|---:|\n",
        x(step("tt_encoder", "eager_over_graph")),
        met(step("tt_encoder", "eager_over_graph").is_some_and(|r| r >= 1.5)),
    );
    for (enc, name) in [
        ("tt_encoder", "TT (rank 30, order 3)"),
        ("dense_encoder", "dense"),
    ] {
        t += &format!(
            "| {name} | {} | {} | {} | {} |\n",
            step(enc, "parameters").map_or("-".into(), |v| format!("{v:.0}")),
            ms(step(enc, "eager_ms")),
            ms(step(enc, "graph_ms")),
            x(step(enc, "eager_over_graph")),
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_reads_the_flat_keys_and_judges_the_goals() {
        let line = r#"{"device":"NVIDIA H100","gemv":{"4096x4096 bf16_ms":0.03,"4096x4096 ternary_ms":0.01,"4096x4096 nf4_ms":0.012,"4096x4096 bf16_over_ternary":3.0,"4096x4096 bf16_over_nf4":2.5,"11008x4096 bf16_over_ternary":3.5,"11008x4096 bf16_over_nf4":2.6,"4096x11008 bf16_over_ternary":3.2,"4096x11008 bf16_over_nf4":2.4},"adamw":{"adamw8bit_ms":0.5,"fused_adamw_f32_ms":0.5,"adamw8bit_over_fused":1.0}}"#;
        let graph = r#"{"batch":1,"seq_len":128,"tt_encoder":{"parameters":5000000,"eager_ms":20.0,"graph_ms":8.0,"eager_over_graph":2.5},"dense_encoder":{"parameters":46000000,"eager_ms":12.0,"graph_ms":10.0,"eager_over_graph":1.2}}"#;
        let r = report(line, graph, "2026-12-06");
        assert!(r.contains("NVIDIA H100"), "{r}");
        assert!(
            r.contains("| 4096x4096 | 0.0300 | 0.0100 | 0.0120 | 3.00x | 2.50x |"),
            "{r}"
        );
        assert!(r.contains("(worst shape 3.00x): met"), "{r}");
        assert!(r.contains("(worst shape 2.40x): not met"), "{r}");
        assert!(r.contains("(1.00x): met"), "{r}");
        assert!(r.contains("at least 1.5x eager (2.50x): met"), "{r}");
        assert!(
            r.contains("| TT (rank 30, order 3) | 5000000 | 20.0000 | 8.0000 | 2.50x |"),
            "{r}"
        );
        assert!(
            r.contains("| dense | 46000000 | 12.0000 | 10.0000 | 1.20x |"),
            "{r}"
        );
        let skipped = report(r#"{"skipped":"no CUDA GPU"}"#, graph, "d");
        assert!(skipped.contains("not measured"), "{skipped}");
    }
}
