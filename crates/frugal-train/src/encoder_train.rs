//! Training the BERT-style encoder (`model.kind = "encoder"`):
//!
//! - **masked-LM pre-training** (`train.objective = "mlm"`, the default for encoders) on the
//!   text pipeline of the llama runs (same corpus, same packing, the same tokenizer with the
//!   encoder's special tokens appended, see [`tokenize::add_encoder_tokens`]). Each sequence is
//!   `<|cls|>` followed by `seq_len - 1` tokens of the packed stream; BERT's rule selects
//!   `train.mlm_probability` of the non-special tokens (80% mask, 10% random, 10% kept). The
//!   masks of micro-batch k of step s are drawn from a seed of (`train.seed`, s, k), so a resumed
//!   run draws the masks of an uninterrupted one; validation batch i always gets the same masks
//!   (a seed of i alone), so validation losses compare across evaluations, runs and
//!   `frugal eval`.
//! - **sequence classification** (`train.objective = "classification"`) on TSV examples
//!   (`data.task_path`, `data.task_val_path`, see [`crate::tsv`]), usually from a pre-trained
//!   encoder (`model.from_pretrained`: a run folder or a model folder; its masked-LM head is
//!   dropped, pooler and classifier start fresh).
//!
//! The loop has the llama loop's schedule, gradient accumulation, clipping, evaluation,
//! `metrics.jsonl`, `loss.png`, checkpoints, exact resume, Ctrl-C and `memory.json`, and
//! activation checkpointing (`train.checkpointing`: the blocks keep only their inputs and are
//! recomputed in the backward pass, [`frugal_models::encoder::Checkpointed`]). Per-layer updates
//! and the chunked cross-entropy are llama-only (refused by the config). The run folder also
//! holds `config.json` (the shape, Hugging Face `BertConfig` names) and, for classification,
//! `labels.json` (labels by class id).
//!
//! With TT linear layers and `tt.rank_adapt`, the loop runs CoMERA's two-stage rank adaptation
//! through [`crate::comera`] (loss term per micro-batch, the rank variables' step and physical
//! pruning after the main step, `tt_*` metrics, `ranks.png`, `optimizer_tt.safetensors`). Data,
//! tokenizer and shape live in `encoder_io`, evaluation in [`crate::encoder_eval`].

use crate::checkpoint::{self, TrainerState};
use crate::comera::{self, Comera};
use crate::config::{Config, Dtype};
use crate::data::{Document, Sampler};
use crate::encoder_io::{
    example_texts, label_map, pretrained_dir, pretrained_weights, prior_loss, shape, task_examples,
    tokenizer, train_mask_seed, write_shape, Data,
};
use crate::progress::Progress;
use crate::run;
use crate::schedule::lr_at;
use crate::train::{line_has_val, Metrics, StepClock, Summary, INTERRUPTED};
use crate::tsv;
use frugal_core::memory::{self, Accounting};
use frugal_core::safetensors_io::SafetensorsFile;
use frugal_core::{atomic, Error, Result};
use frugal_models::embedding::WordEmbedding;
use frugal_models::encoder::{
    Checkpointed, Encoder, EncoderConfig, EncoderForClassification, EncoderForMaskedLm,
    IGNORE_INDEX,
};
use frugal_models::linear::Linear;
use frugal_optim::clip_grad_norm;
use frugal_tt::{Objective, TtLayer};
use serde_json::json;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Kind, Reduction, Tensor};

pub use crate::encoder_eval::{eval_command, evaluate_cls, evaluate_mlm};
pub use crate::encoder_io::mlm_inputs;

/// The network of an encoder run.
#[derive(Debug)]
pub enum Net {
    /// With the masked-LM head.
    Mlm(EncoderForMaskedLm),
    /// With the classification head.
    Cls(EncoderForClassification),
}

/// An encoder and the variables it lives in.
pub struct EncoderModel {
    /// The variables, by Hugging Face name.
    pub vs: VarStore,
    /// The network.
    pub net: Net,
}

