//! Adafactor (Shazeer & Stern 2018) with the semantics and order of operations of Hugging Face's
//! `transformers.optimization.Adafactor` (and galore-torch's `GaLoreAdafactor` when a projector
//! is attached).
//!
//! For a gradient `G` with two or more dimensions the second moment is factored into running
//! means of `G² + eps1` over its last dimension (rows) and its second-to-last (columns); other
//! gradients keep a full running mean. With `t` the step, `b2t = 1 - t^decay_rate`,
//! `U = G / sqrt(v̂)`, `U /= max(1, rms(U) / clip_threshold)`, `U *= lr_t`; with `beta1`,
//! `m = b1 m + (1 - b1) U` and `U = m`. Then `w -= wd lr_t w` and `w -= back(U)`.
//!
//! The step size `lr_t` is `lr` (set by the trainer) or, with `relative_step`,
//! `min(1e-2, 1/sqrt(t))` (`min(1e-6 t, 1/sqrt(t))` with `warmup_init`); with
//! `scale_parameter` it is multiplied by `max(eps2, rms(w))`, computed in f32 like transformers.

use crate::optimizer::{back, impl_optimizer, tensor_parts, Reader, Slicer, Slot, Slots};
use frugal_core::safetensors_io::SavePart;
use frugal_core::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Adafactor's hyper-parameters (transformers' names and defaults, except that the learning
/// rate is given and `relative_step` is off, as the trainer schedules it).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdafactorConfig {
    /// Learning rate (used when `relative_step` is false).
    pub lr: f64,
    /// Regularizer added to the squared gradient (transformers' `eps[0]`, 1e-30).
    pub eps1: f64,
    /// Lower bound of the parameter scale (transformers' `eps[1]`, 1e-3).
    pub eps2: f64,
    /// Updates whose RMS exceeds this are scaled down to it.
    pub clip_threshold: f64,
    /// Exponent of the second-moment decay schedule `1 - t^decay_rate` (-0.8).
    pub decay_rate: f64,
    /// First-moment decay; `None` keeps no first moment (the default).
    pub beta1: Option<f64>,
    /// Decoupled weight decay times the step size, on parameters of two or more dimensions.
    pub weight_decay: f64,
    /// Multiply the step size by the parameter's RMS (at least `eps2`).
    pub scale_parameter: bool,
    /// Use the relative step size `min(1e-2, 1/sqrt(t))` instead of `lr`.
    pub relative_step: bool,
    /// With `relative_step`: `min(1e-6 t, 1/sqrt(t))`.
    pub warmup_init: bool,
}

impl Default for AdafactorConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            eps1: 1e-30,
            eps2: 1e-3,
            clip_threshold: 1.0,
            decay_rate: -0.8,
            beta1: None,
            weight_decay: 0.0,
            scale_parameter: true,
            relative_step: false,
            warmup_init: false,
        }
    }
}

#[derive(Debug)]
pub(crate) enum Second {
    Factored { row: Tensor, col: Tensor },
    Full(Tensor),
}

#[derive(Debug)]
pub(crate) struct State {
    exp_avg: Option<Tensor>,
    second: Second,
}

/// Adafactor over named parameters, optionally with a GaLore projector per parameter.
#[derive(Debug)]
pub struct Adafactor {
    /// Hyper-parameters; `lr` may be changed between steps.
    pub config: AdafactorConfig,
    pub(crate) slots: Slots<State>,
}

impl Adafactor {
    const META_KEY: &'static str = "adafactor";

