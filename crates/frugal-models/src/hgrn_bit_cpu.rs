//! Inference of a packed HGRN-bit on the CPU with no libtorch operation inside the blocks.
//!
//! When every projection of an [`HgrnBit`] is a [`PackedBitLinear`] computing in f32 and the
//! model lives on the CPU, [`HgrnBit::forward`] runs here: the residual stream, the norms, the
//! gates and the recurrence are plain loops over f32 rows, and every product is
//! [`ternary_matmul`] (int8 activations, 2-bit codes). Generating one token then costs what the
//! packed weights cost to stream through the ternary kernel, instead of several hundred small
//! libtorch operations, each with its dispatch and its thread-pool hand-off, that the graph path
//! spends on a `(1, 1, d)` residual. The whole forward pass runs on one of rayon's threads
//! ([`rayon::scope`]), so the kernel's row chunks are shared with the other threads without a
//! hand-off per product.
//!
//! The arithmetic is the graph path's (the same equations in f32, the same int8 quantization
//! and integer sums), up to the order of the f32 additions in the norms: the logits agree with
//! [`HgrnBit::forward_graph`] within rounding (a one-ulp difference may flip an activation's
//! int8 rounding). It computes no gradients: a packed model is for inference.

use crate::hgrn_bit::{HgrnBit, Mixer, State};
use crate::linear::PackedBitLinear;
use frugal_quant::matmul::ternary_matmul;
use frugal_quant::ternary::Ternary;
use std::borrow::Cow;
use tch::{Device, Kind, Tensor};

/// A contiguous f32 CPU tensor's values, borrowed; other tensors' copied.
fn values(t: &Tensor) -> Cow<'_, [f32]> {
    if t.kind() == Kind::Float && t.device() == Device::Cpu && t.is_contiguous() {
        let n = t.numel();
        // SAFETY: a contiguous f32 CPU tensor holds `numel` f32 values from `data_ptr` (which
        // includes the storage offset); the storage lives while `t` is borrowed, and the model
        // is only read while it is (no in-place update runs during inference).
        return Cow::Borrowed(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, n) });
    }
    Cow::Owned(Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().view([-1])).expect("f32"))
}

/// One packed projection: input RMSNorm gain and epsilon, ternary weight.
struct Proj<'a> {
    gain: Cow<'a, [f32]>,
    eps: f32,
    w: &'a Ternary,
}

impl<'a> Proj<'a> {
    fn new(l: &'a PackedBitLinear) -> Self {
        Self {
            gain: values(&l.norm),
            eps: l.eps() as f32,
            w: l.ternary(),
        }
    }

    /// `rows` outputs of inputs `x` (`rows x in`), as [`PackedBitLinear`]'s forward.
    fn apply(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let xn = rms_norm(x, &self.gain, self.eps);
        ternary_matmul(self.w, &xn, rows).expect("shapes checked when built and loaded")
    }
}

/// `x / sqrt(mean(x²) + eps) * gain` per row of width `gain.len()`.
fn rms_norm(x: &[f32], gain: &[f32], eps: f32) -> Vec<f32> {
    let d = gain.len();
    let mut out = vec![0f32; x.len()];
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(gain) {
            *o = v * r * g;
        }
    }
    out
}

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

fn silu(v: f32) -> f32 {
    v * sigmoid(v)
}

/// [`HgrnBit::lower_bounds`] of the learned rows `(layers x d)`: a softmax over the layers per
/// feature, cumulated, minus the first row.
fn lower_bounds(logits: &[f32], d: usize) -> Vec<f32> {
    let layers = logits.len() / d;
    let mut out = vec![0f32; logits.len()];
    for j in 0..d {
        let max = (0..layers)
            .map(|k| logits[k * d + j])
            .fold(f32::NEG_INFINITY, f32::max);
        // The exponentials once, kept in `out` until they are normalized and cumulated.
        let mut sum = 0f32;
        for k in 0..layers {
            let e = (logits[k * d + j] - max).exp();
            out[k * d + j] = e;
            sum += e;
        }
        let first = out[j] / sum;
        let mut acc = 0f32;
        for k in 0..layers {
            acc += out[k * d + j] / sum;
            out[k * d + j] = acc - first;
        }
    }
    out
}

