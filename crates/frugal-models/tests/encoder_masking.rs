//! BERT's masked-LM input rule (`mask_tokens`): the selection rate, the 80/10/10 split, special
//! tokens and padding left alone, labels, and determinism by seed.

use frugal_models::encoder::{mask_tokens, IGNORE_INDEX};
use tch::{Device, Kind, Tensor};

const VOCAB: i64 = 1000;
const MASK_ID: i64 = 4;

/// A (64, 512) batch of ids in 5..VOCAB, with specials (ids 0..5) on every tenth position and
/// a padded tail on odd rows; returns (ids, never_mask).
fn batch() -> (Tensor, Tensor) {
    let (b, t) = (64i64, 512i64);
    let mut ids = Vec::with_capacity((b * t) as usize);
    let mut never = Vec::with_capacity((b * t) as usize);
    for r in 0..b {
        for c in 0..t {
            let special = c % 10 == 0 || (r % 2 == 1 && c >= 400);
            ids.push(if special {
                c % 5
            } else {
                5 + (r * 7919 + c * 104729) % (VOCAB - 5)
            });
            never.push(special);
        }
    }
    (
        Tensor::from_slice(&ids).view([b, t]),
        Tensor::from_slice(&never).view([b, t]),
    )
}

fn count(t: &Tensor) -> f64 {
    t.to_kind(Kind::Float).sum(Kind::Float).double_value(&[])
}

/// Guarantee: about 15% of the eligible tokens are selected (within 0.5 points on 29k tokens,
/// about 7 standard deviations), 80/10/10 of them masked / random / kept (within 1.5 points);
/// specials are never touched; labels hold the original id at selected positions only.
#[test]
fn selection_rate_and_split_follow_bert() {
    let (ids, never) = batch();
    let (inputs, labels) = mask_tokens(&ids, &never, MASK_ID, VOCAB, 0.15, 42).unwrap();
    assert_eq!(inputs.size(), ids.size());
    assert_eq!(labels.kind(), Kind::Int64);
    let eligible = count(&never.logical_not());
    let selected = labels.ne(IGNORE_INDEX);
    let n = count(&selected);
    let rate = n / eligible;
    assert!((rate - 0.15).abs() < 0.005, "selection rate {rate}");
    // Specials and padding: never selected, never changed.
    assert_eq!(count(&selected.logical_and(&never)), 0.0);
    assert_eq!(count(&inputs.ne_tensor(&ids).logical_and(&never)), 0.0);
    // Labels are the original ids where selected; unselected tokens are unchanged.
    assert_eq!(count(&labels.ne_tensor(&ids).logical_and(&selected)), 0.0);
    assert_eq!(
        count(&inputs.ne_tensor(&ids).logical_and(&selected.logical_not())),
        0.0
    );
    let masked = count(&inputs.eq(MASK_ID).logical_and(&selected)) / n;
    let changed = inputs.ne_tensor(&ids).logical_and(&inputs.ne(MASK_ID));
    let random = count(&changed) / n;
    let kept = count(&inputs.eq_tensor(&ids).logical_and(&selected)) / n;
    assert!((masked - 0.8).abs() < 0.015, "masked share {masked}");
    // A random draw equal to the original id (1 in 1000) counts as kept.
    assert!((random - 0.1).abs() < 0.015, "random share {random}");
    assert!((kept - 0.1).abs() < 0.015, "kept share {kept}");
    assert!(inputs.min().int64_value(&[]) >= 0 && inputs.max().int64_value(&[]) < VOCAB);
}

/// Guarantee: the draw is a function of the seed: same seed, same result; another seed,
/// another result.
#[test]
fn draw_is_deterministic_by_seed() {
    let (ids, never) = batch();
    let a = mask_tokens(&ids, &never, MASK_ID, VOCAB, 0.15, 7).unwrap();
    let b = mask_tokens(&ids, &never, MASK_ID, VOCAB, 0.15, 7).unwrap();
    let c = mask_tokens(&ids, &never, MASK_ID, VOCAB, 0.15, 8).unwrap();
    assert!(a.0.equal(&b.0) && a.1.equal(&b.1));
    assert!(!a.1.equal(&c.1));
}

/// Guarantee: bad arguments are errors, not panics or silent garbage.
#[test]
fn bad_arguments_are_errors() {
    let ids = Tensor::zeros([2, 3], (Kind::Int64, Device::Cpu));
    let never = Tensor::zeros([2, 3], (Kind::Bool, Device::Cpu));
    let other = Tensor::zeros([3, 2], (Kind::Bool, Device::Cpu));
    assert!(mask_tokens(&ids, &other, MASK_ID, VOCAB, 0.15, 0).is_err());
    assert!(mask_tokens(&ids, &never, MASK_ID, VOCAB, 1.5, 0).is_err());
    assert!(mask_tokens(&ids, &never, VOCAB, VOCAB, 0.15, 0).is_err());
}
