//! 8-bit AdamW against the f32 AdamW (bitsandbytes' own test tolerances) and against
//! bitsandbytes' `AdamW8bit` on the CPU (fixture from `fixtures/gen_optim.py`).

mod common;

use common::{leaf, randn, set_grad};
use frugal_core::safetensors_io::SafetensorsFile;
use frugal_optim::{AdamW, AdamW8bit, AdamW8bitConfig, AdamWConfig, Optimizer};
use frugal_quant::dynamic::{Blockwise8, DynamicMap};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The fixture's integer-hash gradient of step `t` (see `grad8` in gen_optim.py), with the same
/// tensor operations so that it is bit-identical.
fn grad8(shape: &[i64], t: i64) -> Tensor {
    let n: i64 = shape.iter().product();
    let i = Tensor::arange(n, (Kind::Int64, Device::Cpu));
    let h = (&i * 7919 + (t + 1) * 104729 + (&i * &i).remainder(997) * (t + 3)).remainder(2001);
    let g = (h - 1000).to_kind(Kind::Float) / 1000.0;
    let scale = if t < 25 { 0.01 } else { 0.5 };
    (g * scale).reshape(shape)
}

/// (mean |a - b|, mean |a - b| / (|b| + 1e-9)).
fn errors(a: &Tensor, b: &Tensor) -> (f64, f64) {
    let err = (a - b).abs();
    let rel = &err / (b.abs() + 1e-9);
    (
        err.mean(Kind::Float).double_value(&[]),
        rel.mean(Kind::Float).double_value(&[]),
    )
}

/// The 8-bit optimizer's moments of `name`, dequantized.
fn dequantized(opt: &AdamW8bit, name: &str, which: &str, map: DynamicMap) -> Tensor {
    let st = opt.state_tensors();
    let get = |n: String| st.iter().find(|(k, _)| *k == n).unwrap().1.shallow_clone();
    let codes = get(format!("{name}.{which}.codes"));
    let q = Blockwise8 {
        codes: Vec::<u8>::try_from(&codes.view([-1])).unwrap(),
        absmax: Vec::<f32>::try_from(&get(format!("{name}.{which}.absmax"))).unwrap(),
        block_size: frugal_optim::BLOCK_SIZE,
        map,
    };
    Tensor::from_slice(&q.dequantize()).reshape(codes.size())
}

/// Guarantee: 8-bit AdamW stays within bitsandbytes' own tolerances of the f32 AdamW (mean abs
/// 6e-5, mean rel 6e-4 on the parameters) at each of 50 steps. As in bitsandbytes' test, after
/// every step the two are re-synchronized (the 8-bit parameters take the f32 ones, the f32
/// moments take the dequantized 8-bit ones), since the trajectories drift apart over time.
#[test]
fn fifty_steps_track_f32_adamw() {
    let dir = tempfile::tempdir().unwrap();
    let shape = [64i64, 96];
    let init = randn(&shape, 7) * 0.1;
    let small_init = randn(&[50], 8) * 0.1;
    let (a, sa) = (leaf(&init), leaf(&small_init));
    let (b, sb) = (leaf(&init), leaf(&small_init));
    let wd = 0.01;
    let mut f32_opt = AdamW::new(
        vec![
            ("w".into(), a.shallow_clone()),
            ("s".into(), sa.shallow_clone()),
        ],
        AdamWConfig {
            weight_decay: wd,
            ..Default::default()
        },
    );
    let mut q_opt = AdamW8bit::new(
        vec![
            ("w".into(), b.shallow_clone()),
            ("s".into(), sb.shallow_clone()),
        ],
        AdamW8bitConfig {
            weight_decay: wd,
            ..Default::default()
        },
    );
    let mut worst = (0.0f64, 0.0f64);
    for t in 0..50 {
        let g = randn(&shape, 100 + t) * 0.01;
        let gs = randn(&[50], 500 + t) * 0.01;
        set_grad(&a, &g);
        set_grad(&b, &g);
        set_grad(&sa, &gs);
        set_grad(&sb, &gs);
        Optimizer::step(&mut f32_opt).unwrap();
        q_opt.step().unwrap();
        let (abs, rel) = errors(&b, &a);
        worst = (worst.0.max(abs), worst.1.max(rel));
        assert!(
            abs <= 6e-5 && rel <= 6e-4,
            "step {}: mean abs {abs:e}, mean rel {rel:e}",
            t + 1
        );
        assert!(common::max_abs(&sa, &sb) <= 1e-6, "f32-state tensors agree");
        {
            tch::no_grad(|| {
                b.detach().copy_(&a);
                sb.detach().copy_(&sa);
            });
            let mut st: Vec<(String, Tensor)> = f32_opt.state_tensors();
            for (n, x) in st.iter_mut() {
                if n == "w.exp_avg" {
                    *x = dequantized(&q_opt, "w", "exp_avg", DynamicMap::Signed);
                } else if n == "w.exp_avg_sq" {
                    *x = dequantized(&q_opt, "w", "exp_avg_sq", DynamicMap::Unsigned);
                }
            }
            let path = dir.path().join("sync.safetensors");
            frugal_core::safetensors_io::save(&path, &st, None).unwrap();
            f32_opt.load(&path).unwrap();
        }
    }
    eprintln!(
        "8-bit vs f32, worst of 50 steps: mean abs {:e}, mean rel {:e}",
        worst.0, worst.1
    );
    assert!(common::max_abs(&a, &init) > 1e-2, "parameters barely moved");
    // Equality would mean no quantization happened.
    assert!(worst.0 > 0.0);
    let st: Vec<(String, Tensor)> = q_opt.state_tensors();
    let codes = st
        .iter()
        .find(|(n, _)| n == "w.exp_avg.codes")
        .expect("8-bit state")
        .1
        .kind();
    assert_eq!(codes, Kind::Uint8);
    assert!(
        st.iter().any(|(n, _)| n == "s.exp_avg"),
        "small tensors keep f32 state"
    );
    // 2 x 6144 codes + 2 x 24 absmax + 2 x 50 f32 values.
    assert_eq!(q_opt.state_bytes(), 2 * 6144 + 2 * 24 * 4 + 2 * 50 * 4);
}