/// One block's parameters.
struct BlockPlan<'a> {
    attn_norm: Cow<'a, [f32]>,
    i: Proj<'a>,
    f: Proj<'a>,
    g: Proj<'a>,
    o: Proj<'a>,
    g_norm: Cow<'a, [f32]>,
    mlp_norm: Cow<'a, [f32]>,
    gate: Proj<'a>,
    down: Proj<'a>,
    /// The forget gate's lower bound `(d,)` (reference mixer, blocks after the first).
    lower_bound: Option<Vec<f32>>,
}

/// Everything the blocks and the head read, as plain slices (shareable between threads).
struct Plan<'a> {
    d: usize,
    eps: f32,
    mixer: Mixer,
    blocks: Vec<BlockPlan<'a>>,
    norm: Cow<'a, [f32]>,
    head: Proj<'a>,
}

/// The packed projection of a linear layer, when it is one computing in f32.
fn packed(l: &dyn crate::linear::Linear) -> Option<&PackedBitLinear> {
    l.packed_bit_linear().filter(|p| p.compute() == Kind::Float)
}

impl<'a> Plan<'a> {
    /// The plan of `m`, when every projection is packed and computes in f32 on the CPU.
    fn of(m: &'a HgrnBit) -> Option<Self> {
        let head = packed(m.head_layer())?;
        let d = m.config.hidden_size as usize;
        let lbs = match m.config.mixer {
            Mixer::Reference => Some(lower_bounds(&values(m.lower_bound_logits()), d)),
            Mixer::Paper => None,
        };
        let mut blocks = Vec::with_capacity(m.layers.len());
        for (k, b) in m.layers.iter().enumerate() {
            // In `Block::linears` order.
            let [i, f, g, o, gate, down] = b.linears().map(|(_, l)| packed(l).map(Proj::new));
            let [attn_norm, g_norm, mlp_norm] = b.norms().map(|n| values(&n.weight));
            blocks.push(BlockPlan {
                attn_norm,
                i: i?,
                f: f?,
                g: g?,
                o: o?,
                g_norm,
                mlp_norm,
                gate: gate?,
                down: down?,
                lower_bound: lbs
                    .as_ref()
                    .filter(|_| k > 0)
                    .map(|l| l[k * d..(k + 1) * d].to_vec()),
            });
        }
        Some(Self {
            d,
            eps: m.config.rms_norm_eps as f32,
            mixer: m.config.mixer,
            blocks,
            norm: values(&m.final_norm().weight),
            head: Proj::new(head),
        })
    }

