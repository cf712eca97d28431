//! A BERT-style encoder (Devlin et al. 2019) with Hugging Face's weight names, the model of the
//! CoMERA paper's experiments (6 layers, d 768, 12 heads, ffn 3072; see REFERENCE.md).
//!
//! Embeddings `LN(word[id] + position[t] + token_type[s])`; post-LN blocks
//! `h = LN(x + attn(x))`, `out = LN(h + W2 gelu(W1 h))` with exact (erf) GELU; padding keys are
//! masked out of attention. Every projection inside the blocks is built by
//! [`crate::linear::build`] from the given [`LinearKind`], and its bias is a separate variable
//! added after it, so that any kind of linear layer (dense, quantized, tensor-train...) works.
//! LayerNorms, softmax and the residual stream stay in f32; the linear layers and attention run
//! in the compute kind (f32 or bf16). No dropout.
//!
//! Heads, in [`heads`]: [`EncoderForMaskedLm`] (`BertForMaskedLM`: the decoder tied to the word
//! embeddings) and [`EncoderForClassification`] (`BertForSequenceClassification`: pooler and
//! classifier). [`mask_tokens`] draws masked-LM inputs and labels with BERT's 80/10/10 rule.
//!
//! ```no_run
//! use frugal_models::encoder::{EncoderConfig, EncoderForMaskedLm};
//! use frugal_models::{EmbeddingKind, LinearKind};
//! let cfg = EncoderConfig::preset("encoder-tiny").unwrap().with_vocab_size(1000);
//! let vs = tch::nn::VarStore::new(tch::Device::Cpu);
//! let (linear, embedding) = (LinearKind::Dense, EmbeddingKind::Dense);
//! let model = EncoderForMaskedLm::new(&vs.root(), &cfg, &linear, &embedding, tch::Kind::Float)?;
//! let ids = tch::Tensor::zeros([2, 16], (tch::Kind::Int64, tch::Device::Cpu));
//! let logits = model.logits(&ids, None, None); // (2, 16, 1000)
//! # Ok::<(), frugal_core::Error>(())
//! ```

mod config;
pub mod heads;
mod masking;

pub use config::{EncoderConfig, PRESETS};
pub use heads::{EncoderForClassification, EncoderForMaskedLm};
pub use masking::{mask_tokens, IGNORE_INDEX};

use crate::embedding::{EmbeddingKind, WordEmbedding};
use crate::linear::{self, Linear, LinearKind};
use frugal_core::Result;
use frugal_tt::TtLayer;
use tch::{nn, Kind, Tensor};

/// HF's initialisation of weights and embeddings: N(0, 0.02).
const INIT: nn::Init = nn::Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

/// A linear layer of any [`LinearKind`] followed by a bias variable `path.bias` (init zero):
/// `x W^T + b`, in the compute kind.
#[derive(Debug)]
pub struct Affine {
    /// The linear map (`path.weight`, or its kind's tensors).
    pub linear: Box<dyn Linear>,
    /// The bias, `(out,)`, f32.
    pub bias: Tensor,
}

impl Affine {
    pub(crate) fn new(
        path: &nn::Path,
        in_dim: i64,
        out_dim: i64,
        kind: &LinearKind,
        compute: Kind,
    ) -> Result<Self> {
        Ok(Self {
            linear: linear::build(path, in_dim, out_dim, kind, compute)?,
            bias: path.var("bias", &[out_dim], nn::Init::Const(0.0)),
        })
    }

    /// `x W^T + b` over the last dimension, in the layer's compute kind.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.linear.forward(x);
        let b = self.bias.to_kind(y.kind());
        y + b
    }
}

/// LayerNorm over the last dimension with gain and bias (`path.weight`, `path.bias`), computed
/// in f32.
#[derive(Debug)]
pub struct LayerNorm {
    /// Per-feature gain, initialised to one.
    pub weight: Tensor,
    /// Per-feature bias, initialised to zero.
    pub bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub(crate) fn new(path: &nn::Path, d: i64, eps: f64) -> Self {
        Self {
            weight: path.var("weight", &[d], nn::Init::Const(1.0)),
            bias: path.var("bias", &[d], nn::Init::Const(0.0)),
            eps,
        }
    }

    /// Normalizes over the last dimension; the result is f32.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let d = self.weight.size()[0];
        x.to_kind(Kind::Float).layer_norm(
            [d],
            Some(&self.weight.to_kind(Kind::Float)),
            Some(&self.bias.to_kind(Kind::Float)),
            self.eps,
            false,
        )
    }
}

