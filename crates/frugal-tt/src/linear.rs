//! `TtLinear`: a linear layer whose weight is a tensor train over the input modes then the
//! output modes (CoMERA's layout), computed as `Y = (X L) R` so that the batch never meets a core.

use crate::modes::{capped_ranks, check_modes, modes_product};
use crate::rank::{RankedCores, TtLayer};
use crate::tt::{contract_chain, Tt};
use frugal_core::{Error, Result};
use tch::{nn, Kind, Tensor};

/// The published initialisation (CoMERA): core `k` is `randn(r_{k-1}, n_k, r_k) / sqrt(r_k) ·
/// target^(1 / order)` with `target = sqrt(1 / (in + out))` and `order` the number of cores, so
/// that every entry of the reconstructed weight has standard deviation `target`.
pub fn published_init(modes: &[i64], ranks: &[i64], in_dim: i64, out_dim: i64) -> Vec<Tensor> {
    let target = (1.0 / (in_dim + out_dim) as f64).sqrt();
    let scale = target.powf(1.0 / modes.len() as f64);
    modes
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            Tensor::randn([ranks[k], n, ranks[k + 1]], (Kind::Float, tch::Device::Cpu))
                * (scale / (ranks[k + 1] as f64).sqrt())
        })
        .collect()
}

/// A TT linear layer `in_dim -> out_dim`, `y = x Wᵀ + b` with `W` of shape `(out, in)` as in
/// torch's `Linear`. The weight is a chain of cores `G_k` of shape `(r_{k-1}, n_k, r_k)` over the
/// input modes `[m_1, ..., m_a]` and then the output modes `[n_1, ..., n_b]` (at least 2 each):
/// `Wᵀ[(i_1..i_a), (j_1..j_b)] = G_1[:, i_1, :] ... G_a[:, i_a, :] G_{a+1}[:, j_1, :] ...`,
/// with the rank variables applied on every inner bond ([`RankedCores`]).
///
/// Variables under the layer's path: `cores.{k}` (k = 0 .. a+b-1), `rank_vars.{i}`
/// (i = 0 .. a+b-2; bond `a - 1` is the middle one, between input and output cores) and `bias`
/// when there is one. Master variables are `f32` (the var store's kind); `compute` (`f32`,
/// `bf16` or `f64`) is the kind of the batched products.
#[derive(Debug)]
pub struct TtLinear {
    ranked: RankedCores,
    in_modes: Vec<i64>,
    out_modes: Vec<i64>,
    bias: Option<Tensor>,
    compute: Kind,
}

