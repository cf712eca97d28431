//! Adapter fine-tuning end to end: only the adapter trains (plain, per-layer and checkpointed
//! steps, LoRA and QLoRA), `frugal train` with `adapter.kind` on a Hugging Face folder and
//! instruction data, `frugal eval` / `generate` with `--adapter`, and `frugal merge` (dense for
//! LoRA; int4 for QA-LoRA, whose merged model computes what base + adapter computed).

mod common;

use common::{assert_clean_error, frugal, run};
use frugal_models::llama::{Llama, LlamaConfig};
use frugal_models::{EmbeddingKind, LinearKind};
use frugal_train::config::Config;
use frugal_train::run as frun;
use frugal_train::step::{self, Batch, Groups, Plan};
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Device, Kind, Tensor};

const WORDS: &[&str] = &[
    "the", "of", "and", "to", "a", "in", "is", "it", "you", "that", "he", "was", "for", "on",
    "are", "with", "as", "his", "they", "be", "at", "one", "have", "this", "from", "or",
];

/// A random LLaMA in a Hugging Face folder (widths multiples of 32, so that int4 groups of 32
/// fit), with the PEFT fixtures' 63-token word tokenizer.
fn base_folder(dir: &Path) -> PathBuf {
    base_folder_with(dir, "base", |_| {})
}

/// [`base_folder`] in `dir/name`, its shape changed by `edit` before the random weights are
/// made.
fn base_folder_with(dir: &Path, name: &str, edit: impl Fn(&mut LlamaConfig)) -> PathBuf {
    let base = dir.join(name);
    std::fs::create_dir_all(&base).unwrap();
    let mut cfg = LlamaConfig::preset("tiny").unwrap();
    cfg.vocab_size = 64;
    cfg.hidden_size = 64;
    cfg.intermediate_size = 128;
    cfg.num_hidden_layers = 2;
    cfg.num_attention_heads = 4;
    cfg.num_key_value_heads = 4;
    cfg.max_position_embeddings = 64;
    edit(&mut cfg);
    tch::manual_seed(21);
    let vs = VarStore::new(Device::Cpu);
    let _model = Llama::new(
        &vs.root(),
        &cfg,
        &LinearKind::Dense,
        &EmbeddingKind::Dense,
        Kind::Float,
    )
    .unwrap();
    // Biases and norms (q/k norms included) off their initial zeros and ones, so that every
    // part moves the outputs.
    tch::no_grad(|| {
        for (name, v) in vs.variables() {
            if name.ends_with(".bias") || name.contains("norm") {
                let _ = v.shallow_clone().g_add_(&(v.randn_like() * 0.2));
            }
        }
    });
    frugal_models::weights::save(&vs, &base.join("model.safetensors")).unwrap();
    let mut json = serde_json::to_value(&cfg).unwrap();
    // transformers' Phi-3 pads with token 32000 unless told otherwise: beyond this vocabulary.
    json["pad_token_id"] = 0.into();
    std::fs::write(base.join("config.json"), json.to_string()).unwrap();
    let tok = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../frugal-models/tests/fixtures/peft/tiny_llama/tokenizer.json");
    std::fs::copy(tok, base.join("tokenizer.json")).unwrap();
    base
}

/// Instruction records: a prompt of 6 words and a response that repeats its first 3.
fn instructions(dir: &Path, n: usize) -> PathBuf {
    let mut s = 7u64;
    let mut lines = String::new();
    for _ in 0..n {
        let words: Vec<&str> = (0..6)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                WORDS[(s >> 33) as usize % WORDS.len()]
            })
            .collect();
        let rec = serde_json::json!({"prompt": words.join(" "), "response": words[..3].join(" ")});
        lines.push_str(&rec.to_string());
        lines.push('\n');
    }
    let path = dir.join("sft.jsonl");
    std::fs::write(&path, lines).unwrap();
    path
}

fn settings(base: &Path, data: &Path, kind: &str) -> Vec<String> {
    [
        format!("model.from_pretrained=\"{}\"", base.display()),
        format!("data.path=\"{}\"", data.display()),
        "data.val_every=5".into(),
        format!("adapter.kind=\"{kind}\""),
        "adapter.r=4".into(),
        "adapter.alpha=8".into(),
        "adapter.target_modules=\"all-linear\"".into(),
        "adapter.group_size=32".into(),
        "train.device=\"cpu\"".into(),
        "train.batch_size=4".into(),
        "train.seq_len=16".into(),
        "train.max_steps=4".into(),
        "train.warmup_steps=1".into(),
        "train.lr=0.01".into(),
        "train.eval_every=2".into(),
        "train.eval_batches=2".into(),
        "train.threads=1".into(),
    ]
    .into_iter()
    .collect()
}

