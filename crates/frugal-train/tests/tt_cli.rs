//! `frugal compress`, `frugal decompress` and `frugal inspect` on tensor-train files and
//! folders: the round trip restores every weight within the error `compress` reports (exactly at
//! full rank), the compressed file loads into a TT model as it is, tensors left alone stay
//! bit-identical, and bad inputs are named errors.

mod common;

use common::*;
use frugal_core::safetensors_io::{self, SafetensorsFile};
use frugal_models::llama::{Llama, LlamaConfig};
use frugal_models::{weights, EmbeddingKind, LinearKind};
use std::collections::HashMap;
use std::path::Path;
use tch::{nn::VarStore, Device, Kind, Tensor};

/// A small dense LLaMA (d 32, ffn 48, 2 blocks): its config and its weights as a checkpoint.
fn config() -> LlamaConfig {
    let mut cfg = LlamaConfig::preset("tiny").unwrap();
    cfg.hidden_size = 32;
    cfg.intermediate_size = 48;
    cfg.num_hidden_layers = 2;
    cfg.num_attention_heads = 2;
    cfg.num_key_value_heads = 2;
    cfg.vocab_size = 64;
    cfg.max_position_embeddings = 32;
    cfg
}

/// Writes a dense model's checkpoint to `file` and returns its tensors by name.
fn write_checkpoint(file: &Path) -> HashMap<String, Tensor> {
    tch::manual_seed(5);
    let vs = VarStore::new(Device::Cpu);
    let model = Llama::new(
        &vs.root(),
        &config(),
        &LinearKind::Dense,
        &EmbeddingKind::Dense,
        Kind::Float,
    )
    .unwrap();
    weights::save_model(&vs, &model.linears(), file).unwrap();
    safetensors_io::load(file, Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

fn tensors(file: &Path) -> HashMap<String, Tensor> {
    safetensors_io::load(file, Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

fn rel_error(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).norm();
    diff.double_value(&[]) / b.to_kind(Kind::Double).norm().double_value(&[])
}

/// The relative errors `compress` printed, by weight name (the last column of its rows).
fn reported_errors(stdout: &str) -> HashMap<String, f64> {
    stdout
        .lines()
        .filter(|l| l.starts_with("model.") && l.contains(".weight"))
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (
                cols[0].to_string(),
                cols.last().unwrap().parse::<f64>().unwrap(),
            )
        })
        .collect()
}

fn compress(dir: &Path, input: &Path, output: &Path, args: &[&str]) -> String {
    let out = run({
        let mut c = frugal(dir);
        c.arg("compress").arg(input).arg(output).args(args);
        c
    });
    assert!(out.status.success(), "compress {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn decompress(dir: &Path, input: &Path, output: &Path) {
    let out = run({
        let mut c = frugal(dir);
        c.arg("decompress").arg(input).arg(output);
        c
    });
    assert!(out.status.success(), "decompress failed");
}

/// Guarantee: compress then decompress restores every compressed weight within the relative
/// Frobenius error `compress` reported for it (and not exactly at a low rank), leaves
/// embeddings, norms and the head bit-identical, and at full rank restores every weight
/// within 1e-5.
#[test]
fn compress_then_decompress_restores_weights_within_the_reported_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("dense.safetensors");
    let original = write_checkpoint(&input);

    let tt = dir.path().join("tt.safetensors");
    let stdout = compress(dir.path(), &input, &tt, &["--tt-rank", "4"]);
    let reported = reported_errors(&stdout);
    assert_eq!(reported.len(), 14, "one row per linear weight:\n{stdout}");
    assert!(stdout.contains("[4, 4, 2] | [3, 4, 4]"), "{stdout}");
    let stored = tensors(&tt);
    assert!(stored.contains_key("model.layers.1.mlp.down_proj.cores.5"));
    assert!(!stored.contains_key("model.layers.1.mlp.down_proj.weight"));

    let back = dir.path().join("back.safetensors");
    decompress(dir.path(), &tt, &back);
    let restored = tensors(&back);
    assert_eq!(
        restored.keys().collect::<std::collections::BTreeSet<_>>(),
        original.keys().collect(),
        "the same tensors come back"
    );
    for (name, w) in &original {
        let r = &restored[name];
        assert_eq!(r.size(), w.size(), "{name}");
        match reported.get(name) {
            Some(&e) => {
                let got = rel_error(r, w);
                assert!(
                    (got - e).abs() <= 1e-3 * e + 1e-6,
                    "{name}: error {got}, reported {e}"
                );
                assert!(got > 1e-3, "{name}: rank 4 cannot be exact ({got})");
            }
            None => assert!(r.equal(w), "{name} changed"),
        }
    }

    let full = dir.path().join("full.safetensors");
    let stdout = compress(dir.path(), &input, &full, &["--tt-rank", "100000"]);
    assert!(
        reported_errors(&stdout).values().all(|&e| e < 1e-5),
        "{stdout}"
    );
    let back = dir.path().join("full-back.safetensors");
    decompress(dir.path(), &full, &back);
    for (name, r) in tensors(&back) {
        let d = (&r - &original[&name]).abs().max().double_value(&[]);
        assert!(d < 1e-5, "{name}: full rank differs by {d}");
    }
}

/// Guarantee: a compressed checkpoint loads into a TT Llama (same order) as it is, and that
/// model computes what the dense model with the decompressed weights computes (1e-5).
#[test]
fn compressed_checkpoint_loads_into_a_tt_model() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("dense.safetensors");
    write_checkpoint(&input);
    let tt = dir.path().join("tt.safetensors");
    compress(dir.path(), &input, &tt, &["--tt-eps", "0.5"]);
    let back = dir.path().join("back.safetensors");
    decompress(dir.path(), &tt, &back);

    let kind = LinearKind::Tt {
        rank: 30,
        order: 3,
        eps: None,
    };
    let mut vs = VarStore::new(Device::Cpu);
    let mut model = Llama::new(
        &vs.root(),
        &config(),
        &kind,
        &EmbeddingKind::Dense,
        Kind::Float,
    )
    .unwrap();
    weights::load_model(&mut vs, &mut model.linears_mut(), &tt).unwrap();
    let mut dvs = VarStore::new(Device::Cpu);
    let mut dense = Llama::new(
        &dvs.root(),
        &config(),
        &LinearKind::Dense,
        &EmbeddingKind::Dense,
        Kind::Float,
    )
    .unwrap();
    weights::load_model(&mut dvs, &mut dense.linears_mut(), &back).unwrap();
    let ids = Tensor::arange(16, (Kind::Int64, Device::Cpu)).reshape([2, 8]);
    let (a, b) = tch::no_grad(|| (model.forward(&ids, None), dense.forward(&ids, None)));
    let d = (a - b).abs().max().double_value(&[]);
    assert!(d < 1e-5, "TT model vs decompressed dense model: {d}");
}

