//! The decoder families against transformers and PEFT: LLaMA shapes (grouped-query and
//! multi-query attention, an explicit `head_dim`, Llama 3's RoPE scaling with a large
//! `rope_theta`, `attention_bias` and `mlp_bias`), Qwen2 (q/k/v biases, tied embeddings), Qwen3
//! (per-head q/k norms), Mistral (a sliding window shorter than the sequence) and Gemma 1/2/3
//! ((1 + w) norms, scaled embeddings, GeGLU, soft-capping, local/global layers) and Phi-3 (fused
//! qkv_proj and gate_up_proj, adapters on them under PEFT's names). Tiny random
//! folders are made at test time by `fixtures/gen_decoders.py` (transformers 5.25, PEFT 0.21);
//! without Python, transformers and PEFT the tests are skipped, unless `FRUGAL_PEFT=1` (set by
//! `cargo xtask test`) makes that a failure.

mod common;

use frugal_adapters::peft;
use frugal_adapters::{LoraConfig, Targets};
use frugal_core::safetensors_io::{self, SafetensorsFile};
use frugal_models::adapted::{self, load_adapter};
use frugal_models::llama::{KvCache, Llama, LlamaConfig, RopeScaling};
use frugal_models::{weights, EmbeddingKind, LinearKind};
use std::path::Path;
use std::sync::OnceLock;
use tch::{nn::VarStore, Device, Kind, Tensor};

/// The variants `gen_decoders.py` writes.
const VARIANTS: &[&str] = &[
    "gqa",
    "mqa",
    "head_dim",
    "llama3_rope",
    "llama_bias",
    "qwen2",
    "qwen2_yarn",
    "qwen3",
    "mistral",
    "gemma",
    "gemma2",
    "gemma3",
    "phi3",
    "phi3_longrope",
];

fn python() -> String {
    std::env::var("FRUGAL_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// The folder the fixture script wrote, or None (skip) without transformers and PEFT (a
/// failure under `FRUGAL_PEFT=1`).
fn fixtures() -> Option<&'static Path> {
    static DIR: OnceLock<Option<tempfile::TempDir>> = OnceLock::new();
    DIR.get_or_init(|| {
        let required = std::env::var("FRUGAL_PEFT").is_ok_and(|v| v == "1");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gen_decoders.py");
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(python())
            .arg(script)
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(dir),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                assert!(
                    !required,
                    "FRUGAL_PEFT=1 but the fixtures cannot be made: {why}"
                );
                eprintln!("skipped: cannot make the fixtures with transformers/PEFT: {why}");
                None
            }
        }
    })
    .as_ref()
    .map(|d| d.path())
}

fn config(dir: &Path, name: &str) -> LlamaConfig {
    LlamaConfig::from_hf_file(&dir.join(name).join("config.json")).unwrap()
}

/// The folder `name` loaded exactly (every tensor used) into a model of kind `kind`.
fn load(dir: &Path, name: &str, cfg: &LlamaConfig, kind: &LinearKind) -> (VarStore, Llama) {
    let mut vs = VarStore::new(Device::Cpu);
    let mut model = Llama::new(&vs.root(), cfg, kind, &EmbeddingKind::Dense, Kind::Float).unwrap();
    let (mut linears, mut tables) = model.weights_mut();
    // One file, or the index of a sharded folder.
    let file = safetensors_io::model_weights(&dir.join(name)).unwrap();
    weights::load_model_exact(&mut vs, &mut linears, &mut tables, &file).unwrap();
    (vs, model)
}

