//! Adapters for fine-tuning a frozen base: LoRA (with rsLoRA scaling, DoRA's magnitude, and
//! default, gaussian or PiSSA initialisation), QLoRA (LoRA on a frozen NF4 base, the base
//! coming from `frugal-quant`) and QA-LoRA (a group-averaged input, so that the adapter merges
//! exactly into an int4 base's zero points); merging and unmerging in f32; adapter folders in
//! PEFT's format.
//!
//! The pieces, usable alone: [`LoraConfig`] (settings, target layers, `adapter_config.json`),
//! [`Lora`] (one layer's adapter: apply, merge, unmerge), [`peft`] (read and write PEFT adapter
//! folders) and [`qalora::merge_into_int4`].
//!
//! ```no_run
//! use frugal_adapters::{Lora, LoraConfig};
//! use tch::{nn, Device, Kind, Tensor};
//! let vs = nn::VarStore::new(Device::Cpu);
//! let w = Tensor::randn([64, 32], (Kind::Float, Device::Cpu)); // a frozen base weight
//! let cfg = LoraConfig { r: 4, alpha: 8.0, ..LoraConfig::default() };
//! let (lora, _) = Lora::new(&vs.root().sub("fc"), "default", 32, 64, &cfg, Some(&w))?;
//! let x = Tensor::randn([2, 32], (Kind::Float, Device::Cpu));
//! let y = lora.apply_eval(&x, &x.linear(&w, None::<Tensor>), || w.shallow_clone());
//! let (merged, _) = lora.merged(&w); // W + s B A, in f32
//! frugal_adapters::peft::write(std::path::Path::new("adapter"), &cfg, &[("fc".into(), &lora)])?;
//! # Ok::<(), frugal_core::Error>(())
//! ```

mod config;
mod lora;
pub mod peft;
pub mod qalora;

pub use config::{Init, LoraConfig, Targets};
pub use lora::{pissa, row_norms, variable_names, Lora};