/// Word, position and token-type embeddings, summed and normalized (`bert.embeddings`). The word
/// table is dense or a tensor train ([`EmbeddingKind`]); the others are dense.
#[derive(Debug)]
pub struct Embeddings {
    word: WordEmbedding,
    position: Tensor,
    token_type: Tensor,
    norm: LayerNorm,
}

impl Embeddings {
    fn new(
        path: &nn::Path,
        cfg: &EncoderConfig,
        embedding: &EmbeddingKind,
        compute: Kind,
    ) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            word: WordEmbedding::new(
                &(path / "word_embeddings"),
                cfg.vocab_size,
                d,
                embedding,
                INIT,
                compute,
            )?,
            position: (path / "position_embeddings").var(
                "weight",
                &[cfg.max_position_embeddings, d],
                INIT,
            ),
            token_type: (path / "token_type_embeddings").var(
                "weight",
                &[cfg.type_vocab_size, d],
                INIT,
            ),
            norm: LayerNorm::new(&(path / "LayerNorm"), d, cfg.layer_norm_eps),
        })
    }

    /// The word table `(vocab, d)` (the masked-LM decoder's tied weight; a TT table is
    /// reconstructed, differentiably).
    pub fn word_table(&self) -> Tensor {
        self.word.table()
    }

    /// The word embedding (dense or TT).
    pub fn word(&self) -> &WordEmbedding {
        &self.word
    }

    /// [`Embeddings::word`], mutable (loading, pruning a TT table).
    pub fn word_mut(&mut self) -> &mut WordEmbedding {
        &mut self.word
    }

    /// `LN(word[ids] + position[0..T] + token_type[token_types])`, f32 `(B, T, d)`; token
    /// types default to zero. Panics when T exceeds the position table.
    pub fn forward(&self, ids: &Tensor, token_types: Option<&Tensor>) -> Tensor {
        let t = ids.size()[1];
        let max = self.position.size()[0];
        assert!(
            t <= max,
            "sequence of {t} tokens, the model has {max} positions"
        );
        let words = self.word.forward(ids).to_kind(Kind::Float);
        let pos = self.position.narrow(0, 0, t).to_kind(Kind::Float);
        let types = match token_types {
            Some(tt) => Tensor::embedding(&self.token_type, tt, -1, false, false),
            None => self.token_type.get(0).view([1, 1, -1]),
        };
        self.norm
            .forward(&(words + pos + types.to_kind(Kind::Float)))
    }
}

/// One post-LN encoder block (`bert.encoder.layer.N`).
#[derive(Debug)]
pub struct EncoderLayer {
    query: Affine,
    key: Affine,
    value: Affine,
    attention_output: Affine,
    attention_norm: LayerNorm,
    intermediate: Affine,
    output: Affine,
    output_norm: LayerNorm,
    heads: i64,
    head_dim: i64,
    gelu: &'static str,
}

/// Names of a block's linear layers, relative to the block, in [`EncoderLayer::linears`] order.
pub const LAYER_LINEARS: [&str; 6] = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

impl EncoderLayer {
    fn new(path: &nn::Path, cfg: &EncoderConfig, kind: &LinearKind, compute: Kind) -> Result<Self> {
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        let eps = cfg.layer_norm_eps;
        let a = path / "attention";
        let s = &a / "self";
        let lin = |p: nn::Path, i, o| Affine::new(&p, i, o, kind, compute);
        Ok(Self {
            query: lin(&s / "query", d, d)?,
            key: lin(&s / "key", d, d)?,
            value: lin(&s / "value", d, d)?,
            attention_output: lin(&a / "output" / "dense", d, d)?,
            attention_norm: LayerNorm::new(&(&a / "output" / "LayerNorm"), d, eps),
            intermediate: lin(path / "intermediate" / "dense", d, f)?,
            output: lin(path / "output" / "dense", f, d)?,
            output_norm: LayerNorm::new(&(path / "output" / "LayerNorm"), d, eps),
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            gelu: cfg.gelu_approximation().expect("validated hidden_act"),
        })
    }

