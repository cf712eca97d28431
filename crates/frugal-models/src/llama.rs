//! A LLaMA-style decoder (Touvron et al. 2023) with Hugging Face's weight names, and the
//! families built on it ([`DecoderType`]: Mistral, Qwen2/2.5, Qwen3, Gemma 1/2/3, Phi-3).
//!
//! Pre-norm blocks: `h = x + attn(rms(x))`, `out = h + mlp(rms(h))`; rotary embeddings in the
//! rotate-half form of HF's `LlamaRotaryEmbedding`; SwiGLU `down(silu(gate(x)) * up(x))`; an
//! `lm_head` of its own or tied to the word table. Grouped-query attention
//! (`num_key_value_heads` dividing `num_attention_heads`: `k_proj`/`v_proj` of width
//! kv_heads · head_dim, each key/value head shared by a group of query heads, and cached once),
//! an explicit `head_dim`, RoPE frequency scaling ([`RopeScaling`]: Llama 3's, linear), and what
//! the families add, each read from their own `config.json` keys and computed as transformers
//! computes it: biases on q/k/v/o and the MLP (held outside the linear layer, so that every
//! layer kind has them), Phi-3's fused `qkv_proj` and `gate_up_proj` (split after the product),
//! per-head q/k norms, sliding-window attention (on every layer, or on
//! Gemma's sliding layers, which may rotate with a base of their own), Gemma's `(1 + w)` norms,
//! √d-scaled embeddings, tanh-GeLU GeGLU, norms after attention and around the MLP, attention
//! scale and soft-capping. Norms, softmax and the residual stream stay in f32; only the linear
//! layers and attention run in the compute kind (f32 or bf16). The word table
//! `model.embed_tokens` is dense or a tensor train ([`EmbeddingKind`], CoMERA's TT-matrix
//! embedding); the output head stays dense.

use crate::embedding::{EmbeddingKind, WordEmbedding};
use crate::linear::{self, Linear, LinearKind};
use frugal_core::Result;
use frugal_tt::TtLayer;
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

/// The Hugging Face decoder families this model computes, by their `model_type`: each is the
/// LLaMA block with what its family adds (see [`LlamaConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecoderType {
    /// `llama` (Llama 1/2/3.x, and the many models saved as `LlamaForCausalLM`).
    #[default]
    Llama,
    /// `mistral`: a LLaMA with a sliding attention window (`sliding_window`).
    Mistral,
    /// `qwen2` (Qwen2, Qwen2.5): biases on q/k/v (not on o).
    Qwen2,
    /// `qwen3`: RMSNorm over each query and key head (`q_norm`, `k_norm`) before RoPE.
    Qwen3,
    /// `gemma`: RMSNorm as `x · (1 + w)`, embeddings scaled by √d, a GeGLU MLP (tanh GeLU),
    /// tied embeddings.
    Gemma,
    /// `gemma2`: Gemma with a norm after attention and around the MLP, attention scaled by
    /// `query_pre_attn_scalar`, attention and final logit soft-capping, and sliding-window
    /// layers between global ones (`layer_types`).
    Gemma2,
    /// `gemma3_text`: Gemma 2 with per-head q/k norms, no soft-capping by default, and a RoPE
    /// base of its own for the sliding layers (`rope_local_base_freq`).
    #[serde(rename = "gemma3_text")]
    Gemma3Text,
    /// `phi3` (Phi-3, Phi-3.5): q/k/v fused into `qkv_proj`, gate and up into
    /// `gate_up_proj`; a sliding window when its `sliding_window` says so; LongRoPE for the
    /// long-context models.
    Phi3,
}

impl DecoderType {
    /// Every decoder type, in the order of [`crate::hf`]'s messages.
    pub const ALL: [DecoderType; 8] = [
        DecoderType::Llama,
        DecoderType::Mistral,
        DecoderType::Qwen2,
        DecoderType::Qwen3,
        DecoderType::Gemma,
        DecoderType::Gemma2,
        DecoderType::Gemma3Text,
        DecoderType::Phi3,
    ];

    /// The `model_type` value.
    pub fn name(self) -> &'static str {
        match self {
            DecoderType::Llama => "llama",
            DecoderType::Mistral => "mistral",
            DecoderType::Qwen2 => "qwen2",
            DecoderType::Qwen3 => "qwen3",
            DecoderType::Gemma => "gemma",
            DecoderType::Gemma2 => "gemma2",
            DecoderType::Gemma3Text => "gemma3_text",
            DecoderType::Phi3 => "phi3",
        }
    }

    /// Gemma 1, 2 or 3: `(1 + w)` norms, √d-scaled embeddings, tanh GeLU.
    pub fn is_gemma(self) -> bool {
        matches!(
            self,
            DecoderType::Gemma | DecoderType::Gemma2 | DecoderType::Gemma3Text
        )
    }

    /// Gemma 2 or 3: the norms after attention and around the MLP, local/global layers.
    pub fn is_gemma2_or_later(self) -> bool {
        matches!(self, DecoderType::Gemma2 | DecoderType::Gemma3Text)
    }

    /// The type of a `model_type` value.
    pub fn of(model_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == model_type)
    }

    /// transformers' class for the causal LM (`architectures`).
    pub fn causal_lm_class(self) -> &'static str {
        match self {
            DecoderType::Llama => "LlamaForCausalLM",
            DecoderType::Mistral => "MistralForCausalLM",
            DecoderType::Qwen2 => "Qwen2ForCausalLM",
            DecoderType::Qwen3 => "Qwen3ForCausalLM",
            DecoderType::Gemma => "GemmaForCausalLM",
            DecoderType::Gemma2 => "Gemma2ForCausalLM",
            DecoderType::Gemma3Text => "Gemma3ForCausalLM",
            DecoderType::Phi3 => "Phi3ForCausalLM",
        }
    }
}

/// Model shape, serialized with Hugging Face's `config.json` field names and the family's
/// `model_type`, so that a written `config.json` names its family and transformers reads it
/// as the same model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// The family (`model_type`): what the block adds to the LLaMA's.
    #[serde(default)]
    pub model_type: DecoderType,
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Model width d.
    pub hidden_size: i64,
    /// SwiGLU inner width.
    pub intermediate_size: i64,
    /// Number of decoder blocks.
    pub num_hidden_layers: i64,
    /// Attention heads.
    pub num_attention_heads: i64,
    /// Key/value heads: equal to the attention heads, or dividing them (grouped-query
    /// attention; 1: multi-query).
    pub num_key_value_heads: i64,
    /// Width of one attention head when it is not `hidden_size / num_attention_heads` (Hugging
    /// Face's `head_dim`; None: that quotient). q/k/v/o are `heads · head_dim` wide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<i64>,
    /// Longest sequence the rotary table covers.
    pub max_position_embeddings: i64,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Rotary base.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// RoPE frequency scaling (None: plain RoPE): Llama 3's or linear; Gemma 3's applies to its
    /// global layers only. Written as Hugging Face's `rope_scaling` with its `rope_type`, which
    /// transformers 4 and 5 both read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// The output head shares the input embedding (no `lm_head.weight` of its own).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v/o (`{proj}.bias`; Hugging Face's `attention_bias`). Qwen2 has biases on
    /// q/k/v and not on o whatever this says ([`LlamaConfig::qkv_bias`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attention_bias: bool,
    /// Biases on gate/up/down (`mlp_bias`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mlp_bias: bool,
    /// Each query attends to at most this many positions, itself included (Mistral's
    /// `sliding_window`: key j is seen from query i when `i - window < j <= i`); None: all
    /// earlier positions. Always written (null too): transformers' Mistral takes 4096 when the
    /// key is absent.
    #[serde(default)]
    pub sliding_window: Option<i64>,
    /// Which layers attend through the window (Gemma 2/3's `layer_types`: `sliding_attention`
    /// or `full_attention`, one per layer); None: every layer does when there is a window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<LayerType>>,
    /// Attention scores scaled by `query_pre_attn_scalar^-1/2` instead of `head_dim^-1/2`
    /// (Gemma 2/3). Always written: transformers' Gemma 2/3 take 256 when the key is absent.
    #[serde(default)]
    pub query_pre_attn_scalar: Option<i64>,
    /// Attention scores `s` become `c · tanh(s / c)` before the mask (Gemma 2: 50). Always
    /// written: transformers' Gemma 2 takes 50 when the key is absent.
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    /// Logits `z` become `c · tanh(z / c)` (Gemma 2: 30). Always written, as above.
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    /// Rotary base of the sliding-window layers (Gemma 3: 10000, while its global layers take
    /// `rope_theta` and the scaling); None: one base for all layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_base_freq: Option<f64>,
    /// Phi-3's pre-training length at the top of `config.json`, kept so that a written file
    /// says it too: transformers' Phi-3 takes it over the one in the RoPE parameters (4096 when
    /// absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<i64>,
}

