//! The subcommands of the `frugal` binary, as library functions returning an exit code.

use crate::config::{self, Config};
use crate::data::{self, SplitMix64};
use crate::interrupt::Interrupter;
use crate::{checkpoint, run, tokenize, train};
use frugal_core::memory::human_bytes;
use frugal_core::safetensors_io::SafetensorsFile;
use frugal_core::{Error, Result};
use frugal_models::decoder::DecoderConfig;
use frugal_models::llama::LlamaConfig;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Kind, Tensor};
use tokenizers::Tokenizer;

/// `frugal train`.
pub fn train(
    config: Option<PathBuf>,
    set: &[String],
    out: Option<PathBuf>,
    resume: Option<PathBuf>,
) -> Result<u8> {
    let (cfg, out, resume) = match resume {
        Some(dir) => {
            if config.is_some() {
                return Err(Error::Msg(
                    "--resume continues a run with its own config.toml; leave out --config (use --set to change keys)".into(),
                ));
            }
            (run::read_config(&dir, set)?, Some(dir), true)
        }
        None => {
            let path = config.ok_or_else(|| {
                Error::Msg("--config FILE is required (or --resume RUN_DIR)".into())
            })?;
            (config::load(&path, set)?, out, false)
        }
    };
    // The processes of a launcher (mpirun, torchrun), or this one alone.
    let world = frugal_dist::launcher_world().map_or(1, |(size, _)| size);
    let run_dir = match out {
        Some(d) => d,
        None if world > 1 => {
            return Err(Error::Msg(format!(
                "{world} processes: give --out RUN_DIR, the same folder for every rank (on a \
                 filesystem they all see)"
            )))
        }
        None => default_run_dir(),
    };
    let backend = cfg.dist.backend_for(world, cfg.train.device.resolve()?)?;
    let timeout = std::time::Duration::from_secs_f64(cfg.dist.timeout_s);
    let mut dist = match backend {
        frugal_dist::Backend::Mpi => frugal_dist::from_env(timeout),
        frugal_dist::Backend::Nccl => {
            // NCCL's ranks meet through a file in the run folder.
            std::fs::create_dir_all(&run_dir)
                .map_err(|e| Error::Msg(format!("cannot create {}: {e}", run_dir.display())))?;
            frugal_dist::connect(backend, timeout, &run_dir)
        }
    }
    .map_err(|e| Error::Msg(e.to_string()))?;
    if !resume && run_dir.join("config.toml").exists() {
        return Err(Error::Msg(format!(
            "{}: already holds a run; continue it with --resume {0}, or choose another --out",
            run_dir.display()
        )));
    }
    // Every rank has looked at the folder before rank 0 writes into it.
    dist.barrier().map_err(|e| Error::Msg(e.to_string()))?;
    let stop = Interrupter::new();
    install_ctrl_c(stop.clone());
    let summary = train::train_with(&cfg, &run_dir, resume, dist.as_mut(), &stop)?;
    if dist.is_main() {
        train::print_summary(&summary);
    }
    Ok(if summary.interrupted { 130 } else { 0 })
}

/// `frugal train --dry-run`: the config's shape and memory accounting, without data, model or
/// run folder.
pub fn dry_run(config: Option<PathBuf>, set: &[String], resume: Option<PathBuf>) -> Result<u8> {
    let cfg = match (resume, config) {
        (Some(dir), _) => run::read_config(&dir, set)?,
        (None, Some(path)) => config::load(&path, set)?,
        (None, None) => {
            return Err(Error::Msg(
                "--config FILE is required (or --resume RUN_DIR)".into(),
            ))
        }
    };
    let vocab = if cfg.tokenizer.path.is_empty() {
        cfg.tokenizer.vocab_size as i64
    } else {
        tokenize::load_tokenizer_file(Path::new(&cfg.tokenizer.path))?.get_vocab_size(true) as i64
    };
    let shape = cfg.llama_config(vocab)?;
    let (ours, adamw) = crate::memplan::plan(&cfg, &shape);
    let params: i64 = crate::memplan::llama_params(&shape)
        .iter()
        .map(|p| p.shape.iter().product::<i64>())
        .sum();
    println!(
        "llama {}: d {}, {} layers, {} heads, ffn {}, vocabulary {} ({:.1}M parameters)",
        cfg.model.size,
        shape.hidden_size,
        shape.num_hidden_layers,
        shape.num_attention_heads,
        shape.intermediate_size,
        shape.vocab_size,
        params as f64 / 1e6
    );
    println!(
        "optimizer {}{}, batch {} x {} tokens, {:?}{}{}",
        cfg.optim.name,
        if cfg.optim.layerwise {
            " (per-layer updates)"
        } else {
            ""
        },
        cfg.train.batch_size,
        cfg.train.seq_len,
        cfg.train.dtype,
        if cfg.train.checkpointing {
            ", activation checkpointing"
        } else {
            ""
        },
        if cfg.train.ce_chunk > 0 {
            format!(", cross-entropy in chunks of {} tokens", cfg.train.ce_chunk)
        } else {
            String::new()
        }
    );
    println!("accounting (activations and logits are estimates; see docs/config.md):");
    print!("{}", crate::memplan::table(&ours, &adamw));
    Ok(0)
}

