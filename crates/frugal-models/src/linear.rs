//! The linear-layer factory: every model builds its projections through [`build`], so that a
//! new kind of layer (tensor-train, LoRA, BitLinear...) is one new [`LinearKind`] variant.

use frugal_core::{Error, Result};
use frugal_quant::convert::Format;
use frugal_quant::layer::{QuantizedLinear, QuantizedWeight};
use frugal_tt::{balanced_modes, TtLinear};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

/// Which linear layer to build, from the config's `model.linear`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
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
    /// A tensor-train weight (CoMERA, `frugal_tt::TtLinear`), bias-free like `dense`: the input
    /// dimension is factored into `order` balanced modes in descending order, the output
    /// dimension into `order` modes in ascending order (768 -> 768 at order 3 is
    /// [12, 8, 8 | 8, 8, 12], 768 -> 3072 is [12, 8, 8 | 12, 16, 16]); every inner rank is `rank`
    /// capped by what the modes allow, with one trainable rank variable per rank (variables
    /// `{layer}.cores.{k}` and `{layer}.rank_vars.{i}`). Loading a dense checkpoint converts its
    /// weights by TT-SVD at these ranks; loading a TT checkpoint (also a pruned one, with
    /// smaller ranks) takes its cores as stored.
    Tt {
        /// The largest TT rank of every inner bond (CoMERA: 30).
        #[serde(default = "default_tt_rank")]
        rank: i64,
        /// Modes per side: the input and the output dimension are each factored into this many
        /// modes, at least 2 (CoMERA: 3).
        #[serde(default = "default_tt_order")]
        order: usize,
        /// Relative accuracy of the TT-SVD that converts a dense checkpoint's weights when they
        /// are loaded into this model (ranks may then be smaller than `rank`); unset: truncate
        /// by `rank` only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        eps: Option<f64>,
    },
    /// BitLinear (BitNet b1.58; the MatMul-free LM's projections): RMSNorm of the input with a
    /// learned gain (`{layer}.norm.weight`), per-token int8 activations, a per-tensor absmean
    /// ternary weight, the straight-through estimator on both; the latent weight
    /// (`{layer}.weight`) trains in f32.
    #[serde(rename = "bitlinear")]
    BitLinear {
        /// The input RMSNorm's epsilon (the reference code's 1e-8).
        #[serde(default = "default_bit_eps")]
        eps: f64,
    },
    /// A trained BitLinear for inference: the ternary weight packed four codes per byte
    /// (frugal-quant's ternary format under `{layer}.weight`, one absmean scale), the input
    /// gain in f32; products run the ternary kernel on int8 activations, with no multiplication
    /// per weight. Frozen: no gradient. Loading a training checkpoint packs its latent weights.
    #[serde(rename = "bitlinear-packed")]
    PackedBitLinear {
        /// The input RMSNorm's epsilon.
        #[serde(default = "default_bit_eps")]
        eps: f64,
    },
}

fn default_bit_eps() -> f64 {
    1e-8
}

fn default_tt_rank() -> i64 {
    30
}

fn default_tt_order() -> usize {
    3
}

fn default_block_size() -> usize {
    64
}

fn default_group_size() -> usize {
    128
}

