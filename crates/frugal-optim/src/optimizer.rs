//! The [`Optimizer`] trait that every optimizer of this crate implements, and the machinery they
//! share: named parameters, optional GaLore projectors, gradient accumulation buffers, and the
//! state file format.

use frugal_core::safetensors_io::{self, SafetensorsFile, SavePart};
use frugal_core::{Error, Result};
use frugal_galore::GradientProjector;
use std::collections::HashMap;
use std::path::Path;
use tch::Tensor;

/// An optimizer over named parameters that the trainer can drive without knowing which one it
/// is.
///
/// # Gradient accumulation with per-layer updates
///
/// [`Optimizer::accumulate_indices`] adds a parameter's gradient into a buffer of the optimizer
/// (in the projected space when the parameter has a projector) and zeroes the gradient; the next
/// [`Optimizer::step_indices`] steps with buffer + current gradient and clears the buffer.
///
/// Memory: tch 0.24 offers no way to make a parameter's `.grad` undefined again (libtorch's
/// `mutable_grad() = {}` is not exposed; `Tensor::zero_grad` and `detach_().zero_()` keep the
/// storage, and shrinking it with `set_` breaks the next backward, which adds into the existing
/// gradient in place). So the gradient is zeroed in place and its memory stays allocated; the
/// buffer is what the accumulation costs on top (for a projected parameter only the projected
/// size). A trainer that wants the gradient memory gone must obtain gradients without `.grad`
/// (`Tensor::run_backward`) and hand them over itself.
///
/// For a projected parameter every micro-batch is projected with the same step number (the
/// optimizer's step before it is incremented); a projector that refreshes its basis at that step
/// must do so at the first call for that step only, or the earlier micro-batches would sit in a
/// stale basis. The moments are re-projected (`reproject_*_moment`) once, at the step, after the
/// last `project` of that step, so the projector must keep reporting a basis change for the
/// whole step (both as `frugal_galore::GaloreProjector` does).
pub trait Optimizer: Send + std::fmt::Debug {
    /// Parameter names, in construction order.
    fn names(&self) -> Vec<String>;
    /// Steps every parameter that has a gradient or an accumulated gradient.
    fn step(&mut self) -> Result<()>;
    /// Steps only the parameters at `indices` (positions in construction order) that have a
    /// gradient or an accumulated gradient; the others keep their state and step count.
    fn step_indices(&mut self, indices: &[usize]) -> Result<()>;
    /// Adds the current gradients of the parameters at `indices` into the optimizer's
    /// accumulation buffers (projected when the parameter has a projector) and zeroes those
    /// gradients; see [the trait docs](Optimizer) on memory.
    fn accumulate_indices(&mut self, indices: &[usize]) -> Result<()>;
    /// [`Optimizer::step_indices`] with the gradients given, one per index (for example from
    /// `Tensor::run_backward`), instead of read from the parameters' `.grad`: nothing is kept
    /// in `.grad`, so the gradients' memory is gone once the step is done.
    fn step_with_grads(&mut self, indices: &[usize], grads: Vec<Tensor>) -> Result<()>;
    /// [`Optimizer::accumulate_indices`] with the gradients given, one per index.
    fn accumulate_with_grads(&mut self, indices: &[usize], grads: Vec<Tensor>) -> Result<()>;
    /// Zeroes every parameter's gradient (detached, in place) and drops accumulation buffers.
    fn zero_grad(&mut self);
    /// Sets the learning rate for the next steps.
    fn set_lr(&mut self, lr: f64);
    /// The learning rate of the next step.
    fn lr(&self) -> f64;
    /// Bytes of optimizer state: moments, projector bases and accumulation buffers.
    fn state_bytes(&self) -> u64;
    /// Seconds the projectors have spent computing their bases since the optimizer was
    /// built (0 without projectors).
    fn projection_seconds(&self) -> f64;
    /// The state as named tensors (what [`Optimizer::save`] writes).
    fn state_tensors(&self) -> Vec<(String, Tensor)>;
    /// Saves the state to `path` atomically, with the hyper-parameters in the metadata.
    fn save(&self, path: &Path) -> Result<()>;
    /// Loads a state written by [`Optimizer::save`]; shapes are checked and errors name the file
    /// and the tensor.
    fn load(&mut self, path: &Path) -> Result<()>;
    /// Replaces the parameter `name` by `tensor`, a smaller version of it (for example a
    /// tensor-train core sliced to its live ranks), keeping its step count: `slice` maps a
    /// tensor of the old parameter's shape (a moment, an accumulated gradient) to the new
    /// shape. AdamW and 8-bit AdamW slice their moments; Adafactor, whose factored second
    /// moment does not slice, starts the parameter's state afresh. A parameter with a
    /// gradient projector cannot be replaced.
    fn replace_parameter(&mut self, name: &str, tensor: Tensor, slice: &Slicer) -> Result<()>;
    /// The gradient projector of the parameter at `index` and the step its next projection
    /// will be for (its step count), when it has one: a data-parallel trainer averages the
    /// projected gradients instead of the full ones between basis refreshes.
    fn projection(&self, index: usize) -> Option<(&dyn frugal_galore::GradientProjector, i64)>;
    /// This optimizer's step in the form a CUDA graph can record, when it has one (AdamW).
    fn recordable(&mut self) -> Option<&mut dyn RecordedStep>;
}

