//! The LLaMA decoder with tensor-train linear layers (`LinearKind::Tt`): it computes what the
//! dense model computes with the reconstructed weights, trains its cores and rank variables,
//! and saves and loads (pruned layers, dense checkpoints converted by TT-SVD) without loss.

use frugal_models::linear;
use frugal_models::llama::{Llama, LlamaConfig};
use frugal_models::{weights, EmbeddingKind, LinearKind};
use std::path::Path;
use tch::{nn, nn::OptimizerConfig, nn::VarStore, Device, Kind, Tensor};

/// The `tiny` preset, shortened (2 blocks, 256-token vocabulary) so that a test takes
/// milliseconds: d 256 = [8, 8, 4] | [4, 8, 8], ffn 688 = [43, 4, 4] | [4, 4, 43].
fn tiny() -> LlamaConfig {
    let mut cfg = LlamaConfig::preset("tiny").unwrap();
    cfg.num_hidden_layers = 2;
    cfg.vocab_size = 256;
    cfg.max_position_embeddings = 64;
    cfg
}

/// A smaller shape whose TT layers can hold full rank cheaply: d 32, ffn 48.
fn small() -> LlamaConfig {
    let mut cfg = tiny();
    cfg.hidden_size = 32;
    cfg.intermediate_size = 48;
    cfg.num_attention_heads = 2;
    cfg.num_key_value_heads = 2;
    cfg
}

fn tt(rank: i64) -> LinearKind {
    LinearKind::Tt {
        rank,
        order: 3,
        eps: None,
    }
}

fn ids(b: i64, t: i64, vocab: i64) -> Tensor {
    (Tensor::arange(b * t, (Kind::Int64, Device::Cpu)).reshape([b, t]) * 7).remainder(vocab)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// A dense model with the TT model's variables and, for each TT layer, its `to_dense()`.
fn dense_twin(cfg: &LlamaConfig, tt_vs: &VarStore, tt_model: &Llama) -> (VarStore, Llama) {
    let vs = VarStore::new(Device::Cpu);
    let model = Llama::new(
        &vs.root(),
        cfg,
        &LinearKind::Dense,
        &EmbeddingKind::Dense,
        Kind::Float,
    )
    .unwrap();
    let tt_vars = tt_vs.variables();
    let dense: Vec<(String, Tensor)> = tt_model
        .linears()
        .into_iter()
        .map(|(n, l)| {
            (
                format!("{n}.weight"),
                l.tt().expect("a TT layer").to_dense(),
            )
        })
        .collect();
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            let src = tt_vars
                .get(&name)
                .map(Tensor::shallow_clone)
                .or_else(|| {
                    dense
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, t)| t.shallow_clone())
                })
                .unwrap_or_else(|| panic!("no source for {name}"));
            var.copy_(&src);
        }
    });
    (vs, model)
}

/// Guarantee: a TT Llama's logits equal those of a dense Llama whose linear weights are the TT
/// layers' reconstructions `to_dense()` (other variables shared), within 1e-5.
#[test]
fn tt_llama_matches_dense_llama_with_reconstructed_weights() {
    tch::manual_seed(0);
    let cfg = tiny();
    let vs = VarStore::new(Device::Cpu);
    let model = Llama::new(
        &vs.root(),
        &cfg,
        &tt(30),
        &EmbeddingKind::Dense,
        Kind::Float,
    )
    .unwrap();
    let q = model.linears()[0].1.tt().unwrap();
    assert_eq!(q.in_modes(), [8, 8, 4]);
    assert_eq!(q.out_modes(), [4, 8, 8]);
    let names: Vec<String> = vs.variables().into_keys().collect();
    assert!(names.contains(&"model.layers.0.mlp.up_proj.cores.5".to_string()));
    assert!(names.contains(&"model.layers.1.self_attn.o_proj.rank_vars.4".to_string()));
    assert!(!names.iter().any(|n| n.contains("q_proj.weight")));
    let (_dvs, dense) = dense_twin(&cfg, &vs, &model);
    let x = ids(2, 12, cfg.vocab_size);
    let (a, b) = tch::no_grad(|| (model.forward(&x, None), dense.forward(&x, None)));
    let d = max_diff(&a, &b);
    assert!(d < 1e-5, "TT vs dense logits differ by {d}");
    assert!(
        a.abs().max().double_value(&[]) > 1e-3,
        "logits are not trivial"
    );
}

