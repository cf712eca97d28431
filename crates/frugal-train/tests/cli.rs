//! End-to-end tests of the `frugal` binary: a run and its folder, eval, generate, inspect,
//! exact resume, Ctrl-C, and every bad input of the foundation issue.

mod common;

use common::*;
use std::path::Path;

/// Guarantee: a run writes the run folder of DESIGN.md, and eval / generate / inspect work on it;
/// `frugal eval --logits` writes the evaluated ids and logits, which match transformers' on the
/// same weights within 1e-4 (when transformers is installed), and `--set` takes the evaluation
/// settings only (other keys and bad values are errors naming the key).
#[test]
fn train_writes_the_run_folder_and_eval_generate_inspect_read_it() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 20);
    let runp = dir.path().join("run");
    let mut sets = small_settings(&corpus);
    sets.extend([
        "train.max_steps=6".into(),
        "train.eval_every=3".into(),
        "train.save_every=3".into(),
    ]);
    let out = run(train_cmd(dir.path(), &runp, &sets));
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "steps",
        "validation loss",
        "unigram",
        "peak memory",
        "run directory",
    ] {
        assert!(
            stdout.contains(needle),
            "summary lacks '{needle}':\n{stdout}"
        );
    }
    for f in [
        "config.toml",
        "tokenizer.json",
        "metrics.jsonl",
        "loss.png",
        "memory.json",
    ] {
        assert!(runp.join(f).is_file(), "{f} missing");
    }
    let latest = std::fs::read_to_string(runp.join("checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), "step-6");
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(
            runp.join("checkpoints/step-6").join(f).is_file(),
            "{f} missing"
        );
    }
    let metrics = std::fs::read_to_string(runp.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    for l in &lines {
        for k in ["step", "loss", "lr", "tokens", "tokens_per_s"] {
            assert!(l.get(k).is_some(), "metrics line lacks {k}: {l}");
        }
    }
    assert!(lines[2].get("val_loss").is_some() && lines[5].get("val_loss").is_some());
    let mem: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runp.join("memory.json")).unwrap()).unwrap();
    assert!(mem["measured"]["peak_rss_bytes"].as_u64().unwrap() > 0);
    assert!(mem["accounting"]["parameters"].as_u64().unwrap() > 0);
    let params = mem["accounting"]["parameters"].as_u64().unwrap();
    assert_eq!(
        mem["accounting"]["optimizer_state"].as_u64(),
        Some(2 * params),
        "AdamW keeps two moments"
    );

    let out = run({
        let mut c = frugal(dir.path());
        c.args(["eval", "--run"]).arg(&runp);
        c
    });
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let loss = v["loss"].as_f64().unwrap();
    assert!((v["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-6 * loss.exp());
    assert!(v["tokens"].as_u64().unwrap() > 0);

    // The same weights as a Hugging Face style folder (transformers 5 config layout).
    let ck = runp.join("checkpoints/step-6");
    let st =
        frugal_core::safetensors_io::SafetensorsFile::open(&ck.join("model.safetensors")).unwrap();
    let (emb, _) = st.info("model.embed_tokens.weight").unwrap();
    let hf = dir.path().join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    std::fs::copy(ck.join("model.safetensors"), hf.join("model.safetensors")).unwrap();
    std::fs::copy(runp.join("tokenizer.json"), hf.join("tokenizer.json")).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": emb[0],
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    });
    std::fs::write(hf.join("config.json"), config.to_string()).unwrap();
    let out = run({
        let mut c = frugal(dir.path());
        c.args(["eval", "--model"])
            .arg(&hf)
            .arg("--data")
            .arg(&corpus);
        c
    });
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let hf_loss = v["loss"].as_f64().unwrap();
    assert!(
        hf_loss.is_finite() && hf_loss < (emb[0] as f64).ln(),
        "loss {hf_loss}"
    );

    // Its logits on the evaluated sequences (other length and batch through --set) are
    // transformers' on the same ids.
    let logits = dir.path().join("logits.safetensors");
    let out = run({
        let mut c = frugal(dir.path());
        c.args(["eval", "--model"])
            .arg(&hf)
            .arg("--data")
            .arg(&corpus)
            .args(["--set", "train.seq_len=16", "--set", "train.batch_size=3"])
            .arg("--logits")
            .arg(&logits);
        c
    });
    assert!(out.status.success());
    let f = frugal_core::safetensors_io::SafetensorsFile::open(&logits).unwrap();
    let (ids, _) = f.info("input_ids").unwrap();
    let (lg, _) = f.info("logits").unwrap();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[1], 16);
    assert_eq!(lg, vec![ids[0], 16, emb[0]]);
    if let Some(python) = peft_python() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/logits_check.py");
        let o = std::process::Command::new(python)
            .arg(&script)
            .arg(&hf)
            .arg(&logits)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        let d: f64 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
        assert!(d < 1e-4, "logits differ from transformers' by {d}");
    }
    for (set, key) in [
        ("model.hidden_size=64", "model.hidden_size"),
        ("train.seq_len=0", "train.seq_len"),
    ] {
        let out = run({
            let mut c = frugal(dir.path());
            c.args(["eval", "--model"])
                .arg(&hf)
                .arg("--data")
                .arg(&corpus)
                .args(["--set", set]);
            c
        });
        assert_clean_error(&out, key);
    }

    // The same model quantized to NF4 by `frugal quantize` evaluates from its folder with
    // frozen packed layers, and loses little.
    let nf4 = dir.path().join("hf-nf4");
    let mut c = frugal(dir.path());
    c.arg("quantize")
        .arg(&hf)
        .arg(&nf4)
        .args(["--format", "nf4"]);
    assert!(run(c).status.success());
    let out = run({
        let mut c = frugal(dir.path());
        c.args(["eval", "--model"])
            .arg(&nf4)
            .arg("--data")
            .arg(&corpus);
        c
    });
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let nf4_loss = v["loss"].as_f64().unwrap();
    assert!(
        nf4_loss != hf_loss && (nf4_loss - hf_loss).abs() < 0.05 * hf_loss,
        "nf4 loss {nf4_loss}, dense {hf_loss}"
    );

    let out = run({
        let mut c = frugal(dir.path());
        c.args(["generate", "--run"]).arg(&runp).args([
            "--prompt",
            "the model",
            "--max-new-tokens",
            "8",
            "--seed",
            "3",
        ]);
        c
    });
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("the model"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokens/s"));
    // A prompt past the model's positions (512 for tiny) is refused, not truncated.
    let long = "the model ".repeat(600);
    let out = run({
        let mut c = frugal(dir.path());
        c.args(["generate", "--run"])
            .arg(&runp)
            .args(["--prompt", long.as_str()]);
        c
    });
    assert_clean_error(&out, "the model takes at most 512");

    let out = run({
        let mut c = frugal(dir.path());
        c.arg("inspect")
            .arg(runp.join("checkpoints/step-6/model.safetensors"));
        c
    });
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("model.embed_tokens.weight")
            && text.contains("F32")
            && text.contains("format=pt"),
        "{text}"
    );
}