/// An optimizer step that a CUDA graph records once and replays at every later step
/// (`train.cuda_graph`). A graph replays its kernels with the arguments they were recorded
/// with, so every number that changes from step to step (the learning rate, the bias
/// corrections, a decay factor) is read from a small tensor on the parameters' device, which
/// [`RecordedStep::prepare_recorded`] refills before each replay; the step reads nothing back
/// to the host.
///
/// The order: [`RecordedStep::begin_recording`] once, after eager steps have created the
/// state; then for every step [`RecordedStep::prepare_recorded`] (outside the graph), and
/// [`RecordedStep::recorded_step`] (recorded in the graph at the first step, replayed at the
/// others). Without a graph, `prepare_recorded` then `recorded_step` is one ordinary step.
pub trait RecordedStep {
    /// Fixes the parameters that the recorded step updates: those with a gradient now. Errors
    /// name a parameter that cannot take part (one with a gradient projector, or without state
    /// yet).
    fn begin_recording(&mut self) -> Result<()>;
    /// Advances the step counts of those parameters and writes this step's numbers, at the
    /// current learning rate, to the device.
    fn prepare_recorded(&mut self) -> Result<()>;
    /// The update of each of those parameters from its `.grad`: what the graph records.
    fn recorded_step(&mut self) -> Result<()>;
}

/// Maps a tensor of a parameter's old shape to its new shape (see
/// [`Optimizer::replace_parameter`]).
pub type Slicer<'a> = dyn Fn(&Tensor) -> Result<Tensor> + 'a;

/// `slice(t)`, checked to have `shape` (errors name `what`).
pub(crate) fn slice_to(slice: &Slicer, t: &Tensor, shape: &[i64], what: &str) -> Result<Tensor> {
    let out = slice(t)?;
    if out.size() != shape {
        return Err(Error::Msg(format!(
            "the sliced {what} has shape {:?}, the new parameter {shape:?}",
            out.size()
        )));
    }
    Ok(out)
}

/// One parameter with what every optimizer keeps for it.
#[derive(Debug)]
pub(crate) struct Slot<S> {
    pub name: String,
    pub tensor: Tensor,
    pub projector: Option<Box<dyn GradientProjector>>,
    /// Accumulated gradient (projected when there is a projector).
    pub accum: Option<Tensor>,
    /// Steps taken.
    pub step: i64,
    /// Optimizer-specific state, created at the first step.
    pub state: Option<S>,
    /// Weight decay of this parameter, overriding the configured one.
    pub decay: Option<f64>,
    /// A gradient handed over for the next step or accumulation, used instead of `.grad`.
    pub given: Option<Tensor>,
}