/// Guarantee: the trajectory follows bitsandbytes' AdamW8bit on the CPU (codes can differ by
/// a step where their approximate CPU quantizer picks a neighbour), within the same tolerances;
/// the f32-state path (a 100-element tensor) matches it within 1e-6.
#[test]
fn follows_bitsandbytes_adamw8bit() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/adamw8bit_bnb.safetensors");
    let fx = SafetensorsFile::open(&path).unwrap();
    let get = |n: &str| fx.tensor(n, Device::Cpu).unwrap();
    let meta = fx.metadata();
    let f = |k: &str| meta[k].parse::<f64>().unwrap();
    let config = AdamW8bitConfig {
        lr: f("lr"),
        beta1: f("beta1"),
        beta2: f("beta2"),
        eps: f("eps"),
        weight_decay: f("weight_decay"),
        ..Default::default()
    };
    let w = leaf(&get("w.init"));
    let b = leaf(&get("b.init"));
    assert!(
        w.equal(&(grad8(&[48, 96], 1000) * 2.0)),
        "the gradient formula matches Python's"
    );
    let mut opt = AdamW8bit::new(
        vec![
            ("w".into(), w.shallow_clone()),
            ("b".into(), b.shallow_clone()),
        ],
        config,
    );
    for t in 0..50 {
        set_grad(&w, &grad8(&[48, 96], t));
        set_grad(&b, &grad8(&[100], t));
        opt.step().unwrap();
        if t + 1 == 25 || t + 1 == 50 {
            let want = get(&format!("w.step{}", t + 1));
            let (abs, rel) = errors(&w, &want);
            eprintln!(
                "vs bitsandbytes after {} steps: mean abs {abs:e}, mean rel {rel:e}",
                t + 1
            );
            assert!(
                abs <= 6e-5 && rel <= 6e-4,
                "step {}: {abs:e} / {rel:e}",
                t + 1
            );
            let db = common::max_abs(&b, &get(&format!("b.step{}", t + 1)));
            assert!(db <= 1e-6, "f32-state tensor: {db:e}");
        }
    }
    assert!(
        common::max_abs(&w, &get("w.init")) > 1e-2,
        "parameters barely moved"
    );
}

/// Guarantee (GPU): parameters on a GPU keep their 8-bit moments there, stepped by the CUDA
/// kernel, and follow the CPU optimizer's trajectory: the same codes and absmax values, the
/// weights within 1e-6; the state saves in the CPU's checkpoint names.
#[test]
fn gpu_state_follows_the_cpu_optimizer() {
    if !tch::Cuda::is_available() {
        println!("skipped: no CUDA GPU");
        return;
    }
    let dev = Device::Cuda(0);
    let config = AdamW8bitConfig {
        lr: 1e-2,
        weight_decay: 0.1,
        ..Default::default()
    };
    let init = randn(&[48, 96], 11) * 0.1;
    let cpu_w = leaf(&init);
    let gpu_w = init.to_device(dev).set_requires_grad(true);
    let mut cpu = AdamW8bit::new(vec![("w".into(), cpu_w.shallow_clone())], config);
    let mut gpu = AdamW8bit::new(vec![("w".into(), gpu_w.shallow_clone())], config);
    for t in 0..5 {
        let g = grad8(&[48, 96], t);
        set_grad(&cpu_w, &g);
        set_grad(&gpu_w, &g.to_device(dev));
        cpu.step().unwrap();
        gpu.step().unwrap();
        let d = (&cpu_w - gpu_w.to_device(Device::Cpu))
            .abs()
            .max()
            .double_value(&[]);
        assert!(d < 1e-6, "step {t}: weights differ by {d}");
    }
    let (a, b) = (cpu.state_tensors(), gpu.state_tensors());
    for (name, t) in &a {
        let other = &b.iter().find(|(n, _)| n == name).expect("same names").1;
        assert!(
            t.to_device(Device::Cpu)
                .equal(&other.to_device(Device::Cpu)),
            "{name} differs"
        );
    }
}