/// A layer's attention in Gemma 2/3 (`layer_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerType {
    /// Every earlier position.
    FullAttention,
    /// The last `sliding_window` positions.
    SlidingAttention,
}

/// A RoPE frequency scaling (`rope_scaling` / `rope_parameters` by `rope_type`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Llama 3's ([`Llama3Rope`]).
    Llama3(Llama3Rope),
    /// Position interpolation: every inverse frequency divided by `factor` (transformers'
    /// `_compute_linear_scaling_rope_parameters`; Gemma 3 4B and up: 8 on the global layers).
    Linear {
        /// The divisor, at least 1.
        factor: f64,
    },
    /// YaRN ([`YarnRope`]; Qwen2.5's long-context setting, DeepSeek's distilled models).
    Yarn(YarnRope),
    /// LongRoPE ([`LongRope`]; Phi-3 128k, Phi-3.5).
    #[serde(rename = "longrope")]
    LongRope(LongRope),
    /// Dynamic NTK scaling (`rope_type = "dynamic"`): transformers raises the base once a
    /// sequence runs past `max_position_embeddings` (`_compute_dynamic_ntk_parameters`); up to
    /// there, every position Frugal takes, it is plain RoPE.
    Dynamic {
        /// The scaling factor, at least 1 (used past `max_position_embeddings` only).
        factor: f64,
    },
}

/// LongRoPE (Ding et al. 2024, `rope_type = "longrope"`), as transformers computes it: each
/// inverse frequency divided by its own factor, `short_factor` while a sequence is at most
/// `original_max_position_embeddings` long and `long_factor` beyond (the whole sequence
/// switches: a forward pass over positions past it uses the long factors for every position),
/// cos and sin scaled by `attention_factor` (else `sqrt(1 + ln(factor) / ln(L))`, with
/// `factor` the context extension `max_position_embeddings / L`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LongRope {
    /// One divisor per frequency (head_dim / 2) up to `L` positions.
    pub short_factor: Vec<f64>,
    /// One divisor per frequency past `L` positions.
    pub long_factor: Vec<f64>,
    /// The context extension (absent from the file: `max_position_embeddings / L`).
    pub factor: f64,
    /// The scale of cos and sin (None: from `factor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_factor: Option<f64>,
    /// `L`, the context length of pre-training.
    pub original_max_position_embeddings: i64,
}

impl LongRope {
    /// The scale of cos and sin.
    pub fn attention_factor(&self) -> f64 {
        match self.attention_factor {
            Some(a) => a,
            None if self.factor <= 1.0 => 1.0,
            None => {
                let l = self.original_max_position_embeddings as f64;
                (1.0 + self.factor.ln() / l.ln()).sqrt()
            }
        }
    }
}

/// YaRN (Peng et al. 2023, `rope_type = "yarn"`), as transformers' `_compute_yarn_parameters`:
/// the frequencies of the dimensions that turn fewer than `beta_slow` times over `L =
/// original_max_position_embeddings` are interpolated (divided by `factor`), those that turn more
/// than `beta_fast` times kept, a linear ramp between (over dimension indices, the bounds
/// rounded outwards unless `truncate` is false); cos and sin are scaled by the attention factor
/// (`attention_factor`, else `0.1 ln(factor) + 1`, or with `mscale` and `mscale_all_dim` the
/// ratio of those with each).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct YarnRope {
    /// The context extension, at least 1.
    pub factor: f64,
    /// `L`, the context length of pre-training.
    pub original_max_position_embeddings: i64,
    /// The scale of cos and sin (None: from `factor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_factor: Option<f64>,
    /// Rotations above which a dimension is kept (None: 32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_fast: Option<f64>,
    /// Rotations below which a dimension is interpolated (None: 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_slow: Option<f64>,
    /// DeepSeek's numerator scale of the attention factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale: Option<f64>,
    /// DeepSeek's denominator scale of the attention factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale_all_dim: Option<f64>,
    /// Round the ramp's bounds outwards (None: true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<bool>,
}

impl YarnRope {
    /// `0.1 · mscale · ln(scale) + 1` (1 for a scale up to 1), YaRN's Eq. 21.
    fn mscale(scale: f64, mscale: f64) -> f64 {
        if scale <= 1.0 {
            return 1.0;
        }
        0.1 * mscale * scale.ln() + 1.0
    }

    /// The scale of cos and sin.
    pub fn attention_factor(&self) -> f64 {
        if let Some(a) = self.attention_factor {
            return a;
        }
        match (self.mscale, self.mscale_all_dim) {
            (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                Self::mscale(self.factor, m) / Self::mscale(self.factor, all)
            }
            _ => Self::mscale(self.factor, 1.0),
        }
    }

    /// The scaled inverse frequencies of the plain ones `inv_freq` (f32) of base `theta`.
    fn scale(&self, inv_freq: &Tensor, theta: f64) -> Tensor {
        let half = inv_freq.size()[0];
        let dim = (2 * half) as f64;
        let original = self.original_max_position_embeddings as f64;
        let correction = |rotations: f64| {
            dim * (original / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
        };
        let (mut low, mut high) = (
            correction(self.beta_fast.unwrap_or(32.0)),
            correction(self.beta_slow.unwrap_or(1.0)),
        );
        if self.truncate.unwrap_or(true) {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, high) = (low.max(0.0), high.min(dim - 1.0));
        let high = if low == high { high + 0.001 } else { high };
        let ramp = ((Tensor::arange(half, (Kind::Float, inv_freq.device())) - low) / (high - low))
            .clamp(0.0, 1.0);
        let keep = ramp.ones_like() - ramp;
        let interpolated = inv_freq / self.factor;
        &interpolated * (keep.ones_like() - &keep) + inv_freq * &keep
    }
}

impl RopeScaling {
    /// Checks the factors; the error names the key (`rope_scaling.factor`, ...).
    pub fn validate(&self) -> Result<(), frugal_core::Error> {
        let bad =
            |k: &str, r: String| Err(frugal_core::Error::config(format!("rope_scaling.{k}"), r));
        match self {
            RopeScaling::Llama3(r) => r.validate(),
            RopeScaling::Yarn(y) if y.factor.is_nan() || y.factor < 1.0 => {
                bad("factor", format!("must be at least 1, got {}", y.factor))
            }
            RopeScaling::Yarn(y) if y.original_max_position_embeddings <= 0 => bad(
                "original_max_position_embeddings",
                format!(
                    "must be positive, got {}",
                    y.original_max_position_embeddings
                ),
            ),
            RopeScaling::Yarn(y)
                if !(y.attention_factor().is_finite() && y.attention_factor() > 0.0) =>
            {
                bad(
                    "attention_factor",
                    format!("must be positive, got {}", y.attention_factor()),
                )
            }
            RopeScaling::Yarn(_) => Ok(()),
            RopeScaling::LongRope(r) if r.original_max_position_embeddings <= 1 => bad(
                "original_max_position_embeddings",
                format!("must exceed 1, got {}", r.original_max_position_embeddings),
            ),
            RopeScaling::LongRope(r)
                if r.short_factor.len() != r.long_factor.len()
                    || r.short_factor
                        .iter()
                        .chain(&r.long_factor)
                        .any(|f| !(*f > 0.0)) =>
            {
                bad(
                    "long_factor",
                    format!(
                        "short_factor and long_factor must be positive and as many ({} and {})",
                        r.short_factor.len(),
                        r.long_factor.len()
                    ),
                )
            }
            RopeScaling::LongRope(r)
                if !(r.attention_factor().is_finite() && r.attention_factor() > 0.0) =>
            {
                bad(
                    "attention_factor",
                    format!("must be positive, got {}", r.attention_factor()),
                )
            }
            RopeScaling::LongRope(_) => Ok(()),
            RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor }
                if factor.is_nan() || *factor < 1.0 =>
            {
                Err(frugal_core::Error::config(
                    "rope_scaling.factor",
                    format!("must be at least 1, got {factor}"),
                ))
            }
            RopeScaling::Linear { .. } | RopeScaling::Dynamic { .. } => Ok(()),
        }
    }

