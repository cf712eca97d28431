//! The run configuration: TOML tables `model`, `data`, `tokenizer`, `train`, `optim`, `tt`,
//! `adapter`, `dist`, with
//! `--set key=value` overrides. Unknown keys and wrong types are errors that name the key.
//! Every key and its default is documented in `docs/config.md`; later issues add keys, never
//! rename them.

use frugal_core::{Device, Error, Result};
use frugal_models::{EmbeddingKind, LinearKind};
use frugal_optim::{AdafactorConfig, AdamWConfig, AdamWVariant};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Writes an enum's config spelling (its serde name).
macro_rules! config_names {
    ($ty:ty { $($v:ident => $s:literal),+ $(,)? }) => {
        impl $ty {
            /// The value as the config spells it.
            pub fn as_str(&self) -> &'static str {
                match self {
                    $(Self::$v => $s),+
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// `model.kind`: which model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// The LLaMA-style decoder (Hugging Face's `llama` and the families built on it: `mistral`,
    /// `qwen2`, `qwen3`, `gemma`, `gemma2`, `gemma3_text`, `phi3`).
    #[default]
    Llama,
    /// The BERT-style encoder.
    Encoder,
    /// The MatMul-free LM (HGRN-bit).
    HgrnBit,
    /// The `model.from_pretrained` folder's family (its `config.json`'s `model_type`, or a run
    /// folder's `model.kind`), else `llama`: resolved when the config is read
    /// ([`from_table`]), so that no run sees it. The default when the config has no
    /// `model.kind`.
    Auto,
}
config_names!(ModelKind { Llama => "llama", Encoder => "encoder", HgrnBit => "hgrn-bit", Auto => "auto" });

impl ModelKind {
    /// The kind `auto` stands for with `model.from_pretrained = from` (empty: none): the
    /// family of the folder's `config.json` (`model_type`: a decoder type is `llama`, `bert`
    /// `encoder`, `hgrn_bit` `hgrn-bit`; any other is refused by name), or a run folder's own
    /// `model.kind` (its `config.toml`); `llama` without a folder. Other kinds are themselves.
    pub fn resolve(self, from: &str) -> Result<ModelKind> {
        if self != ModelKind::Auto {
            return Ok(self);
        }
        if from.is_empty() {
            return Ok(ModelKind::Llama);
        }
        let dir = Path::new(from);
        let hf = dir.join("config.json");
        if hf.is_file() {
            let in_file = |e: Error| Error::Msg(format!("{}: {e}", hf.display()));
            let text = std::fs::read_to_string(&hf).map_err(|e| Error::io(&hf, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| in_file(Error::Msg(e.to_string())))?;
            let t = frugal_models::hf::model_type(&v).map_err(in_file)?;
            use frugal_models::hf::Family;
            return match Family::of(t) {
                Some(Family::Llama) => Ok(ModelKind::Llama),
                Some(Family::Bert) => Ok(ModelKind::Encoder),
                Some(Family::HgrnBit) => Ok(ModelKind::HgrnBit),
                // The refusal of a type no kind loads, by name.
                None => frugal_models::hf::expect_family(&v, Family::Llama)
                    .map_err(in_file)
                    .map(|_| ModelKind::Llama),
            };
        }
        let run = dir.join("config.toml");
        if run.is_file() {
            let kind = load(&run, &[])?.model.kind;
            return kind.resolve("");
        }
        Err(Error::config(
            "model.kind",
            format!(
                "\"auto\" reads the family of model.from_pretrained, but {} holds neither a \
                 config.json nor a run's config.toml; set model.kind",
                dir.display()
            ),
        ))
    }
}

/// `train.objective`: what the model learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// The model's own: `lm` for the decoders, `mlm` for the encoder.
    #[default]
    Auto,
    /// The next token (causal LM).
    Lm,
    /// Masked tokens (masked LM).
    Mlm,
    /// The labels of `data.task_path` (sequence classification).
    Classification,
}
config_names!(Objective { Auto => "auto", Lm => "lm", Mlm => "mlm", Classification => "classification" });

/// `optim.name`: the optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerName {
    /// AdamW.
    #[default]
    Adamw,
    /// 8-bit AdamW (block-wise dynamic quantization of the moments).
    Adamw8bit,
    /// Adafactor.
    Adafactor,
    /// AdamW under GaLore's projection.
    GaloreAdamw,
    /// 8-bit AdamW under GaLore's projection.
    GaloreAdamw8bit,
    /// Adafactor under GaLore's projection.
    GaloreAdafactor,
}
config_names!(OptimizerName {
    Adamw => "adamw",
    Adamw8bit => "adamw8bit",
    Adafactor => "adafactor",
    GaloreAdamw => "galore-adamw",
    GaloreAdamw8bit => "galore-adamw8bit",
    GaloreAdafactor => "galore-adafactor",
});

impl OptimizerName {
    /// Whether it is a GaLore optimizer.
    pub fn is_galore(&self) -> bool {
        matches!(
            self,
            Self::GaloreAdamw | Self::GaloreAdamw8bit | Self::GaloreAdafactor
        )
    }

    /// The optimizer under GaLore's projection (or the optimizer itself): `Adamw`,
    /// `Adamw8bit` or `Adafactor`.
    pub fn base(&self) -> Self {
        match self {
            Self::GaloreAdamw => Self::Adamw,
            Self::GaloreAdamw8bit => Self::Adamw8bit,
            Self::GaloreAdafactor => Self::Adafactor,
            other => *other,
        }
    }
}

/// `optim.galore.svd`: how GaLore's bases are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Svd {
    /// The exact SVD.
    #[default]
    Exact,
    /// A randomized SVD (default oversampling and power iterations).
    Randomized,
}
config_names!(Svd { Exact => "exact", Randomized => "randomized" });

impl Svd {
    /// frugal-galore's method.
    pub fn method(&self) -> frugal_galore::SvdMethod {
        match self {
            Self::Exact => frugal_galore::SvdMethod::Exact,
            Self::Randomized => frugal_galore::SvdMethod::randomized(),
        }
    }
}

/// `adapter.kind`: the adapter trained on a frozen base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    /// No adapter: the whole model trains.
    #[default]
    None,
    /// LoRA.
    Lora,
    /// DoRA (LoRA with a learned magnitude).
    Dora,
    /// LoRA on a frozen NF4 base with double quantization.
    Qlora,
    /// A group-averaged LoRA on a frozen int4 base.
    Qalora,
}
config_names!(AdapterKind {
    None => "none",
    Lora => "lora",
    Dora => "dora",
    Qlora => "qlora",
    Qalora => "qalora",
});

/// `dist.backend`: the collectives' library.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// NCCL when several processes train on CUDA, else MPI.
    #[default]
    Auto,
    /// MPI.
    Mpi,
    /// NCCL (one GPU per process).
    Nccl,
}
config_names!(BackendChoice { Auto => "auto", Mpi => "mpi", Nccl => "nccl" });

/// The whole configuration of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The model.
    pub model: ModelConfig,
    /// Training and validation text.
    pub data: DataConfig,
    /// The tokenizer.
    pub tokenizer: TokenizerConfig,
    /// The training loop.
    pub train: TrainConfig,
    /// The optimizer.
    pub optim: OptimConfig,
    /// Tensor-train rank adaptation (CoMERA's two-stage schedule).
    pub tt: TtConfig,
    /// An adapter trained on a frozen base (LoRA, DoRA, QLoRA, QA-LoRA).
    pub adapter: AdapterConfig,
    /// Data-parallel training across processes.
    pub dist: DistConfig,
}

