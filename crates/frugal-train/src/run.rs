//! What a run is made of, for training, evaluation and generation alike: its folder, its data
//! split, its tokenizer and its model.

use crate::config::{Config, ModelBuild};
use crate::data::{self, Document, TokenDataset};
use crate::tokenize;
use frugal_core::{atomic, Error, Result};
use frugal_models::decoder::{Decoder, DecoderConfig};
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tokenizers::Tokenizer;

impl From<data::DataError> for Error {
    fn from(e: data::DataError) -> Self {
        Error::Msg(e.to_string())
    }
}

/// Folder where trained tokenizers are cached: `$FRUGAL_CACHE` or `~/.cache/frugal/tokenizers`.
pub fn tokenizer_cache() -> PathBuf {
    if let Some(d) = std::env::var_os("FRUGAL_CACHE") {
        return PathBuf::from(d).join("tokenizers");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache/frugal/tokenizers")
}

/// Training and validation documents as the config chooses them.
pub fn documents(cfg: &Config) -> Result<(Vec<Document>, Vec<Document>)> {
    let docs = if cfg.data.path.is_empty() {
        data::default_corpus()?
    } else {
        data::load_documents(&cfg.data.path)?
    };
    if cfg.data.val_path.is_empty() {
        Ok(data::split_validation(docs, cfg.data.val_every))
    } else {
        let val = data::load_documents_for("data.val_path", &cfg.data.val_path)?;
        Ok((docs, val))
    }
}

/// The run's tokenizer. Resuming: the run's own `tokenizer.json`. Otherwise the configured one
/// (a user's file, or a BPE trained on `train_docs` and cached), copied into the run folder.
pub fn tokenizer(
    cfg: &Config,
    run: &Path,
    train_docs: &[Document],
    resume: bool,
) -> Result<Tokenizer> {
    let saved = run.join("tokenizer.json");
    if resume {
        return Ok(tokenize::load_tokenizer_file(&saved)?);
    }
    // A user's tokenizer file; else a pretrained model folder's own.
    let user = if cfg.tokenizer.path.is_empty() {
        pretrained_tokenizer(cfg)
    } else {
        Some(PathBuf::from(&cfg.tokenizer.path))
    };
    let texts: Vec<&str> = train_docs.iter().map(|d| d.text.as_str()).collect();
    let tok = tokenize::load_or_train_tokenizer(
        user.as_deref(),
        &texts,
        cfg.tokenizer.vocab_size,
        &tokenizer_cache(),
    )?;
    let json = tok
        .to_string(false)
        .map_err(|e| Error::Msg(format!("cannot serialize tokenizer: {e}")))?;
    atomic::write(&saved, json.as_bytes())?;
    Ok(tok)
}

/// Encodes documents into a packed dataset of `seq_len`-token sequences; `what` names the
/// split in errors.
pub fn dataset(
    tok: &Tokenizer,
    docs: &[Document],
    seq_len: usize,
    what: &str,
) -> Result<TokenDataset> {
    let (ids, scored) = tokenize::encode_with_targets(tok, docs)?;
    let ds = TokenDataset::new(ids, seq_len).map_err(|e| Error::Msg(format!("{what}: {e}")))?;
    match scored {
        Some(s) => ds
            .with_scored(s)
            .map_err(|e| Error::Msg(format!("{what}: {e}"))),
        None => Ok(ds),
    }
}

/// A model and the variables it lives in.
pub struct Model {
    /// The variables (parameters), by Hugging Face name.
    pub vs: VarStore,
    /// The network.
    pub net: Decoder,
    /// The settings of the adapter trained on the frozen base, in an adapter run.
    pub adapter: Option<frugal_adapters::LoraConfig>,
}

/// Builds the configured model on `device`, seeded by `train.seed`, and loads `weights` (a
/// checkpoint's or a pretrained `model.safetensors`) when given: each caller names the one file
/// whose weights the model ends with, so none is read only to be overwritten.
pub fn model(
    build: &ModelBuild,
    shape: &DecoderConfig,
    device: tch::Device,
    weights: Option<&Path>,
) -> Result<Model> {
    let vs = build.var_store(device);
    // The MatMul-free LM is BitLinear throughout.
    let kind = match shape {
        DecoderConfig::HgrnBit(_) => match &build.linear {
            // An exported (packed) model, for inference.
            k @ frugal_models::LinearKind::PackedBitLinear { .. } => k.clone(),
            _ => frugal_models::LinearKind::BitLinear { eps: 1e-8 },
        },
        DecoderConfig::Llama(_) => build.linear.clone(),
    };
    let net = Decoder::new(&vs.root(), shape, &kind, &build.embedding, build.compute)?;
    let mut m = Model {
        vs,
        net,
        adapter: None,
    };
    if build.frozen_tables_bf16 {
        m.tables_to_bf16();
    }
    if let Some(file) = weights {
        m.load(file)?;
    }
    Ok(m)
}

impl Model {
    /// Stores the LLaMA's word table and output head (`model.embed_tokens.weight`,
    /// `lm_head.weight`) in bf16, before any weights are loaded into them: an adapter run
    /// computing in bf16 keeps them frozen, its head computes in bf16 anyway (an f32 table was
    /// cast for every product: a transient copy of its size), and a table shipped in bf16, as
    /// today's checkpoints are, loses nothing. A 1B model's 128256-word table takes 0.5 GB
    /// instead of 1 GB; adapters never merge into these.
    fn tables_to_bf16(&self) {
        if !matches!(self.net, Decoder::Llama(_)) {
            return;
        }
        let vars = self.vs.variables();
        for name in ["model.embed_tokens.weight", "lm_head.weight"] {
            if let Some(v) = vars.get(name).filter(|v| v.kind() == tch::Kind::Float) {
                // Every handle on the variable (the table, the tied head) sees the new data.
                let compact = v.to_kind(tch::Kind::BFloat16);
                tch::no_grad(|| v.shallow_clone().set_data(&compact));
            }
        }
    }

    /// Loads the weights in `file`: the variables, the frozen quantized layers' weights (read
    /// as stored, or quantized from dense weights), and the tensor-train layers and word table
    /// (the file's cores at their ranks, or converted from dense weights by TT-SVD). A LLaMA
    /// refuses a file that does not hold exactly it (another layer count, a tensor it would
    /// not use: [`frugal_models::weights::load_model_exact`]), so that no checkpoint loads with
    /// parts silently dropped.
    pub fn load(&mut self, file: &Path) -> Result<()> {
        let exact = matches!(self.net, Decoder::Llama(_));
        let (mut linears, mut tables) = self.net.weights_mut();
        let load = if exact {
            frugal_models::weights::load_model_exact
        } else {
            frugal_models::weights::load_model_with_tables
        };
        load(&mut self.vs, &mut linears, &mut tables, file)
    }

    /// Saves the weights to `file` (atomically): the variables, the quantized layers' packed
    /// weights, and the description of the TT layers and word table in the file's metadata
    /// (modes, ranks). In an adapter run, only the adapter, in PEFT's form, into `file`'s
    /// folder (`adapter_config.json`, `adapter_model.safetensors`): the base is the
    /// pretrained model's, unchanged.
    pub fn save(&self, file: &Path) -> Result<()> {
        match &self.adapter {
            Some(cfg) => {
                let dir = file.parent().unwrap_or(Path::new("."));
                let linears = self.net.linears();
                frugal_adapters::peft::write_into(
                    dir,
                    cfg,
                    &frugal_models::adapted::active_adapters(&linears),
                )
            }
            None => frugal_models::weights::save_model_with_tables(
                &self.vs,
                &self.net.linears(),
                &self.net.tables(),
                file,
            ),
        }
    }

    /// Writes the adapter as a PEFT folder `dir` (replaced as a whole).
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        let cfg = self
            .adapter
            .as_ref()
            .ok_or_else(|| Error::Msg("the model has no adapter".into()))?;
        let linears = self.net.linears();
        frugal_adapters::peft::write(dir, cfg, &frugal_models::adapted::active_adapters(&linears))
    }

    /// Adds a new adapter with the settings of `cfg.adapter` (its variables trainable) and
    /// freezes everything else; returns the adapter's variables, what the optimizer trains.
    pub fn add_adapter(&mut self, cfg: &Config) -> Result<Vec<(String, tch::Tensor)>> {
        let mut lora = cfg.adapter.lora(cfg.model.kind);
        lora.base_model =
            (!cfg.model.from_pretrained.is_empty()).then(|| cfg.model.from_pretrained.clone());
        let chosen = frugal_models::adapted::add_adapter(
            &self.vs,
            self.net.linears_mut(),
            &cfg.adapter.name,
            &lora,
            "adapter",
        )?;
        eprintln!(
            "frugal: {} adapter on {} layers (r {}, alpha {})",
            cfg.adapter.kind,
            chosen.len(),
            lora.r,
            lora.alpha
        );
        self.adapter = Some(lora);
        Ok(frugal_models::adapted::freeze_base(&self.vs))
    }

    /// Loads the adapter folder `dir` (PEFT's format) as adapter `name` and freezes everything
    /// else; returns the adapter's variables.
    pub fn load_adapter(&mut self, dir: &Path, name: &str) -> Result<Vec<(String, tch::Tensor)>> {
        let file = frugal_adapters::peft::read(dir)?;
        file.without_modules()?;
        frugal_models::adapted::load_adapter(&self.vs, self.net.linears_mut(), name, &file)?;
        self.adapter = Some(file.config);
        Ok(frugal_models::adapted::freeze_base(&self.vs))
    }

    /// Switches the adapters' dropout on (training) or off.
    pub fn set_training(&mut self, training: bool) {
        frugal_models::adapted::set_training(self.net.linears_mut(), training);
    }
}