    /// The scaled inverse frequencies of the plain ones `inv_freq` (f32) of base `theta`.
    pub fn scale(&self, inv_freq: &Tensor, theta: f64) -> Tensor {
        match self {
            RopeScaling::Llama3(r) => r.scale(inv_freq),
            RopeScaling::Linear { factor } => inv_freq / *factor,
            RopeScaling::Yarn(y) => y.scale(inv_freq, theta),
            RopeScaling::LongRope(r) => long_rope_scale(inv_freq, &r.short_factor),
            RopeScaling::Dynamic { .. } => inv_freq.shallow_clone(),
        }
    }

    /// The scale of the rotary tables' cos and sin (YaRN's and LongRoPE's attention factor; 1
    /// otherwise).
    pub fn attention_factor(&self) -> f64 {
        match self {
            RopeScaling::Yarn(y) => y.attention_factor(),
            RopeScaling::LongRope(r) => r.attention_factor(),
            _ => 1.0,
        }
    }

    /// LongRoPE's pre-training length, past which a sequence takes the long factors.
    pub fn long_after(&self) -> Option<i64> {
        match self {
            RopeScaling::LongRope(r) => Some(r.original_max_position_embeddings),
            _ => None,
        }
    }
}

/// Inverse frequencies `inv_freq` divided by LongRoPE's `factors`, one each.
fn long_rope_scale(inv_freq: &Tensor, factors: &[f64]) -> Tensor {
    let f = Tensor::from_slice(factors)
        .to_kind(Kind::Float)
        .to_device(inv_freq.device());
    inv_freq / f
}

/// Llama 3's RoPE scaling (`rope_type = "llama3"`, Llama 3.1 and later): the rotary inverse
/// frequencies `f` of wavelength `λ = 2π / f` above `L / low_freq_factor` are divided by
/// `factor`, those below `L / high_freq_factor` kept, and those between interpolated with
/// `s = (L / λ - low_freq_factor) / (high_freq_factor - low_freq_factor)` as
/// `(1 - s) f / factor + s f`, where `L = original_max_position_embeddings` (transformers'
/// `_compute_llama3_parameters`; Meta's `apply_scaling` in llama3's reference code).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3Rope {
    /// Divisor of the low frequencies (8 in Llama 3.1).
    pub factor: f64,
    /// Wavelengths above `L / low_freq_factor` are scaled (1 in Llama 3.1).
    pub low_freq_factor: f64,
    /// Wavelengths below `L / high_freq_factor` are kept (4 in Llama 3.1).
    pub high_freq_factor: f64,
    /// `L`, the context length of pre-training (8192 in Llama 3.1).
    pub original_max_position_embeddings: i64,
}

impl Llama3Rope {
    /// Checks the factors; the error names the key (`rope_scaling.factor`, ...).
    pub fn validate(&self) -> Result<(), frugal_core::Error> {
        let bad =
            |k: &str, r: String| Err(frugal_core::Error::config(format!("rope_scaling.{k}"), r));
        if self.factor.is_nan() || self.factor < 1.0 {
            return bad("factor", format!("must be at least 1, got {}", self.factor));
        }
        if !(self.low_freq_factor > 0.0 && self.high_freq_factor > self.low_freq_factor) {
            return bad(
                "high_freq_factor",
                format!(
                    "must exceed low_freq_factor > 0, got {} and {}",
                    self.high_freq_factor, self.low_freq_factor
                ),
            );
        }
        if self.original_max_position_embeddings <= 0 {
            return bad(
                "original_max_position_embeddings",
                format!(
                    "must be positive, got {}",
                    self.original_max_position_embeddings
                ),
            );
        }
        Ok(())
    }

    /// The scaled inverse frequencies of the plain ones `inv_freq` (f32), as transformers
    /// computes them (same operations, same order, in f32).
    pub fn scale(&self, inv_freq: &Tensor) -> Tensor {
        let old = self.original_max_position_embeddings as f64;
        let (low, high) = (self.low_freq_factor, self.high_freq_factor);
        let (low_wavelen, high_wavelen) = (old / low, old / high);
        let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
        let scaled = inv_freq / self.factor;
        let f = scaled.where_self(&wavelen.gt(low_wavelen), inv_freq);
        let smooth = ((wavelen.reciprocal() * old) - low) / (high - low);
        let smoothed = (smooth.ones_like() - &smooth) * &f / self.factor + &smooth * &f;
        let medium = wavelen
            .lt(high_wavelen)
            .logical_not()
            .logical_and(&wavelen.gt(low_wavelen).logical_not());
        smoothed.where_self(&medium, &f)
    }
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_rope_theta() -> f64 {
    10000.0
}

/// Names of the presets [`LlamaConfig::preset`] knows.
pub const PRESETS: &[&str] = &["tiny", "60m", "130m", "350m", "1b", "7b"];

impl LlamaConfig {
    fn new(vocab: i64, d: i64, layers: i64, heads: i64, ffn: i64, max_pos: i64) -> Self {
        Self {
            vocab_size: vocab,
            hidden_size: d,
            intermediate_size: ffn,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: heads,
            head_dim: None,
            max_position_embeddings: max_pos,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_scaling: None,
            tie_word_embeddings: false,
            model_type: DecoderType::Llama,
            attention_bias: false,
            mlp_bias: false,
            sliding_window: None,
            layer_types: None,
            query_pre_attn_scalar: None,
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            rope_local_base_freq: None,
            original_max_position_embeddings: None,
        }
    }

    /// The attention window of layer `i`: `sliding_window` for a sliding layer (every layer
    /// without `layer_types`), None for a global one.
    pub fn window_of(&self, i: usize) -> Option<i64> {
        match self.layer_types.as_ref().and_then(|t| t.get(i)) {
            Some(LayerType::FullAttention) => None,
            _ => self.sliding_window,
        }
    }

    /// Whether layer `i` rotates with the local base ([`LlamaConfig::rope_local_base_freq`]).
    fn local_rope(&self, i: usize) -> bool {
        self.rope_local_base_freq.is_some() && self.window_of(i).is_some()
    }

    /// An RMSNorm of width `d` under `path` as the family has it: Gemma's gain `1 + w`, the
    /// others' `w`.
    fn norm(&self, path: &nn::Path, d: i64) -> RmsNorm {
        let offset = if self.model_type.is_gemma() { 1.0 } else { 0.0 };
        RmsNorm::with_offset(path, d, self.rms_norm_eps, offset)
    }

    /// Whether q/k/v have biases: `attention_bias`, or always for Qwen2.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type == DecoderType::Qwen2
    }

    /// Whether o has a bias: `attention_bias`, never for Qwen2.
    pub fn o_bias(&self) -> bool {
        self.attention_bias && self.model_type != DecoderType::Qwen2
    }

    /// Whether each query and key head is RMS-normalized before RoPE (`q_norm`, `k_norm`:
    /// Qwen3, Gemma 3).
    pub fn qk_norm(&self) -> bool {
        matches!(
            self.model_type,
            DecoderType::Qwen3 | DecoderType::Gemma3Text
        )
    }

    /// A named preset: `tiny` (tests and the default run), and the configs of Lialin et al. used
    /// by GaLore (60M ... 7B, 32000-token vocabulary; see REFERENCE.md).
    pub fn preset(name: &str) -> Option<Self> {
        Some(match name {
            "tiny" => Self::new(8192, 256, 4, 4, 688, 512),
            "60m" => Self::new(32000, 512, 8, 8, 1376, 1024),
            "130m" => Self::new(32000, 768, 12, 12, 2048, 1024),
            "350m" => Self::new(32000, 1024, 24, 16, 2736, 1024),
            "1b" => Self::new(32000, 2048, 24, 32, 5461, 1024),
            "7b" => Self::new(32000, 4096, 32, 32, 11008, 2048),
            _ => return None,
        })
    }

