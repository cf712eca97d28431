//! The recorded form of the optimizer step (what `train.cuda_graph` records in a CUDA graph):
//! numbers read from a device tensor, the gradient clipped without a host read. Run here
//! eagerly on the CPU, it must make the steps the ordinary step makes.

mod common;

use common::{leaf, max_abs, randn, set_grad};
use frugal_galore::{GaloreConfig, GaloreProjector};
use frugal_optim::{
    clip_grad_norm, clip_grad_norm_on_device, Adafactor, AdafactorConfig, AdamW, AdamWConfig,
    AdamWVariant, Optimizer,
};
use tch::{Kind, Tensor};

fn params(seed: i64) -> Vec<(String, Tensor)> {
    vec![
        ("w".to_string(), leaf(&randn(&[6, 5], seed))),
        ("b".to_string(), leaf(&randn(&[5], seed + 1))),
    ]
}

fn adamw(ps: &[(String, Tensor)], variant: AdamWVariant) -> AdamW {
    let ps = ps
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    AdamW::new(
        ps,
        AdamWConfig {
            weight_decay: 0.1,
            variant,
            ..AdamWConfig::default()
        },
    )
}

/// Sets step `t`'s gradients (large enough that clipping at 1 bites at every step).
fn grads(ps: &[(String, Tensor)], t: i64) {
    for (k, (_, p)) in ps.iter().enumerate() {
        set_grad(p, &(randn(&p.size(), 100 * t + k as i64) * 3.0));
    }
}

/// Guarantee: twelve steps at a changing learning rate, clipped, two eager and ten recorded,
/// end where twelve eager steps end (both AdamW variants, a decayed matrix and an undecayed
/// vector), and the step counts agree.
#[test]
fn recorded_adamw_steps_equal_eager_steps() {
    for variant in [AdamWVariant::Torch, AdamWVariant::Hf] {
        let (pe, pr) = (params(1), params(1));
        let (mut eager, mut rec) = (adamw(&pe, variant), adamw(&pr, variant));
        for t in 1..=12 {
            let lr = 1e-2 / t as f64;
            grads(&pe, t);
            grads(&pr, t);
            let tensors_e: Vec<Tensor> = pe.iter().map(|(_, p)| p.shallow_clone()).collect();
            let tensors_r: Vec<Tensor> = pr.iter().map(|(_, p)| p.shallow_clone()).collect();
            let norm_e = clip_grad_norm(&tensors_e, 1.0);
            eager.set_lr(lr);
            eager.step().unwrap();
            let norm_r = clip_grad_norm_on_device(&tensors_r, 1.0).unwrap();
            assert!(((norm_r.double_value(&[]) - norm_e) / norm_e).abs() < 1e-6);
            rec.set_lr(lr);
            if t <= 2 {
                rec.step().unwrap();
                continue;
            }
            let r = rec.recordable().expect("AdamW records its step");
            if t == 3 {
                r.begin_recording().unwrap();
            }
            r.prepare_recorded().unwrap();
            r.recorded_step().unwrap();
        }
        for ((name, a), (_, b)) in pe.iter().zip(&pr) {
            let d = max_abs(a, b);
            assert!(d < 1e-6, "{variant:?} {name}: recorded steps differ by {d}");
            assert!(d.is_finite());
        }
        let steps = |o: &AdamW| -> Vec<i64> {
            o.state_tensors()
                .iter()
                .filter(|(n, _)| n.ends_with(".step"))
                .map(|(_, t)| t.int64_value(&[]))
                .collect()
        };
        assert_eq!(steps(&eager), vec![12, 12]);
        assert_eq!(steps(&rec), vec![12, 12]);
        // The parameters moved: the comparison is not of two untouched copies.
        assert!(max_abs(&pr[0].1, &params(1)[0].1) > 1e-3);
    }
}

/// Guarantee: the device clipping leaves gradients below the limit untouched and scales the
/// others to it, as the host one.
#[test]
fn device_clipping_matches_host_clipping() {
    let ps = params(3);
    let tensors: Vec<Tensor> = ps.iter().map(|(_, p)| p.shallow_clone()).collect();
    grads(&ps, 1);
    let before = tensors[0].grad().copy();
    let n = clip_grad_norm_on_device(&tensors, 1e9)
        .unwrap()
        .double_value(&[]);
    assert_eq!(max_abs(&tensors[0].grad(), &before), 0.0, "below the limit");
    let clipped = clip_grad_norm_on_device(&tensors, 0.5)
        .unwrap()
        .double_value(&[]);
    assert!((clipped - n).abs() < 1e-5 * n);
    let after = clip_grad_norm_on_device(&tensors, 0.0)
        .unwrap()
        .double_value(&[]);
    assert!((after - 0.5).abs() < 1e-5, "clipped to 0.5, got {after}");
    let none = [Tensor::zeros([2], (Kind::Float, tch::Device::Cpu))];
    assert!(clip_grad_norm_on_device(&none, 1.0).is_none());
}