/// `[dist]`: data-parallel training across processes (`mpirun -n N frugal train ...`); the
/// number of processes and the ranks come from the launcher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistConfig {
    /// Seconds a rank waits for the others in a collective before the job stops with an error
    /// (a rank that died or stalled); it must cover rank 0's evaluations and checkpoints.
    pub timeout_s: f64,
    /// With a GaLore optimizer: average the projected gradients (`r x n`) of the projected
    /// matrices instead of their full gradients (`m x n`), except at basis refreshes, where
    /// the full gradient is averaged so that every rank computes the same basis.
    pub galore_projected: bool,
    /// Shard the optimizer state (ZeRO stage 1): each rank keeps the state of its share of the
    /// parameters (balanced by size), steps only those, and broadcasts them to the others.
    pub zero1: bool,
    /// The collectives' library: `"auto"` (NCCL when several processes train on CUDA, else
    /// MPI), `"mpi"`, or `"nccl"` (one GPU per process; also for one process alone).
    pub backend: BackendChoice,
    /// Start averaging each block's gradients as soon as the backward pass has computed them,
    /// while it goes on to the blocks before (without per-layer updates, which already average
    /// each block just before its update).
    pub overlap: bool,
}

impl Default for DistConfig {
    fn default() -> Self {
        Self {
            timeout_s: 600.0,
            galore_projected: false,
            zero1: false,
            backend: BackendChoice::Auto,
            overlap: false,
        }
    }
}

impl DistConfig {
    /// The backend for `world` processes training on `device`.
    pub fn backend_for(&self, world: usize, device: tch::Device) -> Result<frugal_dist::Backend> {
        use frugal_dist::Backend;
        match self.backend {
            BackendChoice::Auto if world > 1 && device.is_cuda() => Ok(Backend::Nccl),
            BackendChoice::Auto | BackendChoice::Mpi => Ok(Backend::Mpi),
            BackendChoice::Nccl if device.is_cuda() => Ok(Backend::Nccl),
            BackendChoice::Nccl => Err(Error::config(
                "dist.backend",
                "\"nccl\" reduces GPU memory: set train.device to \"cuda\" (or use \"mpi\")",
            )),
        }
    }
}

/// `[adapter]`: fine-tune an adapter on a frozen base (`model.from_pretrained`) instead of the
/// whole model; see `docs/finetune.md`. The adapter is saved in PEFT's format in the run's
/// `adapter/` folder and in every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdapterConfig {
    /// `"none"` (train the whole model), `"lora"`, `"dora"` (LoRA with DoRA's magnitude),
    /// `"qlora"` (LoRA on a frozen NF4 base with double quantization) or `"qalora"` (a
    /// group-averaged LoRA on a frozen int4 base, merged exactly into it by `frugal merge
    /// --format int4`).
    pub kind: AdapterKind,
    /// Rank.
    pub r: i64,
    /// Scale numerator: the adapter's output is scaled by alpha / r.
    pub alpha: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f64,
    /// rsLoRA: scale by alpha / sqrt(r).
    pub use_rslora: bool,
    /// `"default"` (A kaiming-uniform, B zero), `"gaussian"` or `"pissa"` (dense bases).
    pub init: frugal_adapters::Init,
    /// Layers that get the adapter: names (`["q_proj", "v_proj"]`: a layer whose name ends in
    /// one), `"all-linear"`, or a regular expression matching whole layer names. Unset: PEFT's
    /// default for the model ([`frugal_adapters::Targets::peft_default`]: llama `["q_proj",
    /// "v_proj"]`, encoder `["query", "value"]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_modules: Option<frugal_adapters::Targets>,
    /// Layers left out (same forms; empty list: none).
    pub exclude_modules: frugal_adapters::Targets,
    /// `qlora`: NF4 block size; `qalora`: int4 group size (the adapter averages the same
    /// groups).
    pub group_size: i64,
    /// The adapter's name in the model (several adapters can sit on one base; one is active).
    pub name: String,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            kind: AdapterKind::None,
            r: 8,
            alpha: 8.0,
            dropout: 0.0,
            use_rslora: false,
            init: frugal_adapters::Init::Default,
            target_modules: None,
            exclude_modules: frugal_adapters::Targets::Names(Vec::new()),
            group_size: 64,
            name: "default".into(),
        }
    }
}

impl AdapterConfig {
    /// Whether an adapter is trained.
    pub fn enabled(&self) -> bool {
        self.kind != AdapterKind::None
    }

    /// The layers that get the adapter in a model of kind `model_kind` (`model.kind`):
    /// `target_modules`, or PEFT's default for the model.
    pub fn targets(&self, model_kind: ModelKind) -> frugal_adapters::Targets {
        // PEFT's defaults are by Hugging Face `model_type`.
        let model_type = match model_kind {
            ModelKind::Encoder => "bert",
            other => other.as_str(),
        };
        self.target_modules.clone().unwrap_or_else(|| {
            frugal_adapters::Targets::peft_default(model_type).unwrap_or_default()
        })
    }

    /// The adapter's settings for a model of kind `model_kind` (`model.kind`), as PEFT's
    /// causal-LM task; the model sets PEFT's task type and modules to save when it has others.
    pub fn lora(&self, model_kind: ModelKind) -> frugal_adapters::LoraConfig {
        frugal_adapters::LoraConfig {
            r: self.r,
            alpha: self.alpha,
            dropout: self.dropout,
            use_rslora: self.use_rslora,
            use_dora: self.kind == AdapterKind::Dora,
            init: self.init,
            target_modules: self.targets(model_kind),
            exclude_modules: match &self.exclude_modules {
                frugal_adapters::Targets::Names(n) if n.is_empty() => None,
                e => Some(e.clone()),
            },
            pool: if self.kind == AdapterKind::Qalora {
                self.group_size
            } else {
                1
            },
            ..frugal_adapters::LoraConfig::default()
        }
    }

    /// The base layers the kind needs: `qlora` NF4 with double quantization at block
    /// `group_size`, `qalora` int4 at group `group_size`, None (the model's `model.linear`)
    /// for the others.
    pub fn base_linear(&self) -> Option<LinearKind> {
        match self.kind {
            AdapterKind::Qlora => Some(LinearKind::Quantized {
                format: "nf4".into(),
                block_size: self.group_size as usize,
                group_size: 128,
                double_quant: true,
            }),
            AdapterKind::Qalora => Some(LinearKind::Quantized {
                format: "int4".into(),
                block_size: 64,
                group_size: self.group_size as usize,
                double_quant: false,
            }),
            _ => None,
        }
    }

