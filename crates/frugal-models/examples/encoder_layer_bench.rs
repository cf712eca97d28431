//! One configuration of `cargo xtask bench tt --parts encoder-layer`, in its own process:
//! forward + backward of one post-LN encoder layer (`frugal_models::encoder`, BERT's block) on a
//! `(batch, seq_len, d)` f32 input on the CPU, every linear layer of the block dense or
//! tensor-train; prints one JSON line.
//!
//! ```text
//! encoder_layer_bench --impl dense|tt [--rank 30 --order 3 --batch 32 --seq-len 128 --d 768
//!                     --heads 12 --ffn 3072 --steps 10 --warmup 2 --threads 2 --seed 0]
//! ```
//!
//! The layer is block 0 of an [`Encoder`] built with one block (`LinearKind::Dense` or
//! `LinearKind::Tt { rank, order, eps: None }` for its six projections: query, key, value,
//! attention output, intermediate, output; biases and LayerNorms as in the model); the encoder's
//! embeddings (a 2-token vocabulary, `seq_len` positions) are built with it but take no part.
//! No attention mask (no padding). A step is `y = layer(x)`, `loss = mean(y * y)` and the
//! gradients of the loss with respect to the input and every parameter of the block
//! (`Tensor::run_backward`: fresh gradient tensors each step, nothing accumulated). The idle
//! baseline is the resident memory after libtorch has started (threads set, one small product
//! and its backward run), before the layer and the input are allocated; the peak is the process's
//! `VmHWM`.
//!
//! Output: `{"impl", "rank", "order", "batch", "seq_len", "d", "heads", "ffn", "params"
//! (weights of the six projections: TT cores, or the dense matrices), "dense_params" (the same
//! for dense), "rank_var_params", "layer_params" (every parameter of the block: biases,
//! LayerNorms and rank variables included), "ranks" (per projection), "forward_s", "step_s"
//! (mean), "step_median_s", "step_times_s", "baseline_rss_bytes", "peak_rss_bytes",
//! "torch_threads", "loss"}`. Errors go to stderr with exit code 2.

use frugal_core::memory::{current_rss_bytes, peak_rss_bytes};
use frugal_models::encoder::{Encoder, EncoderConfig, LAYER_LINEARS};
use frugal_models::{EmbeddingKind, LinearKind};
use serde_json::json;
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

const USAGE: &str = "usage: encoder_layer_bench --impl dense|tt [--rank R --order N --batch B \
                     --seq-len T --d D --heads H --ffn F --steps S --warmup W --threads N \
                     --seed S]";

/// The parsed command line.
struct Args {
    imp: String,
    rank: i64,
    order: i64,
    batch: i64,
    seq_len: i64,
    d: i64,
    heads: i64,
    ffn: i64,
    steps: usize,
    warmup: usize,
    threads: i32,
    seed: i64,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        imp: String::new(),
        rank: 30,
        order: 3,
        batch: 32,
        seq_len: 128,
        d: 768,
        heads: 12,
        ffn: 3072,
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
    while let Some(flag) = it.next() {
        let v = it
            .next()
            .ok_or_else(|| format!("{flag} wants a value"))?
            .as_str();
        match flag.as_str() {
            "--impl" => a.imp = v.to_string(),
            "--rank" => a.rank = num(flag, v)?,
            "--order" => a.order = num(flag, v)?,
            "--batch" => a.batch = num(flag, v)?,
            "--seq-len" => a.seq_len = num(flag, v)?,
            "--d" => a.d = num(flag, v)?,
            "--heads" => a.heads = num(flag, v)?,
            "--ffn" => a.ffn = num(flag, v)?,
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
    if [a.batch, a.seq_len, a.d, a.heads, a.ffn, a.rank]
        .iter()
        .any(|&v| v < 1)
        || a.steps < 1
        || a.threads < 1
        || a.order < 2
    {
        return Err(
            "--batch, --seq-len, --d, --heads, --ffn, --rank, --steps and --threads must \
                    be at least 1, --order at least 2"
                .into(),
        );
    }
    Ok(a)
}

/// The projection of the block a variable belongs to (`attention.self.query`...), if any.
fn projection(name: &str) -> Option<&'static str> {
    LAYER_LINEARS
        .iter()
        .copied()
        .find(|l| name.contains(&format!(".{l}.")))
}

fn run(a: &Args) -> Result<serde_json::Value, String> {
    tch::set_num_threads(a.threads);
    tch::manual_seed(a.seed);
    // Start libtorch (allocator, thread pool, autograd engine) before the baseline.
    let warm = Tensor::ones([64, 64], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    warm.matmul(&warm).sum(Kind::Float).backward();
    drop(warm);
    let baseline = current_rss_bytes();

    let kind = match a.imp.as_str() {
        "dense" => LinearKind::Dense,
        _ => LinearKind::Tt {
            rank: a.rank,
            order: a.order as usize,
            eps: None,
        },
    };
    let cfg = EncoderConfig::new(2, a.d, 1, a.heads, a.ffn, a.seq_len);
    let vs = nn::VarStore::new(Device::Cpu);
    let encoder = Encoder::new(&vs.root(), &cfg, &kind, &EmbeddingKind::Dense, Kind::Float)
        .map_err(|e| e.to_string())?;
    let layer = &encoder.layers[0];
    let ranks: serde_json::Map<String, serde_json::Value> = layer
        .linears()
        .iter()
        .filter_map(|(n, l)| l.tt().map(|t| ((*n).to_string(), json!(t.ranks()))))
        .collect();

    // The block's variables: the gradients taken, and the parameter counts.
    let mut vars: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(n, _)| n.starts_with("encoder.layer."))
        .collect();
    vars.sort_by(|x, y| x.0.cmp(&y.0));
    let numel = |t: &Tensor| t.numel() as i64;
    let layer_params: i64 = vars.iter().map(|(_, t)| numel(t)).sum();
    let is_weight =
        |n: &str| projection(n).is_some() && !n.ends_with(".bias") && !n.contains(".rank_vars.");
    let params: i64 = vars
        .iter()
        .filter(|(n, _)| is_weight(n))
        .map(|(_, t)| numel(t))
        .sum();
    let rank_var_params: i64 = vars
        .iter()
        .filter(|(n, _)| n.contains(".rank_vars."))
        .map(|(_, t)| numel(t))
        .sum();
    let dense_params = 4 * a.d * a.d + 2 * a.d * a.ffn;

    let x = Tensor::randn([a.batch, a.seq_len, a.d], (Kind::Float, Device::Cpu))
        .set_requires_grad(true);
    let inputs: Vec<Tensor> = [x.shallow_clone()]
        .into_iter()
        .chain(
            vars.iter()
                .filter(|(_, t)| t.requires_grad())
                .map(|(_, t)| t.shallow_clone()),
        )
        .collect();
    let mut forward = Vec::new();
    let mut step = Vec::new();
    let mut loss_value = f64::NAN;
    for i in 0..a.warmup + a.steps {
        let t0 = Instant::now();
        let y = layer.forward(&x, None);
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
            "encoder_layer_bench {} step {}/{}{}: {:.1} ms",
            a.imp,
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
        "rank": a.rank,
        "order": a.order,
        "batch": a.batch,
        "seq_len": a.seq_len,
        "d": a.d,
        "heads": a.heads,
        "ffn": a.ffn,
        "params": params,
        "dense_params": dense_params,
        "rank_var_params": rank_var_params,
        "layer_params": layer_params,
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
            eprintln!("encoder_layer_bench: {e}; {USAGE}");
            std::process::exit(2);
        }
    }
}
