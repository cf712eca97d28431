//! One LoRA adapter on one linear layer: `h = W x + s B A dropout(x)` (`s` = alpha / r, or
//! alpha / sqrt(r) with rsLoRA); DoRA's magnitude; QA-LoRA's group-averaged input; merging.

use crate::config::{Init, LoraConfig};
use frugal_core::{Error, Result};
use tch::{nn, Kind, Tensor};

/// The trained tensors of one adapter on one layer, and how they apply.
#[derive(Debug)]
pub struct Lora {
    /// `A`, `(r, in / pool)`, f32.
    pub a: Tensor,
    /// `B`, `(out, r)`, f32.
    pub b: Tensor,
    /// DoRA's magnitude, `(out,)`, f32.
    pub magnitude: Option<Tensor>,
    /// The factor on `B A x`.
    pub scaling: f64,
    /// Dropout probability on the adapter's input while training.
    pub dropout: f64,
    /// QA-LoRA group size (1: plain LoRA): `A` reads the mean of each group of `pool` input
    /// columns, times the number of groups (as PEFT).
    pub pool: i64,
}

/// The var-store names, under layer path `layer`, of adapter `name`'s tensors (PEFT's module
/// names, with the adapter's name inside as PEFT keeps it in memory).
pub fn variable_names(layer: &str, name: &str) -> [String; 3] {
    [
        format!("{layer}.lora_A.{name}.weight"),
        format!("{layer}.lora_B.{name}.weight"),
        format!("{layer}.lora_magnitude_vector.{name}.weight"),
    ]
}

impl Lora {
    /// Creates adapter `name` on a layer of `in_dim -> out_dim` under `path` (variables
    /// `lora_A.{name}.weight`, `lora_B.{name}.weight`, `lora_magnitude_vector.{name}.weight`),
    /// initialised as `cfg.init` says. `base` is the layer's weight `(out, in)` in f32: DoRA's
    /// magnitude starts at its row norms (plus `s B A`), and PiSSA takes its top singular
    /// triplets; for PiSSA the second value is the new base weight, `W - s B A`.
    pub fn new(
        path: &nn::Path,
        name: &str,
        in_dim: i64,
        out_dim: i64,
        cfg: &LoraConfig,
        base: Option<&Tensor>,
    ) -> Result<(Self, Option<Tensor>)> {
        let layer = path.components().collect::<Vec<_>>().join(".");
        if cfg.pool > 1 && in_dim % cfg.pool != 0 {
            return Err(Error::Msg(format!(
                "{layer}: QA-LoRA group size {} does not divide the input width {in_dim}",
                cfg.pool
            )));
        }
        let a_in = in_dim / cfg.pool;
        let r = cfg.r;
        let s = cfg.scaling();
        let (a0, b0, new_base) = match cfg.init {
            Init::Default => {
                let bound = 1.0 / (a_in as f64).sqrt();
                let a =
                    Tensor::empty([r, a_in], (Kind::Float, path.device())).uniform_(-bound, bound);
                (
                    a,
                    Tensor::zeros([out_dim, r], (Kind::Float, path.device())),
                    None,
                )
            }
            Init::Gaussian => {
                let a = Tensor::randn([r, a_in], (Kind::Float, path.device())) / r as f64;
                (
                    a,
                    Tensor::zeros([out_dim, r], (Kind::Float, path.device())),
                    None,
                )
            }
            Init::Pissa => {
                let w = base.ok_or_else(|| {
                    Error::Msg(format!(
                        "{layer}: PiSSA needs a dense base weight (not a quantized or TT one)"
                    ))
                })?;
                let (a, b, residual) = pissa(w, r, s);
                (a, b, Some(residual))
            }
        };
        let p = |part: &str| path / part / name;
        let a = p("lora_A").var_copy("weight", &a0);
        let b = p("lora_B").var_copy("weight", &b0);
        let magnitude = if cfg.use_dora {
            let w =
                base.ok_or_else(|| Error::Msg(format!("{layer}: DoRA needs the base weight")))?;
            let m0 = tch::no_grad(|| row_norms(&(w.to_kind(Kind::Float) + b0.matmul(&a0) * s)));
            Some(p("lora_magnitude_vector").var_copy("weight", &m0))
        } else {
            None
        };
        let lora = Self {
            a,
            b,
            magnitude,
            scaling: s,
            dropout: cfg.dropout,
            pool: cfg.pool,
        };
        Ok((lora, new_base))
    }

    /// QA-LoRA's input: the mean of each group of `pool` columns, times the number of groups
    /// (PEFT 0.21's `QALoraLinearVariant`, so that adapter files are interchangeable).
    fn pooled(&self, x: &Tensor) -> Tensor {
        if self.pool == 1 {
            return x.shallow_clone();
        }
        let mut shape = x.size();
        let last = shape.pop().expect("at least 1-D");
        let groups = last / self.pool;
        shape.extend([groups, self.pool]);
        (x.view(shape.as_slice()).mean_dim(-1, false, Kind::Float) * groups as f64)
            .to_kind(x.kind())
    }

