//! Frugal's models. Now: a LLaMA-style decoder (RMSNorm, rotary embeddings, SwiGLU, no biases,
//! causal attention through libtorch's fused scaled-dot-product attention) whose weights carry
//! Hugging Face's names, so that a HF LLaMA checkpoint loads as it is.
//!
//! Every linear layer is built by one factory, [`linear::build`], from a [`LinearKind`], so that
//! tensor-train, LoRA and BitLinear layers slot in later without touching the models. Now:
//! dense layers, and frozen quantized ones (`LinearKind::Quantized`: int8, int4, NF4, FP4,
//! ternary from `frugal-quant`), which [`weights::load_model`] fills from a dense checkpoint
//! (quantizing it) or a quantized one (as stored).
//!
//! ```no_run
//! use frugal_models::{llama::{Llama, LlamaConfig}, LinearKind};
//! let cfg = LlamaConfig::preset("tiny").unwrap();
//! let vs = tch::nn::VarStore::new(tch::Device::Cpu);
//! let model = Llama::new(&vs.root(), &cfg, &LinearKind::Dense, tch::Kind::Float)?;
//! let ids = tch::Tensor::zeros([1, 8], (tch::Kind::Int64, tch::Device::Cpu));
//! let logits = model.forward(&ids, None); // (1, 8, vocab)
//! # Ok::<(), frugal_core::Error>(())
//! ```

pub mod encoder;
pub mod linear;
pub mod llama;
pub mod weights;

pub use encoder::{Encoder, EncoderConfig, EncoderForClassification, EncoderForMaskedLm};
pub use linear::LinearKind;
