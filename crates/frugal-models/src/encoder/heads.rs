//! The encoder's heads, as transformers' `BertForMaskedLM` and `BertForSequenceClassification`:
//! same names, same outputs. The heads' own linear layers stay dense whatever the blocks' kind
//! (as the LLaMA output head), and are not listed by `linears()`.

use super::{prefixed, Affine, Encoder, EncoderConfig, LayerNorm, IGNORE_INDEX};
use crate::embedding::{EmbeddingKind, WordEmbedding};
use crate::linear::{Linear, LinearKind};
use frugal_core::{Error, Result};
use frugal_tt::TtLayer;
use tch::{nn, Kind, Reduction, Tensor};

/// The masked-LM head (`cls.predictions`): `LN(gelu(dense(h))) E^T + bias`, E the word
/// embeddings (tied, as BERT).
#[derive(Debug)]
struct MlmHead {
    dense: Affine,
    norm: LayerNorm,
    bias: Tensor,
    gelu: &'static str,
}

/// An encoder with the masked-language-model head: transformers' `BertForMaskedLM`, names
/// `bert.embeddings.*`, `bert.encoder.layer.N.*`, `cls.predictions.transform.{dense,LayerNorm}.*`,
/// `cls.predictions.bias` (no pooler; `cls.predictions.decoder.weight` is the word table).
#[derive(Debug)]
pub struct EncoderForMaskedLm {
    /// The encoder (`bert`).
    pub encoder: Encoder,
    head: MlmHead,
}

impl EncoderForMaskedLm {
    /// Builds the model under `root`, the blocks' linear layers of kind `kind`, the word table
    /// (tied to the decoder) of kind `embedding`, computing in `compute` (f32 or bf16). Errors
    /// name the config field or the layer that does not fit.
    pub fn new(
        root: &nn::Path,
        cfg: &EncoderConfig,
        kind: &LinearKind,
        embedding: &EmbeddingKind,
        compute: Kind,
    ) -> Result<Self> {
        let encoder = Encoder::new(&(root / "bert"), cfg, kind, embedding, compute)?;
        let p = root / "cls" / "predictions";
        let d = cfg.hidden_size;
        let head = MlmHead {
            dense: Affine::new(
                &(&p / "transform" / "dense"),
                d,
                d,
                &LinearKind::Dense,
                compute,
            )?,
            norm: LayerNorm::new(&(&p / "transform" / "LayerNorm"), d, cfg.layer_norm_eps),
            bias: p.var("bias", &[cfg.vocab_size], nn::Init::Const(0.0)),
            gelu: cfg.gelu_approximation().expect("validated hidden_act"),
        };
        Ok(Self { encoder, head })
    }

    /// Vocabulary logits, f32 `(..., vocab)`, of hidden states `(..., d)`.
    pub fn head(&self, hidden: &Tensor) -> Tensor {
        let h = &self.head;
        let x = h.norm.forward(&h.dense.forward(hidden).gelu(h.gelu));
        let compute = self.encoder.compute_kind();
        let table = self.encoder.embeddings.word_table().to_kind(compute);
        x.to_kind(compute).matmul(&table.tr()).to_kind(Kind::Float) + &h.bias
    }

    /// Vocabulary logits `(B, T, vocab)`, f32, of token ids `(B, T)` (optional token types and
    /// attention mask as in [`Encoder::forward`]).
    pub fn logits(
        &self,
        ids: &Tensor,
        token_types: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Tensor {
        self.head(&self.encoder.forward(ids, token_types, attention_mask))
    }

    /// Mean cross-entropy over the positions whose label is not [`IGNORE_INDEX`] (-100), as
    /// transformers; the vocabulary logits are computed only at those positions. NaN when no
    /// position is labelled (as transformers).
    pub fn mlm_loss(
        &self,
        ids: &Tensor,
        token_types: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        labels: &Tensor,
    ) -> Tensor {
        let hidden = self.encoder.forward(ids, token_types, attention_mask);
        self.loss_of_hidden(&hidden, labels)
    }

    /// [`EncoderForMaskedLm::mlm_loss`] from the last block's output `(B, T, d)` (for a
    /// trainer that runs the blocks itself).
    pub fn loss_of_hidden(&self, hidden: &Tensor, labels: &Tensor) -> Tensor {
        let d = hidden.size()[2];
        let labels = labels.reshape([-1]).to_device(hidden.device());
        let rows = labels.ne(IGNORE_INDEX).nonzero().squeeze_dim(1);
        let hidden = hidden.reshape([-1, d]).index_select(0, &rows);
        let target = labels.index_select(0, &rows);
        self.head(&hidden).cross_entropy_loss(
            &target,
            None::<Tensor>,
            Reduction::Mean,
            IGNORE_INDEX,
            0.0,
        )
    }

    /// [`EncoderForMaskedLm::loss_of_hidden`] with every position through the head and the
    /// unselected ones dropped by the cross-entropy's ignore index: the same loss, with shapes
    /// that do not depend on how many tokens were selected and no read back to the host (what a
    /// CUDA graph can record), at the price of the head's product over all positions.
    pub fn loss_of_hidden_all_rows(&self, hidden: &Tensor, labels: &Tensor) -> Tensor {
        let d = hidden.size()[2];
        let labels = labels.reshape([-1]).to_device(hidden.device());
        self.head(&hidden.reshape([-1, d])).cross_entropy_loss(
            &labels,
            None::<Tensor>,
            Reduction::Mean,
            IGNORE_INDEX,
            0.0,
        )
    }
}

/// An encoder with the sequence-classification head: transformers'
/// `BertForSequenceClassification`, names `bert.*` (with `bert.pooler.dense.*`) and
/// `classifier.{weight,bias}`. Logits are `classifier(tanh(pooler(h[:, 0])))`.
#[derive(Debug)]
pub struct EncoderForClassification {
    /// The encoder (`bert`).
    pub encoder: Encoder,
    pooler: Affine,
    classifier: Affine,
    num_labels: i64,
}

impl EncoderForClassification {
    /// Builds the model under `root` with `num_labels` classes (1: regression, as transformers),
    /// the blocks' linear layers of kind `kind`, the word table of kind `embedding`, computing in
    /// `compute`.
    pub fn new(
        root: &nn::Path,
        cfg: &EncoderConfig,
        num_labels: i64,
        kind: &LinearKind,
        embedding: &EmbeddingKind,
        compute: Kind,
    ) -> Result<Self> {
        if num_labels < 1 {
            return Err(Error::config(
                "model.num_labels",
                format!("must be positive, got {num_labels}"),
            ));
        }
        let bert = root / "bert";
        let encoder = Encoder::new(&bert, cfg, kind, embedding, compute)?;
        let d = cfg.hidden_size;
        let dense = LinearKind::Dense;
        let pooler = Affine::new(&(&bert / "pooler" / "dense"), d, d, &dense, compute)?;
        let classifier = Affine::new(&(root / "classifier"), d, num_labels, &dense, compute)?;
        Ok(Self {
            encoder,
            pooler,
            classifier,
            num_labels,
        })
    }