    /// `s B A x` (no dropout, no pooling) in `x`'s kind.
    fn low_rank(&self, x: &Tensor) -> Tensor {
        let k = x.kind();
        x.linear(&self.a.to_kind(k), None::<Tensor>)
            .linear(&self.b.to_kind(k), None::<Tensor>)
            * self.scaling
    }

    /// `base_out + s B A x` with the scale applied to the r-wide `A x` and the sum fused into
    /// the product with B (one `addmm`): no full-width temporary for the scaled adapter output,
    /// nor for the sum, in the forward or the backward pass.
    fn add_low_rank(&self, base_out: &Tensor, x: &Tensor) -> Tensor {
        let k = x.kind();
        let h = x.linear(&self.a.to_kind(k), None::<Tensor>) * self.scaling;
        let (r, out) = (self.b.size()[1], self.b.size()[0]);
        let shape = base_out.size();
        base_out
            .reshape([-1, out])
            .addmm(&h.reshape([-1, r]), &self.b.to_kind(k).tr())
            .reshape(shape.as_slice())
    }

    /// The layer's output with the adapter, given the input `x`, the base layer's output
    /// `base_out` on it, and (for DoRA) a way to get the base weight in f32 and to apply the
    /// base layer to another input (dropout).
    pub fn apply(
        &self,
        x: &Tensor,
        base_out: &Tensor,
        base_weight: impl Fn() -> Tensor,
        base_forward: impl Fn(&Tensor) -> Tensor,
        train: bool,
    ) -> Tensor {
        let dropped = train && self.dropout > 0.0;
        let xin = if dropped {
            x.dropout(self.dropout, true)
        } else {
            x.shallow_clone()
        };
        let Some(m) = &self.magnitude else {
            return self.add_low_rank(base_out, &self.pooled(&xin));
        };
        let lora = self.low_rank(&self.pooled(&xin));
        // DoRA (as PEFT): the norm of W + s B A per output row, detached.
        let norm =
            tch::no_grad(|| row_norms(&(base_weight() + self.b.matmul(&self.a) * self.scaling)));
        let factor = (m / norm).to_kind(base_out.kind());
        let base_part = if dropped {
            base_forward(&xin)
        } else {
            base_out.shallow_clone()
        };
        base_out + (&factor - 1.0) * base_part + factor * lora
    }

    /// [`Lora::apply`] for inputs that never see dropout (evaluation).
    pub fn apply_eval(
        &self,
        x: &Tensor,
        base_out: &Tensor,
        base_weight: impl Fn() -> Tensor,
    ) -> Tensor {
        self.apply(
            x,
            base_out,
            base_weight,
            |_| unreachable!("no dropout"),
            false,
        )
    }

    /// `s B A` as an `(out, in)` weight in f32 (QA-LoRA: each group's column repeated and
    /// scaled by groups / group size, so that `delta x` equals the adapter on the pooled
    /// input).
    pub fn delta_weight(&self) -> Tensor {
        tch::no_grad(|| {
            let ba = self.b.matmul(&self.a) * self.scaling;
            if self.pool == 1 {
                ba
            } else {
                let groups = self.a.size()[1];
                ba.repeat_interleave_self_int(self.pool, 1, None)
                    * (groups as f64 / self.pool as f64)
            }
        })
    }

    /// The merged weight `W + s B A` (DoRA: scaled per row to the magnitude,
    /// `m / ||W + s B A|| * (W + s B A)`), computed in f32 from the f32 base weight `w`;
    /// with it, DoRA's row norms (needed to unmerge).
    pub fn merged(&self, w: &Tensor) -> (Tensor, Option<Tensor>) {
        tch::no_grad(|| {
            let sum = w.to_kind(Kind::Float) + self.delta_weight();
            match &self.magnitude {
                None => (sum, None),
                Some(m) => {
                    let norm = row_norms(&sum);
                    ((m / &norm).unsqueeze(1) * sum, Some(norm))
                }
            }
        })
    }

    /// The base weight back from a merged one (f32), given DoRA's row norms at merge time.
    pub fn unmerged(&self, merged: &Tensor, norms: Option<&Tensor>) -> Tensor {
        tch::no_grad(|| {
            let merged = merged.to_kind(Kind::Float);
            let sum = match (&self.magnitude, norms) {
                (Some(m), Some(n)) => merged * (n / m).unsqueeze(1),
                _ => merged,
            };
            sum - self.delta_weight()
        })
    }

    /// The adapter's variables, in the order A, B, magnitude.
    pub fn variables(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.a, &self.b];
        v.extend(self.magnitude.as_ref());
        v
    }
}