/// Guarantee: `frugal inspect` shows each TT layer's modes, ranks and compression, for files
/// and for model folders written by `frugal compress` (whose config.json records the options).
#[test]
fn inspect_names_modes_ranks_and_compression_of_folders() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    write_checkpoint(&model_dir.join("model.safetensors"));
    std::fs::write(
        model_dir.join("config.json"),
        serde_json::to_string(&config()).unwrap(),
    )
    .unwrap();
    std::fs::write(model_dir.join("tokenizer.json"), "{}").unwrap();
    let out_dir = dir.path().join("compressed");
    compress(
        dir.path(),
        &model_dir,
        &out_dir,
        &["--tt-rank", "3", "--order", "2"],
    );
    assert!(out_dir.join("tokenizer.json").is_file());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["tt_config"]["tt_rank"], 3);
    assert_eq!(cfg["hidden_size"], 32);

    let out = run({
        let mut c = frugal(dir.path());
        c.arg("inspect").arg(&out_dir);
        c
    });
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tensor-train layers"), "{text}");
    assert!(text.contains("ranks"), "{text}");
    let q = text
        .lines()
        .find(|l| {
            l.trim_start()
                .starts_with("model.layers.0.self_attn.q_proj ")
                && l.contains('|')
        })
        .unwrap_or_else(|| panic!("no TT row for q_proj:\n{text}"));
    // d 32 at order 2: [8, 4] | [4, 8], ranks capped at 3: 1*8*3 + 3*4*3 + 3*4*3 + 3*8*1.
    assert!(
        q.contains("[8, 4] | [4, 8]") && q.contains("[1, 3, 3, 3, 1]"),
        "{q}"
    );
    assert!(q.contains("1024") && q.contains("120"), "{q}");
    assert!(text.contains("14 TT layers"), "{text}");

    let back_dir = dir.path().join("back");
    decompress(dir.path(), &out_dir, &back_dir);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(back_dir.join("config.json")).unwrap())
            .unwrap();
    assert!(cfg.get("tt_config").is_none());
    let st = SafetensorsFile::open(&back_dir.join("model.safetensors")).unwrap();
    assert!(st
        .names()
        .contains(&"model.layers.0.self_attn.q_proj.weight".to_string()));
    assert!(weights::read_tt_metadata(&st).unwrap().is_empty());
}

