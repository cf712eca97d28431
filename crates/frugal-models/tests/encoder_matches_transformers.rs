//! The BERT-style encoder against Hugging Face transformers' `BertForMaskedLM` and
//! `BertForSequenceClassification` (fixture from `fixtures/gen_encoder.py`): same weight names,
//! same logits and losses, same gradients; and the model's own guarantees (every variable
//! trains, configs are checked, any `LinearKind` fits).

use frugal_core::safetensors_io::SafetensorsFile;
use frugal_models::encoder::{EncoderConfig, EncoderForClassification, EncoderForMaskedLm};
use frugal_models::{weights, EmbeddingKind, LinearKind};
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Device, Kind, Tensor};

const NUM_LABELS: i64 = 3;

fn fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_encoder.safetensors")
}

fn fixture() -> SafetensorsFile {
    SafetensorsFile::open(&fixture_path()).unwrap()
}

fn config() -> EncoderConfig {
    EncoderConfig::from_hf_json(&fixture().metadata()["config"]).unwrap()
}

fn reference(name: &str) -> Tensor {
    fixture()
        .tensor(&format!("fixture.{name}"), Device::Cpu)
        .unwrap()
}

/// The fixture's input batch: ids, token types, attention mask.
fn batch() -> (Tensor, Tensor, Tensor) {
    (
        reference("ids"),
        reference("token_types"),
        reference("attention_mask"),
    )
}

fn mlm_model(kind: &LinearKind, compute: Kind) -> (VarStore, EncoderForMaskedLm) {
    let mut vs = VarStore::new(Device::Cpu);
    let mut model =
        EncoderForMaskedLm::new(&vs.root(), &config(), kind, &EmbeddingKind::Dense, compute)
            .unwrap();
    weights::load_model(&mut vs, &mut model.linears_mut(), &fixture_path()).unwrap();
    (vs, model)
}