/// `frugal train --config configs/<config> --out <out> --set ...`.
fn train_with(dir: &Path, config: &str, out: &Path, sets: &[String]) -> std::process::Output {
    let mut c = frugal(dir);
    let config = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../configs")
        .join(config);
    c.arg("train")
        .arg("--config")
        .arg(config)
        .arg("--out")
        .arg(out);
    for s in sets {
        c.arg("--set").arg(s);
    }
    run(c)
}

fn train(dir: &Path, out: &Path, sets: &[String]) {
    assert!(
        train_with(dir, "default.toml", out, sets).status.success(),
        "train failed"
    );
}

/// The config of `settings` as the trainer reads it.
fn config_of(sets: &[String]) -> Config {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/default.toml");
    frugal_train::config::load(&config, sets).unwrap()
}

/// Guarantee: in an adapter run only the adapter's variables change: every base variable is
/// bit-identical after a few optimizer steps, every adapter variable moved, for LoRA and
/// QLoRA, with plain steps, per-layer updates and activation checkpointing (whose frozen
/// block inputs must still train the adapters).
#[test]
fn only_the_adapter_trains() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_folder(dir.path());
    let data = instructions(dir.path(), 8);
    for (kind, plan) in [
        ("lora", Plan::default()),
        (
            "lora",
            Plan {
                layerwise: true,
                ..Plan::default()
            },
        ),
        (
            "lora",
            Plan {
                checkpointing: true,
                ..Plan::default()
            },
        ),
        (
            "qlora",
            Plan {
                layerwise: true,
                checkpointing: true,
                ce_chunk: 16,
                ..Plan::default()
            },
        ),
        ("dora", Plan::default()),
    ] {
        let cfg = config_of(&settings(&base, &data, kind));
        let shape = cfg.decoder_config(64).unwrap();
        let weights = frun::pretrained_weights(&cfg).unwrap();
        let mut m = frun::model(&cfg.model_build(), &shape, Device::Cpu, Some(&weights)).unwrap();
        let params = m.add_adapter(&cfg).unwrap();
        assert!(!params.is_empty());
        assert!(params.iter().all(|(n, _)| n.contains(".lora_")), "{kind}");
        let frozen: Vec<(String, Tensor)> = frugal_models::weights::named_variables(&m.vs)
            .into_iter()
            .filter(|(n, _)| !n.contains(".lora_"))
            .map(|(n, t)| (n, t.detach().copy()))
            .collect();
        if kind == "qlora" {
            let q = m.net.linears()[0].1.quantized().map(|q| q.weight.family());
            assert_eq!(q, Some("4bit"), "the QLoRA base is NF4");
        }
        let before: Vec<Tensor> = params.iter().map(|(_, t)| t.detach().copy()).collect();
        let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
        let tensors: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
        let groups = Groups::of(&names, 2).unwrap();
        let mut opt =
            frugal_train::optimizers::build(&cfg.optim, cfg.train.seed, params, 0.01).unwrap();
        m.set_training(true);
        let ids = Tensor::randint(64, [2, 16], (Kind::Int64, Device::Cpu));
        let targets = ids.roll([-1i64].as_slice(), [1i64].as_slice());
        for _ in 0..3 {
            let inputs = [ids.shallow_clone(), targets.shallow_clone()];
            let batch = Batch {
                inputs: &inputs,
                scale: 1.0,
            };
            let mut sink = |idx: &[usize], g: Option<Vec<Tensor>>| match g {
                Some(g) => opt.step_with_grads(idx, g),
                None => Ok(()),
            };
            step::micro_step(&m.net, &tensors, &groups, &plan, &batch, &mut sink).unwrap();
            if !plan.layerwise {
                opt.step().unwrap();
                opt.zero_grad();
            }
        }
        for (n, t) in &frozen {
            let now = m.vs.variables()[n].detach();
            assert!(now.equal(t), "{kind} {plan:?}: base variable {n} changed");
            assert!(!m.vs.variables()[n].requires_grad(), "{n} is frozen");
        }
        for ((n, b), t) in names.iter().zip(&before).zip(&tensors) {
            let moved = (t - b).abs().max().double_value(&[]);
            assert!(
                moved > 0.0,
                "{kind} {plan:?}: adapter variable {n} did not train"
            );
        }
    }
}

