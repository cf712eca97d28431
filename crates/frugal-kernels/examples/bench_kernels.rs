//! `cargo xtask bench kernels` runs this (release build): Frugal's CUDA kernels against
//! libtorch on the same GPU, printing one JSON line. Without a GPU it prints a line that says so.
//!
//! - Matrix-vector products at batch 1 from packed weights: ternary and NF4 against cuBLAS bf16
//!   (`x.matmul(w.tr())` in bf16).
//! - The 8-bit block-wise AdamW step (the kernel plus the weight update) against libtorch's
//!   fused AdamW on f32 state of the same size.
//!
//! Times are medians over runs of `iters` launches each, after warm-up, with the device
//! synchronized around each run.

use std::time::Instant;

use frugal_kernels::adamw8bit::{StepConsts, BLOCK_SIZE};
use frugal_kernels::libtorch_ops::{fused_adamw, AdamWHyper};
use frugal_kernels::{cpu, Kernels};
use frugal_quant::dynamic::{Blockwise8, DynamicMap};
use serde_json::json;
use tch::{Device, Kind, Tensor};

/// Median seconds per call of `f`, over `runs` runs of `iters` calls.
fn median_s(runs: usize, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..iters.max(3) {
        f();
    }
    tch::Cuda::synchronize(0);
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            tch::Cuda::synchronize(0);
            t.elapsed().as_secs_f64() / iters as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if !tch::Cuda::is_available() {
        println!(
            "{}",
            json!({"skipped": "no CUDA GPU: libtorch sees no device, so the kernels cannot be timed"})
        );
        return;
    }
    let runs = env_num("BENCH_KERNELS_RUNS", 11);
    let iters = env_num("BENCH_KERNELS_ITERS", 50);
    let dev = Device::Cuda(0);
    let k = Kernels::global();
    let device_name = cudarc::driver::CudaContext::new(0)
        .and_then(|c| c.name())
        .unwrap_or_else(|e| format!("cuda:0 ({e:?})"));
    tch::manual_seed(0);

    // Flat keys "OUTxIN name", as the xtask's report reads them.
    let mut gemv = serde_json::Map::new();
    for (out, inp) in [(4096i64, 4096i64), (11008, 4096), (4096, 11008)] {
        let n = (out * inp) as usize;
        let x = Tensor::randn([inp], (Kind::Float, dev));
        let w_bf16 = Tensor::randn([out, inp], (Kind::BFloat16, dev));
        let x_bf16 = x.to_kind(Kind::BFloat16).reshape([1, inp]);
        let bf16 = median_s(runs, iters, || {
            let _ = x_bf16.matmul(&w_bf16.tr());
        });
        let values: Vec<i8> = (0..n)
            .map(|i| ((i * 2_654_435_761) % 3) as i8 - 1)
            .collect();
        let packed =
            Tensor::from_slice(&cpu::pack_ternary(&values).expect("ternary")).to_device(dev);
        let ternary = median_s(runs, iters, || {
            let _ = k
                .gemv_ternary_f32(&packed, 0.02, &x, out as usize)
                .expect("ternary gemv");
        });
        let codes: Vec<u8> = (0..n).map(|i| ((i * 2_654_435_761) % 16) as u8).collect();
        let nf4 = Tensor::from_slice(&cpu::pack_nf4_codes(&codes).expect("nf4")).to_device(dev);
        let absmax = Tensor::ones([(n / 64) as i64], (Kind::Float, dev)) * 0.05;
        let nf4_s = median_s(runs, iters, || {
            let _ = k
                .gemv_nf4_f32(&nf4, &absmax, &x, out as usize, 64)
                .expect("nf4 gemv");
        });
        let shape = format!("{out}x{inp}");
        for (key, value) in [
            ("bf16_ms", bf16 * 1e3),
            ("ternary_ms", ternary * 1e3),
            ("nf4_ms", nf4_s * 1e3),
            ("bf16_over_ternary", bf16 / ternary),
            ("bf16_over_nf4", bf16 / nf4_s),
        ] {
            gemv.insert(format!("{shape} {key}"), json!(value));
        }
    }

    let n = 4096 * 4096usize;
    let hyper = AdamWHyper {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        weight_decay: 0.01,
        eps: 1e-8,
    };
    let p = Tensor::randn([n as i64], (Kind::Float, dev));
    let g = Tensor::randn([n as i64], (Kind::Float, dev)) * 1e-2;
    let (m, v) = (p.zeros_like(), p.zeros_like());
    let step = Tensor::zeros([], (Kind::Float, dev));
    let fused = median_s(runs, iters, || {
        fused_adamw(&[&p], &[&g], &[&m], &[&v], &[&step], hyper).expect("fused AdamW");
    });
    let zeros = vec![0f32; n];
    let q_m = Blockwise8::quantize(&zeros, BLOCK_SIZE, DynamicMap::Signed);
    let q_v = Blockwise8::quantize(&zeros, BLOCK_SIZE, DynamicMap::Unsigned);
    let mut m_codes = Tensor::from_slice(&q_m.codes).to_device(dev);
    let mut m_absmax = Tensor::from_slice(&q_m.absmax).to_device(dev);
    let mut v_codes = Tensor::from_slice(&q_v.codes).to_device(dev);
    let mut v_absmax = Tensor::from_slice(&q_v.absmax).to_device(dev);
    let mut p8 = p.copy();
    let mut t = 0.0;
    let ours = median_s(runs, iters, || {
        t += 1.0;
        let c = StepConsts::new(hyper.lr, hyper.beta1, hyper.beta2, hyper.eps, t);
        let delta = k
            .adamw8bit_step_f32(
                &g,
                &mut m_codes,
                &mut m_absmax,
                &mut v_codes,
                &mut v_absmax,
                &c,
            )
            .expect("8-bit AdamW step");
        let _ = p8.g_mul_scalar_(1.0 - hyper.lr * hyper.weight_decay);
        let _ = p8.g_add_(&delta);
    });
    let out = json!({
        "device": device_name,
        "runs": runs,
        "iters": iters,
        "gemv": gemv,
        "adamw": {
            "values": n,
            "adamw8bit_ms": ours * 1e3,
            "fused_adamw_f32_ms": fused * 1e3,
            "adamw8bit_over_fused": ours / fused,
            "state_bytes_8bit": 2 * n + 2 * 4 * n.div_ceil(BLOCK_SIZE),
            "state_bytes_f32": 8 * n,
        },
    });
    println!("{out}");
}
