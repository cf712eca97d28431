//! Hugging Face folders that this build does not compute exactly are refused by name, never
//! loaded silently wrong: other model families by `model_type` ("not supported yet" or "not
//! supported"), settings it does not implement by key, and weights that disagree with the
//! config (layer count, an output head the config ties away, tensors the model would not use)
//! by tensor; and the families it computes (LLaMA shapes, Qwen2, Qwen3, Mistral, Gemma 2/3)
//! load through the command line with transformers' logits. The folders are made at test time by transformers
//! (`crates/frugal-models/tests/fixtures/gen_refusals.py`); without Python and transformers the
//! tests are skipped, unless `FRUGAL_PEFT=1` (set by `cargo xtask test`) makes that a failure.

mod common;
use common::{assert_clean_error, frugal, run, train_cmd};
use frugal_models::decoder::DecoderConfig;
use frugal_models::llama::LlamaConfig;
use frugal_train::config::Config;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The folders `gen_refusals.py` made (each with the tiny tokenizer copied in), or None when
/// Python with transformers is missing (a failure under `FRUGAL_PEFT=1`).
fn fixtures() -> Option<&'static Path> {
    static DIR: OnceLock<Option<tempfile::TempDir>> = OnceLock::new();
    DIR.get_or_init(|| {
        let python = std::env::var("FRUGAL_PYTHON").unwrap_or_else(|_| "python3".into());
        let required = std::env::var("FRUGAL_PEFT").is_ok_and(|v| v == "1");
        let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("../frugal-models/tests/fixtures");
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(&python)
            .arg(here.join("gen_refusals.py"))
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                assert!(
                    !required,
                    "FRUGAL_PEFT=1 but {python} cannot make the fixtures: {why}"
                );
                eprintln!("skipped: {python} cannot make the fixtures with transformers: {why}");
                return None;
            }
        }
        let tok = here.join("peft/tiny_llama/tokenizer.json");
        for e in std::fs::read_dir(dir.path()).unwrap() {
            std::fs::copy(&tok, e.unwrap().path().join("tokenizer.json")).unwrap();
        }
        Some(dir)
    })
    .as_ref()
    .map(|d| d.path())
}

/// The fixture folder `name`; None (skip) without transformers.
fn folder(name: &str) -> Option<PathBuf> {
    fixtures().map(|d| d.join(name))
}

