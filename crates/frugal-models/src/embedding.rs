//! The word-embedding factory: a dense table or a tensor-train one (CoMERA's TT-matrix
//! embedding, `frugal_tt::TtEmbedding`), from the config's `model.embedding`.

use crate::linear::{check_tt_options, Linear};
use frugal_core::{Error, Result};
use frugal_tt::{balanced_modes, pad_to_modes, TtEmbedding, TtLayer};
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

/// Which word table to build, from the config's `model.embedding`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", tag = "kind", deny_unknown_fields)]
pub enum EmbeddingKind {
    /// A dense table `(vocab, d)`, variable `{path}.weight`.
    #[default]
    Dense,
    /// A TT-matrix table (CoMERA): the vocabulary is padded to the smallest size that factors
    /// into `order` balanced modes and the dimension factored into `order` balanced modes
    /// ([`tt_embedding_modes`]: 4099 x 768 at order 4 is 4116 = [12, 7, 7, 7] x [4, 4, 6, 8],
    /// BERT's 30522 x 768 is 30576 = [14, 14, 13, 12] x [4, 4, 6, 8]); every inner rank is
    /// `rank` capped by what the modes allow, with one trainable rank variable per rank
    /// (variables `{path}.cores.{k}` of shape `(r_k, m_k, n_k, r_{k+1})` and
    /// `{path}.rank_vars.{i}`). Rows are looked up core by core for the distinct ids of a
    /// batch; a tied masked-LM decoder uses the reconstructed table.
    Tt {
        /// The largest TT rank of every inner bond (CoMERA: 32).
        #[serde(default = "default_rank")]
        rank: i64,
        /// Modes of the vocabulary and of the dimension, at least 2 (CoMERA: 4).
        #[serde(default = "default_order")]
        order: usize,
        /// Relative accuracy of the TT-SVD that converts a dense checkpoint's table when it is
        /// loaded into this model; unset: truncate by `rank` only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        eps: Option<f64>,
    },
}

fn default_rank() -> i64 {
    32
}

fn default_order() -> usize {
    4
}

impl EmbeddingKind {
    /// Checks a TT table's rank (at least 1), order (at least 2) and eps (finite, in [0, 1));
    /// errors name the key (`model.embedding.rank`...).
    pub fn validate(&self) -> Result<()> {
        match self {
            EmbeddingKind::Tt { rank, order, eps } => {
                check_tt_options("model.embedding", *rank, *order, *eps, "of each side")
            }
            EmbeddingKind::Dense => Ok(()),
        }
    }
}

/// The modes of a TT table `(vocab, dim)` at `order`: the vocabulary modes of the padded
/// vocabulary ([`pad_to_modes`], largest first) and the dimension's balanced modes (smallest
/// first), so that the large vocabulary modes meet the small dimension ones.
pub fn tt_embedding_modes(vocab: i64, dim: i64, order: usize) -> Result<(Vec<i64>, Vec<i64>)> {
    let (_, mut vocab_modes) = pad_to_modes(vocab, order)?;
    vocab_modes.reverse();
    Ok((vocab_modes, balanced_modes(dim, order)?))
}

/// A word table: dense or tensor-train.
#[derive(Debug)]
pub enum WordEmbedding {
    /// `(vocab, d)`, f32.
    Dense(Tensor),
    /// TT-matrix cores.
    Tt {
        /// The table.
        table: TtEmbedding,
        /// `model.embedding.eps`, for converting a dense checkpoint when loading.
        eps: Option<f64>,
    },
}

impl WordEmbedding {
    /// Builds a `(vocab, dim)` table of kind `kind` under `path`; a dense one is initialised
    /// with `init`, a TT one with the published initialisation. `compute` is the kind of a TT
    /// table's products (its rows come out in it).
    pub fn new(
        path: &nn::Path,
        vocab: i64,
        dim: i64,
        kind: &EmbeddingKind,
        init: nn::Init,
        compute: Kind,
    ) -> Result<Self> {
        kind.validate()?;
        match kind {
            EmbeddingKind::Dense => Ok(WordEmbedding::Dense(path.var(
                "weight",
                &[vocab, dim],
                init,
            ))),
            EmbeddingKind::Tt { rank, order, eps } => {
                let (vm, dm) = tt_embedding_modes(vocab, dim, *order)?;
                let table =
                    TtEmbedding::new(path, vocab, dim, &vm, &dm, *rank, compute).map_err(|e| {
                        Error::Msg(format!(
                            "{}: {e}",
                            path.components().collect::<Vec<_>>().join(".")
                        ))
                    })?;
                Ok(WordEmbedding::Tt { table, eps: *eps })
            }
        }
    }

    /// The rows of `ids` `(..., dim)`.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        match self {
            WordEmbedding::Dense(w) => Tensor::embedding(w, ids, -1, false, false),
            WordEmbedding::Tt { table, .. } => table.forward(ids),
        }
    }

    /// The whole table `(vocab, dim)`, differentiable (a TT table is reconstructed from its
    /// cores, rank variables applied): the tied masked-LM decoder's weight.
    pub fn table(&self) -> Tensor {
        match self {
            WordEmbedding::Dense(w) => w.shallow_clone(),
            WordEmbedding::Tt { table, .. } => table.to_dense(),
        }
    }

    /// The TT table, when it is one.
    pub fn tt(&self) -> Option<&TtEmbedding> {
        match self {
            WordEmbedding::Tt { table, .. } => Some(table),
            WordEmbedding::Dense(_) => None,
        }
    }

    /// [`WordEmbedding::tt`], mutable (pruning, loading).
    pub fn tt_mut(&mut self) -> Option<&mut TtEmbedding> {
        match self {
            WordEmbedding::Tt { table, .. } => Some(table),
            WordEmbedding::Dense(_) => None,
        }
    }

    /// `model.embedding.eps` of a TT table.
    pub fn tt_eps(&self) -> Option<f64> {
        match self {
            WordEmbedding::Tt { eps, .. } => *eps,
            WordEmbedding::Dense(_) => None,
        }
    }
}

/// The tensor-train layers of a model whose word tables are `tables` and whose linear layers
/// are `linears` (name, layer): the TT tables first, then the TT linear layers, in the given
/// orders: what rank adaptation trains and prunes.
pub fn tt_layers<'a>(
    tables: Vec<(String, &'a WordEmbedding)>,
    linears: Vec<(String, &'a dyn Linear)>,
) -> Vec<(String, &'a dyn TtLayer)> {
    let tables = tables.into_iter();
    let tables = tables.filter_map(|(n, t)| Some((n, t.tt()? as &dyn TtLayer)));
    let linears = linears.into_iter();
    let linears = linears.filter_map(|(n, l)| Some((n, l.tt()? as &dyn TtLayer)));
    tables.chain(linears).collect()
}

/// [`tt_layers`], mutable (threshold, pruning, loading).
pub fn tt_layers_mut<'a>(
    tables: Vec<(String, &'a mut WordEmbedding)>,
    linears: Vec<(String, &'a mut Box<dyn Linear>)>,
) -> Vec<(String, &'a mut dyn TtLayer)> {
    let tables = tables.into_iter();
    let tables = tables.filter_map(|(n, t)| Some((n, t.tt_mut()? as &mut dyn TtLayer)));
    let linears = linears.into_iter();
    let linears = linears.filter_map(|(n, l)| Some((n, l.as_mut().tt_mut()? as &mut dyn TtLayer)));
    tables.chain(linears).collect()
}
