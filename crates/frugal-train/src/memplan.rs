//! The memory a configuration needs, by category, computed from shapes alone (nothing is
//! allocated): what `frugal train --dry-run` prints and what the run's `memory.json` puts
//! beside its measurement, together with what plain AdamW with full gradients (no
//! checkpointing, no chunking) would need for the same model and batch.
//!
//! Optimizer state per parameter tensor of `n` values (f32 parameters; with
//! `train.param_dtype = "bf16"` the parameters, gradients and non-8-bit moments take 2 bytes
//! per value instead of 4):
//! - AdamW: two moments, `8n` bytes;
//! - 8-bit AdamW: tensors of at least 4096 values keep two 1-byte moments and one f32 absmax
//!   per block of 256 per moment, `2n + 8⌈n/256⌉`; smaller ones `8n`;
//! - Adafactor: a 2-D or larger tensor keeps a row and a column factor (`4(rows + cols)`
//!   over its last two dimensions), others the full second moment `4n`; plus a first moment
//!   `4n` when `beta1` is on;
//! - GaLore: a projected `(m, n)` weight keeps its optimizer's state of the projected gradient
//!   (`r·max(m, n)` values for `std`, `r·min(m, n)` for `reverse_std`, `r·r` for `full`) and
//!   the basis, `r·min(m, n)` values in the parameters' format (both factors for `full`).
//!
//! Activations are an estimate for the LLaMA block (per token and block: the two norm inputs
//! in f32, and nine widths of `d` and four of the MLP width in the compute kind saved for the
//! backward pass; attention's saved state is linear in the sequence with the fused kernels),
//! plus the logits of the cross-entropy (three `vocab`-wide f32 rows per token: logits, their
//! log-softmax and its gradient).

use crate::config::{Config, Dtype, OptimizerName};
use frugal_core::memory::human_bytes;
use frugal_galore::ProjType;
use frugal_models::llama::LlamaConfig;
use serde_json::{json, Value};

/// One parameter tensor: its name and shape.
#[derive(Debug, Clone)]
pub struct Param {
    /// Hugging Face name.
    pub name: String,
    /// Shape.
    pub shape: Vec<i64>,
}

/// The trainable parameters of a LLaMA model of shape `shape` with dense linear layers.
pub fn llama_params(shape: &LlamaConfig) -> Vec<Param> {
    let (d, f, v) = (shape.hidden_size, shape.intermediate_size, shape.vocab_size);
    let p = |name: String, s: &[i64]| Param {
        name,
        shape: s.to_vec(),
    };
    let mut out = vec![p("model.embed_tokens.weight".into(), &[v, d])];
    for i in 0..shape.num_hidden_layers {
        let b = format!("model.layers.{i}");
        out.push(p(format!("{b}.input_layernorm.weight"), &[d]));
        let (q, kv) = (shape.q_width(), shape.kv_width());
        for (n, s) in [
            ("q_proj", [q, d]),
            ("k_proj", [kv, d]),
            ("v_proj", [kv, d]),
            ("o_proj", [d, q]),
        ] {
            out.push(p(format!("{b}.self_attn.{n}.weight"), &s));
        }
        out.push(p(format!("{b}.post_attention_layernorm.weight"), &[d]));
        out.push(p(format!("{b}.mlp.gate_proj.weight"), &[f, d]));
        out.push(p(format!("{b}.mlp.up_proj.weight"), &[f, d]));
        out.push(p(format!("{b}.mlp.down_proj.weight"), &[d, f]));
    }
    out.push(p("model.norm.weight".into(), &[d]));
    out.push(p("lm_head.weight".into(), &[v, d]));
    out
}

fn numel(shape: &[i64]) -> u64 {
    shape.iter().product::<i64>().max(0) as u64
}