fn default_run_dir() -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("runs").join(format!("run-{secs}"))
}

/// Ctrl-C asks `stop` to end the run after the current step (with a checkpoint).
fn install_ctrl_c(stop: Interrupter) {
    let _ = ctrlc::set_handler(move || on_ctrl_c(&stop));
}

/// What a Ctrl-C does: the first asks the run to stop, and the training loop saves a checkpoint
/// after the step and stops; the second ends the process at once with status 130.
fn on_ctrl_c(stop: &Interrupter) {
    if stop.request() {
        exit_now(
            130,
            "\nfrugal: second Ctrl-C, exiting without a checkpoint\n",
        );
    }
    eprintln!("\nfrugal: Ctrl-C: saving a checkpoint after this step (press again to quit now)");
}

/// Writes `message` to stderr and ends the process with `code` at once. `std::process::exit`
/// would run the atexit handlers and C++ static destructors while the main thread is still
/// inside libtorch (a panic or a segfault); `_exit` runs nothing. Checkpoints are built in a
/// temporary folder and renamed, so the previous one stays intact.
fn exit_now(code: i32, message: &str) -> ! {
    // A plain write: no lock on Rust's stderr, which the main thread may hold.
    // SAFETY: `write` reads `message.len()` bytes of a live slice; a short or failed write is
    // of no consequence, the process is leaving.
    unsafe { libc::write(libc::STDERR_FILENO, message.as_ptr().cast(), message.len()) };
    // SAFETY: `_exit` takes no pointers and does not return. It skips destructors and atexit
    // handlers on purpose: buffered output is lost, checkpoints are not (see above).
    unsafe { libc::_exit(code) }
}

/// A model ready for inference, with its tokenizer and the run's config.
struct Loaded {
    cfg: Config,
    tok: Tokenizer,
    model: run::Model,
    device: tch::Device,
}

fn load_run(run_dir: &Path, adapter: Option<&Path>) -> Result<Loaded> {
    let cfg = run::read_config(run_dir, &[])?;
    let tok_path = run_dir.join("tokenizer.json");
    let tok = tokenize::load_tokenizer_file(&tok_path)?;
    let shape = cfg.decoder_config(tok.get_vocab_size(true) as i64)?;
    let device = cfg.train.device.resolve()?;
    let ck = checkpoint::latest(run_dir)?;
    let mut model = if cfg.adapter.enabled() {
        // An adapter run: the pretrained base and the checkpoint's adapter.
        if adapter.is_some() {
            return Err(Error::Msg(format!(
                "{}: the run trained an adapter already; give --model BASE --adapter DIR to                  try another",
                run_dir.display()
            )));
        }
        let mut m = run::model(
            &cfg.model_build(),
            &shape,
            device,
            run::pretrained_weights(&cfg).as_deref(),
        )?;
        m.load_adapter(&ck, &cfg.adapter.name)?;
        m
    } else {
        run::model(
            &cfg.model_build(),
            &shape,
            device,
            Some(&ck.join("model.safetensors")),
        )?
    };
    if let Some(dir) = adapter {
        model.load_adapter(dir, "default")?;
    }
    Ok(Loaded {
        cfg,
        tok,
        model,
        device,
    })
}

