//! Masked-LM inputs and labels, with BERT's rule (Devlin et al. 2019, section 3.1, as
//! transformers' `DataCollatorForLanguageModeling`): each token that may be masked is selected
//! with probability `prob` (0.15); a selected token becomes the mask token with probability 0.8,
//! a uniformly random token of the vocabulary with 0.1, and stays itself with 0.1; its label is
//! the original token. Every other label is [`IGNORE_INDEX`].

use frugal_core::{Error, Result};
use tch::{Kind, Tensor};

/// The label of a position that takes no loss (transformers' -100).
pub const IGNORE_INDEX: i64 = -100;

/// SplitMix64 (Steele, Lea and Flood 2014): small, fast, and the same on every platform.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in 0..n (multiply-shift; bias below 2^-40 for any vocabulary).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Draws masked-LM inputs and labels for token ids `ids` (any shape, integer). `never_mask`
/// (same shape; nonzero or true where a token must stay: special tokens and padding) is never
/// selected. Returns `(inputs, labels)`, both int64 of `ids`' shape and device. The draw is a
/// function of `seed` and the shapes only (the same on every machine).
pub fn mask_tokens(
    ids: &Tensor,
    never_mask: &Tensor,
    mask_id: i64,
    vocab_size: i64,
    prob: f64,
    seed: u64,
) -> Result<(Tensor, Tensor)> {
    if ids.size() != never_mask.size() {
        return Err(Error::Shape {
            name: "mask_tokens: never_mask".into(),
            expected: ids.size(),
            got: never_mask.size(),
        });
    }
    if !(0.0..=1.0).contains(&prob) {
        return Err(Error::config(
            "mlm_probability",
            format!("must be in [0, 1], got {prob}"),
        ));
    }
    if vocab_size <= 0 || !(0..vocab_size).contains(&mask_id) {
        return Err(Error::Msg(format!(
            "mask_tokens: mask id {mask_id} is not in a vocabulary of {vocab_size}"
        )));
    }
    let flat = |t: &Tensor, kind| t.to_device(tch::Device::Cpu).to_kind(kind).reshape([-1]);
    let mut inputs = Vec::<i64>::try_from(flat(ids, Kind::Int64))?;
    let keep = Vec::<bool>::try_from(flat(&never_mask.ne(0), Kind::Bool))?;
    let mut labels = vec![IGNORE_INDEX; inputs.len()];
    let mut rng = SplitMix64(seed);
    for ((id, label), &keep) in inputs.iter_mut().zip(&mut labels).zip(&keep) {
        if keep || rng.uniform() >= prob {
            continue;
        }
        *label = *id;
        let r = rng.uniform();
        if r < 0.8 {
            *id = mask_id;
        } else if r < 0.9 {
            *id = rng.below(vocab_size as u64) as i64;
        }
    }
    let shape = ids.size();
    let back = |v: Vec<i64>| {
        Tensor::from_slice(&v)
            .view(shape.as_slice())
            .to_device(ids.device())
    };
    Ok((back(inputs), back(labels)))
}