    /// Reads a Hugging Face `config.json` of a decoder family this model computes
    /// ([`DecoderType`]). Any other type is refused by
    /// name ([`crate::hf::expect_decoder`]), and so is every key whose value would change the
    /// outputs in a way this model does not compute ([`crate::hf::check_decoder_keys`]:
    /// another activation, a RoPE type other than the default and `llama3`, a setting of
    /// another family...). Grouped-query attention (`num_key_value_heads`), an explicit
    /// `head_dim`, Llama 3's RoPE scaling, biases (`attention_bias`, `mlp_bias`, Qwen2's q/k/v)
    /// and Mistral's `sliding_window` are read. transformers 5 keeps the rotary base and
    /// scaling under `rope_parameters`, older files under `rope_theta` and `rope_scaling`.
    /// Errors name the key (`model_type: ...`, `hidden_act: ...`, `rope_parameters.factor:
    /// ...`).
    pub fn from_hf_json(text: &str) -> Result<Self, frugal_core::Error> {
        let bad = |r: String| frugal_core::Error::config("config.json", r);
        let mut v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let ty = crate::hf::expect_decoder(&v)?;
        crate::hf::check_decoder_keys(&v, ty)?;
        let rope = crate::hf::rope(&v, ty)?;
        let window = crate::hf::sliding_window(&v, ty)?;
        let gemma = crate::hf::gemma_settings(&v, ty)?;
        let obj = v.as_object_mut().expect("checked: an object");
        for key in [
            "rope_parameters",
            "rope_scaling",
            "rope_theta",
            "sliding_window",
            "layer_types",
            "query_pre_attn_scalar",
            "attn_logit_softcapping",
            "final_logit_softcapping",
            "rope_local_base_freq",
        ] {
            obj.remove(key);
        }
        if ty == DecoderType::Qwen2 {
            // transformers' Qwen2 has its q/k/v biases whatever the key says, and no o bias.
            obj.remove("attention_bias");
        }
        if ty.is_gemma() && obj.get("tie_word_embeddings").is_none_or(|t| t.is_null()) {
            // transformers' Gemma ties when the key is absent.
            obj.insert("tie_word_embeddings".into(), true.into());
        }
        if v.get("num_key_value_heads").is_none_or(|k| k.is_null()) {
            v["num_key_value_heads"] = v["num_attention_heads"].clone();
        }
        let mut cfg: Self = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
        cfg.rope_theta = rope.theta;
        cfg.rope_scaling = rope.scaling;
        cfg.rope_local_base_freq = rope.local_theta;
        cfg.sliding_window = window;
        cfg.layer_types = gemma.layer_types;
        cfg.query_pre_attn_scalar = gemma.query_pre_attn_scalar;
        cfg.attn_logit_softcapping = gemma.attn_logit_softcapping;
        cfg.final_logit_softcapping = gemma.final_logit_softcapping;
        cfg.original_max_position_embeddings = match (&cfg.rope_scaling, ty) {
            (Some(RopeScaling::LongRope(l)), DecoderType::Phi3) => {
                Some(l.original_max_position_embeddings)
            }
            _ => None,
        };
        // A head_dim equal to hidden_size / num_attention_heads is no explicit width
        // (transformers 5 writes it always): kept implicit, it follows a `model.num_heads`
        // override as it would in transformers.
        if cfg
            .head_dim
            .is_some_and(|h| h * cfg.num_attention_heads == cfg.hidden_size)
        {
            cfg.head_dim = None;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// [`LlamaConfig::from_hf_json`] of the file `path`; errors are one line that starts with
    /// the file (`DIR/config.json: attention_bias: ...`).
    pub fn from_hf_file(path: &std::path::Path) -> Result<Self, frugal_core::Error> {
        let text = std::fs::read_to_string(path).map_err(|e| frugal_core::Error::io(path, e))?;
        Self::from_hf_json(&text)
            .map_err(|e| frugal_core::Error::Msg(format!("{}: {e}", path.display())))
    }

    /// Width of one attention head: `head_dim` when given, else `hidden_size / heads`.
    pub fn head_dim(&self) -> i64 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Width of the queries (and of `o_proj`'s input): heads · head_dim.
    pub fn q_width(&self) -> i64 {
        self.num_attention_heads * self.head_dim()
    }

    /// Width of the keys and of the values (`k_proj`, `v_proj` outputs): kv_heads · head_dim.
    pub fn kv_width(&self) -> i64 {
        self.num_key_value_heads * self.head_dim()
    }

    /// Checks that the shape is consistent; the error names the field.
    pub fn validate(&self) -> Result<(), frugal_core::Error> {
        let bad = |k: &str, r: String| Err(frugal_core::Error::config(format!("model.{k}"), r));
        for (k, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v <= 0 {
                return bad(k, format!("must be positive, got {v}"));
            }
        }
        match self.head_dim {
            Some(h) if h <= 0 || h % 2 != 0 => {
                return bad("head_dim", format!("must be positive and even, got {h}"));
            }
            Some(_) => {}
            None if self.hidden_size % self.num_attention_heads != 0
                || self.head_dim() % 2 != 0 =>
            {
                return bad(
                    "num_attention_heads",
                    format!(
                        "hidden_size {} must split into {} heads of even width",
                        self.hidden_size, self.num_attention_heads
                    ),
                );
            }
            None => {}
        }
        let (h, kv) = (self.num_attention_heads, self.num_key_value_heads);
        if kv <= 0 || h % kv != 0 {
            return bad(
                "num_key_value_heads",
                format!(
                    "{kv} must be positive and divide num_attention_heads {h} (each key/value \
                     head serves a group of query heads)"
                ),
            );
        }
        if let Some(r) = &self.rope_scaling {
            r.validate()?;
            if let RopeScaling::LongRope(l) = r {
                if l.short_factor.len() as i64 * 2 != self.head_dim() {
                    return bad(
                        "rope_scaling.short_factor",
                        format!(
                            "has {} factors; LongRoPE takes one per frequency, head_dim / 2 = {}",
                            l.short_factor.len(),
                            self.head_dim() / 2
                        ),
                    );
                }
            }
        }
        if let Some(w) = self.sliding_window.filter(|w| *w <= 0) {
            return bad("sliding_window", format!("must be positive, got {w}"));
        }
        if let Some(t) = self.layer_types.as_ref() {
            if t.len() as i64 != self.num_hidden_layers {
                return bad(
                    "layer_types",
                    format!("{} entries for {} layers", t.len(), self.num_hidden_layers),
                );
            }
        }
        if let Some(q) = self.query_pre_attn_scalar.filter(|q| *q <= 0) {
            return bad(
                "query_pre_attn_scalar",
                format!("must be positive, got {q}"),
            );
        }
        for (k, v) in [
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("final_logit_softcapping", self.final_logit_softcapping),
            ("rope_local_base_freq", self.rope_local_base_freq),
        ] {
            if let Some(v) = v.filter(|v| !(*v > 0.0 && v.is_finite())) {
                return bad(k, format!("must be positive, got {v}"));
            }
        }
        Ok(())
    }

    /// Number of parameters.
    pub fn num_parameters(&self) -> i64 {
        let d = self.hidden_size;
        let attention = 2 * d * self.q_width() + 2 * d * self.kv_width();
        let biases = i64::from(self.qkv_bias()) * (self.q_width() + 2 * self.kv_width())
            + i64::from(self.o_bias()) * d
            + i64::from(self.mlp_bias) * (2 * self.intermediate_size + d);
        let qk_norms = i64::from(self.qk_norm()) * 2 * self.head_dim();
        let norms = if self.model_type.is_gemma2_or_later() {
            4
        } else {
            2
        } * d;
        let block = attention + 3 * d * self.intermediate_size + norms + biases + qk_norms;
        let tables = if self.tie_word_embeddings { 1 } else { 2 };
        tables * self.vocab_size * d + self.num_hidden_layers * block + d
    }

    /// Checks that a word table of kind `embedding` fits this shape: a tensor-train table
    /// cannot be the tied output head (`tie_word_embeddings`); the error names
    /// `model.embedding`.
    pub fn check_embedding(&self, embedding: &EmbeddingKind) -> Result<(), frugal_core::Error> {
        if self.tie_word_embeddings && *embedding != EmbeddingKind::Dense {
            return Err(frugal_core::Error::config(
                "model.embedding",
                "a tensor-train word table cannot be the tied output head of a model with \
                 tie_word_embeddings = true (the head would rebuild the whole table every \
                 step); use a dense table or an untied model",
            ));
        }
        Ok(())
    }
}

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * w`, computed in f32; Gemma's stores `w - 1` (its gain
/// is `1 + w`, the variable initialised to zero).
#[derive(Debug)]
pub struct RmsNorm {
    /// Per-feature gain (less the offset), initialised to one (zero with an offset of one).
    pub weight: Tensor,
    eps: f64,
    /// Added to the weight: 0, or Gemma's 1.
    offset: f64,
}

impl RmsNorm {
    /// A norm of width `d` under `path` (`path.weight`, ones).
    pub fn new(path: &nn::Path, d: i64, eps: f64) -> Self {
        Self::with_offset(path, d, eps, 0.0)
    }

    /// A norm whose gain is `offset + w` (Gemma: 1), `w` initialised to `1 - offset`.
    pub fn with_offset(path: &nn::Path, d: i64, eps: f64, offset: f64) -> Self {
        Self {
            weight: path.var("weight", &[d], nn::Init::Const(1.0 - offset)),
            eps,
            offset,
        }
    }

    /// Normalizes over the last dimension; the result is f32.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = x.to_kind(Kind::Float);
        let var = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let gain = self.weight.to_kind(Kind::Float);
        let gain = match self.offset {
            0.0 => gain,
            o => gain + o,
        };
        (x * (var + self.eps).rsqrt()) * gain
    }
}

/// Keys and values of earlier positions, per layer, for incremental decoding.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// The ids seen so far, for a LongRoPE model: a sequence that grows past the pre-training
    /// length is computed again from them with the long factors, as transformers' Phi-3 does.
    ids: Option<Tensor>,
}

impl KvCache {
    /// Number of positions cached so far.
    pub fn len(&self) -> i64 {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.size()[2])
    }

    /// Number of key/value heads cached per layer (the model's `num_key_value_heads`, not its
    /// query heads); 0 when nothing is cached.
    pub fn kv_heads(&self) -> i64 {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.size()[1])
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The query, key and value projections: three layers, or Phi-3's one (`qkv_proj`, its output
/// the queries, then the keys, then the values).
#[derive(Debug)]
enum Qkv {
    Separate {
        q_proj: Box<dyn Linear>,
        k_proj: Box<dyn Linear>,
        v_proj: Box<dyn Linear>,
    },
    Fused(Box<dyn Linear>),
}

/// The MLP's gate and up projections: two layers, or Phi-3's one (`gate_up_proj`, its output
/// the gate, then the up projection).
#[derive(Debug)]
enum GateUp {
    Separate {
        gate_proj: Box<dyn Linear>,
        up_proj: Box<dyn Linear>,
    },
    Fused(Box<dyn Linear>),
}

#[derive(Debug)]
struct Attention {
    qkv: Qkv,
    o_proj: Box<dyn Linear>,
    /// Biases of q, k, v (`{proj}.bias`), when the family has them.
    qkv_bias: Option<[Tensor; 3]>,
    /// Bias of o.
    o_bias: Option<Tensor>,
    /// RMSNorm over each query head and each key head (`q_norm`, `k_norm`; Qwen3).
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    /// This layer's attention window ([`LlamaConfig::window_of`]).
    window: Option<i64>,
    /// The score scale when not `head_dim^-1/2` (`query_pre_attn_scalar^-1/2`).
    scale: Option<f64>,
    /// Attention soft-capping ([`LlamaConfig::attn_logit_softcapping`]).
    softcap: Option<f64>,
    /// Rotates with the local tables ([`LlamaConfig::rope_local_base_freq`]).
    local_rope: bool,
}

impl Attention {
    /// Keys or values `(B, kv_heads, T, hd)` repeated to `(B, heads, T, hd)`: query head `i`
    /// reads key/value head `i / (heads / kv_heads)`, as transformers' `repeat_kv`.
    fn repeat_kv(&self, x: Tensor) -> Tensor {
        let group = self.heads / self.kv_heads;
        if group == 1 {
            return x;
        }
        let (b, kv, t, hd) = x.size4().expect("(batch, kv heads, time, head width)");
        x.unsqueeze(2)
            .expand([b, kv, group, t, hd], false)
            .reshape([b, kv * group, t, hd])
    }
}

#[derive(Debug)]
struct Mlp {
    gate_up: GateUp,
    down_proj: Box<dyn Linear>,
    /// Biases of gate, up, down (`mlp_bias`).
    bias: Option<[Tensor; 3]>,
    /// GeGLU with the tanh GeLU (Gemma) instead of SwiGLU.
    gelu: bool,
}

/// `layer(x)`, plus `bias` (a variable of the model, in f32) when there is one, in the layer's
/// compute kind: the bias stays outside the layer, so that every kind of layer (dense,
/// quantized, adapted) has it as transformers' and PEFT's layers do (PEFT adds its adapters'
/// terms to the biased base output; DoRA scales the unbiased part only).
fn biased(layer: &dyn Linear, bias: Option<&Tensor>, x: &Tensor) -> Tensor {
    let y = layer.forward(x);
    match bias {
        Some(b) => &y + b.to_kind(y.kind()),
        None => y,
    }
}

/// A bias of width `n` under `path` (`path.bias`, zeros).
fn bias_var(path: nn::Path, n: i64) -> Tensor {
    path.var("bias", &[n], nn::Init::Const(0.0))
}

/// One decoder block.
#[derive(Debug)]
pub struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    /// Before the MLP; in Gemma 2/3, on the attention's output before the residual sum.
    post_attention_layernorm: RmsNorm,
    /// Gemma 2/3's norms before and after the MLP (`pre_feedforward_layernorm`,
    /// `post_feedforward_layernorm`).
    feedforward_norms: Option<(RmsNorm, RmsNorm)>,
    mlp: Mlp,
}

/// Rotary tables `cos`, `sin` of shape `(max_pos, head_dim)` with base `theta` and frequency
/// scaling `scaling`.
fn rotary_tables(
    cfg: &LlamaConfig,
    theta: f64,
    scaling: Option<&RopeScaling>,
    device: tch::Device,
) -> (Tensor, Tensor) {
    let hd = cfg.head_dim();
    let opts = (Kind::Float, device);
    let exponents = Tensor::arange_start_step(0, hd, 2, opts) / hd as f64;
    let inv_freq = Tensor::from(theta)
        .to_device(device)
        .pow(&exponents)
        .reciprocal();
    let inv_freq = match scaling {
        Some(r) => r.scale(&inv_freq, theta),
        None => inv_freq,
    };
    let t = Tensor::arange(cfg.max_position_embeddings, opts);
    let freqs = t.outer(&inv_freq);
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    match scaling.map_or(1.0, RopeScaling::attention_factor) {
        1.0 => (emb.cos(), emb.sin()),
        a => (emb.cos() * a, emb.sin() * a),
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[&x2.neg(), &x1], -1)
}

impl Block {
    fn new(
        path: &nn::Path,
        i: usize,
        cfg: &LlamaConfig,
        kind: &LinearKind,
        compute: Kind,
    ) -> Result<Self> {
        let d = cfg.hidden_size;
        let f = cfg.intermediate_size;
        let a = path / "self_attn";
        let m = path / "mlp";
        let any_bias = cfg.qkv_bias() || cfg.o_bias() || cfg.mlp_bias;
        if any_bias && matches!(kind, LinearKind::Tt { .. }) {
            let key = match cfg.mlp_bias && !cfg.qkv_bias() {
                true => "mlp_bias",
                false if cfg.model_type == DecoderType::Qwen2 => "model_type",
                false => "attention_bias",
            };
            return Err(frugal_core::Error::config(
                "model.linear",
                format!(
                    "a tensor-train layer has no bias, and this {} model has biases ({key}); \
                     use dense, quantized or adapter layers",
                    cfg.model_type.name()
                ),
            ));
        }
        let lin = |p: nn::Path, i, o| linear::build(&p, i, o, kind, compute);
        let (q, kv) = (cfg.q_width(), cfg.kv_width());
        let qkv_bias = cfg.qkv_bias().then(|| {
            [("q_proj", q), ("k_proj", kv), ("v_proj", kv)].map(|(n, w)| bias_var(&a / n, w))
        });
        let mlp_bias = cfg.mlp_bias.then(|| {
            [("gate_proj", f), ("up_proj", f), ("down_proj", d)].map(|(n, w)| bias_var(&m / n, w))
        });
        let hd = cfg.head_dim();
        let norm = |p: nn::Path, w: i64| cfg.norm(&p, w);
        let qk_norm = cfg
            .qk_norm()
            .then(|| (norm(&a / "q_norm", hd), norm(&a / "k_norm", hd)));
        let feedforward_norms = cfg.model_type.is_gemma2_or_later().then(|| {
            (
                norm(path / "pre_feedforward_layernorm", d),
                norm(path / "post_feedforward_layernorm", d),
            )
        });
        let fused = cfg.model_type == DecoderType::Phi3;
        let qkv = match fused {
            true => Qkv::Fused(lin(&a / "qkv_proj", d, q + 2 * kv)?),
            false => Qkv::Separate {
                q_proj: lin(&a / "q_proj", d, q)?,
                k_proj: lin(&a / "k_proj", d, kv)?,
                v_proj: lin(&a / "v_proj", d, kv)?,
            },
        };
        let gate_up = match fused {
            true => GateUp::Fused(lin(&m / "gate_up_proj", d, 2 * f)?),
            false => GateUp::Separate {
                gate_proj: lin(&m / "gate_proj", d, f)?,
                up_proj: lin(&m / "up_proj", d, f)?,
            },
        };
        Ok(Self {
            input_layernorm: norm(path / "input_layernorm", d),
            self_attn: Attention {
                qkv,
                o_proj: lin(&a / "o_proj", q, d)?,
                qkv_bias,
                o_bias: cfg.o_bias().then(|| bias_var(&a / "o_proj", d)),
                qk_norm,
                heads: cfg.num_attention_heads,
                kv_heads: cfg.num_key_value_heads,
                head_dim: hd,
                window: cfg.window_of(i),
                scale: cfg.query_pre_attn_scalar.map(|s| (s as f64).powf(-0.5)),
                softcap: cfg.attn_logit_softcapping,
                local_rope: cfg.local_rope(i),
            },
            post_attention_layernorm: norm(path / "post_attention_layernorm", d),
            feedforward_norms,
            mlp: Mlp {
                gate_up,
                down_proj: lin(&m / "down_proj", f, d)?,
                bias: mlp_bias,
                gelu: cfg.model_type.is_gemma(),
            },
        })
    }

    /// The block's linear layers with their names relative to the block
    /// (`self_attn.q_proj`, ..., `mlp.down_proj`; Phi-3's `self_attn.qkv_proj`,
    /// `self_attn.o_proj`, `mlp.gate_up_proj`, `mlp.down_proj`).
    pub fn linears(&self) -> Vec<(&'static str, &dyn Linear)> {
        let (a, m) = (&self.self_attn, &self.mlp);
        let mut v: Vec<(&'static str, &dyn Linear)> = match &a.qkv {
            Qkv::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => vec![
                ("self_attn.q_proj", q_proj.as_ref()),
                ("self_attn.k_proj", k_proj.as_ref()),
                ("self_attn.v_proj", v_proj.as_ref()),
            ],
            Qkv::Fused(qkv) => vec![("self_attn.qkv_proj", qkv.as_ref())],
        };
        v.push(("self_attn.o_proj", a.o_proj.as_ref()));
        match &m.gate_up {
            GateUp::Separate { gate_proj, up_proj } => {
                v.push(("mlp.gate_proj", gate_proj.as_ref()));
                v.push(("mlp.up_proj", up_proj.as_ref()));
            }
            GateUp::Fused(gate_up) => v.push(("mlp.gate_up_proj", gate_up.as_ref())),
        }
        v.push(("mlp.down_proj", m.down_proj.as_ref()));
        v
    }

    /// [`Block::linears`], mutable.
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Box<dyn Linear>)> {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        let mut v: Vec<(&'static str, &mut Box<dyn Linear>)> = match &mut a.qkv {
            Qkv::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => vec![
                ("self_attn.q_proj", q_proj),
                ("self_attn.k_proj", k_proj),
                ("self_attn.v_proj", v_proj),
            ],
            Qkv::Fused(qkv) => vec![("self_attn.qkv_proj", qkv)],
        };
        v.push(("self_attn.o_proj", &mut a.o_proj));
        match &mut m.gate_up {
            GateUp::Separate { gate_proj, up_proj } => {
                v.push(("mlp.gate_proj", gate_proj));
                v.push(("mlp.up_proj", up_proj));
            }
            GateUp::Fused(gate_up) => v.push(("mlp.gate_up_proj", gate_up)),
        }
        v.push(("mlp.down_proj", &mut m.down_proj));
        v
    }

    /// `x` is the f32 residual stream `(B, T, d)`; `cos`, `sin` are the rows of positions
    /// `start..start+T`. The cache holds the keys and values of the kv_heads (after RoPE),
    /// not of every query head; each is repeated for its group of query heads only for the
    /// product (transformers' `repeat_kv`).
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Tensor {
        let (b, t, _) = x.size3().expect("(batch, time, width)");
        let at = &self.self_attn;
        let h = self.input_layernorm.forward(x);
        let heads = |y: Tensor, heads: i64| y.reshape([b, t, heads, at.head_dim]);
        let (q, k, v) = match &at.qkv {
            Qkv::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => {
                let bias = at.qkv_bias.as_ref();
                (
                    biased(q_proj.as_ref(), bias.map(|b| &b[0]), &h),
                    biased(k_proj.as_ref(), bias.map(|b| &b[1]), &h),
                    biased(v_proj.as_ref(), bias.map(|b| &b[2]), &h),
                )
            }
            Qkv::Fused(qkv) => {
                let y = qkv.forward(&h);
                let (qw, kvw) = (at.heads * at.head_dim, at.kv_heads * at.head_dim);
                (
                    y.narrow(-1, 0, qw),
                    y.narrow(-1, qw, kvw),
                    y.narrow(-1, qw + kvw, kvw),
                )
            }
        };
        let (q, k, v) = (
            heads(q, at.heads),
            heads(k, at.kv_heads),
            heads(v, at.kv_heads),
        );
        let (q, k) = match &at.qk_norm {
            Some((qn, kn)) => (
                qn.forward(&q).to_kind(q.kind()),
                kn.forward(&k).to_kind(k.kind()),
            ),
            None => (q, k),
        };
        let (q, k, v) = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2));
        let (cos, sin) = (cos.to_kind(q.kind()), sin.to_kind(q.kind()));
        let q = &q * &cos + rotate_half(&q) * &sin;
        let k = &k * &cos + rotate_half(&k) * &sin;
        let (k, v, past) = match cache {
            Some(slot) => {
                let (k, v, past) = match slot.take() {
                    Some((pk, pv)) => {
                        let past = pk.size()[2];
                        (Tensor::cat(&[pk, k], 2), Tensor::cat(&[pv, v], 2), past)
                    }
                    None => (k, v, 0),
                };
                *slot = Some((k.shallow_clone(), v.shallow_clone()));
                (k, v, past)
            }
            None => (k, v, 0),
        };
        let (k, v) = (at.repeat_kv(k), at.repeat_kv(v));
        let y = match at.softcap {
            None => {
                let (mask, causal) = attention_mask(t, past, at.window, x.device());
                Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, causal, at.scale, false)
            }
            Some(cap) => {
                let mask = explicit_mask(t, past, at.window, x.device());
                let scale = at.scale.unwrap_or((at.head_dim as f64).powf(-0.5));
                capped_attention(&q, &k, &v, &mask, scale, cap)
            }
        };
        let y = y
            .transpose(1, 2)
            .contiguous()
            .view([b, t, at.heads * at.head_dim]);
        let attended = biased(at.o_proj.as_ref(), at.o_bias.as_ref(), &y).to_kind(Kind::Float);
        let mb = self.mlp.bias.as_ref();
        let mlp = |h: &Tensor| {
            let (gate, up) = match &self.mlp.gate_up {
                GateUp::Separate { gate_proj, up_proj } => (
                    biased(gate_proj.as_ref(), mb.map(|b| &b[0]), h),
                    biased(up_proj.as_ref(), mb.map(|b| &b[1]), h),
                ),
                GateUp::Fused(gate_up) => {
                    let y = gate_up.forward(h);
                    let f = y.size()[y.dim() - 1] / 2;
                    (y.narrow(-1, 0, f), y.narrow(-1, f, f))
                }
            };
            let gate = match self.mlp.gelu {
                true => gate.gelu("tanh"),
                false => gate.silu(),
            };
            biased(self.mlp.down_proj.as_ref(), mb.map(|b| &b[2]), &(gate * up))
                .to_kind(Kind::Float)
        };
        match &self.feedforward_norms {
            None => {
                let x = x + attended;
                let h = self.post_attention_layernorm.forward(&x);
                &x + mlp(&h)
            }
            Some((pre, post)) => {
                let x = x + self.post_attention_layernorm.forward(&attended);
                let h = pre.forward(&x);
                &x + post.forward(&mlp(&h))
            }
        }
    }
}

/// Attention with soft-capped scores (Gemma 2), as transformers' eager attention computes it:
/// `softmax(c · tanh(q kᵀ · scale / c) masked) v`, the softmax in f32. `mask` is true where a
/// query sees a key.
fn capped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    cap: f64,
) -> Tensor {
    let scores = q.matmul(&k.transpose(-2, -1)) * scale;
    let scores = (scores / cap).tanh() * cap;
    let scores = scores.masked_fill(&mask.logical_not(), f64::NEG_INFINITY);
    scores.softmax(-1, Kind::Float).to_kind(v.kind()).matmul(v)
}

/// The attention mask of `t` new queries after `past` cached positions, as SDPA takes it
/// (`(mask, is_causal)`): query i, at position `past + i`, sees keys `0..=past + i`, and with
/// a `window` only the last `window` of them (`past + i - window < j`, transformers'
/// `sliding_window_overlay`). With nothing cached and no window reaching back, that is SDPA's
/// causal flag; one new query with nothing out of its window sees everything; otherwise an
/// explicit mask (SDPA's is_causal aligns top-left, which would be wrong after a cache).
fn attention_mask(
    t: i64,
    past: i64,
    window: Option<i64>,
    device: tch::Device,
) -> (Option<Tensor>, bool) {
    let windowed = window.is_some_and(|w| past + t > w);
    if !windowed && past == 0 {
        return (None, t > 1);
    }
    if !windowed && t == 1 {
        return (None, false);
    }
    (Some(explicit_mask(t, past, window, device)), false)
}

/// The mask of [`attention_mask`] as a tensor `(t, past + t)`, true where a query sees a key.
fn explicit_mask(t: i64, past: i64, window: Option<i64>, device: tch::Device) -> Tensor {
    let opts = (Kind::Int64, device);
    let qpos = Tensor::arange(t, opts).unsqueeze(1) + past;
    let kpos = Tensor::arange(past + t, opts).unsqueeze(0);
    let mask = kpos.le_tensor(&qpos);
    match window {
        Some(w) => mask.logical_and(&kpos.gt_tensor(&(qpos - w))),
        None => mask,
    }
}

/// The word table's name, `model.embed_tokens` (variables `model.embed_tokens.weight`, or a TT
/// table's `model.embed_tokens.cores.{k}` and `model.embed_tokens.rank_vars.{i}`).
pub const EMBED_TOKENS: &str = "model.embed_tokens";

/// The decoder: embeddings, blocks, final norm, output head.
#[derive(Debug)]
pub struct Llama {
    /// The model's shape.
    pub config: LlamaConfig,
    embed_tokens: WordEmbedding,
    /// The decoder blocks, first to last.
    pub layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Box<dyn Linear>,
    cos: Tensor,
    sin: Tensor,
    /// The sliding layers' tables when they have a base of their own (Gemma 3).
    local: Option<(Tensor, Tensor)>,
    /// LongRoPE's tables with the long factors, and the length past which they apply.
    long: Option<(Tensor, Tensor, i64)>,
    compute: Kind,
}

impl Llama {
    /// Builds the model under `root` (names `model.embed_tokens.weight`, `model.layers.N...`,
    /// `model.norm.weight`, `lm_head.weight`), with linear layers of kind `kind` and a word
    /// table of kind `embedding` (a TT table: `model.embed_tokens.cores.{k}`,
    /// `model.embed_tokens.rank_vars.{i}`), computing in `compute` (f32 or bf16; parameters stay
    /// f32). Errors when `kind` is a quantized kind whose format or options do not fit the
    /// model's shapes, when a TT table's options are invalid (naming `model.embedding.*`), or
    /// when a TT table would be the tied output head ([`LlamaConfig::check_embedding`]).
    pub fn new(
        root: &nn::Path,
        cfg: &LlamaConfig,
        kind: &LinearKind,
        embedding: &EmbeddingKind,
        compute: Kind,
    ) -> Result<Self> {
        cfg.check_embedding(embedding)?;
        let model = root / "model";
        let embed_tokens = WordEmbedding::new(
            &(&model / "embed_tokens"),
            cfg.vocab_size,
            cfg.hidden_size,
            embedding,
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
            compute,
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Block::new(&(&model / "layers" / i), i as usize, cfg, kind, compute))
            .collect::<Result<_>>()?;
        let norm = cfg.norm(&(&model / "norm"), cfg.hidden_size);
        // The output head stays dense whatever `kind` is: methods leave it alone by convention.
        // Tied (`tie_word_embeddings`), it is the embedding table itself, as in Hugging Face's
        // model: one variable, no `lm_head.weight` (a dense table only: checked above).
        let lm_head = match &embed_tokens {
            WordEmbedding::Dense(table) if cfg.tie_word_embeddings => {
                Box::new(linear::Dense::tied(table, compute)) as Box<dyn Linear>
            }
            _ => linear::build(
                &(root / "lm_head"),
                cfg.hidden_size,
                cfg.vocab_size,
                &LinearKind::Dense,
                compute,
            )?,
        };
        let device = root.device();
        let (cos, sin) = rotary_tables(cfg, cfg.rope_theta, cfg.rope_scaling.as_ref(), device);
        let local = cfg
            .rope_local_base_freq
            .map(|theta| rotary_tables(cfg, theta, None, device));
        let long = match &cfg.rope_scaling {
            Some(RopeScaling::LongRope(r)) => {
                let long = RopeScaling::LongRope(LongRope {
                    short_factor: r.long_factor.clone(),
                    ..r.clone()
                });
                let (cos, sin) = rotary_tables(cfg, cfg.rope_theta, Some(&long), device);
                Some((cos, sin, r.original_max_position_embeddings))
            }
            _ => None,
        };
        Ok(Self {
            config: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            local,
            long,
            compute,
        })
    }

    /// Every linear layer but the output head, with its full name (`model.layers.3.mlp.up_proj`).
    pub fn linears(&self) -> Vec<(String, &dyn Linear)> {
        linear::stack_linears("model.layers", &self.layers, Block::linears)
    }

    /// [`Llama::linears`], mutable (to load or replace layers).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Box<dyn Linear>)> {
        linear::stack_linears_mut("model.layers", &mut self.layers, Block::linears_mut)
    }

    /// The word tables with their full names: `model.embed_tokens` (dense or TT).
    pub fn tables(&self) -> Vec<(String, &WordEmbedding)> {
        vec![(EMBED_TOKENS.to_string(), &self.embed_tokens)]
    }

    /// [`Llama::tables`], mutable.
    pub fn tables_mut(&mut self) -> Vec<(String, &mut WordEmbedding)> {
        self.weights_mut().1
    }

    /// [`Llama::linears_mut`] and [`Llama::tables_mut`] at once (to load both).
    #[allow(clippy::type_complexity)]
    pub fn weights_mut(
        &mut self,
    ) -> (
        Vec<(String, &mut Box<dyn Linear>)>,
        Vec<(String, &mut WordEmbedding)>,
    ) {
        let tables = vec![(EMBED_TOKENS.to_string(), &mut self.embed_tokens)];
        let linears =
            linear::stack_linears_mut("model.layers", &mut self.layers, Block::linears_mut);
        (linears, tables)
    }

    /// Every tensor-train layer (the word table when it is one, then the blocks' TT linear
    /// layers) with its full name: what rank adaptation trains and prunes.
    pub fn tt_layers(&self) -> Vec<(String, &dyn TtLayer)> {
        crate::embedding::tt_layers(self.tables(), self.linears())
    }

    /// [`Llama::tt_layers`], mutable (threshold, pruning).
    pub fn tt_layers_mut(&mut self) -> Vec<(String, &mut dyn TtLayer)> {
        let (linears, tables) = self.weights_mut();
        crate::embedding::tt_layers_mut(tables, linears)
    }

    /// The input embeddings `(B, T, d)` of token ids `(B, T)`, in f32 whatever the
    /// parameters' kind: the residual stream the first block reads (a TT table's rows are
    /// looked up core by core).
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        let x = self.embed_tokens.forward(ids).to_kind(Kind::Float);
        match self.config.model_type.is_gemma() {
            // Gemma scales by √d in the table's kind (f32 here), as transformers does.
            true => x * (self.config.hidden_size as f64).sqrt() as f32 as f64,
            false => x,
        }
    }

    /// The rotary tables `(cos, sin)` of block `layer` for positions `start..start + len`, as
    /// [`Block::forward`] takes them (Gemma 3's sliding layers have tables of their own).
    pub fn rope(&self, layer: usize, start: i64, len: i64) -> (Tensor, Tensor) {
        let (cos, sin) = match (&self.local, &self.long, self.layers.get(layer)) {
            (Some((cos, sin)), _, Some(b)) if b.self_attn.local_rope => (cos, sin),
            // LongRoPE: a sequence past the pre-training length takes the long factors.
            (_, Some((cos, sin, after)), _) if start + len > *after => (cos, sin),
            _ => (&self.cos, &self.sin),
        };
        (cos.narrow(0, start, len), sin.narrow(0, start, len))
    }

    /// Logits in f32 of the last block's output `x` (`(..., d)`): final norm, output head,
    /// and the final soft-capping when the model has it (Gemma 2).
    pub fn head(&self, x: &Tensor) -> Tensor {
        let logits = self
            .lm_head
            .forward(&self.norm.forward(x))
            .to_kind(Kind::Float);
        match self.config.final_logit_softcapping {
            Some(c) => (logits / c).tanh() * c,
            None => logits,
        }
    }

    /// Logits `(B, T, vocab)` in f32 for token ids `(B, T)`. With a cache, the ids continue the
    /// cached sequence and their keys and values are appended to it.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Tensor {
        let Some(cache) = cache else {
            return self.run(ids, 0, None);
        };
        let (t, start) = (ids.size()[1], cache.len());
        if let Some((_, _, after)) = &self.long {
            // As transformers' Phi-3: the first pass that takes the sequence past the
            // pre-training length computes it all again with the long factors (the cached keys
            // were rotated with the short ones); later passes continue from that cache.
            let all = match cache.ids.take() {
                Some(seen) => Tensor::cat(&[seen, ids.shallow_clone()], 1),
                None => ids.shallow_clone(),
            };
            cache.ids = Some(all.shallow_clone());
            if start > 0 && start <= *after && start + t > *after {
                cache.layers.clear();
                return self.run(&all, 0, Some(cache)).narrow(1, start, t);
            }
        }
        self.run(ids, start, Some(cache))
    }

    /// Logits of `ids` at positions `start..`, through `cache` when given.
    fn run(&self, ids: &Tensor, start: i64, cache: Option<&mut KvCache>) -> Tensor {
        let t = ids.size()[1];
        let mut x = self.embed(ids);
        match cache {
            Some(cache) => {
                cache.layers.resize_with(self.layers.len(), || None);
                let slots = cache.layers.iter_mut();
                for (i, (layer, slot)) in self.layers.iter().zip(slots).enumerate() {
                    let (cos, sin) = self.rope(i, start, t);
                    x = layer.forward(&x, &cos, &sin, Some(slot));
                }
            }
            None => {
                for (i, layer) in self.layers.iter().enumerate() {
                    let (cos, sin) = self.rope(i, start, t);
                    x = layer.forward(&x, &cos, &sin, None);
                }
            }
        }
        self.head(&x)
    }

    /// Mean next-token cross-entropy of `ids` against `targets` (both `(B, T)`).
    pub fn loss(&self, ids: &Tensor, targets: &Tensor) -> Tensor {
        let logits = self.forward(ids, None);
        let v = logits.size()[2];
        logits
            .reshape([-1, v])
            .cross_entropy_for_logits(&targets.reshape([-1]))
    }

    /// The compute kind.
    pub fn compute_kind(&self) -> Kind {
        self.compute
    }
}

#[cfg(test)]
mod tests {
    use super::{LlamaConfig, RopeScaling};

    #[test]
    fn hf_config_of_transformers_5_and_4() {
        let v5 = r#"{"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 32,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}"#;
        let c = LlamaConfig::from_hf_json(v5).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.num_key_value_heads, 4);
        let v4 = r#"{"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
            "max_position_embeddings": 32, "rope_theta": 20000.0, "rope_scaling": null}"#;
        assert_eq!(LlamaConfig::from_hf_json(v4).unwrap().rope_theta, 20000.0);
        // What Frugal writes reads back, `model_type` included.
        let text = serde_json::to_string(&c).unwrap();
        assert!(text.starts_with(r#"{"model_type":"llama","#), "{text}");
        assert_eq!(LlamaConfig::from_hf_json(&text).unwrap(), c);
    }

    #[test]
    fn llama3_rope_gqa_and_head_dim_are_read_other_rope_types_refused() {
        let v5 = r#"{"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "max_position_embeddings": 64,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}}"#;
        let c = LlamaConfig::from_hf_json(v5).unwrap();
        assert_eq!(
            (
                c.num_key_value_heads,
                c.head_dim(),
                c.q_width(),
                c.kv_width()
            ),
            (2, 16, 64, 32)
        );
        assert_eq!(c.rope_theta, 500000.0);
        let Some(RopeScaling::Llama3(r)) = c.rope_scaling.clone() else {
            panic!("{:?}", c.rope_scaling)
        };
        assert_eq!((r.factor, r.original_max_position_embeddings), (8.0, 16));
        // What Frugal writes (`rope_scaling`, transformers 4's key) reads back the same.
        let text = serde_json::to_string(&c).unwrap();
        assert!(
            text.contains(r#""rope_scaling":{"rope_type":"llama3","#),
            "{text}"
        );
        assert_eq!(LlamaConfig::from_hf_json(&text).unwrap(), c);
        // head_dim = hidden / heads is no explicit width.
        let plain = v5.replace(r#""head_dim": 16"#, r#""head_dim": 8"#);
        assert_eq!(LlamaConfig::from_hf_json(&plain).unwrap().head_dim, None);

        // Linear scaling is read (the old `type` key too), and written back as transformers
        // reads it; YaRN is refused by key.
        let linear = r#"{"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 32,
            "rope_scaling": {"type": "linear", "factor": 8.0}}"#;
        let c = LlamaConfig::from_hf_json(linear).unwrap();
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 8.0 }));
        let text = serde_json::to_string(&c).unwrap();
        assert!(
            text.contains(r#""rope_scaling":{"rope_type":"linear","factor":8.0}"#),
            "{text}"
        );
        assert_eq!(LlamaConfig::from_hf_json(&text).unwrap(), c);
        let su = linear.replace(r#""type": "linear""#, r#""type": "su""#);
        let err = LlamaConfig::from_hf_json(&su).unwrap_err().to_string();
        assert!(err.starts_with("rope_scaling: rope_type \"su\""), "{err}");
        let dynamic = linear.replace(r#""type": "linear""#, r#""type": "dynamic""#);
        let c = LlamaConfig::from_hf_json(&dynamic).unwrap();
        assert_eq!(c.rope_scaling, Some(RopeScaling::Dynamic { factor: 8.0 }));
        // YaRN: read with transformers' defaults, written back as read.
        let yarn = linear.replace(r#""type": "linear""#, r#""rope_type": "yarn""#);
        let c = LlamaConfig::from_hf_json(&yarn).unwrap();
        let Some(RopeScaling::Yarn(y)) = c.rope_scaling.clone() else {
            panic!("{:?}", c.rope_scaling)
        };
        assert_eq!((y.factor, y.original_max_position_embeddings), (8.0, 32));
        assert!((y.attention_factor() - (0.1 * 8f64.ln() + 1.0)).abs() < 1e-12);
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(LlamaConfig::from_hf_json(&text).unwrap(), c);
        let small = linear.replace("8.0", "0.5");
        let err = LlamaConfig::from_hf_json(&small).unwrap_err().to_string();
        assert!(
            err.starts_with("rope_scaling.factor: must be at least 1"),
            "{err}"
        );
        let gqa = r#"{"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 3,
            "max_position_embeddings": 32}"#;
        let err = LlamaConfig::from_hf_json(gqa).unwrap_err().to_string();
        assert!(err.starts_with("num_key_value_heads: 3"), "{err}");
        let missing = v5.replace(r#""factor": 8.0,"#, "");
        let err = LlamaConfig::from_hf_json(&missing).unwrap_err().to_string();
        assert!(err.starts_with("rope_parameters.factor: missing"), "{err}");
    }
}