fn classifier_model() -> (VarStore, EncoderForClassification) {
    let mut vs = VarStore::new(Device::Cpu);
    let model = EncoderForClassification::new(
        &vs.root(),
        &config(),
        NUM_LABELS,
        &LinearKind::Dense,
        &EmbeddingKind::Dense,
        Kind::Float,
    )
    .unwrap();
    weights::load(&mut vs, &fixture_path()).unwrap();
    (vs, model)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn names(vs: &VarStore) -> Vec<String> {
    weights::named_variables(vs)
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

/// Guarantee: our variables are exactly transformers' parameters, by name, for both models
/// (the MLM decoder is tied, so it has no variable of its own).
#[test]
fn weight_names_are_hugging_faces() {
    let file: Vec<String> = fixture()
        .names()
        .into_iter()
        .filter(|n| !n.starts_with("fixture."))
        .collect();
    let (vs, _) = mlm_model(&LinearKind::Dense, Kind::Float);
    let mlm = names(&vs);
    let want: Vec<&String> = file
        .iter()
        .filter(|n| !n.starts_with("bert.pooler") && !n.starts_with("classifier"))
        .collect();
    assert_eq!(mlm.iter().collect::<Vec<_>>(), want);
    assert!(mlm.contains(&"bert.encoder.layer.1.attention.self.query.bias".to_string()));
    assert!(mlm.contains(&"cls.predictions.bias".to_string()));
    let (vs, _) = classifier_model();
    let clf = names(&vs);
    let want: Vec<&String> = file.iter().filter(|n| !n.starts_with("cls.")).collect();
    assert_eq!(clf.iter().collect::<Vec<_>>(), want);
}

/// Guarantee: f32 masked-LM logits (padded rows and token types included) and the masked-LM
/// loss (labels -100 ignored) equal transformers' within 1e-4 (rounding of another order of
/// operations).
#[test]
fn mlm_logits_and_loss_match_transformers() {
    let (_vs, model) = mlm_model(&LinearKind::Dense, Kind::Float);
    let (ids, types, mask) = batch();
    let (logits, loss) = tch::no_grad(|| {
        (
            model.logits(&ids, Some(&types), Some(&mask)),
            model.mlm_loss(&ids, Some(&types), Some(&mask), &reference("labels")),
        )
    });
    let want = reference("mlm_logits");
    assert_eq!(logits.size(), want.size());
    let diff = max_diff(&logits, &want);
    assert!(diff < 1e-4, "max |logit difference| {diff}");
    assert!(
        want.abs().max().double_value(&[]) > 0.1,
        "fixture logits are not trivially small"
    );
    let diff = max_diff(&loss.reshape([1]), &reference("mlm_loss"));
    assert!(diff < 1e-4, "masked-LM loss differs by {diff}");
}

/// Guarantee: the padding mask matters (the logits of a padded row differ without it), so the
/// comparison above checks it.
#[test]
fn padding_mask_changes_the_padded_rows_only() {
    let (_vs, model) = mlm_model(&LinearKind::Dense, Kind::Float);
    let (ids, types, mask) = batch();
    let (with, without) = tch::no_grad(|| {
        (
            model.logits(&ids, Some(&types), Some(&mask)),
            model.logits(&ids, Some(&types), None),
        )
    });
    assert!(
        max_diff(&with.get(0), &without.get(0)) < 1e-5,
        "row 0 has no padding"
    );
    assert!(max_diff(&with.get(1), &without.get(1)) > 1e-3);
}

/// Guarantee: the gradients of the masked-LM loss equal transformers' within 1e-4 for the tied
/// word embeddings (both paths: lookup and decoder) and a query weight.
#[test]
fn mlm_gradients_match_transformers() {
    let (vs, model) = mlm_model(&LinearKind::Dense, Kind::Float);
    let (ids, types, mask) = batch();
    model
        .mlm_loss(&ids, Some(&types), Some(&mask), &reference("labels"))
        .backward();
    let vars = vs.variables();
    for name in [
        "bert.embeddings.word_embeddings.weight",
        "bert.encoder.layer.0.attention.self.query.weight",
    ] {
        let got = vars[name].grad();
        let want = reference(&format!("grad.{name}"));
        let diff = max_diff(&got, &want);
        assert!(diff < 1e-4, "{name}: max |gradient difference| {diff}");
        assert!(
            want.abs().max().double_value(&[]) > 1e-3,
            "{name}: trivial gradient"
        );
    }
}

/// Guarantee: classification logits and cross-entropy equal transformers' within 1e-4.
#[test]
fn classification_matches_transformers() {
    let (_vs, model) = classifier_model();
    let (ids, types, mask) = batch();
    let (logits, loss) = tch::no_grad(|| {
        (
            model.classify_logits(&ids, Some(&types), Some(&mask)),
            model.classification_loss(&ids, Some(&types), Some(&mask), &reference("class_labels")),
        )
    });
    assert_eq!(logits.size(), [3, NUM_LABELS]);
    let diff = max_diff(&logits, &reference("cls_logits"));
    assert!(diff < 1e-4, "max |logit difference| {diff}");
    let diff = max_diff(&loss.reshape([1]), &reference("cls_loss"));
    assert!(diff < 1e-4, "classification loss differs by {diff}");
}

/// Guarantee: every variable of both models receives a nonzero gradient from its loss (no
/// detached path, nothing built but unused).
#[test]
fn gradients_reach_every_variable() {
    let (ids, types, mask) = batch();
    let (vs, model) = mlm_model(&LinearKind::Dense, Kind::Float);
    model
        .mlm_loss(&ids, Some(&types), Some(&mask), &reference("labels"))
        .backward();
    let (vs2, clf) = classifier_model();
    clf.classification_loss(&ids, Some(&types), Some(&mask), &reference("class_labels"))
        .backward();
    for (name, var) in weights::named_variables(&vs)
        .into_iter()
        .chain(weights::named_variables(&vs2))
    {
        let g = var.grad();
        assert!(g.defined(), "{name}: no gradient");
        assert!(
            g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "{name}: zero gradient"
        );
    }
}

/// Guarantee: bf16 compute stays close to f32 (within 2% of the logits' scale: bf16 keeps 8
/// bits of mantissa through 12 products), parameters stay f32.
#[test]
fn bf16_compute_is_close_to_f32() {
    let (vs, model) = mlm_model(&LinearKind::Dense, Kind::BFloat16);
    assert!(weights::named_variables(&vs)
        .iter()
        .all(|(_, t)| t.kind() == Kind::Float));
    let (ids, types, mask) = batch();
    let got = tch::no_grad(|| model.logits(&ids, Some(&types), Some(&mask)));
    assert_eq!(got.kind(), Kind::Float);
    let want = reference("mlm_logits");
    let diff = max_diff(&got, &want);
    let scale = want.abs().max().double_value(&[]);
    assert!(
        diff < 0.02 * scale,
        "bf16 max |logit difference| {diff} (scale {scale})"
    );
}

/// Guarantee: another `LinearKind` plugs into every block projection with its bias kept
/// apart: with int8 weights (quantized from the checkpoint on load) the logits equal, within
/// 1e-4, those of the dense model holding the dequantized weights, and the biases are still
/// variables.
#[test]
fn quantized_linears_keep_their_biases() {
    let kind: LinearKind =
        serde_json::from_str(r#"{"kind": "quantized", "format": "int8"}"#).unwrap();
    let (vs, model) = mlm_model(&kind, Kind::Float);
    let linears = model.linears();
    assert_eq!(linears.len(), 2 * 6);
    assert_eq!(linears[5].0, "bert.encoder.layer.0.output.dense");
    assert!(linears.iter().all(|(_, l)| l.quantized().is_some()));
    let vars = names(&vs);
    assert!(vars.contains(&"bert.encoder.layer.0.output.dense.bias".to_string()));
    assert!(!vars.contains(&"bert.encoder.layer.0.output.dense.weight".to_string()));
    let (dense_vs, dense) = mlm_model(&LinearKind::Dense, Kind::Float);
    let dense_vars = dense_vs.variables();
    tch::no_grad(|| {
        for (name, layer) in &linears {
            let w = layer.quantized().unwrap().dequantize();
            dense_vars[&format!("{name}.weight")]
                .shallow_clone()
                .copy_(&w);
        }
    });
    let (ids, types, mask) = batch();
    let got = tch::no_grad(|| model.logits(&ids, Some(&types), Some(&mask)));
    let want = tch::no_grad(|| dense.logits(&ids, Some(&types), Some(&mask)));
    let diff = max_diff(&got, &want);
    assert!(
        diff < 1e-4,
        "int8 against dequantized dense: max |logit difference| {diff}"
    );
    let diff = max_diff(&got, &reference("mlm_logits"));
    assert!(diff > 1e-4, "the int8 model is not quantized ({diff})");
}

/// Guarantee: a bad shape is an error naming the field, before anything is built.
#[test]
fn bad_config_names_the_field() {
    let mut cfg = config();
    cfg.num_attention_heads = 5;
    let vs = VarStore::new(Device::Cpu);
    let err = EncoderForMaskedLm::new(
        &vs.root(),
        &cfg,
        &LinearKind::Dense,
        &EmbeddingKind::Dense,
        Kind::Float,
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("model.num_attention_heads:"), "{err}");
    assert!(vs.variables().is_empty());
    let mut cfg = config();
    cfg.intermediate_size = 0;
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.starts_with("model.intermediate_size:"), "{err}");
    let err = EncoderForClassification::new(
        &vs.root(),
        &config(),
        0,
        &LinearKind::Dense,
        &EmbeddingKind::Dense,
        Kind::Float,
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("model.num_labels:"), "{err}");
}

/// Guarantee: the parameter-count formulas agree with the variables built, and give
/// bert-base-uncased's published 109,482,240 for its shape (12 layers, with pooler, no head).
#[test]
fn parameter_counts() {
    let cfg = EncoderConfig::preset("encoder-small")
        .unwrap()
        .with_vocab_size(1000);
    let count = |vs: &VarStore| -> i64 { vs.variables().values().map(|t| t.numel() as i64).sum() };
    let vs = VarStore::new(Device::Cpu);
    let _m = EncoderForMaskedLm::new(
        &vs.root(),
        &cfg,
        &LinearKind::Dense,
        &EmbeddingKind::Dense,
        Kind::Float,
    )
    .unwrap();
    assert_eq!(count(&vs), cfg.num_parameters() + cfg.mlm_head_parameters());
    let vs = VarStore::new(Device::Cpu);
    let _m = EncoderForClassification::new(
        &vs.root(),
        &cfg,
        4,
        &LinearKind::Dense,
        &EmbeddingKind::Dense,
        Kind::Float,
    )
    .unwrap();
    assert_eq!(
        count(&vs),
        cfg.num_parameters() + cfg.classifier_head_parameters(4)
    );
    let mut base = EncoderConfig::preset("encoder-6").unwrap();
    base.num_hidden_layers = 12;
    let pooler = base.hidden_size * base.hidden_size + base.hidden_size;
    assert_eq!(base.num_parameters() + pooler, 109_482_240);
    // The CoMERA 6-encoder model: about 256 MB in f32 (REFERENCE.md).
    let six = EncoderConfig::preset("encoder-6").unwrap();
    assert_eq!(six.num_parameters(), 66_364_416);
}
