//! The LLaMA decoder with a tensor-train word table (`EmbeddingKind::Tt` for
//! `model.embed_tokens`): it computes what the dense LLaMA computes with the reconstructed
//! table (also token by token through the KV cache), a dense checkpoint converts into it by
//! TT-SVD (exactly at full rank), a pruned table's checkpoint loads back at its ranks, and what
//! it cannot be (a tied output head, HGRN-bit's table) is refused by key.

use frugal_models::decoder::{Decoder, DecoderConfig};
use frugal_models::embedding::WordEmbedding;
use frugal_models::hgrn_bit::HgrnBitConfig;
use frugal_models::llama::{KvCache, Llama, LlamaConfig};
use frugal_models::{weights, EmbeddingKind, LinearKind};
use std::path::Path;
use tch::{nn::VarStore, Device, Kind, Tensor};

/// A small LLaMA (d 32, ffn 48, 2 blocks) with a vocabulary of 251, which a TT table of order 3
/// pads to 252 = [7, 6, 6] (dimension [2, 4, 4]).
fn config() -> LlamaConfig {
    let mut cfg = LlamaConfig::preset("tiny").unwrap();
    cfg.vocab_size = 251;
    cfg.hidden_size = 32;
    cfg.intermediate_size = 48;
    cfg.num_hidden_layers = 2;
    cfg.num_attention_heads = 2;
    cfg.num_key_value_heads = 2;
    cfg.max_position_embeddings = 64;
    cfg
}

fn table(rank: i64) -> EmbeddingKind {
    EmbeddingKind::Tt {
        rank,
        order: 3,
        eps: None,
    }
}

fn build(linear: &LinearKind, embedding: &EmbeddingKind, seed: i64) -> (VarStore, Llama) {
    tch::manual_seed(seed);
    let vs = VarStore::new(Device::Cpu);
    let model = Llama::new(&vs.root(), &config(), linear, embedding, Kind::Float).unwrap();
    (vs, model)
}

/// Loads `file` into `model` (its linear layers and word table).
fn load(vs: &mut VarStore, model: &mut Llama, file: &Path) -> frugal_core::Result<()> {
    let (mut linears, mut tables) = model.weights_mut();
    weights::load_model_with_tables(vs, &mut linears, &mut tables, file)
}

fn save(vs: &VarStore, model: &Llama, file: &Path) {
    weights::save_model_with_tables(vs, &model.linears(), &model.tables(), file).unwrap();
}

/// Repeated ids, the first and the last of the vocabulary among them.
fn ids() -> Tensor {
    Tensor::from_slice(&[0i64, 5, 5, 250, 17, 0, 100, 3, 250, 8, 8, 42, 7, 7]).view([2, 7])
}

