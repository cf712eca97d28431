//! Frugal's foundation: the error type, device choice, safetensors I/O over memory maps,
//! atomic file writes and the memory meter. It depends on nothing else of Frugal's.
//!
//! ```no_run
//! use frugal_core::{safetensors_io, Device};
//! let tensors = vec![("w".to_string(), tch::Tensor::ones([2, 3], (tch::Kind::Float, tch::Device::Cpu)))];
//! safetensors_io::save(std::path::Path::new("w.safetensors"), &tensors, None)?;
//! let back = safetensors_io::load(std::path::Path::new("w.safetensors"), Device::Cpu.resolve()?)?;
//! assert_eq!(back[0].1.size(), vec![2, 3]);
//! # Ok::<(), frugal_core::Error>(())
//! ```

pub mod atomic;
pub mod device;
mod error;
pub mod memory;
pub mod safetensors_io;

pub use device::Device;
pub use error::{Error, Result};
