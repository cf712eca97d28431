//! `cargo xtask bench NAME`: side-by-side benchmarks that write `target/bench/NAME.json`.

use crate::setup::TorchEnv;
use crate::{Failure, Result};

/// The benchmarks this command knows.
pub const NAMES: &[&str] = &[
    "train-step",
    "quant",
    "galore",
    "galore-quality",
    "tt",
    "adapters",
    "adapters-gqa",
    "matmulfree",
    "distributed",
    "kernels",
];

/// Runs benchmark `name` with extra arguments `args`.
pub fn run(env: &TorchEnv, name: &str, args: &[String]) -> Result<()> {
    match name {
        "train-step" => crate::bench_train_step::run(env, args),
        "quant" => crate::bench_quant::run(env, args),
        "galore" => crate::bench_galore::run(env, args),
        "galore-quality" => crate::bench_galore_quality::run(env, args),
        "tt" => crate::bench_tt::run(env, args),
        "adapters" => crate::bench_adapters::run(env, args),
        "adapters-gqa" => crate::bench_adapters_gqa::run(env, args),
        "matmulfree" => crate::bench_matmulfree::run(env, args),
        "distributed" => crate::bench_distributed::run(env, args),
        "kernels" => crate::bench_kernels::run(env, args),
        other => Err(Failure::new(format!(
            "unknown benchmark '{other}'; benchmarks: {}",
            NAMES.join(", ")
        ))),
    }
}