/// The library's error for folder `dir`: reading its `config.json` as the trainer does
/// (`model.from_pretrained`), then building the model and loading its weights.
fn library_error(dir: &Path) -> String {
    let mut cfg = Config::default();
    cfg.model.from_pretrained = dir.display().to_string();
    cfg.train.seq_len = 16;
    let shape = match cfg.llama_config(64) {
        Ok(shape) => shape,
        Err(e) => return e.to_string(),
    };
    let weights = frugal_train::run::pretrained_weights(&cfg).unwrap();
    let shape = DecoderConfig::Llama(shape);
    match frugal_train::run::model(&cfg.model_build(), &shape, tch::Device::Cpu, Some(&weights)) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// A small text file to evaluate or train on.
fn text(dir: &Path) -> PathBuf {
    let path = dir.join("text.txt");
    std::fs::write(
        &path,
        "the model learns to predict the next token.\n".repeat(40),
    )
    .unwrap();
    path
}

/// Checks that folder `name` is refused with one line that names `dir/config.json` (or the
/// weights) and every one of `needles`: by the library, by `frugal eval --model`, and by
/// `frugal train` with `model.from_pretrained` before any step is taken.
fn refused(name: &str, needles: &[&str]) {
    let Some(dir) = folder(name) else { return };
    let err = library_error(&dir);
    assert!(!err.contains('\n'), "{name}: not one line: {err}");
    assert!(
        err.contains(&dir.display().to_string()),
        "{name}: no file in: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "{name}: '{n}' not in: {err}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = text(tmp.path());
    let mut eval = frugal(tmp.path());
    eval.args(["eval", "--model"])
        .arg(&dir)
        .arg("--data")
        .arg(&data);
    let out = run(eval);
    for n in needles.iter().chain([&dir.display().to_string().as_str()]) {
        assert_clean_error(&out, n);
    }
    let run_dir = tmp.path().join("run");
    let sets = [
        format!("model.from_pretrained=\"{}\"", dir.display()),
        format!("data.path=\"{}\"", data.display()),
        "train.device=\"cpu\"".into(),
        "train.batch_size=2".into(),
        "train.seq_len=16".into(),
        "train.max_steps=2".into(),
        "train.threads=1".into(),
    ];
    let out = run(train_cmd(tmp.path(), &run_dir, &sets));
    for n in needles {
        assert_clean_error(&out, n);
    }
    assert!(
        !run_dir.join("metrics.jsonl").exists() && !run_dir.join("checkpoints").exists(),
        "{name}: the run trained"
    );
}

/// Guarantee: settings of a loaded family that this build does not compute are refused by key:
/// Qwen2's sliding-window layers, and biases in a Mistral config (transformers' Mistral has
/// none, so the file was made for another model).
#[test]
fn family_settings_that_are_not_built_are_refused_by_key() {
    refused(
        "qwen2_sliding",
        &["use_sliding_window: true", "not supported yet"],
    );
    refused(
        "mistral_with_bias",
        &["attention_bias: true is not a mistral setting"],
    );
    refused(
        "gemma3_bidirectional",
        &["use_bidirectional_attention: true: attention to later positions"],
    );
}

/// Guarantee: GPT-2 and the MoE Mixtral are refused by model_type as not supported (for good).
#[test]
fn gpt2_and_mixtral_are_refused_as_not_supported() {
    refused("gpt2", &["model_type: \"gpt2\" is not supported (GPT-2"]);
    refused(
        "mixtral",
        &["model_type: \"mixtral\" is not supported (mixture of experts"],
    );
}

/// Guarantee: a config.json without model_type is refused, naming the key.
#[test]
fn missing_model_type_is_refused() {
    refused("llama_no_model_type", &["model_type: missing"]);
}

/// Guarantee: a LLaMA with key/value heads that do not divide the query heads, or a sliding
/// window shorter than its positions, is refused, naming the key.
#[test]
fn llama_settings_that_are_not_built_are_refused_by_key() {
    refused(
        "llama_gqa_not_dividing",
        &["num_key_value_heads: 3 must be positive and divide num_attention_heads 4"],
    );
    refused("llama_sliding_window", &["sliding_window: 8"]);
}

/// Guarantee: a num_hidden_layers that disagrees with the file's layers is refused, naming both
/// numbers, whether the file holds more layers or fewer.
#[test]
fn a_layer_count_that_disagrees_with_the_file_is_refused() {
    refused(
        "llama_fewer_layers_in_config",
        &["holds 3 layers", "the model 2 (num_hidden_layers = 2)"],
    );
    refused(
        "llama_more_layers_in_config",
        &["holds 2 layers", "the model 3 (num_hidden_layers = 3)"],
    );
}

/// Guarantee: tie_word_embeddings with an lm_head.weight in the file, and biases in a file whose
/// config does not declare them, are refused, naming the tensor.
#[test]
fn tensors_the_model_would_not_use_are_refused_by_name() {
    refused(
        "llama_tied_with_lm_head",
        &["'lm_head.weight' is not used", "tie_word_embeddings"],
    );
    refused(
        "llama_bias_unflagged",
        &[
            "'model.layers.0.self_attn.k_proj.bias' is not used",
            "declares no bias",
        ],
    );
}

/// Guarantee: a transformers-made LLaMA with tied embeddings (no lm_head.weight), whose
/// config.json carries every key transformers 5 writes, loads and evaluates.
#[test]
fn tied_llama_of_transformers_loads() {
    let Some(dir) = folder("llama_tied") else {
        return;
    };
    let shape = LlamaConfig::from_hf_file(&dir.join("config.json")).unwrap();
    assert!(shape.tie_word_embeddings);
    let tmp = tempfile::tempdir().unwrap();
    let data = text(tmp.path());
    let mut eval = frugal(tmp.path());
    eval.args(["eval", "--model"])
        .arg(&dir)
        .arg("--data")
        .arg(&data);
    let out = run(eval);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["loss"].as_f64().unwrap().is_finite(), "{v}");
}

/// Guarantee: transformers-made folders of every family this build computes load and evaluate
/// exactly through the command line: grouped-query attention with an explicit head_dim
/// (`llama_gqa`: 2 KV heads of width 16), multi-query attention with Llama 3 RoPE scaling past
/// original_max_position_embeddings (`llama3_rope`), linear, YaRN (the 24 positions past its
/// original 16) and dynamic NTK RoPE scaling,
/// a LLaMA with attention and MLP biases,
/// Qwen2 (q/k/v biases, tied embeddings), Qwen3 (q/k norms), Mistral (a window of 8
/// positions), Gemma 2 (soft-capping, local/global layers), Gemma 3 (q/k norms, local and
/// global RoPE bases) and Phi-3 (fused qkv_proj and gate_up_proj, a window of 8; and with
/// LongRoPE past its original 16 positions). `frugal eval --model DIR --logits FILE` gives transformers' logits within 1e-4
/// (`logits_check.py`), on sequences of 24 tokens.
#[test]
fn every_family_of_transformers_loads_and_matches() {
    let Some(python) = common::peft_python() else {
        return;
    };
    for name in [
        "llama_gqa",
        "llama3_rope",
        "llama_linear_rope",
        "llama_yarn_rope",
        "llama_dynamic_rope",
        "llama_attention_bias",
        "qwen2",
        "qwen3",
        "mistral",
        "gemma2",
        "gemma3",
        "phi3",
        "phi3_longrope",
    ] {
        let Some(dir) = folder(name) else { return };
        let shape = LlamaConfig::from_hf_file(&dir.join("config.json")).unwrap();
        assert!(
            shape.num_key_value_heads < shape.num_attention_heads,
            "{name}"
        );
        let tmp = tempfile::tempdir().unwrap();
        let data = text(tmp.path());
        let logits = tmp.path().join("logits.safetensors");
        let mut eval = frugal(tmp.path());
        eval.args(["eval", "--model"])
            .arg(&dir)
            .arg("--data")
            .arg(&data)
            .args(["--set", "train.seq_len=24", "--logits"])
            .arg(&logits);
        let out = run(eval);
        assert!(out.status.success(), "{name}");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/logits_check.py");
        let check = std::process::Command::new(&python)
            .arg(script)
            .arg(&dir)
            .arg(&logits)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let d: f64 = String::from_utf8_lossy(&check.stdout)
            .trim()
            .parse()
            .unwrap();
        eprintln!("{name}: frugal eval vs transformers, max |logit difference| {d:e}");
        assert!(d < 1e-4, "{name}: logits differ from transformers' by {d}");
    }
}
