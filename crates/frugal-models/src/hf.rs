//! Hugging Face `config.json` files: which model family a file is (`model_type`), the one-line
//! refusal of the families this build does not load, and the decoders' keys.
//!
//! A folder is read only by the family its `model_type` names; every other type is refused by
//! name, with the reason when it is a known architecture (GPT-2, the mixtures of experts...).
//! The decoders' reader ([`crate::llama::LlamaConfig::from_hf_json`], for every
//! [`DecoderType`]) knows every key it reads, checks or knowingly ignores ([`LLAMA_READ`],
//! [`LLAMA_CHECKED`], [`IGNORED`], the family's own keys), and refuses, naming the key, any
//! value that would change the model's outputs in a way Frugal does not compute (another
//! activation, a RoPE type it does not compute, Qwen's sliding-window layers, bidirectional
//! attention), and the keys that change outputs in other families ([`OTHER_FAMILIES`]). Other
//! keys are ignored, as transformers ignores them.

use crate::llama::DecoderType;
use frugal_core::Error;
use serde_json::Value;

/// The model families this build loads, by the `model_type` their `config.json` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Every [`DecoderType`] (`llama`, `mistral`, `qwen2`, `qwen3`, `gemma`, `gemma2`,
    /// `gemma3_text`, `phi3`): the LLaMA-style decoder ([`crate::llama`]).
    Llama,
    /// `bert`: the BERT-style encoder ([`crate::encoder`]).
    Bert,
    /// `hgrn_bit`: the MatMul-free LM as `frugal export` writes it ([`crate::hgrn_bit`]).
    HgrnBit,
}

impl Family {
    /// The `model_type` value.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Bert => "bert",
            Family::HgrnBit => "hgrn_bit",
        }
    }

    /// The family of a built `model_type` (every [`DecoderType`] is [`Family::Llama`]).
    pub fn of(model_type: &str) -> Option<Self> {
        if DecoderType::of(model_type).is_some() {
            return Some(Family::Llama);
        }
        [Family::Bert, Family::HgrnBit]
            .into_iter()
            .find(|f| f.model_type() == model_type)
    }

    /// How a Frugal config selects it.
    fn model_kind(self) -> &'static str {
        match self {
            Family::Llama => "model.kind = \"llama\"",
            Family::Bert => "model.kind = \"encoder\"",
            Family::HgrnBit => "model.kind = \"hgrn-bit\"",
        }
    }
}

/// `model_type`s refused for good, with the reason.
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "gpt2",
        "GPT-2: learned positions, LayerNorm, fused Conv1D attention",
    ),
    (
        "gpt_neox",
        "GPT-NeoX: parallel residual, partial rotary, LayerNorm",
    ),
    ("gptj", "GPT-J: parallel residual, interleaved rotary"),
    (
        "gemma3",
        "multimodal Gemma 3 (vision tower); its language model saved as gemma3_text loads",
    ),
    ("mixtral", "mixture of experts"),
    ("qwen2_moe", "mixture of experts"),
    ("qwen3_moe", "mixture of experts"),
    (
        "falcon",
        "Falcon: parallel attention, LayerNorm, multi-query layout",
    ),
];

/// The `model_type` of a parsed `config.json`; absent (or not a string): an error naming the
/// key, since the family cannot be told otherwise (transformers' `AutoConfig` refuses such a
/// file too).
pub fn model_type(v: &Value) -> Result<&str, Error> {
    match v.get("model_type") {
        Some(Value::String(t)) => Ok(t),
        None | Some(Value::Null) => Err(Error::config(
            "model_type",
            "missing: config.json must name the model's family (\"llama\" for a LLaMA-2-style \
             decoder)",
        )),
        Some(other) => Err(Error::config(
            "model_type",
            format!("must be a string, got {other}"),
        )),
    }
}

/// Checks that a parsed `config.json` is of family `want`; otherwise the one-line error names
/// `model_type`, its value and, when Frugal loads it, how; or that this build does not yet; or
/// that it is not supported and why.
pub fn expect_family(v: &Value, want: Family) -> Result<(), Error> {
    let t = model_type(v)?;
    if Family::of(t) == Some(want) {
        return Ok(());
    }
    let reason = if let Some(f) = Family::of(t) {
        format!(
            "{t:?} is loaded with {}, not as a {:?} model",
            f.model_kind(),
            want.model_type()
        )
    } else if let Some((_, why)) = UNSUPPORTED.iter().find(|(n, _)| *n == t) {
        format!(
            "{t:?} is not supported ({why}); Frugal loads {} decoders",
            decoder_names()
        )
    } else {
        format!(
            "{t:?} is not supported; Frugal loads {} decoders and \"bert\" encoders",
            decoder_names()
        )
    };
    Err(Error::config("model_type", reason))
}

/// The decoder types, quoted and listed: `"llama", "mistral", "qwen2" and "qwen3"`.
fn decoder_names() -> String {
    let names: Vec<String> = DecoderType::ALL
        .iter()
        .map(|t| format!("{:?}", t.name()))
        .collect();
    let (last, rest) = names.split_last().expect("types");
    format!("{} and {last}", rest.join(", "))
}

