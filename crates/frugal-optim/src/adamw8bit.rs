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
//! A CPU parameter's moments live on the CPU (as `Vec`s); a GPU parameter's 8-bit moments live
//! in GPU memory and are stepped by `frugal_kernels`' CUDA kernel (the same arithmetic), unless
//! libnvrtc cannot be loaded, in which case they are copied to the device and back at every
//! step. On the CPU, a step of 8-bit state is one fused pass over each 256-value
//! block (dequantize, update, requantize, emit the update), in parallel over blocks; it rounds
//! as the tensor formulas above, operation by operation in f32.

use crate::adamw::reproject;
use crate::optimizer::{impl_optimizer, slice_to, Reader, Slicer, Slot, Slots};
use frugal_core::safetensors_io::SavePart;
use frugal_core::Result;
use frugal_quant::dynamic::{Blockwise8, DynamicMap};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

pub use frugal_kernels::adamw8bit::BLOCK_SIZE;
use frugal_kernels::adamw8bit::{step_block, StepConsts};

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
    /// 8-bit moments in GPU memory, stepped by `frugal_kernels`' kernel.
    Q8Gpu {
        shape: Vec<i64>,
        m: GpuQ8,
        v: GpuQ8,
    },
}

/// Block-wise 8-bit moments in GPU memory: the codes (uint8, one per value) and the absmax
/// values (f32, one per block), in [`Blockwise8`]'s layout.
#[derive(Debug)]
pub(crate) struct GpuQ8 {
    codes: Tensor,
    absmax: Tensor,
    map: DynamicMap,
}

impl GpuQ8 {
    fn upload(q: &Blockwise8, device: Device) -> Self {
        Self {
            codes: Tensor::from_slice(&q.codes).to_device(device),
            absmax: Tensor::from_slice(&q.absmax).to_device(device),
            map: q.map,
        }
    }

    fn zeros(n: usize, map: DynamicMap, device: Device) -> Self {
        Self::upload(&zero_q8(n, map), device)
    }

    fn download(&self) -> Result<Blockwise8> {
        Ok(Blockwise8 {
            codes: Vec::<u8>::try_from(&self.codes.to_device(Device::Cpu))?,
            absmax: Vec::<f32>::try_from(&self.absmax.to_device(Device::Cpu))?,
            block_size: BLOCK_SIZE,
            map: self.map,
        })
    }

    fn bytes(&self) -> u64 {
        (self.codes.numel() + 4 * self.absmax.numel()) as u64
    }
}

