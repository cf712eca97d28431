//! Adapters on the encoder (`adapter.kind` = `lora`, `dora`, `qlora`, `qalora` with
//! `model.kind = "encoder"`): LoRA on the blocks' linear layers
//! (`bert.encoder.layer.N.attention.self.query` ...), everything else of the base frozen. A
//! masked-LM adapter trains the adapter alone (the masked-LM head is the base's); a
//! classifier's adapter also trains the new pooler and classifier, which PEFT keeps as modules
//! saved whole.
//!
//! The adapter folder is PEFT's: for `BertForMaskedLM`, `task_type` null (PEFT has no
//! masked-LM task type; it writes null for such a model); for `BertForSequenceClassification`,
//! `task_type = "SEQ_CLS"` and `modules_to_save = ["pooler", "classifier", "score"]` with the
//! head's tensors under `base_model.model.bert.pooler.dense.*` and
//! `base_model.model.classifier.*`: what PEFT 0.21 writes for a `SEQ_CLS` LoRA with
//! `modules_to_save=["pooler"]` (PEFT adds `classifier` and `score` itself). So
//! `PeftModel.from_pretrained` on the base computes what Frugal computes.

use crate::config::Config;
use crate::encoder_model::{weights_mut_of, EncoderModel, Net};
use frugal_adapters::{peft, LoraConfig, Targets};
use frugal_core::{Error, Result};
use frugal_models::adapted;
use frugal_models::weights::named_variables;
use std::path::Path;
use tch::Tensor;

/// What a classifier's adapter saves whole: the pooler (new, as the classifier) and PEFT's
/// own `SEQ_CLS` heads (`classifier`, `score`).
pub const CLASSIFIER_MODULES_TO_SAVE: [&str; 3] = ["pooler", "classifier", "score"];

/// PEFT's task type of a classifier's adapter.
pub const SEQ_CLS: &str = "SEQ_CLS";

/// Whether variable `name` is part of a classifier's head (pooler, classifier).
fn is_classifier_head(name: &str) -> bool {
    name.starts_with("bert.pooler.") || name.starts_with("classifier.")
}

impl EncoderModel {
    /// Whether the model has the classification head.
    fn is_classifier(&self) -> bool {
        matches!(self.net, Net::Cls(_))
    }

    /// The linear layers PEFT sees in the Hugging Face model beside the blocks' (the heads'),
    /// which a name or pattern of `target_modules` might also choose there.
    fn head_linears(&self) -> &'static [&'static str] {
        if self.is_classifier() {
            &["bert.pooler.dense", "classifier"]
        } else {
            &["cls.predictions.transform.dense", "cls.predictions.decoder"]
        }
    }

    /// Adds a new adapter with the settings of `cfg.adapter` to the blocks' linear layers and
    /// freezes the rest of the base (a classifier's new head stays trainable); returns what
    /// the optimizer trains, sorted by name.
    pub fn add_adapter(&mut self, cfg: &Config) -> Result<Vec<(String, Tensor)>> {
        let mut lora = cfg.adapter.lora(cfg.model.kind);
        lora.base_model =
            (!cfg.model.from_pretrained.is_empty()).then(|| cfg.model.from_pretrained.clone());
        if self.is_classifier() {
            lora.task_type = Some(SEQ_CLS.into());
            lora.modules_to_save = Some(CLASSIFIER_MODULES_TO_SAVE.map(String::from).to_vec());
        } else {
            lora.task_type = None;
        }
        let chosen = adapted::add_adapter(
            &self.vs,
            weights_mut_of(&mut self.net).0,
            &cfg.adapter.name,
            &lora,
            "adapter",
        )?;
        let blocks: Vec<String> = self.linears().into_iter().map(|(n, _)| n).collect();
        let all: Vec<&str> = blocks
            .iter()
            .map(String::as_str)
            .chain(self.head_linears().iter().copied())
            .collect();
        lora.target_modules = peft_targets(&lora, &chosen, &all);
        eprintln!(
            "frugal: {} adapter on {} layers (r {}, alpha {}){}",
            cfg.adapter.kind,
            chosen.len(),
            lora.r,
            lora.alpha,
            if self.is_classifier() {
                "; the pooler and classifier train too"
            } else {
                ""
            }
        );
        self.adapter = Some(lora);
        Ok(self.freeze())
    }

    /// Loads the adapter folder `dir` (PEFT's format) as adapter `name`, with the modules it
    /// saves whole, and freezes the rest of the base; returns what the optimizer trains. A
    /// classifier's adapter must hold the head (pooler and classifier): this model's are new.
    pub fn load_adapter(&mut self, dir: &Path, name: &str) -> Result<Vec<(String, Tensor)>> {
        let file = peft::read(dir)?;
        if self.is_classifier() {
            for (n, _) in named_variables(&self.vs) {
                if is_classifier_head(&n) && !file.modules.contains_key(&n) {
                    return Err(Error::Msg(format!(
                        "{}: a classifier's adapter must save its head, the pooler and the \
                         classifier (modules_to_save = [\"pooler\", \"classifier\"]); '{n}' \
                         is not in it",
                        dir.display()
                    )));
                }
            }
        } else if file.config.task_type.as_deref() == Some(SEQ_CLS) {
            return Err(Error::Msg(format!(
                "{}: a classifier's adapter (task_type SEQ_CLS) on a masked-LM model",
                dir.display()
            )));
        }
        adapted::load_adapter(&self.vs, weights_mut_of(&mut self.net).0, name, &file)?;
        adapted::load_saved_modules(&self.vs, &file)?;
        self.adapter = Some(file.config);
        Ok(self.freeze())
    }

    /// Freezes every variable but the adapter's and those of the modules it saves whole;
    /// returns the trainable ones, sorted by name.
    fn freeze(&self) -> Vec<(String, Tensor)> {
        let mut trainable = adapted::freeze_base(&self.vs);
        if let Some(cfg) = &self.adapter {
            for (n, t) in named_variables(&self.vs) {
                if cfg.saves(&n) {
                    let _ = t.shallow_clone().set_requires_grad(true);
                    trainable.push((n, t));
                }
            }
        }
        trainable.sort_by(|a, b| a.0.cmp(&b.0));
        trainable
    }

    /// The adapter's settings, layers and the tensors of the modules it saves whole.
    #[allow(clippy::type_complexity)]
    fn adapter_parts(
        &self,
    ) -> Result<(
        &LoraConfig,
        Vec<(String, &dyn frugal_models::linear::Linear)>,
        Vec<(String, Tensor)>,
    )> {
        let cfg = self
            .adapter
            .as_ref()
            .ok_or_else(|| Error::Msg("the model has no adapter".into()))?;
        let modules = named_variables(&self.vs)
            .into_iter()
            .filter(|(n, _)| cfg.saves(n))
            .collect();
        Ok((cfg, self.linears(), modules))
    }

    /// Writes the adapter as a PEFT folder `dir` (replaced as a whole).
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        let (cfg, linears, modules) = self.adapter_parts()?;
        let layers = adapted::active_adapters(&linears);
        peft::write_with_modules(dir, cfg, &layers, &modules)
    }

    /// Writes the adapter's two PEFT files into `dir`, beside other files (a checkpoint).
    pub(crate) fn save_adapter_into(&self, dir: &Path) -> Result<()> {
        let (cfg, linears, modules) = self.adapter_parts()?;
        let layers = adapted::active_adapters(&linears);
        peft::write_into_with_modules(dir, cfg, &layers, &modules)
    }

    /// Switches the adapters' dropout on (training) or off.
    pub fn set_training(&mut self, training: bool) {
        adapted::set_training(self.linears_mut(), training);
    }
}

