//! One model of `cargo xtask bench matmulfree --parts generate`, in its own process: greedy
//! generation at batch 1 on the CPU from a model with random (seeded) weights; prints one JSON
//! line.
//!
//! ```text
//! generate_bench --model packed|f32|llama [--tokens 256 --prompt 16 --size 370m|350m|tiny
//!                --seed 0 --threads N]
//! ```
//!
//! Models:
//! - `packed`: the MatMul-free LM ([`HgrnBit`]) with `LinearKind::PackedBitLinear` (every
//!   projection and the head a packed ternary weight, products by the ternary kernel on int8
//!   activations), generating with its recurrent [`State`]; on the CPU its forward pass is
//!   `frugal_models::hgrn_bit_cpu` (plain loops around the kernel, no libtorch operation in
//!   the blocks);
//! - `f32`: the same shape with `LinearKind::Dense` (plain f32 matmuls; the head dense too);
//! - `llama`: a LLaMA ([`Llama`], `LinearKind::Dense`, f32) with its [`KvCache`].
//!
//! `--size` is the preset (`370m` for the HGRN-bit models, `350m` for the LLaMA by default; both
//! know `tiny`). The prompt is `--prompt` random token ids (seeded); it runs in one forward pass
//! with the state or cache (`prompt_s`, which includes picking the first new token). Then
//! `--tokens` decoding steps, each one forward pass of the last token with the state or cache and
//! an argmax over its logits (greedy), all under `tch::no_grad`: `tokens_per_s` is `--tokens`
//! over their total time (`decode_s`). libtorch runs on its default thread count (the machine's
//! cores) unless `--threads` says otherwise; the ternary kernel runs on rayon's pool (by default
//! one thread per core).
//!
//! Bytes: `model_bytes` is the bytes of every variable of the model (embeddings, norms, gains,
//! dense weights) plus the packed weights as stored (`QuantizedWeight::stored_bytes` of every
//! layer with a quantized weight); `matrix_bytes` is the bytes of the projection matrices of the
//! blocks and the output head (`matrix_params` parameters): packed ternary bytes for `packed`,
//! f32 bytes for the others (`matrix_f32_bytes` is always 4 x `matrix_params`). `state_bytes` is
//! the recurrent state (`State::bytes`) or the KV cache at the end (computed from
//! `KvCache::len()` and the shape: 2 x layers x batch x positions x d x 4 bytes, since the cache
//! tells no bytes). `baseline_rss_bytes` is the resident memory after libtorch has started (one
//! small product run), before the model is built; `model_rss_bytes` after it is built;
//! `peak_rss_bytes` the process's peak (`VmHWM`, else `getrusage`'s `ru_maxrss`).
//!
//! Output: `{"model", "size", "seed", "tokens", "prompt", "params", "prompt_s", "decode_s",
//! "tokens_per_s", "ms_per_token_median", "model_bytes", "variable_bytes", "quantized_bytes",
//! "matrix_params", "matrix_bytes", "matrix_f32_bytes", "state_bytes", "state_positions",
//! "baseline_rss_bytes", "model_rss_bytes", "peak_rss_bytes", "torch_threads", "kernel_threads",
//! "generated"}` (`generated`: the first 16 new ids). On an error: `{"error": "..."}` and exit
//! code 2.

use frugal_core::memory::{current_rss_bytes, peak_rss_bytes, tensor_bytes};
use frugal_models::hgrn_bit::{HgrnBit, HgrnBitConfig, State};
use frugal_models::linear::Linear;
use frugal_models::llama::{KvCache, Llama, LlamaConfig};
use frugal_models::{EmbeddingKind, LinearKind};
use serde_json::json;
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

const USAGE: &str = "usage: generate_bench --model packed|f32|llama [--tokens N --prompt N \
                     --size PRESET --seed S --threads N]";

/// The parsed command line.
struct Args {
    model: String,
    tokens: i64,
    prompt: i64,
    size: Option<String>,
    seed: i64,
    threads: Option<i32>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        model: String::new(),
        tokens: 256,
        prompt: 16,
        size: None,
        seed: 0,
        threads: None,
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
            "--model" => a.model = v.to_string(),
            "--tokens" => a.tokens = num(flag, v)?,
            "--prompt" => a.prompt = num(flag, v)?,
            "--size" => a.size = Some(v.to_string()),
            "--seed" => a.seed = num(flag, v)?,
            "--threads" => a.threads = Some(num(flag, v)? as i32),
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    if !matches!(a.model.as_str(), "packed" | "f32" | "llama") {
        return Err(format!(
            "--model must be packed, f32 or llama, got '{}'",
            a.model
        ));
    }
    if a.tokens < 1 || a.prompt < 1 || a.threads.is_some_and(|t| t < 1) {
        return Err("--tokens, --prompt and --threads must be at least 1".into());
    }
    Ok(a)
}

