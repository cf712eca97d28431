//! AdamW (decoupled weight decay, Loshchilov & Hutter 2019) in two variants that differ in
//! rounding and in where the decay happens:
//!
//! - [`AdamWVariant::Torch`], the order of operations of `torch.optim.AdamW`:
//!   `w = w (1 - lr wd)`, `m = lerp(m, g, 1 - b1)`, `v = b2 v + (1 - b2) g²`,
//!   `w -= lr / (1 - b1^t) · m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
//! - [`AdamWVariant::Hf`], the Hugging Face / galore-torch AdamW: `m = b1 m + (1 - b1) g`,
//!   `v = b2 v + (1 - b2) g²`, `s = lr sqrt(1 - b2^t) / (1 - b1^t)`,
//!   `w -= s · back(m / (sqrt(v) + eps))`, then `w -= lr wd w`.
//!
//! With a GaLore projector the moments live in the projected space and `back` maps the
//! normalized update to the weight's shape (galore-torch's `GaLoreAdamW` is the Hf variant).

use crate::optimizer::{
    impl_optimizer, slice_to, tensor_parts, Reader, RecordedStep, Slicer, Slot, Slots,
};
use frugal_core::safetensors_io::SavePart;
use frugal_core::{Error, Result};
use frugal_galore::GradientProjector;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Kind, Tensor};

/// Which AdamW formulation (rounding order and where weight decay happens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdamWVariant {
    /// `torch.optim.AdamW`: decay before the update, eps added to the bias-corrected root.
    #[default]
    Torch,
    /// Hugging Face / galore-torch: bias correction folded into the step size, eps added to
    /// the raw root, decay after the update (their default eps is 1e-6).
    Hf,
}

/// AdamW's hyper-parameters (`optim.*` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// Learning rate (the trainer's schedule overwrites it every step).
    pub lr: f64,
    /// First-moment decay β1.
    pub beta1: f64,
    /// Second-moment decay β2.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay, applied to parameters of two or more dimensions only (not to
    /// norm gains or biases).
    pub weight_decay: f64,
    /// Order of operations: `torch` (default) or `hf`.
    pub variant: AdamWVariant,
}

impl Default for AdamWConfig {
    /// torch's defaults, except weight decay 0 (GaLore's pre-training setting).
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            variant: AdamWVariant::Torch,
        }
    }
}

#[derive(Debug)]
pub(crate) struct State {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW over named parameters, optionally with a GaLore projector per parameter. State is
/// created lazily at a parameter's first step.
#[derive(Debug)]
pub struct AdamW {
    /// Hyper-parameters; `lr` may be changed between steps.
    pub config: AdamWConfig,
    pub(crate) slots: Slots<State>,
    /// What a recorded step updates (see [`RecordedStep`]).
    recorded: Option<Recorded>,
}

/// The parameters a recorded step updates, and the tensor (on their device) that it reads
/// their step numbers from: one row of [`step_numbers`] per parameter, f32.
#[derive(Debug)]
struct Recorded {
    indices: Vec<usize>,
    numbers: Tensor,
}

impl AdamW {
    const META_KEY: &'static str = "adamw";

    /// An optimizer over `params` (name, tensor that requires grad).
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        Self {
            config,
            slots: Slots::new(params),
            recorded: None,
        }
    }

