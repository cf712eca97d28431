//! Shared helpers of the `frugal` command-line tests: a small corpus, a small model, and a way
//! to run the binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Writes a small, deterministic, English-like corpus of `docs` files into `dir/corpus/`.
pub fn corpus(dir: &Path, docs: usize) -> PathBuf {
    let words = [
        "the", "model", "learns", "to", "predict", "next", "token", "from", "context", "and",
        "memory", "is", "small", "when", "rank", "low", "gradient", "step", "train", "loss",
    ];
    let root = dir.join("corpus");
    std::fs::create_dir_all(&root).unwrap();
    let mut state = 12345u64;
    for d in 0..docs {
        let mut text = String::new();
        for s in 0..40 {
            for w in 0..8 {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let i = ((state >> 33) as usize + w * 3 + s) % words.len();
                text.push_str(words[i]);
                text.push(' ');
            }
            text.push_str(".\n");
        }
        std::fs::write(root.join(format!("doc{d:03}.txt")), text).unwrap();
    }
    root
}

/// Settings for a model and run small enough for tests (a few ms per step).
pub fn small_settings(corpus: &Path) -> Vec<String> {
    [
        format!("data.path=\"{}\"", corpus.display()),
        "data.val_every=5".into(),
        "tokenizer.vocab_size=320".into(),
        "model.hidden_size=32".into(),
        "model.intermediate_size=64".into(),
        "model.num_layers=2".into(),
        "model.num_heads=2".into(),
        "train.device=\"cpu\"".into(),
        "train.batch_size=4".into(),
        "train.seq_len=32".into(),
        "train.warmup_steps=2".into(),
        "train.lr=0.01".into(),
        "train.threads=1".into(),
        "train.eval_batches=2".into(),
    ]
    .into_iter()
    .collect()
}

/// [`small_settings`] for a run of `steps` steps that evaluates once at the end (on 2 batches)
/// and saves one checkpoint there, then the `extra` settings.
pub fn short_run(corpus: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut s = small_settings(corpus);
    s.extend([
        format!("train.max_steps={steps}"),
        "train.eval_every=0".into(),
        format!("train.save_every={steps}"),
        "train.final_eval_batches=2".into(),
    ]);
    s.extend(extra.iter().map(|e| e.to_string()));
    s
}

/// The `frugal` binary with a private tokenizer cache under `dir`.
pub fn frugal(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_frugal"));
    c.env("FRUGAL_CACHE", dir.join("cache"))
        .env("FRUGAL_PROGRESS", "plain");
    c
}

/// `frugal train --config <repo>/configs/default.toml` with the settings and extra `--set`s.
pub fn train_cmd(dir: &Path, out: &Path, sets: &[String]) -> Command {
    let mut c = frugal(dir);
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/default.toml");
    c.arg("train")
        .arg("--config")
        .arg(config)
        .arg("--out")
        .arg(out);
    for s in sets {
        c.arg("--set").arg(s);
    }
    c
}

/// Runs a command and returns its output, with stderr echoed on failure for the test log.
pub fn run(mut c: Command) -> Output {
    let out = c.output().expect("frugal runs");
    if !out.status.success() {
        eprintln!("stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    out
}

/// Asserts a failure is the one-line, exit-code-2 kind that names `needle`.
pub fn assert_clean_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit code; stderr: {err}");
    let last = err.lines().last().unwrap_or("");
    assert!(last.starts_with("frugal: error: "), "last line: {last}");
    assert!(last.contains(needle), "'{needle}' not in: {last}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "panic: {err}"
    );
}

/// The losses of a run's metrics, as written (text, so equality is bit-equality).
pub fn losses(run: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{}:{}", v["step"], v["loss"])
        })
        .collect()
}

/// Copies folder `from` (recursively) to `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let t = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), t).unwrap();
        }
    }
}

/// The largest difference between the weights of two runs' latest checkpoints.
pub fn weight_diff(a: &Path, b: &Path) -> f64 {
    let file = |r: &Path| {
        let latest = std::fs::read_to_string(r.join("checkpoints/latest")).unwrap();
        frugal_core::safetensors_io::SafetensorsFile::open(
            &r.join("checkpoints")
                .join(latest.trim())
                .join("model.safetensors"),
        )
        .unwrap()
    };
    let (fa, fb) = (file(a), file(b));
    let mut worst = 0.0f64;
    for name in fa.names() {
        let x = fa
            .tensor(&name, tch::Device::Cpu)
            .unwrap()
            .to_kind(tch::Kind::Double);
        let y = fb
            .tensor(&name, tch::Device::Cpu)
            .unwrap()
            .to_kind(tch::Kind::Double);
        worst = worst.max((x - y).abs().max().double_value(&[]));
    }
    worst
}

/// Whether `$FRUGAL_PYTHON` has PEFT and transformers; a failure when `FRUGAL_PEFT=1` (set by
/// `cargo xtask test` when it installed them), a skip otherwise.
pub fn peft_python() -> Option<String> {
    let python = std::env::var("FRUGAL_PYTHON").unwrap_or_else(|_| "python3".into());
    let required = std::env::var("FRUGAL_PEFT").is_ok_and(|v| v == "1");
    let has_peft = std::process::Command::new(&python)
        .args(["-c", "import peft, transformers"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_peft {
        assert!(
            !required,
            "FRUGAL_PEFT=1 but {python} cannot import peft and transformers"
        );
        eprintln!("skipped: {python} has no peft/transformers (cargo xtask test installs them)");
        return None;
    }
    Some(python)
}

/// Writes `n` examples with a header: 6 words of the test corpus, drawn from the first half
/// of the word list for label "yes" (every other row), from the second half for "no".
pub fn task_tsv(path: &Path, n: usize, seed: u64) {
    let a = [
        "the", "model", "learns", "to", "predict", "next", "token", "from",
    ];
    let b = [
        "context", "memory", "small", "low", "gradient", "step", "train", "loss",
    ];
    let mut state = seed;
    let mut next = |k: usize| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize % k
    };
    let mut text = String::from("text\tlabel\n");
    for i in 0..n {
        let yes = i % 2 == 0;
        let words = if yes { &a } else { &b };
        let ws: Vec<&str> = (0..6).map(|_| words[next(words.len())]).collect();
        text += &format!("{}\t{}\n", ws.join(" "), if yes { "yes" } else { "no" });
    }
    std::fs::write(path, text).unwrap();
}