/// The decoder type of a parsed `config.json`; any other `model_type` is refused as
/// [`expect_family`] refuses it.
pub fn expect_decoder(v: &Value) -> Result<DecoderType, Error> {
    expect_family(v, Family::Llama)?;
    Ok(DecoderType::of(model_type(v)?).expect("a decoder type"))
}

/// Keys the LLaMA reads into [`crate::llama::LlamaConfig`].
pub const LLAMA_READ: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "tie_word_embeddings",
];

/// Keys the LLaMA accepts only at the value it computes with (each refused otherwise, by
/// name), and keys that other parts of Frugal read (`quantization_config`, `tt_config`).
pub const LLAMA_CHECKED: &[&str] = &[
    "model_type",
    "architectures",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
    "attention_dropout",
    "sliding_window",
    "auto_map",
    "quantization_config",
    "tt_config",
];

/// Keys that do not change a model's outputs, knowingly ignored: token ids, dtypes, versions,
/// transformers' generic `PretrainedConfig` fields, generation defaults that old files keep in
/// `config.json`, and `pretraining_tp` (transformers 4 computed the same products in slices,
/// transformers 5 ignores it).
pub const IGNORED: &[&str] = &[
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "use_cache",
    "initializer_range",
    "pretraining_tp",
    "_name_or_path",
    "name_or_path",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "attn_implementation",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "torchscript",
    "use_bfloat16",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "is_decoder",
    "add_cross_attention",
    "cross_attention_hidden_size",
    "tie_encoder_decoder",
    "pruned_heads",
    "id2label",
    "label2id",
    "num_labels",
    "problem_type",
    "finetuning_task",
    "tokenizer_class",
    "prefix",
    "task_specific_params",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
];

/// Keys that change the outputs of other families' models (transformers' config fields of
/// Mistral, Qwen, Gemma, Phi, GPT-NeoX, Falcon, Granite, OLMo, the MoE models...): in a
/// `llama` config.json they mean the file was made for another model, so they are refused
/// unless off (null, false, 0 or empty).
pub const OTHER_FAMILIES: &[&str] = &[
    "use_bidirectional_attention",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
    "qkv_bias",
    "use_qkv_bias",
    "bias",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "hidden_activation",
    "rope_local_base_freq",
    "partial_rotary_factor",
    "rotary_pct",
    "rotary_emb_base",
    "rotary_dim",
    "use_parallel_residual",
    "parallel_attn",
    "new_decoder_architecture",
    "multi_query",
    "qk_layernorm",
    "use_qk_norm",
    "qk_norm",
    "clip_qkv",
    "num_local_experts",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "n_shared_experts",
    "decoder_sparse_step",
    "embedding_multiplier",
    "residual_multiplier",
    "attention_multiplier",
    "logits_scaling",
    "logit_scale",
    // Phi-3 keeps it at the top; transformers then prefers it to the llama3 RoPE's own.
    "original_max_position_embeddings",
];

/// RoPE types the decoders compute: plain RoPE, Llama 3's scaling, linear interpolation, YaRN,
/// LongRoPE, dynamic NTK (plain up to `max_position_embeddings`).
const ROPE_TYPES: &[&str] = &["default", "llama3", "linear", "yarn", "longrope", "dynamic"];

/// The RoPE parameters of a parsed `config.json`: transformers 5's `rope_parameters`, else
/// the older `rope_scaling` (None when neither is an object), with the key's name.
fn rope_dict(v: &Value) -> Option<(&'static str, &serde_json::Map<String, Value>)> {
    ["rope_parameters", "rope_scaling"]
        .into_iter()
        .find_map(|k| v.get(k).and_then(Value::as_object).map(|o| (k, o)))
}

/// The rotary settings of a parsed `config.json` ([`rope`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeRead {
    /// The base (of the global layers, for Gemma 3): `rope_theta`, at the top or inside the
    /// RoPE parameters; absent: the family's default (Gemma 3: 1e6, the others 1e4).
    pub theta: f64,
    /// The scaling (of the global layers, for Gemma 3).
    pub scaling: Option<crate::llama::RopeScaling>,
    /// Gemma 3's base of the sliding layers (`rope_parameters.sliding_attention.rope_theta`,
    /// or `rope_local_base_freq`; absent: 1e4); None for the other families.
    pub local_theta: Option<f64>,
}