    /// Sets the learning rate for the next steps.
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// Names of the parameters, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.slots.iter().map(|p| p.name.as_str())
    }

    /// Steps every parameter that has a gradient (see [`crate::Optimizer::step`]).
    pub fn step(&mut self) -> Result<()> {
        crate::Optimizer::step(self)
    }

    /// Steps only the parameters at `indices` (positions in the order given to [`AdamW::new`])
    /// that have a gradient; the others keep their state and step counts.
    pub fn step_indices(&mut self, indices: &[usize]) -> Result<()> {
        crate::Optimizer::step_indices(self, indices)
    }

    /// Zeroes every parameter's gradient and drops accumulation buffers.
    pub fn zero_grad(&mut self) {
        crate::Optimizer::zero_grad(self)
    }

    /// Bytes held by the optimizer state (moments, projectors, accumulation buffers).
    pub fn state_bytes(&self) -> u64 {
        crate::Optimizer::state_bytes(self)
    }

    /// The state as named tensors: `P.exp_avg`, `P.exp_avg_sq` and `P.step` (int64 scalar),
    /// plus `P.projector.*` and `P.grad_accum` where present.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        crate::Optimizer::state_tensors(self)
    }

    /// Saves the state to `path` (atomically), with the hyper-parameters in the metadata.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::Optimizer::save(self, path)
    }

    /// Loads the state saved by [`AdamW::save`]. Every tensor's shape is checked against its
    /// parameter; the error names the file and the tensor.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        crate::Optimizer::load(self, path)
    }

    fn step_impl(&mut self, indices: &[usize]) -> Result<()> {
        let c = self.config;
        tch::no_grad(|| {
            for &i in indices {
                let Some(g) = self.slots.take_gradient(i)? else {
                    continue;
                };
                let slot = &mut self.slots.slots[i];
                update(&c, slot, &g)?;
            }
            Ok(())
        })
    }

    fn rule_parts<'a>(name: &str, s: &'a State) -> Vec<(String, SavePart<'a>)> {
        tensor_parts(Self::rule_tensors(name, s))
    }

    fn rule_tensors(name: &str, s: &State) -> Vec<(String, Tensor)> {
        vec![
            (format!("{name}.exp_avg"), s.exp_avg.shallow_clone()),
            (format!("{name}.exp_avg_sq"), s.exp_avg_sq.shallow_clone()),
        ]
    }

    fn rule_slice(s: &State, slice: &Slicer, shape: &[i64]) -> Result<Option<State>> {
        Ok(Some(State {
            exp_avg: slice_to(slice, &s.exp_avg, shape, "first moment")?,
            exp_avg_sq: slice_to(slice, &s.exp_avg_sq, shape, "second moment")?,
        }))
    }

    fn rule_bytes(s: &State) -> u64 {
        frugal_core::memory::tensor_bytes(&s.exp_avg)
            + frugal_core::memory::tensor_bytes(&s.exp_avg_sq)
    }

    fn load_rule(r: &Reader, slot: &Slot<State>) -> Result<State> {
        let m = r.moment(&format!("{}.exp_avg", slot.name), slot)?;
        let v_name = format!("{}.exp_avg_sq", slot.name);
        let v = r.shaped(&v_name, slot.tensor.device(), &m.size())?;
        Ok(State {
            exp_avg: m.to_kind(slot.tensor.kind()),
            exp_avg_sq: v.to_kind(slot.tensor.kind()),
        })
    }
}

impl_optimizer!(AdamW, recordable);

impl RecordedStep for AdamW {
    fn begin_recording(&mut self) -> Result<()> {
        let mut indices = Vec::new();
        let mut device = None;
        for (i, slot) in self.slots.slots.iter().enumerate() {
            if !slot.tensor.grad().defined() {
                continue;
            }
            let refuse = |why: &str| {
                Err(Error::Msg(format!(
                    "AdamW: '{}' cannot take part in a recorded step: {why}",
                    slot.name
                )))
            };
            if slot.projector.is_some() {
                return refuse(
                    "it has a gradient projector, whose basis refresh reads back to the host",
                );
            }
            if slot.state.is_none() {
                return refuse("it has no state yet (step it eagerly first)");
            }
            if slot.accum.is_some() || slot.given.is_some() {
                return refuse("it has an accumulated or handed-over gradient");
            }
            if device.is_some_and(|d| d != slot.tensor.device()) {
                return refuse("the parameters are on more than one device");
            }
            device = Some(slot.tensor.device());
            indices.push(i);
        }
        let Some(device) = device else {
            return Err(Error::Msg(
                "AdamW: no parameter has a gradient to record a step for".into(),
            ));
        };
        let numbers = Tensor::zeros([indices.len() as i64, 3], (Kind::Float, device));
        self.recorded = Some(Recorded { indices, numbers });
        Ok(())
    }