/// Guarantee: a TT Llama trains: every core and rank variable gets a gradient, and a few Adam
/// steps lower the loss on a fixed batch.
#[test]
fn tt_llama_trains_its_cores_and_rank_variables() {
    tch::manual_seed(1);
    let cfg = small();
    let vs = VarStore::new(Device::Cpu);
    let model = Llama::new(&vs.root(), &cfg, &tt(8), &EmbeddingKind::Dense, Kind::Float).unwrap();
    let x = ids(2, 16, cfg.vocab_size);
    let y = x.roll([-1], [1]);
    let mut opt = nn::Adam::default().build(&vs, 1e-2).unwrap();
    let first = model.loss(&x, &y);
    first.backward();
    for (name, v) in vs.variables() {
        if name.contains(".cores.") || name.contains(".rank_vars.") {
            assert!(v.grad().defined(), "{name} has no gradient");
        }
    }
    opt.zero_grad();
    let first = first.double_value(&[]);
    let mut last = first;
    for _ in 0..15 {
        let loss = model.loss(&x, &y);
        opt.backward_step(&loss);
        last = loss.double_value(&[]);
    }
    assert!(last < first - 0.5, "loss {first} -> {last}");
}

/// Guarantee: the bf16 compute kind is honoured by TT layers as by dense ones.
#[test]
fn tt_layer_computes_in_the_compute_kind() {
    let vs = VarStore::new(Device::Cpu);
    let layer = linear::build(&vs.root().sub("fc"), 32, 48, &tt(4), Kind::BFloat16).unwrap();
    let y = layer.forward(&Tensor::randn([3, 32], (Kind::Float, Device::Cpu)));
    assert_eq!(y.kind(), Kind::BFloat16);
    assert_eq!(y.size(), [3, 48]);
}

/// Guarantee: modes follow CoMERA's layout (input descending, output ascending) and ranks are
/// capped by what the modes allow; a dimension that cannot be factored is an error naming
/// `model.linear` and the dimension.
#[test]
fn modes_ranks_and_unfactorable_dimensions() {
    let vs = VarStore::new(Device::Cpu);
    let a = linear::build(&vs.root().sub("a"), 768, 768, &tt(30), Kind::Float).unwrap();
    let a = a.tt().unwrap();
    assert_eq!(
        (a.in_modes(), a.out_modes()),
        ([12, 8, 8].as_slice(), [8, 8, 12].as_slice())
    );
    assert_eq!(a.ranks(), [1, 12, 30, 30, 30, 12, 1]);
    assert_eq!(a.num_params(), 20448);
    let b = linear::build(&vs.root().sub("b"), 768, 3072, &tt(30), Kind::Float).unwrap();
    let b = b.tt().unwrap();
    assert_eq!(
        (b.in_modes(), b.out_modes()),
        ([12, 8, 8].as_slice(), [12, 16, 16].as_slice())
    );
    let err = linear::build(&vs.root().sub("c"), 37, 64, &tt(30), Kind::Float)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.linear") && err.contains("37"), "{err}");
    let err = linear::build(&vs.root().sub("d"), 64, 64, &tt(0), Kind::Float)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.linear.rank"), "{err}");
}