impl State {
    /// GPU-resident 8-bit moments brought back to host memory (other states as they are).
    fn on_host(&self) -> Result<Option<State>> {
        Ok(match self {
            State::Q8Gpu { shape, m, v } => Some(State::Q8 {
                shape: shape.clone(),
                m: m.download()?,
                v: v.download()?,
            }),
            _ => None,
        })
    }
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
                update(&c, &mut self.slots.slots[i], &g, true)?;
            }
            Ok(())
        })
    }

    /// The codes are lent to the checkpoint writer as they are (no copy of the state).
    fn rule_parts<'a>(name: &str, s: &'a State) -> Vec<(String, SavePart<'a>)> {
        let codes = |data: &'a [u8], shape: &[i64]| SavePart::Bytes {
            data,
            kind: Kind::Uint8,
            shape: shape.to_vec(),
        };
        match s {
            State::F32 { m, v } => vec![
                (
                    format!("{name}.exp_avg"),
                    SavePart::Tensor(m.shallow_clone()),
                ),
                (
                    format!("{name}.exp_avg_sq"),
                    SavePart::Tensor(v.shallow_clone()),
                ),
            ],
            State::Q8Gpu { shape, m, v } => {
                let host =
                    |t: &Tensor, to: &[i64]| SavePart::Tensor(t.to_device(Device::Cpu).reshape(to));
                let blocks = [m.absmax.numel() as i64];
                vec![
                    (format!("{name}.exp_avg.codes"), host(&m.codes, shape)),
                    (format!("{name}.exp_avg.absmax"), host(&m.absmax, &blocks)),
                    (format!("{name}.exp_avg_sq.codes"), host(&v.codes, shape)),
                    (
                        format!("{name}.exp_avg_sq.absmax"),
                        host(&v.absmax, &blocks),
                    ),
                ]
            }
            State::Q8 { shape, m, v } => vec![
                (format!("{name}.exp_avg.codes"), codes(&m.codes, shape)),
                (
                    format!("{name}.exp_avg.absmax"),
                    SavePart::Tensor(Tensor::from_slice(&m.absmax)),
                ),
                (format!("{name}.exp_avg_sq.codes"), codes(&v.codes, shape)),
                (
                    format!("{name}.exp_avg_sq.absmax"),
                    SavePart::Tensor(Tensor::from_slice(&v.absmax)),
                ),
            ],
        }
    }

    /// 8-bit moments are dequantized, sliced and quantized again (fresh absmax values).
    fn rule_slice(s: &State, slice: &Slicer, shape: &[i64]) -> Result<Option<State>> {
        if let Some(host) = s.on_host()? {
            return Self::rule_slice(&host, slice, shape);
        }
        Ok(Some(match s {
            State::F32 { m, v } => State::F32 {
                m: slice_to(slice, m, shape, "first moment")?,
                v: slice_to(slice, v, shape, "second moment")?,
            },
            State::Q8 { shape: old, m, v } => {
                let m = slice_to(
                    slice,
                    &to_tensor(m, old, Device::Cpu),
                    shape,
                    "first moment",
                )?;
                let v = slice_to(
                    slice,
                    &to_tensor(v, old, Device::Cpu),
                    shape,
                    "second moment",
                )?;
                State::Q8 {
                    shape: shape.to_vec(),
                    m: quantize(&m, DynamicMap::Signed)?,
                    v: quantize(&v, DynamicMap::Unsigned)?,
                }
            }
            State::Q8Gpu { .. } => unreachable!("brought to the host above"),
        }))
    }

    fn rule_bytes(s: &State) -> u64 {
        match s {
            State::F32 { m, v } => {
                frugal_core::memory::tensor_bytes(m) + frugal_core::memory::tensor_bytes(v)
            }
            State::Q8 { m, v, .. } => (m.bytes() + v.bytes()) as u64,
            State::Q8Gpu { m, v, .. } => m.bytes() + v.bytes(),
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

/// Values per chunk of the fused pass (whole blocks): bounds its temporary buffers.
const CHUNK: usize = 4096 * BLOCK_SIZE;

/// Moments' codes and absmax values of one chunk.
struct Q8Chunk<'a> {
    codes: &'a mut [u8],
    absmax: &'a mut [f32],
}

/// One step of block-wise 8-bit moments `m`, `v` in place with gradient `g` (f32, their
/// length), at step `t` (counted from 1): writes to `delta` what bitsandbytes adds to the
/// weight before decay, `-lr / c1 · m / (sqrt(v) / c2 + eps)`. Each block is
/// [`frugal_kernels::adamw8bit::step_block`], the CPU reference of the CUDA kernel.
fn fused_q8(c: &AdamW8bitConfig, t: f64, g: &[f32], m: Q8Chunk, v: Q8Chunk, delta: &mut [f32]) {
    let k = StepConsts::new(c.lr, c.beta1, c.beta2, c.eps, t);
    let bs = BLOCK_SIZE;
    delta
        .par_chunks_mut(bs)
        .zip(g.par_chunks(bs))
        .zip(m.codes.par_chunks_mut(bs).zip(m.absmax.par_iter_mut()))
        .zip(v.codes.par_chunks_mut(bs).zip(v.absmax.par_iter_mut()))
        .for_each(|(((d, g), (qm, am)), (qv, av))| step_block(&k, g, qm, am, qv, av, d));
}

/// Zero moments of `n` values in block-wise 8-bit form.
fn zero_q8(n: usize, map: DynamicMap) -> Blockwise8 {
    Blockwise8 {
        codes: vec![map.lookup().index(0.0); n],
        absmax: vec![0.0; n.div_ceil(BLOCK_SIZE)],
        block_size: BLOCK_SIZE,
        map,
    }
}

/// Brings GPU-resident 8-bit moments back to host memory (for the CPU steps).
fn to_host(state: &mut Option<State>) -> Result<()> {
    if let Some(host) = state.as_ref().map(State::on_host).transpose()?.flatten() {
        *state = Some(host);
    }
    Ok(())
}

/// The fused CPU step of 8-bit state, chunk by chunk, so that besides the state only a chunk's
/// buffers (and, with a projector, the projected update) are allocated.
fn fused_update(c: &AdamW8bitConfig, slot: &mut Slot<State>, g: &Tensor, wd: f64) -> Result<()> {
    to_host(&mut slot.state)?;
    let shape = g.size();
    let flat = g.contiguous().view([-1]);
    let n = flat.numel();
    // Checked before the state is taken: a refused step leaves the state as it was.
    if let Some(State::Q8 { m, .. }) = &slot.state {
        if m.codes.len() != n {
            return Err(frugal_core::Error::Msg(format!(
                "{}: 8-bit AdamW state holds {} values, the gradient {shape:?}",
                slot.name,
                m.codes.len()
            )));
        }
    }
    let (mut m, mut v) = match slot.state.take() {
        Some(State::Q8 { m, v, .. }) => (m, v),
        _ => (
            zero_q8(n, DynamicMap::Signed),
            zero_q8(n, DynamicMap::Unsigned),
        ),
    };
    slot.step += 1;
    let t = slot.step as f64;
    let projected = slot.projector.is_some();
    // Without a projector the update goes straight into the weight, after its decay.
    let w = slot.tensor.view([-1]);
    if !projected && wd != 0.0 {
        let _ = w.shallow_clone().g_mul_scalar_(1.0 - c.lr * wd);
    }
    let delta = projected.then(|| Tensor::empty([n as i64], (Kind::Float, Device::Cpu)));
    let mut buf = vec![0f32; CHUNK.min(n)];
    for start in (0..n).step_by(CHUNK) {
        let len = CHUNK.min(n - start);
        let gv = Vec::<f32>::try_from(&flat.narrow(0, start as i64, len as i64))?;
        let blocks = start / BLOCK_SIZE..(start + len).div_ceil(BLOCK_SIZE);
        let d = &mut buf[..len];
        fused_q8(
            c,
            t,
            &gv,
            Q8Chunk {
                codes: &mut m.codes[start..start + len],
                absmax: &mut m.absmax[blocks.clone()],
            },
            Q8Chunk {
                codes: &mut v.codes[start..start + len],
                absmax: &mut v.absmax[blocks],
            },
            d,
        );
        let dt = Tensor::from_slice(d);
        let target = delta
            .as_ref()
            .unwrap_or(&w)
            .narrow(0, start as i64, len as i64);
        if projected {
            target.shallow_clone().copy_(&dt);
        } else {
            let _ = target.shallow_clone().g_add_(&dt.to_kind(w.kind()));
        }
    }
    slot.state = Some(State::Q8 {
        shape: shape.clone(),
        m,
        v,
    });
    match delta {
        Some(d) => apply(slot, &d.reshape(&shape), c.lr, wd),
        None => Ok(()),
    }
}

/// The step of 8-bit state on a GPU, with the kernel of `frugal_kernels::adamw8bit` (the same
/// arithmetic as the CPU's fused pass): the moments stay in GPU memory between steps.
fn gpu_update(c: &AdamW8bitConfig, slot: &mut Slot<State>, g: &Tensor, wd: f64) -> Result<()> {
    let shape = g.size();
    let n = g.numel();
    let device = g.device();
    let held = match &slot.state {
        Some(State::Q8 { m, .. }) => Some(m.codes.len()),
        Some(State::Q8Gpu { m, .. }) => Some(m.codes.numel()),
        _ => None,
    };
    if let Some(len) = held.filter(|&len| len != n) {
        return Err(frugal_core::Error::Msg(format!(
            "{}: 8-bit AdamW state holds {len} values, the gradient {shape:?}",
            slot.name
        )));
    }
    let (mut m, mut v) = match slot.state.take() {
        Some(State::Q8Gpu { m, v, .. }) if m.codes.device() == device => (m, v),
        Some(State::Q8Gpu { m, v, .. }) => (
            GpuQ8::upload(&m.download()?, device),
            GpuQ8::upload(&v.download()?, device),
        ),
        Some(State::Q8 { m, v, .. }) => (GpuQ8::upload(&m, device), GpuQ8::upload(&v, device)),
        _ => (
            GpuQ8::zeros(n, DynamicMap::Signed, device),
            GpuQ8::zeros(n, DynamicMap::Unsigned, device),
        ),
    };
    let k = StepConsts::new(c.lr, c.beta1, c.beta2, c.eps, (slot.step + 1) as f64);
    let flat = g.contiguous().view([-1]);
    let delta = frugal_kernels::Kernels::global()
        .adamw8bit_step_f32(
            &flat,
            &mut m.codes,
            &mut m.absmax,
            &mut v.codes,
            &mut v.absmax,
            &k,
        )
        .map_err(|e| frugal_core::Error::Msg(format!("{}: 8-bit AdamW kernel: {e}", slot.name)))?;
    slot.step += 1;
    slot.state = Some(State::Q8Gpu {
        shape: shape.clone(),
        m,
        v,
    });
    apply(slot, &delta.view(shape.as_slice()), c.lr, wd)
}

/// Applies `delta` (in the moments' shape) to the slot's weight, with decay `wd`: before the
/// update without a projector, after the mapped-back update with one (galore-torch's order).
fn apply(slot: &Slot<State>, delta: &Tensor, lr: f64, wd: f64) -> Result<()> {
    let mut w = slot.tensor.shallow_clone();
    let decay = wd != 0.0;
    match slot.projector.as_deref() {
        None => {
            if decay {
                let _ = w.g_mul_scalar_(1.0 - lr * wd);
            }
            let d = delta.to_kind(w.kind());
            let _ = w.g_add_(&d);
        }
        Some(p) => {
            p.add_back(&w, delta, 1.0)?;
            if decay {
                let d = &w * (-lr * wd);
                let _ = w.g_add_(&d);
            }
        }
    }
    Ok(())
}

/// One step of `slot` with gradient `g` (projected already when it has a projector); `fuse`
/// allows the fused CPU pass for 8-bit state (the tensor formulas otherwise).
fn update(c: &AdamW8bitConfig, slot: &mut Slot<State>, g: &Tensor, fuse: bool) -> Result<()> {
    let wd = slot.weight_decay(c.weight_decay);
    let proj = slot.projector.as_deref();
    let g = g.to_kind(Kind::Float);
    let device = g.device();
    let fused = fuse
        && device == Device::Cpu
        && slot.tensor.is_contiguous()
        && !proj.is_some_and(|p| p.moments_need_reprojection())
        && match &slot.state {
            None => g.numel() as i64 >= c.min_8bit_size,
            Some(State::Q8 { .. } | State::Q8Gpu { .. }) => true,
            Some(State::F32 { .. }) => false,
        };
    if fused {
        return fused_update(c, slot, &g, wd);
    }
    let on_gpu = fuse
        && device.is_cuda()
        && !proj.is_some_and(|p| p.moments_need_reprojection())
        && match &slot.state {
            None => g.numel() as i64 >= c.min_8bit_size,
            Some(State::Q8 { .. } | State::Q8Gpu { .. }) => true,
            Some(State::F32 { .. }) => false,
        }
        && frugal_kernels::ensure_nvrtc().is_ok();
    if on_gpu {
        return gpu_update(c, slot, &g, wd);
    }
    to_host(&mut slot.state)?;
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
        Some(State::Q8Gpu { .. }) => unreachable!("brought to the host above"),
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
    apply(slot, &delta, c.lr, wd)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused CPU pass and the tensor formulas give the same state and weights: within one
    /// chunk (4 full blocks and a partial one) and over several chunks.
    #[test]
    fn fused_pass_matches_the_tensor_formulas() {
        compare_fused([9, 127]);
        compare_fused([1100, 1001]);
    }

    fn compare_fused(shape: [i64; 2]) {
        tch::manual_seed(3);
        let c = AdamW8bitConfig {
            lr: 1e-2,
            weight_decay: 0.1,
            min_8bit_size: 256,
            ..Default::default()
        };
        // One all-zero block in the gradient.
        let w0 = Tensor::randn(shape, (Kind::Float, Device::Cpu));
        let mut slots: Vec<Slot<State>> = (0..2)
            .map(|_| Slots::new(vec![("w".into(), w0.copy())]).slots.remove(0))
            .collect();
        for step in 0..6 {
            let g = Tensor::randn(shape, (Kind::Float, Device::Cpu)) * (0.1 * (step + 1) as f64);
            let _ = g.view([-1]).narrow(0, 256, 256).fill_(0.0);
            for (k, slot) in slots.iter_mut().enumerate() {
                tch::no_grad(|| update(&c, slot, &g, k == 0)).unwrap();
            }
            let (Some(State::Q8 { m: m0, v: v0, .. }), Some(State::Q8 { m: m1, v: v1, .. })) =
                (&slots[0].state, &slots[1].state)
            else {
                panic!("8-bit state expected");
            };
            for (a, b) in [(m0, m1), (v0, v1)] {
                let off = a.codes.iter().zip(&b.codes).filter(|(x, y)| x != y).count();
                assert!(
                    off <= 2 + a.codes.len() / 100_000,
                    "step {step}: {off} codes differ"
                );
                for (x, y) in a.absmax.iter().zip(&b.absmax) {
                    assert!(
                        (x - y).abs() <= 1e-6 * y.abs(),
                        "step {step}: absmax {x} vs {y}"
                    );
                }
            }
            // A code one step apart (rounding of the last bit) moves its weight a little.
            let dw = (&slots[0].tensor - &slots[1].tensor).abs();
            let apart = dw.gt(1e-6).sum(Kind::Int64).int64_value(&[]);
            let worst = dw.max().double_value(&[]);
            assert!(
                apart as usize <= 2 + w0.numel() / 100_000 && worst < 0.05 * c.lr,
                "step {step}: {apart} weights differ, by up to {worst}"
            );
        }
        let moved = (&slots[0].tensor - &w0).abs().max().double_value(&[]);
        assert!(moved > 1e-3, "the steps must move the weights ({moved})");
    }
}