    fn prepare_recorded(&mut self) -> Result<()> {
        let rec = self.recorded.as_mut().ok_or_else(not_recording)?;
        let mut host = Vec::with_capacity(rec.indices.len() * 3);
        for &i in &rec.indices {
            let slot = &mut self.slots.slots[i];
            slot.step += 1;
            let wd = slot.weight_decay(self.config.weight_decay);
            host.extend(step_numbers(&self.config, wd, slot.step as f64).map(|x| x as f32));
        }
        let host = Tensor::from_slice(&host).view([rec.indices.len() as i64, 3]);
        rec.numbers.copy_(&host);
        Ok(())
    }

    fn recorded_step(&mut self) -> Result<()> {
        let c = self.config;
        let rec = self.recorded.as_ref().ok_or_else(not_recording)?;
        tch::no_grad(|| {
            for (row, &i) in rec.indices.iter().enumerate() {
                let slot = &mut self.slots.slots[i];
                let wd = slot.weight_decay(c.weight_decay);
                let g = slot.tensor.grad();
                let st = slot.state.as_mut().ok_or_else(not_recording)?;
                let n = rec.numbers.get(row as i64);
                let n = [n.get(0), n.get(1), n.get(2)];
                apply(
                    &c,
                    wd != 0.0,
                    &slot.tensor,
                    st,
                    &g,
                    None,
                    [&n[0], &n[1], &n[2]],
                )?;
            }
            Ok(())
        })
    }
}

fn not_recording() -> Error {
    Error::Msg("AdamW: a recorded step before begin_recording".into())
}

fn recorded_projector() -> Error {
    Error::Msg("AdamW: a recorded step cannot map a projected update back".into())
}

/// Replaces the moments by the projector's re-projections when its basis changed.
pub(crate) fn reproject(
    p: Option<&dyn GradientProjector>,
    m: &mut Tensor,
    v: &mut Tensor,
) -> Result<()> {
    if let Some(p) = p {
        if let Some(nm) = p.reproject_first_moment(m) {
            *m = nm;
        }
        if let Some(nv) = p.reproject_second_moment(v) {
            *v = nv;
        }
    }
    Ok(())
}

/// A number of the update: a host scalar (eager steps), or a 0-dim tensor on the parameters'
/// device (a recorded step, whose numbers change between replays of one CUDA graph).
trait Num {
    /// `t * self`.
    fn times(&self, t: &Tensor) -> Tensor;
    /// `t / self`.
    fn divides(&self, t: &Tensor) -> Tensor;
    /// `t *= self`.
    fn scale(&self, t: &mut Tensor);
    /// The number on the host, where it is there.
    fn value(&self) -> Option<f64>;
}

impl Num for f64 {
    fn times(&self, t: &Tensor) -> Tensor {
        t * *self
    }
    fn divides(&self, t: &Tensor) -> Tensor {
        t / *self
    }
    fn scale(&self, t: &mut Tensor) {
        let _ = t.g_mul_scalar_(*self);
    }
    fn value(&self) -> Option<f64> {
        Some(*self)
    }
}

impl Num for Tensor {
    fn times(&self, t: &Tensor) -> Tensor {
        t * self
    }
    fn divides(&self, t: &Tensor) -> Tensor {
        t / self
    }
    fn scale(&self, t: &mut Tensor) {
        let _ = t.g_mul_(self);
    }
    fn value(&self) -> Option<f64> {
        None
    }
}

