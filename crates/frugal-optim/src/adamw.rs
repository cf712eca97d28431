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

use crate::optimizer::{impl_optimizer, slice_to, tensor_parts, Reader, Slicer, Slot, Slots};
use frugal_core::safetensors_io::SavePart;
use frugal_core::Result;
use frugal_galore::GradientProjector;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::Tensor;

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
}

impl AdamW {
    const META_KEY: &'static str = "adamw";

    /// An optimizer over `params` (name, tensor that requires grad).
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        Self {
            config,
            slots: Slots::new(params),
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

impl_optimizer!(AdamW);

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
    let t = slot.step as f64;
    let mut w = slot.tensor.shallow_clone();
    let decay = wd != 0.0;
    match c.variant {
        AdamWVariant::Torch => {
            if decay {
                let _ = w.g_mul_scalar_(1.0 - c.lr * wd);
            }
            let _ = st.exp_avg.lerp_(g, 1.0 - c.beta1);
            let _ = st.exp_avg_sq.g_mul_scalar_(c.beta2);
            let _ = st.exp_avg_sq.addcmul_(&(g * (1.0 - c.beta2)), g);
            let bc1 = 1.0 - c.beta1.powf(t);
            let bc2_sqrt = (1.0 - c.beta2.powf(t)).sqrt();
            let denom = (st.exp_avg_sq.sqrt() / bc2_sqrt) + c.eps;
            match proj {
                None => {
                    let _ = w.addcdiv_(&(&st.exp_avg * (-c.lr / bc1)), &denom);
                }
                Some(p) => {
                    // Mapped back and added in one product, no full-size temporary.
                    p.add_back(&w, &(&st.exp_avg / &denom), -c.lr / bc1)?;
                }
            }
        }
        AdamWVariant::Hf => {
            let _ = st.exp_avg.g_mul_scalar_(c.beta1);
            let _ = st.exp_avg.g_add_(&(g * (1.0 - c.beta1)));
            let _ = st.exp_avg_sq.g_mul_scalar_(c.beta2);
            let _ = st.exp_avg_sq.addcmul_(&(g * (1.0 - c.beta2)), g);
            let denom = st.exp_avg_sq.sqrt() + c.eps;
            let bc1 = 1.0 - c.beta1.powf(t);
            let bc2 = 1.0 - c.beta2.powf(t);
            let step_size = c.lr * bc2.sqrt() / bc1;
            match proj {
                Some(p) => p.add_back(&w, &(&st.exp_avg / &denom), -step_size)?,
                None => {
                    let _ = w.g_add_(&((&st.exp_avg / &denom) * (-step_size)));
                }
            }
            if decay {
                let d = &w * (-c.lr * wd);
                let _ = w.g_add_(&d);
            }
        }
    }
    Ok(())
}
