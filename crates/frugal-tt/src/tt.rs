//! Tensor trains over tch tensors: TT-SVD (Oseledets 2011, Alg. 1) capped by rank and by
//! relative accuracy, TT rounding (Alg. 2), reconstruction and parameter counts.
//!
//! Decompositions compute in `f64` (SVDs and QRs of the unfoldings; cheap next to training) and
//! return `f64` cores for an `f64` input, `f32` cores for any other.

use frugal_core::{Error, Result};
use tch::{Kind, Tensor};

/// A tensor train: `cores[k]` has shape `(r_k, n_k, r_{k+1})` with `r_0 = r_d = 1`; the tensor
/// is `A[i_1, ..., i_d] = G_1[:, i_1, :] G_2[:, i_2, :] ... G_d[:, i_d, :]`.
#[derive(Debug)]
pub struct Tt {
    /// The cores, `(r_k, n_k, r_{k+1})`.
    pub cores: Vec<Tensor>,
}

/// The kind decompositions return for an input of kind `kind`.
pub(crate) fn result_kind(kind: Kind) -> Kind {
    match kind {
        Kind::Double => Kind::Double,
        _ => Kind::Float,
    }
}

/// The smallest rank `r >= 1` whose discarded tail `sqrt(sum_{j >= r} s_j^2)` is at most
/// `delta`, capped by `cap` (and by `s.len()`). `s`: singular values, descending, `f64`.
pub(crate) fn truncation_rank(s: &Tensor, delta: f64, cap: Option<i64>) -> i64 {
    let n = s.size()[0];
    let mut rank = n;
    if delta > 0.0 {
        let values: Vec<f64> = Vec::<f64>::try_from(s.to_kind(Kind::Double)).unwrap_or_default();
        // tail[r] = sum of squares from r on; keep the smallest r with tail <= delta^2.
        let mut tail = 0.0;
        let limit = delta * delta;
        for r in (1..=n as usize).rev() {
            tail += values[r - 1] * values[r - 1];
            if tail > limit {
                break;
            }
            rank = r as i64 - 1;
        }
        rank = rank.max(1);
    }
    match cap {
        Some(c) => rank.min(c).max(1),
        None => rank.max(1),
    }
}

/// Checks a relative accuracy: finite and non-negative.
fn check_eps(eps: Option<f64>) -> Result<f64> {
    match eps {
        None => Ok(0.0),
        Some(e) if e.is_finite() && e >= 0.0 => Ok(e),
        Some(e) => Err(Error::Msg(format!(
            "TT relative accuracy eps = {e}: must be finite and >= 0"
        ))),
    }
}

/// Checks a rank cap: at least 1.
fn check_cap(max_rank: Option<i64>) -> Result<()> {
    match max_rank {
        Some(r) if r < 1 => Err(Error::Msg(format!(
            "TT max_rank = {r}: ranks must be at least 1"
        ))),
        _ => Ok(()),
    }
}

impl Tt {
    /// A tensor train from cores; checks that each is 3-D, that neighbouring ranks agree, and
    /// that the end ranks are 1. The error names the core and the ranks.
    pub fn from_cores(cores: Vec<Tensor>) -> Result<Self> {
        check_chain(&cores, 3, "TT")?;
        Ok(Tt { cores })
    }

    /// TT-SVD of `tensor` (any order >= 1): for k = 1 .. d-1, reshape the remainder to
    /// `(r_{k-1} n_k, rest)`, take its SVD, keep the smallest rank whose discarded tail norm is at
    /// most `delta = eps / sqrt(d - 1) * ||A||_F` (the relative accuracy split evenly across the
    /// d-1 truncations, so that `||A - TT||_F <= eps ||A||_F` when no cap binds), capped by
    /// `max_rank`; the core is `U -> (r_{k-1}, n_k, r_k)` and `S Vᵀ` is carried on. Without
    /// `eps` only the cap (and the unfolding sizes) limit the ranks, as in tensorly's
    /// `tensor_train`.
    pub fn svd(tensor: &Tensor, max_rank: Option<i64>, eps: Option<f64>) -> Result<Self> {
        check_cap(max_rank)?;
        let caps = vec![max_rank.unwrap_or(i64::MAX); tensor.dim().saturating_sub(1)];
        Self::svd_with_caps(tensor, &caps, eps)
    }