/// The model under test.
enum Model {
    Hgrn(HgrnBit),
    Llama(Box<Llama>),
}

/// What generation carries from token to token.
enum Carry {
    Recurrent(State),
    Kv(KvCache),
}

impl Model {
    fn forward(&self, ids: &Tensor, carry: &mut Carry) -> Tensor {
        match (self, carry) {
            (Model::Hgrn(m), Carry::Recurrent(s)) => m.forward(ids, Some(s)),
            (Model::Llama(m), Carry::Kv(c)) => m.forward(ids, Some(c)),
            _ => unreachable!("the carry matches the model"),
        }
    }

    fn vocab(&self) -> i64 {
        match self {
            Model::Hgrn(m) => m.config.vocab_size,
            Model::Llama(m) => m.config.vocab_size,
        }
    }

    /// The projection matrices of the blocks, and the output head for HGRN-bit (the last of
    /// its `linears`: packed, or dense in the f32 twin); the LLaMA's `linears` leave its head
    /// out (a dense variable, `lm_head.weight`).
    fn matrices(&self) -> Vec<(String, &dyn Linear)> {
        match self {
            Model::Hgrn(m) => m.linears(),
            Model::Llama(m) => m.linears(),
        }
    }

    /// `(bytes, positions)` of the state or cache `carry`.
    fn state_bytes(&self, carry: &Carry) -> (u64, i64) {
        match (self, carry) {
            (Model::Hgrn(_), Carry::Recurrent(s)) => (s.bytes() as u64, 0),
            (Model::Llama(m), Carry::Kv(c)) => {
                let c_len = c.len();
                let per_position = 2 * m.config.num_hidden_layers * m.config.hidden_size;
                let elt = m.compute_kind().elt_size_in_bytes() as i64;
                ((per_position * c_len * elt) as u64, c_len)
            }
            _ => unreachable!("the carry matches the model"),
        }
    }
}

