//! Mode factoring, vocabulary padding and rank caps, including CoMERA's published shapes.

use frugal_tt::{balanced_modes, capped_ranks, pad_to_modes, TtLinear};
use tch::{nn, Device, Kind};

/// Balanced factorizations of the paper's dimensions.
#[test]
fn balanced_modes_of_paper_dims() {
    assert_eq!(balanced_modes(768, 3).unwrap(), vec![8, 8, 12]);
    assert_eq!(balanced_modes(3072, 3).unwrap(), vec![12, 16, 16]);
    assert_eq!(balanced_modes(32000, 4).unwrap(), vec![10, 10, 16, 20]);
    assert_eq!(balanced_modes(768, 4).unwrap(), vec![4, 4, 6, 8]);
    assert_eq!(balanced_modes(64, 2).unwrap(), vec![8, 8]);
    assert_eq!(balanced_modes(12, 1).unwrap(), vec![12]);
}

/// A prime (or too few prime factors) cannot be factored: the error names the dimension.
#[test]
fn unfactorable_dimension_is_an_error() {
    let e = balanced_modes(769, 3).unwrap_err().to_string();
    assert!(
        e.contains("dimension 769") && e.contains("3 modes") && e.contains("[769]"),
        "{e}"
    );
    assert_eq!(balanced_modes(12, 3).unwrap(), vec![2, 2, 3]);
    let e = balanced_modes(18, 4).unwrap_err().to_string();
    assert!(e.contains("dimension 18") && e.contains("[2, 3, 3]"), "{e}");
}

/// Padding: the smallest size at or above the vocabulary with balanced modes.
#[test]
fn pad_vocabulary_to_balanced_modes() {
    let (padded, modes) = pad_to_modes(30522, 4).unwrap();
    assert!((30522..32000).contains(&padded), "{padded}");
    assert_eq!(modes.iter().product::<i64>(), padded);
    assert!(*modes.last().unwrap() <= 2 * modes[0], "{modes:?}");
    // Nothing between 30522 and `padded` is balanced.
    for n in 30522..padded {
        if let Ok(m) = balanced_modes(n, 4) {
            assert!(*m.last().unwrap() > 2 * m[0], "{n}: {m:?}");
        }
    }
    assert_eq!((padded, modes), (30576, vec![12, 13, 14, 14])); // as documented
    assert_eq!(
        pad_to_modes(32000, 4).unwrap(),
        (32000, vec![10, 10, 16, 20])
    );
    assert_eq!(pad_to_modes(1000, 3).unwrap(), (1000, vec![10, 10, 10]));
}

/// Rank caps at the paper's shapes: 12 / 16 at the ends, 30 inside.
#[test]
fn capped_ranks_at_paper_shapes() {
    assert_eq!(
        capped_ranks(&[12, 8, 8, 8, 8, 12], 30).unwrap(),
        vec![1, 12, 30, 30, 30, 12, 1]
    );
    assert_eq!(
        capped_ranks(&[12, 8, 8, 12, 16, 16], 30).unwrap(),
        vec![1, 12, 30, 30, 30, 16, 1]
    );
    assert_eq!(capped_ranks(&[2, 3, 4], 100).unwrap(), vec![1, 2, 4, 1]);
    let e = capped_ranks(&[2, 3], 0).unwrap_err().to_string();
    assert!(e.contains("rank 0"), "{e}");
}

/// Parameter counts of CoMERA's layers at rank 30 (before pruning).
#[test]
fn comera_layer_parameter_counts() {
    let vs = nn::VarStore::new(Device::Cpu);
    let sq = TtLinear::new(
        &vs.root().sub("a"),
        768,
        768,
        &[12, 8, 8],
        &[8, 8, 12],
        30,
        false,
        Kind::Float,
    )
    .unwrap();
    assert_eq!(sq.ranks(), vec![1, 12, 30, 30, 30, 12, 1]);
    assert_eq!(sq.num_params(), 144 + 2880 + 7200 + 7200 + 2880 + 144);
    assert_eq!(sq.num_params(), 20448);
    let up = TtLinear::new(
        &vs.root().sub("b"),
        768,
        3072,
        &[12, 8, 8],
        &[12, 16, 16],
        30,
        true,
        Kind::Float,
    )
    .unwrap();
    assert_eq!(up.ranks(), vec![1, 12, 30, 30, 30, 16, 1]);
    assert_eq!(up.num_params(), 144 + 2880 + 7200 + 10800 + 7680 + 256);
    // The published init gives weight entries of std sqrt(1 / (in + out)).
    let std = sq.to_dense().std(true).double_value(&[]);
    let target = (1.0f64 / 1536.0).sqrt();
    assert!((std / target - 1.0).abs() < 0.2, "std {std} vs {target}");
}