/// Bytes of optimizer state of `base` (`adamw`, `adamw8bit`, `adafactor`) for a tensor of
/// `shape`, whose moments (other than 8-bit ones) take `pb` bytes per value.
fn base_state(base: OptimizerName, shape: &[i64], beta1: bool, pb: u64) -> u64 {
    let n = numel(shape);
    match base {
        OptimizerName::Adamw8bit if n >= 4096 => 2 * n + 8 * n.div_ceil(256),
        OptimizerName::Adamw8bit => 8 * n,
        OptimizerName::Adafactor => {
            let second = if shape.len() >= 2 {
                let cols = shape[shape.len() - 1] as u64;
                let rows = n / cols.max(1);
                pb * (rows + cols)
            } else {
                pb * n
            };
            second + if beta1 { pb * n } else { 0 }
        }
        _ => 2 * pb * n,
    }
}

/// Bytes per stored parameter value.
fn param_bytes(cfg: &Config) -> u64 {
    match cfg.train.param_dtype {
        Dtype::F32 => 4,
        Dtype::Bf16 => 2,
    }
}

/// Bytes of optimizer state (projector included) for one parameter under `cfg.optim`.
pub fn state_bytes(cfg: &Config, p: &Param) -> u64 {
    let o = &cfg.optim;
    let beta1 = if o.base() == OptimizerName::Adafactor {
        o.adafactor.beta1.is_some()
    } else {
        o.beta1 > 0.0
    };
    let pb = param_bytes(cfg);
    if !o.projects(&p.name, &p.shape) {
        return base_state(o.base(), &p.shape, beta1, pb);
    }
    let (m, n) = (p.shape[0], p.shape[1]);
    let r = (o.galore.rank as i64).min(m.min(n));
    let (low, basis): (Vec<i64>, i64) = match o.galore.proj_type {
        ProjType::ReverseStd => (vec![r, m.min(n)], r * m.max(n)),
        ProjType::Left => (vec![r, n], r * m),
        ProjType::Right => (vec![m, r], r * n),
        ProjType::Full => (vec![r, r], r * (m + n)),
        ProjType::Std => (vec![r, m.max(n)], r * m.min(n)),
    };
    base_state(o.base(), &low, beta1, pb) + pb * basis as u64
}

/// The accounting of a configuration, in bytes by category.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    /// `(category, bytes)`: parameters, frozen quantized weights, gradients, optimizer state,
    /// activations, logits.
    pub rows: Vec<(&'static str, u64)>,
}

impl MemoryPlan {
    /// The sum of every category.
    pub fn total(&self) -> u64 {
        self.rows.iter().map(|r| r.1).sum()
    }

    /// Bytes of one category (0 when absent).
    pub fn get(&self, category: &str) -> u64 {
        self.rows
            .iter()
            .find(|r| r.0 == category)
            .map_or(0, |r| r.1)
    }

    /// As `memory.json`'s record: bytes by category and their total.
    pub fn to_record(&self) -> frugal_records::PlannedBytes {
        frugal_records::PlannedBytes::new(
            self.rows
                .iter()
                .map(|(k, v)| ((*k).to_string(), *v))
                .collect(),
        )
    }

    /// As JSON: `{category: bytes, ..., "total": bytes}`.
    pub fn to_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        for (k, v) in &self.rows {
            m.insert((*k).into(), json!(v));
        }
        m.insert("total".into(), json!(self.total()));
        Value::Object(m)
    }
}