/// The loss of a micro-batch (`inputs` on the model's device: masked-LM `[ids, labels]`,
/// classification `[ids, types, mask, labels]`); for classification also the examples
/// classified right (a 0-dim tensor, not read back, so that a CUDA graph can record it); with
/// `checkpointing` the blocks whose backward pass runs after the loss's. `recordable` computes
/// the masked-LM loss over every position (shapes that do not depend on the masking, no read
/// back to the host: what a CUDA graph records), the same loss.
pub fn micro_loss(
    m: &EncoderModel,
    inputs: &[Tensor],
    checkpointing: bool,
    recordable: bool,
) -> (Tensor, Option<Tensor>, Option<Checkpointed>) {
    let hidden = |ids: &Tensor, types: Option<&Tensor>, mask: Option<&Tensor>| {
        let enc = m.encoder();
        if checkpointing {
            let ck = enc.forward_checkpointed(ids, types, mask);
            (ck.hidden().shallow_clone(), Some(ck))
        } else {
            (enc.forward(ids, types, mask), None)
        }
    };
    match (&m.net, inputs) {
        (Net::Mlm(mlm), [ids, labels]) => {
            let (h, ck) = hidden(ids, None, None);
            let loss = if recordable {
                mlm.loss_of_hidden_all_rows(&h, labels)
            } else {
                mlm.loss_of_hidden(&h, labels)
            };
            (loss, None, ck)
        }
        (Net::Cls(c), [ids, types, mask, labels]) => {
            let (h, ck) = hidden(ids, Some(types), Some(mask));
            let logits = c.head(&h);
            let correct =
                tch::no_grad(|| logits.argmax(1, false).eq_tensor(labels).sum(Kind::Int64));
            let loss = logits.cross_entropy_loss::<Tensor>(
                labels,
                None,
                Reduction::Mean,
                IGNORE_INDEX,
                0.0,
            );
            (loss, Some(correct), ck)
        }
        _ => unreachable!("model and inputs of one objective"),
    }
}

#[allow(clippy::type_complexity)]
fn weights_mut_of(
    net: &mut Net,
) -> (
    Vec<(String, &mut Box<dyn Linear>)>,
    Vec<(String, &mut WordEmbedding)>,
) {
    match net {
        Net::Mlm(m) => m.weights_mut(),
        Net::Cls(m) => m.weights_mut(),
    }
}

impl EncoderModel {
    /// Builds the configured encoder of shape `shape` on `device`, seeded by `train.seed`: with
    /// the masked-LM head, or with a classification head of `num_labels` classes.
    pub fn new(
        cfg: &Config,
        shape: &EncoderConfig,
        num_labels: Option<i64>,
        device: tch::Device,
    ) -> Result<Self> {
        tch::manual_seed(cfg.train.seed as i64);
        let mut vs = VarStore::new(device);
        if cfg.train.param_dtype == Dtype::Bf16 {
            vs.set_kind(Kind::BFloat16);
        }
        let compute = match cfg.train.dtype {
            Dtype::F32 => Kind::Float,
            Dtype::Bf16 => Kind::BFloat16,
        };
        let root = vs.root();
        let (kind, emb) = (&cfg.model.linear, &cfg.model.embedding);
        let net = match num_labels {
            None => Net::Mlm(EncoderForMaskedLm::new(&root, shape, kind, emb, compute)?),
            Some(n) => Net::Cls(EncoderForClassification::new(
                &root, shape, n, kind, emb, compute,
            )?),
        };
        Ok(Self { vs, net })
    }

    /// The encoder without its head.
    pub fn encoder(&self) -> &Encoder {
        match &self.net {
            Net::Mlm(m) => &m.encoder,
            Net::Cls(m) => &m.encoder,
        }
    }

    /// Every linear layer of the blocks, with its full name.
    pub fn linears(&self) -> Vec<(String, &dyn Linear)> {
        match &self.net {
            Net::Mlm(m) => m.linears(),
            Net::Cls(m) => m.linears(),
        }
    }

    /// The word tables, with their full names.
    pub fn tables(&self) -> Vec<(String, &WordEmbedding)> {
        match &self.net {
            Net::Mlm(m) => m.tables(),
            Net::Cls(m) => m.tables(),
        }
    }

    /// Every tensor-train layer (word table, block linears), with its full name.
    pub fn tt_layers(&self) -> Vec<(String, &dyn TtLayer)> {
        match &self.net {
            Net::Mlm(m) => m.tt_layers(),
            Net::Cls(m) => m.tt_layers(),
        }
    }