/// The `target_modules` to write for PEFT: the configured ones when, matched against every
/// linear layer of the Hugging Face model (`all`: the blocks' and the heads'), they choose
/// exactly the adapted layers `chosen`; otherwise (`"all-linear"` or a name such as `dense`,
/// which in PEFT would also choose the heads' layers) the list of the adapted layers' names.
fn peft_targets(lora: &LoraConfig, chosen: &[String], all: &[&str]) -> Targets {
    let exact = all
        .iter()
        .all(|n| lora.chooses(n) == chosen.iter().any(|c| c == n))
        && !matches!(&lora.target_modules, Targets::Pattern(p) if p == "all-linear");
    if exact {
        lora.target_modules.clone()
    } else {
        Targets::Names(chosen.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guarantee: the targets written for PEFT choose in the Hugging Face model exactly the
    /// layers Frugal adapted: BERT's default names stay as they are; `"all-linear"` and
    /// `dense` (which in PEFT would also take the heads' dense layers) become the list of the
    /// adapted layers.
    #[test]
    fn peft_targets_choose_the_adapted_layers_only() {
        let blocks = [
            "bert.encoder.layer.0.attention.self.query",
            "bert.encoder.layer.0.attention.self.value",
            "bert.encoder.layer.0.attention.output.dense",
            "bert.encoder.layer.0.output.dense",
        ];
        let all: Vec<&str> = blocks
            .iter()
            .copied()
            .chain(["cls.predictions.transform.dense", "cls.predictions.decoder"])
            .collect();
        let with = |t: Targets| LoraConfig {
            target_modules: t,
            ..LoraConfig::default()
        };
        let chosen = |l: &LoraConfig| -> Vec<String> {
            blocks
                .iter()
                .filter(|b| l.chooses(b))
                .map(|b| b.to_string())
                .collect()
        };
        let qv = with(Targets::peft_default("bert").unwrap());
        assert_eq!(
            peft_targets(&qv, &chosen(&qv), &all),
            qv.target_modules,
            "PEFT's default is kept"
        );
        for t in [
            Targets::Pattern("all-linear".into()),
            Targets::Names(vec!["dense".into()]),
        ] {
            let l = with(t);
            let c = chosen(&l);
            assert_eq!(peft_targets(&l, &c, &all), Targets::Names(c));
        }
    }
}
