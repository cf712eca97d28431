//! Frugal's optimizers, each usable alone and all driven through the [`Optimizer`] trait:
//!
//! - [`AdamW`]: decoupled weight decay (Loshchilov & Hutter 2019) in two variants,
//!   [`AdamWVariant::Torch`] (numerically `torch.optim.AdamW`) and [`AdamWVariant::Hf`] (the
//!   Hugging Face / galore-torch AdamW);
//! - [`Adafactor`]: factored second moments, numerically `transformers.optimization.Adafactor`;
//! - [`AdamW8bit`]: bitsandbytes' 8-bit AdamW (block-wise dynamic-map state);
//! - GaLore: each of them takes an optional [`frugal_galore::GradientProjector`] per 2-D
//!   parameter (`with_projector`), keeps that parameter's state in the projected space and maps
//!   the update back, in the order of operations of galore-torch's `GaLoreAdamW`,
//!   `GaLoreAdafactor` and `GaLoreAdamW8bit`.
//!
//! All of them step any subset of their parameters ([`Optimizer::step_indices`], for per-layer
//! updates during backward), accumulate gradients across micro-batches in their own buffers
//! ([`Optimizer::accumulate_indices`]), and save and load their state (moments, step counts,
//! projector bases) as safetensors, bit-exactly. [`clip_grad_norm`] clips like torch.
//!
//! ```no_run
//! use frugal_optim::{AdamW, AdamWConfig, Optimizer};
//! let w = tch::Tensor::randn([4, 4], (tch::Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
//! let mut opt = AdamW::new(vec![("w".into(), w.shallow_clone())], AdamWConfig::default());
//! w.sum(tch::Kind::Float).backward();
//! Optimizer::step(&mut opt)?;
//! Optimizer::zero_grad(&mut opt);
//! # Ok::<(), frugal_core::Error>(())
//! ```

mod adafactor;
mod adamw;
mod adamw8bit;
mod clip;
mod optimizer;

pub use adafactor::{Adafactor, AdafactorConfig};
pub use adamw::{AdamW, AdamWConfig, AdamWVariant};
pub use adamw8bit::{AdamW8bit, AdamW8bitConfig, BLOCK_SIZE};
pub use clip::{clip_grad_norm, clip_grad_norm_on_device, grad_norm};
pub use optimizer::{Optimizer, RecordedStep, Slicer};
