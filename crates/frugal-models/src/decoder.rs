//! The causal language models the trainer drives, behind one type: the LLaMA-style decoder and
//! the MatMul-free LM (HGRN-bit). Both are embeddings, a stack of blocks over an f32 residual
//! stream `(B, T, d)`, and a head, so that one training step (per-layer updates, activation
//! checkpointing, chunked cross-entropy) and one generation loop serve both.

use crate::embedding::{EmbeddingKind, WordEmbedding};
use crate::hgrn_bit::{self, HgrnBit, HgrnBitConfig};
use crate::linear::{Linear, LinearKind};
use crate::llama::{KvCache, Llama, LlamaConfig};
use frugal_core::{Error, Result};
use frugal_tt::TtLayer;
use tch::{nn, Tensor};

/// A decoder's shape.
// The LLaMA's shape is the larger (its families' settings): made once per run, not worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum DecoderConfig {
    /// A LLaMA-style transformer.
    Llama(LlamaConfig),
    /// The MatMul-free LM.
    HgrnBit(HgrnBitConfig),
}

impl DecoderConfig {
    /// Number of blocks.
    pub fn num_blocks(&self) -> usize {
        match self {
            DecoderConfig::Llama(c) => c.num_hidden_layers as usize,
            DecoderConfig::HgrnBit(c) => c.num_hidden_layers as usize,
        }
    }

    /// The longest sequence the model takes (None: any, a recurrent model).
    pub fn max_positions(&self) -> Option<i64> {
        match self {
            DecoderConfig::Llama(c) => Some(c.max_position_embeddings),
            DecoderConfig::HgrnBit(_) => None,
        }
    }

    /// The vocabulary size.
    pub fn vocab_size(&self) -> i64 {
        match self {
            DecoderConfig::Llama(c) => c.vocab_size,
            DecoderConfig::HgrnBit(c) => c.vocab_size,
        }
    }

    /// Number of parameters.
    pub fn num_parameters(&self) -> i64 {
        match self {
            DecoderConfig::Llama(c) => c.num_parameters(),
            DecoderConfig::HgrnBit(c) => c.num_parameters(),
        }
    }

    /// The LLaMA shape, for a LLaMA.
    pub fn llama(&self) -> Option<&LlamaConfig> {
        match self {
            DecoderConfig::Llama(c) => Some(c),
            DecoderConfig::HgrnBit(_) => None,
        }
    }
}

/// A causal language model.
// One per process, moved rarely: boxing the LLaMA (its config and rotary tables inline) would
// add an indirection for no memory worth saving.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Decoder {
    /// A LLaMA-style transformer.
    Llama(Llama),
    /// The MatMul-free LM.
    HgrnBit(HgrnBit),
}

/// What generation carries from token to token: keys and values (LLaMA) or the recurrent
/// state (HGRN-bit, constant in size).
#[derive(Debug)]
pub enum DecodeState {
    /// LLaMA's cache.
    Kv(KvCache),
    /// HGRN-bit's state.
    Recurrent(hgrn_bit::State),
}

impl Decoder {
    /// Builds the model of shape `cfg` under `root`, its linear layers of kind `kind` and its
    /// word table of kind `embedding` (a LLaMA's may be a tensor train; HGRN-bit's is dense: a
    /// TT one is an error naming `model.embedding`), computing in `compute`.
    pub fn new(
        root: &nn::Path,
        cfg: &DecoderConfig,
        kind: &LinearKind,
        embedding: &EmbeddingKind,
        compute: tch::Kind,
    ) -> Result<Self> {
        Ok(match cfg {
            DecoderConfig::Llama(c) => {
                Decoder::Llama(Llama::new(root, c, kind, embedding, compute)?)
            }
            DecoderConfig::HgrnBit(_) if *embedding != EmbeddingKind::Dense => {
                return Err(Error::config(
                    "model.embedding",
                    "a tensor-train word table is not available for model.kind = \"hgrn-bit\" \
                     (llama and encoder only)",
                ))
            }
            DecoderConfig::HgrnBit(c) => Decoder::HgrnBit(HgrnBit::new(root, c, kind, compute)?),
        })
    }

    /// The LLaMA, for a LLaMA.
    pub fn as_llama(&self) -> Option<&Llama> {
        match self {
            Decoder::Llama(m) => Some(m),
            Decoder::HgrnBit(_) => None,
        }
    }

    /// Number of blocks.
    pub fn num_blocks(&self) -> usize {
        match self {
            Decoder::Llama(m) => m.layers.len(),
            Decoder::HgrnBit(m) => m.layers.len(),
        }
    }