    /// Checks the kind, the settings, and what the kind needs of the rest of the config.
    pub fn validate(&self, cfg: &Config) -> Result<()> {
        if !self.enabled() {
            return Ok(());
        }
        self.lora(cfg.model.kind).validate("adapter")?;
        if !matches!(cfg.model.kind, ModelKind::Llama | ModelKind::Encoder) {
            return Err(Error::config(
                "adapter.kind",
                format!(
                    "adapters are available for model.kind = \"llama\" and \"encoder\" ({}: \
                     not yet)",
                    cfg.model.kind
                ),
            ));
        }
        if cfg.model.embedding != EmbeddingKind::Dense {
            return Err(Error::config(
                "model.embedding",
                "an adapter trains on the pretrained base as it is: leave the word table dense \
                 (a tensor-train one would replace it by an approximation)",
            ));
        }
        if cfg.tt.rank_adapt {
            return Err(Error::config(
                "tt.rank_adapt",
                "does not combine with an adapter: the base, TT layers included, is frozen",
            ));
        }
        if self.base_linear().is_some() && cfg.model.linear != LinearKind::Dense {
            return Err(Error::config(
                "model.linear",
                format!(
                    "adapter.kind = \"{}\" chooses the base's quantization itself; leave \
                     model.linear at dense",
                    self.kind
                ),
            ));
        }
        if self.init == frugal_adapters::Init::Pissa
            && (self.base_linear().is_some() || cfg.model.linear != LinearKind::Dense)
        {
            return Err(Error::config(
                "adapter.init",
                "PiSSA needs a dense base (adapter.kind = \"lora\" or \"dora\", model.linear dense)",
            ));
        }
        if let Some(kind) = self.base_linear() {
            kind.validate().map_err(|e| {
                Error::config("adapter.group_size", format!("{}: {e}", self.group_size))
            })?;
        }
        Ok(())
    }
}

/// `[tt]`: CoMERA's rank-adaptive two-stage training of the TT layers (`model.linear.kind =
/// "tt"`), see `docs/comera.md`. The schedule's keys and defaults are
/// [`frugal_tt::ComeraConfig`]'s (one source of the published defaults); `rank_lr` and
/// `prune_every` are the trainer's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TtConfig {
    /// Train the rank variables with CoMERA's schedule and prune physically (default false:
    /// the TT layers train at fixed ranks, rank variables with the other parameters).
    pub rank_adapt: bool,
    /// Optimizer steps of the early stage (steps `1..=early_steps`: loss + penalty).
    pub early_steps: u64,
    /// Weight of the rank penalty in the early stage.
    pub penalty_weight: f64,
    /// The late stage's loss target.
    pub loss_target: f64,
    /// The late stage's size target, a fraction in (0, 1] of the live TT size when the late
    /// stage starts.
    pub compression_target: f64,
    /// Rank-variable entries with `|D| <= threshold` count as pruned.
    pub threshold: f64,
    /// Learning rate of the rank variables (their own AdamW, no weight decay, constant).
    pub rank_lr: f64,
    /// Late-stage steps between physical prunings (0: only at the end of each stage).
    pub prune_every: u64,
}

impl Default for TtConfig {
    fn default() -> Self {
        let c = frugal_tt::ComeraConfig::default();
        Self {
            rank_adapt: false,
            early_steps: c.early_steps,
            penalty_weight: c.penalty_weight,
            loss_target: c.loss_target,
            compression_target: c.compression_target,
            threshold: c.threshold,
            rank_lr: 1e-3,
            prune_every: 0,
        }
    }
}

impl TtConfig {
    /// The schedule's settings.
    pub fn comera(&self) -> frugal_tt::ComeraConfig {
        frugal_tt::ComeraConfig {
            early_steps: self.early_steps,
            penalty_weight: self.penalty_weight,
            loss_target: self.loss_target,
            compression_target: self.compression_target,
            threshold: self.threshold,
        }
    }

    /// Checks the values (errors name the key, `tt.compression_target`...).
    pub fn validate(&self) -> Result<()> {
        self.comera().validate()?;
        if !(self.rank_lr.is_finite() && self.rank_lr > 0.0) {
            return Err(Error::config(
                "tt.rank_lr",
                format!("{} must be finite and > 0", self.rank_lr),
            ));
        }
        Ok(())
    }
}

/// `[model]`: which model, which size, which linear layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// `"llama"`, `"encoder"` or `"hgrn-bit"`.
    pub kind: ModelKind,
    /// A preset: `tiny`, `60m`, `130m`, `350m`, `1b`, `7b` (llama); `encoder-tiny`,
    /// `encoder-small`, `encoder-6` (encoder).
    pub size: String,
    /// A Hugging Face style model folder to start from (empty: random initialisation); for an
    /// encoder also a run folder (its latest checkpoint).
    pub from_pretrained: String,
    /// The kind of every linear layer but the output head.
    pub linear: LinearKind,
    /// The kind of the word table (llama and encoder): `{ kind = "dense" }` or
    /// `{ kind = "tt", rank = 32, order = 4 }` (CoMERA's TT-matrix embedding).
    pub embedding: EmbeddingKind,
    /// Overrides of the preset's shape (0: the preset's value; `vocab_size` 0 also means "the
    /// tokenizer's size" for the `tiny` preset).
    pub hidden_size: i64,
    /// SwiGLU inner width override.
    pub intermediate_size: i64,
    /// Number of blocks override.
    pub num_layers: i64,
    /// Attention heads override (the key/value heads follow it unless `num_kv_heads` is set).
    pub num_heads: i64,
    /// Key/value heads override (llama; 0: the preset's or the folder's, equal to the heads
    /// when `num_heads` is overridden): fewer than the heads, dividing them, is grouped-query
    /// attention, 1 multi-query.
    pub num_kv_heads: i64,
    /// Vocabulary size override.
    pub vocab_size: i64,
    /// Longest sequence override.
    pub max_seq_len: i64,
    /// Classes of the classification head (`train.objective = "classification"`; 0: the
    /// number of distinct labels of `data.task_path`).
    pub num_labels: i64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            kind: ModelKind::Llama,
            size: "tiny".into(),
            from_pretrained: String::new(),
            linear: LinearKind::Dense,
            embedding: EmbeddingKind::Dense,
            hidden_size: 0,
            intermediate_size: 0,
            num_layers: 0,
            num_heads: 0,
            num_kv_heads: 0,
            vocab_size: 0,
            max_seq_len: 0,
            num_labels: 0,
        }
    }
}

/// `[data]`: where the text comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A file, a folder or a glob of `.txt`/`.jsonl`; empty: the default corpus (pinned Rust
    /// sources from the local cargo registry).
    pub path: String,
    /// Validation text (same forms); empty: every `val_every`-th document of `path`.
    pub val_path: String,
    /// With no `val_path`, document i goes to validation when i % val_every == val_every - 1
    /// (with no `task_val_path`, the same for the rows of `task_path`).
    pub val_every: usize,
    /// Classification examples (`train.objective = "classification"`): a TSV file, rows
    /// `text<TAB>label` or `text<TAB>text2<TAB>label`, header optional.
    pub task_path: String,
    /// Validation examples (same form); empty: every `val_every`-th row of `task_path`.
    pub task_val_path: String,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            path: String::new(),
            val_path: String::new(),
            val_every: 20,
            task_path: String::new(),
            task_val_path: String::new(),
        }
    }
}

/// `[tokenizer]`: a user's `tokenizer.json`, or a byte-level BPE trained on the training text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerConfig {
    /// A Hugging Face `tokenizer.json`; empty: train a byte-level BPE (cached).
    pub path: String,
    /// Vocabulary size of the trained BPE.
    pub vocab_size: usize,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        Self {
            path: String::new(),
            vocab_size: 8192,
        }
    }
}

/// Number format of the forward and backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// f32 everywhere.
    F32,
    /// Linear layers and attention in bf16, f32 master weights, norms, residuals and loss.
    Bf16,
}

