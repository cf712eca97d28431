//! `TtEmbedding`: an embedding table as a TT-matrix over vocabulary modes and dimension modes,
//! with rows looked up core by core for the distinct ids only.

use crate::linear::{check_compute, published_init};
use crate::modes::{capped_ranks, check_modes, modes_product};
use crate::rank::{RankedCores, TtLayer};
use crate::ttm::{ttm_full, TtMatrix};
use frugal_core::{Error, Result};
use tch::{nn, Kind, Tensor};

/// An embedding `(vocab, dim)` stored as a TT-matrix with cores `(r_{k-1}, m_k, n_k, r_k)`: the
/// vocabulary is padded to `m_1 ... m_d >= vocab` (rows past `vocab` are padding, never
/// returned by [`TtEmbedding::to_dense`]), and `n_1 ... n_d = dim` (CoMERA: 30522 padded to
/// 32000 = [16, 20, 10, 10] by 768 = [4, 4, 8, 6], ranks 32).
///
/// Variables under the layer's path: `cores.{k}` and `rank_vars.{i}` ([`RankedCores`]).
#[derive(Debug)]
pub struct TtEmbedding {
    ranked: RankedCores,
    vocab: i64,
    compute: Kind,
}

impl TtEmbedding {
    /// A table with the published initialisation ([`published_init`] applied to the merged
    /// modes `m_k n_k`, with `in = padded vocabulary`, `out = dim`), every inner rank `rank`
    /// capped by the unfolding sizes.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        path: &nn::Path,
        vocab: i64,
        dim: i64,
        vocab_modes: &[i64],
        dim_modes: &[i64],
        rank: i64,
        compute: Kind,
    ) -> Result<Self> {
        let padded = check_table_modes(vocab, dim, vocab_modes, dim_modes)?;
        let merged: Vec<i64> = vocab_modes
            .iter()
            .zip(dim_modes)
            .map(|(m, n)| m * n)
            .collect();
        let ranks = capped_ranks(&merged, rank)?;
        let cores = published_init(&merged, &ranks, padded, dim)
            .into_iter()
            .enumerate()
            .map(|(k, c)| c.reshape([ranks[k], vocab_modes[k], dim_modes[k], ranks[k + 1]]))
            .collect();
        Self::from_cores(path, vocab, cores, None, compute)
    }

    /// A table from a dense `(vocab, dim)` one: zero rows pad it to the mode product, then
    /// [`TtMatrix::from_dense`] (rank cap `max_rank`, relative accuracy `eps`).
    #[allow(clippy::too_many_arguments)]
    pub fn from_dense(
        path: &nn::Path,
        table: &Tensor,
        vocab_modes: &[i64],
        dim_modes: &[i64],
        max_rank: Option<i64>,
        eps: Option<f64>,
        compute: Kind,
    ) -> Result<Self> {
        let size = table.size();
        if size.len() != 2 {
            return Err(Error::Msg(format!(
                "TtEmbedding: table of shape {size:?} is not a matrix (vocab, dim)"
            )));
        }
        let (vocab, dim) = (size[0], size[1]);
        let padded = check_table_modes(vocab, dim, vocab_modes, dim_modes)?;
        let table = table.detach();
        let full = if padded > vocab {
            let pad = Tensor::zeros([padded - vocab, dim], (table.kind(), table.device()));
            Tensor::cat(&[table, pad], 0)
        } else {
            table
        };
        let ttm = TtMatrix::from_dense(&full, vocab_modes, dim_modes, max_rank, eps)?;
        Self::from_cores(path, vocab, ttm.cores, None, compute)
    }

    /// A table from existing TT-matrix cores `(r_{k-1}, m_k, n_k, r_k)` (for loading); the
    /// vocabulary `vocab` must not exceed the product of the `m_k`. Copied into new variables.
    pub fn from_cores(
        path: &nn::Path,
        vocab: i64,
        cores: Vec<Tensor>,
        rank_vars: Option<Vec<Tensor>>,
        compute: Kind,
    ) -> Result<Self> {
        check_compute(compute)?;
        let ranked = RankedCores::new(path, cores, rank_vars, 4, "TtEmbedding")?;
        let padded: i64 = ranked.cores().iter().map(|c| c.size()[1]).product();
        if vocab < 1 || vocab > padded {
            return Err(Error::Msg(format!(
                "TtEmbedding: vocabulary {vocab} does not fit the vocabulary modes (product \
                 {padded})"
            )));
        }
        Ok(TtEmbedding {
            ranked,
            vocab,
            compute,
        })
    }

    /// The rows of `ids` (any shape, integer, values in `0..vocab`): the output has shape
    /// `(*ids.shape, dim)` in the compute kind. The distinct ids are found first (`unique` with
    /// inverse); for each, its digits over the vocabulary modes select one slice
    /// `(r_{k-1}, n_k, r_k)` per core and the slices are contracted left to right (batched over
    /// the distinct ids); the rows are then gathered back for every position.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        let cores = self.ranked.effective_cores();
        let flat = ids.reshape([-1]).to_kind(Kind::Int64);
        let (unique, inverse, _) = flat.internal_unique2(true, true, false);
        let u = unique.size()[0];
        let vocab_modes = self.vocab_modes();
        // Digits of every id, row-major over the vocabulary modes.
        let mut digits: Vec<Tensor> = (0..cores.len()).map(|_| unique.shallow_clone()).collect();
        let mut rest = unique;
        for k in (0..cores.len()).rev() {
            digits[k] = rest.remainder(vocab_modes[k]);
            rest = rest.floor_divide_scalar(vocab_modes[k]);
        }
        let master = cores[0].kind();
        let mut acc = Tensor::ones([u, 1, 1], (master, cores[0].device()));
        for (k, core) in cores.iter().enumerate() {
            let s = core.size();
            let (r0, n, r1) = (s[0], s[2], s[3]);
            // (r0, U, n, r1) -> (U, r0, n r1)
            let sel = core
                .index_select(1, &digits[k])
                .permute([1, 0, 2, 3])
                .reshape([u, r0, n * r1]);
            let p = acc.size()[1];
            acc = acc.bmm(&sel).reshape([u, p * n, r1]);
        }
        let rows = acc.reshape([u, self.dim()]).to_kind(self.compute);
        let mut shape = ids.size();
        shape.push(self.dim());
        rows.index_select(0, &inverse).reshape(shape)
    }

    /// The dense table `(vocab, dim)` (padding rows dropped; rank variables applied;
    /// differentiable, master kind).
    pub fn to_dense(&self) -> Tensor {
        ttm_full(&self.ranked.effective_cores()).narrow(0, 0, self.vocab)
    }

    /// The kind of the products (the rows come out in it).
    pub fn compute_kind(&self) -> Kind {
        self.compute
    }

    /// The vocabulary size (unpadded).
    pub fn vocab(&self) -> i64 {
        self.vocab
    }

    /// The padded vocabulary, the product of the vocabulary modes.
    pub fn padded_vocab(&self) -> i64 {
        self.vocab_modes().iter().product()
    }

    /// The embedding dimension.
    pub fn dim(&self) -> i64 {
        self.dim_modes().iter().product()
    }

    /// The vocabulary modes `m_k`.
    pub fn vocab_modes(&self) -> Vec<i64> {
        self.ranked.cores().iter().map(|c| c.size()[1]).collect()
    }

    /// The dimension modes `n_k`.
    pub fn dim_modes(&self) -> Vec<i64> {
        self.ranked.cores().iter().map(|c| c.size()[2]).collect()
    }

    /// The TT ranks `[1, r_1, ..., 1]`.
    pub fn ranks(&self) -> Vec<i64> {
        self.ranked.ranks()
    }

    /// The number of core parameters `sum_k r_{k-1} m_k n_k r_k`.
    pub fn num_params(&self) -> i64 {
        self.ranked.num_params()
    }

    /// The cores and rank variables (penalty, live size, masks).
    pub fn ranked(&self) -> &RankedCores {
        &self.ranked
    }

    /// Mutable access to the cores and rank variables (threshold).
    pub fn ranked_mut(&mut self) -> &mut RankedCores {
        &mut self.ranked
    }

    /// Physical pruning ([`RankedCores::prune`]).
    pub fn prune(&mut self, vs: &nn::VarStore) -> Result<Vec<Tensor>> {
        self.ranked.prune(vs)
    }
}

impl TtLayer for TtEmbedding {
    fn ranked(&self) -> &RankedCores {
        &self.ranked
    }

    fn ranked_mut(&mut self) -> &mut RankedCores {
        &mut self.ranked
    }

    fn dense_params(&self) -> i64 {
        self.vocab * self.dim()
    }
}

/// Checks an embedding's modes; returns the padded vocabulary.
fn check_table_modes(vocab: i64, dim: i64, vocab_modes: &[i64], dim_modes: &[i64]) -> Result<i64> {
    let padded = modes_product(vocab_modes, "TtEmbedding vocabulary modes")?;
    if padded < vocab {
        return Err(Error::Msg(format!(
            "TtEmbedding: vocabulary modes {vocab_modes:?} multiply to {padded}, less than the \
             vocabulary {vocab}"
        )));
    }
    check_modes(dim_modes, dim, "TtEmbedding dimension")?;
    if vocab_modes.len() != dim_modes.len() || vocab_modes.len() < 2 {
        return Err(Error::Msg(format!(
            "TtEmbedding: vocabulary modes {vocab_modes:?} and dimension modes {dim_modes:?} \
             must have the same number of modes, at least 2"
        )));
    }
    Ok(padded)
}