impl<S> Slot<S> {
    /// The weight decay for this parameter: its override, else `configured` for tensors of two
    /// or more dimensions and 0 for the others.
    pub fn weight_decay(&self, configured: f64) -> f64 {
        self.decay.unwrap_or(if self.tensor.dim() >= 2 {
            configured
        } else {
            0.0
        })
    }
}

/// The parameters of an optimizer, with the operations that do not depend on the update rule.
#[derive(Debug)]
pub(crate) struct Slots<S> {
    pub slots: Vec<Slot<S>>,
}

impl<S> Slots<S> {
    pub fn new(params: Vec<(String, Tensor)>) -> Self {
        let slots = params
            .into_iter()
            .map(|(name, tensor)| Slot {
                name,
                tensor,
                projector: None,
                accum: None,
                step: 0,
                state: None,
                decay: None,
                given: None,
            })
            .collect();
        Self { slots }
    }

    pub fn names(&self) -> Vec<String> {
        self.slots.iter().map(|s| s.name.clone()).collect()
    }

    /// Position of the parameter `name`.
    pub fn index_of(&self, name: &str) -> Result<usize> {
        self.slots
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| Error::Msg(format!("no parameter named '{name}' in the optimizer")))
    }

    /// Attaches a projector to the parameter at `index`; it must be 2-D and have no state yet.
    pub fn set_projector(&mut self, index: usize, p: Box<dyn GradientProjector>) -> Result<()> {
        let slot = self.check(index)?;
        if slot.tensor.dim() != 2 {
            return Err(Error::Msg(format!(
                "'{}': a gradient projector needs a 2-D parameter, it has shape {:?}",
                slot.name,
                slot.tensor.size()
            )));
        }
        let slot = &mut self.slots[index];
        if slot.state.is_some() || slot.accum.is_some() {
            return Err(Error::Msg(format!(
                "'{}': a projector must be attached before the first step",
                slot.name
            )));
        }
        slot.projector = Some(p);
        Ok(())
    }

    /// Swaps the parameter `name` for `tensor`, its state through `rule` (which gets the old
    /// state, the slicer and the new shape) and its accumulated gradient through `slice`.
    pub fn replace(
        &mut self,
        name: &str,
        tensor: Tensor,
        slice: &Slicer,
        rule: impl Fn(&S, &Slicer, &[i64]) -> Result<Option<S>>,
    ) -> Result<()> {
        let i = self.index_of(name)?;
        let slot = &mut self.slots[i];
        if slot.projector.is_some() {
            return Err(Error::Msg(format!(
                "'{name}': a parameter with a gradient projector cannot be replaced"
            )));
        }
        let shape = tensor.size();
        let checked = |t: Tensor, what: &str| -> Result<Tensor> {
            if t.size() != shape {
                return Err(Error::Msg(format!(
                    "'{name}': the sliced {what} has shape {:?}, the new parameter {shape:?}",
                    t.size()
                )));
            }
            Ok(t)
        };
        // Everything is computed before anything changes: a failure leaves the slot as it was.
        let accum = match &slot.accum {
            Some(a) => Some(checked(slice(a)?, "accumulated gradient")?),
            None => None,
        };
        let state = match &slot.state {
            Some(st) => {
                rule(st, slice, &shape).map_err(|e| Error::Msg(format!("'{name}': {e}")))?
            }
            None => None,
        };
        slot.tensor = tensor;
        slot.accum = accum;
        slot.state = state;
        slot.given = None;
        Ok(())
    }

    /// Overrides the weight decay of the parameter `name`.
    pub fn set_decay(&mut self, name: &str, wd: f64) -> Result<()> {
        let i = self.index_of(name)?;
        if !wd.is_finite() || wd < 0.0 {
            return Err(Error::Msg(format!(
                "'{name}': weight decay {wd} is not >= 0"
            )));
        }
        self.slots[i].decay = Some(wd);
        Ok(())
    }

    fn check(&self, index: usize) -> Result<&Slot<S>> {
        self.slots.get(index).ok_or_else(|| {
            Error::Msg(format!(
                "parameter index {index} out of range (the optimizer has {})",
                self.slots.len()
            ))
        })
    }

    pub fn check_all(&self, indices: &[usize]) -> Result<()> {
        for &i in indices {
            self.check(i)?;
        }
        Ok(())
    }

    /// The gradient to step the parameter at `index` with: current gradient (projected with
    /// the step before increment) plus the accumulation buffer, which is emptied. `None` when
    /// there is neither.
    pub fn take_gradient(&mut self, index: usize) -> Result<Option<Tensor>> {
        let slot = &mut self.slots[index];
        let grad = slot.given.take().unwrap_or_else(|| slot.tensor.grad());
        let current = if grad.defined() {
            Some(match slot.projector.as_mut() {
                Some(p) => p.project(&grad, slot.step)?,
                None => grad,
            })
        } else {
            None
        };
        Ok(match (slot.accum.take(), current) {
            (Some(a), Some(c)) => Some(a + c),
            (Some(a), None) => Some(a),
            (None, c) => c,
        })
    }

    pub fn accumulate(&mut self, indices: &[usize]) -> Result<()> {
        self.check_all(indices)?;
        tch::no_grad(|| {
            for &i in indices {
                let slot = &mut self.slots[i];
                let given = slot.given.is_some();
                let mut grad = slot.given.take().unwrap_or_else(|| slot.tensor.grad());
                if !grad.defined() {
                    continue;
                }
                let add = match slot.projector.as_mut() {
                    Some(p) => p.project(&grad, slot.step)?,
                    None if given => grad.shallow_clone(),
                    // A copy: the gradient itself is zeroed below.
                    None => grad.copy(),
                };
                slot.accum = Some(match slot.accum.take() {
                    Some(a) => a + add,
                    None => add,
                });
                if !given {
                    let _ = grad.detach_();
                    let _ = grad.zero_();
                }
            }
            Ok(())
        })
    }

    /// Hands `grads` (one per index) to the parameters at `indices` for the next step or
    /// accumulation; shapes are checked against the parameters.
    pub fn give(&mut self, indices: &[usize], grads: Vec<Tensor>) -> Result<()> {
        self.check_all(indices)?;
        if grads.len() != indices.len() {
            return Err(Error::Msg(format!(
                "{} gradients for {} parameters",
                grads.len(),
                indices.len()
            )));
        }
        for (&i, g) in indices.iter().zip(grads) {
            let slot = &mut self.slots[i];
            if g.size() != slot.tensor.size() {
                return Err(Error::Shape {
                    name: format!("gradient of '{}'", slot.name),
                    expected: slot.tensor.size(),
                    got: g.size(),
                });
            }
            slot.given = Some(g);
        }
        Ok(())
    }

    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            let mut g = s.tensor.grad();
            if g.defined() {
                let _ = g.detach_();
                let _ = g.zero_();
            }
            s.accum = None;
            s.given = None;
        }
    }

    /// Bytes of projector bases and accumulation buffers (the rule's own state comes on top).
    pub fn extra_bytes(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| {
                s.projector.as_ref().map_or(0, |p| p.state_bytes())
                    + s.accum
                        .as_ref()
                        .map_or(0, frugal_core::memory::tensor_bytes)
            })
            .sum()
    }

    /// State parts: for each parameter with state, `rule(name, state)`, `{name}.step`, the
    /// projector's under `{name}.projector`; and `{name}.grad_accum` for pending buffers.
    pub fn state_parts<'a>(
        &'a self,
        rule: impl Fn(&str, &'a S) -> Vec<(String, SavePart<'a>)>,
    ) -> Vec<(String, SavePart<'a>)> {
        let mut out = Vec::new();
        let tensor = |n: String, t: Tensor| (n, SavePart::Tensor(t));
        for s in &self.slots {
            if let Some(st) = &s.state {
                out.extend(rule(&s.name, st));
                out.push(tensor(format!("{}.step", s.name), Tensor::from(s.step)));
            }
            if let Some(p) = &s.projector {
                let prefix = format!("{}.projector", s.name);
                out.extend(
                    p.state_tensors(&prefix)
                        .into_iter()
                        .map(|(n, t)| tensor(n, t)),
                );
            }
            if let Some(a) = &s.accum {
                out.push(tensor(format!("{}.grad_accum", s.name), a.shallow_clone()));
            }
        }
        out
    }

    /// [`Slots::state_parts`] as tensors (borrowed bytes are copied into tensors).
    pub fn state_tensors<'a>(
        &'a self,
        rule: impl Fn(&str, &'a S) -> Vec<(String, SavePart<'a>)>,
    ) -> Vec<(String, Tensor)> {
        self.state_parts(rule)
            .into_iter()
            .map(|(n, p)| {
                let t = match p {
                    SavePart::Tensor(t) => t,
                    SavePart::Bytes { data, kind, shape } => {
                        Tensor::from_data_size(data, &shape, kind)
                    }
                };
                (n, t)
            })
            .collect()
    }

    /// Loads every parameter's state from `path`: `rule(reader, slot)` reads the rule's state
    /// of one parameter that has a `{name}.step`. Nothing changes unless every tensor loads.
    /// Returns the file's metadata.
    pub fn load(
        &mut self,
        path: &Path,
        rule: impl Fn(&Reader, &Slot<S>) -> Result<S>,
    ) -> Result<HashMap<String, String>> {
        let file = SafetensorsFile::open(path)?;
        let reader = Reader {
            file: &file,
            path,
            names: file.names(),
        };
        let mut loaded = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let key = format!("{}.step", s.name);
            let state = if reader.has(&key) {
                let step = reader.scalar_i64(&key)?;
                Some((step, rule(&reader, s)?))
            } else {
                None
            };
            let accum_key = format!("{}.grad_accum", s.name);
            let accum = if reader.has(&accum_key) {
                let a = reader.get(&accum_key, s.tensor.device())?;
                if s.projector.is_none() && a.size() != s.tensor.size() {
                    return Err(reader.shape_error(&accum_key, &a, &s.tensor.size()));
                }
                Some(a.to_kind(s.tensor.kind()))
            } else {
                None
            };
            loaded.push((state, accum));
        }
        // Projectors load through their own trait; check them all before committing.
        for s in &mut self.slots {
            if let Some(p) = s.projector.as_mut() {
                let prefix = format!("{}.projector", s.name);
                if reader.names.iter().any(|n| n.starts_with(&prefix)) {
                    let device = s.tensor.device();
                    let get = |name: &str| file.tensor(name, device).ok();
                    p.load_state(&prefix, &get).map_err(|e| {
                        Error::Msg(format!(
                            "{}: projector of '{}': {e}",
                            path.display(),
                            s.name
                        ))
                    })?;
                }
            }
        }
        for (s, (state, accum)) in self.slots.iter_mut().zip(loaded) {
            match state {
                Some((step, st)) => {
                    s.step = step;
                    s.state = Some(st);
                }
                None => {
                    s.step = 0;
                    s.state = None;
                }
            }
            s.accum = accum;
        }
        Ok(file.metadata())
    }
}