/// L2 norm of each row of `w` (f32).
pub fn row_norms(w: &Tensor) -> Tensor {
    w.to_kind(Kind::Float)
        .norm_scalaropt_dim(2.0, [1i64].as_slice(), false)
}

/// PiSSA's start: with `W = U S Vh`, `A = sqrt(S_r / s) Vh_r`, `B = U_r sqrt(S_r / s)` and the
/// residual `W - s B A` (PEFT's `pissa_init`). Returns `(A, B, residual)`, f32.
pub fn pissa(w: &Tensor, r: i64, s: f64) -> (Tensor, Tensor, Tensor) {
    tch::no_grad(|| {
        let w = w.to_kind(Kind::Float);
        // torch.svd(some = true) is linalg_svd returning V (tch cannot pass its driver).
        let (u, sv, v) = w.svd(true, true);
        let vh = v.tr();
        let r = r.min(sv.size()[0]);
        let root = (sv.narrow(0, 0, r) / s).sqrt();
        let a = root.unsqueeze(1) * vh.narrow(0, 0, r);
        let b = u.narrow(1, 0, r) * root.unsqueeze(0);
        let residual = &w - b.matmul(&a) * s;
        (a, b, residual)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device};

    fn cfg(dora: bool, pool: i64) -> LoraConfig {
        LoraConfig {
            r: 3,
            alpha: 6.0,
            use_dora: dora,
            pool,
            ..LoraConfig::default()
        }
    }

    /// Guarantee: the merged weight reproduces the adapted layer's output, for LoRA, DoRA and
    /// QA-LoRA, and unmerging gives the base weight back.
    #[test]
    fn merged_weight_equals_the_adapter_and_unmerges() {
        tch::manual_seed(4);
        for (dora, pool) in [(false, 1), (true, 1), (false, 4)] {
            let vs = VarStore::new(Device::Cpu);
            let w = Tensor::randn([6, 8], (Kind::Float, Device::Cpu));
            let (lora, _) = Lora::new(
                &vs.root().sub("fc"),
                "default",
                8,
                6,
                &cfg(dora, pool),
                Some(&w),
            )
            .unwrap();
            tch::no_grad(|| {
                let _ = lora.b.shallow_clone().normal_(0.0, 0.3);
                if let Some(m) = &lora.magnitude {
                    let _ = m.shallow_clone().g_mul_scalar_(1.1);
                }
            });
            let x = Tensor::randn([5, 8], (Kind::Float, Device::Cpu));
            let base = x.linear(&w, None::<Tensor>);
            let y = lora.apply_eval(&x, &base, || w.shallow_clone());
            let (merged, norms) = lora.merged(&w);
            let y2 = x.linear(&merged, None::<Tensor>);
            let d = (&y - &y2).abs().max().double_value(&[]);
            assert!(d < 1e-5, "dora {dora} pool {pool}: {d}");
            assert!(
                (&y - &base).abs().max().double_value(&[]) > 1e-2,
                "the adapter acts"
            );
            let back = lora.unmerged(&merged, norms.as_ref());
            assert!((back - &w).abs().max().double_value(&[]) < 1e-5);
        }
    }

    /// Guarantee: dropout acts while training only (also on DoRA's base part, as PEFT).
    #[test]
    fn dropout_only_while_training() {
        tch::manual_seed(6);
        for dora in [false, true] {
            let vs = VarStore::new(Device::Cpu);
            let w = Tensor::randn([6, 8], (Kind::Float, Device::Cpu));
            let c = LoraConfig {
                dropout: 0.5,
                ..cfg(dora, 1)
            };
            let (lora, _) = Lora::new(&vs.root().sub("fc"), "default", 8, 6, &c, Some(&w)).unwrap();
            tch::no_grad(|| {
                let _ = lora.b.shallow_clone().normal_(0.0, 0.3);
            });
            let x = Tensor::randn([5, 8], (Kind::Float, Device::Cpu));
            let base = x.linear(&w, None::<Tensor>);
            let run = |train| {
                lora.apply(
                    &x,
                    &base,
                    || w.shallow_clone(),
                    |xd| xd.linear(&w, None::<Tensor>),
                    train,
                )
            };
            assert!((run(false) - run(false)).abs().max().double_value(&[]) == 0.0);
            assert!(
                (run(true) - run(false)).abs().max().double_value(&[]) > 1e-3,
                "dora {dora}"
            );
        }
    }

    /// Guarantee: PiSSA leaves the layer's function unchanged at the start.
    #[test]
    fn pissa_keeps_the_function() {
        tch::manual_seed(5);
        let w = Tensor::randn([6, 8], (Kind::Float, Device::Cpu));
        let (a, b, res) = pissa(&w, 3, 2.0);
        let back = res + b.matmul(&a) * 2.0;
        assert!((back - &w).abs().max().double_value(&[]) < 1e-5);
    }
}
