//! The encoder's shape, with Hugging Face `BertConfig` field names, its presets and checks.

use frugal_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// Model shape, serialized with Hugging Face's `BertConfig` (`config.json`) field names. Fields
/// of a `config.json` that are not listed here (dropout, `pad_token_id`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncoderConfig {
    /// Vocabulary size (rows of the word embeddings, columns of the masked-LM logits).
    pub vocab_size: i64,
    /// Model width d.
    pub hidden_size: i64,
    /// Number of encoder blocks.
    pub num_hidden_layers: i64,
    /// Attention heads; must divide `hidden_size`.
    pub num_attention_heads: i64,
    /// Width of the feed-forward layer.
    pub intermediate_size: i64,
    /// Longest sequence (rows of the learned position embeddings).
    pub max_position_embeddings: i64,
    /// Number of token types (segments); default 2, as BERT.
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: i64,
    /// LayerNorm epsilon; default 1e-12, as BERT.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Activation of the feed-forward layer and of the masked-LM transform: `gelu` (exact, with
    /// erf; the default, as BERT), or `gelu_new` / `gelu_pytorch_tanh` (the tanh approximation).
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
}

fn default_type_vocab_size() -> i64 {
    2
}

fn default_layer_norm_eps() -> f64 {
    1e-12
}

fn default_hidden_act() -> String {
    "gelu".into()
}

/// Names of the presets [`EncoderConfig::preset`] knows.
pub const PRESETS: &[&str] = &["encoder-tiny", "encoder-small", "encoder-6"];

impl EncoderConfig {
    /// A config with BERT's defaults for the fields not given.
    pub fn new(vocab: i64, d: i64, layers: i64, heads: i64, ffn: i64, max_pos: i64) -> Self {
        Self {
            vocab_size: vocab,
            hidden_size: d,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: ffn,
            max_position_embeddings: max_pos,
            type_vocab_size: default_type_vocab_size(),
            layer_norm_eps: default_layer_norm_eps(),
            hidden_act: default_hidden_act(),
        }
    }

    /// A named preset. As with [`crate::llama::LlamaConfig::preset`], the vocabulary is a
    /// placeholder that the caller replaces with its tokenizer's size (`vocab_size`): the small
    /// presets start from 8192 (the default trained tokenizer), `encoder-6` from BERT's 30522
    /// (the vocabulary of the CoMERA paper's 6-encoder model, before its TT embedding pads it).
    /// - `encoder-tiny`: d 128, 2 layers, 2 heads, ffn 512, 512 positions (tests, quick runs);
    /// - `encoder-small`: d 256, 4 layers, 4 heads, ffn 1024, 512 positions;
    /// - `encoder-6`: d 768, 6 layers, 12 heads, ffn 3072, 512 positions (CoMERA, REFERENCE.md).
    pub fn preset(name: &str) -> Option<Self> {
        Some(match name {
            "encoder-tiny" => Self::new(8192, 128, 2, 2, 512, 512),
            "encoder-small" => Self::new(8192, 256, 4, 4, 1024, 512),
            "encoder-6" => Self::new(30522, 768, 6, 12, 3072, 512),
            _ => return None,
        })
    }

    /// This config with another vocabulary size (a tokenizer's).
    pub fn with_vocab_size(mut self, vocab_size: i64) -> Self {
        self.vocab_size = vocab_size;
        self
    }