fn load_model_dir(dir: &Path, adapter: Option<&Path>) -> Result<Loaded> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let tok = tokenize::load_tokenizer_file(&dir.join("tokenizer.json"))?;
    let mut cfg = Config::default();
    let hf: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Msg(format!("{}: {e}", cfg_path.display())))?;
    let shape = match crate::export_cmd::hgrn_config(&hf) {
        // A MatMul-free LM from `frugal export`: packed ternary layers.
        Some(c) => {
            let c = c.map_err(|e| Error::Msg(format!("{}: {e}", cfg_path.display())))?;
            cfg.model.kind = config::ModelKind::HgrnBit;
            cfg.model.linear = frugal_models::LinearKind::PackedBitLinear { eps: 1e-8 };
            DecoderConfig::HgrnBit(c)
        }
        None => {
            if let Some(kind) = run::stored_linear_kind(&hf) {
                cfg.model.linear = kind;
            }
            DecoderConfig::Llama(LlamaConfig::from_hf_file(&cfg_path)?)
        }
    };
    let device = cfg.train.device.resolve()?;
    let weights = frugal_core::safetensors_io::model_weights(dir)
        .unwrap_or_else(|| dir.join("model.safetensors"));
    let mut model = run::model(&cfg.model_build(), &shape, device, Some(&weights))?;
    if let Some(a) = adapter {
        model.load_adapter(a, "default")?;
    }
    Ok(Loaded {
        cfg,
        tok,
        model,
        device,
    })
}

fn load(
    run_dir: Option<PathBuf>,
    model: Option<PathBuf>,
    adapter: Option<PathBuf>,
) -> Result<Loaded> {
    match (run_dir, model) {
        (Some(r), _) => load_run(&r, adapter.as_deref()),
        (None, Some(m)) => load_model_dir(&m, adapter.as_deref()),
        (None, None) => Err(Error::Msg("give --run RUN_DIR or --model MODEL_DIR".into())),
    }
}

/// What `frugal eval` does besides scoring.
#[derive(Debug, Clone, Default)]
pub struct EvalOptions {
    /// `KEY=VALUE` overrides of the evaluation settings (`train.seq_len`, `train.batch_size`).
    pub set: Vec<String>,
    /// A safetensors file for the evaluated sequences' ids and logits.
    pub logits: Option<PathBuf>,
}

/// The keys `frugal eval --set` takes.
const EVAL_KEYS: [&str; 2] = ["train.seq_len", "train.batch_size"];

/// `cfg` with the evaluation overrides `set` (only [`EVAL_KEYS`]: the model is already built),
/// checked as `frugal train` checks them.
fn with_eval_overrides(cfg: &Config, set: &[String]) -> Result<Config> {
    if set.is_empty() {
        return Ok(cfg.clone());
    }
    for o in set {
        let key = o.split_once('=').map_or(o.as_str(), |(k, _)| k.trim());
        if !EVAL_KEYS.contains(&key) {
            return Err(Error::config(
                key,
                format!("frugal eval --set takes {}", EVAL_KEYS.join(" or ")),
            ));
        }
    }
    let text = toml::to_string(cfg).map_err(|e| Error::Msg(format!("config: {e}")))?;
    let mut table: toml::Table =
        toml::from_str(&text).map_err(|e| Error::Msg(format!("config: {e}")))?;
    config::apply_overrides(&mut table, set)?;
    config::from_table(table)
}

