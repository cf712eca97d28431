//! The encoder with a tensor-train word table (`EmbeddingKind::Tt`): it computes what a dense
//! encoder computes with the reconstructed table (tied masked-LM decoder included), and its
//! checkpoints load back, also pruned, also from and into dense files.

use frugal_models::embedding::{tt_embedding_modes, WordEmbedding};
use frugal_models::encoder::{EncoderConfig, EncoderForMaskedLm};
use frugal_models::{weights, EmbeddingKind, LinearKind};
use frugal_tt::TtLayer;
use tch::{nn::VarStore, Device, Kind, Tensor};

const VOCAB: i64 = 250;

fn config() -> EncoderConfig {
    EncoderConfig::preset("encoder-tiny")
        .unwrap()
        .with_vocab_size(VOCAB)
}

fn tt(rank: i64) -> EmbeddingKind {
    EmbeddingKind::Tt {
        rank,
        order: 2,
        eps: None,
    }
}

fn model(seed: i64, embedding: &EmbeddingKind) -> (VarStore, EncoderForMaskedLm) {
    tch::manual_seed(seed);
    let vs = VarStore::new(Device::Cpu);
    let m = EncoderForMaskedLm::new(
        &vs.root(),
        &config(),
        &LinearKind::Dense,
        embedding,
        Kind::Float,
    )
    .unwrap();
    (vs, m)
}

fn ids() -> Tensor {
    // Repeated ids, the first and the last of the vocabulary.
    Tensor::from_slice(&[0i64, 5, 5, 249, 17, 0, 100, 3, 249, 8, 8, 42]).view([2, 6])
}

