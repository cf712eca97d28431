//! End-to-end tests of encoder training through the `frugal` binary: masked-LM pre-training
//! (loss goes down, the run folder, `frugal eval`), exact resume, classification from a
//! pre-trained run on a generated TSV (accuracy well above chance, `frugal eval`), and bad
//! inputs.

mod common;

use common::*;
use std::path::{Path, PathBuf};

/// Settings of a tiny encoder on the test corpus.
fn encoder_settings(corpus: &Path) -> Vec<String> {
    let mut s = small_settings(corpus);
    s.extend([
        "model.kind=\"encoder\"".into(),
        "model.size=\"encoder-tiny\"".into(),
    ]);
    s
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn eval_json(dir: &Path, run_dir: &Path) -> serde_json::Value {
    let out = run({
        let mut c = frugal(dir);
        c.arg("eval").arg("--run").arg(run_dir);
        c
    });
    assert!(out.status.success(), "eval failed");
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
}

/// A masked-LM run of `steps` steps into `dir/name`.
fn mlm_run(dir: &Path, corpus: &Path, name: &str, steps: u64, extra: &[&str]) -> PathBuf {
    let out_dir = dir.join(name);
    let mut sets = encoder_settings(corpus);
    sets.push(format!("train.max_steps={steps}"));
    sets.extend(extra.iter().map(|s| s.to_string()));
    let out = run(train_cmd(dir, &out_dir, &sets));
    assert!(out.status.success(), "mlm run {name} failed");
    out_dir
}

/// Guarantee: masked-LM pre-training lowers the training and validation loss, writes the run
/// folder of a llama run (plus `config.json`), and `frugal eval` scores the validation split
/// with the same fixed masks as the run's last evaluation.
#[test]
fn mlm_run_learns_writes_the_run_folder_and_evals() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 20);
    let r = mlm_run(
        dir.path(),
        &corpus,
        "mlm",
        30,
        &["train.eval_every=10", "train.save_every=10"],
    );
    for f in [
        "config.toml",
        "config.json",
        "tokenizer.json",
        "metrics.jsonl",
        "loss.png",
        "memory.json",
        "checkpoints/step-30/model.safetensors",
        "checkpoints/step-30/optimizer.safetensors",
        "checkpoints/step-30/trainer_state.json",
    ] {
        assert!(r.join(f).is_file(), "{f} missing");
    }
    assert_eq!(
        std::fs::read_to_string(r.join("checkpoints/latest"))
            .unwrap()
            .trim(),
        "step-30"
    );
    let lines = metrics(&r);
    assert_eq!(lines.len(), 30);
    for l in &lines {
        for k in ["step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm"] {
            assert!(l.get(k).is_some(), "metrics line lacks {k}: {l}");
        }
    }
    let loss = |i: usize| lines[i]["loss"].as_f64().unwrap();
    let first = loss(0);
    let tail = (25..30).map(loss).sum::<f64>() / 5.0;
    assert!(tail < first - 1.0, "loss {first} -> {tail}");
    let val: Vec<f64> = lines
        .iter()
        .filter_map(|l| l["val_loss"].as_f64())
        .collect();
    assert_eq!(val.len(), 3);
    assert!(val[2] < val[0], "validation loss {val:?}");
    assert!(lines[29]["val_ppl"].as_f64().is_some());
    // The model is the encoder with the masked-LM head, and the tokenizer has its tokens.
    let shape: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(r.join("config.json")).unwrap()).unwrap();
    assert_eq!(shape["hidden_size"], 32);
    assert_eq!(shape["architectures"][0], "BertForMaskedLM");
    let tok = std::fs::read_to_string(r.join("tokenizer.json")).unwrap();
    assert!(tok.contains("<|mask|>") && tok.contains("<|cls|>"));
    let mem: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(r.join("memory.json")).unwrap()).unwrap();
    let params = mem["accounting"]["parameters"].as_u64().unwrap();
    assert_eq!(
        mem["accounting"]["optimizer_state"].as_u64(),
        Some(2 * params)
    );

    let e = eval_json(dir.path(), &r);
    let l = e["loss"].as_f64().unwrap();
    assert!(
        (l - val[2]).abs() < 1e-5,
        "eval {l} vs last val_loss {}",
        val[2]
    );
    assert!((e["perplexity"].as_f64().unwrap() - l.exp()).abs() < 1e-6);
    assert!(e["tokens"].as_u64().unwrap() > 0);
}

/// Guarantee: a resumed masked-LM run (gradient accumulation, so several masks per step) has
/// the losses and weights of an uninterrupted one, bit for bit.
#[test]
fn mlm_resume_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    mlm_resume(dir.path(), &[]);
}

/// Guarantee: the encoder trains with the block-by-block step too: per-layer updates (each
/// block's gradients handed to the optimizer during the backward pass, clipped by the previous
/// step's norm), activation checkpointing and a chunked cross-entropy train with finite
/// losses and gradients, and resume bit for bit (the gradients themselves equal the plain
/// pass's: `encoder_model`'s `block_by_block_gives_the_plain_gradients`).
#[test]
fn mlm_with_per_layer_updates_resumes_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let full = mlm_resume(
        dir.path(),
        &[
            "optim.layerwise=true",
            "train.checkpointing=true",
            "train.ce_chunk=40",
        ],
    );
    for m in metrics(&full) {
        assert!(m["loss"].as_f64().is_some_and(f64::is_finite), "{m}");
        assert!(m["grad_norm"].as_f64().is_some_and(|n| n > 0.0), "{m}");
    }
}