/// Saves `tensors` with the hyper-parameters `config` under metadata key `key`.
pub(crate) fn save_state(
    path: &Path,
    parts: &[(String, SavePart)],
    key: &str,
    config: String,
) -> Result<()> {
    let meta: HashMap<String, String> = [(key.to_string(), config)].into_iter().collect();
    safetensors_io::save_parts(path, parts, Some(meta))
}

/// Tensors as save parts (for optimizers whose state is all tch tensors).
pub(crate) fn tensor_parts<'a>(tensors: Vec<(String, Tensor)>) -> Vec<(String, SavePart<'a>)> {
    tensors
        .into_iter()
        .map(|(n, t)| (n, SavePart::Tensor(t)))
        .collect()
}

/// Reads named tensors of a state file, with errors that name the file and the tensor.
pub(crate) struct Reader<'a> {
    file: &'a SafetensorsFile,
    path: &'a Path,
    names: Vec<String>,
}

impl Reader<'_> {
    pub fn has(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }

    pub fn get(&self, name: &str, device: tch::Device) -> Result<Tensor> {
        if !self.has(name) {
            return Err(Error::Msg(format!(
                "{}: tensor '{name}' is missing",
                self.path.display()
            )));
        }
        self.file.tensor(name, device)
    }

    pub fn scalar_i64(&self, name: &str) -> Result<i64> {
        let t = self.get(name, tch::Device::Cpu)?;
        if t.numel() != 1 {
            return Err(self.shape_error(name, &t, &[]));
        }
        Ok(t.to_kind(tch::Kind::Int64).int64_value(&[]))
    }

    /// Reads `name` and checks its shape is `shape`.
    pub fn shaped(&self, name: &str, device: tch::Device, shape: &[i64]) -> Result<Tensor> {
        let t = self.get(name, device)?;
        if t.size() != shape {
            return Err(self.shape_error(name, &t, shape));
        }
        Ok(t)
    }

    /// Reads `name`, a moment of `slot`: of the parameter's shape without a projector, else
    /// 2-D with each dimension at most the parameter's (the projected shape).
    pub fn moment<S>(&self, name: &str, slot: &Slot<S>) -> Result<Tensor> {
        let t = self.get(name, slot.tensor.device())?;
        let ps = slot.tensor.size();
        let ok = if slot.projector.is_some() {
            let ts = t.size();
            ts.len() == 2 && ts[0] <= ps[0] && ts[1] <= ps[1]
        } else {
            t.size() == ps
        };
        if !ok {
            return Err(self.shape_error(name, &t, &ps));
        }
        Ok(t)
    }

    pub fn shape_error(&self, name: &str, t: &Tensor, expected: &[i64]) -> Error {
        Error::Msg(format!(
            "{}: '{name}' has shape {:?}, expected {:?}",
            self.path.display(),
            t.size(),
            expected
        ))
    }

    pub fn path(&self) -> &Path {
        self.path
    }
}

