//! The MatMul-free language model (Zhu et al. 2024, "Scalable MatMul-free Language Modeling";
//! reference code ridgerchu/matmulfreellm, model type `hgrn_bit`): every projection a ternary
//! BitLinear, the MLGRU token mixer (a gated linear recurrence, no attention) and a GLU channel
//! mixer, with the reference code's names and initialisation.
//!
//! Block: `h = x + mlgru(rms(x))`, `out = h + glu(rms(h))`; then a final RMSNorm and a BitLinear
//! head. The MLGRU, per token t, in the reference code's form ([`Mixer::Reference`]):
//! `f = lb + (1 - lb) sigmoid(x W_f)` (a learned lower bound per layer, zero for the first),
//! `i = silu(x W_i) (1 - f)`, `h_t = f h_{t-1} + i`, `o = (rms(x W_g) * silu(h)) W_o`; in the
//! paper's ([`Mixer::Paper`]): `f = sigmoid(x W_f)`, `c = silu(x W_c)`,
//! `h_t = f h_{t-1} + (1 - f) c`, `o = (sigmoid(x W_g) h) W_o`.
//!
//! Training computes the recurrence over the whole sequence with a Hillis-Steele scan
//! ([`linear_scan`]): log2(T) passes of element-wise products over `(B, T, D)`, so O(T log T)
//! work instead of T dependent steps of `(B, D)` work (a loop per token) whose graph has T nodes
//! per layer. Its backward pass is written by hand (the same scan run from the end), so the graph
//! keeps only the gates and the hidden states. Generation runs the
//! recurrence one token at a time with a constant-size state per layer ([`State`]).

use crate::linear::{self, Linear, LinearKind};
use crate::llama::RmsNorm;
use frugal_core::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

/// Which MLGRU form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mixer {
    /// The reference code's: learned lower bound on the forget gate, RMSNorm-swish output gate.
    #[default]
    Reference,
    /// The paper's equations: plain forget gate, sigmoid output gate.
    Paper,
}

/// Model shape, with the reference code's `config.json` field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HgrnBitConfig {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Model width d.
    pub hidden_size: i64,
    /// GLU inner width: 256 * ceil(8/3 * d / 256) by default.
    pub intermediate_size: i64,
    /// Number of blocks.
    pub num_hidden_layers: i64,
    /// RMSNorm epsilon (blocks, final norm and the output gate's norm).
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// The MLGRU form.
    #[serde(default)]
    pub mixer: Mixer,
    /// Standard deviation of the normal initialisation.
    #[serde(default = "default_init")]
    pub initializer_range: f64,
}

fn default_eps() -> f64 {
    1e-6
}

fn default_init() -> f64 {
    0.02
}

/// Names of the presets [`HgrnBitConfig::preset`] knows.
pub const PRESETS: &[&str] = &["tiny", "370m", "1.3b", "2.7b"];

/// The GLU inner width of the reference code for width `d`: 256 * ceil(8/3 * d / 256).
pub fn glu_width(d: i64) -> i64 {
    let raw = d * 4 * 2 / 3;
    256 * ((raw + 255) / 256)
}

impl HgrnBitConfig {
    fn new(vocab: i64, d: i64, layers: i64) -> Self {
        Self {
            vocab_size: vocab,
            hidden_size: d,
            intermediate_size: glu_width(d),
            num_hidden_layers: layers,
            rms_norm_eps: 1e-6,
            mixer: Mixer::Reference,
            initializer_range: 0.02,
        }
    }

    /// A preset: `tiny` (d 256, 4 blocks; tests and quick runs) and the published 370M
    /// (d 1024, 24 blocks), 1.3B (d 2048, 24) and 2.7B (d 2560, 32), vocabulary 32000.
    pub fn preset(name: &str) -> Option<Self> {
        Some(match name {
            "tiny" => Self::new(8192, 256, 4),
            "370m" => Self::new(32000, 1024, 24),
            "1.3b" => Self::new(32000, 2048, 24),
            "2.7b" => Self::new(32000, 2560, 32),
            _ => return None,
        })
    }

    /// Checks that the shape is consistent; the error names the field.
    pub fn validate(&self) -> Result<()> {
        for (k, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
        ] {
            if v <= 0 {
                return Err(Error::config(
                    format!("model.{k}"),
                    format!("must be positive, got {v}"),
                ));
            }
        }
        Ok(())
    }

