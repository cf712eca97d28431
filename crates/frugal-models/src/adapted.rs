//! Adapters (`frugal_adapters`) on the models' linear layers: a layer with adapters wraps its
//! base layer (dense, quantized or TT), holds one or more named adapters with one active, and
//! can merge the active one into a dense base and unmerge it. The functions here add adapters
//! to a model's layers, load them from PEFT folders, freeze the base and list what to save.

use crate::linear::Linear;
use crate::weights::path_of;
use frugal_adapters::peft::AdapterFile;
use frugal_adapters::{Lora, LoraConfig};
use frugal_core::{Error, Result};
use tch::nn::VarStore;
use tch::Tensor;

/// A linear layer with adapters.
#[derive(Debug)]
pub struct Adapted {
    base: Box<dyn Linear>,
    adapters: Vec<(String, Lora)>,
    active: Option<usize>,
    /// The adapter merged into the dense base weight, with DoRA's row norms at merge time.
    merged: Option<(usize, Option<Tensor>)>,
    training: bool,
}

/// A stand-in while a layer is moved into its wrapper.
#[derive(Debug)]
struct Moved;

impl Linear for Moved {
    fn forward(&self, _: &Tensor) -> Tensor {
        unreachable!("a layer is never used while it is being wrapped")
    }
    fn shape(&self) -> (i64, i64) {
        (0, 0)
    }
    fn weight_f32(&self) -> Tensor {
        unreachable!("a layer is never used while it is being wrapped")
    }
}

impl Adapted {
    /// The base layer.
    pub fn base(&self) -> &dyn Linear {
        self.base.as_ref()
    }

    /// The adapters' names, in the order they were added.
    pub fn names(&self) -> Vec<&str> {
        self.adapters.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Adapter `name`.
    pub fn adapter(&self, name: &str) -> Option<&Lora> {
        self.adapters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, l)| l)
    }

    /// The active adapter and its name.
    pub fn active(&self) -> Option<(&str, &Lora)> {
        self.active
            .map(|i| (self.adapters[i].0.as_str(), &self.adapters[i].1))
    }

    /// Makes adapter `name` the active one (None: none is); refused while one is merged.
    pub fn set_active(&mut self, name: Option<&str>) -> Result<()> {
        if self.merged.is_some() {
            return Err(Error::Msg(
                "an adapter is merged into this layer: unmerge it before switching".into(),
            ));
        }
        self.active = match name {
            None => None,
            Some(n) => Some(
                self.adapters
                    .iter()
                    .position(|(a, _)| a == n)
                    .ok_or_else(|| Error::Msg(format!("no adapter named '{n}'")))?,
            ),
        };
        Ok(())
    }

    /// Whether an adapter is merged into the base weight.
    pub fn is_merged(&self) -> bool {
        self.merged.is_some()
    }

    /// Merges the active adapter into the dense base weight (computed in f32, stored in the
    /// weight's kind); the layer then computes the base alone. Only a dense base can hold the
    /// merge: a quantized base merges through [`Adapted::merged_weight`] into a new dense
    /// weight, or QA-LoRA's int4 merge.
    pub fn merge(&mut self) -> Result<()> {
        let Some(i) = self.active else {
            return Ok(());
        };
        if self.merged.is_some() {
            return Ok(());
        }
        let w = self.base.dense_weight().ok_or_else(|| {
            Error::Msg("only a dense base weight can hold a merged adapter in place".into())
        })?;
        let (merged, norms) = self.adapters[i].1.merged(w);
        tch::no_grad(|| w.shallow_clone().copy_(&merged.to_kind(w.kind())));
        self.merged = Some((i, norms));
        Ok(())
    }

    /// Takes the merged adapter back out of the base weight.
    pub fn unmerge(&mut self) -> Result<()> {
        let Some((i, norms)) = self.merged.take() else {
            return Ok(());
        };
        let w = self
            .base
            .dense_weight()
            .expect("merged into a dense weight");
        let back = self.adapters[i].1.unmerged(w, norms.as_ref());
        tch::no_grad(|| w.shallow_clone().copy_(&back.to_kind(w.kind())));
        Ok(())
    }

    /// The weight with the active adapter merged, as a new dense f32 tensor `(out, in)` (the
    /// base dequantized or reconstructed first); the base weight when none is active.
    pub fn merged_weight(&self) -> Tensor {
        let w = self.base.weight_f32();
        match (self.active, &self.merged) {
            (Some(i), None) => self.adapters[i].1.merged(&w).0,
            _ => w,
        }
    }
}