    /// [`Tt::svd`] with one rank cap per inner bond (`caps.len() == d - 1`; `i64::MAX` for no
    /// cap).
    pub fn svd_with_caps(tensor: &Tensor, caps: &[i64], eps: Option<f64>) -> Result<Self> {
        let eps = check_eps(eps)?;
        let shape = tensor.size();
        let d = shape.len();
        if d == 0 || shape.iter().any(|&n| n < 1) {
            return Err(Error::Msg(format!(
                "TT-SVD: tensor of shape {shape:?} must have at least one dimension and no \
                 empty ones"
            )));
        }
        if caps.len() != d - 1 {
            return Err(Error::Msg(format!(
                "TT-SVD: {} rank caps for a tensor of shape {shape:?} (order {d}), expected {}",
                caps.len(),
                d - 1
            )));
        }
        if let Some(r) = caps.iter().find(|&&r| r < 1) {
            return Err(Error::Msg(format!(
                "TT-SVD: rank cap {r} in {caps:?}: ranks must be at least 1"
            )));
        }
        let out_kind = result_kind(tensor.kind());
        let a = tensor.detach().to_kind(Kind::Double);
        let delta = if d > 1 {
            eps / ((d - 1) as f64).sqrt() * a.norm().double_value(&[])
        } else {
            0.0
        };
        let mut cores = Vec::with_capacity(d);
        let mut rest = a;
        let mut r_prev = 1i64;
        for (k, &cap) in caps.iter().enumerate() {
            let n = shape[k];
            let unfolding = rest.reshape([r_prev * n, -1]);
            let (u, s, vh) = svd_reduced(&unfolding)?;
            let r = truncation_rank(&s, delta, Some(cap));
            cores.push(u.narrow(1, 0, r).reshape([r_prev, n, r]).to_kind(out_kind));
            rest = s.narrow(0, 0, r).unsqueeze(1) * vh.narrow(0, 0, r);
            r_prev = r;
        }
        cores.push(rest.reshape([r_prev, shape[d - 1], 1]).to_kind(out_kind));
        Ok(Tt { cores })
    }

    /// The mode sizes `[n_1, ..., n_d]`.
    pub fn modes(&self) -> Vec<i64> {
        self.cores.iter().map(|c| c.size()[1]).collect()
    }

    /// The TT ranks `[1, r_1, ..., r_{d-1}, 1]`.
    pub fn ranks(&self) -> Vec<i64> {
        ranks_of(&self.cores)
    }

    /// The number of parameters, `sum_k r_{k-1} n_k r_k`.
    pub fn num_params(&self) -> i64 {
        self.cores.iter().map(|c| c.numel() as i64).sum()
    }

    /// The full tensor, of shape `[n_1, ..., n_d]` (contracted left to right, in the cores'
    /// kind; differentiable).
    pub fn full(&self) -> Tensor {
        contract_chain(&self.cores).reshape(self.modes())
    }

