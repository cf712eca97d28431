//! Rank variables: masking, penalty, live size, and physical pruning.
//!
//! Guarantees pinned: an entry at or below the threshold contributes exactly nothing (the
//! masked output equals that of a layer whose rank component is removed by hand, within 1e-6,
//! while the same entry left live would change it); slicing the cores to the live ranks gives
//! the masked outputs within 1e-6, with smaller variables under the same names.

use frugal_tt::{RankedCores, TtEmbedding, TtLinear};
use tch::{nn, Device, Kind, Tensor};

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

fn set(t: &Tensor, values: &[f32]) {
    let mut t = t.shallow_clone();
    tch::no_grad(|| t.copy_(&Tensor::from_slice(values)));
}

/// 24 -> 20, modes [2, 3, 4 | 4, 5], ranks [1, 2, 4, 4, 4, 1] (rank 4 capped).
fn layer(vs: &nn::VarStore) -> TtLinear {
    tch::manual_seed(21);
    let kind = vs.kind();
    let mut l = TtLinear::new(
        &vs.root().sub("fc"),
        24,
        20,
        &[2, 3, 4],
        &[4, 5],
        4,
        false,
        kind,
    )
    .unwrap();
    // Scale the cores up so outputs are of order 1 (the published init is small).
    for c in l.ranked_mut().cores() {
        let mut c = c.shallow_clone();
        tch::no_grad(|| {
            let _ = c.g_mul_scalar_(2.0);
        });
    }
    l
}

/// The layer's weight Wᵀ (in, out) with bond `bond`'s entries `drop` removed by hand (cores
/// sliced in the test) and the other rank variables applied.
fn weight_without(l: &TtLinear, bond: usize, drop: &[i64]) -> Tensor {
    let r = l.ranked();
    let mut g: Vec<Tensor> = (0..5)
        .map(|k| {
            if k < 4 {
                &r.cores()[k] * &r.rank_vars()[k]
            } else {
                r.cores()[k].shallow_clone()
            }
        })
        .collect();
    let n = g[bond].size()[2];
    let keep: Vec<i64> = (0..n).filter(|i| !drop.contains(i)).collect();
    let keep = Tensor::from_slice(&keep);
    g[bond] = g[bond].index_select(2, &keep);
    g[bond + 1] = g[bond + 1].index_select(0, &keep);
    Tensor::einsum("aib,bjc,ckd,dle,emf->ijklm", &g, None::<i64>).reshape([24, 20])
}

/// In f64, so that the two contraction orders agree far below 1e-6 (in f32 they differ by
/// rounding of a few 1e-6 on outputs of order 10).
#[test]
fn entries_below_threshold_are_masked() {
    let mut vs = nn::VarStore::new(Device::Cpu);
    vs.set_kind(Kind::Double);
    let mut l = layer(&vs);
    assert_eq!(l.ranks(), vec![1, 2, 4, 4, 4, 1]);
    let x = Tensor::randn([5, 24], (Kind::Double, Device::Cpu));
    set(&l.ranked().rank_vars()[2], &[1.0, 0.005, -0.008, 0.9]);
    let y = l.forward(&x);
    let y_ref = x.matmul(&weight_without(&l, 2, &[1, 2]));
    assert!(max_diff(&y, &y_ref) < 1e-6, "{}", max_diff(&y, &y_ref));
    // The same entries, if they counted, would change the output: the test can fail.
    l.ranked_mut().set_threshold(1e-3);
    assert!(max_diff(&l.forward(&x), &y_ref) > 1e-4);
    l.ranked_mut().set_threshold(1e-2);
    // A masked entry gets no gradient.
    let loss = l.forward(&x).sum(Kind::Float);
    let d = l.ranked().rank_vars()[2].shallow_clone();
    let grad = &Tensor::run_backward(&[loss], &[d], false, false)[0];
    let gv: Vec<f64> = Vec::try_from(grad).unwrap();
    assert_eq!((gv[1], gv[2]), (0.0, 0.0));
    assert!(gv[0] != 0.0 && gv[3] != 0.0);
}

