//! 8-bit AdamW with the semantics of bitsandbytes' `AdamW8bit` (Dettmers et al. 2022): each
//! moment of a tensor with at least `min_8bit_size` (4096) elements is stored block-wise (256
//! values per block, f32 absmax per block) as 8-bit codes of the dynamic map, signed for the
//! first moment and unsigned for the second ([`frugal_quant::dynamic::Blockwise8`]). Smaller
//! tensors keep f32 moments.
//!
//! A step dequantizes both moments, does an f32 AdamW step, and requantizes them with fresh
//! absmax values. The formulas follow bitsandbytes 0.50's CPU kernels (same rounding order):
//!
//! - 8-bit state: `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g²`,
//!   `w = w (1 - lr wd)`, `w += -lr / (1 - b1^t) · m / (sqrt(v) / sqrt(1 - b2^t) + eps)`;
//! - f32 state: the same moments, `w = w (1 - lr wd)`,
//!   `w += -lr sqrt(1 - b2^t) / (1 - b1^t) · m / (sqrt(v) + eps sqrt(1 - b2^t))`.
//!
//! Codes: the exact nearest code of `value / absmax`, ties to the even index, as bitsandbytes'
//! CUDA kernels. bitsandbytes' CPU quantizer looks codes up in an approximate grid and can pick
//! a neighbouring code, so codes can differ from bitsandbytes-on-CPU by one step (the trajectory
//! test against bitsandbytes therefore uses a tolerance).
//!
//! With a GaLore projector (galore-torch's `GaLoreAdamW8bit`): the moments have the projected
//! gradient's shape (8-bit when that has at least `min_8bit_size` elements); the update that
//! bitsandbytes would apply to a zero weight is mapped back and added to the weight, and the
//! weight decay `w -= lr wd w` comes after.
//!
//! The moments live on the CPU (as `Vec`s); a GPU parameter's state is copied to the device and
//! back at every step.

use crate::adamw::reproject;
use crate::optimizer::{impl_optimizer, Reader, Slot, Slots};
use frugal_core::Result;
use frugal_quant::dynamic::{Blockwise8, DynamicMap};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Values per quantization block.
pub const BLOCK_SIZE: usize = 256;

/// 8-bit AdamW's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamW8bitConfig {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay β1.
    pub beta1: f64,
    /// Second-moment decay β2.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay, on parameters of two or more dimensions.
    pub weight_decay: f64,
    /// Tensors (or projected gradients) with fewer elements keep f32 moments.
    pub min_8bit_size: i64,
}

impl Default for AdamW8bitConfig {
    /// bitsandbytes' defaults, except weight decay 0 (as [`crate::AdamWConfig`]).
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            min_8bit_size: 4096,
        }
    }
}

#[derive(Debug)]
pub(crate) enum State {
    F32 {
        m: Tensor,
        v: Tensor,
    },
    Q8 {
        shape: Vec<i64>,
        m: Blockwise8,
        v: Blockwise8,
    },
}

/// 8-bit AdamW over named parameters, optionally with a GaLore projector per parameter.
#[derive(Debug)]
pub struct AdamW8bit {
    /// Hyper-parameters; `lr` may be changed between steps.
    pub config: AdamW8bitConfig,
    pub(crate) slots: Slots<State>,
}

fn to_tensor(q: &Blockwise8, shape: &[i64], device: Device) -> Tensor {
    Tensor::from_slice(&q.dequantize())
        .reshape(shape)
        .to_device(device)
}

fn quantize(t: &Tensor, map: DynamicMap) -> Result<Blockwise8> {
    let flat = t
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous()
        .view([-1]);
    let v = Vec::<f32>::try_from(&flat)?;
    Ok(Blockwise8::quantize(&v, BLOCK_SIZE, map))
}

fn u8_tensor(codes: &[u8], shape: &[i64]) -> Tensor {
    Tensor::from_slice(codes).reshape(shape)
}

impl AdamW8bit {
    const META_KEY: &'static str = "adamw8bit";