/// The weights a new run starts from: `model.from_pretrained`'s `model.safetensors` (or the
/// index of its shards), if set.
pub fn pretrained_weights(cfg: &Config) -> Option<PathBuf> {
    (!cfg.model.from_pretrained.is_empty()).then(|| {
        let dir = Path::new(&cfg.model.from_pretrained);
        frugal_core::safetensors_io::model_weights(dir)
            .unwrap_or_else(|| dir.join("model.safetensors"))
    })
}

/// `model.from_pretrained`'s `tokenizer.json`, if it has one.
pub fn pretrained_tokenizer(cfg: &Config) -> Option<PathBuf> {
    (!cfg.model.from_pretrained.is_empty())
        .then(|| Path::new(&cfg.model.from_pretrained).join("tokenizer.json"))
        .filter(|p| p.is_file())
}

/// Reads a run's resolved `config.toml`.
pub fn read_config(run: &Path, overrides: &[String]) -> Result<Config> {
    let path = run.join("config.toml");
    if !path.is_file() {
        return Err(Error::Msg(format!(
            "{}: not a run folder (no config.toml)",
            run.display()
        )));
    }
    crate::config::load(&path, overrides)
}

/// Mean loss over up to `max_batches` batches of `ds` (all when 0), and the tokens scored.
pub fn evaluate(
    model: &Decoder,
    ds: &TokenDataset,
    batch_size: usize,
    max_batches: usize,
    device: tch::Device,
) -> (f64, u64) {
    tch::no_grad(|| {
        let mut total = 0.0;
        let mut tokens = 0u64;
        for (i, (x, y)) in ds.sequential_batches(batch_size).enumerate() {
            if max_batches > 0 && i >= max_batches {
                break;
            }
            // Targets of -100 (prompt tokens) are not scored.
            let n = y.ne(-100).sum(tch::Kind::Int64).int64_value(&[]) as u64;
            if n == 0 {
                continue;
            }
            let loss = model
                .loss(&x.to_device(device), &y.to_device(device))
                .double_value(&[]);
            total += loss * n as f64;
            tokens += n;
        }
        (total / tokens.max(1) as f64, tokens)
    })
}

