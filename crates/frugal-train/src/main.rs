//! The `frugal` command line: `train`, `eval`, `generate`, `quantize`, `dequantize`, `compress`,
//! `decompress`, `inspect`.
//!
//! Errors print one line and exit with code 2; Ctrl-C during training saves a checkpoint and
//! exits with code 130.

use clap::{Parser, Subcommand};
use frugal_train::{commands, compress_cmd, quantize_cmd};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "frugal",
    version,
    about = "Train large models with a fraction of the memory."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model as a TOML config says.
    Train {
        /// The config file (not needed with --resume: the run's own config is used).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a config key, e.g. --set train.max_steps=50 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// The run folder (default: runs/<date-time>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue the run in this folder from its latest complete checkpoint.
        #[arg(long, value_name = "RUN_DIR")]
        resume: Option<PathBuf>,
        /// Print the memory accounting of the config (weights, gradients, optimizer state,
        /// activations, logits; and plain AdamW's for comparison) without training.
        #[arg(long)]
        dry_run: bool,
    },
    /// Evaluate a run's model; prints JSON (loss, perplexity, tokens).
    Eval {
        /// The run folder.
        #[arg(long, required_unless_present = "model")]
        run: Option<PathBuf>,
        /// A Hugging Face style model folder (config.json, model.safetensors, tokenizer.json).
        #[arg(long, conflicts_with = "run")]
        model: Option<PathBuf>,
        /// An adapter folder (PEFT's format) to apply to the model.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Text to evaluate on (file, folder or glob); default: the run's validation split.
        #[arg(long)]
        data: Option<String>,
        /// Override an evaluation setting: train.seq_len or train.batch_size (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Also write the logits of every evaluated sequence to this safetensors file
        /// (`input_ids` (N, T), `logits` (N, T, vocabulary) in f32), for checks against other
        /// implementations.
        #[arg(long, value_name = "FILE")]
        logits: Option<PathBuf>,
    },
    /// Generate text from a prompt.
    Generate {
        /// The run folder.
        #[arg(long, required_unless_present = "model")]
        run: Option<PathBuf>,
        /// A Hugging Face style model folder.
        #[arg(long, conflicts_with = "run")]
        model: Option<PathBuf>,
        /// An adapter folder (PEFT's format) to apply to the model.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The prompt.
        #[arg(long)]
        prompt: String,
        /// Tokens to generate.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Sampling temperature (0: greedy).
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        /// Keep only the k most likely tokens (0: all).
        #[arg(long, default_value_t = 50)]
        top_k: usize,
        /// Keep the smallest set of tokens whose probability reaches p (1: all).
        #[arg(long, default_value_t = 0.95)]
        top_p: f64,
        /// Seed of the sampler.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Quantize the linear weights of a safetensors file or a model folder.
    Quantize {
        /// Input: a .safetensors file or a Hugging Face model folder.
        input: PathBuf,
        /// Output: a .safetensors file or a folder (then config.json gets quantization_config).
        output: PathBuf,
        /// int8, int4, nf4, fp4 or ternary.
        #[arg(long)]
        format: String,
        /// NF4/FP4 values per absmax block (power of two, 32..4096).
        #[arg(long, default_value_t = 64)]
        block_size: usize,
        /// int4 input columns per group (32, 64 or 128).
        #[arg(long, default_value_t = 128)]
        group_size: usize,
        /// NF4/FP4: quantize the absmax values too.
        #[arg(long)]
        double_quant: bool,
        /// Quantize only 2-D weights whose name matches this regex.
        #[arg(long)]
        include: Option<String>,
        /// Never quantize tensors whose name matches this regex.
        #[arg(long)]
        exclude: Option<String>,
    },
    /// Pack a trained MatMul-free LM (hgrn-bit run) into a ternary model folder for inference.
    Export {
        /// The run folder (its latest checkpoint is packed).
        #[arg(long)]
        run: PathBuf,
        /// The model folder to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Fold an adapter into its base model and write a model folder.
    Merge {
        /// The base model folder (config.json, model.safetensors or shards, tokenizer.json).
        #[arg(long)]
        base: PathBuf,
        /// The adapter folder (adapter_config.json, adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// The merged model folder to write.
        #[arg(long)]
        out: PathBuf,
        /// `safetensors` (dense weights) or `int4` (a QA-LoRA adapter folded into the int4
        /// zero points, without loss).
        #[arg(long, default_value = "safetensors")]
        format: String,
    },
    /// Restore float weights from a quantized file or folder.
    Dequantize {
        /// Input: a quantized .safetensors file or model folder.
        input: PathBuf,
        /// Output file or folder.
        output: PathBuf,
    },
    /// Compress the 2-D weights of a safetensors file or model folder to tensor-train cores
    /// (TT-SVD); prints each tensor's modes, ranks, compression and relative error.
    Compress {
        /// Input: a .safetensors file or a Hugging Face model folder.
        input: PathBuf,
        /// Output: a .safetensors file or a folder (then config.json gets tt_config).
        output: PathBuf,
        /// The largest TT rank of every bond.
        #[arg(long, value_name = "R", required_unless_present = "tt_eps")]
        tt_rank: Option<i64>,
        /// The relative Frobenius accuracy of each weight's TT-SVD, in (0, 1).
        #[arg(long, value_name = "E", conflicts_with = "tt_rank")]
        tt_eps: Option<f64>,
        /// Modes per side (fewer, down to 2, for a dimension with too few prime factors).
        #[arg(long, value_name = "K", default_value_t = 3)]
        order: usize,
        /// Also compress embeddings and the output head.
        #[arg(long)]
        include_embeddings: bool,
    },
    /// Restore dense weights from TT cores and from quantized weights (file or folder).
    Decompress {
        /// Input: a .safetensors file or model folder with TT cores or quantized weights.
        input: PathBuf,
        /// Output file or folder.
        output: PathBuf,
    },
    /// List the tensors of a safetensors file (or of every one in a folder), with quantized
    /// weights' formats and TT layers' modes, ranks and compression.
    Inspect {
        /// A .safetensors file or a folder.
        path: PathBuf,
    },
}

fn main() -> ExitCode {
    // Die quietly when stdout is a closed pipe (`frugal inspect F | head`), as Unix tools do,
    // instead of panicking on the failed write.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train {
            config,
            set,
            out,
            resume,
            dry_run,
        } => {
            if dry_run {
                commands::dry_run(config, &set, resume)
            } else {
                commands::train(config, &set, out, resume)
            }
        }
        Command::Eval {
            run,
            model,
            adapter,
            data,
            set,
            logits,
        } => commands::eval(
            run,
            model,
            adapter,
            data,
            &commands::EvalOptions { set, logits },
        ),
        Command::Export { run, out } => frugal_train::export_cmd::export(&run, &out),
        Command::Merge {
            base,
            adapter,
            out,
            format,
        } => frugal_train::merge_cmd::merge(&base, &adapter, &out, &format),
        Command::Generate {
            run,
            model,
            adapter,
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
        } => {
            let opts = commands::SampleOptions {
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                seed,
            };
            commands::generate(run, model, adapter, &prompt, &opts)
        }
        Command::Quantize {
            input,
            output,
            format,
            block_size,
            group_size,
            double_quant,
            include,
            exclude,
        } => {
            let o = quantize_cmd::QuantizeOptions {
                format,
                block_size,
                group_size,
                double_quant,
                include,
                exclude,
            };
            quantize_cmd::quantize(&input, &output, &o)
        }
        Command::Dequantize { input, output } => quantize_cmd::dequantize(&input, &output),
        Command::Compress {
            input,
            output,
            tt_rank,
            tt_eps,
            order,
            include_embeddings,
        } => {
            let o = compress_cmd::CompressOptions {
                tt_rank,
                tt_eps,
                order,
                include_embeddings,
            };
            compress_cmd::compress(&input, &output, &o)
        }
        Command::Decompress { input, output } => compress_cmd::decompress(&input, &output),
        Command::Inspect { path } => commands::inspect(&path),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // One write of the whole line: under mpirun, whose own messages share the stream,
            // a line written piece by piece can be cut in two.
            let line = format!("frugal: error: {e}\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
            ExitCode::from(2)
        }
    }
}