/// Guarantee: `frugal decompress` also restores quantized weights (the dequantize path), in
/// the same file as TT cores.
#[test]
fn decompress_restores_quantized_and_tt_weights_together() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("dense.safetensors");
    let original = write_checkpoint(&input);
    let q = dir.path().join("q.safetensors");
    let out = run({
        let mut c = frugal(dir.path());
        c.arg("quantize")
            .arg(&input)
            .arg(&q)
            .args(["--format", "int8", "--include", "mlp"]);
        c
    });
    assert!(out.status.success());
    let both = dir.path().join("both.safetensors");
    compress(dir.path(), &q, &both, &["--tt-rank", "100000"]);
    let back = dir.path().join("back.safetensors");
    decompress(dir.path(), &both, &back);
    let restored = tensors(&back);
    assert_eq!(restored.len(), original.len());
    for (name, w) in &original {
        let e = rel_error(&restored[name], w);
        let tol = if name.contains("mlp") { 0.01 } else { 1e-5 };
        assert!(e < tol, "{name}: {e}");
    }
}

/// Guarantee: bad inputs are one-line errors that name the flag, the file or the tensor.
#[test]
fn bad_inputs_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("dense.safetensors");
    write_checkpoint(&input);
    let out_file = dir.path().join("out.safetensors");
    let cmd = |args: &[&str]| {
        let mut c = frugal(dir.path());
        c.args(args);
        run(c)
    };
    let i = input.to_str().unwrap();
    let o = out_file.to_str().unwrap();
    assert_clean_error(&cmd(&["compress", i, o, "--tt-rank", "0"]), "--tt-rank 0");
    assert_clean_error(&cmd(&["compress", i, o, "--tt-eps", "1.5"]), "--tt-eps 1.5");
    assert_clean_error(
        &cmd(&["compress", i, o, "--tt-rank", "4", "--order", "1"]),
        "--order 1",
    );
    assert_clean_error(
        &cmd(&["compress", "missing.safetensors", o, "--tt-rank", "4"]),
        "missing.safetensors",
    );
    // clap refuses both flags, and neither, before anything runs.
    let both = cmd(&["compress", i, o, "--tt-rank", "4", "--tt-eps", "0.1"]);
    assert_eq!(both.status.code(), Some(2));
    let err = String::from_utf8_lossy(&both.stderr);
    assert!(
        err.contains("--tt-rank")
            && err.contains("--tt-eps")
            && err.contains("cannot be used with"),
        "{err}"
    );
    let neither = cmd(&["compress", i, o]);
    assert_eq!(neither.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&neither.stderr).contains("--tt-rank"));
    assert!(!out_file.exists(), "no output on errors");

    // A dense file has nothing to decompress; cores without a description are named.
    assert_clean_error(&cmd(&["decompress", i, o]), "nothing to decompress");
    let bare = dir.path().join("bare.safetensors");
    let core = Tensor::ones([1, 4, 1], (Kind::Float, Device::Cpu));
    safetensors_io::save(&bare, &[("fc.cores.0".into(), core)], None).unwrap();
    assert_clean_error(
        &cmd(&["decompress", bare.to_str().unwrap(), o]),
        "'fc.cores.0' has no TT description",
    );
    assert_clean_error(
        &cmd(&["decompress", "missing.safetensors", o]),
        "missing.safetensors",
    );
}