/// The memory `cfg` needs for a model of `shape`, and what plain AdamW with full gradients
/// would need for the same model and batch.
pub fn plan(cfg: &Config, shape: &LlamaConfig) -> (MemoryPlan, MemoryPlan) {
    let t = &cfg.train;
    let mut params = llama_params(shape);
    // Frozen quantized layers are not trained: no gradient, no state.
    let quant = cfg.model.linear.quant_format().ok().flatten();
    let mut frozen = 0u64;
    if let Some(format) = &quant {
        let bits = match format.name() {
            "nf4" | "fp4" | "int4" => 4.5,
            "int8" => 8.25,
            _ => 2.0,
        };
        params.retain(|p| {
            let linear = p.name.contains("_proj.");
            if linear {
                frozen += (numel(&p.shape) as f64 * bits / 8.0) as u64;
            }
            !linear
        });
    }
    let pb = param_bytes(cfg);
    let weights: u64 = params.iter().map(|p| pb * numel(&p.shape)).sum();
    let full_grads = weights;
    let grads = if cfg.optim.layerwise {
        // One group at a time: the largest of embedding, a block, the head.
        let group = |pred: &dyn Fn(&str) -> bool| -> u64 {
            params
                .iter()
                .filter(|p| pred(&p.name))
                .map(|p| pb * numel(&p.shape))
                .sum()
        };
        let embed = group(&|n| n.starts_with("model.embed_tokens."));
        let block = group(&|n| n.starts_with("model.layers.0."));
        let head = group(&|n| !n.starts_with("model.layers.") && !n.starts_with("model.embed"));
        embed.max(block).max(head)
    } else {
        full_grads
    };
    let state: u64 = params.iter().map(|p| state_bytes(cfg, p)).sum();
    let adamw_state: u64 = params.iter().map(|p| 8 * numel(&p.shape)).sum();

    let tokens = (t.batch_size * t.seq_len) as u64;
    let (d, f, v) = (
        shape.hidden_size as u64,
        shape.intermediate_size as u64,
        shape.vocab_size as u64,
    );
    let c = match t.dtype {
        Dtype::F32 => 4,
        Dtype::Bf16 => 2,
    };
    let per_block = tokens * (8 * d + c * (9 * d + 4 * f));
    let layers = shape.num_hidden_layers as u64;
    let full_acts = tokens * 4 * d + layers * per_block;
    let acts = if t.checkpointing {
        tokens * 4 * d * (layers + 1) + per_block
    } else {
        full_acts
    };
    let logit_rows = if t.ce_chunk > 0 {
        (t.ce_chunk as u64).min(tokens)
    } else {
        tokens
    };
    let ours = MemoryPlan {
        rows: vec![
            ("parameters", weights),
            ("frozen_quantized", frozen),
            ("gradients", grads),
            ("optimizer_state", state),
            ("activations", acts),
            ("logits", 3 * 4 * v * logit_rows),
        ],
    };
    let all_params: u64 = llama_params(shape)
        .iter()
        .map(|p| 4 * numel(&p.shape))
        .sum();
    let baseline = MemoryPlan {
        rows: vec![
            ("parameters", all_params),
            ("frozen_quantized", 0),
            ("gradients", all_params),
            ("optimizer_state", adamw_state.max(2 * all_params)),
            ("activations", full_acts),
            ("logits", 3 * 4 * v * tokens),
        ],
    };
    (ours, baseline)
}

