//! The LLaMA decoder against Hugging Face transformers' `LlamaForCausalLM` (fixtures from
//! `fixtures/gen_llama.py`): same weight names, same logits, same incremental decoding.

use frugal_core::safetensors_io::SafetensorsFile;
use frugal_models::llama::{KvCache, Llama, LlamaConfig};
use frugal_models::{weights, EmbeddingKind, LinearKind};
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load_model(compute: Kind) -> (VarStore, Llama) {
    let text = std::fs::read_to_string(fixtures().join("tiny_llama_config.json")).unwrap();
    let cfg: LlamaConfig = serde_json::from_str(&text).unwrap();
    let mut vs = VarStore::new(Device::Cpu);
    let model = Llama::new(
        &vs.root(),
        &cfg,
        &LinearKind::Dense,
        &EmbeddingKind::Dense,
        compute,
    )
    .unwrap();
    weights::load(&mut vs, &fixtures().join("tiny_llama.safetensors")).unwrap();
    (vs, model)
}

fn reference(name: &str) -> Tensor {
    SafetensorsFile::open(&fixtures().join("tiny_llama_logits.safetensors"))
        .unwrap()
        .tensor(name, Device::Cpu)
        .unwrap()
}

/// Guarantee: every HF weight name is one of ours and vice versa.
#[test]
fn weight_names_are_hugging_faces() {
    let (vs, _) = load_model(Kind::Float);
    let ours: Vec<String> = weights::named_variables(&vs)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let theirs = SafetensorsFile::open(&fixtures().join("tiny_llama.safetensors"))
        .unwrap()
        .names();
    assert_eq!(ours, theirs);
    assert!(ours.contains(&"model.layers.0.self_attn.q_proj.weight".to_string()));
}

/// Guarantee: f32 logits equal transformers' within 1e-4 (float rounding of a different order
/// of operations).
#[test]
fn logits_match_transformers() {
    let (_vs, model) = load_model(Kind::Float);
    let ids = reference("ids");
    let want = reference("logits");
    let got = tch::no_grad(|| model.forward(&ids, None));
    let diff = (&got - &want).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "max |logit difference| {diff}");
    assert!(
        want.abs().max().double_value(&[]) > 0.05,
        "fixture logits are not trivially small"
    );
}

/// Guarantee: prompt + four cached single-token steps give the same logits as transformers'
/// cached decoding.
#[test]
fn kv_cache_matches_transformers() {
    let (_vs, model) = load_model(Kind::Float);
    let ids = reference("ids").narrow(0, 0, 1).narrow(1, 0, 7);
    let want = reference("cached_logits");
    let mut cache = KvCache::default();
    let got = tch::no_grad(|| {
        let mut rows = Vec::new();
        let mut out = model.forward(&ids, Some(&mut cache));
        for _ in 0..4 {
            let last = out.select(1, -1);
            rows.push(last.squeeze_dim(0));
            let next = last.argmax(-1, true);
            out = model.forward(&next, Some(&mut cache));
        }
        rows.push(out.select(1, -1).squeeze_dim(0));
        Tensor::stack(&rows, 0)
    });
    assert_eq!(cache.len(), 11);
    let diff = (&got - &want).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "max |logit difference| {diff}");
}

/// Guarantee: bf16 compute stays close to f32 (within bf16 rounding), with f32 parameters.
#[test]
fn bf16_compute_is_close_to_f32() {
    let (vs, model) = load_model(Kind::BFloat16);
    assert!(weights::named_variables(&vs)
        .iter()
        .all(|(_, t)| t.kind() == Kind::Float));
    let ids = reference("ids");
    let got = tch::no_grad(|| model.forward(&ids, None));
    assert_eq!(got.kind(), Kind::Float);
    let diff = (&got - reference("logits")).abs().max().double_value(&[]);
    assert!(diff < 5e-2, "bf16 max |logit difference| {diff}");
}

/// Guarantee: a checkpoint of another shape is refused with the tensor and both shapes named.
#[test]
fn other_shape_is_a_named_error() {
    let text = std::fs::read_to_string(fixtures().join("tiny_llama_config.json")).unwrap();
    let mut cfg: LlamaConfig = serde_json::from_str(&text).unwrap();
    cfg.intermediate_size = 40;
    let mut vs = VarStore::new(Device::Cpu);
    let _model = Llama::new(
        &vs.root(),
        &cfg,
        &LinearKind::Dense,
        &EmbeddingKind::Dense,
        Kind::Float,
    )
    .unwrap();
    let err = weights::load(&mut vs, &fixtures().join("tiny_llama.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mlp.down_proj.weight")
            && err.contains("[32, 48]")
            && err.contains("[32, 40]"),
        "{err}"
    );
}

/// Guarantee: the parameter count formula agrees with the variables built.
#[test]
fn parameter_count_formula() {
    let cfg = LlamaConfig::preset("60m").unwrap();
    let vs = VarStore::new(Device::Cpu);
    let _m = Llama::new(
        &vs.root(),
        &cfg,
        &LinearKind::Dense,
        &EmbeddingKind::Dense,
        Kind::Float,
    )
    .unwrap();
    let n: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
    assert_eq!(n, cfg.num_parameters());
    assert!(
        (55_000_000..60_000_000).contains(&n),
        "60m preset has {n} parameters"
    );
}

/// Guarantee: feeding several tokens after a cached prefix gives the logits of one full pass
/// (the offset causal mask), within float rounding.
#[test]
fn multi_token_continuation_after_a_cache_equals_one_pass() {
    let (_vs, model) = load_model(Kind::Float);
    let ids = reference("ids");
    let full = tch::no_grad(|| model.forward(&ids, None));
    let mut cache = KvCache::default();
    let tail = tch::no_grad(|| {
        let _ = model.forward(&ids.narrow(1, 0, 5), Some(&mut cache));
        model.forward(&ids.narrow(1, 5, 7), Some(&mut cache))
    });
    let diff = (&tail - full.narrow(1, 5, 7)).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "max |logit difference| {diff}");
}