/// Guarantee: decompressing a TT model's checkpoint applies the rank variables (scaled, and
/// masked below the pruning threshold) and one physically pruned layer's smaller cores: every
/// restored weight equals its layer's `to_dense()` within 1e-6, and `inspect` shows live ranks.
#[test]
fn decompress_applies_rank_variables_of_a_trained_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tt.safetensors");
    tch::manual_seed(6);
    let kind = LinearKind::Tt {
        rank: 6,
        order: 3,
        eps: None,
    };
    let vs = VarStore::new(Device::Cpu);
    let mut model = Llama::new(
        &vs.root(),
        &config(),
        &kind,
        &EmbeddingKind::Dense,
        Kind::Float,
    )
    .unwrap();
    {
        let mut linears = model.linears_mut();
        tch::no_grad(|| {
            for (_, l) in linears.iter_mut() {
                for d in l.tt().unwrap().ranked().rank_vars() {
                    let _ = d.shallow_clone().uniform_(0.2, 1.5);
                }
            }
            // A masked entry in q_proj of block 0 (bond 2), kept in the file.
            let d = linears[0].1.tt().unwrap().ranked().rank_vars()[2].shallow_clone();
            let _ = d.narrow(0, 0, 2).fill_(0.005);
            // k_proj of block 0: physically pruned at bond 2.
            let d = linears[1].1.tt().unwrap().ranked().rank_vars()[2].shallow_clone();
            let _ = d.narrow(0, 0, 2).fill_(0.0);
        });
        linears[1].1.tt_mut().unwrap().prune(&vs).unwrap();
    }
    weights::save_model(&vs, &model.linears(), &file).unwrap();
    let back = dir.path().join("back.safetensors");
    decompress(dir.path(), &file, &back);
    let restored = tensors(&back);
    for (name, layer) in model.linears() {
        let want = tch::no_grad(|| layer.tt().unwrap().to_dense());
        let d = (&restored[&format!("{name}.weight")] - want)
            .abs()
            .max()
            .double_value(&[]);
        assert!(d < 1e-6, "{name}: {d}");
    }
    let out = run({
        let mut c = frugal(dir.path());
        c.arg("inspect").arg(&file);
        c
    });
    let text = String::from_utf8_lossy(&out.stdout);
    let q = text
        .lines()
        .find(|l| {
            l.trim_start()
                .starts_with("model.layers.0.self_attn.q_proj ")
                && l.contains('|')
        })
        .unwrap_or_else(|| panic!("no TT row for q_proj:\n{text}"));
    assert!(
        q.contains("[1, 4, 6, 6, 6, 4, 1] live [1, 4, 6, 4, 6, 4, 1]"),
        "{q}"
    );
    let k = text
        .lines()
        .find(|l| {
            l.trim_start()
                .starts_with("model.layers.0.self_attn.k_proj ")
                && l.contains('|')
        })
        .unwrap();
    assert!(
        k.contains("[1, 4, 6, 4, 6, 4, 1]") && !k.contains("live"),
        "{k}"
    );
}

/// Guarantee: a TT word table (an encoder's, 4-D TT-matrix cores) is described in the file's
/// metadata, shown by `frugal inspect` (vocabulary modes x dimension modes) and restored by
/// `frugal decompress` to the dense `(vocab, d)` table it stands for (padding rows dropped).
#[test]
fn tt_word_tables_are_inspected_and_decompressed() {
    use frugal_models::encoder::{EncoderConfig, EncoderForMaskedLm};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("enc.safetensors");
    tch::manual_seed(7);
    let vs = VarStore::new(Device::Cpu);
    let cfg = EncoderConfig::new(250, 16, 1, 2, 32, 32);
    let emb = EmbeddingKind::Tt {
        rank: 5,
        order: 2,
        eps: None,
    };
    let model =
        EncoderForMaskedLm::new(&vs.root(), &cfg, &LinearKind::Dense, &emb, Kind::Float).unwrap();
    weights::save_model_with_tables(&vs, &model.linears(), &model.tables(), &file).unwrap();
    let back = dir.path().join("back.safetensors");
    decompress(dir.path(), &file, &back);
    let restored = tensors(&back);
    let name = "bert.embeddings.word_embeddings";
    let want = tch::no_grad(|| model.encoder.embeddings.word_table());
    let got = &restored[&format!("{name}.weight")];
    assert_eq!(got.size(), vec![250, 16]);
    assert!((got - want).abs().max().double_value(&[]) < 1e-6);
    assert!(!restored.keys().any(|k| k.contains(".cores.")));
    let out = run({
        let mut c = frugal(dir.path());
        c.arg("inspect").arg(&file);
        c
    });
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text
        .lines()
        .find(|l| l.trim_start().starts_with(name) && l.contains(" x "))
        .unwrap_or_else(|| panic!("no TT row for the table:\n{text}"));
    assert!(
        row.contains("[250, 16]") && row.contains("[1, 5, 1]"),
        "{row}"
    );
}