/// Cross-entropy (nats per token) of `val` under the unigram distribution of `train`
/// (add-one smoothing): the loss a model that ignores context would reach.
pub fn unigram_loss(train: &[u32], val: &[u32], vocab: usize) -> f64 {
    let mut counts = vec![1.0f64; vocab.max(1)];
    for &t in train {
        if let Some(c) = counts.get_mut(t as usize) {
            *c += 1.0;
        }
    }
    let total: f64 = counts.iter().sum();
    let nll: f64 = val
        .iter()
        .map(|&t| -(counts.get(t as usize).copied().unwrap_or(1.0) / total).ln())
        .sum();
    nll / val.len().max(1) as f64
}

/// The linear kind a model folder's `config.json` declares for its stored weights: quantized
/// (`quantization_config`, written by `frugal quantize`, bitsandbytes or GPTQ) or TT
/// (`frugal compress`); None for dense weights.
pub fn stored_linear_kind(hf: &serde_json::Value) -> Option<frugal_models::LinearKind> {
    if let Some(format) = hf
        .get("quantization_config")
        .and_then(frugal_quant::convert::Format::from_quantization_config)
    {
        return Some(format_kind(&format));
    }
    hf.get(crate::compress_cmd::TT_CONFIG_KEY)
        .map(|tt| frugal_models::LinearKind::Tt {
            rank: tt.get("tt_rank").and_then(|r| r.as_i64()).unwrap_or(30),
            order: tt.get("order").and_then(|o| o.as_u64()).unwrap_or(3) as usize,
            eps: None,
        })
}

/// The quantization format a folder's `config.json` declares, as a linear kind.
pub fn format_kind(format: &frugal_quant::convert::Format) -> frugal_models::LinearKind {
    let (name, block_size, group_size, double_quant) = format.options();
    frugal_models::LinearKind::Quantized {
        format: name.into(),
        block_size,
        group_size,
        double_quant,
    }
}
