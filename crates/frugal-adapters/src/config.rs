//! What an adapter is: rank, scaling, initialisation, the layers it targets, and its
//! `adapter_config.json` in PEFT's form.

use frugal_core::{Error, Result};
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// How the adapter's matrices start (PEFT's `init_lora_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// A kaiming-uniform (a = sqrt 5, bound 1 / sqrt(in)), B zero: the adapter starts as the
    /// identity change (PEFT's `true`).
    #[default]
    Default,
    /// A ~ N(0, 1 / r), B zero (PEFT's `"gaussian"`).
    Gaussian,
    /// PiSSA: the top-r singular triplets of W move into B and A and leave W (dense bases
    /// only; PEFT's `"pissa"`).
    Pissa,
}

impl Init {
    /// PEFT's `init_lora_weights` value.
    pub fn peft_value(self) -> Value {
        match self {
            Init::Default => json!(true),
            Init::Gaussian => json!("gaussian"),
            Init::Pissa => json!("pissa"),
        }
    }
}

/// Which linear layers get an adapter (PEFT's `target_modules` / `exclude_modules`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    /// Names: a layer is chosen when its name equals one or ends with `.` + one
    /// (`q_proj` chooses `model.layers.0.self_attn.q_proj`).
    Names(Vec<String>),
    /// `"all-linear"`: every linear layer but the output head; any other string is a regular
    /// expression that must match the whole layer name.
    Pattern(String),
}

impl Default for Targets {
    /// LLaMA's default, `["q_proj", "v_proj"]` (see [`Targets::peft_default`]).
    fn default() -> Self {
        Targets::Names(vec!["q_proj".into(), "v_proj".into()])
    }
}

impl Targets {
    /// PEFT's default targets for a Hugging Face `model_type` (PEFT 0.21's
    /// `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`): `llama` `["q_proj", "v_proj"]`,
    /// `bert` `["query", "value"]`; None for a type Frugal has no adapters for.
    pub fn peft_default(model_type: &str) -> Option<Self> {
        let names: &[&str] = match model_type {
            "llama" => &["q_proj", "v_proj"],
            "bert" => &["query", "value"],
            _ => return None,
        };
        Some(Targets::Names(
            names.iter().map(|n| n.to_string()).collect(),
        ))
    }

    /// Whether layer `name` is chosen (`name` is never the output head, which the model keeps
    /// out of the candidates).
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Targets::Names(names) => names.iter().any(|t| name_matches(name, t)),
            Targets::Pattern(p) if p == "all-linear" => true,
            Targets::Pattern(p) => full_regex(p).is_ok_and(|re| re.is_match(name)),
        }
    }

    /// Checks that every entry chooses at least one of `layers` (a name or pattern that
    /// chooses none is a typo, not a wish); `key` names the config key in the error.
    pub fn check_against(&self, key: &str, layers: &[String]) -> Result<()> {
        let examples = || {
            let mut short: Vec<&str> = layers.iter().filter_map(|l| l.rsplit('.').next()).collect();
            short.sort();
            short.dedup();
            short.join(", ")
        };
        match self {
            Targets::Names(names) => {
                for t in names {
                    if !layers.iter().any(|l| name_matches(l, t)) {
                        return Err(Error::config(
                            key,
                            format!(
                                "'{t}' matches no linear layer of the model (its layers end in: {})",
                                examples()
                            ),
                        ));
                    }
                }
                Ok(())
            }
            Targets::Pattern(p) if p == "all-linear" => Ok(()),
            Targets::Pattern(p) => {
                let re = full_regex(p).map_err(|e| Error::config(key, e))?;
                if layers.iter().any(|l| re.is_match(l)) {
                    Ok(())
                } else {
                    Err(Error::config(
                        key,
                        format!(
                            "pattern '{p}' matches no linear layer of the model (names look like \
                             '{}')",
                            layers.first().map_or("", |s| s.as_str())
                        ),
                    ))
                }
            }
        }
    }

    fn to_peft(&self) -> Value {
        match self {
            Targets::Names(n) => json!(n),
            Targets::Pattern(p) => json!(p),
        }
    }

    fn from_peft(v: &Value, key: &str) -> Result<Option<Self>> {
        Ok(match v {
            Value::Null => None,
            Value::String(s) => Some(Targets::Pattern(s.clone())),
            Value::Array(items) => Some(Targets::Names(
                items
                    .iter()
                    .map(|i| {
                        i.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| Error::config(key, format!("{i} is not a module name")))
                    })
                    .collect::<Result<_>>()?,
            )),
            other => {
                return Err(Error::config(
                    key,
                    format!("{other} is neither a list of names nor a pattern"),
                ))
            }
        })
    }
}

