//! The trainer's memory options against ordinary training: per-layer updates
//! (`optim.layerwise`), activation checkpointing (`train.checkpointing`) and the chunked
//! cross-entropy (`train.ce_chunk`) give the weights ordinary training gives, for AdamW and the
//! GaLore optimizers; the memory report and `--dry-run` show the accounting by category.

mod common;

use common::{corpus, frugal, run, small_settings, train_cmd, weight_diff};
use std::path::Path;

/// Trains `steps` steps with `extra` settings into `dir/name` and returns the run folder.
fn train<S: AsRef<str>>(
    dir: &Path,
    corpus: &Path,
    name: &str,
    steps: u64,
    extra: &[S],
) -> std::path::PathBuf {
    let out = dir.join(name);
    let mut sets = small_settings(corpus);
    sets.extend([
        format!("train.max_steps={steps}"),
        "train.eval_every=0".into(),
        "train.eval_batches=1".into(),
        "train.max_grad_norm=0.0".into(),
    ]);
    sets.extend(extra.iter().map(|s| s.as_ref().to_string()));
    let o = run(train_cmd(dir, &out, &sets));
    assert!(o.status.success(), "{name} failed");
    out
}

/// Guarantee: after two steps (one with accumulation), per-layer updates, checkpointing and
/// chunking give ordinary training's weights within 1e-6, for AdamW and GaLore-AdamW; and a
/// different optimizer does not (the comparison can fail).
#[test]
fn memory_options_keep_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 12);
    let galore = [
        "optim.name=\"galore-adamw\"",
        "optim.galore.rank=8",
        "optim.galore.update_proj_gap=1",
    ];
    for (optim, accum) in [(&[][..], "2"), (&galore[..], "1")] {
        let accum = format!("train.grad_accum={accum}");
        let with = |more: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = optim.iter().map(|s| s.to_string()).collect();
            v.push(accum.clone());
            v.extend(more.iter().map(|s| s.to_string()));
            v
        };
        let tag = if optim.is_empty() { "adamw" } else { "galore" };
        let plain = train(dir.path(), &corpus, &format!("{tag}-plain"), 2, &with(&[]));
        for (name, more) in [
            ("layerwise", &["optim.layerwise=true"][..]),
            (
                "all",
                &[
                    "optim.layerwise=true",
                    "train.checkpointing=true",
                    "train.ce_chunk=48",
                ][..],
            ),
            (
                "ckpt",
                &["train.checkpointing=true", "train.ce_chunk=40"][..],
            ),
        ] {
            let r = train(
                dir.path(),
                &corpus,
                &format!("{tag}-{name}"),
                2,
                &with(more),
            );
            let d = weight_diff(&plain, &r);
            assert!(d < 1e-6, "{tag} {name}: weights differ by {d}");
        }
    }
    // The check is not vacuous: another optimizer lands elsewhere.
    let other = train(
        dir.path(),
        &corpus,
        "adafactor",
        2,
        &["optim.name=\"adafactor\"", "train.grad_accum=2"],
    );
    let d = weight_diff(&dir.path().join("adamw-plain"), &other);
    assert!(d > 1e-4, "adafactor vs adamw differ by only {d}");
}

/// Guarantee: every optimizer trains through the command line with per-layer updates and
/// resumes from its checkpoint (projector state included) to the same losses as an
/// uninterrupted run.
#[test]
fn every_optimizer_trains_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 12);
    for name in ["adamw8bit", "galore-adamw8bit", "galore-adafactor"] {
        let opt = format!("optim.name=\"{name}\"");
        let sets = [
            opt.as_str(),
            "optim.layerwise=true",
            "optim.galore.rank=4",
            "optim.galore.update_proj_gap=2",
            "train.max_grad_norm=0.5",
        ];
        let full = train(dir.path(), &corpus, &format!("{name}-full"), 4, &sets);
        let part = train(dir.path(), &corpus, &format!("{name}-part"), 4, &{
            let mut v = sets.to_vec();
            v.push("train.save_every=2");
            v
        });
        // Cut the second run back to its step-2 checkpoint, then resume it.
        std::fs::write(part.join("checkpoints/latest"), "step-2\n").unwrap();
        std::fs::remove_dir_all(part.join("checkpoints/step-4")).unwrap();
        let o = run({
            let mut c = frugal(dir.path());
            c.arg("train").arg("--resume").arg(&part);
            c
        });
        assert!(o.status.success(), "{name}: resume failed");
        assert_eq!(common::losses(&full), common::losses(&part), "{name}");
        // GaLore runs log the time spent on bases: some at step 1 (the first refresh).
        let metrics = std::fs::read_to_string(full.join("metrics.jsonl")).unwrap();
        let first: serde_json::Value =
            serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
        assert_eq!(
            first["svd_s"].as_f64().is_some_and(|s| s > 0.0),
            name.starts_with("galore"),
            "{name}: {first}"
        );
        assert_eq!(weight_diff(&full, &part), 0.0, "{name}");
        let mem: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(full.join("memory.json")).unwrap())
                .unwrap();
        let ours = mem["plan"]["optimizer_state"].as_u64().unwrap();
        let adamw = mem["adamw_full_gradients"]["optimizer_state"]
            .as_u64()
            .unwrap();
        assert!(
            ours < adamw,
            "{name}: state {ours} not below AdamW's {adamw}"
        );
        assert!(
            mem["plan"]["gradients"].as_u64() < mem["adamw_full_gradients"]["gradients"].as_u64()
        );
    }
}

/// Guarantee: `--dry-run` prints the accounting without creating a run folder; bad optimizer
/// settings are errors that name the key.
#[test]
fn dry_run_and_bad_settings() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never");
    let mut c = train_cmd(
        dir.path(),
        &out,
        &[
            "model.size=\"130m\"".into(),
            "optim.name=\"galore-adamw8bit\"".into(),
            "optim.layerwise=true".into(),
        ],
    );
    c.arg("--dry-run");
    let o = run(c);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "gradients",
        "optimizer_state",
        "activations",
        "AdamW (full)",
        "130m",
    ] {
        assert!(text.contains(needle), "'{needle}' missing:\n{text}");
    }
    assert!(!out.exists(), "a dry run creates no run folder");
    for (set, needle) in [
        ("optim.name=\"sgd\"", "optim.name"),
        (
            "optim.galore.proj_type=\"diagonal\"",
            "optim.galore.proj_type",
        ),
        (
            "optim.galore.target_modules=\"(\"",
            "optim.galore.target_modules",
        ),
    ] {
        let mut sets = vec!["optim.name=\"galore-adamw\"".to_string()];
        sets.push(set.into());
        let mut c = train_cmd(dir.path(), &out, &sets);
        c.arg("--dry-run");
        common::assert_clean_error(&run(c), needle);
    }
}