impl Linear for Adapted {
    fn forward(&self, x: &Tensor) -> Tensor {
        let base_out = self.base.forward(x);
        let Some(i) = self.active.filter(|_| self.merged.is_none()) else {
            return base_out;
        };
        let lora = &self.adapters[i].1;
        let x = x.to_kind(base_out.kind());
        let device = x.device();
        lora.apply(
            &x,
            &base_out,
            || self.base.weight_f32().to_device(device),
            |xd| self.base.forward(xd),
            self.training,
        )
    }

    fn shape(&self) -> (i64, i64) {
        self.base.shape()
    }

    fn dense_weight(&self) -> Option<&Tensor> {
        self.base.dense_weight()
    }

    fn weight_f32(&self) -> Tensor {
        self.base.weight_f32()
    }

    fn quantized(&self) -> Option<&frugal_quant::layer::QuantizedLinear> {
        self.base.quantized()
    }

    fn quantized_mut(&mut self) -> Option<&mut frugal_quant::layer::QuantizedLinear> {
        self.base.quantized_mut()
    }

    fn tt(&self) -> Option<&frugal_tt::TtLinear> {
        self.base.tt()
    }

    fn tt_mut(&mut self) -> Option<&mut frugal_tt::TtLinear> {
        self.base.tt_mut()
    }

    fn tt_eps(&self) -> Option<f64> {
        self.base.tt_eps()
    }

    fn accepts(&self, w: &frugal_quant::layer::QuantizedWeight) -> std::result::Result<(), String> {
        self.base.accepts(w)
    }

    fn bit_linear(&self) -> Option<&crate::linear::BitLinear> {
        self.base.bit_linear()
    }

    fn adapted(&self) -> Option<&Adapted> {
        Some(self)
    }

    fn adapted_mut(&mut self) -> Option<&mut Adapted> {
        Some(self)
    }
}

/// Adds `lora` (adapter `name`) to the layer in `slot`, wrapping it when it has no adapters
/// yet; the first adapter of a layer becomes its active one.
fn push(slot: &mut Box<dyn Linear>, name: &str, lora: Lora) -> Result<()> {
    if let Some(a) = slot.adapted_mut() {
        if a.adapter(name).is_some() {
            return Err(Error::Msg(format!(
                "the layer already has an adapter named '{name}'"
            )));
        }
        a.adapters.push((name.to_string(), lora));
        if a.active.is_none() {
            a.active = Some(a.adapters.len() - 1);
        }
        return Ok(());
    }
    let base = std::mem::replace(slot, Box::new(Moved));
    *slot = Box::new(Adapted {
        base,
        adapters: vec![(name.to_string(), lora)],
        active: Some(0),
        merged: None,
        training: false,
    });
    Ok(())
}

/// The f32 base weight a new adapter needs at creation: DoRA's magnitude and PiSSA read it.
fn base_for_init(layer: &dyn Linear, cfg: &LoraConfig) -> Option<Tensor> {
    (cfg.use_dora || cfg.init == frugal_adapters::Init::Pissa).then(|| {
        let base = layer.adapted().map_or(layer, |a| a.base());
        base.weight_f32()
    })
}

