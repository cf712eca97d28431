//! `weights::load_model_exact`: a LLaMA checkpoint loads only when the file holds exactly the
//! model (its layers, its tensors), in every form Frugal writes (dense, quantized, TT cores),
//! and a tensor it would not use is refused by name, before anything is copied.

use frugal_core::safetensors_io::{self, SafetensorsFile};
use frugal_models::llama::{Llama, LlamaConfig};
use frugal_models::{weights, EmbeddingKind, LinearKind};
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn config() -> LlamaConfig {
    LlamaConfig::from_hf_file(&fixtures().join("tiny_llama_config.json")).unwrap()
}

/// Builds the tiny LLaMA with `kind` layers and loads `file` exactly.
fn load_exact(kind: &LinearKind, file: &Path) -> frugal_core::Result<(VarStore, Llama)> {
    let mut vs = VarStore::new(Device::Cpu);
    let mut model = Llama::new(
        &vs.root(),
        &config(),
        kind,
        &EmbeddingKind::Dense,
        Kind::Float,
    )?;
    let (mut linears, mut tables) = model.weights_mut();
    weights::load_model_exact(&mut vs, &mut linears, &mut tables, file)?;
    drop((linears, tables));
    Ok((vs, model))
}

/// The dense fixture's tensors, plus `extra`.
fn dense_with(extra: &[(&str, Tensor)], out: &Path) {
    let file = SafetensorsFile::open(&fixtures().join("tiny_llama.safetensors")).unwrap();
    let mut tensors: Vec<(String, Tensor)> = file
        .names()
        .into_iter()
        .map(|n| {
            let t = file.tensor(&n, Device::Cpu).unwrap();
            (n, t)
        })
        .collect();
    tensors.extend(
        extra
            .iter()
            .map(|(n, t)| (n.to_string(), t.shallow_clone())),
    );
    safetensors_io::save(out, &tensors, None).unwrap();
}

/// Guarantee: Frugal's own checkpoints of a LLaMA (dense, NF4 with double quantization, int8,
/// ternary, TT cores with rank variables; GPTQ int4 does not fit the fixture's 48-wide layer:
/// `frugal-train`'s quantize tests load it) load exactly into a model of their kind: every
/// tensor they hold is one the model consumes.
#[test]
fn frugal_checkpoints_load_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let dense = fixtures().join("tiny_llama.safetensors");
    let kinds = [
        LinearKind::Dense,
        LinearKind::Quantized {
            format: "nf4".into(),
            block_size: 32,
            group_size: 32,
            double_quant: true,
        },
        LinearKind::Quantized {
            format: "int8".into(),
            block_size: 32,
            group_size: 32,
            double_quant: false,
        },
        LinearKind::Quantized {
            format: "ternary".into(),
            block_size: 32,
            group_size: 32,
            double_quant: false,
        },
        LinearKind::Tt {
            rank: 4,
            order: 2,
            eps: None,
        },
    ];
    for (i, kind) in kinds.iter().enumerate() {
        // From the dense Hugging Face file (quantized or decomposed on load)...
        let (vs, model) = load_exact(kind, &dense).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        // ...then saved in Frugal's form of that kind, and loaded back exactly.
        let own = dir.path().join(format!("own{i}.safetensors"));
        weights::save_model_with_tables(&vs, &model.linears(), &model.tables(), &own).unwrap();
        load_exact(kind, &own).unwrap_or_else(|e| panic!("{kind:?}, own file: {e}"));
    }
}

/// Guarantee: tensors that carry no weights (old transformers' `rotary_emb.inv_freq`
/// buffers) are ignored, and any other tensor the model would not use (a q/k norm, a bias, an
/// unknown name) is refused, naming it and the file.
#[test]
fn unused_tensors_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let inv_freq = dir.path().join("inv_freq.safetensors");
    let t = Tensor::ones([4], (Kind::Float, Device::Cpu));
    dense_with(
        &[(
            "model.layers.1.self_attn.rotary_emb.inv_freq",
            t.shallow_clone(),
        )],
        &inv_freq,
    );
    load_exact(&LinearKind::Dense, &inv_freq).unwrap();
    for (name, needle) in [
        (
            "model.layers.0.self_attn.q_norm.weight",
            "q/k norms are Qwen3's and Gemma 3's",
        ),
        ("model.layers.1.mlp.up_proj.bias", "declares no bias"),
        ("model.something.weight", "another model"),
    ] {
        let file = dir.path().join("extra.safetensors");
        dense_with(&[(name, t.shallow_clone())], &file);
        for kind in [
            LinearKind::Dense,
            LinearKind::Tt {
                rank: 4,
                order: 2,
                eps: None,
            },
        ] {
            let err = load_exact(&kind, &file).unwrap_err().to_string();
            let want = format!("{}: tensor '{name}' is not used", file.display());
            assert!(err.starts_with(&want) && err.contains(needle), "{err}");
        }
    }
}

/// Guarantee: a file with more or fewer layers than `num_hidden_layers` is refused with both
/// numbers.
#[test]
fn layer_counts_must_agree() {
    let dense = fixtures().join("tiny_llama.safetensors");
    for layers in [1, 3] {
        let mut cfg = config();
        cfg.num_hidden_layers = layers;
        let mut vs = VarStore::new(Device::Cpu);
        let mut model = Llama::new(
            &vs.root(),
            &cfg,
            &LinearKind::Dense,
            &EmbeddingKind::Dense,
            Kind::Float,
        )
        .unwrap();
        let (mut l, mut t) = model.weights_mut();
        let err = weights::load_model_exact(&mut vs, &mut l, &mut t, &dense)
            .unwrap_err()
            .to_string();
        let want = format!("holds 2 layers (model.layers.0 to model.layers.1), the model {layers}");
        assert!(err.contains(&want), "{err}");
    }
}