    /// [`EncoderModel::tt_layers`], mutable, with the variables they live in (to prune them).
    pub fn tt_layers_mut(&mut self) -> (Vec<(String, &mut dyn TtLayer)>, &VarStore) {
        let layers = match &mut self.net {
            Net::Mlm(m) => m.tt_layers_mut(),
            Net::Cls(m) => m.tt_layers_mut(),
        };
        (layers, &self.vs)
    }

    /// Saves the weights (variables, quantized layers, TT descriptions) to `file`, atomically.
    pub fn save(&self, file: &Path) -> Result<()> {
        frugal_models::weights::save_model_with_tables(
            &self.vs,
            &self.linears(),
            &self.tables(),
            file,
        )
    }

    /// Loads every weight of the model from `file` (a checkpoint of the same model).
    pub fn load(&mut self, file: &Path) -> Result<()> {
        let (mut linears, mut tables) = weights_mut_of(&mut self.net);
        frugal_models::weights::load_model_with_tables(
            &mut self.vs,
            &mut linears,
            &mut tables,
            file,
        )
    }

    /// Loads a pre-trained encoder body from `file`: every `bert.embeddings.*` and
    /// `bert.encoder.*` weight (required), and the masked-LM head when this model has one and
    /// the file too. The pooler and classifier keep their fresh initialisation.
    pub fn load_pretrained(&mut self, file: &Path) -> Result<()> {
        let names = SafetensorsFile::open(file)?.names();
        let head_in_file = names.iter().any(|n| n.starts_with("cls.predictions."));
        let mlm = matches!(self.net, Net::Mlm(_));
        let mut body = VarStore::new(self.vs.device());
        {
            let mut v = body.variables_.lock().expect("fresh store");
            for (n, t) in frugal_models::weights::named_variables(&self.vs) {
                let wanted = n.starts_with("bert.embeddings.")
                    || n.starts_with("bert.encoder.")
                    || (mlm && head_in_file && n.starts_with("cls.predictions."));
                if wanted {
                    // Shallow: loading into `body` fills this model's tensors.
                    v.named_variables.insert(n, t.shallow_clone());
                }
            }
        }
        let (mut linears, mut tables) = weights_mut_of(&mut self.net);
        frugal_models::weights::load_model_with_tables(&mut body, &mut linears, &mut tables, file)?;
        // TT layers of other ranks (a pruned checkpoint) got new variables in `body`.
        frugal_models::weights::adopt_variables(&self.vs, body)
    }
}