    /// An optimizer over `params` (name, tensor that requires grad).
    pub fn new(params: Vec<(String, Tensor)>, config: AdamW8bitConfig) -> Self {
        Self {
            config,
            slots: Slots::new(params),
        }
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

    fn rule_tensors(name: &str, s: &State) -> Vec<(String, Tensor)> {
        match s {
            State::F32 { m, v } => vec![
                (format!("{name}.exp_avg"), m.shallow_clone()),
                (format!("{name}.exp_avg_sq"), v.shallow_clone()),
            ],
            State::Q8 { shape, m, v } => vec![
                (format!("{name}.exp_avg.codes"), u8_tensor(&m.codes, shape)),
                (
                    format!("{name}.exp_avg.absmax"),
                    Tensor::from_slice(&m.absmax),
                ),
                (
                    format!("{name}.exp_avg_sq.codes"),
                    u8_tensor(&v.codes, shape),
                ),
                (
                    format!("{name}.exp_avg_sq.absmax"),
                    Tensor::from_slice(&v.absmax),
                ),
            ],
        }
    }

    fn rule_bytes(s: &State) -> u64 {
        match s {
            State::F32 { m, v } => {
                frugal_core::memory::tensor_bytes(m) + frugal_core::memory::tensor_bytes(v)
            }
            State::Q8 { m, v, .. } => (m.bytes() + v.bytes()) as u64,
        }
    }

    fn load_rule(r: &Reader, slot: &Slot<State>) -> Result<State> {
        let name = &slot.name;
        let m_codes = format!("{name}.exp_avg.codes");
        if !r.has(&m_codes) {
            let m = r.moment(&format!("{name}.exp_avg"), slot)?;
            let v = r.shaped(&format!("{name}.exp_avg_sq"), m.device(), &m.size())?;
            return Ok(State::F32 {
                m: m.to_kind(Kind::Float),
                v: v.to_kind(Kind::Float),
            });
        }
        let mc = r.moment(&m_codes, slot)?;
        let shape = mc.size();
        let vc = r.shaped(&format!("{name}.exp_avg_sq.codes"), Device::Cpu, &shape)?;
        let blocks = (mc.numel() as i64 + BLOCK_SIZE as i64 - 1) / BLOCK_SIZE as i64;
        let read = |codes: &Tensor, absmax_name: &str, map| -> Result<Blockwise8> {
            if codes.kind() != Kind::Uint8 {
                return Err(frugal_core::Error::Msg(format!(
                    "{}: '{absmax_name}' belongs to codes that are not uint8",
                    r.path().display()
                )));
            }
            let a = r.shaped(absmax_name, Device::Cpu, &[blocks])?;
            Ok(Blockwise8 {
                codes: Vec::<u8>::try_from(&codes.to_device(Device::Cpu).view([-1]))?,
                absmax: Vec::<f32>::try_from(&a.to_kind(Kind::Float))?,
                block_size: BLOCK_SIZE,
                map,
            })
        };
        Ok(State::Q8 {
            m: read(&mc, &format!("{name}.exp_avg.absmax"), DynamicMap::Signed)?,
            v: read(
                &vc,
                &format!("{name}.exp_avg_sq.absmax"),
                DynamicMap::Unsigned,
            )?,
            shape,
        })
    }
}

impl_optimizer!(AdamW8bit);

/// One step of `slot` with gradient `g` (projected already when it has a projector).
fn update(c: &AdamW8bitConfig, slot: &mut Slot<State>, g: &Tensor) -> Result<()> {
    let wd = slot.weight_decay(c.weight_decay);
    let proj = slot.projector.as_deref();
    let g = g.to_kind(Kind::Float);
    let device = g.device();
    let (mut m, mut v, eight) = match &slot.state {
        None => (
            g.zeros_like(),
            g.zeros_like(),
            g.numel() as i64 >= c.min_8bit_size,
        ),
        Some(State::F32 { m, v }) => (m.shallow_clone(), v.shallow_clone(), false),
        Some(State::Q8 { shape, m, v }) => (
            to_tensor(m, shape, device),
            to_tensor(v, shape, device),
            true,
        ),
    };
    if slot.state.is_some() {
        reproject(proj, &mut m, &mut v)?;
    }
    slot.step += 1;
    let t = slot.step as f64;
    let _ = m.g_mul_scalar_(c.beta1);
    let _ = m.g_add_(&(&g * (1.0 - c.beta1)));
    let _ = v.g_mul_scalar_(c.beta2);
    let _ = v.addcmul_(&(&g * (1.0 - c.beta2)), &g);
    let c1 = 1.0 - c.beta1.powf(t);
    let c2 = (1.0 - c.beta2.powf(t)).sqrt();
    // What bitsandbytes adds to the weight (before decay), in the moments' shape.
    let delta = if eight {
        let denom = v.sqrt() / c2 + c.eps;
        // addcdiv's rounding: (value · m) / denom.
        (&m * (-c.lr / c1)) / &denom
    } else {
        let step_size = -c.lr * c2 / c1;
        let denom = v.sqrt() + c.eps * c2;
        (&m / &denom) * step_size
    };
    let mut w = slot.tensor.shallow_clone();
    let decay = wd != 0.0;
    match proj {
        None => {
            if decay {
                let _ = w.g_mul_scalar_(1.0 - c.lr * wd);
            }
            let d = delta.to_kind(w.kind());
            let _ = w.g_add_(&d);
        }
        Some(p) => {
            let full = p.project_back(&delta)?;
            let _ = w.g_add_(&full.to_kind(w.kind()));
            if decay {
                let d = &w * (-c.lr * wd);
                let _ = w.g_add_(&d);
            }
        }
    }
    slot.state = Some(if eight {
        State::Q8 {
            shape: m.size(),
            m: quantize(&m, DynamicMap::Signed)?,
            v: quantize(&v, DynamicMap::Unsigned)?,
        }
    } else {
        State::F32 { m, v }
    });
    Ok(())
}