/// Multiplies `t` by the parameter's projector back-map, or returns it as is.
pub(crate) fn back(projector: Option<&dyn GradientProjector>, t: &Tensor) -> Result<Tensor> {
    match projector {
        Some(p) => p.project_back(t),
        None => Ok(t.shallow_clone()),
    }
}

/// Implements [`Optimizer`] (and the builders `with_projector`, `with_weight_decay`) for a type
/// with fields `config` (with `lr`) and `slots`, and inherent methods `step_impl`,
/// `rule_tensors`, `load_rule`, `rule_bytes`, and a constant `META_KEY`. With `, recordable`
/// the type also implements [`RecordedStep`], which [`Optimizer::recordable`] then returns.
macro_rules! impl_optimizer {
    (@recordable $s:ident, recordable) => {
        Some($s)
    };
    (@recordable $s:ident,) => {
        None
    };
    ($ty:ty $(, $recordable:ident)?) => {
        impl $ty {
            /// Attaches `projector` to the 2-D parameter named `name` (before its first step):
            /// its state then lives in the projected space.
            pub fn with_projector(
                mut self,
                name: &str,
                projector: Box<dyn frugal_galore::GradientProjector>,
            ) -> frugal_core::Result<Self> {
                let i = self.slots.index_of(name)?;
                self.slots.set_projector(i, projector)?;
                Ok(self)
            }

            /// Sets the weight decay of the parameter `name`, overriding the configured one
            /// (which applies to tensors of two or more dimensions only), e.g. to decay a bias
            /// as galore-torch's parameter groups do.
            pub fn with_weight_decay(
                mut self,
                name: &str,
                weight_decay: f64,
            ) -> frugal_core::Result<Self> {
                self.slots.set_decay(name, weight_decay)?;
                Ok(self)
            }
        }

        impl $crate::optimizer::Optimizer for $ty {
            fn names(&self) -> Vec<String> {
                self.slots.names()
            }
            fn step(&mut self) -> frugal_core::Result<()> {
                let all: Vec<usize> = (0..self.slots.slots.len()).collect();
                self.step_impl(&all)
            }
            fn step_indices(&mut self, indices: &[usize]) -> frugal_core::Result<()> {
                self.slots.check_all(indices)?;
                self.step_impl(indices)
            }
            fn accumulate_indices(&mut self, indices: &[usize]) -> frugal_core::Result<()> {
                self.slots.accumulate(indices)
            }
            fn step_with_grads(
                &mut self,
                indices: &[usize],
                grads: Vec<tch::Tensor>,
            ) -> frugal_core::Result<()> {
                self.slots.give(indices, grads)?;
                self.step_impl(indices)
            }
            fn accumulate_with_grads(
                &mut self,
                indices: &[usize],
                grads: Vec<tch::Tensor>,
            ) -> frugal_core::Result<()> {
                self.slots.give(indices, grads)?;
                self.slots.accumulate(indices)
            }
            fn zero_grad(&mut self) {
                self.slots.zero_grad()
            }
            fn set_lr(&mut self, lr: f64) {
                self.config.lr = lr;
            }
            fn lr(&self) -> f64 {
                self.config.lr
            }
            fn projection_seconds(&self) -> f64 {
                self.slots
                    .slots
                    .iter()
                    .filter_map(|s| s.projector.as_ref())
                    .map(|p| p.basis_seconds())
                    .sum()
            }
            fn state_bytes(&self) -> u64 {
                self.slots.extra_bytes()
                    + self
                        .slots
                        .slots
                        .iter()
                        .filter_map(|s| s.state.as_ref())
                        .map(Self::rule_bytes)
                        .sum::<u64>()
            }
            fn state_tensors(&self) -> Vec<(String, tch::Tensor)> {
                self.slots.state_tensors(Self::rule_parts)
            }
            fn save(&self, path: &std::path::Path) -> frugal_core::Result<()> {
                let config = serde_json::to_string(&self.config)
                    .map_err(|e| frugal_core::Error::Msg(format!("config to JSON: {e}")))?;
                // The state is lent to the writer, not copied (8-bit codes included).
                let parts = self.slots.state_parts(Self::rule_parts);
                $crate::optimizer::save_state(path, &parts, Self::META_KEY, config)
            }
            fn replace_parameter(
                &mut self,
                name: &str,
                tensor: tch::Tensor,
                slice: &$crate::optimizer::Slicer,
            ) -> frugal_core::Result<()> {
                self.slots.replace(name, tensor, slice, Self::rule_slice)
            }
            fn projection(
                &self,
                index: usize,
            ) -> Option<(&dyn frugal_galore::GradientProjector, i64)> {
                let s = self.slots.slots.get(index)?;
                Some((s.projector.as_deref()?, s.step))
            }
            fn recordable(&mut self) -> Option<&mut dyn $crate::optimizer::RecordedStep> {
                $crate::optimizer::impl_optimizer!(@recordable self, $($recordable)?)
            }
            fn load(&mut self, path: &std::path::Path) -> frugal_core::Result<()> {
                let meta = self.slots.load(path, Self::load_rule)?;
                if let Some(c) = meta.get(Self::META_KEY) {
                    if let Ok(c) = serde_json::from_str(c) {
                        self.config = c;
                    }
                }
                Ok(())
            }
        }
    };
}
pub(crate) use impl_optimizer;
