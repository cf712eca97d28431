//! Frugal's models: a LLaMA-style decoder (RMSNorm, rotary embeddings, SwiGLU, no biases,
//! causal attention through libtorch's fused scaled-dot-product attention) and a BERT-style
//! encoder ([`encoder`]: post-LN blocks, masked-LM and sequence-classification heads), both with
//! Hugging Face's weight names, so that HF checkpoints load as they are.
//!
//! Every linear layer is built by one factory, [`linear::build`], from a [`LinearKind`], so that
//! LoRA and BitLinear layers slot in later without touching the models. Now: dense layers,
//! frozen quantized ones (`LinearKind::Quantized`: int8, int4, NF4, FP4, ternary from
//! `frugal-quant`), and tensor-train layers (`LinearKind::Tt`, `frugal_tt::TtLinear`), which
//! [`weights::load_model`] fills from a dense checkpoint (quantizing it or decomposing it by
//! TT-SVD) or from one in their own form (as stored, at the file's ranks). The word tables of
//! the encoder and of the LLaMA are dense or a TT-matrix ([`EmbeddingKind`],
//! [`embedding::WordEmbedding`]). Hugging Face folders are read by their `model_type` ([`hf`]):
//! what this build does not compute exactly is refused by name, never loaded silently wrong.
//!
//! ```no_run
//! use frugal_models::{llama::{Llama, LlamaConfig}, EmbeddingKind, LinearKind};
//! let cfg = LlamaConfig::preset("tiny").unwrap();
//! let vs = tch::nn::VarStore::new(tch::Device::Cpu);
//! let (linear, embedding) = (LinearKind::Dense, EmbeddingKind::Dense);
//! let model = Llama::new(&vs.root(), &cfg, &linear, &embedding, tch::Kind::Float)?;
//! let ids = tch::Tensor::zeros([1, 8], (tch::Kind::Int64, tch::Device::Cpu));
//! let logits = model.forward(&ids, None); // (1, 8, vocab)
//! # Ok::<(), frugal_core::Error>(())
//! ```

pub mod adapted;
pub mod decoder;
pub mod embedding;
pub mod encoder;
pub mod hf;
pub mod hgrn_bit;
pub mod hgrn_bit_cpu;
pub mod linear;
pub mod llama;
pub mod weights;

pub use embedding::EmbeddingKind;
pub use encoder::{Encoder, EncoderConfig, EncoderForClassification, EncoderForMaskedLm};
pub use linear::LinearKind;