/// Adds a new adapter `name` with settings `cfg` (`table` names their config table in
/// errors) to the layers of `linears` it chooses, its variables in `vs`
/// (`{layer}.lora_A.{name}.weight`...). A target name or pattern that chooses no layer is an
/// error; PiSSA moves the top singular triplets out of each chosen (dense) base weight.
/// Returns the chosen layers' names.
pub fn add_adapter(
    vs: &VarStore,
    linears: Vec<(String, &mut Box<dyn Linear>)>,
    name: &str,
    cfg: &LoraConfig,
    table: &str,
) -> Result<Vec<String>> {
    cfg.validate(table)?;
    let names: Vec<String> = linears.iter().map(|(n, _)| n.clone()).collect();
    cfg.target_modules
        .check_against(&format!("{table}.target_modules"), &names)?;
    if let Some(e) = &cfg.exclude_modules {
        e.check_against(&format!("{table}.exclude_modules"), &names)?;
    }
    let mut chosen = Vec::new();
    for (layer, slot) in linears {
        if !cfg.chooses(&layer) {
            continue;
        }
        let (out_dim, in_dim) = slot.shape();
        let base = base_for_init(slot.as_ref(), cfg);
        let (lora, residual) = Lora::new(
            &path_of(vs, &layer),
            name,
            in_dim,
            out_dim,
            cfg,
            base.as_ref(),
        )
        .map_err(|e| Error::Msg(format!("{table}: {e}")))?;
        if let Some(res) = residual {
            let w = slot.dense_weight().ok_or_else(|| {
                Error::Msg(format!(
                    "{table}.init: PiSSA needs a dense base, '{layer}' is not one"
                ))
            })?;
            tch::no_grad(|| w.shallow_clone().copy_(&res.to_kind(w.kind())));
        }
        push(slot, name, lora)?;
        chosen.push(layer);
    }
    Ok(chosen)
}

/// Adds the adapter of folder `file` (PEFT's format) as adapter `name`. Every layer the file
/// names must be one of `linears` with matching shapes (checked for all layers before any is
/// changed): an adapter made for another base is an error naming the layer and both shapes.
/// Returns the adapted layers' names.
pub fn load_adapter(
    vs: &VarStore,
    linears: Vec<(String, &mut Box<dyn Linear>)>,
    name: &str,
    file: &AdapterFile,
) -> Result<Vec<String>> {
    let cfg = &file.config;
    let shown = file.dir.display();
    let mut slots: Vec<(String, &mut Box<dyn Linear>)> = Vec::new();
    let mut by_name: std::collections::HashMap<String, &mut Box<dyn Linear>> =
        linears.into_iter().collect();
    for (layer, t) in &file.layers {
        let slot = by_name.remove(layer).ok_or_else(|| {
            Error::Msg(format!(
                "{shown}: the adapter has layer '{layer}', which the model does not have \
                 (an adapter for another base model?)"
            ))
        })?;
        let (out_dim, in_dim) = slot.shape();
        let want_a = [cfg.r, in_dim / cfg.pool];
        let want_b = [out_dim, cfg.r];
        if t.a.size() != want_a || t.b.size() != want_b || in_dim % cfg.pool != 0 {
            return Err(Error::Msg(format!(
                "{shown}: '{layer}' has A {:?} and B {:?}; the model's layer ({out_dim} x \
                 {in_dim}) needs A {want_a:?} and B {want_b:?} (an adapter for another base \
                 model?)",
                t.a.size(),
                t.b.size()
            )));
        }
        slots.push((layer.clone(), slot));
    }
    let init = LoraConfig {
        init: frugal_adapters::Init::Default,
        ..cfg.clone()
    };
    let mut done = Vec::new();
    for (layer, slot) in slots {
        let t = &file.layers[&layer];
        let (out_dim, in_dim) = slot.shape();
        let base = base_for_init(slot.as_ref(), &init);
        let (lora, _) = Lora::new(
            &path_of(vs, &layer),
            name,
            in_dim,
            out_dim,
            &init,
            base.as_ref(),
        )?;
        tch::no_grad(|| {
            lora.a.shallow_clone().copy_(&t.a);
            lora.b.shallow_clone().copy_(&t.b);
            if let (Some(m), Some(src)) = (&lora.magnitude, &t.magnitude) {
                m.shallow_clone().copy_(src);
            }
        });
        push(slot, name, lora)?;
        done.push(layer);
    }
    Ok(done)
}