/// The RoPE settings of a parsed `config.json` of type `ty` whose keys
/// [`check_decoder_keys`] accepted: transformers 5's `rope_parameters` (for Gemma 3 one dict
/// per layer type, `full_attention` and `sliding_attention`), or the older `rope_theta`,
/// `rope_scaling` and `rope_local_base_freq`. A `llama3` scaling needs `factor`,
/// `low_freq_factor` and `high_freq_factor` (numbers) and `original_max_position_embeddings`
/// (an integer; absent: `max_position_embeddings`, as transformers' `standardize_rope_params`);
/// a `linear` one `factor`. Errors name the key (`rope_parameters.factor: missing ...`).
pub fn rope(v: &Value, ty: DecoderType) -> Result<RopeRead, Error> {
    let top_theta = v.get("rope_theta").and_then(Value::as_f64);
    let default_theta = match ty {
        DecoderType::Gemma3Text => 1e6,
        _ => 1e4,
    };
    let nested = v
        .get("rope_parameters")
        .and_then(Value::as_object)
        .filter(|r| r.contains_key("full_attention") || r.contains_key("sliding_attention"));
    let (global, global_key) = match nested {
        Some(r) => (
            r.get("full_attention").and_then(Value::as_object),
            "rope_parameters.full_attention".to_string(),
        ),
        None => match rope_dict(v) {
            Some((k, r)) => (Some(r), k.to_string()),
            None => (None, String::new()),
        },
    };
    let theta = global
        .and_then(|r| r.get("rope_theta"))
        .and_then(Value::as_f64)
        .or(top_theta)
        .unwrap_or(default_theta);
    let scaling = match global {
        Some(r) => rope_scaling(v, ty, r, &global_key)?,
        None => None,
    };
    let local_theta = (ty == DecoderType::Gemma3Text).then(|| {
        nested
            .and_then(|r| r.get("sliding_attention"))
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64)
            .or_else(|| v.get("rope_local_base_freq").and_then(Value::as_f64))
            .unwrap_or(1e4)
    });
    Ok(RopeRead {
        theta,
        scaling,
        local_theta,
    })
}

/// The scaling of the RoPE parameters `r` (under `key`) of config `v`: None for the default
/// type; `llama3` and `linear` read, others refused.
fn rope_scaling(
    v: &Value,
    ty: DecoderType,
    r: &serde_json::Map<String, Value>,
    key: &str,
) -> Result<Option<crate::llama::RopeScaling>, Error> {
    use crate::llama::{Llama3Rope, RopeScaling};
    let kind = r.get("rope_type").or_else(|| r.get("type"));
    let number = |k: &str| {
        r.get(k).and_then(Value::as_f64).ok_or_else(|| {
            let got = r
                .get(k)
                .map_or("missing".to_string(), |x| format!("{x} is not a number"));
            Error::config(
                format!("{key}.{k}"),
                format!(
                    "{got}: the {} RoPE scaling needs it",
                    kind.unwrap_or(&Value::Null)
                ),
            )
        })
    };
    // An optional number (absent or null: None).
    let optional = |k: &str| match r.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| Error::config(format!("{key}.{k}"), format!("{x} is not a number"))),
    };
    // The pre-training length, as transformers' `standardize_rope_params` sets it: Phi-3's
    // top-level `original_max_position_embeddings` (its config class has one, 4096 when
    // absent, and it wins over the RoPE parameters' own); else the RoPE parameters' key; else
    // the model's `max_position_embeddings`; 0 (refused by the checks) when none is.
    let integer = |k: String, x: &Value| {
        x.as_i64()
            .ok_or_else(|| Error::config(k, format!("{x} is not an integer")))
    };
    let original = || match (ty, r.get("original_max_position_embeddings")) {
        (DecoderType::Phi3, _) => match v.get("original_max_position_embeddings") {
            Some(x) if !x.is_null() => integer("original_max_position_embeddings".into(), x),
            _ => Ok(4096),
        },
        (_, None | Some(Value::Null)) => Ok(v
            .get("max_position_embeddings")
            .and_then(Value::as_i64)
            .unwrap_or(0)),
        (_, Some(x)) => integer(format!("{key}.original_max_position_embeddings"), x),
    };
    // No factor: the extension from the pre-training length to the model's.
    let extension = |original: i64| {
        let max = v.get("max_position_embeddings").and_then(Value::as_f64);
        max.unwrap_or(0.0) / original.max(1) as f64
    };
    let scaling = match kind.and_then(Value::as_str) {
        None | Some("default") => return Ok(None),
        Some("linear") => RopeScaling::Linear {
            factor: number("factor")?,
        },
        Some("dynamic") => RopeScaling::Dynamic {
            factor: number("factor")?,
        },
        Some("llama3") => RopeScaling::Llama3(Llama3Rope {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: original()?,
        }),
        Some("yarn") => {
            let original = original()?;
            let truncate = match r.get("truncate") {
                None | Some(Value::Null) => None,
                Some(Value::Bool(b)) => Some(*b),
                Some(x) => {
                    return Err(Error::config(
                        format!("{key}.truncate"),
                        format!("{x} must be true or false"),
                    ))
                }
            };
            RopeScaling::Yarn(crate::llama::YarnRope {
                factor: optional("factor")?.unwrap_or_else(|| extension(original)),
                original_max_position_embeddings: original,
                attention_factor: optional("attention_factor")?,
                beta_fast: optional("beta_fast")?,
                beta_slow: optional("beta_slow")?,
                mscale: optional("mscale")?,
                mscale_all_dim: optional("mscale_all_dim")?,
                truncate,
            })
        }
        Some("longrope") => {
            let factors = |k: &str| {
                r.get(k)
                    .and_then(Value::as_array)
                    .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
                    .ok_or_else(|| Error::config(format!("{key}.{k}"), "must be a list of numbers"))
            };
            let original = original()?;
            RopeScaling::LongRope(crate::llama::LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                factor: optional("factor")?.unwrap_or_else(|| extension(original)),
                attention_factor: optional("attention_factor")?,
                original_max_position_embeddings: original,
            })
        }
        Some(other) => {
            return Err(Error::config(
                key,
                format!("rope_type {other:?} is not supported yet"),
            ))
        }
    };
    scaling.validate().map_err(|e| {
        Error::Msg(
            e.to_string()
                .replacen("rope_scaling.", &format!("{key}."), 1),
        )
    })?;
    Ok(Some(scaling))
}

