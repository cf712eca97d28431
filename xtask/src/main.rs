//! `cargo xtask`: sets up libtorch, then trains, tests or benchmarks with the right environment.
//!
//! ```text
//! cargo xtask setup                 install libtorch 2.11.0 from the PyPI wheel (once)
//! cargo xtask train [-- ARGS]       build in release mode, run `frugal train` on configs/default.toml
//! cargo xtask test [-- ARGS]        run the whole workspace's tests
//! cargo xtask bench NAME [-- ARGS]  run a benchmark, write target/bench/NAME.json
//! cargo xtask env                   print the environment the other commands pass to cargo
//! ```
//!
//! It depends on the standard library and `frugal-records` (serde and serde_json, to read run
//! records) alone, so it builds quickly and never links tch.

mod bench;
mod bench_adapters;
mod bench_adapters_gqa;
mod bench_distributed;
mod bench_galore;
mod bench_galore_quality;
mod bench_kernels;
mod bench_matmulfree;
mod bench_quant;
mod bench_train_step;
mod bench_tt;
mod report;
mod setup;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// An error for the user: one line, then exit code 2 (1 when a child command failed).
pub struct Failure {
    message: String,
    code: u8,
}

impl Failure {
    /// A failure with a message for the user, exit code 2.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: 2,
        }
    }
}

type Result<T> = std::result::Result<T, Failure>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("xtask: error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

const USAGE: &str = "usage: cargo xtask <setup|train|test|bench NAME|env> [-- ARGS...]";

fn run(args: &[String]) -> Result<()> {
    let (cmd, rest) = args.split_first().ok_or_else(|| Failure::new(USAGE))?;
    // Everything after an optional `--` passes through untouched.
    let rest: Vec<String> = match rest.iter().position(|a| a == "--") {
        Some(i) => rest[..i].iter().chain(&rest[i + 1..]).cloned().collect(),
        None => rest.to_vec(),
    };
    match cmd.as_str() {
        "setup" => {
            let env = setup::ensure()?;
            eprintln!("libtorch ready: LIBTORCH={}", env.libtorch.display());
            Ok(())
        }
        "env" => {
            let env = setup::ensure()?;
            for (k, v) in env.vars() {
                println!("export {k}={v}");
            }
            Ok(())
        }
        "train" => {
            let env = setup::ensure()?;
            let mut args = vec![
                "train".to_string(),
                "--config".into(),
                "configs/default.toml".into(),
            ];
            args.extend(rest);
            cargo_run_frugal(&env, &args)
        }
        "test" => {
            let env = setup::ensure()?;
            let peft = setup::ensure_test_packages(&env);
            let mut c = cargo(&env);
            if peft {
                // The cross-check must run: a failure to import is then a test failure.
                c.env("FRUGAL_PEFT", "1");
            }
            c.args(["test", "--workspace", "--no-fail-fast"]);
            if setup::ensure_mpi() {
                // The MPI backend is built and its tests under mpirun must run.
                c.args(["--features", "frugal-dist/mpi"]);
                c.env("FRUGAL_MPI", "1");
            }
            c.args(&rest);
            status(c, "cargo test")
        }
        "bench" => {
            let (name, rest) = rest.split_first().ok_or_else(|| {
                Failure::new(format!(
                    "usage: cargo xtask bench NAME; benchmarks: {}",
                    bench::NAMES.join(", ")
                ))
            })?;
            let env = setup::ensure()?;
            bench::run(&env, name, rest)
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(Failure::new(format!("unknown command '{other}'; {USAGE}"))),
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent")
        .to_path_buf()
}

/// `cargo` in the workspace root with the libtorch environment set.
pub fn cargo(env: &setup::TorchEnv) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(root());
    for (k, v) in env.vars() {
        c.env(k, v);
    }
    c
}

/// Builds the `frugal` binary in release mode and returns its path.
pub fn build_frugal(env: &setup::TorchEnv) -> Result<PathBuf> {
    build_frugal_with(env, &[])
}

/// [`build_frugal`] with frugal-train's cargo `features` (`mpi`).
pub fn build_frugal_with(env: &setup::TorchEnv, features: &[&str]) -> Result<PathBuf> {
    let mut c = cargo(env);
    c.args([
        "build",
        "--release",
        "--package",
        "frugal-train",
        "--bin",
        "frugal",
    ]);
    if !features.is_empty() {
        c.args(["--features", &features.join(",")]);
    }
    status(c, "cargo build")?;
    Ok(root().join("target/release/frugal"))
}

fn cargo_run_frugal(env: &setup::TorchEnv, args: &[String]) -> Result<()> {
    let bin = build_frugal(env)?;
    let mut c = Command::new(bin);
    c.current_dir(root()).args(args);
    for (k, v) in env.vars() {
        c.env(k, v);
    }
    status(c, "frugal")
}

/// Runs a command, passing its exit code on when it fails.
pub fn status(mut c: Command, what: &str) -> Result<()> {
    let st = c
        .status()
        .map_err(|e| Failure::new(format!("could not start {what}: {e}")))?;
    if st.success() {
        Ok(())
    } else {
        let code = st.code().unwrap_or(1).clamp(1, 255) as u8;
        Err(Failure {
            message: format!("{what} failed ({st})"),
            code,
        })
    }
}
