//! Frugal's CUDA kernels: hand-written `.cu` sources under `kernels/`, embedded in the binary,
//! compiled at run time by nvrtc for the device at hand, cached per device, and launched on tch
//! tensors. Every kernel has a plain Rust reference in [`cpu`].
//!
//! Nothing here needs a GPU to build or to load: libcuda and libnvrtc are opened dynamically
//! (libnvrtc from the torch wheel, see [`nvrtc`]), and without them every entry point returns
//! [`KernelError::NoCuda`] or [`KernelError::NoNvrtc`] instead of panicking.
//!
//! ```no_run
//! use frugal_kernels::{cpu, Kernels};
//! use tch::{Device, Tensor};
//!
//! # fn main() -> frugal_kernels::Result<()> {
//! // A 2 x 4 NF4 weight in one block of 8, absmax 0.5.
//! let packed = cpu::pack_nf4_codes(&[15, 0, 7, 8, 1, 2, 3, 4])?;
//! let reference = cpu::dequant_nf4(&packed, &[0.5], 8, 8)?;
//!
//! // PTX can be produced anywhere libnvrtc loads, GPU or not.
//! let ptx = frugal_kernels::compile_ptx(frugal_kernels::registry::QUANT.source, "sm_80")?;
//! assert!(ptx.to_src().contains("dequant_nf4_f32"));
//!
//! // On a GPU: launch on tch tensors (errors with KernelError::NoCuda elsewhere).
//! let dev = Device::Cuda(0);
//! let w = Kernels::global().dequant_nf4_f32(
//!     &Tensor::from_slice(&packed).to_device(dev),
//!     &Tensor::from_slice(&[0.5f32]).to_device(dev),
//!     &[2, 4],
//!     8,
//! )?;
//! assert_eq!(Vec::<f32>::try_from(w.reshape([-1]).to_device(Device::Cpu))?, reference);
//! # Ok(())
//! # }
//! ```

pub mod adamw8bit;
pub mod autograd;
pub mod bitlinear;
pub mod cpu;
mod error;
mod ext_ffi;
pub mod gpu;
pub mod libtorch_ops;
pub mod nvrtc;
pub mod quantized;
pub mod registry;
pub mod torch_cuda;

pub use cudarc::nvrtc::Ptx;
pub use error::{KernelError, Result};
pub use gpu::{check_cuda, Kernels};
pub use nvrtc::{compile_ptx, cuda_include_dir, ensure_nvrtc};