/// The numbers of one step of one parameter that change from step to step: for
/// [`AdamWVariant::Torch`] the decay factor `1 - lr wd`, `-lr / (1 - b1^t)` and
/// `sqrt(1 - b2^t)`; for [`AdamWVariant::Hf`] `-lr sqrt(1 - b2^t) / (1 - b1^t)` and `-lr wd`.
fn step_numbers(c: &AdamWConfig, wd: f64, t: f64) -> [f64; 3] {
    let bc1 = 1.0 - c.beta1.powf(t);
    let bc2 = 1.0 - c.beta2.powf(t);
    match c.variant {
        AdamWVariant::Torch => [1.0 - c.lr * wd, -c.lr / bc1, bc2.sqrt()],
        AdamWVariant::Hf => [-c.lr * bc2.sqrt() / bc1, -c.lr * wd, 0.0],
    }
}

/// One AdamW step of `slot` with gradient `g` (projected already when it has a projector).
fn update(c: &AdamWConfig, slot: &mut Slot<State>, g: &Tensor) -> Result<()> {
    let wd = slot.weight_decay(c.weight_decay);
    let proj = slot.projector.as_deref();
    let st = match slot.state.as_mut() {
        Some(st) => {
            reproject(proj, &mut st.exp_avg, &mut st.exp_avg_sq)?;
            st
        }
        None => slot.state.insert(State {
            exp_avg: g.zeros_like(),
            exp_avg_sq: g.zeros_like(),
        }),
    };
    slot.step += 1;
    let n = step_numbers(c, wd, slot.step as f64);
    apply(
        c,
        wd != 0.0,
        &slot.tensor,
        st,
        g,
        proj,
        [&n[0], &n[1], &n[2]],
    )
}

/// The update of weight `w` from `g` with the step's numbers `n` (see [`step_numbers`]), as
/// host scalars or device tensors.
fn apply<N: Num>(
    c: &AdamWConfig,
    decay: bool,
    w: &Tensor,
    st: &mut State,
    g: &Tensor,
    proj: Option<&dyn GradientProjector>,
    n: [&N; 3],
) -> Result<()> {
    let mut w = w.shallow_clone();
    match c.variant {
        AdamWVariant::Torch => {
            let [decay_factor, neg_step, bc2_sqrt] = n;
            if decay {
                decay_factor.scale(&mut w);
            }
            let _ = st.exp_avg.lerp_(g, 1.0 - c.beta1);
            let _ = st.exp_avg_sq.g_mul_scalar_(c.beta2);
            let _ = st.exp_avg_sq.addcmul_(&(g * (1.0 - c.beta2)), g);
            let denom = bc2_sqrt.divides(&st.exp_avg_sq.sqrt()) + c.eps;
            match proj {
                None => {
                    let _ = w.addcdiv_(&neg_step.times(&st.exp_avg), &denom);
                }
                Some(p) => {
                    // Mapped back and added in one product, no full-size temporary.
                    let neg_step = neg_step.value().ok_or_else(recorded_projector)?;
                    p.add_back(&w, &(&st.exp_avg / &denom), neg_step)?;
                }
            }
        }
        AdamWVariant::Hf => {
            let [neg_step, neg_decay, _] = n;
            let _ = st.exp_avg.g_mul_scalar_(c.beta1);
            let _ = st.exp_avg.g_add_(&(g * (1.0 - c.beta1)));
            let _ = st.exp_avg_sq.g_mul_scalar_(c.beta2);
            let _ = st.exp_avg_sq.addcmul_(&(g * (1.0 - c.beta2)), g);
            let denom = st.exp_avg_sq.sqrt() + c.eps;
            match proj {
                Some(p) => {
                    let neg_step = neg_step.value().ok_or_else(recorded_projector)?;
                    p.add_back(&w, &(&st.exp_avg / &denom), neg_step)?
                }
                None => {
                    let _ = w.g_add_(&neg_step.times(&(&st.exp_avg / &denom)));
                }
            }
            if decay {
                let d = neg_decay.times(&w);
                let _ = w.g_add_(&d);
            }
        }
    }
    Ok(())
}
