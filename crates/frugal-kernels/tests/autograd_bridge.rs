//! The custom autograd bridge (CI, CPU): gradients of Rust-defined functions against libtorch's
//! own autograd and against finite differences, errors and panics as errors, state freed once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use frugal_kernels::autograd::{apply, CustomFunction};
use frugal_kernels::{KernelError, Result};
use tch::{Kind, Tensor};

/// `(a * b + sin(a), a - 2 b)`, with a hand-written backward; counts drops.
struct MulSin {
    saved: Option<(Tensor, Tensor)>,
    drops: Arc<AtomicUsize>,
}

impl CustomFunction for MulSin {
    fn forward(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let (a, b) = (&inputs[0], &inputs[1]);
        assert!(
            !(a * 1.0).requires_grad(),
            "forward runs without gradient recording"
        );
        self.saved = Some((a.detach(), b.detach()));
        Ok(vec![a * b + a.sin(), a - b * 2.0])
    }

    fn backward(&mut self, grads: &[Tensor]) -> Result<Vec<Option<Tensor>>> {
        let (a, b) = self.saved.as_ref().expect("forward ran");
        let (g0, g1) = (&grads[0], &grads[1]);
        let ga = g0 * (b + a.cos()) + g1;
        let gb = g0 * a - g1 * 2.0;
        Ok(vec![Some(ga), Some(gb)])
    }
}