/// Trains an encoder as `cfg` says into `run_dir` (see the module documentation).
pub fn train(cfg: &Config, run_dir: &Path, resume: bool) -> Result<Summary> {
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    if cfg.train.threads > 0 {
        tch::set_num_threads(cfg.train.threads as i32);
    }
    let device = cfg.train.device.resolve()?;
    crate::cuda_graph::check_device(cfg, device)?;
    let t = &cfg.train;
    let classification = cfg.objective() == "classification";

    eprintln!("frugal: loading data");
    let (docs, rows) = if classification {
        (None, Some(task_examples(cfg)?))
    } else {
        (Some(run::documents(cfg)?), None)
    };
    let texts = || -> Vec<String> {
        match (&docs, &rows) {
            (Some((train, _)), _) => train.iter().map(|d: &Document| d.text.clone()).collect(),
            (_, Some((train, _))) => example_texts(train),
            _ => Vec::new(),
        }
    };
    let (tok, toks) = tokenizer(cfg, run_dir, resume, &texts)?;
    let vocab = tok.get_vocab_size(true) as i64;
    let shape = shape(cfg, run_dir, resume, vocab)?;

    let (data, baseline) = match (docs, rows) {
        (Some((train_docs, val_docs)), _) => {
            let train = run::dataset(&tok, &train_docs, t.seq_len, "training data")?;
            let val = run::dataset(&tok, &val_docs, t.seq_len, "validation data")?;
            let unigram = run::unigram_loss(train.tokens(), val.tokens(), vocab as usize);
            (Data::Mlm { train, val }, unigram)
        }
        (_, Some((train_rows, val_rows))) => {
            let labels = label_map(cfg, run_dir, resume, &train_rows)?;
            let train_ids = labels.ids(&train_rows, &cfg.data.task_path)?;
            let val_file = if cfg.data.task_val_path.is_empty() {
                &cfg.data.task_path
            } else {
                &cfg.data.task_val_path
            };
            let val_ids = labels.ids(&val_rows, val_file)?;
            let prior = prior_loss(&train_ids, &val_ids, labels.labels.len());
            let train = tsv::encode(&tok, &toks, &train_rows, train_ids, t.seq_len)?;
            let val = tsv::encode(&tok, &toks, &val_rows, val_ids, t.seq_len)?;
            (Data::Cls { train, val, labels }, prior)
        }
        _ => unreachable!("one kind of data"),
    };
    let num_labels = match &data {
        Data::Cls { labels, .. } => Some(if cfg.model.num_labels > 0 {
            cfg.model.num_labels
        } else {
            labels.labels.len() as i64
        }),
        Data::Mlm { .. } => None,
    };
    // Inputs are known good: mark the folder as a run.
    if !resume {
        let resolved = toml::to_string(cfg).map_err(|e| Error::Msg(format!("config: {e}")))?;
        atomic::write(&run_dir.join("config.toml"), resolved.as_bytes())?;
        let labels = match &data {
            Data::Cls { labels, .. } => {
                atomic::write(&run_dir.join("labels.json"), labels.to_json().as_bytes())?;
                Some(labels)
            }
            Data::Mlm { .. } => None,
        };
        write_shape(run_dir, &shape, &toks, labels)?;
    }
    let num_examples = match &data {
        Data::Mlm { train, val } => {
            eprintln!(
                "frugal: {} training tokens ({} sequences of {}), {} validation tokens, vocabulary {vocab}",
                train.tokens().len(),
                train.num_sequences(),
                t.seq_len,
                val.tokens().len()
            );
            train.num_sequences()
        }
        Data::Cls { train, val, labels } => {
            eprintln!(
                "frugal: {} training and {} validation examples, {} labels, vocabulary {vocab}",
                train.len(),
                val.len(),
                labels.labels.len()
            );
            train.len()
        }
    };

    let baseline_rss = memory::current_rss_bytes();
    let checkpoint = if resume {
        Some(checkpoint::latest(run_dir)?)
    } else {
        None
    };
    let mut m = EncoderModel::new(cfg, &shape, num_labels, device)?;
    match (&checkpoint, pretrained_dir(cfg)) {
        (Some(ck), _) => m.load(&ck.join("model.safetensors"))?,
        (None, Some(dir)) => m.load_pretrained(&pretrained_weights(&dir)?)?,
        (None, None) => {}
    }
    let params = frugal_models::weights::named_variables(&m.vs);
    let mut tensors: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
    let n_params: i64 = tensors.iter().map(|t| t.numel() as i64).sum();
    eprintln!(
        "frugal: encoder {} ({}, {:.2}M parameters) on {device:?}, {:?}",
        cfg.model.size,
        cfg.objective(),
        n_params as f64 / 1e6,
        t.dtype
    );
    // Rank adaptation: the rank variables get their own optimizer.
    let (mut tt, params) = if cfg.tt.rank_adapt {
        let (mut layers, _) = m.tt_layers_mut();
        let (c, main) = Comera::new(cfg, &mut layers, params)?;
        (Some(c), main)
    } else {
        (None, params)
    };
    let mut opt = crate::optimizers::build(cfg, params, t.lr)?;

    let mut state = TrainerState {
        step: 0,
        tokens: 0,
        sampler: Sampler::new(num_examples, t.seed).state(),
        elapsed_s: 0.0,
        prev_grad_norm: None,
        tt_late_start_size: None,
    };
    if let Some(ck) = &checkpoint {
        opt.load(&ck.join("optimizer.safetensors"))?;
        state = checkpoint::read_state(ck)?;
        if let Some(c) = &mut tt {
            c.restore(ck, &state)?;
        }
        eprintln!(
            "frugal: resuming from {} (step {})",
            ck.display(),
            state.step
        );
    }
    let mut history = Metrics::open(&run_dir.join("metrics.jsonl"), state.step)?;
    let mut sampler = Sampler::from_state(num_examples, state.sampler);
    let baseline_name = match &data {
        Data::Mlm { .. } => "unigram (val)",
        Data::Cls { .. } => "label prior (val)",
    };

    let evaluate = |m: &EncoderModel, batches: usize| -> Result<(f64, Option<f64>)> {
        match (&m.net, &data) {
            (Net::Mlm(mlm), Data::Mlm { val, .. }) => {
                let (l, _) = evaluate_mlm(
                    mlm,
                    val,
                    &toks,
                    vocab,
                    t.mlm_probability,
                    t.batch_size,
                    batches,
                    device,
                )?;
                Ok((l, None))
            }
            (Net::Cls(c), Data::Cls { val, .. }) => {
                let (l, acc, _) = evaluate_cls(c, val, t.batch_size, batches, device);
                Ok((l, Some(acc)))
            }
            _ => unreachable!("model and data of one objective"),
        }
    };

    let mut progress = Progress::new(t.max_steps, state.step);
    let mut clock = StepClock::new(&state, cfg.optim.is_galore(), device);
    let (mut val_loss, mut val_acc) = (f64::NAN, None);
    let mut interrupted = false;
    // `train.cuda_graph`: the captured step with the rank-adaptation stage it was captured
    // for (the early stage's penalty weight), and the eager steps since the last change of
    // the parameters. Classification batches are padded to one length, the graph's shape.
    let mut step_graph: Option<(Option<f64>, crate::cuda_graph::StepGraph)> = None;
    let mut eager_since = 0u64;
    let pad_to = match &data {
        Data::Cls { train, .. } if cfg.train.cuda_graph => train.longest(),
        _ => 0,
    };
    while state.step < t.max_steps {
        let step = state.step + 1;
        let lr = lr_at(step, t.lr, t.warmup_steps, t.max_steps, t.min_lr_ratio);
        opt.set_lr(lr);
        let t0 = Instant::now();
        let (mut loss_sum, mut tokens, mut correct, mut seen) = (0.0, 0u64, 0i64, 0i64);
        let mut micro = 0;
        let scale = 1.0 / t.grad_accum as f64;
        // The gradient norm, where the replayed graph clipped and stepped.
        let mut graph_norm: Option<f64> = None;
        for k in 0..t.grad_accum {
            let idx = sampler.next_indices(t.batch_size);
            // The micro-batch on the device: masked-LM `[ids, labels]`, classification
            // `[ids, types, mask, labels]`.
            let inputs: Vec<Tensor> = match &data {
                Data::Mlm { train, .. } => {
                    let (x, _) = train.batch(&idx);
                    tokens += x.numel() as u64;
                    let seed = train_mask_seed(t.seed, step, k);
                    let (ids, labels) = mlm_inputs(&x, &toks, vocab, t.mlm_probability, seed)?;
                    vec![ids.to_device(device), labels.to_device(device)]
                }
                Data::Cls { train, .. } => {
                    let b = train.batch_padded(&idx, pad_to);
                    tokens += b.tokens;
                    seen += idx.len() as i64;
                    [b.ids, b.types, b.mask, b.labels]
                        .iter()
                        .map(|x| x.to_device(device))
                        .collect()
                }
            };
            micro += 1;
            if cfg.train.cuda_graph && eager_since >= crate::cuda_graph::WARMUP_STEPS {
                // The captured step, for this stage of rank adaptation and these ranks.
                let key = tt.as_ref().and_then(|c| c.penalty_weight_at(step));
                if step_graph.as_ref().is_some_and(|(k, _)| *k != key) {
                    step_graph = None;
                }
                if step_graph.is_none() {
                    let with_opt =
                        crate::cuda_graph::recordable_optimizer(opt.as_mut(), cfg, tt.is_some())?;
                    let (m, params, max_norm) = (&m, &tensors, t.max_grad_norm);
                    let graph = crate::cuda_graph::StepGraph::capture(
                        &tensors,
                        &inputs.iter().collect::<Vec<_>>(),
                        with_opt.then_some(opt.as_mut()),
                        |inputs| {
                            let (loss, correct, _) = micro_loss(m, inputs, false, true);
                            let term = match key {
                                Some(w) => &loss + comera::penalty(&m.tt_layers()) * w,
                                None => loss.shallow_clone(),
                            };
                            (term * scale).backward();
                            let mut out = vec![loss.detach()];
                            out.extend(correct);
                            if with_opt {
                                out.extend(frugal_optim::clip_grad_norm_on_device(
                                    params, max_norm,
                                ));
                            }
                            Ok(out)
                        },
                    )?;
                    progress.message(&graph.captured_message(step));
                    step_graph = Some((key, graph));
                }
                let (_, graph) = step_graph.as_mut().expect("captured above");
                graph.prepare(opt.as_mut())?;
                let with_opt = graph.has_optimizer();
                let mut out = graph.replay(&inputs.iter().collect::<Vec<_>>())?.iter();
                let loss = out.next().expect("the loss").double_value(&[]);
                loss_sum += loss;
                if matches!(data, Data::Cls { .. }) {
                    correct += out.next().expect("the count").int64_value(&[]);
                }
                if with_opt {
                    graph_norm = Some(out.next().map_or(0.0, |n| n.double_value(&[])));
                }
                // Rank adaptation: the step's objective; a size step drops the loss gradient
                // (the main optimizer does not step, the gradients are zeroed).
                if let Some(c) = &mut tt {
                    if c.objective(step, loss, &m.tt_layers()) == Objective::Size {
                        break;
                    }
                }
                continue;
            }
            let (loss, ok, ck) = micro_loss(&m, &inputs, t.checkpointing, false);
            if let Some(ok) = ok {
                correct += ok.int64_value(&[]);
            }
            loss_sum += loss.double_value(&[]);
            // Rank adaptation: loss + penalty, the loss, or (a size step) nothing.
            let term = match &mut tt {
                Some(c) => c.loss_term(step, &loss, &m.tt_layers()).0,
                None => Some(loss),
            };
            match term {
                Some(l) => {
                    (l * scale).backward();
                    if let Some(ck) = ck {
                        ck.backward(m.encoder());
                    }
                }
                None => break,
            }
        }
        let loss = loss_sum / micro as f64;
        if !loss.is_finite() {
            return Err(Error::Msg(format!(
                "step {step}: loss is {loss}; lower train.lr (now {}) or check the data",
                t.lr
            )));
        }
        let steps_main = tt.as_ref().is_none_or(|c| c.steps_main(step));
        let grad_norm = if let Some(n) = graph_norm {
            // The replayed graph clipped and stepped.
            n
        } else {
            let n = if !steps_main {
                0.0
            } else if t.max_grad_norm > 0.0 {
                clip_grad_norm(&tensors, t.max_grad_norm)
            } else {
                frugal_optim::grad_norm(&tensors)
            };
            if steps_main {
                opt.step()?;
            }
            opt.zero_grad();
            n
        };
        let mut pruned = false;
        if let Some(c) = &mut tt {
            let (mut layers, vs) = m.tt_layers_mut();
            pruned = c.after_step(step, opt.as_mut(), &mut layers, vs)?.pruned;
            c.save_state(&mut state);
        }
        eager_since += 1;
        if pruned {
            // The pruned layers' variables are new (smaller) tensors: a captured step is
            // captured again, after warm-up steps on the new tensors.
            step_graph = None;
            eager_since = 0;
            tensors = frugal_models::weights::named_variables(&m.vs)
                .into_iter()
                .map(|(_, t)| t)
                .collect();
        }
        let (mut line, tps) = clock.finish(
            &mut state,
            &sampler,
            opt.as_ref(),
            t0,
            step,
            tokens,
            (loss, lr, grad_norm),
        );
        if seen > 0 {
            line["accuracy"] = json!(correct as f64 / seen as f64);
        }
        progress.update(step, loss, tps);

        let last = step == t.max_steps;
        let stop = INTERRUPTED.load(Ordering::SeqCst);
        let eval_now = (t.eval_every > 0 && step.is_multiple_of(t.eval_every)) || last;
        if let Some(c) = &tt {
            c.add_metrics(step, &m.tt_layers(), eval_now || pruned, &mut line);
            if pruned {
                progress.message(&format!(
                    "step {step}: TT layers pruned to {} parameters ({:.1}x compression)",
                    line["tt_size"],
                    line["tt_compression"].as_f64().unwrap_or(f64::NAN)
                ));
            }
        }
        if eval_now {
            let batches = if last {
                t.final_eval_batches
            } else {
                t.eval_batches
            };
            let (vl, acc) = evaluate(&m, batches)?;
            val_loss = vl;
            val_acc = acc;
            line["val_loss"] = json!(vl);
            match acc {
                Some(a) => {
                    line["val_accuracy"] = json!(a);
                    progress.message(&format!(
                        "step {step}: val_loss {vl:.4}, val_accuracy {a:.4}, label prior {baseline:.4}"
                    ));
                }
                None => {
                    line["val_ppl"] = json!(vl.exp());
                    progress.message(&format!(
                        "step {step}: val_loss {vl:.4} (ppl {:.2}), unigram {baseline:.4}",
                        vl.exp()
                    ));
                }
            }
        }
        history.push(line)?;
        if line_has_val(&history) {
            history.plot_with(&run_dir.join("loss.png"), baseline, baseline_name);
        }
        if tt.is_some() && (eval_now || pruned) {
            comera::plot_ranks(history.lines(), &run_dir.join("ranks.png"));
        }
        if (t.save_every > 0 && step.is_multiple_of(t.save_every)) || last || stop {
            let extra: Vec<(&str, &dyn frugal_optim::Optimizer)> = tt
                .iter()
                .map(|c| (comera::TT_OPTIMIZER_FILE, c.rank_optimizer()))
                .collect();
            checkpoint::save_with_extra(
                run_dir,
                &|file: &Path| m.save(file),
                opt.as_ref(),
                &extra,
                &state,
                t.keep_checkpoints,
            )?;
        }
        if stop && !last {
            progress.message(&format!(
                "interrupted: checkpoint saved at step {step}; resume with --resume {}",
                run_dir.display()
            ));
            interrupted = true;
            break;
        }
    }
    progress.finish();
    if val_loss.is_nan() && !interrupted {
        (val_loss, val_acc) = evaluate(&m, t.final_eval_batches)?;
    }
    history.plot_with(&run_dir.join("loss.png"), baseline, baseline_name);

    let mut acc = Accounting::default();
    acc.add_tensors("parameters", tensors.iter());
    acc.add_tensors("gradients", tensors.iter());
    let tt_state = tt.as_ref().map_or(0, |c| c.rank_optimizer().state_bytes());
    acc.add("optimizer_state", opt.state_bytes() + tt_state);
    let (mut report, peak) = clock.memory_report(device, baseline_rss, &acc, &m.vs);
    report["model"] =
        json!({"kind": "encoder", "size": cfg.model.size, "objective": cfg.objective()});
    if let Some(c) = &tt {
        let mut line = json!({});
        c.add_metrics(state.step, &m.tt_layers(), true, &mut line);
        report["tt"] = line;
    }
    atomic::write(
        &run_dir.join("memory.json"),
        serde_json::to_string_pretty(&report)
            .expect("json")
            .as_bytes(),
    )?;
    Ok(Summary {
        run_dir: run_dir.to_path_buf(),
        steps: state.step,
        tokens: state.tokens,
        train_loss: history.recent_loss(10),
        val_loss,
        unigram_val_loss: baseline,
        peak_rss_bytes: peak,
        baseline_rss_bytes: baseline_rss,
        interrupted,
        val_accuracy: val_acc,
        baseline_name: match &data {
            Data::Mlm { .. } => None,
            Data::Cls { .. } => Some("label prior loss".into()),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The config and shape of a tiny encoder (vocabulary 50, width 16, 2 blocks).
    fn tiny_encoder() -> (Config, EncoderConfig) {
        let mut cfg = Config::default();
        cfg.model.kind = "encoder".into();
        cfg.model.size = "encoder-tiny".into();
        (cfg, EncoderConfig::new(50, 16, 2, 2, 32, 32))
    }

    /// Guarantee: a classifier built over a masked-LM checkpoint takes its encoder body (every
    /// `bert.embeddings.*` / `bert.encoder.*` tensor, equal to the file's) and keeps its own
    /// fresh pooler and classifier; a file without the body is an error naming a tensor.
    #[test]
    fn pretrained_body_loads_and_the_head_is_new() {
        let dir = tempfile::tempdir().unwrap();
        let (mut cfg, shape) = tiny_encoder();
        let file = dir.path().join("model.safetensors");
        let mlm = EncoderModel::new(&cfg, &shape, None, tch::Device::Cpu).unwrap();
        mlm.save(&file).unwrap();
        cfg.train.seed = 9;
        let fresh = EncoderModel::new(&cfg, &shape, Some(3), tch::Device::Cpu).unwrap();
        let mut cls = EncoderModel::new(&cfg, &shape, Some(3), tch::Device::Cpu).unwrap();
        cls.load_pretrained(&file).unwrap();
        let want = frugal_models::weights::named_variables(&mlm.vs);
        let before = frugal_models::weights::named_variables(&fresh.vs);
        let mut body = 0;
        for ((n, t), (n0, t0)) in frugal_models::weights::named_variables(&cls.vs)
            .iter()
            .zip(&before)
        {
            assert_eq!(n, n0);
            if n.starts_with("bert.embeddings.") || n.starts_with("bert.encoder.") {
                let (_, w) = want.iter().find(|(m, _)| m == n).unwrap();
                assert!(t.equal(w), "{n} not loaded");
                body += 1;
            } else {
                assert!(
                    n.starts_with("bert.pooler.") || n.starts_with("classifier."),
                    "{n}"
                );
                assert!(t.equal(t0), "{n} changed");
            }
        }
        assert_eq!(body, 5 + 2 * 16);
        let empty = dir.path().join("empty.safetensors");
        frugal_core::safetensors_io::save(
            &empty,
            &[(
                "x".to_string(),
                Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)),
            )],
            None,
        )
        .unwrap();
        let err = cls.load_pretrained(&empty).unwrap_err().to_string();
        assert!(err.contains("bert."), "{err}");
    }

    /// Guarantee: padding a classification batch further (what `train.cuda_graph` does, to
    /// give every batch one shape) changes neither the loss nor the count of right answers:
    /// the padding is masked out of attention and the pooler reads the first token.
    #[test]
    fn longer_padding_keeps_the_classification_loss() {
        let (cfg, shape) = tiny_encoder();
        let m = EncoderModel::new(&cfg, &shape, Some(3), tch::Device::Cpu).unwrap();
        // Two examples of 5 and 3 tokens, padded to 5 and to 12 (pad id 0).
        let rows: [&[i64]; 2] = [&[2, 7, 9, 11, 3], &[2, 8, 3]];
        let batch = |len: usize| -> Vec<Tensor> {
            let (mut ids, mut types, mut mask) = (vec![], vec![], vec![]);
            for r in rows {
                for j in 0..len {
                    ids.push(r.get(j).copied().unwrap_or(0));
                    types.push(i64::from(j >= 2 && j < r.len()));
                    mask.push(i64::from(j < r.len()));
                }
            }
            let shape = [2, len as i64];
            vec![
                Tensor::from_slice(&ids).view(shape),
                Tensor::from_slice(&types).view(shape),
                Tensor::from_slice(&mask).view(shape),
                Tensor::from_slice(&[1i64, 2]),
            ]
        };
        let (short, short_ok, _) = micro_loss(&m, &batch(5), false, false);
        let (long, long_ok, _) = micro_loss(&m, &batch(12), false, true);
        let (a, b) = (short.double_value(&[]), long.double_value(&[]));
        assert!(a.is_finite() && (a - b).abs() < 1e-6, "{a} vs {b}");
        assert!(short_ok.unwrap().equal(&long_ok.unwrap()));
    }

    /// Guarantee: the masked-LM loss over every position (the form a CUDA graph records) equals
    /// the loss over the selected positions, and so do the gradients it leaves.
    #[test]
    fn all_rows_mlm_loss_equals_the_selected_rows_loss() {
        let (cfg, shape) = tiny_encoder();
        let m = EncoderModel::new(&cfg, &shape, None, tch::Device::Cpu).unwrap();
        let ids =
            Tensor::from_slice(&(0..24).map(|i| (i * 7) % 50).collect::<Vec<i64>>()).view([2, 12]);
        let labels = ids.where_self(
            &Tensor::from_slice(&(0..24).map(|i| i % 5 == 1).collect::<Vec<bool>>()).view([2, 12]),
            &Tensor::full([2, 12], IGNORE_INDEX, (Kind::Int64, tch::Device::Cpu)),
        );
        let params = frugal_models::weights::named_variables(&m.vs);
        let grads = |recordable: bool| -> (f64, Vec<Tensor>) {
            for (_, p) in &params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            let inputs = [ids.shallow_clone(), labels.shallow_clone()];
            let (loss, _, _) = micro_loss(&m, &inputs, false, recordable);
            loss.backward();
            let g = params.iter().map(|(_, p)| p.grad().copy()).collect();
            (loss.double_value(&[]), g)
        };
        let ((a, ga), (b, gb)) = (grads(false), grads(true));
        assert!(a.is_finite() && (a - b).abs() < 1e-6, "{a} vs {b}");
        for ((n, _), (x, y)) in params.iter().zip(ga.iter().zip(&gb)) {
            let d = (x - y).abs().max().double_value(&[]);
            assert!(d < 1e-6, "{n}: gradients differ by {d}");
        }
    }
}