/// `frugal eval`: prints `{"loss", "perplexity", "tokens"}` (a classifier: `{"loss",
/// "accuracy", "examples", "tokens"}`).
pub fn eval(
    run_dir: Option<PathBuf>,
    model: Option<PathBuf>,
    adapter: Option<PathBuf>,
    data_spec: Option<String>,
    opts: &EvalOptions,
) -> Result<u8> {
    // Encoder runs (masked-LM or classification) and folders: their own evaluation.
    let encoder = match (&run_dir, &model) {
        (Some(dir), _) => {
            crate::encoder_eval::eval_command(dir, adapter.as_deref(), data_spec.as_deref())?
        }
        (None, Some(dir)) => {
            crate::encoder_eval::eval_model_dir(dir, adapter.as_deref(), data_spec.as_deref())?
        }
        (None, None) => None,
    };
    if let Some(out) = encoder {
        if let Some(key) = [
            (!opts.set.is_empty()).then_some("--set"),
            opts.logits.as_ref().map(|_| "--logits"),
        ]
        .into_iter()
        .flatten()
        .next()
        {
            return Err(Error::Msg(format!(
                "{key}: not available for encoders yet (the decoders' evaluation only)"
            )));
        }
        println!("{out}");
        return Ok(0);
    }
    let from_model = model.is_some();
    let mut l = load(run_dir, model, adapter)?;
    l.cfg = with_eval_overrides(&l.cfg, &opts.set)?;
    let docs = match &data_spec {
        Some(spec) => data::load_documents_for("--data", spec)?,
        None if from_model => {
            return Err(Error::Msg(
                "--model needs --data FILE to evaluate on".into(),
            ))
        }
        None => run::documents(&l.cfg)?.1,
    };
    let seq_len = l
        .cfg
        .train
        .seq_len
        .min(l.model.net.max_positions().unwrap_or(i64::MAX) as usize);
    let ds = run::dataset(&l.tok, &docs, seq_len, "evaluation data")?;
    let (loss, tokens) = run::evaluate(&l.model.net, &ds, l.cfg.train.batch_size, 0, l.device);
    if let Some(file) = &opts.logits {
        write_logits(&l, &ds, file)?;
    }
    let out = serde_json::json!({"loss": loss, "perplexity": loss.exp(), "tokens": tokens});
    println!("{out}");
    Ok(0)
}

/// Writes `input_ids` `(N, T)` and `logits` `(N, T, vocabulary)` (f32) of every sequence of
/// `ds`, batch by batch, to safetensors file `file` (atomically).
fn write_logits(l: &Loaded, ds: &crate::data::TokenDataset, file: &Path) -> Result<()> {
    let (ids, logits): (Vec<Tensor>, Vec<Tensor>) = tch::no_grad(|| {
        ds.sequential_batches(l.cfg.train.batch_size)
            .map(|(x, _)| {
                let y = l.model.net.forward(&x.to_device(l.device));
                (x, y.to_kind(Kind::Float).to_device(tch::Device::Cpu))
            })
            .unzip()
    });
    let tensors = vec![
        ("input_ids".to_string(), Tensor::cat(&ids, 0)),
        ("logits".to_string(), Tensor::cat(&logits, 0)),
    ];
    frugal_core::safetensors_io::save(file, &tensors, None)
}

/// Sampling settings of `frugal generate`.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// Temperature (0: greedy).
    pub temperature: f64,
    /// Top-k filter (0: off).
    pub top_k: usize,
    /// Nucleus filter (1: off).
    pub top_p: f64,
    /// Sampler seed.
    pub seed: u64,
}

/// Picks the next token from `logits` (a vocabulary row): greedy at temperature 0, else
/// softmax at `temperature`, the `top_k` most likely, the smallest set reaching `top_p`, and a
/// draw from what remains.
pub fn sample(logits: &[f32], o: &SampleOptions, rng: &mut SplitMix64) -> usize {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if o.temperature <= 0.0 {
        return order[0];
    }
    if o.top_k > 0 {
        order.truncate(o.top_k);
    }
    let max = logits[order[0]] as f64;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / o.temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if o.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|p| {
            acc += p;
            acc >= o.top_p
        });
        let keep = keep.map_or(probs.len(), |k| k + 1);
        probs.truncate(keep);
        order.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.next_f64() * total;
    for (i, p) in probs.iter().enumerate() {
        u -= p;
        if u <= 0.0 {
            return order[i];
        }
    }
    order[order.len() - 1]
}

