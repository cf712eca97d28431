//! Activation checkpointing of the encoder ([`Encoder::forward_checkpointed`]): recomputing the
//! blocks in the backward pass leaves the same gradients as the plain backward pass, for dense
//! and tensor-train layers and word tables, with padding, for both heads.

use frugal_models::encoder::{EncoderConfig, EncoderForClassification, EncoderForMaskedLm};
use frugal_models::{EmbeddingKind, LinearKind};
use tch::{nn::VarStore, Device, Kind, Tensor};

fn kinds() -> Vec<(LinearKind, EmbeddingKind)> {
    vec![
        (LinearKind::Dense, EmbeddingKind::Dense),
        (
            LinearKind::Tt {
                rank: 4,
                order: 2,
                eps: None,
            },
            EmbeddingKind::Tt {
                rank: 5,
                order: 2,
                eps: None,
            },
        ),
    ]
}

fn inputs() -> (Tensor, Tensor, Tensor) {
    tch::manual_seed(11);
    let ids = Tensor::randint(90, [3, 10], (Kind::Int64, Device::Cpu));
    let mask = Tensor::ones([3, 10], (Kind::Int64, Device::Cpu));
    let _ = mask.narrow(1, 7, 3).narrow(0, 1, 1).fill_(0);
    let labels = ids.where_scalarother(&ids.fmod(3).ne(0), -100);
    (ids, mask, labels)
}

/// Every parameter's gradient, by name, after `run` (which backpropagates once).
fn grads(vs: &VarStore, run: impl FnOnce()) -> Vec<(String, Tensor)> {
    for (_, v) in vs.variables() {
        let mut g = v.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    run();
    let mut out: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(n, v)| (n, v.grad().copy()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn assert_same(a: &[(String, Tensor)], b: &[(String, Tensor)]) {
    assert_eq!(a.len(), b.len());
    let mut nonzero = 0;
    for ((n, x), (_, y)) in a.iter().zip(b) {
        let d = (x - y).abs().max().double_value(&[]);
        let scale = y.abs().max().double_value(&[]).max(1e-6);
        assert!(d / scale < 1e-5, "{n}: {d} (scale {scale})");
        nonzero += (scale > 1e-6) as usize;
    }
    assert!(nonzero > a.len() / 2, "most gradients are nonzero");
}

#[test]
fn checkpointed_masked_lm_gradients_equal_the_plain_ones() {
    let cfg = EncoderConfig::new(90, 16, 2, 2, 32, 32);
    let (ids, mask, labels) = inputs();
    for (linear, emb) in kinds() {
        tch::manual_seed(3);
        let vs = VarStore::new(Device::Cpu);
        let m = EncoderForMaskedLm::new(&vs.root(), &cfg, &linear, &emb, Kind::Float).unwrap();
        let plain = grads(&vs, || {
            m.mlm_loss(&ids, None, Some(&mask), &labels).backward();
        });
        let ck = grads(&vs, || {
            let ck = m.encoder.forward_checkpointed(&ids, None, Some(&mask));
            m.loss_of_hidden(ck.hidden(), &labels).backward();
            ck.backward(&m.encoder);
        });
        assert_same(&ck, &plain);
    }
}

#[test]
fn checkpointed_classifier_gradients_equal_the_plain_ones() {
    let cfg = EncoderConfig::new(90, 16, 2, 2, 32, 32);
    let (ids, mask, _) = inputs();
    let types = ids.fmod(2);
    let labels = Tensor::from_slice(&[0i64, 2, 1]);
    for (linear, emb) in kinds() {
        tch::manual_seed(4);
        let vs = VarStore::new(Device::Cpu);
        let m =
            EncoderForClassification::new(&vs.root(), &cfg, 3, &linear, &emb, Kind::Float).unwrap();
        let loss = |logits: Tensor| {
            logits.cross_entropy_loss::<Tensor>(&labels, None, tch::Reduction::Mean, -100, 0.0)
        };
        let plain = grads(&vs, || {
            loss(m.classify_logits(&ids, Some(&types), Some(&mask))).backward();
        });
        let ck = grads(&vs, || {
            let ck = m
                .encoder
                .forward_checkpointed(&ids, Some(&types), Some(&mask));
            loss(m.head(ck.hidden())).backward();
            ck.backward(&m.encoder);
        });
        assert_same(&ck, &plain);
    }
}