/// Guarantee: what cannot be recorded says so: a projected parameter, a parameter without
/// state, an optimizer without a recorded form, a step before recording began.
#[test]
fn unrecordable_steps_are_refused_by_name() {
    let ps = params(5);
    grads(&ps, 1);
    let mut fresh = adamw(&ps, AdamWVariant::Torch);
    let r = fresh.recordable().unwrap();
    let e = r.prepare_recorded().unwrap_err().to_string();
    assert!(e.contains("begin_recording"), "{e}");
    let e = r.begin_recording().unwrap_err().to_string();
    assert!(e.contains("'w'") && e.contains("no state"), "{e}");

    let ps2: Vec<(String, Tensor)> = ps
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    let c = GaloreConfig {
        rank: 2,
        update_proj_gap: 10,
        ..GaloreConfig::default()
    };
    let mut projected = adamw(&ps2, AdamWVariant::Torch)
        .with_projector("w", Box::new(GaloreProjector::new(c).unwrap()))
        .unwrap();
    projected.step().unwrap();
    let e = projected
        .recordable()
        .unwrap()
        .begin_recording()
        .unwrap_err()
        .to_string();
    assert!(e.contains("'w'") && e.contains("projector"), "{e}");

    let ps3 = ps
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    let mut ada = Adafactor::new(ps3, AdafactorConfig::default()).unwrap();
    assert!(ada.recordable().is_none());
}

/// Guarantee (GPU): the recorded step captured once in a CUDA graph (with the device clipping)
/// and replayed for ten steps at a changing learning rate ends where eager steps end.
#[test]
fn replayed_recorded_steps_equal_eager_steps_on_a_gpu() {
    if !tch::Cuda::is_available() {
        println!("skipped: no CUDA GPU");
        return;
    }
    let dev = tch::Device::Cuda(0);
    let on_gpu = |ps: Vec<(String, Tensor)>| -> Vec<(String, Tensor)> {
        ps.into_iter()
            .map(|(n, t)| (n, t.detach().to_device(dev).set_requires_grad(true)))
            .collect()
    };
    let (pe, pr) = (on_gpu(params(7)), on_gpu(params(7)));
    let (mut eager, mut rec) = (
        adamw(&pe, AdamWVariant::Torch),
        adamw(&pr, AdamWVariant::Torch),
    );
    let tensors_e: Vec<Tensor> = pe.iter().map(|(_, p)| p.shallow_clone()).collect();
    let tensors_r: Vec<Tensor> = pr.iter().map(|(_, p)| p.shallow_clone()).collect();
    // The gradients come in through these buffers, which the graph reads.
    let inputs: Vec<Tensor> = pr.iter().map(|(_, p)| p.zeros_like()).collect();
    let mut graph = None;
    for t in 1..=12 {
        let lr = 1e-2 / t as f64;
        let g: Vec<Tensor> = pe
            .iter()
            .enumerate()
            .map(|(k, (_, p))| (randn(&p.size(), 100 * t + k as i64) * 3.0).to_device(dev))
            .collect();
        for ((_, p), g) in pe.iter().zip(&g) {
            set_grad(p, g);
        }
        clip_grad_norm(&tensors_e, 1.0);
        eager.set_lr(lr);
        eager.step().unwrap();
        rec.set_lr(lr);
        for (i, g) in inputs.iter().zip(&g) {
            i.shallow_clone().copy_(g);
        }
        if t <= 2 {
            for ((_, p), g) in pr.iter().zip(&g) {
                set_grad(p, g);
            }
            clip_grad_norm(&tensors_r, 1.0);
            rec.step().unwrap();
            continue;
        }
        if graph.is_none() {
            rec.recordable().unwrap().begin_recording().unwrap();
            let mut gr = frugal_kernels::torch_cuda::CudaGraph::new(0).unwrap();
            tch::Cuda::synchronize(0);
            gr.capture(|| {
                for ((_, p), i) in pr.iter().zip(&inputs) {
                    p.grad().copy_(i);
                }
                clip_grad_norm_on_device(&tensors_r, 1.0);
                rec.recordable().unwrap().recorded_step().unwrap();
                Ok(())
            })
            .unwrap();
            graph = Some(gr);
        }
        rec.recordable().unwrap().prepare_recorded().unwrap();
        graph.as_mut().unwrap().replay().unwrap();
    }
    for ((name, a), (_, b)) in pe.iter().zip(&pr) {
        let d = max_abs(a, b);
        assert!(d < 1e-5, "{name}: replayed steps differ by {d}");
    }
}