/// `frugal generate`: prints the prompt and its continuation, then tokens/s on stderr.
pub fn generate(
    run_dir: Option<PathBuf>,
    model: Option<PathBuf>,
    adapter: Option<PathBuf>,
    prompt: &str,
    o: &SampleOptions,
) -> Result<u8> {
    let l = load(run_dir, model, adapter)?;
    let net = &l.model.net;
    let eos = tokenize::find_eos_id(&l.tok);
    let enc = l
        .tok
        .encode(prompt, false)
        .map_err(|e| Error::Msg(format!("cannot encode the prompt: {e}")))?;
    let mut ids: Vec<i64> = enc.get_ids().iter().map(|&i| i as i64).collect();
    if ids.is_empty() {
        ids.push(eos.unwrap_or(0) as i64);
    }
    let max_pos = net.max_positions().unwrap_or(i64::MAX) as usize;
    if ids.len() >= max_pos {
        return Err(Error::Msg(format!(
            "the prompt has {} tokens; the model takes at most {max_pos}",
            ids.len()
        )));
    }
    let budget = o.max_new_tokens.min(max_pos - ids.len());
    let mut rng = SplitMix64::new(o.seed);
    let mut state = net.new_state();
    let mut new_ids: Vec<u32> = Vec::new();
    let t0 = Instant::now();
    tch::no_grad(|| {
        let mut input = Tensor::from_slice(&ids).unsqueeze(0).to_device(l.device);
        for _ in 0..budget {
            let logits = net.forward_with(&input, &mut state);
            let last = logits
                .select(1, -1)
                .squeeze_dim(0)
                .to_kind(Kind::Float)
                .to_device(tch::Device::Cpu);
            let row: Vec<f32> = Vec::try_from(&last).expect("f32 row");
            let next = sample(&row, o, &mut rng);
            if Some(next as u32) == eos {
                break;
            }
            new_ids.push(next as u32);
            input = Tensor::from_slice(&[next as i64])
                .unsqueeze(0)
                .to_device(l.device);
        }
    });
    let secs = t0.elapsed().as_secs_f64();
    let text = l
        .tok
        .decode(&new_ids, true)
        .map_err(|e| Error::Msg(format!("cannot decode: {e}")))?;
    println!("{prompt}{text}");
    eprintln!(
        "frugal: {} tokens in {secs:.2} s ({:.1} tokens/s)",
        new_ids.len(),
        new_ids.len() as f64 / secs.max(1e-9)
    );
    Ok(0)
}

/// `frugal inspect`: tensors, dtypes, shapes, bytes of a safetensors file or a folder of them.
pub fn inspect(path: &Path) -> Result<u8> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut f: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        f.sort();
        if f.is_empty() {
            return Err(Error::Msg(format!(
                "{}: no .safetensors files",
                path.display()
            )));
        }
        f
    } else {
        vec![path.to_path_buf()]
    };
    for file in files {
        let st = SafetensorsFile::open(&file)?;
        println!("{}", file.display());
        let mut meta = st.metadata();
        // The TT description is a JSON object per layer: shown as a table below.
        meta.remove(frugal_models::weights::TT_METADATA_KEY);
        if !meta.is_empty() {
            let mut m: Vec<_> = meta.into_iter().collect();
            m.sort();
            println!(
                "  metadata: {}",
                m.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let names = st.names();
        let width = names.iter().map(|n| n.len()).max().unwrap_or(4).max(4);
        println!(
            "  {:<width$}  {:<5}  {:<20}  {:>12}",
            "name", "dtype", "shape", "bytes"
        );
        let (mut total_bytes, mut total_elems) = (0u64, 0u64);
        for n in &names {
            let (shape, dtype) = st.info(n)?;
            let elems: u64 = shape.iter().map(|&d| d as u64).product();
            let bytes = elems * dtype.bitsize() as u64 / 8;
            total_bytes += bytes;
            total_elems += elems;
            println!(
                "  {n:<width$}  {:<5}  {:<20}  {bytes:>12}",
                format!("{dtype:?}"),
                format!("{shape:?}")
            );
        }
        let found = frugal_quant::convert::describe(&st).map_err(|e| Error::Msg(e.to_string()))?;
        if !found.is_empty() {
            println!("  quantized weights:");
            for q in &found {
                println!(
                    "    {:<width$}  {:<28}  {:.3} bits per parameter",
                    q.prefix, q.format, q.bits_per_param
                );
            }
        }
        crate::compress_cmd::print_tt_layers(&st, width)?;
        println!(
            "  {} tensors, {} elements, {} ({total_bytes} bytes)",
            names.len(),
            total_elems,
            human_bytes(total_bytes)
        );
    }
    Ok(0)
}