    /// The longest sequence the model takes (None: any).
    pub fn max_positions(&self) -> Option<i64> {
        match self {
            Decoder::Llama(m) => Some(m.config.max_position_embeddings),
            Decoder::HgrnBit(_) => None,
        }
    }

    /// The input embeddings `(B, T, d)` (f32) of ids `(B, T)`.
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        match self {
            Decoder::Llama(m) => m.embed(ids),
            Decoder::HgrnBit(m) => m.embed(ids),
        }
    }

    /// Block `i` applied to the residual stream `x` of sequences starting at position 0.
    pub fn block(&self, i: usize, x: &Tensor) -> Tensor {
        match self {
            Decoder::Llama(m) => {
                let (cos, sin) = m.rope(i, 0, x.size()[1]);
                m.layers[i].forward(x, &cos, &sin, None)
            }
            Decoder::HgrnBit(m) => {
                let lb = (i > 0).then(|| m.lower_bounds().get(i as i64));
                m.layers[i].forward(x, lb.as_ref(), None)
            }
        }
    }

    /// Logits (f32) of the last block's output.
    pub fn head(&self, x: &Tensor) -> Tensor {
        match self {
            Decoder::Llama(m) => m.head(x),
            Decoder::HgrnBit(m) => m.head(x),
        }
    }

    /// Logits `(B, T, vocab)` of ids `(B, T)`.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        match self {
            Decoder::Llama(m) => m.forward(ids, None),
            Decoder::HgrnBit(m) => m.forward(ids, None),
        }
    }

    /// Mean next-token cross-entropy (-100: not scored).
    pub fn loss(&self, ids: &Tensor, targets: &Tensor) -> Tensor {
        match self {
            Decoder::Llama(m) => m.loss(ids, targets),
            Decoder::HgrnBit(m) => m.loss(ids, targets),
        }
    }

    /// An empty generation state.
    pub fn new_state(&self) -> DecodeState {
        match self {
            Decoder::Llama(_) => DecodeState::Kv(KvCache::default()),
            Decoder::HgrnBit(_) => DecodeState::Recurrent(hgrn_bit::State::default()),
        }
    }

    /// Logits of ids that continue the sequence `state` holds; the state moves past them.
    pub fn forward_with(&self, ids: &Tensor, state: &mut DecodeState) -> Tensor {
        match (self, state) {
            (Decoder::Llama(m), DecodeState::Kv(c)) => m.forward(ids, Some(c)),
            (Decoder::HgrnBit(m), DecodeState::Recurrent(s)) => m.forward(ids, Some(s)),
            _ => panic!("a generation state of another model"),
        }
    }

    /// Every linear layer but the output head, with its full name.
    pub fn linears(&self) -> Vec<(String, &dyn Linear)> {
        match self {
            Decoder::Llama(m) => m.linears(),
            Decoder::HgrnBit(m) => m.linears(),
        }
    }

    /// [`Decoder::linears`], mutable.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Box<dyn Linear>)> {
        match self {
            Decoder::Llama(m) => m.linears_mut(),
            Decoder::HgrnBit(m) => m.linears_mut(),
        }
    }

    /// The word tables that may be tensor trains, with their full names: a LLaMA's
    /// `model.embed_tokens`; none for HGRN-bit (its dense table is an ordinary variable).
    pub fn tables(&self) -> Vec<(String, &WordEmbedding)> {
        match self {
            Decoder::Llama(m) => m.tables(),
            Decoder::HgrnBit(_) => Vec::new(),
        }
    }

    /// [`Decoder::tables`], mutable.
    pub fn tables_mut(&mut self) -> Vec<(String, &mut WordEmbedding)> {
        self.weights_mut().1
    }

    /// [`Decoder::linears_mut`] and [`Decoder::tables_mut`] at once (to load both).
    #[allow(clippy::type_complexity)]
    pub fn weights_mut(
        &mut self,
    ) -> (
        Vec<(String, &mut Box<dyn Linear>)>,
        Vec<(String, &mut WordEmbedding)>,
    ) {
        match self {
            Decoder::Llama(m) => m.weights_mut(),
            Decoder::HgrnBit(m) => (m.linears_mut(), Vec::new()),
        }
    }

    /// Every tensor-train layer (the word table when it is one, then the TT linear layers)
    /// with its full name: what rank adaptation trains and prunes.
    pub fn tt_layers(&self) -> Vec<(String, &dyn TtLayer)> {
        crate::embedding::tt_layers(self.tables(), self.linears())
    }

    /// [`Decoder::tt_layers`], mutable (threshold, pruning).
    pub fn tt_layers_mut(&mut self) -> Vec<(String, &mut dyn TtLayer)> {
        let (linears, tables) = self.weights_mut();
        crate::embedding::tt_layers_mut(tables, linears)
    }
}
