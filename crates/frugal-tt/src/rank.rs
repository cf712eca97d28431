//! Rank variables (CoMERA, arXiv 2405.14377, Sec. 3): one vector `D_i` per inner bond of a chain
//! of TT cores, the penalty and size they define, masking, and physical pruning.
//!
//! A chain of `d` cores `G_k` of shape `(r_{k-1}, ..., r_k)` (one middle dimension for a TT,
//! two for a TT-matrix; `r_0 = r_d = 1`) has `d - 1` inner bonds; bond `i` (between core `i` and
//! core `i + 1`, counted from 0) carries `D_i` of length `r_{i+1}`, initialised to ones. The
//! layer uses the effective cores `G_k · diag(D_k ⊙ mask_k)` (scaling `G_k`'s last dimension,
//! for every core but the last), where `mask_i = |D_i| > threshold` (threshold 1e-2): a pruned
//! entry contributes exactly zero, and gets no gradient.

use crate::tt::{check_chain, ranks_of};
use frugal_core::{Error, Result};
use tch::{nn, Device, Kind, Tensor};

/// CoMERA's pruning threshold: rank-variable entries with `|D| <= 1e-2` count as pruned.
pub const PRUNE_THRESHOLD: f64 = 1e-2;

/// A layer whose weight is a chain of [`RankedCores`] ([`crate::TtLinear`],
/// [`crate::TtEmbedding`]): what rank adaptation needs of it, whatever the layer.
pub trait TtLayer: std::fmt::Debug {
    /// The cores and rank variables.
    fn ranked(&self) -> &RankedCores;

    /// Mutable access to the cores and rank variables (threshold, pruning).
    fn ranked_mut(&mut self) -> &mut RankedCores;

    /// The number of parameters of the dense weight the cores stand for (`in · out` for a
    /// linear layer, `vocab · dim` for an embedding), the numerator of its compression.
    fn dense_params(&self) -> i64;

    /// Physical pruning ([`RankedCores::prune`]): the kept indices per inner bond.
    fn prune(&mut self, vs: &nn::VarStore) -> Result<Vec<Tensor>> {
        self.ranked_mut().prune(vs)
    }
}

/// TT cores with one rank-variable vector per inner bond, registered in a var store as
/// `{path}.cores.{k}` (core `k`, from 0) and `{path}.rank_vars.{i}` (`D_i`, bond `i` between
/// core `i` and core `i + 1`), all trainable.
#[derive(Debug)]
pub struct RankedCores {
    cores: Vec<Tensor>,
    rank_vars: Vec<Tensor>,
    threshold: f64,
    core_names: Vec<String>,
    rank_names: Vec<String>,
}

