//! The linear-layer factory: every model builds its projections through [`build`], so that a
//! new kind of layer (tensor-train, LoRA, BitLinear...) is one new [`LinearKind`] variant.

use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

/// Which linear layer to build, from the config's `model.linear`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", tag = "kind", deny_unknown_fields)]
pub enum LinearKind {
    /// A dense weight `(out, in)`, no bias.
    #[default]
    Dense,
}

/// A linear map `x -> x W^T` over the last dimension.
pub trait Linear: std::fmt::Debug + Send {
    /// Applies the layer; the result has the compute kind the layer was built with.
    fn forward(&self, x: &Tensor) -> Tensor;
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

/// Builds a linear layer of kind `kind` under `path` (its weight is `path.weight`).
pub fn build(
    path: &nn::Path,
    in_dim: i64,
    out_dim: i64,
    kind: &LinearKind,
    compute: Kind,
) -> Box<dyn Linear> {
    match kind {
        LinearKind::Dense => {
            let weight = path.var(
                "weight",
                &[out_dim, in_dim],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            );
            Box::new(Dense { weight, compute })
        }
    }
}
