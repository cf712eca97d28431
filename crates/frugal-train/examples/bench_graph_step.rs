//! `cargo xtask bench kernels` runs this (release build) after the kernels' example: one
//! training step of an encoder at batch 1 (masked-LM loss, backward, clipping, AdamW), eager
//! against replayed as a CUDA graph (`train.cuda_graph`, `frugal_train::cuda_graph`), for the
//! 6-layer encoder of `configs/encoder-6-comera.toml` with its tensor-train linear layers
//! (rank 30, order 3) and with dense ones. Prints one JSON line; without a GPU, a line that
//! says so.
//!
//! A step is what the trainer does per step: refill the batch, the step, read the loss back.
//! Times are medians over runs of `iters` steps, after warm-up.

use frugal_models::encoder::EncoderConfig;
use frugal_models::LinearKind;
use frugal_optim::clip_grad_norm;
use frugal_train::config::Config;
use frugal_train::cuda_graph::{recordable_optimizer, StepGraph};
use frugal_train::encoder_model::{micro_loss, EncoderModel};
use serde_json::json;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

const SEQ_LEN: i64 = 128;
const VOCAB: i64 = 4096;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Median seconds per step of `f`, over `runs` runs of `iters` steps.
fn median_s(runs: usize, iters: usize, mut f: impl FnMut()) -> f64 {
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

/// A masked-LM batch of one sequence: random ids, 15% of positions as targets.
fn batch(seed: i64, dev: Device) -> [Tensor; 2] {
    tch::manual_seed(seed);
    let ids = Tensor::randint(VOCAB, [1, SEQ_LEN], (Kind::Int64, dev));
    let keep = Tensor::rand([1, SEQ_LEN], (Kind::Float, dev)).lt(0.15);
    let labels = ids.where_self(&keep, &Tensor::full([1, SEQ_LEN], -100, (Kind::Int64, dev)));
    [ids, labels]
}

/// Eager and replayed step times (ms) of the encoder with `linear` layers.
fn measure(linear: LinearKind, runs: usize, iters: usize) -> serde_json::Value {
    let dev = Device::Cuda(0);
    let mut cfg = Config::default();
    cfg.model.kind = frugal_train::config::ModelKind::Encoder;
    cfg.model.size = "encoder-6".into();
    cfg.model.linear = linear;
    cfg.train.max_grad_norm = 1.0;
    let shape = EncoderConfig {
        vocab_size: VOCAB,
        ..EncoderConfig::preset("encoder-6").expect("preset")
    };
    let m = EncoderModel::new(&cfg.model_build(), &shape, None, dev).expect("model");
    let params = frugal_models::weights::named_variables(&m.vs);
    let tensors: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
    let n_params: i64 = tensors.iter().map(|t| t.numel() as i64).sum();
    let mut opt = frugal_train::optimizers::build(&cfg.optim, cfg.train.seed, params, 1e-4)
        .expect("optimizer");
    let batches: Vec<[Tensor; 2]> = (0..8).map(|s| batch(s, dev)).collect();
    let mut k = 0usize;
    let mut next = || {
        k += 1;
        &batches[k % batches.len()]
    };
    let eager_step = |opt: &mut dyn frugal_optim::Optimizer, b: &[Tensor; 2]| {
        let (loss, _, _) = micro_loss(&m, b, false, false);
        loss.backward();
        clip_grad_norm(&tensors, 1.0);
        opt.step().expect("step");
        opt.zero_grad();
        loss.double_value(&[])
    };
    for _ in 0..5 {
        eager_step(opt.as_mut(), next());
    }
    tch::Cuda::synchronize(0);
    let eager = median_s(runs, iters, || {
        eager_step(opt.as_mut(), next());
    });
    assert!(recordable_optimizer(opt.as_mut(), cfg.optim.is_galore(), false).expect("recording"));
    let b = next();
    let mut graph = StepGraph::capture(&tensors, &[&b[0], &b[1]], Some(opt.as_mut()), |inputs| {
        let (loss, _, _) = micro_loss(&m, inputs, false, true);
        loss.backward();
        let mut out = vec![loss.detach()];
        out.extend(frugal_optim::clip_grad_norm_on_device(&tensors, 1.0));
        Ok(out)
    })
    .expect("capture");
    let mut replay = |opt: &mut dyn frugal_optim::Optimizer, b: &[Tensor; 2]| {
        graph.prepare(opt).expect("prepare");
        let out = graph.replay(&[&b[0], &b[1]]).expect("replay");
        out[0].double_value(&[])
    };
    for _ in 0..5 {
        replay(opt.as_mut(), next());
    }
    tch::Cuda::synchronize(0);
    let replayed = median_s(runs, iters, || {
        replay(opt.as_mut(), next());
    });
    json!({
        "parameters": n_params,
        "eager_ms": eager * 1e3,
        "graph_ms": replayed * 1e3,
        "eager_over_graph": eager / replayed,
    })
}

fn main() {
    if !tch::Cuda::is_available() {
        println!(
            "{}",
            json!({"skipped": "no CUDA GPU: libtorch sees no device, so the steps cannot be timed"})
        );
        return;
    }
    let runs = env_num("BENCH_KERNELS_RUNS", 11);
    let iters = env_num("BENCH_KERNELS_ITERS", 50).min(20);
    let tt = measure(
        LinearKind::Tt {
            rank: 30,
            order: 3,
            eps: None,
        },
        runs,
        iters,
    );
    let dense = measure(LinearKind::Dense, runs, iters);
    println!(
        "{}",
        json!({"batch": 1, "seq_len": SEQ_LEN, "tt_encoder": tt, "dense_encoder": dense})
    );
}