/// Guarantee: with adapter dropout, activation checkpointing recomputes each block with the
/// dropout masks of its forward pass: the adapters' gradients equal those of the block-by-block
/// pass that keeps its activations (same torch seed), and dropout is really on (another seed
/// gives other gradients).
#[test]
fn checkpointing_recomputes_the_dropout_masks() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_folder(dir.path());
    let data = instructions(dir.path(), 8);
    let mut sets = settings(&base, &data, "lora");
    sets.push("adapter.dropout=0.5".into());
    let cfg = config_of(&sets);
    let shape = cfg.decoder_config(64).unwrap();
    let weights = frun::pretrained_weights(&cfg).unwrap();
    let mut m = frun::model(&cfg.model_build(), &shape, Device::Cpu, Some(&weights)).unwrap();
    let params = m.add_adapter(&cfg).unwrap();
    m.set_training(true);
    let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
    let tensors: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
    let groups = Groups::of(&names, 2).unwrap();
    let ids = Tensor::randint(64, [2, 16], (Kind::Int64, Device::Cpu));
    let inputs = [
        ids.shallow_clone(),
        ids.roll([-1i64].as_slice(), [1i64].as_slice()),
    ];
    let grads = |plan: Plan, seed: i64| -> Vec<Tensor> {
        for t in &tensors {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        tch::manual_seed(seed);
        let batch = Batch {
            inputs: &inputs,
            scale: 1.0,
        };
        let mut none = |_: &[usize], _: Option<Vec<Tensor>>| Ok(());
        step::micro_step(&m.net, &tensors, &groups, &plan, &batch, &mut none).unwrap();
        tensors.iter().map(|t| t.grad().copy()).collect()
    };
    let kept = grads(
        Plan {
            blockwise: true,
            ..Plan::default()
        },
        7,
    );
    let recomputed = grads(
        Plan {
            checkpointing: true,
            ..Plan::default()
        },
        7,
    );
    let other = grads(
        Plan {
            checkpointing: true,
            ..Plan::default()
        },
        8,
    );
    let diff = |a: &[Tensor], b: &[Tensor]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs().max().double_value(&[]))
            .fold(0.0, f64::max)
    };
    assert!(
        diff(&kept, &recomputed) < 1e-6,
        "{}",
        diff(&kept, &recomputed)
    );
    assert!(
        diff(&kept, &other) > 1e-4,
        "dropout off? {}",
        diff(&kept, &other)
    );
}

/// Guarantee: `frugal train` with a LoRA adapter on a Hugging Face folder and instruction data
/// writes PEFT files (run `adapter/` and every checkpoint, no base weights); `frugal eval` runs
/// on the run and on `--model BASE --adapter RUN/adapter`; `frugal merge` writes a
/// dense model whose loss equals the adapted one; `frugal generate --adapter` runs.
#[test]
fn lora_run_eval_merge_generate() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_folder(dir.path());
    let data = instructions(dir.path(), 40);
    let out = dir.path().join("run");
    train(dir.path(), &out, &settings(&base, &data, "lora"));
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert!(out.join("adapter").join(f).is_file(), "{f}");
        assert!(out.join("checkpoints/step-4").join(f).is_file(), "{f}");
    }
    assert!(!out.join("checkpoints/step-4/model.safetensors").exists());
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);

    let eval = |args: &[&str]| -> f64 {
        let mut c = frugal(dir.path());
        c.arg("eval").args(args).arg("--data").arg(&data);
        let o = run(c);
        assert!(o.status.success());
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["loss"].as_f64().unwrap()
    };
    let (b, a, r) = (
        base.to_str().unwrap(),
        out.join("adapter"),
        out.to_str().unwrap(),
    );
    // The run's own evaluation (its windows are the run's seq_len, 16) loads the base and the
    // latest checkpoint's adapter.
    let with_run = eval(&["--run", r]);
    assert!(with_run.is_finite());
    let with_adapter = eval(&["--model", b, "--adapter", a.to_str().unwrap()]);
    let plain = eval(&["--model", b]);
    assert!(
        with_adapter < plain,
        "the adapter learned: {with_adapter} vs base {plain}"
    );

    let merged = dir.path().join("merged");
    let mut c = frugal(dir.path());
    c.args([
        "merge",
        "--base",
        b,
        "--adapter",
        a.to_str().unwrap(),
        "--out",
    ])
    .arg(&merged);
    assert!(run(c).status.success());
    assert!(merged.join("tokenizer.json").is_file());
    let m = eval(&["--model", merged.to_str().unwrap()]);
    assert!(
        (m - with_adapter).abs() < 1e-4,
        "merged {m} vs unmerged {with_adapter}"
    );

    let mut c = frugal(dir.path());
    c.args(["generate", "--model", b, "--adapter", a.to_str().unwrap()])
        .args([
            "--prompt",
            "the one",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
        ]);
    let o = run(c);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("the one"));

    // int4 merge of a plain LoRA adapter: refused by name.
    let mut c = frugal(dir.path());
    c.args([
        "merge",
        "--base",
        b,
        "--adapter",
        a.to_str().unwrap(),
        "--format",
        "int4",
    ])
    .arg("--out")
    .arg(dir.path().join("bad"));
    assert_clean_error(&run(c), "QA-LoRA");
}