fn tt_table(m: &Llama) -> &frugal_tt::TtEmbedding {
    m.tables()[0].1.tt().expect("a TT table")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Guarantee: a LLaMA with a TT table (rank variables away from one, so that they matter) gives
/// the logits of a dense LLaMA whose `model.embed_tokens.weight` is the table's reconstruction
/// `to_dense()` and whose other variables are the same, within 1e-5 (f32); also token by token
/// through the KV cache (what `frugal generate` runs). The table's variables are
/// `model.embed_tokens.cores.{k}` and `.rank_vars.{i}`, it is the first of `tt_layers()`, and the
/// loss reaches every core and rank variable.
#[test]
fn tt_table_llama_matches_the_dense_llama_with_the_reconstructed_table() {
    let (tvs, tmodel) = build(&LinearKind::Dense, &table(5), 1);
    let names: Vec<String> = tvs.variables().into_keys().collect();
    for n in [
        "model.embed_tokens.cores.0",
        "model.embed_tokens.cores.2",
        "model.embed_tokens.rank_vars.1",
        "lm_head.weight",
    ] {
        assert!(names.contains(&n.to_string()), "no {n}");
    }
    assert!(!names.contains(&"model.embed_tokens.weight".to_string()));
    let t = tt_table(&tmodel);
    assert_eq!(
        (t.vocab_modes(), t.dim_modes()),
        (vec![7, 6, 6], vec![2, 4, 4])
    );
    assert_eq!(t.ranks(), vec![1, 5, 5, 1]);
    let layers = tmodel.tt_layers();
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0].0, "model.embed_tokens");
    tch::no_grad(|| {
        for d in t.ranked().rank_vars() {
            let _ = d.shallow_clone().uniform_(0.5, 1.5);
        }
    });

    let (mut dvs, dmodel) = build(&LinearKind::Dense, &EmbeddingKind::Dense, 2);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("twin.safetensors");
    let mut tensors = weights::named_variables(&tvs);
    tensors.retain(|(n, _)| !n.starts_with("model.embed_tokens."));
    let full = tch::no_grad(|| t.to_dense());
    assert_eq!(full.size(), vec![251, 32]);
    tensors.push(("model.embed_tokens.weight".into(), full));
    frugal_core::safetensors_io::save(&file, &tensors, None).unwrap();
    weights::load(&mut dvs, &file).unwrap();

    let x = ids();
    let (a, b) = tch::no_grad(|| (tmodel.forward(&x, None), dmodel.forward(&x, None)));
    assert_eq!(a.size(), vec![2, 7, 251]);
    let d = max_diff(&a, &b);
    assert!(d < 1e-5, "TT-table vs dense logits differ by {d}");
    assert!(a.abs().max().double_value(&[]) > 1e-3, "trivial logits");

    // Token by token through the KV cache, as generation runs.
    let mut cache = KvCache::default();
    let steps: Vec<Tensor> = tch::no_grad(|| {
        (0..7)
            .map(|i| tmodel.forward(&x.narrow(1, i, 1), Some(&mut cache)))
            .collect()
    });
    let cached = Tensor::cat(&steps, 1);
    let d = max_diff(&cached, &a);
    assert!(d < 1e-5, "cached decoding differs by {d}");

    let y = x.roll([-1], [1]);
    tmodel.loss(&x, &y).backward();
    let r = tt_table(&tmodel).ranked();
    for v in r.cores().iter().chain(r.rank_vars()) {
        assert!(v.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}

/// Guarantee: a dense checkpoint loaded into a LLaMA with a TT table is converted by TT-SVD:
/// at full rank (the cap of the modes) the model reproduces the dense model's logits within
/// 1e-4, also with TT linear layers at full rank beside it (`tt_layers()`: the table first, then
/// the TT linears); at a low rank it approximates (its logits differ) and the table has the low
/// ranks.
#[test]
fn dense_checkpoints_convert_into_a_tt_table() {
    let (dvs, dense) = build(&LinearKind::Dense, &EmbeddingKind::Dense, 3);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dense.safetensors");
    save(&dvs, &dense, &file);
    let x = ids();
    let want = tch::no_grad(|| dense.forward(&x, None));

    let (mut vs, mut full) = build(&LinearKind::Dense, &table(i64::MAX), 4);
    assert_eq!(tt_table(&full).ranks(), vec![1, 14, 24, 1]);
    load(&mut vs, &mut full, &file).unwrap();
    let d = max_diff(&want, &tch::no_grad(|| full.forward(&x, None)));
    assert!(d < 1e-4, "full-rank TT table from dense differs by {d}");

    let tt_linear = LinearKind::Tt {
        rank: 64,
        order: 2,
        eps: None,
    };
    let (mut vs, mut both) = build(&tt_linear, &table(i64::MAX), 5);
    load(&mut vs, &mut both, &file).unwrap();
    let layers = both.tt_layers();
    assert_eq!(layers.len(), 1 + 2 * 7);
    assert_eq!(
        (layers[0].0.as_str(), layers[1].0.as_str()),
        ("model.embed_tokens", "model.layers.0.self_attn.q_proj")
    );
    drop(layers);
    let d = max_diff(&want, &tch::no_grad(|| both.forward(&x, None)));
    assert!(d < 1e-4, "full-rank TT table and linears differ by {d}");

    let (mut vs, mut low) = build(&LinearKind::Dense, &table(2), 6);
    load(&mut vs, &mut low, &file).unwrap();
    assert_eq!(tt_table(&low).ranks(), vec![1, 2, 2, 1]);
    assert!(max_diff(&want, &tch::no_grad(|| low.forward(&x, None))) > 1e-4);
}

/// Guarantee: a LLaMA checkpoint with a physically pruned TT table describes the table in its
/// metadata (vocabulary, modes, pruned ranks) and loads into a freshly built, unpruned model at
/// the file's ranks with identical logits, the new cores the store's trainable variables under
/// the same names; a dense model refuses it with an error naming `model.embedding`.
#[test]
fn a_pruned_table_loads_back_at_its_ranks() {
    let (vs, mut m) = build(&LinearKind::Dense, &table(5), 7);
    tch::no_grad(|| {
        let _ = tt_table(&m).ranked().rank_vars()[1]
            .narrow(0, 0, 2)
            .fill_(0.0);
    });
    let x = ids();
    let before = tch::no_grad(|| m.forward(&x, None));
    {
        let mut layers = m.tt_layers_mut();
        layers[0].1.prune(&vs).unwrap();
    }
    assert_eq!(tt_table(&m).ranks(), vec![1, 5, 3, 1]);
    let after = tch::no_grad(|| m.forward(&x, None));
    assert!(max_diff(&before, &after) < 1e-6);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pruned.safetensors");
    save(&vs, &m, &file);
    let f = frugal_core::safetensors_io::SafetensorsFile::open(&file).unwrap();
    let info = &weights::read_tt_metadata(&f).unwrap()["model.embed_tokens"];
    assert_eq!(
        (info.vocab, info.ranks.clone(), info.dense_shape()),
        (Some(251), vec![1, 5, 3, 1], vec![251, 32])
    );

    let (mut vs2, mut back) = build(&LinearKind::Dense, &table(5), 8);
    load(&mut vs2, &mut back, &file).unwrap();
    assert_eq!(tt_table(&back).ranks(), vec![1, 5, 3, 1]);
    assert_eq!(
        max_diff(&after, &tch::no_grad(|| back.forward(&x, None))),
        0.0
    );
    let core = &vs2.variables()["model.embed_tokens.cores.2"];
    assert_eq!(core.size(), vec![3, 6, 4, 1]);
    let trainable = vs2.trainable_variables();
    assert_eq!(trainable.len(), vs2.variables().len());
    assert!(trainable.iter().any(|t| t.data_ptr() == core.data_ptr()));

    let (mut dvs, mut dense) = build(&LinearKind::Dense, &EmbeddingKind::Dense, 9);
    let err = load(&mut dvs, &mut dense, &file).unwrap_err().to_string();
    assert!(err.contains("model.embedding"), "{err}");
}

/// Guarantee: a TT table is refused by key (`model.embedding`) where it cannot be: as the tied
/// output head of a model with `tie_word_embeddings` (a dense table still ties: no
/// `lm_head.weight`), and in HGRN-bit.
#[test]
fn tied_heads_and_hgrn_bit_refuse_a_tt_table() {
    let mut cfg = config();
    cfg.tie_word_embeddings = true;
    let vs = VarStore::new(Device::Cpu);
    let err = Llama::new(&vs.root(), &cfg, &LinearKind::Dense, &table(4), Kind::Float)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("model.embedding:") && err.contains("tie_word_embeddings"),
        "{err}"
    );
    let vs = VarStore::new(Device::Cpu);
    let tied = Llama::new(
        &vs.root(),
        &cfg,
        &LinearKind::Dense,
        &EmbeddingKind::Dense,
        Kind::Float,
    )
    .unwrap();
    assert!(matches!(tied.tables()[0].1, WordEmbedding::Dense(_)));
    assert!(!vs.variables().contains_key("lm_head.weight"));

    let hgrn = DecoderConfig::HgrnBit(HgrnBitConfig::preset("tiny").unwrap());
    let vs = VarStore::new(Device::Cpu);
    let kind = LinearKind::BitLinear { eps: 1e-8 };
    let err = Decoder::new(&vs.root(), &hgrn, &kind, &table(4), Kind::Float)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("model.embedding:"), "{err}");
}