fn reference(dir: &Path, name: &str, key: &str) -> Tensor {
    SafetensorsFile::open(&dir.join(format!("{name}_reference.safetensors")))
        .unwrap()
        .tensor(key, Device::Cpu)
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn logits(model: &Llama, ids: &Tensor) -> Tensor {
    tch::no_grad(|| model.forward(ids, None))
}

/// Guarantee: each variant's config reads into the shapes transformers built (k/v of width
/// kv_heads · head_dim, q/o of heads · head_dim), and one forward pass gives transformers' f32
/// logits within 1e-4. Llama 3's scaling and rope_theta matter: computed without them, the
/// logits move by more than 1e-3.
#[test]
fn logits_match_transformers() {
    let Some(dir) = fixtures() else { return };
    for name in VARIANTS {
        let cfg = config(dir, name);
        let (vs, model) = load(dir, name, &cfg, &LinearKind::Dense);
        let kv = cfg.num_key_value_heads * cfg.head_dim();
        let vars = vs.variables();
        match vars.get("model.layers.0.self_attn.qkv_proj.weight") {
            // Phi-3's fused layer: the queries, the keys, the values.
            Some(qkv) => assert_eq!(qkv.size(), [cfg.q_width() + 2 * kv, 32], "{name}"),
            None => {
                let k = &vars["model.layers.0.self_attn.k_proj.weight"];
                assert_eq!(k.size(), [kv, 32], "{name}");
            }
        }
        let o = &vars["model.layers.0.self_attn.o_proj.weight"];
        assert_eq!(o.size(), [32, 4 * cfg.head_dim()], "{name}");
        let ids = reference(dir, name, "ids");
        let want = reference(dir, name, "logits");
        let d = max_diff(&logits(&model, &ids), &want);
        eprintln!("{name}: max |logit difference| {d:e}");
        assert!(d < 1e-4, "{name}: max |logit difference| {d}");
        assert!(
            want.abs().max().double_value(&[]) > 0.5,
            "{name}: logits not trivial"
        );
    }
    let cfg = config(dir, "llama3_rope");
    assert!(cfg.rope_scaling.is_some() && cfg.rope_theta == 5e5);
    let mut plain = cfg.clone();
    plain.rope_scaling = None;
    let (_, unscaled) = load(dir, "llama3_rope", &plain, &LinearKind::Dense);
    let ids = reference(dir, "llama3_rope", "ids");
    let d = max_diff(
        &logits(&unscaled, &ids),
        &reference(dir, "llama3_rope", "logits"),
    );
    assert!(d > 1e-3, "the scaling does not matter here: {d}");
    let mut base = config(dir, "head_dim");
    base.rope_theta = 1e4;
    let (_, other) = load(dir, "head_dim", &base, &LinearKind::Dense);
    let ids = reference(dir, "head_dim", "ids");
    let d = max_diff(&logits(&other, &ids), &reference(dir, "head_dim", "logits"));
    assert!(d > 1e-3, "rope_theta does not matter here: {d}");
    // The families' parts are read: a window, biases on q/k/v only, q/k norms.
    let mistral = config(dir, "mistral");
    assert_eq!(mistral.sliding_window, Some(8));
    let mut unwindowed = mistral.clone();
    unwindowed.sliding_window = None;
    let (_, full) = load(dir, "mistral", &unwindowed, &LinearKind::Dense);
    let ids = reference(dir, "mistral", "ids");
    let d = max_diff(&logits(&full, &ids), &reference(dir, "mistral", "logits"));
    assert!(d > 1e-3, "the window does not matter here: {d}");
    let qwen2 = config(dir, "qwen2");
    assert!(qwen2.qkv_bias() && !qwen2.o_bias() && qwen2.tie_word_embeddings);
    let (vs, _) = load(dir, "qwen2", &qwen2, &LinearKind::Dense);
    let vars = vs.variables();
    assert!(vars.contains_key("model.layers.1.self_attn.v_proj.bias"));
    assert!(!vars.contains_key("model.layers.1.self_attn.o_proj.bias"));
    assert!(!vars.contains_key("lm_head.weight"));
    let qwen3 = config(dir, "qwen3");
    assert!(qwen3.qk_norm() && !qwen3.qkv_bias());
    let (vs, _) = load(dir, "qwen3", &qwen3, &LinearKind::Dense);
    assert_eq!(
        vs.variables()["model.layers.0.self_attn.k_norm.weight"].size(),
        [16]
    );
    let bias = config(dir, "llama_bias");
    let (vs, _) = load(dir, "llama_bias", &bias, &LinearKind::Dense);
    assert_eq!(
        vs.variables()["model.layers.0.mlp.down_proj.bias"].size(),
        [32]
    );
    assert!(vs
        .variables()
        .contains_key("model.layers.0.self_attn.o_proj.bias"));
    // YaRN matters here, its attention factor too.
    let yarn = config(dir, "qwen2_yarn");
    let Some(RopeScaling::Yarn(y)) = yarn.rope_scaling.clone() else {
        panic!("{:?}", yarn.rope_scaling)
    };
    let ids = reference(dir, "qwen2_yarn", "ids");
    let want = reference(dir, "qwen2_yarn", "logits");
    let mut unit = y.clone();
    unit.attention_factor = Some(1.0);
    for scaling in [None, Some(RopeScaling::Yarn(unit))] {
        let mut other = yarn.clone();
        other.rope_scaling = scaling;
        let (_, m) = load(dir, "qwen2_yarn", &other, &LinearKind::Dense);
        let d = max_diff(&logits(&m, &ids), &want);
        assert!(d > 1e-3, "YaRN does not matter here: {d}");
    }
    // Gemma 2's soft-capping and Gemma 3's local RoPE base matter here.
    let gemma2 = config(dir, "gemma2");
    assert_eq!(
        (
            gemma2.attn_logit_softcapping,
            gemma2.final_logit_softcapping,
            gemma2.window_of(0),
            gemma2.window_of(1)
        ),
        (Some(2.0), Some(3.0), Some(8), None)
    );
    let ids = reference(dir, "gemma2", "ids");
    let want = reference(dir, "gemma2", "logits");
    for edit in [
        (|c: &mut LlamaConfig| c.attn_logit_softcapping = None) as fn(&mut LlamaConfig),
        |c| c.final_logit_softcapping = None,
        |c| c.query_pre_attn_scalar = None,
        |c| c.sliding_window = None,
    ] {
        let mut other = gemma2.clone();
        edit(&mut other);
        let (_, m) = load(dir, "gemma2", &other, &LinearKind::Dense);
        let d = max_diff(&logits(&m, &ids), &want);
        assert!(d > 1e-3, "a Gemma 2 setting does not matter here: {d}");
    }
    let gemma3 = config(dir, "gemma3");
    assert_eq!(gemma3.rope_local_base_freq, Some(1e4));
    assert_eq!(gemma3.rope_theta, 1e6);
    assert!(gemma3.qk_norm() && gemma3.tie_word_embeddings);
    let mut one_base = gemma3.clone();
    one_base.rope_local_base_freq = None;
    let (_, m) = load(dir, "gemma3", &one_base, &LinearKind::Dense);
    let ids = reference(dir, "gemma3", "ids");
    let d = max_diff(&logits(&m, &ids), &reference(dir, "gemma3", "logits"));
    assert!(d > 1e-3, "Gemma 3's local base does not matter here: {d}");
}

/// Guarantee: greedy generation through the KV cache (the prompt, then one token at a time)
/// picks transformers' tokens (`generate(do_sample=False)`), each step's logits within 1e-4 of
/// transformers' cached ones, and the cache holds kv_heads, not query heads.
#[test]
fn greedy_generation_through_the_kv_cache_matches_transformers() {
    let Some(dir) = fixtures() else { return };
    for name in VARIANTS {
        let cfg = config(dir, name);
        let (_vs, model) = load(dir, name, &cfg, &LinearKind::Dense);
        let prompt = reference(dir, name, "prompt");
        let want_ids = reference(dir, name, "generated");
        let want_logits = reference(dir, name, "step_logits");
        let steps = want_logits.size()[0];
        let mut cache = KvCache::default();
        let (ids, rows) = tch::no_grad(|| {
            let mut ids = vec![prompt.shallow_clone()];
            let mut rows = Vec::new();
            let mut out = model.forward(&prompt, Some(&mut cache));
            for i in 0..steps {
                let last = out.select(1, -1);
                rows.push(last.squeeze_dim(0));
                let next = last.argmax(-1, true);
                ids.push(next.shallow_clone());
                if i + 1 < steps {
                    out = model.forward(&next, Some(&mut cache));
                }
            }
            (Tensor::cat(&ids, 1), Tensor::stack(&rows, 0))
        });
        assert_eq!(cache.kv_heads(), cfg.num_key_value_heads, "{name}");
        assert_eq!(cache.len(), prompt.size()[1] + steps - 1, "{name}");
        assert_eq!(
            Vec::<i64>::try_from(ids.view([-1])).unwrap(),
            Vec::<i64>::try_from(want_ids.view([-1])).unwrap(),
            "{name}: greedy text"
        );
        let d = max_diff(&rows, &want_logits);
        eprintln!("{name}: cached steps, max |logit difference| {d:e}");
        assert!(d < 1e-4, "{name}: cached steps differ by {d}");
    }
}

/// Guarantee: PEFT's LoRA adapter on q/k/v/o_proj (k/v at their kv_heads · head_dim width)
/// loads onto the base and gives PEFT's logits within 1e-4, and it acts (moves the logits).
#[test]
fn peft_lora_on_qkvo_gives_peft_logits() {
    let Some(dir) = fixtures() else { return };
    for name in VARIANTS {
        let cfg = config(dir, name);
        let (vs, mut model) = load(dir, name, &cfg, &LinearKind::Dense);
        let file = peft::read(&dir.join(format!("{name}_lora"))).unwrap();
        let layers = load_adapter(&vs, model.linears_mut(), "default", &file).unwrap();
        let fused = name.starts_with("phi3");
        assert_eq!(layers.len(), if fused { 6 } else { 8 }, "{name}");
        let ids = reference(dir, name, "ids");
        let ours = logits(&model, &ids);
        let d = max_diff(&ours, &reference(dir, name, "lora_logits"));
        eprintln!("{name}: LoRA, max |logit difference| {d:e}");
        assert!(d < 1e-4, "{name}: |ours - PEFT| = {d}");
        assert!(max_diff(&ours, &reference(dir, name, "logits")) > 1e-2);
    }
}

/// Guarantee: a LoRA adapter Frugal made and changed on the GQA and MQA models (every
/// variable moved off its initial value) loads in PEFT with Frugal's logits within 1e-4.
#[test]
fn frugal_lora_on_gqa_loads_in_peft() {
    let Some(dir) = fixtures() else { return };
    for name in [
        "gqa",
        "mqa",
        "llama3_rope",
        "llama_bias",
        "qwen2",
        "qwen3",
        "mistral",
        "gemma",
        "gemma2",
        "gemma3",
        "phi3",
    ] {
        let cfg = config(dir, name);
        let (vs, mut model) = load(dir, name, &cfg, &LinearKind::Dense);
        let targets: &[&str] = match name {
            "phi3" => &["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
            _ => &["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        };
        let lora = LoraConfig {
            r: 2,
            alpha: 4.0,
            target_modules: Targets::Names(targets.iter().map(|t| t.to_string()).collect()),
            ..LoraConfig::default()
        };
        adapted::add_adapter(&vs, model.linears_mut(), "default", &lora, "adapter").unwrap();
        let trainable = adapted::freeze_base(&vs);
        assert_eq!(
            trainable.len(),
            2 * targets.len() * 2,
            "A and B of each layer x 2 blocks"
        );
        tch::manual_seed(3);
        tch::no_grad(|| {
            for (_, t) in &trainable {
                let noise = t.randn_like() * 0.05;
                let _ = t.shallow_clone().g_add_(&noise);
            }
        });
        let ids = reference(dir, name, "ids");
        let ours = logits(&model, &ids);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("adapter");
        let linears = model.linears();
        peft::write(&out, &lora, &adapted::active_adapters(&linears)).unwrap();
        let ids_file = tmp.path().join("ids.safetensors");
        safetensors_io::save(&ids_file, &[("ids".into(), ids)], None).unwrap();
        let logits_file = tmp.path().join("logits.safetensors");
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft/peft_check.py");
        let status = std::process::Command::new(python())
            .arg(script)
            .arg(dir.join(name))
            .arg(&out)
            .arg(&ids_file)
            .arg(&logits_file)
            .status()
            .unwrap();
        assert!(status.success(), "{name}: peft_check.py failed");
        let theirs = SafetensorsFile::open(&logits_file)
            .unwrap()
            .tensor("logits", Device::Cpu)
            .unwrap();
        let d = max_diff(&ours, &theirs);
        eprintln!("{name}: PEFT on Frugal's LoRA, max |logit difference| {d:e}");
        assert!(d < 1e-4, "{name}: PEFT on our adapter: {d}");
    }
}

/// Guarantee: the quantized kinds (NF4, int8, int4) load the GQA and MQA folders, quantizing
/// k/v at their kv_heads · head_dim shapes, and compute what the dense model computes with the
/// dequantized weights (within 1e-4); QLoRA (LoRA on NF4), DoRA and QA-LoRA (on int4) adapters
/// build on k/v at those shapes (and train); TT layers take k/v where the shapes factor
/// (full-rank conversion of the GQA folder: transformers' logits within 1e-4) and refuse what
/// they cannot factor by key.
#[test]
fn quantized_kinds_and_adapters_take_kv_shapes() {
    let Some(dir) = fixtures() else { return };
    for name in [
        "gqa",
        "mqa",
        "head_dim",
        "llama_bias",
        "qwen2",
        "qwen3",
        "gemma2",
        "gemma3",
        "phi3",
    ] {
        let cfg = config(dir, name);
        for format in ["nf4", "int8", "int4"] {
            let kind = LinearKind::Quantized {
                format: format.into(),
                block_size: 32,
                group_size: 32,
                double_quant: false,
            };
            let (_vs, model) = load(dir, name, &cfg, &kind);
            let tmp = tempfile::tempdir().unwrap();
            let copy = tmp.path().join("dequantized.safetensors");
            let file = safetensors_io::model_weights(&dir.join(name)).unwrap();
            common::dequantized_copy(&file, &model, &copy);
            let mut vs = VarStore::new(Device::Cpu);
            let mut dense = Llama::new(
                &vs.root(),
                &cfg,
                &LinearKind::Dense,
                &EmbeddingKind::Dense,
                Kind::Float,
            )
            .unwrap();
            weights::load_model(&mut vs, &mut dense.linears_mut(), &copy).unwrap();
            let ids = reference(dir, name, "ids");
            let d = max_diff(&logits(&model, &ids), &logits(&dense, &ids));
            assert!(d < 1e-4, "{name} {format}: {d}");
        }
        for (format, adapter) in [("nf4", "lora"), ("nf4", "dora"), ("int4", "qalora")] {
            let kind = LinearKind::Quantized {
                format: format.into(),
                block_size: 32,
                group_size: 32,
                double_quant: true,
            };
            let (vs, mut model) = load(dir, name, &cfg, &kind);
            // Phi-3's k/v are rows of its fused qkv_proj.
            let (targets, layer, rows) = match name {
                "phi3" => (
                    vec!["qkv_proj".to_string()],
                    "layers.0.self_attn.qkv_proj",
                    cfg.q_width() + 2 * cfg.kv_width(),
                ),
                _ => (
                    vec!["k_proj".to_string(), "v_proj".to_string()],
                    "layers.0.self_attn.k_proj",
                    cfg.kv_width(),
                ),
            };
            let lora = LoraConfig {
                r: 2,
                alpha: 4.0,
                use_dora: adapter == "dora",
                pool: if adapter == "qalora" { 32 } else { 1 },
                target_modules: Targets::Names(targets),
                ..LoraConfig::default()
            };
            adapted::add_adapter(&vs, model.linears_mut(), "default", &lora, "adapter")
                .unwrap_or_else(|e| panic!("{name} {adapter}: {e}"));
            let trainable = adapted::freeze_base(&vs);
            let a = trainable
                .iter()
                .find(|(n, _)| n.contains(layer) && n.contains("lora_B"))
                .unwrap_or_else(|| panic!("{name} {adapter}: no lora_B in {trainable:?}"));
            assert_eq!(a.1.size(), [rows, 2], "{name} {adapter}");
            let ids = reference(dir, name, "ids");
            let loss = model.loss(&ids, &ids);
            loss.backward();
            assert!(loss.double_value(&[]).is_finite());
        }
    }
    // TT layers take k/v where the shapes factor: the GQA folder converted at full rank gives
    // transformers' logits.
    let cfg = config(dir, "gqa");
    let kind = LinearKind::Tt {
        rank: 64,
        order: 2,
        eps: None,
    };
    let (_vs, model) = load(dir, "gqa", &cfg, &kind);
    assert_eq!(model.tt_layers().len(), 14);
    let ids = reference(dir, "gqa", "ids");
    let d = max_diff(&logits(&model, &ids), &reference(dir, "gqa", "logits"));
    eprintln!("gqa TT at full rank: max |logit difference| {d:e}");
    assert!(d < 1e-4, "TT at full rank: {d}");
    // A k/v width the modes cannot split is refused naming the key.
    let mut cfg = config(dir, "mqa");
    cfg.head_dim = Some(14);
    let vs = VarStore::new(Device::Cpu);
    let kind = LinearKind::Tt {
        rank: 4,
        order: 3,
        eps: None,
    };
    let err = Llama::new(&vs.root(), &cfg, &kind, &EmbeddingKind::Dense, Kind::Float)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("model.linear"), "{err}");
    eprintln!("TT refusal: {err}");
    // A TT layer has no bias: a model with biases is refused naming the key that asks for them.
    for (name, key) in [("qwen2", "model_type"), ("llama_bias", "attention_bias")] {
        let cfg = config(dir, name);
        let vs = VarStore::new(Device::Cpu);
        let kind = LinearKind::Tt {
            rank: 4,
            order: 2,
            eps: None,
        };
        let err = Llama::new(&vs.root(), &cfg, &kind, &EmbeddingKind::Dense, Kind::Float)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("model.linear") && err.contains(key),
            "{name}: {err}"
        );
    }
}