/// Guarantee: a QA-LoRA run's adapter folds into the int4 base (`frugal merge --format int4`):
/// the merged int4 model's logits equal base + adapter's within 1e-4, and the merged file
/// keeps int4 codes with float zero points.
#[test]
fn qalora_merges_into_int4_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_folder(dir.path());
    let data = instructions(dir.path(), 40);
    let out = dir.path().join("run");
    train(dir.path(), &out, &settings(&base, &data, "qalora"));
    let adapter = out.join("adapter");
    let merged = dir.path().join("merged");
    let mut c = frugal(dir.path());
    c.arg("merge")
        .arg("--base")
        .arg(&base)
        .arg("--adapter")
        .arg(&adapter);
    c.arg("--out").arg(&merged).args(["--format", "int4"]);
    assert!(run(c).status.success());

    let file =
        frugal_core::safetensors_io::SafetensorsFile::open(&merged.join("model.safetensors"))
            .unwrap();
    let names = file.names();
    assert!(names.contains(&"model.layers.0.self_attn.q_proj.zeros".to_string()));
    assert!(names.contains(&"model.layers.0.self_attn.q_proj.qweight".to_string()));
    assert!(!names.iter().any(|n| n.contains("lora")));

    // Base + adapter, as trained (int4 base of group 32).
    let cfg = config_of(&settings(&base, &data, "qalora"));
    let shape = cfg.decoder_config(64).unwrap();
    let mut unmerged = frun::model(
        &cfg.model_build(),
        &shape,
        Device::Cpu,
        frun::pretrained_weights(&cfg).as_deref(),
    )
    .unwrap();
    unmerged.load_adapter(&adapter, "default").unwrap();
    // The merged folder, read as stored (int4, float zeros), no adapter.
    let mut plain = cfg.clone();
    plain.adapter.kind = frugal_train::config::AdapterKind::None;
    plain.model.linear = cfg.adapter.base_linear().unwrap();
    let merged_model = frun::model(
        &plain.model_build(),
        &shape,
        Device::Cpu,
        Some(&merged.join("model.safetensors")),
    )
    .unwrap();
    let ids = Tensor::randint(64, [2, 24], (Kind::Int64, Device::Cpu));
    let (a, b) = tch::no_grad(|| (unmerged.net.forward(&ids), merged_model.net.forward(&ids)));
    let base_model = frun::model(
        &plain.model_build(),
        &shape,
        Device::Cpu,
        frun::pretrained_weights(&cfg).as_deref(),
    )
    .unwrap();
    let c0 = tch::no_grad(|| base_model.net.forward(&ids));
    let d = (&a - &b).abs().max().double_value(&[]);
    assert!(d < 1e-4, "merged int4 vs base + adapter: {d}");
    let moved = (&a - &c0).abs().max().double_value(&[]);
    assert!(moved > 1e-3, "the adapter changed the model ({moved})");
}