impl RankedCores {
    /// Registers `cores` (copied) under `path.cores.{k}` and the rank variables (copied from
    /// `rank_vars`, or ones) under `path.rank_vars.{i}`, in the path's kind and on its device.
    /// `ndim` is the cores' number of dimensions (3 for a TT, 4 for a TT-matrix); `what` names
    /// the layer in errors.
    pub fn new(
        path: &nn::Path,
        cores: Vec<Tensor>,
        rank_vars: Option<Vec<Tensor>>,
        ndim: usize,
        what: &str,
    ) -> Result<Self> {
        check_chain(&cores, ndim, what)?;
        let ranks = ranks_of(&cores);
        let inner = &ranks[1..ranks.len() - 1];
        let rank_vars = match rank_vars {
            Some(v) => {
                let got: Vec<i64> = v.iter().map(|t| t.numel() as i64).collect();
                if got != inner || v.iter().any(|t| t.dim() != 1) {
                    return Err(Error::Msg(format!(
                        "{what}: rank variables of shapes {:?} do not match the inner ranks \
                         {inner:?} of the cores",
                        v.iter().map(|t| t.size()).collect::<Vec<_>>()
                    )));
                }
                v
            }
            None => inner
                .iter()
                .map(|&r| Tensor::ones([r], (Kind::Float, Device::Cpu)))
                .collect(),
        };
        let core_path = path.sub("cores");
        let rank_path = path.sub("rank_vars");
        let mut core_names = Vec::new();
        let mut rank_names = Vec::new();
        let cores = tch::no_grad(|| {
            cores
                .iter()
                .enumerate()
                .map(|(k, c)| {
                    core_names.push(core_path.path(&k.to_string()));
                    core_path.var_copy(&k.to_string(), c)
                })
                .collect()
        });
        let rank_vars = tch::no_grad(|| {
            rank_vars
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    rank_names.push(rank_path.path(&i.to_string()));
                    rank_path.var_copy(&i.to_string(), d)
                })
                .collect()
        });
        Ok(RankedCores {
            cores,
            rank_vars,
            threshold: PRUNE_THRESHOLD,
            core_names,
            rank_names,
        })
    }

    /// The cores (the raw variables, without the rank variables applied).
    pub fn cores(&self) -> &[Tensor] {
        &self.cores
    }

    /// The rank variables `D_i`, one per inner bond.
    pub fn rank_vars(&self) -> &[Tensor] {
        &self.rank_vars
    }

    /// The var-store names of the cores (`{path}.cores.{k}`).
    pub fn core_names(&self) -> &[String] {
        &self.core_names
    }

    /// The var-store names of the rank variables (`{path}.rank_vars.{i}`).
    pub fn rank_var_names(&self) -> &[String] {
        &self.rank_names
    }

    /// The pruning threshold (default [`PRUNE_THRESHOLD`]).
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// Sets the pruning threshold (entries with `|D| <= threshold` count as pruned).
    pub fn set_threshold(&mut self, threshold: f64) {
        self.threshold = threshold;
    }

    /// The live masks `|D_i| > threshold`, one boolean vector per inner bond.
    pub fn masks(&self) -> Vec<Tensor> {
        self.rank_vars
            .iter()
            .map(|d| d.abs().gt(self.threshold))
            .collect()
    }

    /// The masked rank variables `D_i ⊙ mask_i` (differentiable in `D`; zero where pruned).
    pub fn masked_rank_vars(&self) -> Vec<Tensor> {
        self.rank_vars
            .iter()
            .map(|d| d * d.abs().gt(self.threshold).to_kind(d.kind()))
            .collect()
    }

    /// The effective cores `G_k · diag(D_k ⊙ mask_k)` (the last dimension of every core but the
    /// last scaled by its bond's masked rank variables; differentiable in cores and `D`).
    pub fn effective_cores(&self) -> Vec<Tensor> {
        let masked = self.masked_rank_vars();
        self.cores
            .iter()
            .enumerate()
            .map(|(k, core)| match masked.get(k) {
                Some(d) => core * d.to_kind(core.kind()),
                None => core.shallow_clone(),
            })
            .collect()
    }

    /// The TT ranks of the cores `[1, r_1, ..., 1]` (pruned entries included).
    pub fn ranks(&self) -> Vec<i64> {
        ranks_of(&self.cores)
    }

    /// The live ranks `[1, #live(D_0), ..., 1]`.
    pub fn live_ranks(&self) -> Vec<i64> {
        let mut ranks = vec![1];
        ranks.extend(
            self.masks()
                .iter()
                .map(|m| m.sum(Kind::Int64).int64_value(&[])),
        );
        ranks.push(1);
        ranks
    }

    /// The middle size of core `k` (`n_k`, or `m_k n_k` for a TT-matrix).
    fn middle(&self, k: usize) -> i64 {
        let s = self.cores[k].size();
        s[1..s.len() - 1].iter().product()
    }

    /// The number of core parameters, pruned entries included: `sum_k r_{k-1} n_k r_k`.
    pub fn num_params(&self) -> i64 {
        self.cores.iter().map(|c| c.numel() as i64).sum()
    }

    /// CoMERA's size: `sum_k live(r_{k-1}) · n_k · live(r_k)` (what the cores would hold once
    /// sliced to their live ranks; `n_k` is `m_k n_k` for a TT-matrix).
    pub fn live_size(&self) -> i64 {
        let live = self.live_ranks();
        (0..self.cores.len())
            .map(|k| live[k] * self.middle(k) * live[k + 1])
            .sum()
    }

    /// CoMERA's rank penalty, the mean of the live entries' magnitudes over all bonds:
    /// `penalty = (sum_i sum_{j live} |D_i[j]|) / (number of live entries)`, a scalar (0 when
    /// nothing is live). Differentiable in `D`; pruned entries do not contribute.
    pub fn penalty(&self) -> Tensor {
        // Counted on the device, not read back: a CUDA graph can record the penalty.
        let masked = self.masked_rank_vars();
        let mut total = Tensor::zeros([], (Kind::Float, self.device()));
        let mut live = Tensor::zeros([], (Kind::Float, self.device()));
        for (d, m) in masked.iter().zip(self.masks()) {
            total += d.abs().sum(Kind::Float);
            live += m.sum(Kind::Float);
        }
        total / live.clamp_min(1.0)
    }

    /// A differentiable proxy of [`RankedCores::live_size`] for the late stage: the live ranks
    /// replaced by the ℓ1 norms of the masked rank variables (CoMERA's relaxation of
    /// `||D||_0`), `size_proxy = sum_k a_{k-1} · n_k · a_k` with `a_i = sum_j |D_i[j] ⊙
    /// mask_i[j]|` and `a_0 = a_d = 1`. It equals `live_size` when every live entry is ±1.
    pub fn size_proxy(&self) -> Tensor {
        let masked = self.masked_rank_vars();
        let one = Tensor::ones([], (Kind::Float, self.device()));
        let mut a: Vec<Tensor> = vec![one.shallow_clone()];
        a.extend(masked.iter().map(|d| d.abs().sum(Kind::Float)));
        a.push(one);
        let mut total = Tensor::zeros([], (Kind::Float, self.device()));
        for k in 0..self.cores.len() {
            total += &a[k] * (self.middle(k) as f64) * &a[k + 1];
        }
        total
    }

    /// The device of the cores.
    pub fn device(&self) -> Device {
        self.cores[0].device()
    }

    /// Physical pruning: slices every core and rank variable to its live entries and replaces
    /// the variables with the smaller ones (new leaf tensors, trainable, without gradients),
    /// under the same names in `vs` (its named and trainable variables). Returns, per inner
    /// bond `i`, the kept indices (int64, ascending) into the old `D_i`: core `k` was sliced
    /// along its first dimension by `kept[k - 1]` and along its last by `kept[k]`, `D_i` by
    /// `kept[i]` — [`RankedCores::slice_core_state`] and [`RankedCores::slice_rank_state`] apply
    /// the same slicing to an optimizer's state. The outputs of the layer do not change (the
    /// removed entries were masked to zero).
    pub fn prune(&mut self, vs: &nn::VarStore) -> Result<Vec<Tensor>> {
        let kept: Vec<Tensor> = self
            .masks()
            .iter()
            .map(|m| m.nonzero().squeeze_dim(1).to_kind(Kind::Int64))
            .collect();
        let new_cores: Vec<Tensor> = tch::no_grad(|| {
            (0..self.cores.len())
                .map(|k| Self::slice_core_state(&kept, k, &self.cores[k]))
                .collect()
        });
        let new_ranks: Vec<Tensor> = tch::no_grad(|| {
            (0..self.rank_vars.len())
                .map(|i| Self::slice_rank_state(&kept, i, &self.rank_vars[i]))
                .collect()
        });
        let mut vars = vs
            .variables_
            .lock()
            .map_err(|_| Error::Msg("var store lock poisoned".into()))?;
        let mut replace = |name: &str, old: &Tensor, new: Tensor| -> Tensor {
            let new = new.detach().contiguous().set_requires_grad(true);
            if vars.named_variables.contains_key(name) {
                vars.named_variables
                    .insert(name.to_string(), new.shallow_clone());
            }
            let ptr = old.data_ptr();
            for var in vars.trainable_variables.iter_mut() {
                if var.tensor.data_ptr() == ptr && var.tensor.size() == old.size() {
                    var.tensor = new.shallow_clone();
                }
            }
            new
        };
        let cores: Vec<Tensor> = new_cores
            .into_iter()
            .enumerate()
            .map(|(k, t)| replace(&self.core_names[k], &self.cores[k], t))
            .collect();
        let rank_vars: Vec<Tensor> = new_ranks
            .into_iter()
            .enumerate()
            .map(|(i, t)| replace(&self.rank_names[i], &self.rank_vars[i], t))
            .collect();
        self.cores = cores;
        self.rank_vars = rank_vars;
        Ok(kept)
    }

    /// Slices a tensor of core `k`'s shape before pruning (the core, or an optimizer state of
    /// that shape) the way [`RankedCores::prune`] sliced the core, given its `kept` indices.
    pub fn slice_core_state(kept: &[Tensor], k: usize, state: &Tensor) -> Tensor {
        let mut t = state.shallow_clone();
        if k > 0 {
            t = t.index_select(0, &kept[k - 1].to_device(t.device()));
        }
        if k < kept.len() {
            let last = t.dim() as i64 - 1;
            t = t.index_select(last, &kept[k].to_device(t.device()));
        }
        t
    }

    /// Slices a tensor of `D_i`'s shape before pruning (the rank variable, or an optimizer
    /// state) the way [`RankedCores::prune`] sliced `D_i`.
    pub fn slice_rank_state(kept: &[Tensor], i: usize, state: &Tensor) -> Tensor {
        state.index_select(0, &kept[i].to_device(state.device()))
    }
}