    /// An optimizer over `params` (name, tensor that requires grad). Errors when the
    /// configuration is inconsistent (`warmup_init` without `relative_step`, `beta1` outside
    /// [0, 1)).
    pub fn new(params: Vec<(String, Tensor)>, config: AdafactorConfig) -> Result<Self> {
        if config.warmup_init && !config.relative_step {
            return Err(Error::config(
                "adafactor.warmup_init",
                "needs relative_step = true",
            ));
        }
        if let Some(b) = config.beta1 {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::config(
                    "adafactor.beta1",
                    format!("{b} is not in [0, 1)"),
                ));
            }
        }
        Ok(Self {
            config,
            slots: Slots::new(params),
        })
    }

    fn step_impl(&mut self, indices: &[usize]) -> Result<()> {
        let c = self.config;
        tch::no_grad(|| {
            for &i in indices {
                let Some(g) = self.slots.take_gradient(i)? else {
                    continue;
                };
                update(&c, &mut self.slots.slots[i], &g)?;
            }
            Ok(())
        })
    }

    fn rule_parts<'a>(name: &str, s: &'a State) -> Vec<(String, SavePart<'a>)> {
        tensor_parts(Self::rule_tensors(name, s))
    }

    fn rule_tensors(name: &str, s: &State) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        if let Some(m) = &s.exp_avg {
            out.push((format!("{name}.exp_avg"), m.shallow_clone()));
        }
        match &s.second {
            Second::Factored { row, col } => {
                out.push((format!("{name}.exp_avg_sq_row"), row.shallow_clone()));
                out.push((format!("{name}.exp_avg_sq_col"), col.shallow_clone()));
            }
            Second::Full(v) => out.push((format!("{name}.exp_avg_sq"), v.shallow_clone())),
        }
        out
    }

    /// The factored second moment does not slice: the parameter starts afresh.
    fn rule_slice(_: &State, _: &Slicer, _: &[i64]) -> Result<Option<State>> {
        Ok(None)
    }

    fn rule_bytes(s: &State) -> u64 {
        Self::rule_tensors("", s)
            .iter()
            .map(|(_, t)| frugal_core::memory::tensor_bytes(t))
            .sum()
    }

    fn load_rule(r: &Reader, slot: &Slot<State>) -> Result<State> {
        let dev = slot.tensor.device();
        let kind = slot.tensor.kind();
        let name = &slot.name;
        let row_name = format!("{name}.exp_avg_sq_row");
        let m_name = format!("{name}.exp_avg");
        // The (projected) gradient shape: from exp_avg or the factors.
        let exp_avg = if r.has(&m_name) {
            Some(r.moment(&m_name, slot)?)
        } else {
            None
        };
        let second = if r.has(&row_name) {
            let row = r.get(&row_name, dev)?;
            let col_name = format!("{name}.exp_avg_sq_col");
            let col = r.get(&col_name, dev)?;
            let (rs, cs) = (row.size(), col.size());
            let ps = slot.tensor.size();
            let shape: Vec<i64> = rs.iter().copied().chain(cs.last().copied()).collect();
            let consistent = ps.len() >= 2
                && rs.len() == ps.len() - 1
                && cs.len() == ps.len() - 1
                && rs[..rs.len() - 1] == cs[..cs.len() - 1];
            let fits = if slot.projector.is_some() {
                consistent && shape.iter().zip(&ps).all(|(a, b)| a <= b)
            } else {
                consistent && shape == ps
            };
            if !fits {
                return Err(r.shape_error(&row_name, &row, &ps[..ps.len().saturating_sub(1)]));
            }
            if let Some(m) = &exp_avg {
                if m.size() != shape {
                    return Err(r.shape_error(&m_name, m, &shape));
                }
            }
            Second::Factored {
                row: row.to_kind(kind),
                col: col.to_kind(kind),
            }
        } else {
            let v_name = format!("{name}.exp_avg_sq");
            let v = r.moment(&v_name, slot)?;
            if let Some(m) = &exp_avg {
                if m.size() != v.size() {
                    return Err(r.shape_error(&m_name, m, &v.size()));
                }
            }
            Second::Full(v.to_kind(kind))
        };
        Ok(State {
            exp_avg: exp_avg.map(|m| m.to_kind(kind)),
            second,
        })
    }
}

impl_optimizer!(Adafactor);

/// `‖t‖₂ / sqrt(numel)` as a 0-d tensor, in t's precision (transformers' `_rms`).
fn rms(t: &Tensor) -> Tensor {
    t.norm() / (t.numel() as f64).powf(0.5)
}