/// Guarantee: bad adapter settings are clean errors naming the key.
#[test]
fn bad_adapter_settings_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_folder(dir.path());
    let data = instructions(dir.path(), 40);
    for (set, needle) in [
        ("adapter.r=0", "adapter.r"),
        ("adapter.kind=\"lorax\"", "adapter.kind"),
        ("adapter.target_modules=[\"q_prj\"]", "'q_prj'"),
        ("adapter.init=\"pissa\"", "adapter.init"),
    ] {
        let mut sets = settings(&base, &data, "qlora");
        sets.push(set.into());
        let out = train_with(dir.path(), "default.toml", &dir.path().join("x"), &sets);
        assert_clean_error(&out, needle);
    }
}

/// Guarantee: instruction records score the response alone: the prompt's tokens are never
/// targets (-100 in a batch), the response's and the end-of-text token are.
#[test]
fn instruction_data_scores_the_response_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.jsonl");
    std::fs::write(
        &path,
        "{\"prompt\": \"the one of\", \"response\": \"and to\"}\n{\"text\": \"a in is\"}\n",
    )
    .unwrap();
    let tok_path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../frugal-models/tests/fixtures/peft/tiny_llama/tokenizer.json");
    let tok = frugal_train::tokenize::load_tokenizer_file(&tok_path).unwrap();
    let docs = frugal_train::data::load_documents(path.to_str().unwrap()).unwrap();
    let (ids, scored) = frugal_train::tokenize::encode_with_targets(&tok, &docs).unwrap();
    let scored = scored.expect("instruction data marks its targets");
    // "the one of" | "and to" </s> | "a in is" </s>
    assert_eq!(ids.len(), 3 + 3 + 4);
    assert_eq!(
        scored,
        vec![false, false, false, true, true, true, true, true, true, true]
    );
    let ds = frugal_train::data::TokenDataset::new(ids.clone(), 9)
        .unwrap()
        .with_scored(scored)
        .unwrap();
    let (x, y) = ds.batch(&[0]);
    let y: Vec<i64> = Vec::try_from(y.view([-1])).unwrap();
    let x: Vec<i64> = Vec::try_from(x.view([-1])).unwrap();
    assert_eq!(x[0], ids[0] as i64);
    // Targets 1 and 2 are prompt tokens; the rest are the next tokens.
    assert_eq!(&y[..2], &[-100, -100]);
    assert_eq!(y[2], ids[3] as i64);
    assert!(y[2..].iter().all(|&t| t >= 0));
}

/// Guarantee: the shipped `configs/finetune-qlora.toml` is valid and trains (bf16 compute, NF4
/// base) once a base and data are set.
#[test]
fn shipped_qlora_config_trains() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_folder(dir.path());
    let data = instructions(dir.path(), 40);
    let out = dir.path().join("run");
    let sets: Vec<String> = vec![
        format!("model.from_pretrained=\"{}\"", base.display()),
        format!("data.path=\"{}\"", data.display()),
        "data.val_every=5".into(),
        "train.device=\"cpu\"".into(),
        "train.seq_len=16".into(),
        "train.batch_size=2".into(),
        "train.max_steps=2".into(),
        "train.warmup_steps=1".into(),
        "train.eval_every=1".into(),
        "train.threads=1".into(),
    ];
    let o = train_with(dir.path(), "finetune-qlora.toml", &out, &sets);
    assert!(o.status.success());
    let cfg = peft_config(&out.join("adapter"));
    assert_eq!(cfg["r"], 64);
    assert_eq!(cfg["lora_alpha"], 16.0);
    let memory: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("memory.json")).unwrap()).unwrap();
    let bpp = memory["frozen_base"]["quantized_bytes_per_param"]
        .as_f64()
        .unwrap();
    assert!(
        bpp > 0.5 && bpp < 0.52,
        "NF4 with double quantization: {bpp} bytes per parameter"
    );
}

fn peft_config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
        .unwrap()
}