/// `[train]`: the loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// `"cpu"`, `"cuda"` or `"auto"`.
    pub device: Device,
    /// `"f32"` or `"bf16"`.
    pub dtype: Dtype,
    /// Number format of the stored parameters (and so of gradients and plain optimizer
    /// moments): `"f32"` (master weights), or `"bf16"` (half the memory, pure-bf16 training).
    pub param_dtype: Dtype,
    /// Seed of initialisation and data order.
    pub seed: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Optimizer steps.
    pub max_steps: u64,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// Floor of the cosine decay, as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Global gradient-norm clipping (0: off).
    pub max_grad_norm: f64,
    /// Evaluate every N steps (0: only at the end).
    pub eval_every: u64,
    /// Batches of the validation split per evaluation (0: all of it).
    pub eval_batches: usize,
    /// Batches of the validation split of the last evaluation (0: all of it, as `frugal eval`
    /// scores it).
    pub final_eval_batches: usize,
    /// Save a checkpoint every N steps (0: only at the end).
    pub save_every: u64,
    /// Checkpoints to keep (the newest; 0: all).
    pub keep_checkpoints: usize,
    /// CPU threads for libtorch (0: libtorch's default).
    pub threads: usize,
    /// Activation checkpointing per block: keep each block's input only and recompute the
    /// block in the backward pass.
    pub checkpointing: bool,
    /// Tokens per chunk of the cross-entropy over the vocabulary, so that the logits never
    /// exist for the whole batch at once (0: no chunking).
    pub ce_chunk: usize,
    /// What the model learns: `"auto"` (the model's own: `"lm"` for llama, `"mlm"` for an
    /// encoder), `"lm"` (next token), `"mlm"` (masked tokens), `"classification"` (labels of
    /// `data.task_path`).
    pub objective: Objective,
    /// `"mlm"`: share of the tokens selected for prediction (BERT's 80/10/10 rule).
    pub mlm_probability: f64,
    /// On CUDA: capture a training step as a CUDA graph after two eager steps and replay it for
    /// every later step: the forward and backward pass, and with AdamW in one process (no
    /// GaLore, no rank adaptation) the clipping and the optimizer step too.
    pub cuda_graph: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            device: Device::Auto,
            dtype: Dtype::F32,
            param_dtype: Dtype::F32,
            seed: 0,
            batch_size: 16,
            seq_len: 128,
            max_steps: 500,
            grad_accum: 1,
            lr: 3e-3,
            warmup_steps: 30,
            min_lr_ratio: 0.1,
            max_grad_norm: 1.0,
            eval_every: 100,
            eval_batches: 16,
            final_eval_batches: 0,
            save_every: 250,
            keep_checkpoints: 2,
            threads: 0,
            checkpointing: false,
            ce_chunk: 0,
            objective: Objective::Auto,
            mlm_probability: 0.15,
            cuda_graph: false,
        }
    }
}

/// `[optim]`: the optimizer and its hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// `"adamw"`, `"adamw8bit"`, `"adafactor"`, or one of them under GaLore's projection
    /// (`"galore-adamw"`...).
    pub name: OptimizerName,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay (tensors of 2+ dimensions only).
    pub weight_decay: f64,
    /// AdamW forms: `"torch"` (torch.optim.AdamW: decay before the update) or `"hf"`
    /// (Hugging Face / galore-torch: bias correction in the step size, decay after).
    pub variant: AdamWVariant,
    /// Per-layer updates: each block's parameters are stepped during the backward pass and
    /// their gradients dropped at once (see `docs/config.md`).
    pub layerwise: bool,
    /// The GaLore projection of the `galore-*` optimizers.
    pub galore: GaloreSettings,
    /// Adafactor's own settings (its `lr` is the trainer's schedule).
    pub adafactor: AdafactorConfig,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            name: OptimizerName::Adamw,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
            variant: AdamWVariant::Torch,
            layerwise: false,
            galore: GaloreSettings::default(),
            adafactor: AdafactorConfig {
                scale_parameter: false,
                ..AdafactorConfig::default()
            },
        }
    }
}

/// `[optim.galore]`: which weights GaLore projects, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GaloreSettings {
    /// Rank of the projection.
    pub rank: usize,
    /// Steps between recomputations of the basis.
    pub update_proj_gap: u64,
    /// Factor on the back-projected update (GaLore's alpha).
    pub scale: f64,
    /// `std`, `reverse_std`, `left`, `right` or `full`.
    pub proj_type: frugal_galore::ProjType,
    /// `exact` or `randomized` SVD.
    pub svd: Svd,
    /// A regex over parameter names: the 2-D weights it matches are projected, the others
    /// use the plain optimizer (default: attention and MLP weights).
    pub target_modules: String,
    /// Double the gap while consecutive bases agree (Q-GaLore's lazy refresh).
    pub lazy_refresh: bool,
    /// Move the first and second moments into the new subspace when the basis changes.
    pub reproject_moments: bool,
}

/// The default of `optim.galore.target_modules`: the token- and channel-mixing weights of every
/// model (llama `model.layers.N.{self_attn,mlp}.*`, hgrn-bit `model.layers.N.{attn,mlp}.*`,
/// encoder `bert.encoder.layer.N.{attention,intermediate,output}.*`); embeddings and heads never
/// match.
pub const DEFAULT_TARGET_MODULES: &str = r"\.(self_attn|attn|mlp|attention|intermediate|output)\.";

impl Default for GaloreSettings {
    fn default() -> Self {
        Self {
            rank: 128,
            update_proj_gap: 200,
            scale: 0.25,
            proj_type: frugal_galore::ProjType::Std,
            svd: Svd::Exact,
            target_modules: DEFAULT_TARGET_MODULES.into(),
            lazy_refresh: false,
            reproject_moments: false,
        }
    }
}

impl OptimConfig {
    /// Whether `optim.name` is a GaLore optimizer.
    pub fn is_galore(&self) -> bool {
        self.name.is_galore()
    }

    /// The optimizer under GaLore's projection (or the optimizer itself).
    pub fn base(&self) -> OptimizerName {
        self.name.base()
    }

    /// Whether parameter `name` of shape `shape` is projected by GaLore.
    pub fn projects(&self, name: &str, shape: &[i64]) -> bool {
        self.is_galore()
            && shape.len() == 2
            && regex::Regex::new(&self.galore.target_modules).is_ok_and(|r| r.is_match(name))
    }
}

impl OptimConfig {
    /// AdamW's settings at learning rate `lr`.
    pub fn adamw(&self, lr: f64) -> AdamWConfig {
        AdamWConfig {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            variant: self.variant,
        }
    }
}

/// Sets `key` (dotted path) in a TOML table to `raw`, parsed as a TOML value (a bare word that
/// is not valid TOML is taken as a string, so `--set train.device=cpu` works).
pub fn set_override(root: &mut toml::Table, key: &str, raw: &str) -> Result<()> {
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed key"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(Error::config(
            key,
            "--set needs key=value with a dotted key such as train.lr",
        ));
    }
    let mut table = root;
    for (i, part) in parts[..parts.len() - 1].iter().enumerate() {
        let entry = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| Error::config(parts[..=i].join("."), "is a value, not a table"))?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// Turns a TOML table into a [`Config`]; errors name the key (`train.lr: invalid type ...`).
/// `model.kind` is `"auto"` when the table has none, and `"auto"` is resolved here
/// ([`ModelKind::resolve`]).
pub fn from_table(mut table: toml::Table) -> Result<Config> {
    if let Some(toml::Value::Table(model)) = table.get_mut("model") {
        model
            .entry("kind")
            .or_insert_with(|| toml::Value::String("auto".into()));
    }
    let de = toml::Value::Table(table);
    let mut cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner().to_string();
        let inner = inner.lines().next().unwrap_or("").trim().to_string();
        if key == "." {
            Error::config("config", inner)
        } else {
            Error::config(key, inner)
        }
    })?;
    cfg.model.kind = cfg.model.kind.resolve(&cfg.model.from_pretrained)?;
    cfg.validate()?;
    Ok(cfg)
}