    /// Number of parameters (latent weights, gains, lower bounds).
    pub fn num_parameters(&self) -> i64 {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        // Four d x d projections and the GLU's (2f x d, d x f), each BitLinear with an input
        // gain; the output gate's norm; two block norms; one lower-bound row.
        let block = 4 * (d * d + d) + (2 * f * d + d) + (d * f + f) + d + 2 * d + d;
        2 * self.vocab_size * d + d + self.num_hidden_layers * block + d
    }
}

/// The recurrent state of every block: `h` `(B, D)` per layer.
#[derive(Debug, Default)]
pub struct State {
    pub(crate) layers: Vec<Option<Tensor>>,
}

impl State {
    /// Bytes the state holds (constant in the sequence length).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    }
}

/// `h_t = f_t h_{t-1} + i_t` over dimension 1 of `(B, T, D)` tensors, from `h0` `(B, D)` (zero
/// when None); differentiable with respect to `f`, `i` and `h0`.
///
/// The forward pass is a Hillis-Steele scan ([`scan_values`]). Its backward pass is written by
/// hand ([`frugal_kernels::autograd`]): the gradient of the hidden states runs backwards
/// through the same recurrence, `G_t = g_t + f_{t+1} G_{t+1}`, one more scan, and then
/// `di_t = G_t`, `df_t = G_t h_{t-1}`, `dh0 = f_1 G_1`. Only `f`, `h` and `h0` are kept for it,
/// where autograd through the scan's passes would keep two `(B, T, D)` tensors per pass
/// (`2 log2 T` of them).
pub fn linear_scan(f: &Tensor, i: &Tensor, h0: Option<&Tensor>) -> Tensor {
    let mut inputs = vec![f, i];
    inputs.extend(h0);
    if !frugal_kernels::autograd::grad_enabled() || !inputs.iter().any(|t| t.requires_grad()) {
        // Nothing to differentiate (generation, evaluation): no graph node.
        return scan_values(f, i, h0);
    }
    let mut out = frugal_kernels::autograd::apply(Scan::default(), &inputs)
        .unwrap_or_else(|e| panic!("linear_scan: {e}"));
    out.remove(0)
}

/// The values of [`linear_scan`], without a custom backward: after the pass with offset k,
/// position t holds the composition of the steps t-2k+1..t. Differentiable through tch (keeps
/// the passes' tensors), and used as is where no gradient is recorded.
pub fn scan_values(f: &Tensor, i: &Tensor, h0: Option<&Tensor>) -> Tensor {
    let t = f.size()[1];
    let mut b = match h0 {
        Some(h) => {
            let first = i.narrow(1, 0, 1) + f.narrow(1, 0, 1) * h.unsqueeze(1);
            Tensor::cat(&[first, i.narrow(1, 1, t - 1)], 1)
        }
        None => i.shallow_clone(),
    };
    let mut a = f.shallow_clone();
    let mut k = 1;
    while k < t {
        let shift = |x: &Tensor, fill: f64| {
            let head = x.narrow(1, 0, k).full_like(fill);
            Tensor::cat(&[head, x.narrow(1, 0, t - k)], 1)
        };
        b = &b + &a * shift(&b, 0.0);
        if k * 2 < t {
            a = &a * shift(&a, 1.0);
        }
        k *= 2;
    }
    b
}

/// [`linear_scan`] as a custom autograd function: keeps `f`, `h0` and the detached output.
#[derive(Default)]
struct Scan {
    f: Option<Tensor>,
    h: Option<Tensor>,
    h0: Option<Tensor>,
}

impl frugal_kernels::autograd::CustomFunction for Scan {
    fn forward(&mut self, inputs: &[Tensor]) -> frugal_kernels::Result<Vec<Tensor>> {
        let (f, i, h0) = (&inputs[0], &inputs[1], inputs.get(2));
        let h = scan_values(f, i, h0);
        self.f = Some(f.shallow_clone());
        self.h0 = h0.map(Tensor::shallow_clone);
        self.h = Some(h.detach());
        Ok(vec![h])
    }

    fn backward(&mut self, grads: &[Tensor]) -> frugal_kernels::Result<Vec<Option<Tensor>>> {
        let (Some(f), Some(h)) = (self.f.take(), self.h.take()) else {
            return Err(frugal_kernels::KernelError::Invalid(
                "linear_scan: backward ran twice (retain_graph is not supported)".into(),
            ));
        };
        let h0 = self.h0.take();
        let t = f.size()[1];
        // G_t = g_t + f_{t+1} G_{t+1}: the same recurrence run from the end.
        let f_next = Tensor::cat(&[f.narrow(1, 1, t - 1), f.narrow(1, 0, 1).zeros_like()], 1);
        let g_total = scan_values(&f_next.flip([1]), &grads[0].flip([1]), None).flip([1]);
        let h_prev = {
            let first = match &h0 {
                Some(h0) => h0.unsqueeze(1).to_kind(h.kind()),
                None => h.narrow(1, 0, 1).zeros_like(),
            };
            Tensor::cat(&[first, h.narrow(1, 0, t - 1)], 1)
        };
        let d_f = &g_total * h_prev;
        let mut out = vec![Some(d_f), None];
        if h0.is_some() {
            out.push(Some(f.select(1, 0) * g_total.select(1, 0)));
        }
        out[1] = Some(g_total);
        Ok(out)
    }
}