/// Guarantee: resuming from a checkpoint gives bit-identical losses and weights to an
/// uninterrupted run (CPU).
#[test]
fn resume_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 20);
    let mut sets = small_settings(&corpus);
    sets.extend([
        "train.max_steps=8".into(),
        "train.save_every=4".into(),
        "train.keep_checkpoints=0".into(),
        "train.eval_every=0".into(),
    ]);
    let full = dir.path().join("full");
    assert!(run(train_cmd(dir.path(), &full, &sets)).status.success());

    // The same run, rolled back to its step-4 checkpoint, then resumed.
    let part = dir.path().join("part");
    copy_dir(&full, &part);
    std::fs::remove_dir_all(part.join("checkpoints/step-8")).unwrap();
    std::fs::write(part.join("checkpoints/latest"), "step-4\n").unwrap();
    let out = run({
        let mut c = frugal(dir.path());
        c.arg("train").arg("--resume").arg(&part);
        c
    });
    assert!(out.status.success());
    assert_eq!(losses(&full), losses(&part));
    assert_eq!(losses(&part).len(), 8);
    let a = std::fs::read(full.join("checkpoints/step-8/model.safetensors")).unwrap();
    let b = std::fs::read(part.join("checkpoints/step-8/model.safetensors")).unwrap();
    assert!(
        a == b,
        "weights after resume differ from the uninterrupted run"
    );
}

/// Guarantee: Ctrl-C saves a checkpoint and exits with 130; resuming finishes the run with the
/// same losses and weights as an uninterrupted one.
#[test]
fn ctrl_c_saves_a_checkpoint_and_resume_finishes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 20);
    let mut sets = small_settings(&corpus);
    sets.extend([
        "train.max_steps=400".into(),
        "train.save_every=0".into(),
        "train.eval_every=0".into(),
    ]);
    let full = dir.path().join("full");
    assert!(run(train_cmd(dir.path(), &full, &sets)).status.success());

    let part = dir.path().join("part");
    let child = train_cmd(dir.path(), &part, &sets)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = part.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 3 {
        assert!(t0.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // SAFETY: sending SIGINT to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "stderr: {err}");
    assert!(err.contains("checkpoint saved"), "{err}");
    let latest = std::fs::read_to_string(part.join("checkpoints/latest")).unwrap();
    let stopped: u64 = latest
        .trim()
        .strip_prefix("step-")
        .unwrap()
        .parse()
        .unwrap();
    assert!((3..400).contains(&stopped), "stopped at {stopped}");

    let mut c = frugal(dir.path());
    c.arg("train").arg("--resume").arg(&part);
    assert!(run(c).status.success());
    assert_eq!(losses(&full), losses(&part));
    let a = std::fs::read(full.join("checkpoints/step-400/model.safetensors")).unwrap();
    let b = std::fs::read(part.join("checkpoints/step-400/model.safetensors")).unwrap();
    assert!(a == b, "weights after Ctrl-C and resume differ");
}