fn name_matches(name: &str, target: &str) -> bool {
    name == target
        || name
            .strip_suffix(target)
            .is_some_and(|head| head.ends_with('.'))
}

fn full_regex(p: &str) -> std::result::Result<Regex, String> {
    Regex::new(&format!("^(?:{p})$")).map_err(|e| format!("'{p}' is not a valid pattern: {e}"))
}

/// A LoRA adapter's settings. `pool` > 1 makes it a QA-LoRA adapter, whose `A` reads the
/// average of each group of `pool` input columns.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank (PEFT's default 8).
    pub r: i64,
    /// Scale numerator (PEFT's default 8).
    pub alpha: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f64,
    /// rsLoRA: scale alpha / sqrt(r) instead of alpha / r.
    pub use_rslora: bool,
    /// DoRA: a learned magnitude per output row.
    pub use_dora: bool,
    /// How A and B start.
    pub init: Init,
    /// The layers that get the adapter.
    pub target_modules: Targets,
    /// Layers left out even when targeted.
    pub exclude_modules: Option<Targets>,
    /// QA-LoRA group size (1: plain LoRA).
    pub pool: i64,
    /// Where the base model came from (PEFT's `base_model_name_or_path`).
    pub base_model: Option<String>,
    /// PEFT's `task_type`: `"CAUSAL_LM"` (the default), `"SEQ_CLS"`, or None (a model PEFT has
    /// no task type for, such as a masked LM).
    pub task_type: Option<String>,
    /// Modules trained and saved whole beside the adapter (PEFT's `modules_to_save`, matched
    /// as module names are: equal, or ending in `.` + the entry), such as a new classifier.
    pub modules_to_save: Option<Vec<String>>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 8.0,
            dropout: 0.0,
            use_rslora: false,
            use_dora: false,
            init: Init::Default,
            target_modules: Targets::default(),
            exclude_modules: None,
            pool: 1,
            base_model: None,
            task_type: Some("CAUSAL_LM".into()),
            modules_to_save: None,
        }
    }
}