#[derive(Debug)]
struct Mlgru {
    i_proj: Box<dyn Linear>,
    f_proj: Box<dyn Linear>,
    g_proj: Box<dyn Linear>,
    o_proj: Box<dyn Linear>,
    g_norm: RmsNorm,
    mixer: Mixer,
}

impl Mlgru {
    /// The forget gate `f` and input `i` (`(B, T, D)`, f32) of normalized input `x`.
    fn gates(&self, x: &Tensor, lower_bound: Option<&Tensor>) -> (Tensor, Tensor) {
        let f = self.f_proj.forward(x).to_kind(Kind::Float).sigmoid();
        let f = match (self.mixer, lower_bound) {
            (Mixer::Reference, Some(lb)) => lb + (1.0 - lb) * &f,
            _ => f,
        };
        let i = self.i_proj.forward(x).to_kind(Kind::Float).silu() * (1.0 - &f);
        (f, i)
    }

    /// The output of hidden states `h` for normalized input `x`.
    fn output(&self, x: &Tensor, h: &Tensor) -> Tensor {
        let g = self.g_proj.forward(x).to_kind(Kind::Float);
        let gated = match self.mixer {
            Mixer::Reference => self.g_norm.forward(&g) * h.silu(),
            Mixer::Paper => g.sigmoid() * h,
        };
        self.o_proj.forward(&gated).to_kind(Kind::Float)
    }
}

#[derive(Debug)]
struct Glu {
    gate_proj: Box<dyn Linear>,
    down_proj: Box<dyn Linear>,
}

impl Glu {
    fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.gate_proj.forward(x);
        let parts = y.chunk(2, -1);
        let h = parts[0].silu() * &parts[1];
        self.down_proj.forward(&h).to_kind(Kind::Float)
    }
}

/// One block: MLGRU token mixer and GLU channel mixer, each pre-normed with a residual.
#[derive(Debug)]
pub struct Block {
    attn_norm: RmsNorm,
    attn: Mlgru,
    mlp_norm: RmsNorm,
    mlp: Glu,
}

impl Block {
    fn new(path: &nn::Path, cfg: &HgrnBitConfig, kind: &LinearKind, compute: Kind) -> Result<Self> {
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        let a = path / "attn";
        let m = path / "mlp";
        let lin = |p: nn::Path, i, o| linear::build(&p, i, o, kind, compute);
        Ok(Self {
            attn_norm: RmsNorm::new(&(path / "attn_norm"), d, cfg.rms_norm_eps),
            attn: Mlgru {
                i_proj: lin(&a / "i_proj", d, d)?,
                f_proj: lin(&a / "f_proj", d, d)?,
                g_proj: lin(&a / "g_proj", d, d)?,
                o_proj: lin(&a / "o_proj", d, d)?,
                g_norm: RmsNorm::new(&(&a / "g_norm"), d, cfg.rms_norm_eps),
                mixer: cfg.mixer,
            },
            mlp_norm: RmsNorm::new(&(path / "mlp_norm"), d, cfg.rms_norm_eps),
            mlp: Glu {
                gate_proj: lin(&m / "gate_proj", d, 2 * f)?,
                down_proj: lin(&m / "down_proj", f, d)?,
            },
        })
    }

    /// The block's norms: `attn_norm`, `attn.g_norm`, `mlp_norm`.
    pub(crate) fn norms(&self) -> [&RmsNorm; 3] {
        [&self.attn_norm, &self.attn.g_norm, &self.mlp_norm]
    }