impl Drop for MulSin {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

fn mul_sin(drops: &Arc<AtomicUsize>) -> MulSin {
    MulSin {
        saved: None,
        drops: drops.clone(),
    }
}

fn seeded(shape: &[i64], kind: Kind) -> Tensor {
    Tensor::randn(shape, (kind, tch::Device::Cpu)).set_requires_grad(true)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn gradients_equal_libtorchs_autograd() {
    tch::manual_seed(7);
    let drops = Arc::new(AtomicUsize::new(0));
    let a = seeded(&[3, 5], Kind::Double);
    let b = seeded(&[3, 5], Kind::Double);
    let w0 = Tensor::randn([3, 5], (Kind::Double, tch::Device::Cpu));
    let w1 = Tensor::randn([3, 5], (Kind::Double, tch::Device::Cpu));

    let out = apply(mul_sin(&drops), &[&a, &b]).unwrap();
    assert_eq!(out.len(), 2);
    assert!(out[0].requires_grad() && out[1].requires_grad());
    let loss = (&out[0] * &w0).sum(Kind::Double) + (&out[1] * &w1).sum(Kind::Double);
    let (ga, gb) = {
        let g = Tensor::run_backward(&[&loss], &[&a, &b], false, false);
        (g[0].shallow_clone(), g[1].shallow_clone())
    };

    let reference = (&a * &b + a.sin()) * &w0 + (&a - &b * 2.0) * &w1;
    let g = Tensor::run_backward(&[&reference.sum(Kind::Double)], &[&a, &b], false, false);
    assert!(max_abs_diff(&ga, &g[0]) < 1e-12, "d/da differs");
    assert!(max_abs_diff(&gb, &g[1]) < 1e-12, "d/db differs");
    let forward = &a * &b + a.sin();
    assert!(max_abs_diff(&out[0], &forward) < 1e-12);

    drop((out, loss));
    assert_eq!(
        drops.load(Ordering::SeqCst),
        1,
        "the function is freed once with its graph"
    );
}

#[test]
fn gradient_check_against_finite_differences() {
    tch::manual_seed(11);
    let drops = Arc::new(AtomicUsize::new(0));
    let a = seeded(&[4], Kind::Double);
    let b = seeded(&[4], Kind::Double);
    let f = |a: &Tensor, b: &Tensor| -> Tensor {
        let out = apply(mul_sin(&drops), &[a, b]).unwrap();
        (&out[0] * &out[1]).sum(Kind::Double)
    };
    let g = Tensor::run_backward(&[&f(&a, &b)], &[&a, &b], false, false);
    let eps = 1e-6;
    for (which, grad) in [(0usize, &g[0]), (1, &g[1])] {
        for i in 0..4 {
            let bump = |sign: f64| {
                let (a2, b2) = (a.detach().copy(), b.detach().copy());
                let t = if which == 0 { &a2 } else { &b2 };
                let _ = t.narrow(0, i, 1).g_add_scalar_(sign * eps);
                f(&a2, &b2).double_value(&[])
            };
            let numeric = (bump(1.0) - bump(-1.0)) / (2.0 * eps);
            let analytic = grad.double_value(&[i]);
            assert!(
                (numeric - analytic).abs() < 1e-6 * (1.0 + analytic.abs()),
                "input {which}, element {i}: numeric {numeric}, analytic {analytic}"
            );
        }
    }
}

#[test]
fn inputs_without_gradients_and_missing_gradients() {
    /// Returns a gradient for the first input only.
    struct FirstOnly;
    impl CustomFunction for FirstOnly {
        fn forward(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
            Ok(vec![&inputs[0] * &inputs[1]])
        }
        fn backward(&mut self, grads: &[Tensor]) -> Result<Vec<Option<Tensor>>> {
            Ok(vec![Some(grads[0].shallow_clone() * 10.0), None])
        }
    }
    let a = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
    let b = Tensor::from_slice(&[3.0f32, 4.0]);
    let y = apply(FirstOnly, &[&a, &b]).unwrap().remove(0);
    assert_eq!(Vec::<f32>::try_from(&y).unwrap(), vec![3.0, 8.0]);
    y.sum(Kind::Float).backward();
    assert_eq!(Vec::<f32>::try_from(a.grad()).unwrap(), vec![10.0, 10.0]);

    // Nothing requires a gradient: the outputs are plain tensors.
    let c = Tensor::from_slice(&[1.0f32]);
    let y = apply(FirstOnly, &[&c, &c]).unwrap().remove(0);
    assert!(!y.requires_grad());
}

#[test]
fn errors_and_panics_come_back_as_errors() {
    struct Failing {
        in_forward: bool,
        panic: bool,
        grads: usize,
    }
    impl CustomFunction for Failing {
        fn forward(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
            if self.in_forward {
                return Err(KernelError::Invalid("forward refused: shape (3, 4)".into()));
            }
            Ok(vec![inputs[0].shallow_clone() * 2.0])
        }
        fn backward(&mut self, grads: &[Tensor]) -> Result<Vec<Option<Tensor>>> {
            if self.panic {
                panic!("backward exploded");
            }
            Ok((0..self.grads)
                .map(|_| Some(grads[0].shallow_clone()))
                .collect())
        }
    }
    let x = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);

    let err = apply(
        Failing {
            in_forward: true,
            panic: false,
            grads: 1,
        },
        &[&x],
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("forward refused: shape (3, 4)"),
        "{err}"
    );

    let y = apply(
        Failing {
            in_forward: false,
            panic: true,
            grads: 1,
        },
        &[&x],
    )
    .unwrap()
    .remove(0);
    let err = y.sum(Kind::Float).f_backward().unwrap_err();
    assert!(err.to_string().contains("backward exploded"), "{err}");

    let y = apply(
        Failing {
            in_forward: false,
            panic: false,
            grads: 3,
        },
        &[&x],
    )
    .unwrap()
    .remove(0);
    let err = y.sum(Kind::Float).f_backward().unwrap_err();
    assert!(
        err.to_string()
            .contains("backward returned 3 gradients for 1 inputs"),
        "{err}"
    );
}

#[test]
fn runs_inside_a_larger_graph_and_frees_its_state() {
    let drops = Arc::new(AtomicUsize::new(0));
    let a = Tensor::from_slice(&[0.5f64, -1.0]).set_requires_grad(true);
    let b = Tensor::from_slice(&[2.0f64, 3.0]).set_requires_grad(true);
    for _ in 0..3 {
        let h = a.exp();
        let out = apply(mul_sin(&drops), &[&h, &b]).unwrap();
        let loss = (out[0].tanh() + &out[1]).sum(Kind::Double);
        loss.backward();
    }
    let h = a.exp().detach();
    let b = b.detach();
    let tanh_grad = 1.0 - (&h * &b + h.sin()).tanh().square();
    let expected = ((&b + h.cos()) * tanh_grad + 1.0) * &h * 3.0;
    assert!(max_abs_diff(&a.grad(), &expected) < 1e-12);
    assert_eq!(drops.load(Ordering::SeqCst), 3);
}

/// libtorch's fused AdamW through the extension equals AdamW's formulas (torch.optim.AdamW).
#[test]
fn fused_adamw_follows_the_adamw_formulas() {
    use frugal_kernels::libtorch_ops::{fused_adamw, AdamWHyper};
    tch::manual_seed(4);
    let h = AdamWHyper {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.99,
        weight_decay: 0.1,
        eps: 1e-8,
    };
    let p = Tensor::randn([5, 3], (Kind::Float, tch::Device::Cpu));
    let (m, v) = (p.zeros_like(), p.zeros_like());
    let step = Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
    let p0 = p.copy();
    let (mut want, mut wm, mut wv) = (p.copy(), p.zeros_like(), p.zeros_like());
    for t in 1..=3 {
        let g = Tensor::randn([5, 3], (Kind::Float, tch::Device::Cpu));
        fused_adamw(&[&p], &[&g], &[&m], &[&v], &[&step], h).unwrap();
        want = &want * (1.0 - h.lr * h.weight_decay);
        wm = &wm * h.beta1 + &g * (1.0 - h.beta1);
        wv = &wv * h.beta2 + g.square() * (1.0 - h.beta2);
        let c1 = 1.0 - h.beta1.powi(t);
        let c2 = (1.0 - h.beta2.powi(t)).sqrt();
        want = &want - (&wm / c1) / (wv.sqrt() / c2 + h.eps) * h.lr;
        let d = max_abs_diff(&p.to_kind(Kind::Double), &want.to_kind(Kind::Double));
        let moved = max_abs_diff(&p.to_kind(Kind::Double), &p0.to_kind(Kind::Double));
        assert!(d < 1e-6, "step {t}: {d} (moved {moved})");
    }
    assert_eq!(step.double_value(&[]), 3.0);
    let err = fused_adamw(&[&p], &[], &[&m], &[&v], &[&step], h).unwrap_err();
    assert!(
        err.to_string().contains("1 parameters but 0 gradients"),
        "{err}"
    );
}
