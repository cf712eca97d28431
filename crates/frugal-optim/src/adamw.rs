//! AdamW: `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g²`,
//! `w = w (1 - lr wd) - lr / (1 - b1^t) · m / (sqrt(v) / sqrt(1 - b2^t) + eps)`,
//! in the order of operations of `torch.optim.AdamW` so that results agree to float rounding.

use frugal_core::safetensors_io::{self, SafetensorsFile};
use frugal_core::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::Tensor;

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
        }
    }
}

#[derive(Debug)]
struct State {
    step: i64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

#[derive(Debug)]
struct Param {
    name: String,
    tensor: Tensor,
    state: Option<State>,
}

/// AdamW over named parameters. State is created lazily at a parameter's first step.
#[derive(Debug)]
pub struct AdamW {
    /// Hyper-parameters; `lr` may be changed between steps.
    pub config: AdamWConfig,
    params: Vec<Param>,
}

impl AdamW {
    /// An optimizer over `params` (name, tensor that requires grad).
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        let params = params
            .into_iter()
            .map(|(name, tensor)| Param {
                name,
                tensor,
                state: None,
            })
            .collect();
        Self { config, params }
    }

    /// Sets the learning rate for the next steps.
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// Names of the parameters, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }

    /// Steps every parameter that has a gradient.
    pub fn step(&mut self) {
        let all: Vec<usize> = (0..self.params.len()).collect();
        self.step_indices(&all);
    }

    /// Steps only the parameters at `indices` (positions in the order given to [`AdamW::new`])
    /// that have a gradient; the others keep their state and step counts.
    pub fn step_indices(&mut self, indices: &[usize]) {
        let c = self.config;
        tch::no_grad(|| {
            for &i in indices {
                let p = &mut self.params[i];
                let grad = p.tensor.grad();
                if !grad.defined() {
                    continue;
                }
                let st = p.state.get_or_insert_with(|| State {
                    step: 0,
                    exp_avg: p.tensor.zeros_like(),
                    exp_avg_sq: p.tensor.zeros_like(),
                });
                st.step += 1;
                let mut w = p.tensor.shallow_clone();
                if c.weight_decay != 0.0 && w.dim() >= 2 {
                    let _ = w.g_mul_scalar_(1.0 - c.lr * c.weight_decay);
                }
                let _ = st.exp_avg.lerp_(&grad, 1.0 - c.beta1);
                let _ = st.exp_avg_sq.g_mul_scalar_(c.beta2);
                let _ = st.exp_avg_sq.addcmul_(&(&grad * (1.0 - c.beta2)), &grad);
                let bc1 = 1.0 - c.beta1.powi(st.step as i32);
                let bc2_sqrt = (1.0 - c.beta2.powi(st.step as i32)).sqrt();
                let denom = (st.exp_avg_sq.sqrt() / bc2_sqrt) + c.eps;
                let _ = w.addcdiv_(&(&st.exp_avg * (-c.lr / bc1)), &denom);
            }
        });
    }

    /// Drops every parameter's gradient.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.detach_();
                let _ = g.zero_();
            }
        }
    }

    /// Bytes held by the optimizer state.
    pub fn state_bytes(&self) -> u64 {
        self.params
            .iter()
            .filter_map(|p| p.state.as_ref())
            .map(|s| {
                frugal_core::memory::tensor_bytes(&s.exp_avg)
                    + frugal_core::memory::tensor_bytes(&s.exp_avg_sq)
            })
            .sum()
    }

    /// The state as named tensors: `P.exp_avg`, `P.exp_avg_sq` and `P.step` (int64 scalar).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for p in &self.params {
            if let Some(s) = &p.state {
                out.push((format!("{}.exp_avg", p.name), s.exp_avg.shallow_clone()));
                out.push((
                    format!("{}.exp_avg_sq", p.name),
                    s.exp_avg_sq.shallow_clone(),
                ));
                out.push((format!("{}.step", p.name), Tensor::from(s.step)));
            }
        }
        out
    }

    /// Saves the state to `path` (atomically), with the hyper-parameters in the metadata.
    pub fn save(&self, path: &Path) -> Result<()> {
        let meta = [(
            "adamw".to_string(),
            serde_json::to_string(&self.config).expect("plain struct"),
        )];
        safetensors_io::save(
            path,
            &self.state_tensors(),
            Some(meta.into_iter().collect()),
        )
    }

    /// Loads the state saved by [`AdamW::save`]. Every tensor's shape is checked against its
    /// parameter; the error names the file and the tensor.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let file = SafetensorsFile::open(path)?;
        let names = file.names();
        let mut states = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let key = format!("{}.step", p.name);
            if !names.contains(&key) {
                states.push(None);
                continue;
            }
            let device = p.tensor.device();
            let step = file.tensor(&key, tch::Device::Cpu)?.int64_value(&[]);
            let moment = |suffix: &str| -> Result<Tensor> {
                let name = format!("{}.{suffix}", p.name);
                let t = file.tensor(&name, device)?;
                if t.size() != p.tensor.size() {
                    return Err(Error::Msg(format!(
                        "{}: '{name}' has shape {:?}, the parameter has {:?}",
                        path.display(),
                        t.size(),
                        p.tensor.size()
                    )));
                }
                Ok(t.to_kind(p.tensor.kind()))
            };
            states.push(Some(State {
                step,
                exp_avg: moment("exp_avg")?,
                exp_avg_sq: moment("exp_avg_sq")?,
            }));
        }
        for (p, s) in self.params.iter_mut().zip(states) {
            p.state = s;
        }
        if let Some(cfg) = file.metadata().get("adamw") {
            if let Ok(c) = serde_json::from_str::<AdamWConfig>(cfg) {
                self.config = c;
            }
        }
        Ok(())
    }
}