impl LinearKind {
    /// The quantization format of a [`LinearKind::Quantized`] kind (None for dense and TT); errors
    /// name `model.linear.format` when the format or its options are unknown.
    pub fn quant_format(&self) -> Result<Option<Format>> {
        match self {
            LinearKind::Dense
            | LinearKind::Tt { .. }
            | LinearKind::BitLinear { .. }
            | LinearKind::PackedBitLinear { .. } => Ok(None),
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

    /// Checks the options: a quantized kind's format (as [`LinearKind::quant_format`]), a TT
    /// kind's rank (at least 1), order (at least 2) and eps (finite, in [0, 1)); errors name
    /// the key (`model.linear.rank`...).
    pub fn validate(&self) -> Result<()> {
        self.quant_format()?;
        if let LinearKind::Tt { rank, order, eps } = self {
            check_tt_options("model.linear", *rank, *order, *eps, "per side")?;
        }
        if let LinearKind::BitLinear { eps } | LinearKind::PackedBitLinear { eps } = self {
            if !(eps.is_finite() && *eps > 0.0) {
                return Err(Error::Config {
                    key: "model.linear.eps".into(),
                    reason: format!("{eps}: the RMSNorm epsilon must be positive"),
                });
            }
        }
        Ok(())
    }
}

/// Checks TT options under config table `table` (`model.linear`, `model.embedding`): `rank` at
/// least 1, `order` at least 2 (the error says "modes {per}"), `eps` finite in [0, 1); errors
/// name the key (`model.linear.rank`...).
pub(crate) fn check_tt_options(
    table: &str,
    rank: i64,
    order: usize,
    eps: Option<f64>,
    per: &str,
) -> Result<()> {
    let bad = |key: &str, reason: String| Error::Config {
        key: format!("{table}.{key}"),
        reason,
    };
    if rank < 1 {
        return Err(bad("rank", format!("{rank}: a TT rank must be at least 1")));
    }
    if order < 2 {
        return Err(bad(
            "order",
            format!("{order}: a tensor train needs at least 2 modes {per}"),
        ));
    }
    if let Some(e) = eps {
        if !(e.is_finite() && (0.0..1.0).contains(&e)) {
            return Err(bad(
                "eps",
                format!("{e}: the relative accuracy must be in [0, 1)"),
            ));
        }
    }
    Ok(())
}

/// The TT modes of a `in_dim -> out_dim` layer at `order` modes per side, as
/// [`LinearKind::Tt`] picks them: `(input modes descending, output modes ascending)`, so that
/// the largest modes sit at the two ends of the chain and the middle bond is the widest.
pub fn tt_layer_modes(in_dim: i64, out_dim: i64, order: usize) -> Result<(Vec<i64>, Vec<i64>)> {
    let mut in_modes = balanced_modes(in_dim, order)?;
    in_modes.reverse();
    let out_modes = balanced_modes(out_dim, order)?;
    Ok((in_modes, out_modes))
}

/// The linear layers of a stack of `blocks`, each named `{prefix}.{i}.{name}` from the names
/// `each` gives a block's layers (`model.layers.3.mlp.up_proj`).
pub fn stack_linears<'a, B, L>(
    prefix: &str,
    blocks: &'a [B],
    each: impl Fn(&'a B) -> L,
) -> Vec<(String, &'a dyn Linear)>
where
    L: IntoIterator<Item = (&'static str, &'a dyn Linear)>,
{
    blocks
        .iter()
        .enumerate()
        .flat_map(|(i, b)| {
            each(b)
                .into_iter()
                .map(move |(n, l)| (format!("{prefix}.{i}.{n}"), l))
        })
        .collect()
}

/// [`stack_linears`], mutable (to load or replace layers).
pub fn stack_linears_mut<'a, B, L>(
    prefix: &str,
    blocks: &'a mut [B],
    each: impl Fn(&'a mut B) -> L,
) -> Vec<(String, &'a mut Box<dyn Linear>)>
where
    L: IntoIterator<Item = (&'static str, &'a mut Box<dyn Linear>)>,
{
    blocks
        .iter_mut()
        .enumerate()
        .flat_map(|(i, b)| {
            each(b)
                .into_iter()
                .map(move |(n, l)| (format!("{prefix}.{i}.{n}"), l))
        })
        .collect()
}

/// A linear map `x -> x W^T` over the last dimension.
pub trait Linear: std::fmt::Debug + Send {
    /// Applies the layer; the result has the compute kind the layer was built with.
    fn forward(&self, x: &Tensor) -> Tensor;

    /// `(out, in)`.
    fn shape(&self) -> (i64, i64);

    /// The dense weight `(out, in)`, for a dense layer (a variable of the model).
    fn dense_weight(&self) -> Option<&Tensor> {
        None
    }

    /// The layer's weight as a dense f32 tensor: a dense layer's, a quantized layer's
    /// dequantized (on the CPU), a TT layer's reconstructed.
    fn weight_f32(&self) -> Tensor;

    /// Whether this layer can compute with quantized weight `w` read from a file (a packed
    /// BitLinear takes only a ternary weight with one scale); the reason when not.
    fn accepts(&self, w: &QuantizedWeight) -> std::result::Result<(), String> {
        let _ = w;
        Ok(())
    }

    /// The BitLinear layer, for a BitLinear layer (latent weight, gain, ternary parts).
    fn bit_linear(&self) -> Option<&BitLinear> {
        None
    }

    /// The packed BitLinear layer, for one (ternary weight, gain, epsilon).
    fn packed_bit_linear(&self) -> Option<&PackedBitLinear> {
        None
    }

    /// The adapters on this layer, for an adapted layer.
    fn adapted(&self) -> Option<&crate::adapted::Adapted> {
        None
    }

    /// The adapters on this layer, to switch, merge or unmerge them.
    fn adapted_mut(&mut self) -> Option<&mut crate::adapted::Adapted> {
        None
    }

    /// The frozen quantized weight, for a quantized layer.
    fn quantized(&self) -> Option<&QuantizedLinear> {
        None
    }

    /// The frozen quantized weight, to replace it when loading.
    fn quantized_mut(&mut self) -> Option<&mut QuantizedLinear> {
        None
    }

    /// The tensor-train layer, for a TT layer (ranks, penalty, pruning).
    fn tt(&self) -> Option<&TtLinear> {
        None
    }

    /// The tensor-train layer, to prune it or replace its cores when loading.
    fn tt_mut(&mut self) -> Option<&mut TtLinear> {
        None
    }

    /// The relative accuracy at which a dense weight loaded into this TT layer is converted
    /// (`model.linear.eps`); None for other layers and when only the rank truncates.
    fn tt_eps(&self) -> Option<f64> {
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

impl Dense {
    /// A layer whose weight is `weight` itself, shared (a tied output head: the embedding
    /// table, `(vocab, d)`; a merged adapter's new weight).
    pub fn tied(weight: &Tensor, compute: Kind) -> Self {
        Self {
            weight: weight.shallow_clone(),
            compute,
        }
    }
}

impl Linear for Dense {
    fn shape(&self) -> (i64, i64) {
        let s = self.weight.size();
        (s[0], s[1])
    }

    fn dense_weight(&self) -> Option<&Tensor> {
        Some(&self.weight)
    }

    fn weight_f32(&self) -> Tensor {
        self.weight.detach().to_kind(Kind::Float)
    }

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
/// weight to the input's device for the product. On a GPU, NF4, GPTQ int4 and ternary weights
/// are copied there packed, once, and multiplied with `frugal_kernels`' kernels.
#[derive(Debug)]
pub struct Quantized {
    /// The packed weight.
    pub layer: QuantizedLinear,
    compute: Kind,
    gpu: GpuCopy,
}

/// A quantized layer's packed weight on the GPU, uploaded at the first CUDA input (None inside:
/// a format without kernels, which keeps the CPU path); dropped when the weight is replaced.
#[derive(Debug, Default)]
struct GpuCopy(std::sync::OnceLock<Option<frugal_kernels::quantized::DeviceQuantized>>);

impl GpuCopy {
    /// `x W^T` on `x`'s GPU through the kernels, or None where they do not apply (CPU input,
    /// another device than the copy's, a format without kernels, gradients wanted).
    fn forward(&self, layer: &QuantizedLinear, x: &Tensor) -> Option<Tensor> {
        if !x.device().is_cuda() || x.requires_grad() {
            return None;
        }
        let copy = self
            .0
            .get_or_init(|| frugal_kernels::quantized::DeviceQuantized::upload(layer, x.device()))
            .as_ref()?;
        if copy.device() != x.device() {
            return None;
        }
        Some(
            copy.forward(x)
                .unwrap_or_else(|e| panic!("quantized layer on {:?}: {e}", x.device())),
        )
    }
}

impl Linear for Quantized {
    fn shape(&self) -> (i64, i64) {
        (
            self.layer.out_features as i64,
            self.layer.in_features as i64,
        )
    }

    fn weight_f32(&self) -> Tensor {
        self.layer.dequantize()
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = x.to_kind(self.compute);
        match self.gpu.forward(&self.layer, &x) {
            Some(y) => y,
            None => self.layer.forward(&x),
        }
    }

    fn quantized(&self) -> Option<&QuantizedLinear> {
        Some(&self.layer)
    }

    fn quantized_mut(&mut self) -> Option<&mut QuantizedLinear> {
        // The weight may change: the GPU copy goes.
        self.gpu = GpuCopy::default();
        Some(&mut self.layer)
    }
}

/// A tensor-train linear layer (bias-free in the models): the layer and the accuracy at which a
/// dense weight loaded into it is converted.
#[derive(Debug)]
pub struct TensorTrain {
    /// The layer: cores, rank variables, compute kind.
    pub layer: TtLinear,
    /// `model.linear.eps`.
    pub eps: Option<f64>,
}

impl Linear for TensorTrain {
    fn shape(&self) -> (i64, i64) {
        (self.layer.out_dim(), self.layer.in_dim())
    }

    fn weight_f32(&self) -> Tensor {
        tch::no_grad(|| self.layer.to_dense().to_kind(Kind::Float))
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.layer.forward(x)
    }

    fn tt(&self) -> Option<&TtLinear> {
        Some(&self.layer)
    }

    fn tt_mut(&mut self) -> Option<&mut TtLinear> {
        Some(&mut self.layer)
    }

    fn tt_eps(&self) -> Option<f64> {
        self.eps
    }
}

/// BitLinear (Ma et al. 2024, BitNet b1.58; Zhu et al. 2024, the MatMul-free LM): see
/// [`LinearKind::BitLinear`]. In the forward pass, with `x_n = RMSNorm(x) * g`:
/// `x_q = round(x_n * 127 / max|x_n|)` per token (clamped to [-128, 127], the max clamped to at
/// least 1e-5), `w_q = clamp(round(w / s), -1, 1)` with `s = mean|w|` (clamped to at least
/// 1e-5), and `y = (x_q / scale_x) (w_q s)ᵀ` computed through the straight-through estimator
/// `x_n + (x_q / scale_x - x_n).detach()` (and the same for w), so that the gradients are those
/// of the unquantized product.
#[derive(Debug)]
pub struct BitLinear {
    /// The latent weight `(out, in)`, f32.
    pub weight: Tensor,
    /// The input RMSNorm's gain `(in,)`.
    pub norm: Tensor,
    eps: f64,
    compute: Kind,
}

/// Per-token int8 quantization of `x` (`(..., in)`, f32): the codes (as f32 integers in
/// [-128, 127]) and the per-token scales `127 / max|x|` (`(..., 1)`).
pub fn activation_quant(x: &Tensor) -> (Tensor, Tensor) {
    let max = x.abs().amax([-1i64].as_slice(), true).clamp_min(1e-5);
    let scale = max.reciprocal() * 127.0;
    let q = (x * &scale).round().clamp(-128.0, 127.0);
    (q, scale)
}

/// Per-tensor absmean ternary quantization of `w`: the codes in {-1, 0, 1} (f32) and the scale
/// `mean|w|` (a 0-d tensor).
pub fn weight_quant(w: &Tensor) -> (Tensor, Tensor) {
    let s = w.abs().mean(Kind::Float).clamp_min(1e-5);
    let q = (w / &s).round().clamp(-1.0, 1.0);
    (q, s)
}

impl BitLinear {
    /// The normalized input `RMSNorm(x) * g` in f32.
    pub fn normalize(&self, x: &Tensor) -> Tensor {
        let x = x.to_kind(Kind::Float);
        let var = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        x * (var + self.eps).rsqrt() * &self.norm
    }

    /// The ternary codes `(out, in)` (f32 in {-1, 0, 1}) and the scale of the weight.
    pub fn ternary(&self) -> (Tensor, Tensor) {
        tch::no_grad(|| weight_quant(&self.weight))
    }
}

impl Linear for BitLinear {
    fn bit_linear(&self) -> Option<&BitLinear> {
        Some(self)
    }

    fn shape(&self) -> (i64, i64) {
        let s = self.weight.size();
        (s[0], s[1])
    }

    fn weight_f32(&self) -> Tensor {
        let (q, s) = self.ternary();
        q * s
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let records = frugal_kernels::autograd::grad_enabled()
            && (x.requires_grad() || self.weight.requires_grad() || self.norm.requires_grad());
        if !records {
            return tch::no_grad(|| self.fused(x).0);
        }
        let function = BitLinearFn {
            eps: self.eps,
            compute: self.compute,
            saved: None,
        };
        frugal_kernels::autograd::apply(function, &[x, &self.weight, &self.norm])
            .unwrap_or_else(|e| panic!("BitLinear: {e}"))
            .remove(0)
    }
}

impl BitLinear {
    /// The layer's output and the per-token `rstd` of its RMSNorm, without recording: the
    /// normalized input quantized per token (the fused kernel of `frugal_kernels::bitlinear`
    /// on CUDA, libtorch operations elsewhere) times the ternary weight.
    fn fused(&self, x: &Tensor) -> (Tensor, Tensor) {
        let (xq, rstd) = norm_quant(x, &self.norm, self.eps);
        let y = ternary_product(&xq, &self.weight, self.compute);
        (with_rows_of(y, x), rstd)
    }
}

/// `x` (`(..., in)`) normalized with gain `norm` and quantized per token, dequantized to f32
/// `(rows, in)`, with the per-row `rstd` `(rows,)`.
fn norm_quant(x: &Tensor, norm: &Tensor, eps: f64) -> (Tensor, Tensor) {
    let n = norm.size()[0];
    let rows = x.to_kind(Kind::Float).reshape([-1, n]);
    if rows.device().is_cuda() {
        let kernels = frugal_kernels::Kernels::global();
        return kernels
            .rmsnorm_quant_f32(&rows.contiguous(), &norm.contiguous(), eps as f32)
            .unwrap_or_else(|e| panic!("BitLinear's fused RMSNorm kernel: {e}"));
    }
    let var = rows.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
    let rstd = (var + eps).rsqrt();
    let (q, scale) = activation_quant(&(&rows * &rstd * norm));
    (q / scale, rstd.squeeze_dim(-1))
}

/// `xq W^T` for the ternary form of latent weight `w`, computed and returned in `compute`.
fn ternary_product(xq: &Tensor, w: &Tensor, compute: Kind) -> Tensor {
    let (wq, s) = weight_quant(w);
    let w_eff = wq * s;
    if compute == Kind::Float {
        xq.linear(&w_eff, None::<Tensor>)
    } else {
        xq.to_kind(compute)
            .linear(&w_eff.to_kind(compute), None::<Tensor>)
    }
}

/// `y` `(rows, out)` shaped as `x` `(..., in)`, with `out` features.
fn with_rows_of(y: Tensor, x: &Tensor) -> Tensor {
    let mut shape = x.size();
    let out = y.size()[1];
    *shape
        .last_mut()
        .expect("BitLinear input has a feature dimension") = out;
    y.reshape(&shape[..])
}

/// BitLinear as one autograd function (straight-through estimator on the activations and the
/// weight). The graph keeps only the input and the per-token `rstd`: the quantized input and
/// the ternary weight are recomputed in the backward pass, where composing libtorch operations
/// kept four activation-sized tensors and a copy of the weight per layer.
struct BitLinearFn {
    eps: f64,
    compute: Kind,
    /// The input, the latent weight, the gain and `rstd`.
    saved: Option<[Tensor; 4]>,
}

impl frugal_kernels::autograd::CustomFunction for BitLinearFn {
    fn forward(&mut self, inputs: &[Tensor]) -> frugal_kernels::Result<Vec<Tensor>> {
        let (x, w, norm) = (&inputs[0], &inputs[1], &inputs[2]);
        let (xq, rstd) = norm_quant(x, norm, self.eps);
        let y = with_rows_of(ternary_product(&xq, w, self.compute), x);
        self.saved = Some([
            x.shallow_clone(),
            w.shallow_clone(),
            norm.shallow_clone(),
            rstd,
        ]);
        Ok(vec![y])
    }

    fn backward(&mut self, grads: &[Tensor]) -> frugal_kernels::Result<Vec<Option<Tensor>>> {
        let Some([x, w, norm, rstd]) = self.saved.take() else {
            return Err(frugal_kernels::KernelError::Invalid(
                "BitLinear: backward ran twice (retain_graph is not supported)".into(),
            ));
        };
        let n = norm.size()[0];
        let (xq, _) = norm_quant(&x, &norm, self.eps);
        let (wq, s) = weight_quant(&w);
        let w_eff = (wq * s).to_kind(self.compute);
        let dy = grads[0].reshape([-1, w.size()[0]]).to_kind(self.compute);
        let dw = dy
            .tr()
            .matmul(&xq.to_kind(self.compute))
            .to_kind(Kind::Float);
        let dxq = dy.matmul(&w_eff).to_kind(Kind::Float);
        let x32 = x.to_kind(Kind::Float).reshape([-1, n]);
        let (dx, dnorm) = if x32.device().is_cuda() {
            frugal_kernels::Kernels::global().rmsnorm_quant_backward_f32(
                &dxq.contiguous(),
                &x32.contiguous(),
                &norm.contiguous(),
                &rstd,
            )?
        } else {
            let x_hat = &x32 * rstd.unsqueeze(-1);
            let dxh = &dxq * &norm;
            let mean = (&dxh * &x_hat).mean_dim(-1, true, Kind::Float);
            let dx = rstd.unsqueeze(-1) * (dxh - &x_hat * mean);
            (dx, (&dxq * &x_hat).sum_dim_intlist(0, false, Kind::Float))
        };
        let dx = dx.reshape(x.size()).to_kind(x.kind());
        Ok(vec![
            Some(dx),
            Some(dw.to_kind(w.kind())),
            Some(dnorm.to_kind(norm.kind())),
        ])
    }
}

/// A trained BitLinear packed for inference: see [`LinearKind::PackedBitLinear`].
#[derive(Debug)]
pub struct PackedBitLinear {
    /// The packed ternary weight (always [`QuantizedWeight::Ternary`] with one scale).
    pub layer: QuantizedLinear,
    /// The input RMSNorm's gain `(in,)`.
    pub norm: Tensor,
    eps: f64,
    compute: Kind,
    gpu: GpuCopy,
}

impl PackedBitLinear {
    /// The input RMSNorm's epsilon.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// The kind the outputs are given in.
    pub fn compute(&self) -> Kind {
        self.compute
    }

    /// The packed ternary weight (one scale).
    pub fn ternary(&self) -> &frugal_quant::ternary::Ternary {
        match &self.layer.weight {
            QuantizedWeight::Ternary(t) => t,
            _ => unreachable!("checked when loaded"),
        }
    }
}

impl Linear for PackedBitLinear {
    fn packed_bit_linear(&self) -> Option<&PackedBitLinear> {
        Some(self)
    }

    fn shape(&self) -> (i64, i64) {
        (
            self.layer.out_features as i64,
            self.layer.in_features as i64,
        )
    }

    fn weight_f32(&self) -> Tensor {
        self.layer.dequantize()
    }

    fn quantized(&self) -> Option<&QuantizedLinear> {
        Some(&self.layer)
    }

    fn quantized_mut(&mut self) -> Option<&mut QuantizedLinear> {
        // The weight may change: the GPU copy goes.
        self.gpu = GpuCopy::default();
        Some(&mut self.layer)
    }

    fn accepts(&self, w: &QuantizedWeight) -> std::result::Result<(), String> {
        match w {
            QuantizedWeight::Ternary(t) if t.rows_per_scale == t.rows => Ok(()),
            QuantizedWeight::Ternary(_) => Err(
                "a packed BitLinear takes one ternary scale per tensor, not per row group".into(),
            ),
            other => Err(format!(
                "a packed BitLinear takes a ternary weight, the file holds {}",
                other.family()
            )),
        }
    }

    /// RMSNorm with the gain, then the ternary kernel: each row quantized to int8 as in
    /// training (`round(x 127 / max|x|)`), integer sums of the codes, one scale per row. On a
    /// GPU: the fused RMSNorm and int8 kernel, then the ternary kernels on the packed weight.
    fn forward(&self, x: &Tensor) -> Tensor {
        if x.device().is_cuda() {
            let (xq, _) = tch::no_grad(|| norm_quant(x, &self.norm, self.eps));
            let mut shape = x.size();
            *shape.last_mut().expect("at least 1-D") = self.layer.in_features as i64;
            if let Some(y) = self.gpu.forward(&self.layer, &xq.reshape(&shape[..])) {
                return y.to_kind(self.compute);
            }
        }
        let size = x.size();
        let cols = *size.last().expect("at least 1-D");
        let rows = x.numel() as i64 / cols.max(1);
        let xn = tch::no_grad(|| {
            let x = x.to_kind(Kind::Float);
            let var = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
            x * (var + self.eps).rsqrt() * &self.norm
        });
        let flat = Vec::<f32>::try_from(xn.reshape([-1]).to_device(Device::Cpu)).expect("f32 rows");
        let y = frugal_quant::matmul::ternary_matmul(self.ternary(), &flat, rows as usize)
            .expect("shapes checked when built and loaded");
        let mut out = size.clone();
        *out.last_mut().expect("at least 1-D") = self.layer.out_features as i64;
        Tensor::from_slice(&y)
            .reshape(&out)
            .to_device(x.device())
            .to_kind(self.compute)
    }
}

/// A ternary weight of random codes (from torch's generator; -1 and 1 a quarter of the codes
/// each) and scale 0.02, built in its packed form.
fn random_ternary(rows: usize, cols: usize) -> frugal_quant::ternary::Ternary {
    let n = rows * cols;
    let bytes = n.div_ceil(4);
    // One random byte per packed byte, each 2-bit field mapped onto a stored code in 0..=2;
    // fields past the last weight hold code 1 (zero), as the format pads.
    let noise = Tensor::randint(256, [bytes as i64], (Kind::Uint8, Device::Cpu));
    let noise: Vec<u8> = Vec::try_from(noise).expect("u8 noise");
    let packed = noise
        .iter()
        .enumerate()
        .map(|(k, &b)| {
            (0..4).fold(0u8, |acc, j| {
                let code = if 4 * k + j < n {
                    ((b >> (2 * j)) & 3) % 3
                } else {
                    1
                };
                acc | (code << (2 * j))
            })
        })
        .collect();
    frugal_quant::ternary::Ternary {
        rows,
        cols,
        rows_per_scale: rows,
        packed,
        scales: vec![0.02],
    }
}

/// Builds a linear layer of kind `kind` under `path` (a dense weight is `path.weight`, TT
/// cores `path.cores.{k}`). A quantized layer starts from a quantized N(0, 0.02) weight, like a
/// dense one, until loaded; a TT layer from CoMERA's initialisation
/// ([`frugal_tt::published_init`]).
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
    kind.validate()?;
    if let LinearKind::BitLinear { eps } = kind {
        return Ok(Box::new(BitLinear {
            weight: path.var("weight", &[out_dim, in_dim], init),
            norm: (path / "norm").var("weight", &[in_dim], nn::Init::Const(1.0)),
            eps: *eps,
            compute,
        }));
    }
    if let LinearKind::PackedBitLinear { eps } = kind {
        // Random codes made directly in the packed form (never an f32 copy of the weight),
        // until loaded.
        let layer = QuantizedLinear {
            weight: QuantizedWeight::Ternary(random_ternary(out_dim as usize, in_dim as usize)),
            out_features: out_dim as usize,
            in_features: in_dim as usize,
        };
        return Ok(Box::new(PackedBitLinear {
            layer,
            norm: (path / "norm").var("weight", &[in_dim], nn::Init::Const(1.0)),
            eps: *eps,
            compute,
            gpu: GpuCopy::default(),
        }));
    }
    if let LinearKind::Tt { rank, order, eps } = kind {
        let name = path.components().collect::<Vec<_>>().join(".");
        let (in_modes, out_modes) =
            tt_layer_modes(in_dim, out_dim, *order).map_err(|e| Error::Config {
                key: "model.linear.order".into(),
                reason: format!("{name} ({out_dim}, {in_dim}): {e}"),
            })?;
        let layer = TtLinear::new(
            path, in_dim, out_dim, &in_modes, &out_modes, *rank, false, compute,
        )
        .map_err(|e| Error::Config {
            key: "model.linear".into(),
            reason: format!("{name} ({out_dim}, {in_dim}): {e}"),
        })?;
        return Ok(Box::new(TensorTrain { layer, eps: *eps }));
    }
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
            Box::new(Quantized {
                layer,
                compute,
                gpu: GpuCopy::default(),
            })
        }
    })
}