    /// The block's linear layers with their names relative to the block ([`LAYER_LINEARS`]).
    pub fn linears(&self) -> [(&'static str, &dyn Linear); 6] {
        let l = [
            &self.query,
            &self.key,
            &self.value,
            &self.attention_output,
            &self.intermediate,
            &self.output,
        ];
        std::array::from_fn(|i| (LAYER_LINEARS[i], l[i].linear.as_ref()))
    }

    /// [`EncoderLayer::linears`], mutable.
    pub fn linears_mut(&mut self) -> [(&'static str, &mut Box<dyn Linear>); 6] {
        let [a, b, c, d, e, f] = LAYER_LINEARS;
        [
            (a, &mut self.query.linear),
            (b, &mut self.key.linear),
            (c, &mut self.value.linear),
            (d, &mut self.attention_output.linear),
            (e, &mut self.intermediate.linear),
            (f, &mut self.output.linear),
        ]
    }

    /// `x` is the f32 residual stream `(B, T, d)`; `mask` is an additive attention mask
    /// broadcastable to `(B, heads, T, T)` (see [`Encoder::attention_bias`]). Returns f32.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let (b, t, d) = x.size3().expect("(batch, time, width)");
        let split = |y: Tensor| y.view([b, t, self.heads, self.head_dim]).transpose(1, 2);
        let q = split(self.query.forward(x));
        let k = split(self.key.forward(x));
        let v = split(self.value.forward(x));
        let mask = mask.map(|m| m.to_kind(q.kind()));
        let y = Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, false, None, false);
        let y = y.transpose(1, 2).contiguous().view([b, t, d]);
        let h = self
            .attention_norm
            .forward(&(self.attention_output.forward(&y).to_kind(Kind::Float) + x));
        let inner = self.intermediate.forward(&h).gelu(self.gelu);
        let out = self.output.forward(&inner).to_kind(Kind::Float);
        self.output_norm.forward(&(out + h))
    }
}

/// The encoder without heads (`bert.embeddings`, `bert.encoder`): token ids to hidden states.
#[derive(Debug)]
pub struct Encoder {
    /// The model's shape.
    pub config: EncoderConfig,
    /// The embeddings.
    pub embeddings: Embeddings,
    /// The blocks, first to last.
    pub layers: Vec<EncoderLayer>,
    compute: Kind,
}

/// The linear layers of `blocks`, mutable, named relative to the encoder's path
/// (`encoder.layer.3.intermediate.dense`).
fn blocks_linears_mut(blocks: &mut [EncoderLayer]) -> Vec<(String, &mut Box<dyn Linear>)> {
    crate::linear::stack_linears_mut("encoder.layer", blocks, EncoderLayer::linears_mut)
}

/// The word table's name relative to the encoder's path.
pub const WORD_EMBEDDINGS: &str = "embeddings.word_embeddings";

/// Added to the attention scores of padding keys: far below any score, finite in f32 and bf16
/// (so that a row with no real key stays finite, as in transformers).
const MASKED_SCORE: f64 = -1e9;