fn table_of(m: &EncoderForMaskedLm) -> &frugal_tt::TtEmbedding {
    m.encoder.embeddings.word().tt().expect("a TT table")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn modes_pad_the_vocabulary() {
    let (vm, dm) = tt_embedding_modes(250, 128, 2).unwrap();
    assert!(vm.iter().product::<i64>() >= 250);
    assert_eq!(dm.iter().product::<i64>(), 128);
    let (vm, dm) = tt_embedding_modes(30522, 768, 4).unwrap();
    assert_eq!((vm.len(), dm.len()), (4, 4));
    assert!(vm.iter().product::<i64>() >= 30522);
}

#[test]
fn tt_table_encoder_equals_dense_encoder_with_the_reconstructed_table() {
    let (tvs, tmodel) = model(1, &tt(8));
    let (mut dvs, dmodel) = model(2, &EmbeddingKind::Dense);
    // Copy every shared variable, and the reconstructed table into the dense one.
    let file = std::env::temp_dir().join(format!("tt_table_{}.safetensors", std::process::id()));
    let mut tensors = weights::named_variables(&tvs);
    tensors.retain(|(n, _)| !n.contains("word_embeddings."));
    let table = tch::no_grad(|| table_of(&tmodel).to_dense());
    assert_eq!(table.size(), vec![VOCAB, 128]);
    tensors.push(("bert.embeddings.word_embeddings.weight".into(), table));
    frugal_core::safetensors_io::save(&file, &tensors, None).unwrap();
    weights::load(&mut dvs, &file).unwrap();
    std::fs::remove_file(&file).unwrap();

    let a = tmodel.logits(&ids(), None, None);
    let b = dmodel.logits(&ids(), None, None);
    assert_eq!(a.size(), vec![2, 6, VOCAB]);
    assert!(
        max_diff(&a, &b) < 1e-5,
        "logits differ by {}",
        max_diff(&a, &b)
    );

    // The loss reaches the cores through both the lookup and the tied decoder.
    let labels = ids().copy();
    tmodel.mlm_loss(&ids(), None, None, &labels).backward();
    for c in table_of(&tmodel).ranked().cores() {
        assert!(c.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}

#[test]
fn checkpoints_load_back_also_pruned() {
    let (vs, mut m) = model(3, &tt(8));
    // Prune bond 0 to 5 of its 8 ranks.
    tch::no_grad(|| {
        let _ = table_of(&m).ranked().rank_vars()[0]
            .narrow(0, 5, 3)
            .fill_(0.0);
    });
    let before = tch::no_grad(|| m.logits(&ids(), None, None));
    let table = m.encoder.embeddings.word_mut().tt_mut().unwrap();
    let kept = TtLayer::prune(table, &vs).unwrap();
    assert_eq!(kept[0].size(), vec![5]);
    assert_eq!(table_of(&m).ranks(), vec![1, 5, 1]);
    let after = tch::no_grad(|| m.logits(&ids(), None, None));
    assert!(max_diff(&before, &after) < 1e-6);

    let file = std::env::temp_dir().join(format!("tt_pruned_{}.safetensors", std::process::id()));
    weights::save_model_with_tables(&vs, &m.linears(), &m.tables(), &file).unwrap();
    let f = frugal_core::safetensors_io::SafetensorsFile::open(&file).unwrap();
    let meta = weights::read_tt_metadata(&f).unwrap();
    let info = &meta["bert.embeddings.word_embeddings"];
    assert_eq!(
        (info.vocab, info.ranks.clone()),
        (Some(VOCAB), vec![1, 5, 1])
    );
    assert_eq!(info.dense_shape(), vec![VOCAB, 128]);
    let dense = weights::read_tt_dense(&f, "bert.embeddings.word_embeddings", info).unwrap();
    let want = tch::no_grad(|| table_of(&m).to_dense());
    assert!(max_diff(&dense, &want) < 1e-6);

    // A fresh, unpruned model takes the file's ranks.
    let (mut vs2, mut m2) = model(4, &tt(8));
    let (mut l, mut t) = m2.weights_mut();
    weights::load_model_with_tables(&mut vs2, &mut l, &mut t, &file).unwrap();
    assert_eq!(table_of(&m2).ranks(), vec![1, 5, 1]);
    let loaded = tch::no_grad(|| m2.logits(&ids(), None, None));
    assert!(max_diff(&loaded, &after) < 1e-6);
    // The new cores are trainable variables of the store.
    let names: Vec<String> = weights::named_variables(&vs2)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(names.contains(&"bert.embeddings.word_embeddings.cores.0".to_string()));
    let shape0 = vs2.variables()["bert.embeddings.word_embeddings.cores.0"].size();
    assert_eq!(shape0[3], 5);

    // A dense model cannot take it, and says how to.
    let (mut dvs, _) = model(5, &EmbeddingKind::Dense);
    let err = weights::load(&mut dvs, &file).unwrap_err().to_string();
    assert!(err.contains("model.embedding"), "{err}");
    std::fs::remove_file(&file).unwrap();
}

#[test]
fn dense_checkpoints_convert_to_tt_tables() {
    let (dvs, dense) = model(6, &EmbeddingKind::Dense);
    let file =
        std::env::temp_dir().join(format!("tt_from_dense_{}.safetensors", std::process::id()));
    weights::save(&dvs, &file).unwrap();
    // At full rank (the cap of the modes) the TT-SVD is exact.
    let full = i64::MAX;
    let (mut vs, mut m) = model(7, &tt(full));
    let (mut l, mut t) = m.weights_mut();
    weights::load_model_with_tables(&mut vs, &mut l, &mut t, &file).unwrap();
    let a = tch::no_grad(|| dense.logits(&ids(), None, None));
    let b = tch::no_grad(|| m.logits(&ids(), None, None));
    assert!(max_diff(&a, &b) < 1e-4, "{}", max_diff(&a, &b));
    // A TT table of another order does not take another order's cores.
    weights::save_model_with_tables(&vs, &m.linears(), &m.tables(), &file).unwrap();
    let (mut vs3, mut m3) = model(
        8,
        &EmbeddingKind::Tt {
            rank: 4,
            order: 3,
            eps: None,
        },
    );
    let (mut l, mut t) = m3.weights_mut();
    let err = weights::load_model_with_tables(&mut vs3, &mut l, &mut t, &file)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.embedding.order"), "{err}");
    std::fs::remove_file(&file).unwrap();
}

#[test]
fn bad_embedding_options_name_the_key() {
    for (kind, key) in [
        (
            EmbeddingKind::Tt {
                rank: 0,
                order: 2,
                eps: None,
            },
            "model.embedding.rank",
        ),
        (
            EmbeddingKind::Tt {
                rank: 4,
                order: 1,
                eps: None,
            },
            "model.embedding.order",
        ),
        (
            EmbeddingKind::Tt {
                rank: 4,
                order: 2,
                eps: Some(1.5),
            },
            "model.embedding.eps",
        ),
    ] {
        let vs = VarStore::new(Device::Cpu);
        let err = WordEmbedding::new(
            &vs.root(),
            10,
            8,
            &kind,
            tch::nn::Init::Const(0.0),
            Kind::Float,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(key), "{err}");
    }
}
