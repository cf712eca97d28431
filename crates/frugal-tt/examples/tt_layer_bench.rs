//! One configuration of `cargo xtask bench tt`, in its own process: forward + backward of one
//! linear layer on a `(tokens, in)` f32 input on the CPU, prints one JSON line.
//!
//! ```text
//! tt_layer_bench --impl dense|tt --in 768 --out 3072 --in-modes 12,8,8 --out-modes 12,16,16
//!                [--rank 30 --tokens 4096 --steps 10 --warmup 2 --threads 2 --seed 0]
//! ```
//!
//! - `dense`: tch's `nn::linear` with bias (torch's `Linear`: `y = x Wᵀ + b`);
//! - `tt`: [`frugal_tt::TtLinear`] with bias, f32 compute, the published initialisation.
//!
//! A step is `y = layer(x)`, `loss = mean(y * y)` and the gradients of the loss with respect to
//! the input and every parameter (`Tensor::run_backward`, as `torch.autograd.grad`: fresh
//! gradient tensors each step, nothing accumulated, as PyTorch with gradients set to None).
//! The idle baseline is the resident memory after libtorch has started (threads set, one small
//! product and its backward run), before the layer and the input are allocated; the peak is the
//! process's `VmHWM`.
//!
//! Output: `{"impl", "in", "out", "tokens", "params", "dense_params", "ranks", "forward_s",
//! "step_s" (mean), "step_median_s", "step_times_s", "baseline_rss_bytes", "peak_rss_bytes", "torch_threads", "loss"}`
//! with `params` the layer's weight parameters (TT cores, or the dense matrix), bias excluded.
//! Errors go to stderr with exit code 2.

use frugal_core::memory::{current_rss_bytes, peak_rss_bytes};
use frugal_tt::TtLinear;
use serde_json::json;
use std::time::Instant;
use tch::{nn, nn::Module, Device, Kind, Tensor};

const USAGE: &str = "usage: tt_layer_bench --impl dense|tt --in N --out N --in-modes A,B,.. \
                     --out-modes A,B,.. [--rank R --tokens T --steps S --warmup W --threads N \
                     --seed S]";

/// The parsed command line.
struct Args {
    imp: String,
    in_dim: i64,
    out_dim: i64,
    in_modes: Vec<i64>,
    out_modes: Vec<i64>,
    rank: i64,
    tokens: i64,
    steps: usize,
    warmup: usize,
    threads: i32,
    seed: i64,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        imp: String::new(),
        in_dim: 0,
        out_dim: 0,
        in_modes: Vec::new(),
        out_modes: Vec::new(),
        rank: 30,
        tokens: 4096,
        steps: 10,
        warmup: 2,
        threads: 2,
        seed: 0,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    let num = |name: &str, v: &str| -> Result<i64, String> {
        v.parse::<i64>()
            .map_err(|_| format!("{name} wants a whole number, got '{v}'"))
    };
    let list = |name: &str, v: &str| -> Result<Vec<i64>, String> {
        v.split(',').map(|s| num(name, s.trim())).collect()
    };
    while let Some(flag) = it.next() {
        let v = it
            .next()
            .ok_or_else(|| format!("{flag} wants a value"))?
            .as_str();
        match flag.as_str() {
            "--impl" => a.imp = v.to_string(),
            "--in" => a.in_dim = num(flag, v)?,
            "--out" => a.out_dim = num(flag, v)?,
            "--in-modes" => a.in_modes = list(flag, v)?,
            "--out-modes" => a.out_modes = list(flag, v)?,
            "--rank" => a.rank = num(flag, v)?,
            "--tokens" => a.tokens = num(flag, v)?,
            "--steps" => a.steps = num(flag, v)? as usize,
            "--warmup" => a.warmup = num(flag, v)? as usize,
            "--threads" => a.threads = num(flag, v)? as i32,
            "--seed" => a.seed = num(flag, v)?,
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    if !matches!(a.imp.as_str(), "dense" | "tt") {
        return Err(format!("--impl must be dense or tt, got '{}'", a.imp));
    }
    if a.in_dim < 1 || a.out_dim < 1 || a.tokens < 1 || a.steps < 1 || a.threads < 1 {
        return Err("--in, --out, --tokens, --steps and --threads must be at least 1".into());
    }
    Ok(a)
}

/// A layer under test: its forward and its trainable tensors.
enum Layer {
    Dense(nn::Linear),
    Tt(TtLinear),
}

impl Layer {
    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Layer::Dense(l) => l.forward(x),
            Layer::Tt(l) => l.forward(x),
        }
    }
}