#[test]
fn penalty_live_size_and_proxy() {
    let vs = nn::VarStore::new(Device::Cpu);
    let l = layer(&vs);
    let r = l.ranked();
    // Initially all ones: penalty 1, live size = parameter count, proxy = size.
    assert!((r.penalty().double_value(&[]) - 1.0).abs() < 1e-6);
    assert_eq!(r.live_size(), r.num_params());
    assert_eq!(
        r.num_params(),
        2 * 2 + 2 * 3 * 4 + 4 * 4 * 4 + 4 * 4 * 4 + 4 * 5
    );
    assert!((r.size_proxy().double_value(&[]) - r.num_params() as f64).abs() < 1e-3);
    set(&r.rank_vars()[0], &[0.5, -0.004]);
    set(&r.rank_vars()[2], &[2.0, 0.01, -0.3, 0.02]);
    // Live entries: bond0 {0.5}, bond1 4 x 1, bond2 {2, -0.3, 0.02}, bond3 4 x 1 -> 12 live.
    let expected = (0.5 + 4.0 + 2.0 + 0.3 + 0.02 + 4.0) / 12.0;
    assert!((r.penalty().double_value(&[]) - expected).abs() < 1e-6);
    assert_eq!(r.live_ranks(), vec![1, 1, 4, 3, 4, 1]);
    assert_eq!(r.live_size(), 2 + 3 * 4 + 4 * 4 * 3 + 3 * 4 * 4 + 4 * 5);
    let a = [1.0, 0.5, 4.0, 2.32, 4.0, 1.0];
    let mids = [2.0, 3.0, 4.0, 4.0, 5.0];
    let proxy: f64 = (0..5).map(|k| a[k] * mids[k] * a[k + 1]).sum();
    assert!((r.size_proxy().double_value(&[]) - proxy).abs() < 1e-4);
    // The penalty is differentiable in the live entries: d/dD = sign(D) / 12.
    let d = r.rank_vars()[2].shallow_clone();
    let g = &Tensor::run_backward(&[r.penalty()], &[d], false, false)[0];
    let gv: Vec<f32> = Vec::try_from(g).unwrap();
    assert!((gv[0] - 1.0 / 12.0).abs() < 1e-6 && (gv[2] + 1.0 / 12.0).abs() < 1e-6 && gv[1] == 0.0);
}

#[test]
fn physical_pruning_matches_masked_layer() {
    let vs = nn::VarStore::new(Device::Cpu);
    let mut l = layer(&vs);
    let x = Tensor::randn([6, 24], (Kind::Float, Device::Cpu));
    set(&l.ranked().rank_vars()[1], &[0.001, 1.1, -0.7, 0.0]);
    set(&l.ranked().rank_vars()[2], &[0.9, 0.005, 1.2, 0.8]);
    let masked = l.forward(&x).detach();
    let old_core2 = l.ranked().cores()[2].detach().copy();
    let n_trainable = vs.trainable_variables().len();
    let kept = l.prune(&vs).unwrap();
    let kept_v: Vec<Vec<i64>> = kept.iter().map(|k| Vec::try_from(k).unwrap()).collect();
    assert_eq!(
        kept_v,
        vec![vec![0, 1], vec![1, 2], vec![0, 2, 3], vec![0, 1, 2, 3]]
    );
    assert_eq!(l.ranks(), vec![1, 2, 2, 3, 4, 1]);
    assert_eq!(l.ranked().cores()[2].size(), vec![2, 4, 3]);
    assert_eq!(l.ranked().rank_vars()[2].size(), vec![3]);
    let pruned = l.forward(&x);
    assert!(
        max_diff(&pruned, &masked) < 1e-6,
        "{}",
        max_diff(&pruned, &masked)
    );
    // Sliced like the core: an optimizer state of the old shape maps onto the new one.
    let sliced = RankedCores::slice_core_state(&kept, 2, &old_core2);
    assert!(max_diff(&sliced, &l.ranked().cores()[2]) == 0.0);
    // The var store holds the smaller variables under the same names, trainable.
    let vars = vs.variables();
    assert_eq!(vars["fc.cores.2"].size(), vec![2, 4, 3]);
    assert_eq!(vars["fc.rank_vars.1"].size(), vec![2]);
    let trainable = vs.trainable_variables();
    assert_eq!(trainable.len(), n_trainable);
    assert!(trainable.iter().any(|t| t.size() == vec![2, 4, 3]));
    assert!(!trainable
        .iter()
        .any(|t| t.size() == vec![4, 4, 4] && t.data_ptr() == old_core2.data_ptr()));
    // Gradients reach the new variables.
    let g = Tensor::run_backward(&[pruned.sum(Kind::Float)], &[&trainable[0]], false, false);
    assert!(g[0].defined());
    assert!(l.num_params() < 2 * 2 + 2 * 3 * 4 + 4 * 4 * 4 + 4 * 4 * 4 + 4 * 5);
    assert_eq!(l.num_params(), l.ranked().live_size());
}

#[test]
fn embedding_pruning_matches_masked_lookup() {
    tch::manual_seed(4);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut e = TtEmbedding::new(
        &vs.root().sub("emb"),
        50,
        12,
        &[4, 4, 4],
        &[2, 2, 3],
        4,
        Kind::Float,
    )
    .unwrap();
    set(&e.ranked().rank_vars()[0], &[1.0, 0.002, 0.7, 1.5]);
    let ids = Tensor::from_slice(&[3i64, 49, 3, 0, 17, 17]);
    let before = e.forward(&ids).detach();
    e.ranked_mut().set_threshold(1e-3);
    assert!(max_diff(&e.forward(&ids), &before) > 1e-6);
    e.ranked_mut().set_threshold(1e-2);
    e.prune(&vs).unwrap();
    assert_eq!(e.ranks()[1], 3);
    assert!(max_diff(&e.forward(&ids), &before) < 1e-6);
}