impl Encoder {
    /// Builds the encoder under `path` (HF: `bert`; names `path.embeddings.word_embeddings.weight`,
    /// `path.encoder.layer.N.attention.self.query.weight`, ...) with the blocks' linear layers of
    /// kind `kind` and a word table of kind `embedding`, computing in `compute` (f32 or bf16;
    /// parameters stay f32). Errors when the config is invalid (naming the field) or a kind does
    /// not fit the shapes.
    pub fn new(
        path: &nn::Path,
        cfg: &EncoderConfig,
        kind: &LinearKind,
        embedding: &EmbeddingKind,
        compute: Kind,
    ) -> Result<Self> {
        cfg.validate()?;
        let embeddings = Embeddings::new(&(path / "embeddings"), cfg, embedding, compute)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(&(path / "encoder" / "layer" / i), cfg, kind, compute))
            .collect::<Result<_>>()?;
        Ok(Self {
            config: cfg.clone(),
            embeddings,
            layers,
            compute,
        })
    }

    /// The compute kind.
    pub fn compute_kind(&self) -> Kind {
        self.compute
    }

    /// Every linear layer of the blocks with its name relative to the encoder's path
    /// (`encoder.layer.3.intermediate.dense`).
    pub fn linears(&self) -> Vec<(String, &dyn Linear)> {
        crate::linear::stack_linears("encoder.layer", &self.layers, EncoderLayer::linears)
    }

    /// [`Encoder::linears`], mutable.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Box<dyn Linear>)> {
        blocks_linears_mut(&mut self.layers)
    }

    /// The word tables with their names relative to the encoder's path
    /// (`embeddings.word_embeddings`).
    pub fn tables(&self) -> Vec<(String, &WordEmbedding)> {
        vec![(WORD_EMBEDDINGS.to_string(), self.embeddings.word())]
    }

    /// [`Encoder::tables`], mutable.
    pub fn tables_mut(&mut self) -> Vec<(String, &mut WordEmbedding)> {
        self.weights_mut().1
    }

    /// [`Encoder::linears_mut`] and [`Encoder::tables_mut`] at once (to load both).
    #[allow(clippy::type_complexity)]
    pub fn weights_mut(
        &mut self,
    ) -> (
        Vec<(String, &mut Box<dyn Linear>)>,
        Vec<(String, &mut WordEmbedding)>,
    ) {
        let tables = vec![(WORD_EMBEDDINGS.to_string(), &mut self.embeddings.word)];
        let linears = blocks_linears_mut(&mut self.layers);
        (linears, tables)
    }

    /// Every tensor-train layer (the word table when it is one, then the blocks' TT linear
    /// layers) with its name relative to the encoder's path: what rank adaptation trains.
    pub fn tt_layers(&self) -> Vec<(String, &dyn TtLayer)> {
        crate::embedding::tt_layers(self.tables(), self.linears())
    }

    /// [`Encoder::tt_layers`], mutable (threshold, pruning).
    pub fn tt_layers_mut(&mut self) -> Vec<(String, &mut dyn TtLayer)> {
        let (linears, tables) = self.weights_mut();
        crate::embedding::tt_layers_mut(tables, linears)
    }

    /// The additive attention mask `(B, 1, 1, T)` (f32: 0 for real tokens, a large negative
    /// number for padding) of a `(B, T)` mask that is nonzero (or true) at real tokens.
    pub fn attention_bias(attention_mask: &Tensor) -> Tensor {
        let (b, t) = attention_mask
            .size2()
            .expect("attention mask (batch, time)");
        let real = attention_mask.ne(0).to_kind(Kind::Float);
        (real.ones_like() - &real)
            .multiply_scalar(MASKED_SCORE)
            .view([b, 1, 1, t])
    }

    /// [`Encoder::forward`] for activation checkpointing: the embeddings keep their graph, the
    /// blocks run without one, keeping only their inputs (see [`Checkpointed`]).
    pub fn forward_checkpointed(
        &self,
        ids: &Tensor,
        token_types: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Checkpointed {
        let mask = attention_mask.map(Self::attention_bias);
        let embedded = self.embeddings.forward(ids, token_types);
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut x = embedded.detach();
        for layer in &self.layers {
            let input = x.detach().set_requires_grad(true);
            x = tch::no_grad(|| layer.forward(&input, mask.as_ref()));
            inputs.push(input);
        }
        Checkpointed {
            embedded,
            inputs,
            hidden: x.detach().set_requires_grad(true),
            mask,
        }
    }

    /// Hidden states `(B, T, d)`, f32, of token ids `(B, T)`; token types default to zero and
    /// the attention mask (1 at real tokens, 0 at padding) to all ones.
    pub fn forward(
        &self,
        ids: &Tensor,
        token_types: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Tensor {
        let mask = attention_mask.map(Self::attention_bias);
        let mut x = self.embeddings.forward(ids, token_types);
        for layer in &self.layers {
            x = layer.forward(&x, mask.as_ref());
        }
        x
    }
}

/// A forward pass that kept only each block's input ([`Encoder::forward_checkpointed`]): the
/// head's loss is computed from [`Checkpointed::hidden`] (a leaf that takes a gradient); after
/// its `backward()`, [`Checkpointed::backward`] recomputes each block, last to first, and
/// carries the gradient through it to the embeddings, leaving in every parameter's `.grad` what
/// the plain backward pass would.
#[derive(Debug)]
pub struct Checkpointed {
    embedded: Tensor,
    inputs: Vec<Tensor>,
    hidden: Tensor,
    mask: Option<Tensor>,
}

impl Checkpointed {
    /// The last block's output `(B, T, d)`, f32, detached, taking a gradient.
    pub fn hidden(&self) -> &Tensor {
        &self.hidden
    }

    /// After the head's backward pass (which set `hidden`'s gradient): the blocks' and the
    /// embeddings' backward, one block's activations alive at a time. Does nothing when the
    /// head's pass did not reach `hidden`; skips the embeddings when they are frozen (an
    /// adapter run).
    pub fn backward(self, encoder: &Encoder) {
        let mut upstream = self.hidden.grad();
        if !upstream.defined() {
            return;
        }
        for (layer, input) in encoder.layers.iter().zip(&self.inputs).rev() {
            let out = layer.forward(input, self.mask.as_ref());
            (&out * &upstream).sum(Kind::Float).backward();
            upstream = input.grad();
        }
        if self.embedded.requires_grad() {
            (&self.embedded * &upstream).sum(Kind::Float).backward();
        }
    }
}

/// Prefixes `prefix.` to the names of the encoder's linear layers.
fn prefixed<T>(prefix: &str, v: Vec<(String, T)>) -> Vec<(String, T)> {
    v.into_iter()
        .map(|(n, l)| (format!("{prefix}.{n}"), l))
        .collect()
}