    /// The block's linear layers with their names relative to the block.
    pub fn linears(&self) -> [(&'static str, &dyn Linear); 6] {
        let (a, m) = (&self.attn, &self.mlp);
        [
            ("attn.i_proj", a.i_proj.as_ref()),
            ("attn.f_proj", a.f_proj.as_ref()),
            ("attn.g_proj", a.g_proj.as_ref()),
            ("attn.o_proj", a.o_proj.as_ref()),
            ("mlp.gate_proj", m.gate_proj.as_ref()),
            ("mlp.down_proj", m.down_proj.as_ref()),
        ]
    }

    /// [`Block::linears`], mutable.
    pub fn linears_mut(&mut self) -> [(&'static str, &mut Box<dyn Linear>); 6] {
        let (a, m) = (&mut self.attn, &mut self.mlp);
        [
            ("attn.i_proj", &mut a.i_proj),
            ("attn.f_proj", &mut a.f_proj),
            ("attn.g_proj", &mut a.g_proj),
            ("attn.o_proj", &mut a.o_proj),
            ("mlp.gate_proj", &mut m.gate_proj),
            ("mlp.down_proj", &mut m.down_proj),
        ]
    }

    /// `x`: the f32 residual stream `(B, T, d)`; `lower_bound` `(d,)` for the reference
    /// mixer; `state`: the recurrence's state before the first token, replaced by the state
    /// after the last (None: start from zero and keep nothing).
    pub fn forward(
        &self,
        x: &Tensor,
        lower_bound: Option<&Tensor>,
        state: Option<&mut Option<Tensor>>,
    ) -> Tensor {
        let n = self.attn_norm.forward(x);
        let (f, i) = self.attn.gates(&n, lower_bound);
        let h = match state {
            Some(slot) => {
                let h = linear_scan(&f, &i, slot.as_ref());
                let t = h.size()[1];
                *slot = Some(h.select(1, t - 1).detach());
                h
            }
            None => linear_scan(&f, &i, None),
        };
        let x = x + self.attn.output(&n, &h);
        let m = self.mlp_norm.forward(&x);
        &x + self.mlp.forward(&m)
    }
}

/// The MatMul-free LM: embeddings, blocks, final norm, output head.
#[derive(Debug)]
pub struct HgrnBit {
    /// The model's shape.
    pub config: HgrnBitConfig,
    embeddings: Tensor,
    lower_bounds: Tensor,
    /// The blocks, first to last.
    pub layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Box<dyn Linear>,
}

impl HgrnBit {
    /// Builds the model under `root` with the reference code's names
    /// (`model.embeddings.weight`, `model.lower_bounds`, `model.layers.N.attn.i_proj.weight`...,
    /// `model.norm.weight`, `lm_head.weight`), every projection of kind `kind` (BitLinear for
    /// the MatMul-free LM; dense for a full-precision twin), the head BitLinear too when `kind`
    /// is. Initialisation as the reference code's: the token mixer's projections
    /// xavier-uniform with gain 2^-2.5, the other projections and the embeddings N(0, 0.02),
    /// the GLU's `down_proj` then scaled by 1 / sqrt(2 * layers), gains one, lower bounds zero.
    pub fn new(
        root: &nn::Path,
        cfg: &HgrnBitConfig,
        kind: &LinearKind,
        compute: Kind,
    ) -> Result<Self> {
        cfg.validate()?;
        let model = root / "model";
        let normal = nn::Init::Randn {
            mean: 0.0,
            stdev: cfg.initializer_range,
        };
        let embeddings =
            (&model / "embeddings").var("weight", &[cfg.vocab_size, cfg.hidden_size], normal);
        let lower_bounds = model.var(
            "lower_bounds",
            &[cfg.num_hidden_layers, cfg.hidden_size],
            nn::Init::Const(0.0),
        );
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Block::new(&(&model / "layers" / i), cfg, kind, compute))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(&(&model / "norm"), cfg.hidden_size, cfg.rms_norm_eps);
        let head_kind = match kind {
            LinearKind::BitLinear { .. } | LinearKind::PackedBitLinear { .. } => kind.clone(),
            _ => LinearKind::Dense,
        };
        let lm_head = linear::build(
            &(root / "lm_head"),
            cfg.hidden_size,
            cfg.vocab_size,
            &head_kind,
            compute,
        )?;
        let this = Self {
            config: cfg.clone(),
            embeddings,
            lower_bounds,
            layers,
            norm,
            lm_head,
        };
        this.published_init();
        Ok(this)
    }

    fn published_init(&self) {
        let d = self.config.hidden_size as f64;
        let bound = 2f64.powf(-2.5) * (6.0 / (d + d)).sqrt();
        let down_scale = 1.0 / (2.0 * self.config.num_hidden_layers as f64).sqrt();
        tch::no_grad(|| {
            for block in &self.layers {
                for (name, l) in block.linears() {
                    let Some(w) = l.dense_weight().or_else(|| bit_weight(l)) else {
                        continue;
                    };
                    let mut w = w.shallow_clone();
                    if name.starts_with("attn.") {
                        let _ = w.uniform_(-bound, bound);
                    } else if name == "mlp.down_proj" {
                        let _ = w.g_mul_scalar_(down_scale);
                    }
                }
            }
        });
    }

    /// Every linear layer with its full name, the output head (`lm_head`, a BitLinear too)
    /// last: unlike the LLaMA's, the head is packed and loaded like the blocks' layers.
    pub fn linears(&self) -> Vec<(String, &dyn Linear)> {
        let mut v = linear::stack_linears("model.layers", &self.layers, Block::linears);
        v.push(("lm_head".into(), self.lm_head.as_ref()));
        v
    }

    /// [`HgrnBit::linears`], mutable.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Box<dyn Linear>)> {
        let mut v = linear::stack_linears_mut("model.layers", &mut self.layers, Block::linears_mut);
        v.push(("lm_head".into(), &mut self.lm_head));
        v
    }