/// Gemma 2/3's attention settings of a parsed `config.json` ([`gemma_settings`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GemmaRead {
    /// One per layer (Gemma 2/3).
    pub layer_types: Option<Vec<crate::llama::LayerType>>,
    /// `query_pre_attn_scalar` (an integer, as transformers types it).
    pub query_pre_attn_scalar: Option<i64>,
    /// `attn_logit_softcapping`.
    pub attn_logit_softcapping: Option<f64>,
    /// `final_logit_softcapping`.
    pub final_logit_softcapping: Option<f64>,
}

/// Gemma 2/3's `layer_types`, `query_pre_attn_scalar` and soft-capping of a parsed
/// `config.json` of type `ty`, with transformers' defaults for absent keys (256; Gemma 2's
/// caps 50 and 30, Gemma 3's none; a null is none); `layer_types` absent: Gemma 2 alternates
/// sliding and global layers, Gemma 3 makes every `sliding_window_pattern`-th (6) layer global.
/// All none for the other families. Errors name the key.
pub fn gemma_settings(v: &Value, ty: DecoderType) -> Result<GemmaRead, Error> {
    use crate::llama::LayerType;
    if !ty.is_gemma2_or_later() {
        return Ok(GemmaRead::default());
    }
    let gemma2 = ty == DecoderType::Gemma2;
    let number = |k: &str, default: Option<f64>| match v.get(k) {
        None => Ok(default),
        Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .filter(|x| *x > 0.0)
            .map(Some)
            .ok_or_else(|| Error::config(k, format!("{x} must be a positive number or null"))),
    };
    let layers = v
        .get("num_hidden_layers")
        .and_then(Value::as_i64)
        .unwrap_or(0)
        .max(0) as usize;
    let layer_types = match v.get("layer_types").filter(|x| !x.is_null()) {
        Some(x) => {
            let types: Vec<LayerType> = serde_json::from_value(x.clone()).map_err(|_| {
                Error::config(
                    "layer_types",
                    format!("{x}: each must be \"full_attention\" or \"sliding_attention\""),
                )
            })?;
            if types.len() != layers {
                return Err(Error::config(
                    "layer_types",
                    format!("{} entries for {layers} layers", types.len()),
                ));
            }
            types
        }
        None => {
            let period = match gemma2 {
                true => 2,
                false => v
                    .get("sliding_window_pattern")
                    .and_then(Value::as_i64)
                    .unwrap_or(6),
            };
            if period <= 0 {
                return Err(Error::config(
                    "sliding_window_pattern",
                    format!("must be positive, got {period}"),
                ));
            }
            (0..layers as i64)
                .map(|i| match (i + 1) % period {
                    0 => LayerType::FullAttention,
                    _ => LayerType::SlidingAttention,
                })
                .collect()
        }
    };
    let scalar = match v.get("query_pre_attn_scalar") {
        None => Some(256),
        Some(Value::Null) => None,
        Some(x) => Some(x.as_i64().filter(|q| *q > 0).ok_or_else(|| {
            Error::config(
                "query_pre_attn_scalar",
                format!("{x} must be a positive integer or null"),
            )
        })?),
    };
    Ok(GemmaRead {
        layer_types: Some(layer_types),
        query_pre_attn_scalar: scalar,
        attn_logit_softcapping: number("attn_logit_softcapping", gemma2.then_some(50.0))?,
        final_logit_softcapping: number("final_logit_softcapping", gemma2.then_some(30.0))?,
    })
}

/// The attention window of a parsed `config.json` of type `ty` (keys checked): for `mistral`,
/// `gemma2`, `gemma3_text` and `phi3`, `sliding_window` (absent: transformers' default, 4096,
/// none for Phi-3; null: none), a positive integer or an error naming the key; None for the
/// other types (a LLaMA's is refused unless it covers every position, Qwen's is off unless
/// `use_sliding_window`, which is refused, Gemma 1 has none).
pub fn sliding_window(v: &Value, ty: DecoderType) -> Result<Option<i64>, Error> {
    if !matches!(ty, DecoderType::Mistral | DecoderType::Phi3) && !ty.is_gemma2_or_later() {
        return Ok(None);
    }
    match v.get("sliding_window") {
        // transformers' Phi-3 has no window when the key is absent, the others 4096.
        None if ty == DecoderType::Phi3 => Ok(None),
        None => Ok(Some(4096)),
        Some(Value::Null) => Ok(None),
        Some(x) => match x.as_i64().filter(|w| *w > 0) {
            Some(w) => Ok(Some(w)),
            None => Err(Error::config(
                "sliding_window",
                format!("{x} must be a positive integer or null"),
            )),
        },
    }
}