impl LoraConfig {
    /// The factor on `B A x`: alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Checks the values; errors name the key under `table` (`adapter.r`...).
    pub fn validate(&self, table: &str) -> Result<()> {
        let bad = |k: &str, r: String| Err(Error::config(format!("{table}.{k}"), r));
        if self.r < 1 {
            return bad("r", format!("{}: the rank must be at least 1", self.r));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return bad("alpha", format!("{}: must be positive", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout", format!("{}: must be in [0, 1)", self.dropout));
        }
        if self.pool < 1 {
            return bad("group_size", format!("{}: must be at least 1", self.pool));
        }
        if self.pool > 1 && (self.use_dora || self.init == Init::Pissa) {
            return bad(
                "kind",
                "QA-LoRA takes neither DoRA nor PiSSA (its delta must stay constant per group)"
                    .into(),
            );
        }
        if let Targets::Pattern(p) = &self.target_modules {
            if p != "all-linear" {
                full_regex(p).map_err(|e| Error::config(format!("{table}.target_modules"), e))?;
            }
        }
        if let Some(Targets::Pattern(p)) = &self.exclude_modules {
            full_regex(p).map_err(|e| Error::config(format!("{table}.exclude_modules"), e))?;
        }
        Ok(())
    }

    /// Whether layer `name` gets the adapter: targeted and not excluded.
    pub fn chooses(&self, name: &str) -> bool {
        self.target_modules.matches(name)
            && !self
                .exclude_modules
                .as_ref()
                .is_some_and(|e| e.matches(name))
    }

    /// Whether tensor `name` (`classifier.weight`) belongs to a module of
    /// [`LoraConfig::modules_to_save`]: one of its enclosing module paths (`classifier`,
    /// `bert.pooler.dense`, `bert.pooler`...) matches an entry as PEFT matches them.
    pub fn saves(&self, name: &str) -> bool {
        let Some(modules) = &self.modules_to_save else {
            return false;
        };
        let mut path = name;
        while let Some((head, _)) = path.rsplit_once('.') {
            if modules.iter().any(|m| name_matches(head, m)) {
                return true;
            }
            path = head;
        }
        false
    }

    /// `adapter_config.json` as PEFT writes it (the fields PEFT 0.21 reads, QA-LoRA's
    /// `use_qalora` and `qalora_group_size` among them).
    pub fn to_peft_json(&self) -> Value {
        let mut v = json!({
            "peft_type": "LORA",
            "task_type": self.task_type,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules.to_peft(),
            "exclude_modules": self.exclude_modules.as_ref().map(Targets::to_peft),
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "init_lora_weights": self.init.peft_value(),
            "rank_pattern": {},
            "alpha_pattern": {},
            "modules_to_save": self.modules_to_save,
            "layers_to_transform": null,
            "inference_mode": true,
            "base_model_name_or_path": self.base_model,
            "revision": null,
        });
        v["use_qalora"] = json!(self.pool > 1);
        if self.pool > 1 {
            v["qalora_group_size"] = json!(self.pool);
        }
        v
    }

    /// Reads `adapter_config.json` (`file` names it in errors). Missing fields take PEFT's
    /// defaults; what Frugal cannot honour (another PEFT type, trained biases, per-layer rank
    /// or alpha patterns, chosen layer indices, transposed weights) is an error naming the
    /// field. Modules saved whole (`modules_to_save`) are read here; the model that loads the
    /// adapter says whether it can place them.
    pub fn from_peft_json(text: &str, file: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::Msg(format!("{file}: not valid JSON: {e}")))?;
        let key = |k: &str| format!("{file}: {k}");
        let bad = |k: &str, r: String| Error::config(key(k), r);
        let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
        if peft_type != "LORA" {
            return Err(bad(
                "peft_type",
                format!("'{peft_type}': only LORA adapters are supported"),
            ));
        }
        let num = |k: &str, d: f64| -> Result<f64> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(d),
                Some(x) => x
                    .as_f64()
                    .ok_or_else(|| bad(k, format!("{x} is not a number"))),
            }
        };
        let flag = |k: &str| -> Result<bool> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(false),
                Some(x) => x
                    .as_bool()
                    .ok_or_else(|| bad(k, format!("{x} is not true or false"))),
            }
        };
        if let Some(b) = v.get("bias").and_then(Value::as_str) {
            if b != "none" {
                return Err(bad(
                    "bias",
                    format!("'{b}': adapters that train biases are not supported"),
                ));
            }
        }
        if flag("fan_in_fan_out")? {
            return Err(bad(
                "fan_in_fan_out",
                "true: transposed (Conv1D) weights are not supported".into(),
            ));
        }
        for k in ["rank_pattern", "alpha_pattern"] {
            if v.get(k)
                .and_then(Value::as_object)
                .is_some_and(|m| !m.is_empty())
            {
                return Err(bad(
                    k,
                    "per-layer ranks or alphas are not supported yet".into(),
                ));
            }
        }
        if v.get("layers_to_transform")
            .is_some_and(|m| !m.is_null() && m != &json!([]))
        {
            return Err(bad(
                "layers_to_transform",
                "is set; Frugal does not support it yet".into(),
            ));
        }
        let modules_to_save = match v.get("modules_to_save") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) if items.is_empty() => None,
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|i| {
                        i.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| bad("modules_to_save", format!("{i} is not a name")))
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
            Some(other) => {
                return Err(bad(
                    "modules_to_save",
                    format!("{other} is not a list of module names"),
                ))
            }
        };
        let task_type = match v.get("task_type") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => return Err(bad("task_type", format!("{other} is not a string"))),
        };
        let init = match v.get("init_lora_weights") {
            None | Some(Value::Null) | Some(Value::Bool(_)) => Init::Default,
            Some(Value::String(s)) if s == "gaussian" => Init::Gaussian,
            Some(Value::String(s)) if s == "pissa" || s.starts_with("pissa_niter_") => Init::Pissa,
            // Other initialisations only shape the first step; the weights are in the file.
            Some(_) => Init::Default,
        };
        let targets = Targets::from_peft(
            v.get("target_modules").unwrap_or(&Value::Null),
            &key("target_modules"),
        )?
        .ok_or_else(|| bad("target_modules", "is missing".into()))?;
        let cfg = Self {
            r: num("r", 8.0)? as i64,
            alpha: num("lora_alpha", 8.0)?,
            dropout: num("lora_dropout", 0.0)?,
            use_rslora: flag("use_rslora")?,
            use_dora: flag("use_dora")?,
            init,
            target_modules: targets,
            exclude_modules: Targets::from_peft(
                v.get("exclude_modules").unwrap_or(&Value::Null),
                &key("exclude_modules"),
            )?,
            pool: if flag("use_qalora")? {
                num("qalora_group_size", 16.0)? as i64
            } else {
                1
            },
            base_model: v
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string),
            task_type,
            modules_to_save,
        };
        cfg.validate(file)?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_match_like_peft() {
        let n = "model.layers.0.self_attn.q_proj";
        assert!(Targets::Names(vec!["q_proj".into()]).matches(n));
        assert!(!Targets::Names(vec!["_proj".into()]).matches(n));
        assert!(Targets::Names(vec!["self_attn.q_proj".into()]).matches(n));
        assert!(Targets::Pattern("all-linear".into()).matches(n));
        assert!(Targets::Pattern(r".*\.(q|v)_proj".into()).matches(n));
        assert!(
            !Targets::Pattern("q_proj".into()).matches(n),
            "a pattern is a full match"
        );
        let layers = vec![n.to_string(), "model.layers.0.mlp.up_proj".to_string()];
        let err = Targets::Names(vec!["qproj".into()])
            .check_against("adapter.target_modules", &layers)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'qproj'") && err.contains("q_proj, up_proj"),
            "{err}"
        );
    }

    #[test]
    fn peft_json_round_trip_and_refusals() {
        let c = LoraConfig {
            r: 4,
            alpha: 16.0,
            use_dora: true,
            target_modules: Targets::Pattern("all-linear".into()),
            ..LoraConfig::default()
        };
        let text = c.to_peft_json().to_string();
        assert_eq!(LoraConfig::from_peft_json(&text, "a.json").unwrap(), c);
        assert_eq!(c.scaling(), 4.0);
        let mut v = c.to_peft_json();
        v["bias"] = json!("all");
        let err = LoraConfig::from_peft_json(&v.to_string(), "a.json").unwrap_err();
        assert!(err.to_string().contains("a.json: bias"), "{err}");
        let mut v = c.to_peft_json();
        v["r"] = json!(0);
        let err = LoraConfig::from_peft_json(&v.to_string(), "a.json").unwrap_err();
        assert!(err.to_string().contains("a.json.r"), "{err}");
    }

    /// Guarantee: a classifier adapter's settings (`SEQ_CLS`, `modules_to_save`) round-trip
    /// through `adapter_config.json`; a tensor belongs to a saved module when one of its
    /// enclosing module names matches an entry as PEFT matches module names; BERT's default
    /// targets are PEFT's.
    #[test]
    fn modules_to_save_round_trip_and_match_like_peft() {
        let c = LoraConfig {
            task_type: Some("SEQ_CLS".into()),
            modules_to_save: Some(vec!["pooler".into(), "classifier".into(), "score".into()]),
            target_modules: Targets::peft_default("bert").unwrap(),
            ..LoraConfig::default()
        };
        let v = c.to_peft_json();
        assert_eq!(v["task_type"], "SEQ_CLS");
        assert_eq!(v["target_modules"], json!(["query", "value"]));
        assert_eq!(
            LoraConfig::from_peft_json(&v.to_string(), "a.json").unwrap(),
            c
        );
        assert!(c.saves("classifier.weight"));
        assert!(c.saves("bert.pooler.dense.bias"));
        assert!(!c.saves("bert.encoder.layer.0.output.dense.weight"));
        assert!(!c.saves("my_classifier.weight"));
        let mut masked = c.clone();
        (masked.task_type, masked.modules_to_save) = (None, None);
        let v = masked.to_peft_json();
        assert!(v["task_type"].is_null() && v["modules_to_save"].is_null());
        assert_eq!(
            LoraConfig::from_peft_json(&v.to_string(), "a.json").unwrap(),
            masked
        );
        assert_eq!(Targets::peft_default("llama"), Some(Targets::default()));
        assert_eq!(Targets::peft_default("hgrn_bit"), None);
    }
}