/// The accounting as a table: category, this configuration, AdamW with full gradients,
/// ratio.
pub fn table(ours: &MemoryPlan, adamw: &MemoryPlan) -> String {
    let mut s = format!(
        "{:<18} {:>12} {:>14} {:>7}\n",
        "category", "this run", "AdamW (full)", "ratio"
    );
    let ratio = |a: u64, b: u64| {
        if b == 0 {
            "-".to_string()
        } else {
            format!("{:.2}x", a as f64 / b as f64)
        }
    };
    for ((k, a), (_, b)) in ours.rows.iter().zip(&adamw.rows) {
        s += &format!(
            "{:<18} {:>12} {:>14} {:>7}\n",
            k,
            human_bytes(*a),
            human_bytes(*b),
            ratio(*a, *b)
        );
    }
    let (a, b) = (ours.total(), adamw.total());
    s += &format!(
        "{:<18} {:>12} {:>14} {:>7}\n",
        "total",
        human_bytes(a),
        human_bytes(b),
        ratio(a, b)
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_with(name: &str) -> Config {
        let mut c = Config::default();
        c.optim.name = serde_json::from_value(json!(name)).expect("an optimizer name");
        c
    }

    /// Guarantee: with grouped-query attention and an explicit head width, the parameter list
    /// has k/v of kv_heads · head_dim rows and q/o of heads · head_dim, and sums to
    /// `LlamaConfig::num_parameters`.
    #[test]
    fn gqa_parameters_have_kv_shapes() {
        let mut shape = LlamaConfig::preset("60m").unwrap();
        shape.num_key_value_heads = 2;
        shape.head_dim = Some(128);
        let params = llama_params(&shape);
        let get = |n: &str| {
            params
                .iter()
                .find(|p| p.name == format!("model.layers.0.self_attn.{n}.weight"))
                .unwrap()
                .shape
                .clone()
        };
        assert_eq!(get("q_proj"), [8 * 128, 512]);
        assert_eq!(get("k_proj"), [2 * 128, 512]);
        assert_eq!(get("v_proj"), [2 * 128, 512]);
        assert_eq!(get("o_proj"), [512, 8 * 128]);
        let n: u64 = params.iter().map(|p| numel(&p.shape)).sum();
        assert_eq!(n as i64, shape.num_parameters());
    }

    /// Guarantee: the parameter list is the model's (names and sizes), and the optimizer
    /// formulas give what the optimizers hold: AdamW 8 bytes per value, 8-bit ~2, GaLore the
    /// projected state plus the basis.
    #[test]
    fn accounting_follows_the_formulas() {
        let shape = LlamaConfig::preset("60m").unwrap();
        let params = llama_params(&shape);
        let n: u64 = params.iter().map(|p| numel(&p.shape)).sum();
        let d = shape.hidden_size as u64;
        let f = shape.intermediate_size as u64;
        let v = shape.vocab_size as u64;
        let l = shape.num_hidden_layers as u64;
        assert_eq!(n, 2 * v * d + l * (4 * d * d + 3 * d * f + 2 * d) + d);

        let w = Param {
            name: "model.layers.0.mlp.up_proj.weight".into(),
            shape: vec![1376, 512],
        };
        let cfg = cfg_with("adamw");
        assert_eq!(state_bytes(&cfg, &w), 8 * 1376 * 512);
        let cfg = cfg_with("adamw8bit");
        assert_eq!(
            state_bytes(&cfg, &w),
            2 * 1376 * 512 + 8 * (1376 * 512 / 256)
        );
        let mut cfg = cfg_with("galore-adamw");
        cfg.optim.galore.rank = 128;
        // std on a tall (1376, 512) weight: right projection, state (1376, 128), basis (128, 512).
        assert_eq!(state_bytes(&cfg, &w), 8 * 1376 * 128 + 4 * 128 * 512);
        // The embedding is not a target module: plain AdamW.
        let e = Param {
            name: "model.embed_tokens.weight".into(),
            shape: vec![32000, 512],
        };
        assert_eq!(state_bytes(&cfg, &e), 8 * 32000 * 512);
    }

    /// Guarantee: per-layer updates, checkpointing and chunking shrink the categories they
    /// touch, and the AdamW column does not move with them.
    #[test]
    fn options_shrink_their_category() {
        let shape = LlamaConfig::preset("130m").unwrap();
        let mut cfg = cfg_with("galore-adamw8bit");
        let (plain, base) = plan(&cfg, &shape);
        cfg.optim.layerwise = true;
        cfg.train.checkpointing = true;
        cfg.train.ce_chunk = 256;
        let (lean, base2) = plan(&cfg, &shape);
        assert_eq!(base, base2);
        assert!(lean.get("gradients") * 5 < plain.get("gradients"));
        assert!(lean.get("activations") * 3 < plain.get("activations"));
        assert!(lean.get("logits") * 7 < plain.get("logits"));
        assert_eq!(plain.get("gradients"), base.get("gradients"));
        assert!(plain.get("optimizer_state") * 3 < base.get("optimizer_state"));
        let t = table(&lean, &base);
        assert!(t.contains("optimizer_state") && t.contains("total"), "{t}");
    }
}
