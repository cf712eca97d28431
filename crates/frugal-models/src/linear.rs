//! The linear-layer factory: every model builds its projections through [`build`], so that a
//! new kind of layer (tensor-train, LoRA, BitLinear...) is one new [`LinearKind`] variant.

use frugal_core::{Error, Result};
use frugal_quant::convert::Format;
use frugal_quant::layer::QuantizedLinear;
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

/// Which linear layer to build, from the config's `model.linear`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", tag = "kind", deny_unknown_fields)]
pub enum LinearKind {
    /// A dense weight `(out, in)`, no bias.
    #[default]
    Dense,
    /// A frozen quantized weight (`frugal_quant`): it takes no gradient and is not a variable
    /// of the model; the layer is differentiable with respect to its input, so that adapters
    /// can train on top of it. Loading a dense checkpoint quantizes its weights; loading a
    /// quantized one (written by `frugal quantize`, bitsandbytes or GPTQ) reads them as stored.
    Quantized {
        /// `int8`, `int4`, `nf4`, `fp4` or `ternary`.
        format: String,
        /// NF4/FP4 block size (values per absmax).
        #[serde(default = "default_block_size")]
        block_size: usize,
        /// int4 group size (input columns per scale and zero).
        #[serde(default = "default_group_size")]
        group_size: usize,
        /// NF4/FP4: quantize the absmax values too.
        #[serde(default)]
        double_quant: bool,
    },
}

fn default_block_size() -> usize {
    64
}

fn default_group_size() -> usize {
    128
}

impl LinearKind {
    /// The quantization format of a [`LinearKind::Quantized`] kind (None for dense); errors
    /// name `model.linear.format` when the format or its options are unknown.
    pub fn quant_format(&self) -> Result<Option<Format>> {
        match self {
            LinearKind::Dense => Ok(None),
            LinearKind::Quantized {
                format,
                block_size,
                group_size,
                double_quant,
            } => Format::parse(format, *block_size, *group_size, *double_quant)
                .map(Some)
                .map_err(|e| Error::Config {
                    key: "model.linear.format".into(),
                    reason: e.to_string(),
                }),
        }
    }
}

/// A linear map `x -> x W^T` over the last dimension.
pub trait Linear: std::fmt::Debug + Send {
    /// Applies the layer; the result has the compute kind the layer was built with.
    fn forward(&self, x: &Tensor) -> Tensor;

    /// The frozen quantized weight, for a quantized layer.
    fn quantized(&self) -> Option<&QuantizedLinear> {
        None
    }

    /// The frozen quantized weight, to replace it when loading.
    fn quantized_mut(&mut self) -> Option<&mut QuantizedLinear> {
        None
    }
}

/// A dense, bias-free linear layer with weight `(out, in)`, initialised N(0, 0.02) as in
/// Hugging Face's LLaMA. With a bf16 compute kind it casts input and weight for the product,
/// keeping the f32 weight as master copy (autocast-style mixed precision).
#[derive(Debug)]
pub struct Dense {
    /// The weight, `(out, in)`.
    pub weight: Tensor,
    compute: Kind,
}

impl Linear for Dense {
    fn forward(&self, x: &Tensor) -> Tensor {
        if self.weight.kind() == self.compute {
            x.to_kind(self.compute).linear(&self.weight, None::<Tensor>)
        } else {
            x.to_kind(self.compute)
                .linear(&self.weight.to_kind(self.compute), None::<Tensor>)
        }
    }
}

/// A frozen quantized linear layer: the packed weight lives on the CPU; products with few
/// rows at inference use the packed kernels, others dequantize (on the CPU) and move the
/// weight to the input's device for the product.
#[derive(Debug)]
pub struct Quantized {
    /// The packed weight.
    pub layer: QuantizedLinear,
    compute: Kind,
}

impl Linear for Quantized {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.layer.forward(&x.to_kind(self.compute))
    }

    fn quantized(&self) -> Option<&QuantizedLinear> {
        Some(&self.layer)
    }

    fn quantized_mut(&mut self) -> Option<&mut QuantizedLinear> {
        Some(&mut self.layer)
    }
}

/// Builds a linear layer of kind `kind` under `path` (its weight is `path.weight`). A
/// quantized layer starts from a quantized N(0, 0.02) weight, like a dense one, until loaded.
pub fn build(
    path: &nn::Path,
    in_dim: i64,
    out_dim: i64,
    kind: &LinearKind,
    compute: Kind,
) -> Result<Box<dyn Linear>> {
    let init = nn::Init::Randn {
        mean: 0.0,
        stdev: 0.02,
    };
    Ok(match kind.quant_format()? {
        None => {
            let weight = path.var("weight", &[out_dim, in_dim], init);
            Box::new(Dense { weight, compute })
        }
        Some(format) => {
            let w = Tensor::randn([out_dim, in_dim], (Kind::Float, Device::Cpu)) * 0.02;
            let layer = QuantizedLinear::quantize(&w, &format).map_err(|e| {
                Error::Msg(format!(
                    "{}: cannot quantize a ({out_dim}, {in_dim}) weight as {}: {e}",
                    path.components().collect::<Vec<_>>().join("."),
                    format.name()
                ))
            })?;
            Box::new(Quantized { layer, compute })
        }
    })
}