    /// The output head.
    pub fn head_layer(&self) -> &dyn Linear {
        self.lm_head.as_ref()
    }

    /// The learned rows behind [`HgrnBit::lower_bounds`] `(layers, d)`.
    pub(crate) fn lower_bound_logits(&self) -> &Tensor {
        &self.lower_bounds
    }

    /// The input embedding table `(vocab, d)`.
    pub(crate) fn embedding_table(&self) -> &Tensor {
        &self.embeddings
    }

    /// The final norm, before the head.
    pub(crate) fn final_norm(&self) -> &RmsNorm {
        &self.norm
    }

    /// The input embeddings `(B, T, d)` in f32.
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embeddings, ids, -1, false, false).to_kind(Kind::Float)
    }

    /// The lower bound of every block's forget gate (reference mixer): a softmax over the
    /// blocks of the learned rows, cumulated, minus the first, so the first block's is zero.
    pub fn lower_bounds(&self) -> Tensor {
        let p = self
            .lower_bounds
            .to_kind(Kind::Float)
            .softmax(0, Kind::Float);
        p.cumsum(0, Kind::Float) - p.get(0)
    }

    /// Logits in f32 of the last block's output.
    pub fn head(&self, x: &Tensor) -> Tensor {
        self.lm_head
            .forward(&self.norm.forward(x))
            .to_kind(Kind::Float)
    }

    /// Logits `(B, T, vocab)` of ids `(B, T)`. With a state, the ids continue the sequence the
    /// state summarizes, and the state moves past them (constant memory per token).
    ///
    /// A packed model (every projection [`LinearKind::PackedBitLinear`], f32, on the CPU) runs
    /// the packed inference path of [`crate::hgrn_bit_cpu`], without gradients; any other
    /// runs [`HgrnBit::forward_graph`].
    pub fn forward(&self, ids: &Tensor, mut state: Option<&mut State>) -> Tensor {
        if let Some(logits) = crate::hgrn_bit_cpu::forward(self, ids, state.as_deref_mut()) {
            return logits;
        }
        self.forward_graph(ids, state)
    }

    /// [`HgrnBit::forward`] through libtorch's operations (differentiable), whatever the
    /// layers.
    pub fn forward_graph(&self, ids: &Tensor, state: Option<&mut State>) -> Tensor {
        let lbs = self.lower_bounds();
        let mut x = self.embed(ids);
        match state {
            Some(state) => {
                state.layers.resize_with(self.layers.len(), || None);
                for (i, (block, slot)) in
                    self.layers.iter().zip(state.layers.iter_mut()).enumerate()
                {
                    let lb = (i > 0).then(|| lbs.get(i as i64));
                    x = block.forward(&x, lb.as_ref(), Some(slot));
                }
            }
            None => {
                for (i, block) in self.layers.iter().enumerate() {
                    let lb = (i > 0).then(|| lbs.get(i as i64));
                    x = block.forward(&x, lb.as_ref(), None);
                }
            }
        }
        self.head(&x)
    }

    /// Mean next-token cross-entropy of `ids` against `targets` (-100: not scored).
    pub fn loss(&self, ids: &Tensor, targets: &Tensor) -> Tensor {
        let logits = self.forward(ids, None);
        let v = logits.size()[2];
        logits
            .reshape([-1, v])
            .cross_entropy_for_logits(&targets.reshape([-1]))
    }
}

/// The latent weight of a BitLinear layer (for initialisation).
fn bit_weight(l: &dyn Linear) -> Option<&Tensor> {
    l.bit_linear().map(|b| &b.weight)
}