/// Guarantee: an adapter run resumed from a checkpoint (base from `from_pretrained`, adapter
/// and optimizer from the checkpoint) gives the uninterrupted run's losses and adapter,
/// bit for bit, with dropout on.
#[test]
fn adapter_run_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_folder(dir.path());
    let data = instructions(dir.path(), 40);
    let mut sets = settings(&base, &data, "lora");
    sets.extend([
        "adapter.dropout=0.1".into(),
        "train.max_steps=6".into(),
        "train.save_every=3".into(),
        "train.keep_checkpoints=0".into(),
        "train.eval_every=0".into(),
    ]);
    let full = dir.path().join("full");
    train(dir.path(), &full, &sets);
    let part = dir.path().join("part");
    std::fs::create_dir_all(&part).unwrap();
    for f in ["config.toml", "tokenizer.json", "metrics.jsonl"] {
        std::fs::copy(full.join(f), part.join(f)).unwrap();
    }
    let ck = part.join("checkpoints/step-3");
    std::fs::create_dir_all(&ck).unwrap();
    for e in std::fs::read_dir(full.join("checkpoints/step-3"))
        .unwrap()
        .flatten()
    {
        std::fs::copy(e.path(), ck.join(e.file_name())).unwrap();
    }
    std::fs::write(part.join("checkpoints/latest"), "step-3\n").unwrap();
    // Keep only the first 3 steps' metrics, as a run stopped there would have.
    let text = std::fs::read_to_string(full.join("metrics.jsonl")).unwrap();
    let head: Vec<&str> = text.lines().take(3).collect();
    std::fs::write(part.join("metrics.jsonl"), head.join("\n") + "\n").unwrap();
    let mut c = frugal(dir.path());
    c.arg("train").arg("--resume").arg(&part);
    assert!(run(c).status.success());
    assert_eq!(common::losses(&full), common::losses(&part));
    let a = std::fs::read(full.join("adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(part.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(a == b, "the resumed adapter differs");
}

/// A change to [`base_folder_with`]'s shape.
type ShapeEdit = fn(&mut LlamaConfig);

/// The families' shapes [`gqa_lora_runs_of_every_family_load_in_peft`] trains: a
/// Llama-3.x shape (2 KV heads, an explicit head_dim of 32 ≠ 64 / 4, Llama 3 RoPE scaling),
/// Qwen2 (q/k/v biases, tied embeddings), Qwen3 (q/k norms, head_dim 32), Mistral (a window
/// of 8 positions, shorter than the 16 of a sequence), Gemma 2 (soft-capping, a sliding then a
/// global layer), Phi-3 (fused qkv_proj and gate_up_proj, a window of 8) and Gemma 3 (q/k norms,
/// local and global RoPE bases, linear scaling).
fn family_shapes() -> Vec<(&'static str, ShapeEdit)> {
    use frugal_models::llama::{DecoderType, LayerType};
    vec![
        ("llama", |c| {
            c.num_key_value_heads = 2;
            c.head_dim = Some(32);
            c.rope_theta = 5e5;
            c.rope_scaling = Some(frugal_models::llama::RopeScaling::Llama3(
                frugal_models::llama::Llama3Rope {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8,
                },
            ));
        }),
        ("qwen2", |c| {
            c.model_type = DecoderType::Qwen2;
            c.num_key_value_heads = 2;
            c.tie_word_embeddings = true;
        }),
        ("qwen3", |c| {
            c.model_type = DecoderType::Qwen3;
            c.num_key_value_heads = 2;
            c.head_dim = Some(32);
            c.rope_theta = 1e6;
        }),
        ("mistral", |c| {
            c.model_type = DecoderType::Mistral;
            c.num_key_value_heads = 2;
            c.sliding_window = Some(8);
        }),
        ("gemma2", |c| {
            c.model_type = DecoderType::Gemma2;
            c.num_key_value_heads = 2;
            c.head_dim = Some(32);
            c.tie_word_embeddings = true;
            c.sliding_window = Some(8);
            c.layer_types = Some(vec![LayerType::SlidingAttention, LayerType::FullAttention]);
            c.query_pre_attn_scalar = Some(24);
            c.attn_logit_softcapping = Some(2.0);
            c.final_logit_softcapping = Some(3.0);
        }),
        ("phi3", |c| {
            c.model_type = DecoderType::Phi3;
            c.num_key_value_heads = 2;
            c.sliding_window = Some(8);
        }),
        ("gemma3", |c| {
            c.model_type = DecoderType::Gemma3Text;
            c.num_key_value_heads = 2;
            c.head_dim = Some(32);
            c.tie_word_embeddings = true;
            c.sliding_window = Some(8);
            c.layer_types = Some(vec![LayerType::SlidingAttention, LayerType::FullAttention]);
            c.query_pre_attn_scalar = Some(24);
            c.rope_theta = 1e6;
            c.rope_local_base_freq = Some(1e4);
            c.rope_scaling = Some(frugal_models::llama::RopeScaling::Linear { factor: 8.0 });
        }),
    ]
}

/// Guarantee: for each family of [`family_shapes`], a LoRA adapter `frugal train` makes (all
/// seven projections adapted, k/v at their kv_heads · head_dim width) loads in PEFT on the
/// same base, and PEFT's logits equal `frugal eval --model BASE --adapter A --logits`' within
/// 1e-4; transformers reads the folder's config.json as Frugal writes it, as the same family.
/// A QLoRA run on each folder trains too.
#[test]
fn gqa_lora_runs_of_every_family_load_in_peft() {
    let Some(python) = common::peft_python() else {
        return;
    };
    for (family, edit) in family_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let base = base_folder_with(dir.path(), family, edit);
        lora_run_loads_in_peft(&python, dir.path(), &base, family);
        let data = instructions(dir.path(), 40);
        let out = dir.path().join("qlora");
        train(dir.path(), &out, &settings(&base, &data, "qlora"));
        let losses = common::losses(&out);
        assert_eq!(losses.len(), 4, "{family}: {losses:?}");
        assert!(
            losses
                .iter()
                .all(|l| !l.contains("null") && !l.contains("NaN")),
            "{family}: {losses:?}"
        );
        assert!(out.join("adapter/adapter_model.safetensors").exists());
    }
}

