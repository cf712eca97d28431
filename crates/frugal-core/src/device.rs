//! Device choice: `cpu`, `cuda` or `auto` (CUDA when present, else CPU).

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Where to train, as written in `train.device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// The CPU.
    Cpu,
    /// The first CUDA GPU; an error when none is present.
    Cuda,
    /// CUDA when a GPU is present, else the CPU.
    #[default]
    Auto,
}

impl Device {
    /// The tch device this choice means on this machine.
    pub fn resolve(self) -> Result<tch::Device> {
        match self {
            Device::Cpu => Ok(tch::Device::Cpu),
            Device::Cuda if tch::Cuda::is_available() => Ok(tch::Device::Cuda(0)),
            Device::Cuda => Err(Error::config(
                "train.device",
                "\"cuda\" asked for, but no CUDA GPU is available (use \"cpu\" or \"auto\")",
            )),
            Device::Auto => Ok(tch::Device::cuda_if_available()),
        }
    }
}
