//! Timings for `cargo xtask bench quant`: packed-weight products (NF4, int4, int8, ternary,
//! and NF4 and int4 computed in bf16) against libtorch's dense f32 and bf16 `x.matmul(w.tr())`, and quantize throughput; prints
//! one JSON line.
//!
//! Output: `{"simd", "rayon_threads", "torch_threads", "runs", "warmup", "time_s": {"OUTxIN bB
//! NAME": median seconds}, "quantize_gbps": {NAME: GB/s of f32 input}}` with NAME one of nf4,
//! int4, int8, ternary, nf4_bf16, int4_bf16 (the bf16-compute products, `"bf16"` true when
//! they ran their AVX512-BF16 kernels), torch_f32, torch_bf16.
//!
//! Environment: `BENCH_QUANT_SHAPES` (`OUTxIN,...`, default `4096x4096,4096x11008`),
//! `BENCH_QUANT_BATCHES` (default `1,8`), `BENCH_QUANT_RUNS` (timed runs, default 10),
//! `BENCH_QUANT_WARMUP` (default 2).

use frugal_quant::fourbit::{FourBit, FourBitConfig, FourBitKind};
use frugal_quant::int4::Int4Gptq;
use frugal_quant::int8::Int8Rowwise;
use frugal_quant::matmul;
use frugal_quant::ternary::Ternary;
use serde_json::{json, Map};
use std::time::Instant;
use tch::{Kind, Tensor};

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Median seconds of `runs` calls of `f` after `warmup` untimed ones.
fn median_s(warmup: usize, runs: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        f();
    }
    let mut t: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Normal-ish values (sum of four uniforms) times 0.02, from a 64-bit LCG.
fn weights(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut u = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    (0..n).map(|_| (u() + u() + u() + u()) * 0.035).collect()
}

fn main() {
    let shapes = env_list("BENCH_QUANT_SHAPES", "4096x4096,4096x11008");
    let batches: Vec<usize> = env_list("BENCH_QUANT_BATCHES", "1,8")
        .iter()
        .map(|b| b.parse().expect("batch"))
        .collect();
    let runs = env_num("BENCH_QUANT_RUNS", 10);
    let warmup = env_num("BENCH_QUANT_WARMUP", 2);
    let _guard = tch::no_grad_guard();
    let mut results = Map::new();
    let mut quantize = Map::new();
    for (si, shape) in shapes.iter().enumerate() {
        let (o, i) = shape.split_once('x').expect("shape OUTxIN");
        let (rows, cols): (usize, usize) = (o.parse().unwrap(), i.parse().unwrap());
        let w = weights(rows * cols, si as u64);
        let gb = (w.len() * 4) as f64 / 1e9;
        // Quantize throughput, measured on the first shape only (median of 3).
        let mut qt = |name: &str, f: &mut dyn FnMut()| {
            if si == 0 {
                quantize.insert(name.into(), json!(gb / median_s(0, 3, f)));
            }
        };
        let cfg = FourBitConfig {
            kind: FourBitKind::Nf4,
            block_size: 64,
            double_quant: false,
        };
        let shp = [rows as i64, cols as i64];
        let nf4 = FourBit::quantize(&w, &shp, &cfg).unwrap();
        qt("nf4", &mut || {
            drop(FourBit::quantize(&w, &shp, &cfg).unwrap())
        });
        let int4 = Int4Gptq::quantize(&w, rows, cols, 128).unwrap();
        qt("int4", &mut || {
            drop(Int4Gptq::quantize(&w, rows, cols, 128).unwrap())
        });
        let int8 = Int8Rowwise::quantize(&w, rows, cols).unwrap();
        qt("int8", &mut || {
            drop(Int8Rowwise::quantize(&w, rows, cols).unwrap())
        });
        let ter = Ternary::quantize(&w, rows, cols, None).unwrap();
        qt("ternary", &mut || {
            drop(Ternary::quantize(&w, rows, cols, None).unwrap())
        });

        let wt = Tensor::from_slice(&w).reshape([rows as i64, cols as i64]);
        let wt16 = wt.to_kind(Kind::BFloat16);
        for &batch in &batches {
            let x = weights(batch * cols, 100 + batch as u64);
            let xt = Tensor::from_slice(&x).reshape([batch as i64, cols as i64]);
            let xt16 = xt.to_kind(Kind::BFloat16);
            let mut t = |name: &str, f: &mut dyn FnMut()| {
                let key = format!("{rows}x{cols} b{batch} {name}");
                results.insert(key, json!(median_s(warmup, runs, f)));
            };
            t("nf4", &mut || {
                drop(matmul::nf4_matmul(&nf4, &x, batch).unwrap())
            });
            t("int4", &mut || {
                drop(matmul::int4_matmul(&int4, &x, batch).unwrap())
            });
            t("nf4_bf16", &mut || {
                drop(matmul::nf4_matmul_bf16(&nf4, &x, batch).unwrap())
            });
            t("int4_bf16", &mut || {
                drop(matmul::int4_matmul_bf16(&int4, &x, batch).unwrap())
            });
            t("int8", &mut || {
                drop(matmul::int8_matmul(&int8, &x, batch).unwrap())
            });
            t("ternary", &mut || {
                drop(matmul::ternary_matmul(&ter, &x, batch).unwrap())
            });
            t("torch_f32", &mut || drop(xt.matmul(&wt.tr())));
            t("torch_bf16", &mut || drop(xt16.matmul(&wt16.tr())));
        }
    }
    let out = json!({
        "simd": matmul::simd_available(),
        "bf16": matmul::bf16_available(),
        "rayon_threads": rayon_threads(),
        "torch_threads": tch::get_num_threads(),
        "runs": runs,
        "warmup": warmup,
        "time_s": results,
        "quantize_gbps": quantize,
    });
    println!("{out}");
}

/// Threads rayon uses (`RAYON_NUM_THREADS` or the CPU count).
fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