    /// Reads a Hugging Face `config.json` (a `BertConfig`), and validates it. A `model_type`
    /// other than `bert` is refused by name ([`crate::hf::expect_family`]; a file without one
    /// is read as a BERT: readers of model folders require it), and so are relative or rotary
    /// position embeddings (`position_embedding_type` other than `absolute`).
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let bad = |r: String| Error::config("config.json", r);
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if v.get("model_type").is_some() {
            crate::hf::expect_family(&v, crate::hf::Family::Bert)?;
        }
        if let Some(kind) = v.get("position_embedding_type").and_then(|t| t.as_str()) {
            if kind != "absolute" {
                return Err(bad(format!(
                    "position_embedding_type {kind:?} is not supported (only \"absolute\")"
                )));
            }
        }
        let cfg: Self = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }

    /// The `approximate` argument of libtorch's GELU for `hidden_act` (`none`: exact).
    pub(crate) fn gelu_approximation(&self) -> Option<&'static str> {
        match self.hidden_act.as_str() {
            "gelu" => Some("none"),
            "gelu_new" | "gelu_pytorch_tanh" => Some("tanh"),
            _ => None,
        }
    }

    /// Checks that the shape is consistent; the error names the field (`model.FIELD`).
    pub fn validate(&self) -> Result<()> {
        let bad = |k: &str, r: String| Err(Error::config(format!("model.{k}"), r));
        for (k, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            if v <= 0 {
                return bad(k, format!("must be positive, got {v}"));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return bad(
                "num_attention_heads",
                format!(
                    "{} heads do not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            );
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return bad(
                "layer_norm_eps",
                format!("must be positive, got {}", self.layer_norm_eps),
            );
        }
        if self.gelu_approximation().is_none() {
            return bad(
                "hidden_act",
                format!(
                    "{:?} is not supported (\"gelu\", \"gelu_new\", \"gelu_pytorch_tanh\")",
                    self.hidden_act
                ),
            );
        }
        Ok(())
    }

    /// Parameters of the embeddings (word, position, token type, LayerNorm).
    pub fn embedding_parameters(&self) -> i64 {
        let d = self.hidden_size;
        (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * d + 2 * d
    }

    /// Parameters of one encoder block (four d x d projections and two feed-forward matrices,
    /// with their biases, and two LayerNorms).
    pub fn block_parameters(&self) -> i64 {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        4 * (d * d + d) + 2 * d * f + f + d + 4 * d
    }

    /// Parameters of the encoder without any head or pooler (embeddings and blocks).
    pub fn num_parameters(&self) -> i64 {
        self.embedding_parameters() + self.num_hidden_layers * self.block_parameters()
    }

    /// Parameters the masked-LM head adds (transform dense and LayerNorm, output bias; the
    /// decoder is tied to the word embeddings).
    pub fn mlm_head_parameters(&self) -> i64 {
        let d = self.hidden_size;
        d * d + d + 2 * d + self.vocab_size
    }

    /// Parameters the classification head adds (pooler dense, classifier).
    pub fn classifier_head_parameters(&self, num_labels: i64) -> i64 {
        let d = self.hidden_size;
        d * d + d + d * num_labels + num_labels
    }
}

#[cfg(test)]
mod tests {
    use super::EncoderConfig;

    #[test]
    fn hf_config_reads_and_ignores_other_fields() {
        let text = r#"{"architectures": ["BertForMaskedLM"], "vocab_size": 64, "hidden_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48,
            "max_position_embeddings": 24, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
            "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "pad_token_id": 0,
            "position_embedding_type": "absolute"}"#;
        let c = EncoderConfig::from_hf_json(text).unwrap();
        assert_eq!(c, EncoderConfig::new(64, 32, 2, 4, 48, 24));
    }

    #[test]
    fn unsupported_features_are_refused_by_name() {
        let rel = r#"{"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 48, "max_position_embeddings": 24,
            "position_embedding_type": "relative_key"}"#;
        let err = EncoderConfig::from_hf_json(rel).unwrap_err().to_string();
        assert!(err.contains("position_embedding_type"), "{err}");
        let relu = rel
            .replace("relative_key", "absolute")
            .replace("\"vocab_size\"", "\"hidden_act\": \"relu\", \"vocab_size\"");
        let err = EncoderConfig::from_hf_json(&relu).unwrap_err().to_string();
        assert!(err.starts_with("model.hidden_act:"), "{err}");
    }

    #[test]
    fn presets_are_valid_and_keep_the_vocabulary_a_parameter() {
        for name in super::PRESETS {
            let c = EncoderConfig::preset(name).unwrap().with_vocab_size(1000);
            c.validate().unwrap();
            assert_eq!(c.vocab_size, 1000);
        }
        assert!(EncoderConfig::preset("bert-huge").is_none());
    }
}
