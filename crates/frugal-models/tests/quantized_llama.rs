//! The LLaMA decoder with frozen quantized linear layers (`LinearKind::Quantized`): it computes
//! what the dense model computes with the dequantized weights, loads dense checkpoints
//! (quantizing them) and quantized ones (as stored), and trains nothing but its variables.

mod common;

use frugal_core::safetensors_io::SafetensorsFile;
use frugal_models::llama::{Llama, LlamaConfig};
use frugal_models::{weights, EmbeddingKind, LinearKind};
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn dense_file() -> PathBuf {
    fixtures().join("tiny_llama.safetensors")
}

fn config() -> LlamaConfig {
    let text = std::fs::read_to_string(fixtures().join("tiny_llama_config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn quantized(format: &str) -> LinearKind {
    LinearKind::Quantized {
        format: format.into(),
        block_size: 32,
        group_size: 32,
        double_quant: true,
    }
}

fn build(kind: &LinearKind, file: &Path) -> frugal_core::Result<(VarStore, Llama)> {
    let mut vs = VarStore::new(Device::Cpu);
    let mut model = Llama::new(
        &vs.root(),
        &config(),
        kind,
        &EmbeddingKind::Dense,
        Kind::Float,
    )?;
    weights::load_model(&mut vs, &mut model.linears_mut(), file)?;
    Ok((vs, model))
}

fn ids(b: i64, t: i64) -> Tensor {
    Tensor::arange(b * t, (Kind::Int64, Device::Cpu))
        .remainder(config().vocab_size - 3)
        .view([b, t])
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Guarantee: for every format, the quantized model (packed kernels at inference for a few
/// tokens, dequantize-then-matmul for many) gives the logits of the dense model loaded with
/// the dequantized weights; a dense checkpoint is quantized on load.
#[test]
fn quantized_model_computes_the_dequantized_dense_model() {
    let dir = tempfile::tempdir().unwrap();
    for (format, few_token_tol) in [
        ("nf4", 1e-4),
        ("fp4", 1e-4),
        ("int8", 0.05),
        ("ternary", 0.05),
    ] {
        let (_vs, q) = build(&quantized(format), &dense_file()).unwrap();
        let reference = dir.path().join(format!("{format}.safetensors"));
        common::dequantized_copy(&dense_file(), &q, &reference);
        let (_vs2, dense) = build(&LinearKind::Dense, &reference).unwrap();
        // 24 rows: the dequantize path, exact up to float rounding.
        let many = ids(2, 12);
        let d = tch::no_grad(|| max_diff(&q.forward(&many, None), &dense.forward(&many, None)));
        assert!(d < 1e-4, "{format}: many tokens differ by {d}");
        // 4 rows: the packed kernels (int8 and ternary quantize activations to int8).
        let few = ids(1, 4);
        let want = tch::no_grad(|| dense.forward(&few, None));
        let got = tch::no_grad(|| q.forward(&few, None));
        let d = max_diff(&got, &want);
        let scale = want.abs().max().double_value(&[]);
        assert!(
            d < few_token_tol * scale.max(1.0),
            "{format}: few tokens differ by {d}"
        );
        // Quantization changed something: the dequantized weights are not the dense ones.
        let (_vs3, orig) = build(&LinearKind::Dense, &dense_file()).unwrap();
        let o = tch::no_grad(|| orig.forward(&many, None));
        assert!(max_diff(&o, &dense.forward(&many, None)) > 1e-4, "{format}");
    }
}

/// Guarantee: a saved quantized model holds the packed layout (bitsandbytes' for NF4) and
/// loads back as stored, bit for bit, even into a model built for another format.
#[test]
fn save_and_load_keep_the_packed_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (vs, q) = build(&quantized("nf4"), &dense_file()).unwrap();
    let path = dir.path().join("model.safetensors");
    weights::save_model(&vs, &q.linears(), &path).unwrap();
    let names = SafetensorsFile::open(&path).unwrap().names();
    assert!(names.contains(
        &"model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4".to_string()
    ));
    assert!(names.contains(&"model.embed_tokens.weight".to_string()));
    let (_vs, back) = build(&quantized("int8"), &path).unwrap();
    for ((n, a), (_, b)) in q.linears().into_iter().zip(back.linears()) {
        assert_eq!(a.quantized(), b.quantized(), "{n}");
    }
    let x = ids(2, 9);
    let d = tch::no_grad(|| max_diff(&q.forward(&x, None), &back.forward(&x, None)));
    assert_eq!(d, 0.0);
}

/// Guarantee: quantized weights are frozen: they are not variables, take no gradient, and the
/// gradient still reaches the variables beneath them (embeddings, norms).
#[test]
fn only_the_variables_train() {
    let (vs, q) = build(&quantized("nf4"), &dense_file()).unwrap();
    let names: Vec<String> = weights::named_variables(&vs)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(!names.iter().any(|n| n.contains("q_proj")), "{names:?}");
    assert!(names.contains(&"lm_head.weight".to_string()));
    let x = ids(2, 12);
    let loss = q.loss(&x.narrow(1, 0, 11), &x.narrow(1, 1, 11));
    loss.backward();
    for (name, var) in weights::named_variables(&vs) {
        let g = var.grad();
        assert!(g.defined(), "{name} has no gradient");
        assert!(g.abs().sum(Kind::Float).double_value(&[]) > 0.0, "{name}");
    }
}

/// Guarantee: a quantized file loaded into a dense model is an error that says what to set;
/// a quantized model refuses a file whose quantized weight has another shape.
#[test]
fn mismatches_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (vs, q) = build(&quantized("nf4"), &dense_file()).unwrap();
    let path = dir.path().join("q.safetensors");
    weights::save_model(&vs, &q.linears(), &path).unwrap();
    let err = build(&LinearKind::Dense, &path).unwrap_err().to_string();
    assert!(
        err.contains("_proj.weight") && err.contains("model.linear.kind"),
        "{err}"
    );

    let mut cfg = config();
    cfg.intermediate_size += 32;
    let mut vs2 = VarStore::new(Device::Cpu);
    let mut wide = Llama::new(
        &vs2.root(),
        &cfg,
        &quantized("nf4"),
        &EmbeddingKind::Dense,
        Kind::Float,
    )
    .unwrap();
    let err = weights::load_model(&mut vs2, &mut wide.linears_mut(), &path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("mlp.gate_proj"), "{err}");

    let bad = LinearKind::Quantized {
        format: "nf5".into(),
        block_size: 64,
        group_size: 128,
        double_quant: false,
    };
    let err = bad.quant_format().unwrap_err().to_string();
    assert!(
        err.contains("model.linear.format") && err.contains("nf5"),
        "{err}"
    );

    // int4 groups of 32 columns do not divide down_proj's 48 inputs: the layer is named.
    let err = build(&quantized("int4"), &dense_file())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mlp.down_proj") && err.contains("group_size 32"),
        "{err}"
    );
}