fn run(a: &Args) -> Result<serde_json::Value, String> {
    tch::set_num_threads(a.threads);
    tch::manual_seed(a.seed);
    // Start libtorch (allocator, thread pool, autograd engine) before the baseline.
    let warm = Tensor::ones([64, 64], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    warm.matmul(&warm).sum(Kind::Float).backward();
    drop(warm);
    let baseline = current_rss_bytes();

    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let dense_params = a.in_dim * a.out_dim;
    let (layer, params, ranks) = match a.imp.as_str() {
        "dense" => {
            let l = nn::linear(&root / "fc", a.in_dim, a.out_dim, Default::default());
            (Layer::Dense(l), dense_params, Vec::new())
        }
        _ => {
            let l = TtLinear::new(
                &(&root / "fc"),
                a.in_dim,
                a.out_dim,
                &a.in_modes,
                &a.out_modes,
                a.rank,
                true,
                Kind::Float,
            )
            .map_err(|e| e.to_string())?;
            let (p, r) = (l.num_params(), l.ranks());
            (Layer::Tt(l), p, r)
        }
    };
    let vars = vs.trainable_variables();
    let x = Tensor::randn([a.tokens, a.in_dim], (Kind::Float, Device::Cpu)).set_requires_grad(true);

    let mut forward = Vec::new();
    let mut step = Vec::new();
    let mut loss_value = f64::NAN;
    // The input first, then every parameter: their gradients, fresh each step.
    let inputs: Vec<Tensor> = [x.shallow_clone()]
        .into_iter()
        .chain(vars.iter().map(Tensor::shallow_clone))
        .collect();
    for i in 0..a.warmup + a.steps {
        let t0 = Instant::now();
        let y = layer.forward(&x);
        let loss = (&y * &y).mean(Kind::Float);
        let t1 = t0.elapsed().as_secs_f64();
        let grads = Tensor::run_backward(&[&loss], &inputs, false, false);
        let t2 = t0.elapsed().as_secs_f64();
        loss_value = loss.double_value(&[]);
        drop((y, loss, grads));
        if i >= a.warmup {
            forward.push(t1);
            step.push(t2);
        }
        eprintln!(
            "tt_layer_bench {} {}->{} step {}/{}{}: {:.1} ms",
            a.imp,
            a.in_dim,
            a.out_dim,
            i + 1,
            a.warmup + a.steps,
            if i < a.warmup { " (warmup)" } else { "" },
            t2 * 1e3
        );
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let mut sorted = step.clone();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = (sorted[(n - 1) / 2] + sorted[n / 2]) / 2.0;
    Ok(json!({
        "impl": a.imp,
        "in": a.in_dim,
        "out": a.out_dim,
        "in_modes": a.in_modes,
        "out_modes": a.out_modes,
        "rank": a.rank,
        "tokens": a.tokens,
        "params": params,
        "dense_params": dense_params,
        "ranks": ranks,
        "forward_s": mean(&forward),
        "step_s": mean(&step),
        "step_median_s": median,
        "step_times_s": step,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak_rss_bytes(),
        "torch_threads": tch::get_num_threads(),
        "steps": a.steps,
        "warmup": a.warmup,
        "loss": loss_value,
    }))
}

fn main() {
    let out = parse().and_then(|a| run(&a));
    match out {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("tt_layer_bench: {e}; {USAGE}");
            std::process::exit(2);
        }
    }
}
