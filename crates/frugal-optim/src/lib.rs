//! Frugal's optimizers. Now: [`AdamW`] of our own (decoupled weight decay, Loshchilov & Hutter
//! 2019), numerically the same as `torch.optim.AdamW`, whose state saves and loads as
//! safetensors and which steps any subset of its parameters (so that a trainer can step block by
//! block during backward). Later: GaLore, Adafactor and 8-bit state.
//!
//! ```no_run
//! use frugal_optim::{AdamW, AdamWConfig};
//! let w = tch::Tensor::randn([4, 4], (tch::Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
//! let mut opt = AdamW::new(vec![("w".into(), w.shallow_clone())], AdamWConfig::default());
//! w.sum(tch::Kind::Float).backward();
//! opt.step();
//! opt.zero_grad();
//! ```

mod adamw;
mod clip;

pub use adamw::{AdamW, AdamWConfig};
pub use clip::{clip_grad_norm, grad_norm};