/// Copies the tensors of the modules an adapter folder saves whole (`file.modules`, PEFT's
/// `modules_to_save`: a classifier's head) into the variables of `vs` of the same names. A
/// tensor the model does not have, or of another shape, is an error naming it (checked for
/// all before any is changed). Returns the variables' names.
pub fn load_saved_modules(vs: &VarStore, file: &AdapterFile) -> Result<Vec<String>> {
    let vars = vs.variables();
    let shown = file.dir.display();
    let mut pairs = Vec::new();
    for (name, t) in &file.modules {
        let v = vars.get(name).ok_or_else(|| {
            Error::Msg(format!(
                "{shown}: the adapter saves '{name}' (modules_to_save), which the model does \
                 not have"
            ))
        })?;
        if v.size() != t.size() {
            return Err(Error::Shape {
                name: format!("{shown}: {name}"),
                expected: v.size(),
                got: t.size(),
            });
        }
        pairs.push((name.clone(), v.shallow_clone(), t));
    }
    tch::no_grad(|| {
        for (_, v, t) in &pairs {
            v.shallow_clone().copy_(t);
        }
    });
    Ok(pairs.into_iter().map(|(n, _, _)| n).collect())
}

/// The active adapter of every adapted layer among `linears`, by layer name (what an adapter
/// folder holds).
pub fn active_adapters<'a>(linears: &[(String, &'a dyn Linear)]) -> Vec<(String, &'a Lora)> {
    linears
        .iter()
        .filter_map(|(n, l)| Some((n.clone(), l.adapted()?.active()?.1)))
        .collect()
}

/// Whether variable `name` belongs to an adapter.
pub fn is_adapter_variable(name: &str) -> bool {
    name.contains(".lora_A.")
        || name.contains(".lora_B.")
        || name.contains(".lora_magnitude_vector.")
}

/// Freezes every variable of `vs` that is not an adapter's (no gradient is computed for it),
/// and returns the adapter variables, sorted by name: what the optimizer trains.
pub fn freeze_base(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut trainable = Vec::new();
    for (name, t) in crate::weights::named_variables(vs) {
        if is_adapter_variable(&name) {
            trainable.push((name, t));
        } else {
            let _ = t.shallow_clone().set_requires_grad(false);
        }
    }
    trainable
}

/// PEFT's `merge_and_unload`: every adapted layer among `linears` becomes a plain dense layer
/// holding its weight with the active adapter merged (in f32, stored in the compute kind's
/// float type for a quantized or TT base, in place for a dense one), and every adapter
/// variable leaves `vs`. Returns the merged layers' names.
pub fn merge_and_unload(
    vs: &VarStore,
    linears: Vec<(String, &mut Box<dyn Linear>)>,
    compute: tch::Kind,
) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let mut gone = Vec::new();
    for (name, slot) in linears {
        let Some(a) = slot.adapted_mut() else {
            continue;
        };
        for (adapter, _) in &a.adapters {
            gone.extend(frugal_adapters::variable_names(&name, adapter));
        }
        let dense = if a.base.dense_weight().is_some() {
            a.merge().map_err(|e| Error::Msg(format!("{name}: {e}")))?;
            std::mem::replace(&mut a.base, Box::new(Moved))
        } else {
            let w = a.merged_weight();
            let w = crate::weights::path_of(vs, &name).var_copy("weight", &w);
            Box::new(crate::linear::Dense::tied(&w, compute)) as Box<dyn Linear>
        };
        *slot = dense;
        names.push(name);
    }
    crate::weights::forget_variables(vs, &gone)?;
    Ok(names)
}

/// Switches dropout in the adapters of `linears` on (training) or off.
pub fn set_training(linears: Vec<(String, &mut Box<dyn Linear>)>, training: bool) {
    for (_, l) in linears {
        if let Some(a) = l.adapted_mut() {
            a.training = training;
        }
    }
}

/// Merges (`true`) or unmerges the active adapter of every adapted layer among `linears`.
pub fn merge_all(linears: Vec<(String, &mut Box<dyn Linear>)>, merge: bool) -> Result<()> {
    for (name, l) in linears {
        if let Some(a) = l.adapted_mut() {
            let r = if merge { a.merge() } else { a.unmerge() };
            r.map_err(|e| Error::Msg(format!("{name}: {e}")))?;
        }
    }
    Ok(())
}
