//! PEFT's adapter folder: `adapter_config.json` and `adapter_model.safetensors`, whose keys are
//! `base_model.model.{layer}.lora_A.weight` `(r, in)`, `...lora_B.weight` `(out, r)` and, for
//! DoRA, `...lora_magnitude_vector` `(out,)` (no adapter name in the keys; FORMATS.md), and
//! the tensors of the modules saved whole (`modules_to_save`, a classifier's head) under their
//! own names, `base_model.model.classifier.weight`.

use crate::config::LoraConfig;
use crate::lora::Lora;
use frugal_core::safetensors_io::{self, SafetensorsFile};
use frugal_core::{atomic, Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The adapter's settings file.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's tensors.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The prefix PEFT puts before the base model's module names.
pub const KEY_PREFIX: &str = "base_model.model.";

/// The tensors of one layer's adapter, as read from a file (f32, CPU).
#[derive(Debug)]
pub struct LayerTensors {
    /// `A`, `(r, in / pool)`.
    pub a: Tensor,
    /// `B`, `(out, r)`.
    pub b: Tensor,
    /// DoRA's magnitude, `(out,)`.
    pub magnitude: Option<Tensor>,
}

/// An adapter folder read into memory.
#[derive(Debug)]
pub struct AdapterFile {
    /// The folder.
    pub dir: PathBuf,
    /// Its settings.
    pub config: LoraConfig,
    /// Its tensors, by layer name (`model.layers.0.self_attn.q_proj`).
    pub layers: BTreeMap<String, LayerTensors>,
    /// The tensors of the modules saved whole (`modules_to_save`), by the base model's name
    /// (`classifier.weight`), f32.
    pub modules: BTreeMap<String, Tensor>,
}

impl AdapterFile {
    /// Refuses a file with modules saved whole, for a model that cannot place them.
    pub fn without_modules(&self) -> Result<()> {
        match self.modules.keys().next() {
            None => Ok(()),
            Some(first) => Err(Error::Msg(format!(
                "{}: the adapter saves whole modules ({} tensors, e.g. '{first}', from \
                 modules_to_save); this model takes adapters without them",
                self.dir.display(),
                self.modules.len()
            ))),
        }
    }
}

/// PEFT's keys of layer `layer`'s adapter: A, B and the DoRA magnitude.
pub fn keys(layer: &str) -> [String; 3] {
    [
        format!("{KEY_PREFIX}{layer}.lora_A.weight"),
        format!("{KEY_PREFIX}{layer}.lora_B.weight"),
        format!("{KEY_PREFIX}{layer}.lora_magnitude_vector"),
    ]
}

/// Writes adapter `layers` (name, adapter) with settings `cfg` into folder `dir` as PEFT does,
/// replacing the folder as a whole (written beside it, then renamed): an interrupted write
/// leaves the previous adapter intact.
pub fn write(dir: &Path, cfg: &LoraConfig, layers: &[(String, &Lora)]) -> Result<()> {
    write_with_modules(dir, cfg, layers, &[])
}

/// [`write`] into an existing folder that holds other files too (a checkpoint): the two files
/// are written beside them, each atomically.
pub fn write_into(dir: &Path, cfg: &LoraConfig, layers: &[(String, &Lora)]) -> Result<()> {
    write_into_with_modules(dir, cfg, layers, &[])
}

/// [`write`] with the tensors of the modules saved whole (`modules_to_save`), by the base
/// model's name (`classifier.weight`): stored as PEFT stores them, in f32.
pub fn write_with_modules(
    dir: &Path,
    cfg: &LoraConfig,
    layers: &[(String, &Lora)],
    modules: &[(String, Tensor)],
) -> Result<()> {
    atomic::write_dir(dir, |tmp| {
        write_into_with_modules(tmp, cfg, layers, modules)
    })
}

/// [`write_into`] with the tensors of the modules saved whole (see [`write_with_modules`]).
pub fn write_into_with_modules(
    dir: &Path,
    cfg: &LoraConfig,
    layers: &[(String, &Lora)],
    modules: &[(String, Tensor)],
) -> Result<()> {
    let mut tensors = Vec::new();
    for (name, lora) in layers {
        let [a, b, m] = keys(name);
        let f32 = |t: &Tensor| t.detach().to_kind(Kind::Float).to_device(Device::Cpu);
        tensors.push((a, f32(&lora.a)));
        tensors.push((b, f32(&lora.b)));
        if let Some(mag) = &lora.magnitude {
            tensors.push((m, f32(mag)));
        }
    }
    for (name, t) in modules {
        if !cfg.saves(name) {
            return Err(Error::Msg(format!(
                "'{name}' is saved whole but is in no module of modules_to_save ({:?})",
                cfg.modules_to_save
            )));
        }
        let t = t.detach().to_kind(Kind::Float).to_device(Device::Cpu);
        tensors.push((format!("{KEY_PREFIX}{name}"), t));
    }
    let json = serde_json::to_string_pretty(&cfg.to_peft_json()).expect("plain JSON");
    safetensors_io::save(&dir.join(WEIGHTS_FILE), &tensors, None)?;
    atomic::write(&dir.join(CONFIG_FILE), json.as_bytes())
}

/// Reads an adapter folder written by PEFT or by [`write`]. Errors name the folder and the
/// file: a missing file, a key that is neither an adapter tensor nor one of a module of
/// `modules_to_save`, a layer without its A or B, or shapes that disagree with each other or
/// with `r`.
pub fn read(dir: &Path) -> Result<AdapterFile> {
    let cfg_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
        Error::Msg(format!(
            "{}: not an adapter folder ({CONFIG_FILE}: {e})",
            dir.display()
        ))
    })?;
    let config = LoraConfig::from_peft_json(&text, &cfg_path.display().to_string())?;
    let path = dir.join(WEIGHTS_FILE);
    if !path.is_file() {
        return Err(Error::Msg(format!(
            "{}: no {WEIGHTS_FILE} (adapters saved as .bin are not read; save with safetensors)",
            dir.display()
        )));
    }
    let file = SafetensorsFile::open(&path)?;
    let bad = |r: String| Error::Msg(format!("{}: {r}", path.display()));
    let mut parts: BTreeMap<String, [Option<Tensor>; 3]> = BTreeMap::new();
    let mut modules = BTreeMap::new();
    for key in file.names() {
        let rest = key.strip_prefix(KEY_PREFIX).ok_or_else(|| {
            bad(format!(
                "'{key}' is not a LoRA tensor (expected keys under '{KEY_PREFIX}')"
            ))
        })?;
        let lora_key = [".lora_A.", ".lora_B.", ".lora_magnitude_vector"]
            .iter()
            .any(|k| rest.contains(k));
        if !lora_key && config.saves(rest) {
            let t = file.tensor(&key, Device::Cpu)?.to_kind(Kind::Float);
            modules.insert(rest.to_string(), t);
            continue;
        }
        let (layer, slot) = if let Some(l) = rest.strip_suffix(".lora_A.weight") {
            (l, 0)
        } else if let Some(l) = rest.strip_suffix(".lora_B.weight") {
            (l, 1)
        } else if let Some(l) = rest
            .strip_suffix(".lora_magnitude_vector")
            .or_else(|| rest.strip_suffix(".lora_magnitude_vector.weight"))
        {
            (l, 2)
        } else {
            return Err(bad(format!(
                "'{key}' is not a LoRA tensor (lora_A, lora_B or lora_magnitude_vector) nor \
                 one of a module of modules_to_save; trained biases are not supported"
            )));
        };
        let t = file.tensor(&key, Device::Cpu)?.to_kind(Kind::Float);
        parts.entry(layer.to_string()).or_default()[slot] = Some(t);
    }
    let mut layers = BTreeMap::new();
    for (layer, [a, b, m]) in parts {
        let [ka, kb, km] = keys(&layer);
        let a = a.ok_or_else(|| bad(format!("'{kb}' has no '{ka}'")))?;
        let b = b.ok_or_else(|| bad(format!("'{ka}' has no '{kb}'")))?;
        let (sa, sb) = (a.size(), b.size());
        if sa.len() != 2 || sb.len() != 2 || sa[0] != config.r || sb[1] != config.r {
            return Err(bad(format!(
                "'{layer}': A {sa:?} and B {sb:?} are not (r, in) and (out, r) with r = {} \
                 (adapter_config.json)",
                config.r
            )));
        }
        if let Some(m) = &m {
            if m.size() != [sb[0]] {
                return Err(bad(format!(
                    "'{km}' has shape {:?}, expected [{}]",
                    m.size(),
                    sb[0]
                )));
            }
        }
        if config.use_dora != m.is_some() {
            return Err(bad(format!(
                "'{layer}': use_dora is {} in adapter_config.json but the magnitude '{km}' is {}",
                config.use_dora,
                if m.is_some() { "present" } else { "missing" }
            )));
        }
        layers.insert(layer, LayerTensors { a, b, magnitude: m });
    }
    if layers.is_empty() {
        return Err(bad("holds no adapter tensors".into()));
    }
    Ok(AdapterFile {
        dir: dir.to_path_buf(),
        config,
        layers,
        modules,
    })
}