/// Checks the keys of a parsed `config.json` of decoder type `ty` (`model_type` already
/// checked): every value of [`LLAMA_CHECKED`] must be one Frugal computes with for that family,
/// no key of [`OTHER_FAMILIES`] may appear unless the family owns it; the error names the key.
/// Keys of no list are ignored.
pub fn check_decoder_keys(v: &Value, ty: DecoderType) -> Result<(), Error> {
    let refuse = |key: &str, reason: String| Err(Error::config(key, reason));
    let obj = v
        .as_object()
        .ok_or_else(|| Error::config("config.json", "not a JSON object"))?;
    let int = |k: &str| obj.get(k).and_then(Value::as_i64);
    let set = |k: &str| obj.get(k).is_some_and(|x| !x.is_null());
    let family = ty.name();
    if let Some(archs) = obj.get("architectures").and_then(Value::as_array) {
        for a in archs {
            let name = a.as_str().unwrap_or_default();
            let llama_alias = ty == DecoderType::Llama && name == "LLaMAForCausalLM";
            if name != ty.causal_lm_class() && !llama_alias {
                return refuse(
                    "architectures",
                    format!(
                        "{a} is not supported (a {family} folder loads as {})",
                        ty.causal_lm_class()
                    ),
                );
            }
        }
    }
    // The MLP's activation: SwiGLU (silu) but in Gemma, whose GeGLU is the tanh GeLU: Gemma 1
    // reads `hidden_act` (transformers 5 takes the legacy "gelu" for the tanh form), Gemma 2/3
    // read `hidden_activation` and ignore `hidden_act`.
    let act = |key: &str, allowed: &[&str]| match obj.get(key).filter(|x| !x.is_null()) {
        Some(a) if !a.as_str().is_some_and(|a| allowed.contains(&a)) => refuse(
            key,
            format!(
                "{a} is not supported (the {family} MLP takes {})",
                allowed.join(" or ")
            ),
        ),
        _ => Ok(()),
    };
    match ty {
        DecoderType::Gemma => {
            act("hidden_act", &["gelu_pytorch_tanh", "gelu"])?;
            act("hidden_activation", &["gelu_pytorch_tanh"])?;
        }
        DecoderType::Gemma2 | DecoderType::Gemma3Text => {
            act("hidden_activation", &["gelu_pytorch_tanh"])?;
        }
        _ => act("hidden_act", &["silu"])?,
    }
    // Which bias keys the family reads; the others must be off. transformers' Qwen2 ignores
    // `attention_bias` (its q/k/v always have biases, its o never).
    let reads_bias = |key: &str| match ty {
        DecoderType::Llama => true,
        DecoderType::Qwen2 | DecoderType::Qwen3 => key == "attention_bias",
        DecoderType::Gemma | DecoderType::Gemma2 | DecoderType::Gemma3Text => {
            key == "attention_bias"
        }
        DecoderType::Mistral | DecoderType::Phi3 => false,
    };
    for key in ["attention_bias", "mlp_bias"] {
        match obj.get(key) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(Value::Bool(true)) if reads_bias(key) => {}
            Some(x @ Value::Bool(true)) => {
                return refuse(
                    key,
                    format!(
                        "{x} is not a {family} setting ({} has no such biases), so the file \
                         was made for another model",
                        ty.causal_lm_class()
                    ),
                )
            }
            Some(x) => return refuse(key, format!("{x} must be true or false")),
        }
    }
    if let (Some(kv), Some(h)) = (int("num_key_value_heads"), int("num_attention_heads")) {
        if kv <= 0 || h % kv != 0 {
            return refuse(
                "num_key_value_heads",
                format!(
                    "{kv} must be positive and divide num_attention_heads {h} (grouped-query \
                     attention: each key/value head serves a group of query heads)"
                ),
            );
        }
    }
    if set("head_dim") && int("head_dim").is_none_or(|w| w <= 0 || w % 2 != 0) {
        return refuse(
            "head_dim",
            format!("{} must be a positive even integer", obj["head_dim"]),
        );
    }
    if let Some(p) = obj.get("attention_dropout").filter(|x| !x.is_null()) {
        if p.as_f64() != Some(0.0) {
            return refuse(
                "attention_dropout",
                format!("{p}: dropout on the attention weights is not supported (only 0)"),
            );
        }
    }
    let qwen = matches!(ty, DecoderType::Qwen2 | DecoderType::Qwen3);
    match ty {
        DecoderType::Llama | DecoderType::Gemma if set("sliding_window") => {
            let (w, max) = (int("sliding_window"), int("max_position_embeddings"));
            if w.zip(max).is_none_or(|(w, max)| w < max) {
                return refuse(
                    "sliding_window",
                    format!(
                        "{}: a window shorter than the {} positions the model takes is not a \
                         {family} setting (transformers' {} ignores it; a Mistral folder says \
                         model_type \"mistral\")",
                        obj["sliding_window"],
                        max.map_or("?".into(), |m| m.to_string()),
                        ty.causal_lm_class()
                    ),
                );
            }
        }
        _ if qwen
            && obj
                .get("use_sliding_window")
                .is_some_and(|x| !matches!(x, Value::Bool(false) | Value::Null)) =>
        {
            return refuse(
                "use_sliding_window",
                format!(
                    "{}: Qwen's sliding-window layers (from max_window_layers on) are not \
                     supported yet",
                    obj["use_sliding_window"]
                ),
            );
        }
        _ => {}
    }
    // Phi-3's dropout on the embeddings and the residual branches: Frugal trains without.
    if ty == DecoderType::Phi3 {
        for key in ["resid_pdrop", "embd_pdrop"] {
            if let Some(p) = obj.get(key).filter(|x| !x.is_null()) {
                if p.as_f64() != Some(0.0) {
                    return refuse(key, format!("{p}: dropout is not supported here (only 0)"));
                }
            }
        }
    }
    if let Some(map) = obj.get("auto_map").and_then(Value::as_object) {
        if let Some(k) = map.keys().find(|k| k.starts_with("AutoModel")) {
            return refuse(
                "auto_map",
                format!("{k} names custom modeling code, which Frugal does not run"),
            );
        }
    }
    // Every RoPE dict: the flat ones, and Gemma 3's per layer type (its sliding layers take
    // plain RoPE only).
    let mut ropes: Vec<(String, &serde_json::Map<String, Value>)> = Vec::new();
    for key in ["rope_parameters", "rope_scaling"] {
        let Some(r) = obj.get(key).and_then(Value::as_object) else {
            continue;
        };
        let nested = ["full_attention", "sliding_attention"]
            .into_iter()
            .filter_map(|t| Some((format!("{key}.{t}"), r.get(t)?.as_object()?)))
            .collect::<Vec<_>>();
        match nested.is_empty() {
            true => ropes.push((key.to_string(), r)),
            false => ropes.extend(nested),
        }
    }
    for (key, r) in ropes {
        let kind = r.get("rope_type").or_else(|| r.get("type"));
        let allowed: &[&str] = match key.ends_with(".sliding_attention") {
            true => &["default"],
            false => ROPE_TYPES,
        };
        if let Some(kind) = kind.filter(|k| !k.as_str().is_some_and(|k| allowed.contains(&k))) {
            let names: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
            return refuse(
                &key,
                format!(
                    "rope_type {kind} is not supported yet (only {})",
                    names.join(", ")
                ),
            );
        }
        if let Some(f) = r.get("partial_rotary_factor") {
            if f.as_f64() != Some(1.0) {
                return refuse(
                    &key,
                    format!("partial_rotary_factor {f} is not supported (only 1)"),
                );
            }
        }
    }
    let truthy = |x: &Value| match x {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    };
    if let Some(x) = obj
        .get("use_bidirectional_attention")
        .filter(|x| !matches!(x, Value::Null | Value::Bool(false)))
    {
        return refuse(
            "use_bidirectional_attention",
            format!(
                "{x}: attention to later positions (an embedding model such as EmbeddingGemma) \
                 is not supported: Frugal's decoders are causal"
            ),
        );
    }
    // Keys a family owns: Qwen's window keys (checked above: off), Gemma's (read by
    // [`gemma_settings`] and [`rope`]).
    let owned: &[&str] = match ty {
        DecoderType::Qwen2 | DecoderType::Qwen3 => {
            &["use_sliding_window", "max_window_layers", "layer_types"]
        }
        DecoderType::Gemma => &["hidden_activation"],
        DecoderType::Gemma2 => &[
            "hidden_activation",
            "layer_types",
            "query_pre_attn_scalar",
            "attn_logit_softcapping",
            "final_logit_softcapping",
        ],
        DecoderType::Gemma3Text => &[
            "hidden_activation",
            "layer_types",
            "query_pre_attn_scalar",
            "attn_logit_softcapping",
            "final_logit_softcapping",
            "rope_local_base_freq",
        ],
        // Phi-3's pre-training length, which its LongRoPE reads ([`rope`]).
        DecoderType::Phi3 => &["original_max_position_embeddings"],
        DecoderType::Llama | DecoderType::Mistral => &[],
    };
    let other = OTHER_FAMILIES
        .iter()
        .filter(|k| !owned.contains(k))
        .find(|k| obj.get(**k).is_some_and(truthy));
    if let Some(key) = other {
        return refuse(
            key,
            format!(
                "{} is not a {family} setting: it changes the outputs of other model families, \
                 so the file was made for another model",
                obj[*key]
            ),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rope_of(text: &str, ty: DecoderType) -> Result<RopeRead, Error> {
        rope(&serde_json::from_str(text).unwrap(), ty)
    }

    fn check(text: &str) -> Result<(), Error> {
        let v: Value = serde_json::from_str(text).unwrap();
        let ty = expect_decoder(&v)?;
        check_decoder_keys(&v, ty)
    }

    #[test]
    fn families_are_refused_by_name_with_the_reason() {
        let err = check(r#"{"model_type": "qwen2_moe"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with(
                "(mixture of experts); Frugal loads \"llama\", \"mistral\", \"qwen2\", \
                 \"qwen3\", \"gemma\", \"gemma2\", \"gemma3_text\" and \"phi3\" decoders"
            ),
            "{err}"
        );
        for t in [
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi3",
        ] {
            check(&format!(r#"{{"model_type": "{t}"}}"#)).unwrap();
        }
        let err = check(r#"{"model_type": "gpt2"}"#).unwrap_err().to_string();
        assert!(
            err.starts_with("model_type: \"gpt2\" is not supported ("),
            "{err}"
        );
        let err = check(r#"{"model_type": "bert"}"#).unwrap_err().to_string();
        assert!(err.contains("model.kind = \"encoder\""), "{err}");
        let err = check(r#"{"model_type": "my_model"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("model_type: \"my_model\" is not supported;"),
            "{err}"
        );
        let err = check("{}").unwrap_err().to_string();
        assert!(err.starts_with("model_type: missing"), "{err}");
    }

    #[test]
    fn llama_keys_that_change_outputs_are_refused_by_name() {
        let base = r#""model_type": "llama", "hidden_size": 32, "num_attention_heads": 4,
            "max_position_embeddings": 64"#;
        for (extra, key) in [
            (r#""attention_bias": 1"#, "attention_bias"),
            (r#""mlp_bias": "yes""#, "mlp_bias"),
            (r#""head_dim": 7"#, "head_dim"),
            (r#""num_key_value_heads": 3"#, "num_key_value_heads"),
            (r#""hidden_act": "gelu""#, "hidden_act"),
            (r#""attention_dropout": 0.1"#, "attention_dropout"),
            (r#""sliding_window": 16"#, "sliding_window"),
            (
                r#""architectures": ["LlamaForSequenceClassification"]"#,
                "architectures",
            ),
            (
                r#""rope_scaling": {"type": "su", "factor": 2.0}"#,
                "rope_scaling",
            ),
            (r#""qkv_bias": true"#, "qkv_bias"),
            (r#""auto_map": {"AutoModelForCausalLM": "m.M"}"#, "auto_map"),
        ] {
            let err = check(&format!("{{{base}, {extra}}}"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(&format!("{key}:")), "{extra}: {err}");
        }
        for extra in [
            r#""attention_bias": false, "mlp_bias": false, "head_dim": 8, "hidden_act": "silu""#,
            r#""sliding_window": 64, "attention_dropout": 0.0, "pretraining_tp": 2"#,
            r#""sliding_window": null, "unsloth_version": "x", "eos_token_id": [1, 2]"#,
            r#""head_dim": 16, "num_key_value_heads": 1"#,
            r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0}"#,
            r#""attention_bias": true, "mlp_bias": true"#,
        ] {
            check(&format!("{{{base}, {extra}}}")).unwrap();
        }
    }

    #[test]
    fn each_family_takes_its_own_keys_and_refuses_the_others() {
        let shape = r#""hidden_size": 32, "num_attention_heads": 4, "max_position_embeddings": 64"#;
        let ok = |t: &str, extra: &str| {
            check(&format!(r#"{{"model_type": "{t}", {shape}, {extra}}}"#)).unwrap();
        };
        ok(
            "mistral",
            r#""sliding_window": 8, "architectures": ["MistralForCausalLM"]"#,
        );
        ok(
            "qwen2",
            r#""use_sliding_window": false, "sliding_window": 16, "max_window_layers": 28,
                "layer_types": ["full_attention"], "attention_bias": true"#,
        );
        ok(
            "qwen3",
            r#""attention_bias": true, "use_sliding_window": null"#,
        );
        ok(
            "phi3",
            r#""resid_pdrop": 0.0, "embd_pdrop": 0, "original_max_position_embeddings": 4096,
                "sliding_window": 2047"#,
        );
        ok(
            "gemma",
            r#""hidden_act": "gelu", "hidden_activation": "gelu_pytorch_tanh""#,
        );
        ok(
            "gemma3_text",
            r#""rope_local_base_freq": 10000.0, "sliding_window_pattern": 6"#,
        );
        for (t, extra, start) in [
            (
                "mistral",
                r#""attention_bias": true"#,
                "attention_bias: true is not a mistral",
            ),
            (
                "qwen2",
                r#""mlp_bias": true"#,
                "mlp_bias: true is not a qwen2",
            ),
            (
                "qwen2",
                r#""use_sliding_window": true"#,
                "use_sliding_window: true",
            ),
            (
                "qwen3",
                r#""use_sliding_window": true"#,
                "use_sliding_window: true",
            ),
            (
                "llama",
                r#""layer_types": ["full_attention"]"#,
                "layer_types:",
            ),
            ("mistral", r#""sliding_window": -1"#, "sliding_window: -1"),
            (
                "qwen2",
                r#""architectures": ["LlamaForCausalLM"]"#,
                "architectures: \"LlamaForCausalLM\" is not supported (a qwen2",
            ),
            ("qwen3", r#""hidden_act": "gelu""#, "hidden_act:"),
            ("phi3", r#""resid_pdrop": 0.1"#, "resid_pdrop: 0.1: dropout"),
            (
                "phi3",
                r#""rope_scaling": {"type": "su", "short_factor": [1.0]}"#,
                "rope_scaling: rope_type \"su\"",
            ),
            (
                "llama",
                r#""original_max_position_embeddings": 4096"#,
                "original_max_position_embeddings:",
            ),
            (
                "gemma2",
                r#""hidden_activation": "relu""#,
                "hidden_activation:",
            ),
            (
                "gemma",
                r#""query_pre_attn_scalar": 256"#,
                "query_pre_attn_scalar:",
            ),
            (
                "gemma3_text",
                r#""rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2}}"#,
                "rope_parameters.sliding_attention: rope_type \"linear\"",
            ),
            (
                "llama",
                r#""use_bidirectional_attention": true"#,
                "use_bidirectional_attention:",
            ),
        ] {
            let v: Value =
                serde_json::from_str(&format!(r#"{{"model_type": "{t}", {shape}, {extra}}}"#))
                    .unwrap();
            let err = check_decoder_keys(&v, DecoderType::of(t).unwrap())
                .and_then(|_| sliding_window(&v, DecoderType::of(t).unwrap()).map(|_| ()))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(start), "{t} {extra}: {err}");
        }
        // Mistral without the key has transformers' 4096 window; null has none.
        let window = |extra: &str| {
            let v: Value =
                serde_json::from_str(&format!(r#"{{"model_type": "mistral", {shape}{extra}}}"#))
                    .unwrap();
            sliding_window(&v, DecoderType::Mistral).unwrap()
        };
        assert_eq!(window(""), Some(4096));
        assert_eq!(window(r#", "sliding_window": null"#), None);
        assert_eq!(window(r#", "sliding_window": 12"#), Some(12));
        let v: Value = serde_json::from_str(r#"{"model_type": "phi3"}"#).unwrap();
        assert_eq!(sliding_window(&v, DecoderType::Phi3).unwrap(), None);
        // LongRoPE: its factors are read, the pre-training length from the top (Phi-3's
        // layout), the extension from the lengths, and a missing list is named.
        let phi = |rope: &str| {
            let text = format!(
                r#"{{"model_type": "phi3", "max_position_embeddings": 128,
                    "original_max_position_embeddings": 16, "rope_scaling": {rope}}}"#
            );
            rope_of(&text, DecoderType::Phi3)
        };
        let r =
            phi(r#"{"type": "longrope", "short_factor": [1, 2], "long_factor": [3, 4]}"#).unwrap();
        let Some(crate::llama::RopeScaling::LongRope(l)) = r.scaling else {
            panic!("{:?}", r.scaling)
        };
        assert_eq!((l.factor, l.original_max_position_embeddings), (8.0, 16));
        assert_eq!(l.long_factor, [3.0, 4.0]);
        assert!((l.attention_factor() - (1.0 + 8f64.ln() / 16f64.ln()).sqrt()).abs() < 1e-12);
        // Written back, the top-level length stays (transformers' Phi-3 prefers it).
        let text = r#"{"model_type": "phi3", "vocab_size": 64, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
            "max_position_embeddings": 128, "original_max_position_embeddings": 16,
            "rope_scaling": {"type": "longrope", "short_factor": [1, 2], "long_factor": [3, 4]}}"#;
        let c = crate::llama::LlamaConfig::from_hf_json(text).unwrap();
        let written = serde_json::to_value(&c).unwrap();
        assert_eq!(written["original_max_position_embeddings"], 16);
        assert_eq!(
            crate::llama::LlamaConfig::from_hf_json(&written.to_string()).unwrap(),
            c
        );
        // Phi-3's top-level length wins over the RoPE parameters' own; absent, it is 4096.
        let r = phi(
            r#"{"type": "longrope", "short_factor": [1, 2], "long_factor": [3, 4],
            "original_max_position_embeddings": 32}"#,
        )
        .unwrap();
        let Some(crate::llama::RopeScaling::LongRope(l)) = r.scaling else {
            panic!("{:?}", r.scaling)
        };
        assert_eq!(l.original_max_position_embeddings, 16);
        let text = r#"{"model_type": "phi3", "max_position_embeddings": 8192,
            "rope_scaling": {"type": "longrope", "short_factor": [1], "long_factor": [2],
            "original_max_position_embeddings": 32}}"#;
        let r = rope_of(text, DecoderType::Phi3).unwrap();
        let Some(crate::llama::RopeScaling::LongRope(l)) = r.scaling else {
            panic!("{:?}", r.scaling)
        };
        assert_eq!((l.original_max_position_embeddings, l.factor), (4096, 2.0));
        let err = phi(r#"{"type": "longrope", "short_factor": [1, 2]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("rope_scaling.long_factor: must be a list of numbers"),
            "{err}"
        );
        // Gemma 2 alternates sliding and global layers; Gemma 3 has one global in six.
        let layers = |t: &str, n: i64| {
            let v: Value =
                serde_json::from_str(&format!(r#"{{"num_hidden_layers": {n}}}"#)).unwrap();
            gemma_settings(&v, DecoderType::of(t).unwrap())
                .unwrap()
                .layer_types
                .unwrap()
                .iter()
                .map(|l| matches!(l, crate::llama::LayerType::FullAttention))
                .collect::<Vec<_>>()
        };
        assert_eq!(layers("gemma2", 4), [false, true, false, true]);
        assert_eq!(
            layers("gemma3_text", 7),
            [false, false, false, false, false, true, false]
        );
    }
}