    /// Logits (`batch * t x vocab`) of the embedded inputs `x` (`batch * t x d`, sequence by
    /// sequence); `h` holds each block's state `(batch x d)` before the first position and
    /// after the last.
    fn run(&self, mut x: Vec<f32>, batch: usize, t: usize, h: &mut [Vec<f32>]) -> Vec<f32> {
        let (d, rows) = (self.d, batch * t);
        for (b, hb) in self.blocks.iter().zip(h.iter_mut()) {
            let n = rms_norm(&x, &b.attn_norm, self.eps);
            let mut f = b.f.apply(&n, rows);
            let mut i = b.i.apply(&n, rows);
            let g = b.g.apply(&n, rows);
            for (k, (fv, iv)) in f.iter_mut().zip(i.iter_mut()).enumerate() {
                let mut s = sigmoid(*fv);
                if let (Mixer::Reference, Some(lb)) = (self.mixer, &b.lower_bound) {
                    s = lb[k % d] + (1.0 - lb[k % d]) * s;
                }
                *fv = s;
                *iv = silu(*iv) * (1.0 - s);
            }
            // The recurrence, position by position: i becomes h.
            for s in 0..batch {
                let state = &mut hb[s * d..(s + 1) * d];
                for p in 0..t {
                    let r = (s * t + p) * d;
                    for (j, hv) in state.iter_mut().enumerate() {
                        *hv = f[r + j] * *hv + i[r + j];
                        i[r + j] = *hv;
                    }
                }
            }
            let gated: Vec<f32> = match self.mixer {
                Mixer::Reference => {
                    let gn = rms_norm(&g, &b.g_norm, self.eps);
                    gn.iter().zip(&i).map(|(g, h)| g * silu(*h)).collect()
                }
                Mixer::Paper => g.iter().zip(&i).map(|(g, h)| sigmoid(*g) * h).collect(),
            };
            for (xv, o) in x.iter_mut().zip(b.o.apply(&gated, rows)) {
                *xv += o;
            }
            let m = rms_norm(&x, &b.mlp_norm, self.eps);
            let y = b.gate.apply(&m, rows);
            let inner = y.len() / rows / 2;
            let mut mid = vec![0f32; rows * inner];
            for (r, out) in mid.chunks_exact_mut(inner).enumerate() {
                let (gv, uv) = y[r * 2 * inner..(r + 1) * 2 * inner].split_at(inner);
                for ((o, g), u) in out.iter_mut().zip(gv).zip(uv) {
                    *o = silu(*g) * u;
                }
            }
            for (xv, o) in x.iter_mut().zip(b.down.apply(&mid, rows)) {
                *xv += o;
            }
        }
        let n = rms_norm(&x, &self.norm, self.eps);
        self.head.apply(&n, rows)
    }
}

/// Logits `(B, T, vocab)` of `ids` by the packed CPU path, when `m` can take it (every
/// projection packed, f32, on the CPU); the state (if any) moves past the ids.
pub(crate) fn forward(m: &HgrnBit, ids: &Tensor, state: Option<&mut State>) -> Option<Tensor> {
    if ids.device() != Device::Cpu || ids.dim() != 2 {
        return None;
    }
    let plan = Plan::of(m)?;
    let (batch, t) = (ids.size()[0] as usize, ids.size()[1] as usize);
    let d = plan.d;
    let table = m.embedding_table();
    let x = if table.kind() == Kind::Float && table.device() == Device::Cpu {
        // Rows read straight from the table (no libtorch operation per token).
        let table = values(table);
        let ids = Vec::<i64>::try_from(ids.reshape([-1])).ok()?;
        let vocab = table.len() / d;
        let mut x = Vec::with_capacity(ids.len() * d);
        for &id in &ids {
            let id = usize::try_from(id).ok().filter(|&i| i < vocab)?;
            x.extend_from_slice(&table[id * d..(id + 1) * d]);
        }
        x
    } else {
        values(&tch::no_grad(|| m.embed(ids))).into_owned()
    };
    let layers = plan.blocks.len();
    let mut h: Vec<Vec<f32>> = match &state {
        Some(s) if !s.layers.is_empty() => s
            .layers
            .iter()
            .map(|l| match l {
                Some(t) => values(t).into_owned(),
                None => vec![0f32; batch * d],
            })
            .collect(),
        _ => vec![vec![0f32; batch * d]; layers],
    };
    if h.len() != layers || h.iter().any(|v| v.len() != batch * d) {
        return None;
    }
    let logits = rayon::scope(|_| plan.run(x, batch, t, &mut h));
    if let Some(s) = state {
        s.layers = h
            .iter()
            .map(|v| Some(Tensor::from_slice(v).view([batch as i64, d as i64])))
            .collect();
    }
    let vocab = logits.len() / (batch * t).max(1);
    Some(Tensor::from_slice(&logits).view([batch as i64, t as i64, vocab as i64]))
}
