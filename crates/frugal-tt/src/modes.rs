//! Factoring dimensions into tensor-train modes: balanced factors, vocabulary padding, and the
//! rank caps a chain of modes allows.

use frugal_core::{Error, Result};

/// The largest ratio between the largest and the smallest factor that [`pad_to_modes`] accepts
/// as balanced (768 = [4, 4, 6, 8] and 32000 = [10, 10, 16, 20] have ratio 2).
pub const BALANCED_RATIO: f64 = 2.0;

/// Factors `dim` into `order` factors, each at least 2, sorted ascending, that are as balanced
/// as possible: the factorization with the smallest ratio of largest to smallest factor (ties:
/// the smallest largest factor, then the first found in ascending order).
///
/// `768` with order 3 gives `[8, 8, 12]`, `3072` gives `[12, 16, 16]`, `32000` with order 4
/// gives `[10, 10, 16, 20]`. An error names the dimension when it has fewer than `order` prime
/// factors (a prime, for instance), or when `order` is below 1.
pub fn balanced_modes(dim: i64, order: usize) -> Result<Vec<i64>> {
    if order == 0 {
        return Err(Error::Msg(format!(
            "cannot factor dimension {dim} into 0 modes: the order must be at least 1"
        )));
    }
    if dim < 2 {
        return Err(Error::Msg(format!(
            "cannot factor dimension {dim} into {order} modes: the dimension must be at least 2"
        )));
    }
    let mut best: Option<Vec<i64>> = None;
    let mut current = Vec::with_capacity(order);
    search(dim, order, 2, &mut current, &mut best);
    best.ok_or_else(|| {
        Error::Msg(format!(
            "cannot factor dimension {dim} into {order} modes of at least 2 each (its prime \
             factors are {:?})",
            prime_factors(dim)
        ))
    })
}

/// Depth-first search over ascending factor lists of `rest` into `left` more factors, each at
/// least `min`; keeps the most balanced complete list in `best`.
fn search(rest: i64, left: usize, min: i64, current: &mut Vec<i64>, best: &mut Option<Vec<i64>>) {
    if left == 1 {
        if rest >= min {
            current.push(rest);
            let better = match best {
                None => true,
                Some(b) => {
                    let (lo, hi) = (current[0], *current.last().unwrap());
                    let (blo, bhi) = (b[0], *b.last().unwrap());
                    // Compare hi / lo < bhi / blo without floating point.
                    let lhs = hi as i128 * blo as i128;
                    let rhs = bhi as i128 * lo as i128;
                    lhs < rhs || (lhs == rhs && hi < bhi)
                }
            };
            if better {
                *best = Some(current.clone());
            }
            current.pop();
        }
        return;
    }
    let mut f = min;
    // The smallest of the remaining `left` factors is at most rest^(1/left).
    while pow_le(f, left as u32, rest) {
        if rest % f == 0 {
            current.push(f);
            search(rest / f, left - 1, f, current, best);
            current.pop();
        }
        f += 1;
    }
}

/// Whether `base^exp <= limit`, without overflow.
fn pow_le(base: i64, exp: u32, limit: i64) -> bool {
    let mut acc: i128 = 1;
    for _ in 0..exp {
        acc *= base as i128;
        if acc > limit as i128 {
            return false;
        }
    }
    true
}

/// The prime factors of `n` (with multiplicity, ascending).
fn prime_factors(mut n: i64) -> Vec<i64> {
    let mut out = Vec::new();
    let mut p = 2;
    while p * p <= n {
        while n % p == 0 {
            out.push(p);
            n /= p;
        }
        p += 1;
    }
    if n > 1 {
        out.push(n);
    }
    out
}

/// Pads a vocabulary size to the smallest size `>= vocab` that factors into `order` balanced
/// modes (largest / smallest factor at most [`BALANCED_RATIO`]), and returns that padded size
/// with its modes from [`balanced_modes`]. For example 30522 with order 4 gives
/// `(30576, [12, 13, 14, 14])` (CoMERA picked 32000 = [16, 20, 10, 10] by hand).
pub fn pad_to_modes(vocab: i64, order: usize) -> Result<(i64, Vec<i64>)> {
    if vocab < 1 || order == 0 {
        return Err(Error::Msg(format!(
            "cannot pad vocabulary {vocab} to {order} modes: both must be at least 1"
        )));
    }
    let mut n = vocab.max(1 << order.min(62));
    loop {
        if let Ok(modes) = balanced_modes(n, order) {
            let ratio = *modes.last().unwrap() as f64 / modes[0] as f64;
            if ratio <= BALANCED_RATIO {
                return Ok((n, modes));
            }
        }
        n += 1;
    }
}

/// The product of `modes`, or an error naming `what` when a mode is below 1.
pub fn modes_product(modes: &[i64], what: &str) -> Result<i64> {
    if modes.is_empty() || modes.iter().any(|&m| m < 1) {
        return Err(Error::Msg(format!(
            "{what}: modes {modes:?} must be non-empty and each at least 1"
        )));
    }
    Ok(modes.iter().product())
}

/// Checks that `modes` multiply to `dim`; the error names `what`, the modes and the dimension.
pub fn check_modes(modes: &[i64], dim: i64, what: &str) -> Result<()> {
    let product = modes_product(modes, what)?;
    if product != dim {
        return Err(Error::Msg(format!(
            "{what}: modes {modes:?} multiply to {product}, not to the dimension {dim}"
        )));
    }
    Ok(())
}

/// The TT ranks `[1, r_1, ..., r_{d-1}, 1]` of a chain of cores over `modes` (one size per
/// core: `n_k`, or `m_k n_k` for a TT-matrix) with every inner rank capped at `max_rank` and at
/// what the unfoldings allow: `r_k <= min(n_1 ... n_k, n_{k+1} ... n_d)`. For CoMERA's
/// 768 -> 768 layer (modes [12, 8, 8, 8, 8, 12], rank 30) this is [1, 12, 30, 30, 30, 12, 1].
pub fn capped_ranks(modes: &[i64], max_rank: i64) -> Result<Vec<i64>> {
    if max_rank < 1 {
        return Err(Error::Msg(format!(
            "TT rank {max_rank} for modes {modes:?}: ranks must be at least 1"
        )));
    }
    modes_product(modes, "TT ranks")?;
    let d = modes.len();
    let mut ranks = vec![1i64; d + 1];
    for (k, rank) in ranks.iter_mut().enumerate().take(d).skip(1) {
        let left = modes[..k]
            .iter()
            .fold(1i128, |a, &m| (a * m as i128).min(i64::MAX as i128));
        let right = modes[k..]
            .iter()
            .fold(1i128, |a, &m| (a * m as i128).min(i64::MAX as i128));
        *rank = (max_rank as i128).min(left).min(right) as i64;
    }
    Ok(ranks)
}
