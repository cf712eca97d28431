//! `TtEmbedding`: lookups (with duplicate ids) equal rows of the reconstructed table, and
//! `from_dense` at full rank reproduces a table.

use frugal_tt::{TtEmbedding, TtMatrix};
use tch::{nn, Device, Kind, Tensor};

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn lookup_equals_rows_of_reconstructed_table() {
    tch::manual_seed(7);
    let vs = nn::VarStore::new(Device::Cpu);
    let e = TtEmbedding::new(
        &vs.root().sub("emb"),
        50,
        12,
        &[4, 4, 4],
        &[2, 2, 3],
        5,
        Kind::Float,
    )
    .unwrap();
    assert_eq!(e.padded_vocab(), 64);
    assert_eq!(e.ranks(), vec![1, 5, 5, 1]);
    // Rank variables away from 1 so they matter.
    for (i, d) in e.ranked().rank_vars().iter().enumerate() {
        let mut d = d.shallow_clone();
        tch::no_grad(|| d.copy_(&(Tensor::rand([5], (Kind::Float, Device::Cpu)) + 0.5 + i as f64)));
    }
    let table = e.to_dense();
    assert_eq!(table.size(), vec![50, 12]);
    // Independent reconstruction of the table from the variables (TtMatrix on effective cores).
    let r = e.ranked();
    let eff: Vec<Tensor> = (0..3)
        .map(|k| {
            if k < 2 {
                &r.cores()[k] * &r.rank_vars()[k]
            } else {
                r.cores()[k].shallow_clone()
            }
        })
        .collect();
    let reference = Tensor::einsum("aimb,bjnc,ckod->ijkmno", &eff, None::<i64>)
        .reshape([64, 12])
        .narrow(0, 0, 50);
    assert!(max_diff(&table, &reference) < 1e-6);
    assert!(
        max_diff(
            &TtMatrix::from_cores(eff).unwrap().full().narrow(0, 0, 50),
            &reference
        ) < 1e-6
    );

    let ids_v = [3i64, 49, 3, 0, 17, 17, 48, 3, 16, 1];
    let ids = Tensor::from_slice(&ids_v).reshape([2, 5]);
    let rows = e.forward(&ids);
    assert_eq!(rows.size(), vec![2, 5, 12]);
    let expected = reference
        .index_select(0, &Tensor::from_slice(&ids_v))
        .reshape([2, 5, 12]);
    assert!(
        max_diff(&rows, &expected) < 1e-6,
        "{}",
        max_diff(&rows, &expected)
    );
    assert!(expected.abs().max().double_value(&[]) > 1e-3);

    // Gradients of the lookup equal those through the reconstructed table.
    let g = Tensor::randn([2, 5, 12], (Kind::Float, Device::Cpu));
    let leaves: Vec<Tensor> = r
        .cores()
        .iter()
        .chain(r.rank_vars())
        .map(|t| t.shallow_clone())
        .collect();
    let ga = Tensor::run_backward(&[(&rows * &g).sum(Kind::Float)], &leaves, false, false);
    let gb = Tensor::run_backward(&[(&expected * &g).sum(Kind::Float)], &leaves, false, false);
    for (a, b) in ga.iter().zip(&gb) {
        assert!(max_diff(a, b) < 1e-4);
    }
}

#[test]
fn from_dense_at_full_rank_reproduces_the_table() {
    tch::manual_seed(8);
    let vs = nn::VarStore::new(Device::Cpu);
    let table = Tensor::randn([30, 8], (Kind::Float, Device::Cpu));
    let e = TtEmbedding::from_dense(
        &vs.root().sub("e"),
        &table,
        &[4, 8],
        &[2, 4],
        None,
        None,
        Kind::Float,
    )
    .unwrap();
    assert_eq!(e.vocab(), 30);
    assert_eq!(e.padded_vocab(), 32);
    assert!(max_diff(&e.to_dense(), &table) < 1e-5);
    let ids = Tensor::from_slice(&[29i64, 0, 29, 5]);
    assert!(max_diff(&e.forward(&ids), &table.index_select(0, &ids)) < 1e-5);
    let small = TtEmbedding::from_dense(
        &vs.root().sub("s"),
        &table,
        &[4, 8],
        &[2, 4],
        Some(2),
        None,
        Kind::Float,
    )
    .unwrap();
    assert_eq!(small.ranks(), vec![1, 2, 1]);
    assert!(small.num_params() < e.num_params());
}

#[test]
fn bad_embedding_modes_are_errors() {
    let vs = nn::VarStore::new(Device::Cpu);
    let p = vs.root();
    let err = TtEmbedding::new(&p.sub("a"), 70, 12, &[4, 4, 4], &[2, 2, 3], 4, Kind::Float)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("multiply to 64") && err.contains("vocabulary 70"),
        "{err}"
    );
    let err = TtEmbedding::new(&p.sub("b"), 50, 12, &[4, 4, 4], &[2, 2, 2], 4, Kind::Float)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("[2, 2, 2] multiply to 8") && err.contains("12"),
        "{err}"
    );
    let err = TtEmbedding::new(&p.sub("c"), 50, 12, &[8, 8], &[2, 2, 3], 4, Kind::Float)
        .unwrap_err()
        .to_string();
    assert!(err.contains("same number of modes"), "{err}");
}