/// Guarantee: `kind = "tt"` parses with CoMERA's defaults (rank 30, 3 modes per side) and
/// refuses unknown fields by name.
#[test]
fn tt_kind_parses_with_defaults() {
    let k: LinearKind = serde_json::from_str(r#"{"kind": "tt"}"#).unwrap();
    assert_eq!(k, tt(30));
    let k: LinearKind = serde_json::from_str(r#"{"kind": "tt", "rank": 8, "eps": 0.1}"#).unwrap();
    assert_eq!(
        k,
        LinearKind::Tt {
            rank: 8,
            order: 3,
            eps: Some(0.1)
        }
    );
    let err = serde_json::from_str::<LinearKind>(r#"{"kind": "tt", "ranks": 8}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("ranks"), "{err}");
}

fn build(
    cfg: &LlamaConfig,
    kind: &LinearKind,
    file: &Path,
) -> frugal_core::Result<(VarStore, Llama)> {
    let mut vs = VarStore::new(Device::Cpu);
    let mut model = Llama::new(&vs.root(), cfg, kind, &EmbeddingKind::Dense, Kind::Float)?;
    weights::load_model(&mut vs, &mut model.linears_mut(), file)?;
    Ok((vs, model))
}

/// Guarantee: saving a TT model (one layer physically pruned to smaller ranks) and loading it
/// into a freshly built TT model gives identical logits; the loaded layer has the file's ranks,
/// its variables are the trainable ones under the same names, and the file's metadata describes
/// every TT layer.
#[test]
fn save_and_load_round_trip_with_a_pruned_layer() {
    tch::manual_seed(2);
    let cfg = small();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    let vs = VarStore::new(Device::Cpu);
    let mut model =
        Llama::new(&vs.root(), &cfg, &tt(8), &EmbeddingKind::Dense, Kind::Float).unwrap();
    let pruned_ranks = {
        let mut linears = model.linears_mut();
        let layer = linears[2].1.tt_mut().unwrap(); // model.layers.0.self_attn.v_proj
        tch::no_grad(|| {
            // Bond 2 (the middle one) keeps 3 of its 8 entries; bond 0 loses one.
            let d = layer.ranked().rank_vars()[2].shallow_clone();
            let _ = d.narrow(0, 3, 5).fill_(0.0);
            let d0 = layer.ranked().rank_vars()[0].shallow_clone();
            let _ = d0.narrow(0, 0, 1).fill_(0.001);
        });
        layer.prune(&vs).unwrap();
        layer.ranks()
    };
    assert_eq!(pruned_ranks, [1, 3, 8, 3, 8, 4, 1]);
    let x = ids(2, 10, cfg.vocab_size);
    let before = tch::no_grad(|| model.forward(&x, None));
    weights::save_model(&vs, &model.linears(), &file).unwrap();
    let st = frugal_core::safetensors_io::SafetensorsFile::open(&file).unwrap();
    let meta = weights::read_tt_metadata(&st).unwrap();
    assert_eq!(meta.len(), 14);
    assert_eq!(meta["model.layers.0.self_attn.v_proj"].ranks, pruned_ranks);

    tch::manual_seed(99);
    let (vs2, back) = build(&cfg, &tt(8), &file).unwrap();
    let v = back.linears()[2].1.tt().unwrap().ranks();
    assert_eq!(v, pruned_ranks);
    let after = tch::no_grad(|| back.forward(&x, None));
    assert_eq!(max_diff(&before, &after), 0.0);
    // The replaced variables are the var store's, trainable, under the layer's names.
    let core = vs2
        .variables()
        .remove("model.layers.0.self_attn.v_proj.cores.2")
        .unwrap();
    assert_eq!(core.size(), [8, 2, 3]);
    assert!(core.requires_grad());
    let trainable = vs2.trainable_variables();
    assert_eq!(trainable.len(), vs2.variables().len());
    assert!(trainable.iter().any(|t| t.size() == [8, 2, 3]));
}

/// Guarantee: a dense checkpoint loads into a TT model through TT-SVD at the model's ranks
/// (exact at full rank, within 1e-4 of the dense model's logits), and a TT checkpoint loaded
/// into a dense model is an error that says which `model.linear` to set.
#[test]
fn dense_checkpoints_convert_and_tt_checkpoints_need_a_tt_model() {
    tch::manual_seed(3);
    let cfg = small();
    let dir = tempfile::tempdir().unwrap();
    let dense_file = dir.path().join("dense.safetensors");
    let vs = VarStore::new(Device::Cpu);
    let dense = Llama::new(
        &vs.root(),
        &cfg,
        &LinearKind::Dense,
        &EmbeddingKind::Dense,
        Kind::Float,
    )
    .unwrap();
    weights::save_model(&vs, &dense.linears(), &dense_file).unwrap();
    let x = ids(2, 10, cfg.vocab_size);
    let want = tch::no_grad(|| dense.forward(&x, None));

    // Rank 64 is full rank for every bond of d 32 / ffn 48 at 3 modes per side.
    let (tvs, full) = build(&cfg, &tt(64), &dense_file).unwrap();
    let got = tch::no_grad(|| full.forward(&x, None));
    let d = max_diff(&want, &got);
    assert!(d < 1e-4, "full-rank TT from dense differs by {d}");
    // A low rank approximates, and differs.
    let (_lvs, low) = build(&cfg, &tt(2), &dense_file).unwrap();
    let low_out = tch::no_grad(|| low.forward(&x, None));
    assert!(max_diff(&want, &low_out) > 1e-4);
    assert!(low.linears()[0]
        .1
        .tt()
        .unwrap()
        .ranks()
        .iter()
        .all(|&r| r <= 2));

    let tt_file = dir.path().join("tt.safetensors");
    weights::save_model(&tvs, &full.linears(), &tt_file).unwrap();
    let err = build(&cfg, &LinearKind::Dense, &tt_file)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tt.safetensors")
            && err.contains("kind = \"tt\"")
            && err.contains("order = 3"),
        "{err}"
    );
    // A TT model of another order refuses the file by name.
    let order_two = LinearKind::Tt {
        rank: 8,
        order: 2,
        eps: None,
    };
    let err = build(&cfg, &order_two, &tt_file).unwrap_err().to_string();
    assert!(
        err.contains("model.linear.order") && err.contains("q_proj"),
        "{err}"
    );
}