impl TtLinear {
    /// A layer with the published initialisation: `in_modes` multiply to `in_dim`, `out_modes`
    /// to `out_dim`, every inner rank is `rank` capped by the unfolding sizes (CoMERA's 768 ->
    /// 768 with [12, 8, 8] and [8, 8, 12] at rank 30 gets ranks [1, 12, 30, 30, 30, 12, 1]);
    /// the bias, when asked for, starts at zero.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        path: &nn::Path,
        in_dim: i64,
        out_dim: i64,
        in_modes: &[i64],
        out_modes: &[i64],
        rank: i64,
        bias: bool,
        compute: Kind,
    ) -> Result<Self> {
        check_layer_modes(in_dim, out_dim, in_modes, out_modes)?;
        let modes: Vec<i64> = in_modes.iter().chain(out_modes).copied().collect();
        let ranks = capped_ranks(&modes, rank)?;
        let cores = published_init(&modes, &ranks, in_dim, out_dim);
        let bias = bias.then(|| Tensor::zeros([out_dim], (Kind::Float, tch::Device::Cpu)));
        Self::from_cores(path, in_modes.len(), cores, None, bias, compute)
    }

    /// A layer from a dense weight `(out, in)` by TT-SVD ([`Tt::svd`]) of `Wᵀ` reshaped to
    /// `(m_1, ..., m_a, n_1, ..., n_b)`, capped by `max_rank` and the relative accuracy `eps`;
    /// `bias` (`(out,)`) is copied when given.
    #[allow(clippy::too_many_arguments)]
    pub fn from_dense(
        path: &nn::Path,
        weight: &Tensor,
        bias: Option<&Tensor>,
        in_modes: &[i64],
        out_modes: &[i64],
        max_rank: Option<i64>,
        eps: Option<f64>,
        compute: Kind,
    ) -> Result<Self> {
        let size = weight.size();
        if size.len() != 2 {
            return Err(Error::Msg(format!(
                "TtLinear: weight of shape {size:?} is not a matrix (out, in)"
            )));
        }
        check_layer_modes(size[1], size[0], in_modes, out_modes)?;
        let mut modes: Vec<i64> = in_modes.to_vec();
        modes.extend_from_slice(out_modes);
        let tensor = weight.detach().tr().contiguous().reshape(modes);
        let tt = Tt::svd(&tensor, max_rank, eps)?;
        let bias = bias.map(|b| b.detach().to_kind(Kind::Float));
        Self::from_cores(path, in_modes.len(), tt.cores, None, bias, compute)
    }

    /// A layer from existing cores (for loading): the first `n_in_cores` cores are the input
    /// cores, the rest the output cores; `rank_vars` (one vector per inner bond) default to
    /// ones. All are copied into new variables under `path`.
    pub fn from_cores(
        path: &nn::Path,
        n_in_cores: usize,
        cores: Vec<Tensor>,
        rank_vars: Option<Vec<Tensor>>,
        bias: Option<Tensor>,
        compute: Kind,
    ) -> Result<Self> {
        if n_in_cores < 2 || cores.len() < n_in_cores + 2 {
            return Err(Error::Msg(format!(
                "TtLinear: {} cores with {n_in_cores} input cores: at least 2 input and 2 output \
                 modes are needed",
                cores.len()
            )));
        }
        check_compute(compute)?;
        let ranked = RankedCores::new(path, cores, rank_vars, 3, "TtLinear")?;
        let modes: Vec<i64> = ranked.cores().iter().map(|c| c.size()[1]).collect();
        let (in_modes, out_modes) = (modes[..n_in_cores].to_vec(), modes[n_in_cores..].to_vec());
        let out_dim: i64 = out_modes.iter().product();
        let bias = match bias {
            Some(b) => {
                if b.size() != [out_dim] {
                    return Err(Error::Shape {
                        name: format!("{}.bias", path.components().collect::<Vec<_>>().join(".")),
                        expected: vec![out_dim],
                        got: b.size(),
                    });
                }
                Some(tch::no_grad(|| path.var_copy("bias", &b)))
            }
            None => None,
        };
        Ok(TtLinear {
            ranked,
            in_modes,
            out_modes,
            bias,
            compute,
        })
    }

    /// `y = x Wᵀ + b` for `x` of shape `(..., in)`: the input cores contract into `L` (in, r)
    /// and the output cores into `R` (r, out) in the master kind (batch-free, cheap), then
    /// `Y = (X L) R` in the compute kind; the batch never meets a core, and autograd saves only
    /// `X` and the `(B, r)` product.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (l, r) = self.factors();
        let in_dim = self.in_dim();
        let mut lead = x.size();
        lead.pop();
        let xs = x.reshape([-1, in_dim]).to_kind(self.compute);
        let mut y = xs
            .matmul(&l.to_kind(self.compute))
            .matmul(&r.to_kind(self.compute));
        if let Some(b) = &self.bias {
            y += b.to_kind(self.compute);
        }
        lead.push(self.out_dim());
        y.reshape(lead)
    }

    /// `(L, R)`: the input cores contracted into `L` `(in, r_mid)` and the output cores into
    /// `R` `(r_mid, out)`, rank variables applied (master kind, differentiable).
    pub fn factors(&self) -> (Tensor, Tensor) {
        let cores = self.ranked.effective_cores();
        let a = self.in_modes.len();
        let l = contract_chain(&cores[..a]);
        let r_mid = l.size()[1];
        let r = contract_chain(&cores[a..]).reshape([r_mid, self.out_dim()]);
        (l, r)
    }

    /// The dense weight `W` `(out, in)` (rank variables applied; differentiable).
    pub fn to_dense(&self) -> Tensor {
        let cores = self.ranked.effective_cores();
        contract_chain(&cores)
            .reshape([self.in_dim(), self.out_dim()])
            .tr()
    }

    /// The input dimension.
    pub fn in_dim(&self) -> i64 {
        self.in_modes.iter().product()
    }

    /// The output dimension.
    pub fn out_dim(&self) -> i64 {
        self.out_modes.iter().product()
    }

    /// The input modes.
    pub fn in_modes(&self) -> &[i64] {
        &self.in_modes
    }

    /// The output modes.
    pub fn out_modes(&self) -> &[i64] {
        &self.out_modes
    }

    /// The TT ranks `[1, r_1, ..., 1]` of the cores.
    pub fn ranks(&self) -> Vec<i64> {
        self.ranked.ranks()
    }

    /// The number of core parameters `sum_k r_{k-1} n_k r_k` (not counting rank variables or
    /// bias; CoMERA's 768 -> 768 layer at rank 30 has 20448 against 589824 dense).
    pub fn num_params(&self) -> i64 {
        self.ranked.num_params()
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The compute kind of the batched products.
    pub fn compute_kind(&self) -> Kind {
        self.compute
    }

    /// The cores and rank variables (penalty, live size, masks).
    pub fn ranked(&self) -> &RankedCores {
        &self.ranked
    }

    /// Mutable access to the cores and rank variables (threshold).
    pub fn ranked_mut(&mut self) -> &mut RankedCores {
        &mut self.ranked
    }

    /// Physical pruning ([`RankedCores::prune`]): slices the cores and rank variables to their
    /// live ranks in `vs`; returns the kept indices per inner bond.
    pub fn prune(&mut self, vs: &nn::VarStore) -> Result<Vec<Tensor>> {
        self.ranked.prune(vs)
    }
}

impl TtLayer for TtLinear {
    fn ranked(&self) -> &RankedCores {
        &self.ranked
    }

    fn ranked_mut(&mut self) -> &mut RankedCores {
        &mut self.ranked
    }

    fn dense_params(&self) -> i64 {
        self.in_dim() * self.out_dim()
    }
}

/// Checks a layer's modes against its dimensions (at least 2 modes per side).
fn check_layer_modes(in_dim: i64, out_dim: i64, in_modes: &[i64], out_modes: &[i64]) -> Result<()> {
    for (modes, side) in [(in_modes, "input"), (out_modes, "output")] {
        if modes.len() < 2 {
            return Err(Error::Msg(format!(
                "TtLinear: {side} modes {modes:?}: at least 2 modes per side are needed"
            )));
        }
        modes_product(modes, &format!("TtLinear {side} modes"))?;
    }
    check_modes(in_modes, in_dim, "TtLinear input")?;
    check_modes(out_modes, out_dim, "TtLinear output")?;
    Ok(())
}

/// Checks that `compute` is a floating kind a layer can compute in.
pub(crate) fn check_compute(compute: Kind) -> Result<()> {
    match compute {
        Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double => Ok(()),
        k => Err(Error::Msg(format!(
            "TT layer compute kind {k:?}: expected f32, bf16, f16 or f64"
        ))),
    }
}