    /// TT rounding (Oseledets 2011, Alg. 2): orthogonalise right to left with QR (so that the
    /// norm sits in the first core), then truncate left to right with SVD, each truncation
    /// keeping the smallest rank whose discarded tail is at most
    /// `eps / sqrt(d - 1) * ||A||_F`, capped by `max_rank`. The result is within
    /// `eps ||A||_F` of the input when no cap binds. Computes in `f64`.
    pub fn round(&self, max_rank: Option<i64>, eps: Option<f64>) -> Result<Tt> {
        check_cap(max_rank)?;
        let eps = check_eps(eps)?;
        let out_kind = result_kind(self.cores[0].kind());
        let d = self.cores.len();
        let mut cores: Vec<Tensor> = self
            .cores
            .iter()
            .map(|c| c.detach().to_kind(Kind::Double))
            .collect();
        if d == 1 {
            return Ok(Tt {
                cores: cores.into_iter().map(|c| c.to_kind(out_kind)).collect(),
            });
        }
        // Right to left: G_k = R^T Q^T with Q^T row-orthonormal; R^T moves into G_{k-1}.
        for k in (1..d).rev() {
            let (r0, n, r1) = dims3(&cores[k]);
            let mat = cores[k].reshape([r0, n * r1]);
            let (q, r) = Tensor::linalg_qr(&mat.tr(), "reduced");
            let new_r = q.size()[1];
            cores[k] = q.tr().reshape([new_r, n, r1]);
            let (p0, pn, _) = dims3(&cores[k - 1]);
            cores[k - 1] = cores[k - 1]
                .reshape([p0 * pn, r0])
                .matmul(&r.tr())
                .reshape([p0, pn, new_r]);
        }
        let delta = eps / ((d - 1) as f64).sqrt() * cores[0].norm().double_value(&[]);
        // Left to right: truncated SVD, S V^T moves into G_{k+1}.
        for k in 0..d - 1 {
            let (r0, n, r1) = dims3(&cores[k]);
            let (u, s, vh) = svd_reduced(&cores[k].reshape([r0 * n, r1]))?;
            let r = truncation_rank(&s, delta, max_rank);
            cores[k] = u.narrow(1, 0, r).reshape([r0, n, r]);
            let carry = s.narrow(0, 0, r).unsqueeze(1) * vh.narrow(0, 0, r);
            let (_, nn, q1) = dims3(&cores[k + 1]);
            cores[k + 1] = carry
                .matmul(&cores[k + 1].reshape([r1, nn * q1]))
                .reshape([r, nn, q1]);
        }
        Ok(Tt {
            cores: cores.into_iter().map(|c| c.to_kind(out_kind)).collect(),
        })
    }
}

/// The reduced SVD `(U, S, Vᵀ)` of a matrix, through `torch.svd(some=True)` (tch binds
/// `linalg_svd`'s optional driver as a plain string, which CPU refuses).
pub(crate) fn svd_reduced(a: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let (u, s, v) = a.f_svd(true, true)?;
    Ok((u, s, v.tr()))
}

/// `(r0, n, r1)` of a 3-D core.
fn dims3(t: &Tensor) -> (i64, i64, i64) {
    let s = t.size();
    (s[0], s[1], s[2])
}

/// The TT ranks of a chain of cores whose first dimension is the left rank and last the right.
pub(crate) fn ranks_of(cores: &[Tensor]) -> Vec<i64> {
    let mut ranks = vec![1];
    ranks.extend(cores.iter().map(|c| *c.size().last().unwrap()));
    ranks
}

/// Contracts a chain of cores `(r_{k-1}, ..., r_k)` (any number of middle dimensions) left to
/// right into a matrix `(prod of all middle sizes, r_d)`; the middle indices in order, row-major.
pub(crate) fn contract_chain(cores: &[Tensor]) -> Tensor {
    let first = &cores[0];
    let r = *first.size().last().unwrap();
    let mut acc = first.reshape([-1, r]);
    for core in &cores[1..] {
        let size = core.size();
        let (r0, r1) = (size[0], *size.last().unwrap());
        acc = acc.matmul(&core.reshape([r0, -1])).reshape([-1, r1]);
    }
    acc
}

/// Checks a chain of cores: each of `ndim` dimensions, neighbouring ranks equal, end ranks 1.
pub(crate) fn check_chain(cores: &[Tensor], ndim: usize, what: &str) -> Result<()> {
    if cores.is_empty() {
        return Err(Error::Msg(format!("{what}: no cores")));
    }
    let mut prev = 1i64;
    for (k, core) in cores.iter().enumerate() {
        let size = core.size();
        if size.len() != ndim {
            return Err(Error::Shape {
                name: format!("{what} core {k}"),
                expected: vec![-1; ndim],
                got: size,
            });
        }
        if size[0] != prev {
            return Err(Error::Msg(format!(
                "{what}: core {k} has shape {size:?}, its left rank {} does not match the \
                 previous core's right rank {prev} (ranks {:?})",
                size[0],
                ranks_of(&cores[..k.max(1)])
            )));
        }
        prev = size[ndim - 1];
    }
    if prev != 1 {
        return Err(Error::Msg(format!(
            "{what}: the last core's right rank is {prev}, expected 1 (ranks {:?})",
            ranks_of(cores)
        )));
    }
    Ok(())
}