/// Trains a LoRA adapter on folder `base` and checks it in PEFT (see
/// [`gqa_lora_runs_of_every_family_load_in_peft`]).
fn lora_run_loads_in_peft(python: &str, dir: &Path, base: &Path, family: &str) {
    let cfg = LlamaConfig::from_hf_file(&base.join("config.json")).unwrap();
    let data = instructions(dir, 40);
    let out = dir.join("run");
    train(dir, &out, &settings(base, &data, "lora"));
    let adapter = out.join("adapter");
    let k = frugal_core::safetensors_io::SafetensorsFile::open(
        &adapter.join("adapter_model.safetensors"),
    )
    .unwrap();
    // k_proj, or Phi-3's fused qkv_proj, whose rows are the queries, keys and values.
    let (layer, rows) = match cfg.model_type {
        frugal_models::llama::DecoderType::Phi3 => ("qkv_proj", cfg.q_width() + 2 * cfg.kv_width()),
        _ => ("k_proj", cfg.kv_width()),
    };
    let (shape, _) = k
        .info(&format!(
            "base_model.model.model.layers.0.self_attn.{layer}.lora_B.weight"
        ))
        .unwrap();
    assert_eq!(
        shape,
        [rows, 4],
        "{family}: {layer}'s B has kv_heads · head_dim rows per key and value"
    );
    let logits = dir.join("logits.safetensors");
    let mut c = frugal(dir);
    c.args(["eval", "--model"])
        .arg(base)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--data")
        .arg(&data)
        .arg("--logits")
        .arg(&logits);
    assert!(run(c).status.success());
    let f = frugal_core::safetensors_io::SafetensorsFile::open(&logits).unwrap();
    let ids = f.tensor("input_ids", Device::Cpu).unwrap();
    let ours = f.tensor("logits", Device::Cpu).unwrap();
    let ids_file = dir.join("ids.safetensors");
    frugal_core::safetensors_io::save(&ids_file, &[("ids".into(), ids)], None).unwrap();
    let peft_logits = dir.join("peft_logits.safetensors");
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../frugal-models/tests/fixtures/peft/peft_check.py");
    let status = std::process::Command::new(python)
        .arg(script)
        .arg(base)
        .arg(&adapter)
        .arg(&ids_file)
        .arg(&peft_logits)
        .status()
        .unwrap();
    assert!(status.success(), "{family}: peft_check.py failed");
    let theirs = frugal_core::safetensors_io::SafetensorsFile::open(&peft_logits)
        .unwrap()
        .tensor("logits", Device::Cpu)
        .unwrap();
    let d = (&ours - &theirs).abs().max().double_value(&[]);
    eprintln!("{family}: PEFT on the run's adapter, max |logit difference| {d:e}");
    assert!(d < 1e-4, "{family}: PEFT on our adapter: {d}");
}
