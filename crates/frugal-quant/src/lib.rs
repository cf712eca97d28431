//! Frugal's quantizers, usable alone: quantize weights, store them packed in the layouts the
//! Python ecosystem reads (bitsandbytes for NF4/FP4 and int8, GPTQ for int4), and dequantize.
//!
//! ```no_run
//! use frugal_quant::fourbit::{FourBit, FourBitConfig, FourBitKind};
//! let w: Vec<f32> = (0..4096).map(|i| (i as f32).sin()).collect();
//! let q = FourBit::quantize(&w, &[64, 64], &FourBitConfig { kind: FourBitKind::Nf4, block_size: 64, double_quant: true })?;
//! let back = q.dequantize();
//! assert_eq!(back.len(), w.len());
//! println!("{:.3} bits per parameter", q.bits_per_param());
//! # Ok::<(), frugal_quant::QuantError>(())
//! ```

pub mod codebook;
pub mod convert;
pub mod dynamic;
mod error;
pub mod fourbit;
pub mod int4;
pub mod int8;
pub mod layer;
pub mod matmul;
pub mod ternary;

pub use error::{QuantError, Result};