/// Reads `path` (TOML) and applies `overrides` (`key=value`).
pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| {
        let msg = e.message().to_string();
        let line = e.span().map(|s| text[..s.start].lines().count().max(1));
        Error::Msg(match line {
            Some(l) => format!("{}: line {l}: {msg}", path.display()),
            None => format!("{}: {msg}", path.display()),
        })
    })?;
    apply_overrides(&mut table, overrides)?;
    from_table(table)
}

/// Applies `key=value` overrides to a table.
pub fn apply_overrides(table: &mut toml::Table, overrides: &[String]) -> Result<()> {
    for o in overrides {
        let (k, v) = o.split_once('=').ok_or_else(|| {
            Error::config(
                o.as_str(),
                "--set needs key=value, e.g. --set train.lr=1e-3",
            )
        })?;
        set_override(table, k.trim(), v.trim())?;
    }
    Ok(())
}

impl Config {
    /// Checks values serde cannot: ranges and combinations. Errors name the key.
    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        let positive = [
            ("train.batch_size", t.batch_size as f64),
            ("train.seq_len", t.seq_len as f64),
            ("train.max_steps", t.max_steps as f64),
            ("train.grad_accum", t.grad_accum as f64),
            ("train.lr", t.lr),
            ("data.val_every", self.data.val_every as f64),
            ("dist.timeout_s", self.dist.timeout_s),
        ];
        for (k, v) in positive {
            if !(v > 0.0) {
                return Err(Error::config(k, format!("must be positive, got {v}")));
            }
        }
        if self.train.cuda_graph {
            let t = &self.train;
            let conflicts = [
                (self.optim.layerwise, "optim.layerwise"),
                (t.checkpointing, "train.checkpointing"),
                (t.ce_chunk > 0, "train.ce_chunk"),
                (t.grad_accum > 1, "train.grad_accum > 1"),
                (self.dist.overlap, "dist.overlap"),
                (self.adapter.enabled(), "adapters"),
            ];
            if let Some((_, what)) = conflicts.iter().find(|(on, _)| *on) {
                return Err(Error::config(
                    "train.cuda_graph",
                    format!(
                        "captures the plain step of one micro-batch; it does not combine with \
                         {what} yet"
                    ),
                ));
            }
        }
        if self.dist.overlap && self.dist.galore_projected {
            return Err(Error::config(
                "dist.overlap",
                "cannot be combined with dist.galore_projected yet: the projected gradients are \
                 formed after the backward pass",
            ));
        }
        if self.dist.overlap && self.optim.layerwise {
            return Err(Error::config(
                "dist.overlap",
                "has no effect with optim.layerwise, which already averages each block's \
                 gradients as they are computed, just before its update",
            ));
        }
        if self.dist.zero1 && self.dist.galore_projected {
            return Err(Error::config(
                "dist.zero1",
                "cannot be combined with dist.galore_projected yet: only a parameter's owner \
                 holds its GaLore basis, which the projected all-reduce needs on every rank",
            ));
        }
        if !self.dist.timeout_s.is_finite() {
            return Err(Error::config(
                "dist.timeout_s",
                "must be a finite number of seconds",
            ));
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return Err(Error::config(
                "train.min_lr_ratio",
                "must be between 0 and 1",
            ));
        }
        if t.max_grad_norm < 0.0 {
            return Err(Error::config(
                "train.max_grad_norm",
                "must be >= 0 (0 turns clipping off)",
            ));
        }
        self.model.linear.quant_format()?;
        self.model.embedding.validate()?;
        if self.model.embedding != EmbeddingKind::Dense && self.model.kind == ModelKind::HgrnBit {
            return Err(Error::config(
                "model.embedding",
                "a tensor-train word table is not available for model.kind = \"hgrn-bit\" \
                 (llama and encoder only)",
            ));
        }
        let o = &self.optim;
        let g = &o.galore;
        if o.is_galore() {
            if g.rank == 0 || g.update_proj_gap == 0 {
                return Err(Error::config(
                    "optim.galore",
                    "rank and update_proj_gap must be positive",
                ));
            }
            if let Err(e) = regex::Regex::new(&g.target_modules) {
                let e = e.to_string();
                return Err(Error::config(
                    "optim.galore.target_modules",
                    format!(
                        "'{}' is not a valid regex ({})",
                        g.target_modules,
                        e.lines().last().unwrap_or("")
                    ),
                ));
            }
        }
        self.validate_model()?;
        self.validate_tt()?;
        self.adapter.validate(self)?;
        if self.tokenizer.vocab_size < 300 {
            return Err(Error::config(
                "tokenizer.vocab_size",
                "must be at least 300 (256 bytes plus merges)",
            ));
        }
        Ok(())
    }

    /// Checks the `tt` table and what it needs of the model: rank adaptation needs TT linear
    /// layers (`model.linear.kind = "tt"`) or a TT word table (`model.embedding.kind = "tt"`).
    fn validate_tt(&self) -> Result<()> {
        let tt = &self.tt;
        tt.validate()?;
        if tt.rank_adapt {
            let tt_table = matches!(self.model.embedding, EmbeddingKind::Tt { .. });
            if !matches!(self.model.linear, LinearKind::Tt { .. }) && !tt_table {
                return Err(Error::config(
                    "model.linear",
                    "tt.rank_adapt = true needs tensor-train layers: set model.linear.kind = \"tt\" \
                     (or model.embedding.kind = \"tt\")",
                ));
            }
            // The late stage decides from a micro-batch's loss, before its backward pass,
            // whether the step trains the weights at all: the decoders' block-by-block step
            // (which updates and backpropagates as it goes) cannot wait for that.
            let blockwise = [
                ("optim.layerwise", self.optim.layerwise),
                (
                    "train.checkpointing",
                    self.train.checkpointing && !self.is_encoder(),
                ),
                ("train.ce_chunk", self.train.ce_chunk > 0),
                ("dist.overlap", self.dist.overlap),
            ];
            if let Some((key, _)) = blockwise.iter().find(|(_, on)| *on) {
                return Err(Error::config(
                    *key,
                    format!(
                        "does not combine with tt.rank_adapt for model.kind = \"{}\" yet: the \
                         rank schedule needs each micro-batch's loss before its backward pass",
                        self.model.kind
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The objective `train.objective` resolves to: `Lm`, `Mlm` or `Classification` (never
    /// `Auto`).
    pub fn objective(&self) -> Objective {
        match (self.train.objective, self.model.kind) {
            (Objective::Auto, ModelKind::Encoder) => Objective::Mlm,
            (Objective::Auto, _) => Objective::Lm,
            (o, _) => o,
        }
    }

    /// Whether the model is an encoder.
    pub fn is_encoder(&self) -> bool {
        self.model.kind == ModelKind::Encoder
    }

    /// Checks `model.kind`, `model.size` and the keys that depend on them.
    fn validate_model(&self) -> Result<()> {
        use frugal_models::encoder::PRESETS as ENCODER_PRESETS;
        use frugal_models::llama::PRESETS as LLAMA_PRESETS;
        let m = &self.model;
        let t = &self.train;
        match m.kind {
            ModelKind::Auto => {
                return Err(Error::config(
                    "model.kind",
                    "\"auto\" is resolved when a config is read (config::load, from_table); \
                     a Config built in code names its kind",
                ))
            }
            ModelKind::Llama => {
                if frugal_models::llama::LlamaConfig::preset(&m.size).is_none() {
                    let reason = if ENCODER_PRESETS.contains(&m.size.as_str()) {
                        format!(
                            "'{}' is an encoder preset: set model.kind = \"encoder\" (llama presets: {})",
                            m.size,
                            LLAMA_PRESETS.join(", ")
                        )
                    } else {
                        format!(
                            "unknown preset '{}' (presets: {})",
                            m.size,
                            LLAMA_PRESETS.join(", ")
                        )
                    };
                    return Err(Error::config("model.size", reason));
                }
                if self.objective() != Objective::Lm {
                    return Err(Error::config(
                        "train.objective",
                        format!(
                            "'{}' needs model.kind = \"encoder\" (llama: \"lm\")",
                            t.objective
                        ),
                    ));
                }
            }
            _ if m.num_kv_heads != 0 => {
                return Err(Error::config(
                    "model.num_kv_heads",
                    format!(
                        "grouped-query attention is for model.kind = \"llama\", not '{}'",
                        m.kind
                    ),
                ));
            }
            ModelKind::Encoder => {
                // With model.from_pretrained the folder gives the shape: the preset is unused.
                let preset_used = m.from_pretrained.is_empty();
                if preset_used && frugal_models::encoder::EncoderConfig::preset(&m.size).is_none() {
                    let what = if LLAMA_PRESETS.contains(&m.size.as_str()) {
                        "is a llama preset, not an encoder one"
                    } else {
                        "is not an encoder preset"
                    };
                    return Err(Error::config(
                        "model.size",
                        format!(
                            "'{}' {what} (encoder presets: {})",
                            m.size,
                            ENCODER_PRESETS.join(", ")
                        ),
                    ));
                }
                if self.objective() == Objective::Lm {
                    return Err(Error::config(
                        "train.objective",
                        "an encoder learns \"mlm\" or \"classification\", not \"lm\"",
                    ));
                }
            }
            ModelKind::HgrnBit => {
                use frugal_models::hgrn_bit::PRESETS as HGRN_PRESETS;
                if frugal_models::hgrn_bit::HgrnBitConfig::preset(&m.size).is_none() {
                    return Err(Error::config(
                        "model.size",
                        format!(
                            "'{}' is not an hgrn-bit preset (presets: {})",
                            m.size,
                            HGRN_PRESETS.join(", ")
                        ),
                    ));
                }
                if self.objective() != Objective::Lm {
                    return Err(Error::config(
                        "train.objective",
                        format!("'{}': hgrn-bit is a causal LM (\"lm\")", t.objective),
                    ));
                }
                if m.linear != LinearKind::Dense {
                    return Err(Error::config(
                        "model.linear",
                        "hgrn-bit's projections are BitLinear by definition; leave model.linear \
                         unset",
                    ));
                }
                if !m.from_pretrained.is_empty() {
                    return Err(Error::config(
                        "model.from_pretrained",
                        "is not available for model.kind = \"hgrn-bit\" yet",
                    ));
                }
            }
        }
        if !(t.mlm_probability > 0.0 && t.mlm_probability < 1.0) {
            return Err(Error::config(
                "train.mlm_probability",
                format!("must be between 0 and 1, got {}", t.mlm_probability),
            ));
        }
        if m.num_labels < 0 {
            return Err(Error::config(
                "model.num_labels",
                "must be >= 0 (0: from the data)",
            ));
        }
        let classification = self.objective() == Objective::Classification;
        if classification && self.data.task_path.is_empty() {
            return Err(Error::config(
                "data.task_path",
                "train.objective = \"classification\" needs a TSV file of examples",
            ));
        }
        if !classification {
            for (key, v) in [
                ("data.task_path", &self.data.task_path),
                ("data.task_val_path", &self.data.task_val_path),
            ] {
                if !v.is_empty() {
                    return Err(Error::config(
                        key,
                        "is read only with train.objective = \"classification\"",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The encoder's shape: the preset with the config's overrides, its vocabulary the
    /// tokenizer's (`tokenizer_vocab`) unless `model.vocab_size` says more.
    pub fn encoder_config(
        &self,
        tokenizer_vocab: i64,
    ) -> Result<frugal_models::encoder::EncoderConfig> {
        let m = &self.model;
        let mut c = frugal_models::encoder::EncoderConfig::preset(&m.size)
            .ok_or_else(|| {
                Error::config(
                    "model.size",
                    format!("'{}' is not an encoder preset", m.size),
                )
            })?
            .with_vocab_size(tokenizer_vocab);
        let set = |v: i64, field: &mut i64| {
            if v > 0 {
                *field = v;
            }
        };
        set(m.hidden_size, &mut c.hidden_size);
        set(m.intermediate_size, &mut c.intermediate_size);
        set(m.num_layers, &mut c.num_hidden_layers);
        set(m.num_heads, &mut c.num_attention_heads);
        set(m.vocab_size, &mut c.vocab_size);
        set(m.max_seq_len, &mut c.max_position_embeddings);
        c.validate()?;
        self.check_encoder_fits(&c, tokenizer_vocab)?;
        Ok(c)
    }

    /// Checks that an encoder of shape `c` takes the tokenizer's ids and `train.seq_len`.
    pub fn check_encoder_fits(
        &self,
        c: &frugal_models::encoder::EncoderConfig,
        tokenizer_vocab: i64,
    ) -> Result<()> {
        check_vocab(c.vocab_size, tokenizer_vocab)?;
        if self.train.seq_len as i64 > c.max_position_embeddings {
            return Err(Error::config(
                "train.seq_len",
                format!(
                    "{} is longer than the model allows ({} positions; raise model.max_seq_len)",
                    self.train.seq_len, c.max_position_embeddings
                ),
            ));
        }
        Ok(())
    }

    /// The causal model's shape: [`Config::llama_config`] for a LLaMA, the hgrn-bit preset with
    /// the config's overrides (`hidden_size`, `intermediate_size`, `num_layers`, `vocab_size`;
    /// `tiny` takes the tokenizer's vocabulary) for the MatMul-free LM.
    pub fn decoder_config(
        &self,
        tokenizer_vocab: i64,
    ) -> Result<frugal_models::decoder::DecoderConfig> {
        use frugal_models::decoder::DecoderConfig;
        let m = &self.model;
        if m.kind != ModelKind::HgrnBit {
            return self.llama_config(tokenizer_vocab).map(DecoderConfig::Llama);
        }
        let mut c = frugal_models::hgrn_bit::HgrnBitConfig::preset(&m.size).expect("validated");
        if m.size == "tiny" {
            c.vocab_size = tokenizer_vocab;
        }
        if m.hidden_size > 0 {
            c.hidden_size = m.hidden_size;
            c.intermediate_size = frugal_models::hgrn_bit::glu_width(m.hidden_size);
        }
        for (v, field) in [
            (m.intermediate_size, &mut c.intermediate_size),
            (m.num_layers, &mut c.num_hidden_layers),
            (m.vocab_size, &mut c.vocab_size),
        ] {
            if v > 0 {
                *field = v;
            }
        }
        c.validate()?;
        check_vocab(c.vocab_size, tokenizer_vocab)?;
        Ok(DecoderConfig::HgrnBit(c))
    }

    /// The model shape: the preset with the config's overrides; `tokenizer_vocab` sizes the
    /// vocabulary when the preset is `tiny` and no override is given.
    pub fn llama_config(&self, tokenizer_vocab: i64) -> Result<frugal_models::llama::LlamaConfig> {
        let m = &self.model;
        if m.kind != ModelKind::Llama {
            return Err(Error::config(
                "model.kind",
                format!("this needs a llama model, the run's is '{}'", m.kind),
            ));
        }
        let pretrained = std::path::Path::new(&m.from_pretrained).join("config.json");
        let mut c = if !m.from_pretrained.is_empty() && pretrained.is_file() {
            // A Hugging Face model folder: its own shape (of model_type llama; any other type,
            // and any key the LLaMA would not honour, is refused by name).
            frugal_models::llama::LlamaConfig::from_hf_file(&pretrained)?
        } else {
            let mut c = frugal_models::llama::LlamaConfig::preset(&m.size).expect("validated");
            if m.size == "tiny" {
                c.vocab_size = tokenizer_vocab;
            }
            c
        };
        let set = |v: i64, field: &mut i64| {
            if v > 0 {
                *field = v;
            }
        };
        set(m.hidden_size, &mut c.hidden_size);
        set(m.intermediate_size, &mut c.intermediate_size);
        set(m.num_layers, &mut c.num_hidden_layers);
        set(m.num_heads, &mut c.num_attention_heads);
        if m.num_kv_heads != 0 {
            if m.num_kv_heads < 0 || c.num_attention_heads % m.num_kv_heads != 0 {
                return Err(Error::config(
                    "model.num_kv_heads",
                    format!(
                        "{} must be positive and divide the {} attention heads",
                        m.num_kv_heads, c.num_attention_heads
                    ),
                ));
            }
            c.num_key_value_heads = m.num_kv_heads;
        } else if m.num_heads > 0 {
            c.num_key_value_heads = c.num_attention_heads;
        }
        set(m.vocab_size, &mut c.vocab_size);
        set(m.max_seq_len, &mut c.max_position_embeddings);
        c.validate()?;
        c.check_embedding(&m.embedding)?;
        check_vocab(c.vocab_size, tokenizer_vocab)?;
        if self.train.seq_len as i64 > c.max_position_embeddings {
            return Err(Error::config(
                "train.seq_len",
                format!(
                    "{} is longer than the model allows ({} positions; raise model.max_seq_len)",
                    self.train.seq_len, c.max_position_embeddings
                ),
            ));
        }
        Ok(c)
    }
}

/// What building a model's variables reads of the configuration (parts of `[model]`,
/// `[adapter]` and `[train]`): the layers' kinds, the number formats and the seed.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelBuild {
    /// The blocks' linear layers: `model.linear`, or the quantized base an adapter kind
    /// chooses (QLoRA: NF4, QA-LoRA: int4).
    pub linear: LinearKind,
    /// The word table (`model.embedding`).
    pub embedding: EmbeddingKind,
    /// Store the parameters in bf16 (`train.param_dtype`).
    pub bf16_params: bool,
    /// The forward pass's number format (`train.dtype`).
    pub compute: tch::Kind,
    /// The initialisation's seed (`train.seed`).
    pub seed: u64,
    /// Store the decoder's frozen word table and output head in bf16 (an adapter run computing
    /// in bf16: see `run::model`).
    pub frozen_tables_bf16: bool,
}

impl ModelBuild {
    /// Seeds the initialisation and returns the variable store the model is built in on
    /// `device` (new variables directly in bf16 with `bf16_params`: never an f32 copy).
    pub fn var_store(&self, device: tch::Device) -> tch::nn::VarStore {
        tch::manual_seed(self.seed as i64);
        let mut vs = tch::nn::VarStore::new(device);
        if self.bf16_params {
            vs.set_kind(tch::Kind::BFloat16);
        }
        vs
    }
}

impl Config {
    /// What building the model reads of this configuration.
    pub fn model_build(&self) -> ModelBuild {
        let kind = |d: Dtype| match d {
            Dtype::F32 => tch::Kind::Float,
            Dtype::Bf16 => tch::Kind::BFloat16,
        };
        ModelBuild {
            linear: self
                .adapter
                .base_linear()
                .unwrap_or_else(|| self.model.linear.clone()),
            embedding: self.model.embedding.clone(),
            bf16_params: self.train.param_dtype == Dtype::Bf16,
            compute: kind(self.train.dtype),
            seed: self.train.seed,
            frozen_tables_bf16: self.adapter.enabled() && self.train.dtype == Dtype::Bf16,
        }
    }
}

/// The model's vocabulary must hold the tokenizer's; the error names `model.vocab_size`.
fn check_vocab(model_vocab: i64, tokenizer_vocab: i64) -> Result<()> {
    if model_vocab < tokenizer_vocab {
        return Err(Error::config(
            "model.vocab_size",
            format!("{model_vocab} is smaller than the tokenizer's vocabulary ({tokenizer_vocab})"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn overrides_parse_values_and_bare_words() {
        let mut t = table("[train]\nlr = 1.0\n");
        apply_overrides(
            &mut t,
            &[
                "train.lr=0.5".into(),
                "train.device=cpu".into(),
                "model.size=\"60m\"".into(),
            ],
        )
        .unwrap();
        let c = from_table(t).unwrap();
        assert_eq!(c.train.lr, 0.5);
        assert_eq!(c.train.device, Device::Cpu);
        assert_eq!(c.model.size, "60m");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = from_table(table("[train]\nlearning_rate = 1.0\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("train") && err.contains("learning_rate"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1);
    }

    #[test]
    fn wrong_type_is_named() {
        let err = from_table(table("[train]\nbatch_size = \"big\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("train.batch_size:"), "{err}");
        let mut t = toml::Table::new();
        let err = apply_overrides(&mut t, &["train.max_steps".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("key=value"), "{err}");
    }

    #[test]
    fn seq_len_beyond_the_model_is_named() {
        let mut c = Config::default();
        c.train.seq_len = 100_000;
        let err = c.llama_config(8192).unwrap_err().to_string();
        assert!(err.starts_with("train.seq_len:"), "{err}");
    }

    /// Guarantee: the `[dist]` keys are checked: a timeout must be positive and finite, and a
    /// sharded optimizer state does not combine with the projected all-reduce.
    #[test]
    fn dist_keys_are_checked() {
        let with = |d: DistConfig| {
            Config {
                dist: d,
                ..Config::default()
            }
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
        };
        assert_eq!(with(DistConfig::default()), "");
        for t in [0.0, -1.0, f64::INFINITY, f64::NAN] {
            let e = with(DistConfig {
                timeout_s: t,
                ..DistConfig::default()
            });
            assert!(e.contains("dist.timeout_s"), "{t}: {e}");
        }
        let e = with(DistConfig {
            zero1: true,
            galore_projected: true,
            ..DistConfig::default()
        });
        assert!(e.contains("dist.zero1"), "{e}");
    }

    /// Guarantee: GaLore's default targets are the token- and channel-mixing weights of the
    /// three models, never embeddings, norms, lower bounds or heads.
    #[test]
    fn galore_default_targets_both_models() {
        let o = OptimConfig {
            name: OptimizerName::GaloreAdamw,
            ..OptimConfig::default()
        };
        for n in [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
            "bert.encoder.layer.0.attention.self.query.weight",
            "bert.encoder.layer.0.attention.output.dense.weight",
            "bert.encoder.layer.3.intermediate.dense.weight",
            "bert.encoder.layer.3.output.dense.weight",
            "model.layers.0.attn.i_proj.weight",
            "model.layers.2.attn.o_proj.weight",
            "model.layers.2.mlp.gate_proj.weight",
        ] {
            assert!(o.projects(n, &[8, 8]), "{n}");
        }
        for n in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "bert.embeddings.word_embeddings.weight",
            "bert.embeddings.position_embeddings.weight",
            "cls.predictions.transform.dense.weight",
            "bert.pooler.dense.weight",
            "classifier.weight",
            "model.embeddings.weight",
            "model.lower_bounds",
        ] {
            assert!(!o.projects(n, &[8, 8]), "{n}");
        }
        assert!(!o.projects("bert.encoder.layer.0.output.LayerNorm.weight", &[8]));
    }

    /// Guarantee: `train.objective = "auto"` is the model's own; the encoder keys are checked
    /// against the model kind.
    #[test]
    fn objective_follows_the_model() {
        let mut c = Config::default();
        assert_eq!(c.objective(), Objective::Lm);
        c.model.kind = ModelKind::Encoder;
        c.model.size = "encoder-tiny".into();
        c.validate().unwrap();
        assert_eq!(c.objective(), Objective::Mlm);
        c.train.objective = Objective::Classification;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("data.task_path:"), "{err}");
        c.data.task_path = "x.tsv".into();
        c.validate().unwrap();
        c.train.objective = Objective::Mlm;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("data.task_path:"), "{err}");
        c.data.task_path.clear();
        c.train.mlm_probability = 1.5;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("train.mlm_probability:"), "{err}");
        c.train.mlm_probability = 0.15;
        // The block-by-block step's options are the encoder's too.
        c.train.ce_chunk = 64;
        c.optim.layerwise = true;
        c.validate().unwrap();
        c.train.ce_chunk = 0;
        c.optim.layerwise = false;
        let err = c.llama_config(100).unwrap_err().to_string();
        assert!(err.starts_with("model.kind:"), "{err}");
        let shape = c.encoder_config(500).unwrap();
        assert_eq!((shape.vocab_size, shape.hidden_size), (500, 128));
        c.model.vocab_size = 400;
        let err = c.encoder_config(500).unwrap_err().to_string();
        assert!(err.starts_with("model.vocab_size:"), "{err}");
    }

    /// Guarantee: `model.kind = "auto"`, the default when a config names no kind, takes the
    /// `from_pretrained` folder's family (a decoder type is llama, bert the encoder), or a run
    /// folder's kind, else llama; a type no kind loads is refused by name, and a folder that
    /// tells nothing is an error naming `model.kind`. A named kind stays as named.
    #[test]
    fn auto_kind_takes_the_folders_family() {
        let dir = tempfile::tempdir().unwrap();
        let folder = |name: &str, model_type: &str| {
            let d = dir.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            let text = format!(r#"{{"model_type": "{model_type}"}}"#);
            std::fs::write(d.join("config.json"), text).unwrap();
            d.display().to_string()
        };
        let read = |model: &str| {
            let table: toml::Table = toml::from_str(&format!("[model]\n{model}")).unwrap();
            from_table(table).map(|c| c.model.kind)
        };
        assert_eq!(read("").unwrap(), ModelKind::Llama);
        assert_eq!(read("kind = \"auto\"").unwrap(), ModelKind::Llama);
        for (t, kind) in [
            ("qwen2", ModelKind::Llama),
            ("mistral", ModelKind::Llama),
            ("bert", ModelKind::Encoder),
        ] {
            let from = folder(t, t);
            assert_eq!(
                read(&format!("from_pretrained = {from:?}")).unwrap(),
                kind,
                "{t}"
            );
        }
        let bert = folder("bert2", "bert");
        assert_eq!(
            read(&format!("kind = \"llama\"\nfrom_pretrained = {bert:?}")).unwrap(),
            ModelKind::Llama
        );
        let gpt2 = folder("gpt2", "gpt2");
        let err = read(&format!("from_pretrained = {gpt2:?}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config.json: model_type: \"gpt2\" is not supported"),
            "{err}"
        );
        let run = dir.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(
            run.join("config.toml"),
            "[model]\nkind = \"encoder\"\nsize = \"encoder-tiny\"\n",
        )
        .unwrap();
        let from = run.display().to_string();
        assert_eq!(
            read(&format!("from_pretrained = {from:?}")).unwrap(),
            ModelKind::Encoder
        );
        let empty = dir.path().join("empty").display().to_string();
        let err = read(&format!("from_pretrained = {empty:?}"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("model.kind: \"auto\""), "{err}");
        let mut c = Config::default();
        c.model.kind = ModelKind::Auto;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("model.kind:"));
    }

    /// Guarantee: every closed set of values is an enum: a value outside it is a one-line error
    /// that names the key and lists the values it takes, and each value reads back as the
    /// config spells it.
    #[test]
    fn closed_sets_name_the_key_and_the_choices() {
        for (key, good, want) in [
            ("model.kind", "hgrn-bit", "encoder"),
            ("train.objective", "classification", "mlm"),
            ("optim.name", "galore-adamw8bit", "adafactor"),
            ("optim.galore.proj_type", "reverse_std", "left"),
            ("optim.galore.svd", "randomized", "exact"),
            ("adapter.kind", "qalora", "dora"),
            ("dist.backend", "nccl", "mpi"),
        ] {
            let mut t = toml::Table::new();
            apply_overrides(&mut t, &[format!("{key}=bogus")]).unwrap();
            let err = from_table(t).unwrap_err().to_string();
            assert!(err.starts_with(&format!("{key}: ")), "{err}");
            assert!(err.contains("bogus") && err.contains(want), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
            let mut t = toml::Table::new();
            apply_overrides(&mut t, &[format!("{key}={good}")]).unwrap();
            let text = toml::to_string(
                &serde_path_to_error::deserialize::<_, Config>(toml::Value::Table(t)).unwrap(),
            )
            .unwrap();
            assert!(text.contains(&format!("\"{good}\"")), "{key}: {text}");
        }
        assert_eq!(
            OptimizerName::GaloreAdamw8bit.base(),
            OptimizerName::Adamw8bit
        );
        assert!(
            OptimizerName::GaloreAdafactor.is_galore() && !OptimizerName::Adafactor.is_galore()
        );
        assert_eq!(ModelKind::HgrnBit.to_string(), "hgrn-bit");
    }

    #[test]
    fn resolved_config_round_trips_through_toml() {
        let c = Config::default();
        let text = toml::to_string(&c).unwrap();
        assert_eq!(from_table(table(&text)).unwrap(), c);
    }

    /// Guarantee: presets keep kv_heads = heads, also under a `model.num_heads` override;
    /// `model.num_kv_heads` sets them (grouped-query attention), and a value that does not
    /// divide the heads, or one for another model kind, is an error naming the key.
    #[test]
    fn num_kv_heads_is_grouped_query_attention_by_key() {
        let mut c = Config::default();
        c.train.seq_len = 16;
        let shape = c.llama_config(8192).unwrap();
        assert_eq!(shape.num_key_value_heads, shape.num_attention_heads);
        c.model.num_heads = 8;
        assert_eq!(c.llama_config(8192).unwrap().num_key_value_heads, 8);
        c.model.num_kv_heads = 2;
        let shape = c.llama_config(8192).unwrap();
        assert_eq!(
            (shape.num_attention_heads, shape.num_key_value_heads),
            (8, 2)
        );
        c.model.num_kv_heads = 3;
        let err = c.llama_config(8192).unwrap_err().to_string();
        assert!(err.starts_with("model.num_kv_heads: 3 must"), "{err}");
        c.model.num_kv_heads = 2;
        c.model.kind = ModelKind::Encoder;
        c.model.size = "encoder-tiny".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("model.num_kv_heads:"), "{err}");
    }
}