    /// Number of classes.
    pub fn num_labels(&self) -> i64 {
        self.num_labels
    }

    /// Class logits `(B, num_labels)`, f32, of token ids `(B, T)` (the first token is the
    /// summary token, `[CLS]`).
    pub fn classify_logits(
        &self,
        ids: &Tensor,
        token_types: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Tensor {
        self.head(&self.encoder.forward(ids, token_types, attention_mask))
    }

    /// Class logits `(B, num_labels)`, f32, of the last block's output `(B, T, d)`.
    pub fn head(&self, hidden: &Tensor) -> Tensor {
        let pooled = self.pooler.forward(&hidden.select(1, 0)).tanh();
        self.classifier.forward(&pooled).to_kind(Kind::Float)
    }

    /// Mean cross-entropy of the logits against class ids `(B,)`; with one label, the mean
    /// squared error against float targets (regression), as transformers.
    pub fn classification_loss(
        &self,
        ids: &Tensor,
        token_types: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        labels: &Tensor,
    ) -> Tensor {
        let logits = self.classify_logits(ids, token_types, attention_mask);
        let labels = labels.to_device(logits.device());
        if self.num_labels == 1 {
            logits
                .squeeze_dim(1)
                .mse_loss(&labels.to_kind(Kind::Float), Reduction::Mean)
        } else {
            logits.cross_entropy_loss(
                &labels.to_kind(Kind::Int64),
                None::<Tensor>,
                Reduction::Mean,
                IGNORE_INDEX,
                0.0,
            )
        }
    }
}

/// The named parts of a head's encoder (`bert.*`), the same for both heads.
macro_rules! encoder_parts {
    ($head:ty) => {
        impl $head {
            /// The blocks' linear layers with their full names
            /// (`bert.encoder.layer.0.attention.self.query`).
            pub fn linears(&self) -> Vec<(String, &dyn Linear)> {
                prefixed("bert", self.encoder.linears())
            }

            /// The linear layers, mutable (to load or replace layers).
            pub fn linears_mut(&mut self) -> Vec<(String, &mut Box<dyn Linear>)> {
                prefixed("bert", self.encoder.linears_mut())
            }

            /// The word tables with their full names (`bert.embeddings.word_embeddings`).
            pub fn tables(&self) -> Vec<(String, &WordEmbedding)> {
                prefixed("bert", self.encoder.tables())
            }

            /// The word tables, mutable (to load them).
            pub fn tables_mut(&mut self) -> Vec<(String, &mut WordEmbedding)> {
                prefixed("bert", self.encoder.tables_mut())
            }

            /// The tensor-train layers (word table, blocks) with their full names.
            pub fn tt_layers(&self) -> Vec<(String, &dyn TtLayer)> {
                prefixed("bert", self.encoder.tt_layers())
            }

            /// The tensor-train layers, mutable (threshold, pruning).
            pub fn tt_layers_mut(&mut self) -> Vec<(String, &mut dyn TtLayer)> {
                prefixed("bert", self.encoder.tt_layers_mut())
            }

            /// The linear layers and the word tables with their full names, mutable (to load
            /// both).
            #[allow(clippy::type_complexity)]
            pub fn weights_mut(
                &mut self,
            ) -> (
                Vec<(String, &mut Box<dyn Linear>)>,
                Vec<(String, &mut WordEmbedding)>,
            ) {
                let (l, t) = self.encoder.weights_mut();
                (prefixed("bert", l), prefixed("bert", t))
            }
        }
    };
}

encoder_parts!(EncoderForMaskedLm);
encoder_parts!(EncoderForClassification);