fn run(a: &Args) -> Result<serde_json::Value, String> {
    if let Some(t) = a.threads {
        tch::set_num_threads(t);
    }
    tch::manual_seed(a.seed);
    // Start libtorch (allocator, thread pool) before the baseline.
    tch::no_grad(|| {
        let warm = Tensor::ones([64, 64], (Kind::Float, Device::Cpu));
        let _ = warm.matmul(&warm).sum(Kind::Float).double_value(&[]);
    });
    let baseline = current_rss_bytes();

    let vs = nn::VarStore::new(Device::Cpu);
    let size = a
        .size
        .clone()
        .unwrap_or_else(|| if a.model == "llama" { "350m" } else { "370m" }.to_string());
    let (model, mut carry) = match a.model.as_str() {
        "llama" => {
            let cfg = LlamaConfig::preset(&size)
                .ok_or_else(|| format!("'{size}' is not a LLaMA preset"))?;
            if a.prompt + a.tokens > cfg.max_position_embeddings {
                return Err(format!(
                    "--prompt + --tokens ({}) exceed the LLaMA's {} positions",
                    a.prompt + a.tokens,
                    cfg.max_position_embeddings
                ));
            }
            let m = Llama::new(
                &vs.root(),
                &cfg,
                &LinearKind::Dense,
                &EmbeddingKind::Dense,
                Kind::Float,
            )
            .map_err(|e| e.to_string())?;
            (Model::Llama(Box::new(m)), Carry::Kv(KvCache::default()))
        }
        kind => {
            let cfg = HgrnBitConfig::preset(&size)
                .ok_or_else(|| format!("'{size}' is not an hgrn-bit preset"))?;
            let linear = if kind == "packed" {
                LinearKind::PackedBitLinear { eps: 1e-8 }
            } else {
                LinearKind::Dense
            };
            let m =
                HgrnBit::new(&vs.root(), &cfg, &linear, Kind::Float).map_err(|e| e.to_string())?;
            (Model::Hgrn(m), Carry::Recurrent(State::default()))
        }
    };
    let model_rss = current_rss_bytes();

    // Bytes and parameters.
    let variables = vs.variables();
    let variable_bytes: u64 = variables.values().map(tensor_bytes).sum();
    let variable_params: i64 = variables.values().map(|t| t.numel() as i64).sum();
    let matrices: Vec<&dyn Linear> = model.matrices().into_iter().map(|(_, l)| l).collect();
    let quantized_bytes: u64 = matrices
        .iter()
        .filter_map(|l| l.quantized().map(|q| q.weight.stored_bytes()))
        .sum();
    let quantized_params: i64 = matrices
        .iter()
        .filter_map(|l| l.quantized().map(|q| q.weight.numel() as i64))
        .sum();
    let mut matrix_params: i64 = matrices
        .iter()
        .map(|l| {
            let (o, i) = l.shape();
            o * i
        })
        .sum();
    let mut matrix_bytes: u64 = matrices
        .iter()
        .map(|l| match (l.quantized(), l.dense_weight()) {
            (Some(q), _) => q.weight.stored_bytes(),
            (None, Some(w)) => tensor_bytes(w),
            (None, None) => {
                let (o, i) = l.shape();
                (o * i * 4) as u64
            }
        })
        .sum();
    if matches!(model, Model::Llama(_)) {
        // The LLaMA's head, which `linears` leaves out.
        let head = variables
            .get("lm_head.weight")
            .ok_or("the LLaMA has no lm_head.weight")?;
        matrix_params += head.numel() as i64;
        matrix_bytes += tensor_bytes(head);
    }
    let model_bytes = variable_bytes + quantized_bytes;

    // Generation.
    let vocab = model.vocab();
    let prompt = Tensor::randint(vocab, [1, a.prompt], (Kind::Int64, Device::Cpu));
    let (prompt_s, decode_s, step_ms, generated) = tch::no_grad(|| {
        let t0 = Instant::now();
        let logits = model.forward(&prompt, &mut carry);
        let mut next = logits.select(1, -1).argmax(-1, true);
        let mut id = next.int64_value(&[0, 0]);
        let prompt_s = t0.elapsed().as_secs_f64();
        let mut generated = vec![id];
        let mut step_ms = Vec::with_capacity(a.tokens as usize);
        let t1 = Instant::now();
        for _ in 0..a.tokens {
            let s = Instant::now();
            let logits = model.forward(&next, &mut carry);
            next = logits.select(1, -1).argmax(-1, true);
            id = next.int64_value(&[0, 0]);
            generated.push(id);
            step_ms.push(s.elapsed().as_secs_f64() * 1e3);
        }
        (prompt_s, t1.elapsed().as_secs_f64(), step_ms, generated)
    });
    let (state_bytes, state_positions) = model.state_bytes(&carry);
    let mut sorted = step_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = (sorted[(n - 1) / 2] + sorted[n / 2]) / 2.0;
    let kernel_threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
    eprintln!(
        "generate_bench {} ({size}): prompt {} tokens in {prompt_s:.3} s, {} tokens in \
         {decode_s:.2} s ({:.2} tokens/s)",
        a.model,
        a.prompt,
        a.tokens,
        a.tokens as f64 / decode_s
    );
    Ok(json!({
        "model": a.model,
        "size": size,
        "seed": a.seed,
        "tokens": a.tokens,
        "prompt": a.prompt,
        "params": variable_params + quantized_params,
        "prompt_s": prompt_s,
        "decode_s": decode_s,
        "tokens_per_s": a.tokens as f64 / decode_s,
        "ms_per_token_median": median,
        "model_bytes": model_bytes,
        "variable_bytes": variable_bytes,
        "quantized_bytes": quantized_bytes,
        "matrix_params": matrix_params,
        "matrix_bytes": matrix_bytes,
        "matrix_f32_bytes": matrix_params * 4,
        "state_bytes": state_bytes,
        "state_positions": state_positions,
        "baseline_rss_bytes": baseline,
        "model_rss_bytes": model_rss,
        "peak_rss_bytes": peak_rss_bytes(),
        "torch_threads": tch::get_num_threads(),
        "kernel_threads": kernel_threads,
        "generated": &generated[..generated.len().min(16)],
    }))
}

fn main() {
    match parse().and_then(|a| run(&a)) {
        Ok(v) => println!("{v}"),
        Err(e) => {
            println!("{}", json!({ "error": e }));
            eprintln!("generate_bench: {e}; {USAGE}");
            std::process::exit(2);
        }
    }
}