/// Trains a masked-LM encoder 6 steps in `dir` with `more` settings, resumes a copy from step
/// 3 and checks both end alike; returns the uninterrupted run.
fn mlm_resume(dir: &Path, more: &[&str]) -> PathBuf {
    let corpus = corpus(dir, 20);
    let mut extra = vec![
        "train.save_every=3",
        "train.keep_checkpoints=0",
        "train.eval_every=3",
        "train.grad_accum=2",
    ];
    extra.extend(more);
    let full = mlm_run(dir, &corpus, "full", 6, &extra);
    let part = dir.join("part");
    copy_dir(&full, &part);
    std::fs::remove_dir_all(part.join("checkpoints/step-6")).unwrap();
    std::fs::write(part.join("checkpoints/latest"), "step-3\n").unwrap();
    let out = run({
        let mut c = frugal(dir);
        c.arg("train").arg("--resume").arg(&part);
        c
    });
    assert!(out.status.success());
    assert_eq!(losses(&full).len(), 6);
    assert_eq!(losses(&full), losses(&part));
    let vals = |r: &Path| -> Vec<String> {
        metrics(r)
            .iter()
            .map(|l| l["val_loss"].to_string())
            .collect()
    };
    assert_eq!(vals(&full), vals(&part));
    let a = std::fs::read(full.join("checkpoints/step-6/model.safetensors")).unwrap();
    let b = std::fs::read(part.join("checkpoints/step-6/model.safetensors")).unwrap();
    assert!(
        a == b,
        "weights after resume differ from the uninterrupted run"
    );
    full
}

/// Guarantee: a classifier fine-tuned from a masked-LM run (its head dropped, pooler and
/// classifier new) learns a which-words task well above chance in a few dozen steps; the
/// run keeps its labels, and `frugal eval` reports its loss and accuracy (equal to the run's
/// last evaluation).
#[test]
fn classification_from_a_pretrained_run_beats_chance() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 20);
    let pre = mlm_run(dir.path(), &corpus, "pre", 5, &["train.eval_every=0"]);
    let task = dir.path().join("task.tsv");
    task_tsv(&task, 300, 7);
    let r = dir.path().join("cls");
    let mut sets = encoder_settings(&corpus);
    sets.extend([
        "train.objective=\"classification\"".to_string(),
        format!("data.task_path=\"{}\"", task.display()),
        format!("model.from_pretrained=\"{}\"", pre.display()),
        "data.val_every=5".into(),
        "train.batch_size=16".into(),
        "train.lr=0.003".into(),
        "train.max_steps=40".into(),
        "train.eval_every=20".into(),
    ]);
    let out = run(train_cmd(dir.path(), &r, &sets));
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("validation accuracy"), "{stdout}");
    let labels: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(r.join("labels.json")).unwrap()).unwrap();
    assert_eq!(labels, ["yes", "no"]);
    let shape: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(r.join("config.json")).unwrap()).unwrap();
    assert_eq!(shape["num_labels"], 2);
    let lines = metrics(&r);
    assert_eq!(lines.len(), 40);
    let acc = lines[39]["val_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.85, "validation accuracy {acc} (chance 0.5)");
    let e = eval_json(dir.path(), &r);
    assert_eq!(e["examples"], 60);
    assert!((e["accuracy"].as_f64().unwrap() - acc).abs() < 1e-9, "{e}");
    let vl = lines[39]["val_loss"].as_f64().unwrap();
    assert!((e["loss"].as_f64().unwrap() - vl).abs() < 1e-5, "{e}");
    // And `--data` scores another file.
    let other = dir.path().join("other.tsv");
    task_tsv(&other, 40, 99);
    let out = run({
        let mut c = frugal(dir.path());
        c.arg("eval").arg("--run").arg(&r).arg("--data").arg(&other);
        c
    });
    assert!(out.status.success());
    let e: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(e["examples"], 40);
    assert!(e["accuracy"].as_f64().unwrap() >= 0.75, "{e}");
}

/// Guarantee: bad encoder inputs are one-line errors naming the key or the file and line.
#[test]
fn bad_encoder_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 10);
    let base = encoder_settings(&corpus);
    let attempt = |name: &str, extra: &[String]| {
        let mut sets = base.clone();
        sets.push("train.max_steps=2".into());
        sets.extend(extra.iter().cloned());
        run(train_cmd(dir.path(), &dir.path().join(name), &sets))
    };
    let s = |v: &str| v.to_string();
    assert_clean_error(
        &attempt("a", &[s("train.objective=\"span\"")]),
        "train.objective",
    );
    assert_clean_error(&attempt("b", &[s("model.size=\"tiny\"")]), "model.size");
    assert_clean_error(
        &attempt(
            "c",
            &[s("model.kind=\"llama\""), s("model.size=\"encoder-small\"")],
        ),
        "model.size",
    );
    assert_clean_error(
        &attempt(
            "d",
            &[
                s("model.kind=\"llama\""),
                s("model.size=\"tiny\""),
                s("train.objective=\"mlm\""),
            ],
        ),
        "train.objective",
    );
    assert_clean_error(
        &attempt("f", &[s("train.objective=\"classification\"")]),
        "data.task_path",
    );
    let bad = dir.path().join("bad.tsv");
    std::fs::write(&bad, "text\tlabel\na b c\tyes\nno label here\nd e\tno\n").unwrap();
    let out = attempt(
        "g",
        &[
            s("train.objective=\"classification\""),
            format!("data.task_path=\"{}\"", bad.display()),
        ],
    );
    assert_clean_error(&out, &format!("{}: line 3: missing label", bad.display()));
    assert!(!dir.path().join("g/config.toml").exists());
    let out = attempt(
        "h",
        &[
            s("train.objective=\"classification\""),
            format!(
                "data.task_path=\"{}\"",
                dir.path().join("none.tsv").display()
            ),
        ],
    );
    assert_clean_error(&out, "data.task_path");
}