/// One Adafactor step of `slot` with gradient `g` (projected already when it has a projector).
fn update(c: &AdafactorConfig, slot: &mut Slot<State>, g: &Tensor) -> Result<()> {
    let wd = slot.weight_decay(c.weight_decay);
    let proj = slot.projector.as_deref();
    let g = if matches!(g.kind(), Kind::Half | Kind::BFloat16) {
        g.to_kind(Kind::Float)
    } else {
        g.shallow_clone()
    };
    let shape = g.size();
    let factored = shape.len() >= 2;
    let st = match slot.state.as_mut() {
        Some(st) => {
            if let (Some(p), Some(m)) = (proj, st.exp_avg.as_mut()) {
                if let Some(nm) = p.reproject_first_moment(m) {
                    *m = nm;
                }
            }
            // Factored second moments are not re-projected (the factors are no moment of the
            // projected gradient); a full one is.
            if let (Some(p), Second::Full(v)) = (proj, &mut st.second) {
                if let Some(nv) = p.reproject_second_moment(v) {
                    *v = nv;
                }
            }
            st
        }
        None => {
            let opts = (g.kind(), g.device());
            let second = if factored {
                let n = shape.len();
                let col_shape: Vec<i64> = shape[..n - 2]
                    .iter()
                    .chain(&shape[n - 1..])
                    .copied()
                    .collect();
                Second::Factored {
                    row: Tensor::zeros(&shape[..n - 1], opts),
                    col: Tensor::zeros(&col_shape, opts),
                }
            } else {
                Second::Full(g.zeros_like())
            };
            slot.state.insert(State {
                exp_avg: c.beta1.map(|_| g.zeros_like()),
                second,
            })
        }
    };
    slot.step += 1;
    let t = slot.step as f64;
    let mut w = slot.tensor.shallow_clone();

    // Step size, with transformers' mix of Python floats and f32 tensors.
    let rel = if c.relative_step {
        let min_step = if c.warmup_init { 1e-6 * t } else { 1e-2 };
        min_step.min(1.0 / t.sqrt())
    } else {
        c.lr
    };
    let w32 = if matches!(w.kind(), Kind::Half | Kind::BFloat16) {
        w.to_kind(Kind::Float)
    } else {
        w.shallow_clone()
    };
    // `lr32`: the step size as the kernels see it (f32). `lr64`: transformers' Python float,
    // when the step size is not an f32 tensor (no scale_parameter, or rms(w) <= eps2).
    let (lr32, lr64) = if c.scale_parameter {
        let r = rms(&w32).double_value(&[]) as f32;
        if r > c.eps2 as f32 {
            (r * rel as f32, None)
        } else {
            ((c.eps2 * rel) as f32, Some(c.eps2 * rel))
        }
    } else {
        (rel as f32, Some(rel))
    };

    let b2t = 1.0 - t.powf(c.decay_rate);
    let sq = g.square() + c.eps1;
    let mut u = match &mut st.second {
        Second::Factored { row, col } => {
            let _ = row.g_mul_scalar_(b2t);
            let _ = row.g_add_(&(sq.mean_dim(-1, false, None) * (1.0 - b2t)));
            let _ = col.g_mul_scalar_(b2t);
            let _ = col.g_add_(&(sq.mean_dim(-2, false, None) * (1.0 - b2t)));
            let r = (&*row / row.mean_dim(-1, true, None)).rsqrt().unsqueeze(-1);
            let cf = col.unsqueeze(-2).rsqrt();
            r * cf * &g
        }
        Second::Full(v) => {
            let _ = v.g_mul_scalar_(b2t);
            let _ = v.g_add_(&(sq * (1.0 - b2t)));
            v.rsqrt() * &g
        }
    };
    let mut scale = rms(&u) / c.clip_threshold;
    let _ = scale.clamp_min_(1.0);
    let _ = u.g_div_(&scale);
    let _ = u.g_mul_scalar_(lr32 as f64);
    if let (Some(b1), Some(m)) = (c.beta1, st.exp_avg.as_mut()) {
        let _ = m.g_mul_scalar_(b1);
        let _ = m.g_add_(&(&u * (1.0 - b1)));
        u = m.shallow_clone();
    }
    let u = back(proj, &u)?;
    let mut p = w32.shallow_clone();
    if wd != 0.0 {
        let alpha = match lr64 {
            None => lr32 * (-wd) as f32,
            Some(lr) => (-wd * lr) as f32,
        };
        let d = &p * alpha as f64;
        let _ = p.g_add_(&d);
    }
    let _ = p.g_add_(&(-u));
    if matches!(w.kind(), Kind::Half | Kind::BFloat16) {
        w.copy_(&p);
    }
    Ok(())
}
