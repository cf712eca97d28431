//! The training loop: schedule, gradient accumulation, clipping, evaluation, metrics, the loss
//! curve, checkpoints, resume, Ctrl-C, and the memory report.

use crate::checkpoint::{self, TrainerState};
use crate::config::Config;
use crate::data::Sampler;
use crate::plot::{self, Series};
use crate::progress::Progress;
use crate::run;
use crate::schedule::lr_at;
use crate::step::{self, Groups, Plan};
use frugal_core::memory::{self, human_bytes, Accounting};
use frugal_core::{atomic, Error, Result};
use frugal_dist::Collective;
use frugal_optim::clip_grad_norm;
use serde::Serialize;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Set by the Ctrl-C handler of the `frugal` binary: the loop saves a checkpoint and stops.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// What a finished (or interrupted) run reports.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The run folder.
    pub run_dir: PathBuf,
    /// Optimizer steps done.
    pub steps: u64,
    /// Training tokens seen.
    pub tokens: u64,
    /// Mean training loss over the last few steps.
    pub train_loss: f64,
    /// Validation loss at the end.
    pub val_loss: f64,
    /// Validation loss of a unigram model on the same tokens, for comparison.
    pub unigram_val_loss: f64,
    /// Peak resident memory of the process.
    pub peak_rss_bytes: u64,
    /// Resident memory before the model was built.
    pub baseline_rss_bytes: u64,
    /// True when Ctrl-C stopped the run early (a checkpoint was saved).
    pub interrupted: bool,
    /// Validation accuracy at the end (classification runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_accuracy: Option<f64>,
    /// What `unigram_val_loss` is, when not the unigram model (classification: the loss of
    /// predicting the training label frequencies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_name: Option<String>,
}

/// Trains as `cfg` says into `run_dir`. With `resume`, continues from the run's latest
/// checkpoint (exactly: on CPU the losses and weights equal those of an uninterrupted run).
pub fn train(cfg: &Config, run_dir: &Path, resume: bool) -> Result<Summary> {
    train_with(cfg, run_dir, resume, &mut frugal_dist::Single::default())
}

/// Saves a checkpoint (rank 0). With a sharded optimizer state, every rank takes part: the
/// others write their shards beside the checkpoints, and rank 0 moves them into the new
/// checkpoint before it is renamed into place.
fn save_checkpoint(
    run_dir: &Path,
    m: &run::Model,
    opt: &dyn frugal_optim::Optimizer,
    state: &TrainerState,
    keep: usize,
    dist: &mut dyn Collective,
    zero1: bool,
) -> Result<()> {
    let (rank, world) = (dist.rank(), dist.size());
    if !zero1 {
        if rank == 0 {
            checkpoint::save(run_dir, m, opt, state, keep)?;
        }
        return Ok(());
    }
    let staging = checkpoint::dir(run_dir).join(format!(".shards-step-{}", state.step));
    if rank > 0 {
        std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
        opt.save(&staging.join(checkpoint::shard_file(rank)))?;
    }
    dist.barrier().map_err(dist_err)?;
    if rank == 0 {
        let files: Vec<(String, PathBuf)> = (1..world)
            .map(|r| {
                (
                    checkpoint::shard_file(r),
                    staging.join(checkpoint::shard_file(r)),
                )
            })
            .collect();
        checkpoint::save_with_files(
            run_dir,
            &|file: &Path| m.save(file),
            opt,
            &[],
            &files,
            state,
            keep,
        )?;
        let _ = std::fs::remove_dir_all(&staging);
    }
    Ok(())
}

/// A collective's error as the trainer's.
fn dist_err(e: frugal_dist::DistError) -> Error {
    Error::Msg(e.to_string())
}

/// Replaces every tensor's values by their mean over the ranks, in buckets of at most
/// [`BUCKET`] values (one f32 copy of a bucket at a time).
fn all_reduce_mean(dist: &mut dyn Collective, tensors: &[&tch::Tensor]) -> Result<()> {
    if dist.size() == 1 && dist.device_collective().is_none() {
        return Ok(());
    }
    if on_device(dist, tensors) {
        return device_all_reduce_mean(dist, tensors);
    }
    for bucket in buckets(tensors) {
        let mut buf = host_f32(&tensors[bucket.clone()])?;
        dist.all_reduce_sum(&mut buf).map_err(dist_err)?;
        copy_mean_into(&tensors[bucket], &buf, dist.size())?;
    }
    Ok(())
}

/// Consecutive runs of `tensors` of at most [`BUCKET`] values each (a larger tensor alone).
fn buckets(tensors: &[&tch::Tensor]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < tensors.len() {
        let mut j = i;
        let mut n = 0usize;
        while j < tensors.len() && (j == i || n + tensors[j].numel() <= BUCKET) {
            n += tensors[j].numel();
            j += 1;
        }
        out.push(i..j);
        i = j;
    }
    out
}

/// `tensors` flattened, one after the other, into one host f32 buffer.
fn host_f32(tensors: &[&tch::Tensor]) -> Result<Vec<f32>> {
    let mut buf = Vec::with_capacity(tensors.iter().map(|t| t.numel()).sum());
    for t in tensors {
        let v = Vec::<f32>::try_from(
            t.to_kind(tch::Kind::Float)
                .to_device(tch::Device::Cpu)
                .reshape([-1]),
        )
        .map_err(|e| Error::Msg(format!("gradient to all-reduce: {e}")))?;
        buf.extend_from_slice(&v);
    }
    Ok(buf)
}

/// Writes `sum / world` back into `tensors` (laid out as [`host_f32`] flattened them).
fn copy_mean_into(tensors: &[&tch::Tensor], sum: &[f32], world: usize) -> Result<()> {
    let want: usize = tensors.iter().map(|t| t.numel()).sum();
    if sum.len() != want {
        return Err(Error::Msg(format!(
            "all-reduce returned {} values for {want}",
            sum.len()
        )));
    }
    let mut off = 0;
    for t in tensors {
        let k = t.numel();
        let mean = (tch::Tensor::from_slice(&sum[off..off + k]) / world as f64)
            .view(t.size().as_slice())
            .to_device(t.device());
        tch::no_grad(|| t.shallow_clone().copy_(&mean));
        off += k;
    }
    Ok(())
}

/// Averages a group's gradients `grads` (of the optimizer's parameters at `idx`) over the
/// ranks, in place. With `projected`, a parameter whose GaLore basis is not due for a refresh
/// has its projected gradient averaged (`r x n` values instead of `m x n`) and lifted back
/// through the basis: the optimizer projects the lifted mean to the averaged projection again
/// (the basis is orthonormal), which is what it would have made of the full mean.
fn reduce_grads(
    dist: &mut dyn Collective,
    opt: &dyn frugal_optim::Optimizer,
    idx: &[usize],
    grads: &[&tch::Tensor],
    projected: bool,
) -> Result<()> {
    if dist.size() == 1 && dist.device_collective().is_none() {
        return Ok(());
    }
    let mut full: Vec<&tch::Tensor> = Vec::new();
    let mut low: Vec<(usize, tch::Tensor)> = Vec::new();
    for (k, (&i, g)) in idx.iter().zip(grads).enumerate() {
        if projected {
            if let Some((p, step)) = opt.projection(i) {
                if !p.refresh_due(step) {
                    if let Some(l) = p.project_current(g) {
                        low.push((k, l?));
                        continue;
                    }
                }
            }
        }
        full.push(g);
    }
    all_reduce_mean(dist, &full)?;
    all_reduce_mean(dist, &low.iter().map(|(_, l)| l).collect::<Vec<_>>())?;
    for (k, l) in &low {
        let (p, _) = opt.projection(idx[*k]).expect("checked above");
        let lifted = p.lift(l)?;
        tch::no_grad(|| grads[*k].shallow_clone().copy_(&lifted));
    }
    Ok(())
}

/// The rank that owns each parameter of sizes `sizes` under a sharded optimizer state
/// (`dist.zero1`): largest first, each to the rank with the fewest values so far (the lowest
/// rank on ties), the same on every rank.
fn owners(sizes: &[usize], world: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(sizes[i]), i));
    let mut load = vec![0usize; world];
    let mut own = vec![0usize; sizes.len()];
    for i in order {
        let r = (0..world)
            .min_by_key(|&r| (load[r], r))
            .expect("world >= 1");
        own[i] = r;
        load[r] += sizes[i];
    }
    own
}

/// Gives every rank the values of the parameters at `idx` from their owners.
fn broadcast_from_owners(
    dist: &mut dyn Collective,
    tensors: &[tch::Tensor],
    idx: &[usize],
    owner: &[usize],
) -> Result<()> {
    let group: Vec<&tch::Tensor> = idx.iter().map(|&i| &tensors[i]).collect();
    if on_device(dist, &group) {
        for &i in idx {
            let root = owner[i];
            device_buckets(dist, &[&tensors[i]], |dc, bucket, stream| {
                // SAFETY: as in `device_all_reduce_mean`.
                unsafe {
                    dc.broadcast_device(bucket.data_ptr() as u64, bucket.numel(), root, stream)
                }
            })?;
        }
        return Ok(());
    }
    for &i in idx {
        let t = &tensors[i];
        let mut v = Vec::<f32>::try_from(
            t.to_kind(tch::Kind::Float)
                .to_device(tch::Device::Cpu)
                .reshape([-1]),
        )
        .map_err(|e| Error::Msg(format!("parameter to broadcast: {e}")))?;
        dist.broadcast(&mut v, owner[i]).map_err(dist_err)?;
        let w = tch::Tensor::from_slice(&v)
            .view(t.size().as_slice())
            .to_device(t.device())
            .to_kind(t.kind());
        tch::no_grad(|| t.shallow_clone().copy_(&w));
    }
    Ok(())
}

/// The device this rank trains on: the backend's GPU for NCCL; with several MPI ranks on CUDA,
/// the GPU of the rank's local ordinal (modulo the GPUs there are); else `device`.
fn rank_device(device: tch::Device, dist: &mut dyn Collective) -> tch::Device {
    if !device.is_cuda() {
        return device;
    }
    if let Some(dc) = dist.device_collective() {
        return tch::Device::Cuda(dc.device());
    }
    if dist.size() > 1 {
        let gpus = tch::Cuda::device_count().max(1) as usize;
        return tch::Device::Cuda(frugal_dist::local_rank() % gpus);
    }
    device
}

/// Whether `tensors` are on the GPU of a backend that reduces GPU memory in place (NCCL).
fn on_device(dist: &mut dyn Collective, tensors: &[&tch::Tensor]) -> bool {
    match (
        dist.device_collective(),
        tensors.first().map(|t| t.device()),
    ) {
        (Some(dc), Some(tch::Device::Cuda(i))) => i == dc.device(),
        _ => false,
    }
}

/// Runs `op` on each bucket of `tensors` (one f32 copy per bucket of at most [`BUCKET`]
/// values, or one tensor) on the GPU, on libtorch's current stream, and copies the result
/// back into the tensors.
fn device_buckets(
    dist: &mut dyn Collective,
    tensors: &[&tch::Tensor],
    mut op: impl FnMut(
        &mut dyn frugal_dist::DeviceCollective,
        &tch::Tensor,
        *mut std::ffi::c_void,
    ) -> frugal_dist::Result<()>,
) -> Result<()> {
    let dc = dist
        .device_collective()
        .ok_or_else(|| Error::Msg("the backend has no GPU collectives".into()))?;
    let stream = frugal_kernels::torch_cuda::current_stream(dc.device())
        .map_err(|e| Error::Msg(format!("GPU all-reduce: {e}")))?;
    for run in buckets(tensors) {
        let flat: Vec<tch::Tensor> = tensors[run.clone()]
            .iter()
            .map(|t| t.to_kind(tch::Kind::Float).reshape([-1]))
            .collect();
        let bucket = tch::Tensor::cat(&flat, 0).contiguous();
        op(dc, &bucket, stream).map_err(dist_err)?;
        let mut off = 0;
        for t in &tensors[run] {
            let k = t.numel() as i64;
            let part = bucket.narrow(0, off, k).view(t.size().as_slice());
            tch::no_grad(|| t.shallow_clone().copy_(&part));
            off += k;
        }
    }
    Ok(())
}

/// [`all_reduce_mean`] on the GPU through NCCL, without host copies.
fn device_all_reduce_mean(dist: &mut dyn Collective, tensors: &[&tch::Tensor]) -> Result<()> {
    let world = dist.size() as f64;
    device_buckets(dist, tensors, |dc, bucket, stream| {
        // SAFETY: `bucket` is a contiguous f32 tensor on the backend's device, alive for the
        // call, which waits for the stream.
        unsafe { dc.all_reduce_sum_device(bucket.data_ptr() as u64, bucket.numel(), stream) }?;
        let _ = tch::no_grad(|| bucket.shallow_clone().g_div_scalar_(world));
        Ok(())
    })
}

/// Values per all-reduce bucket (25 MiB of f32, as PyTorch DDP's default bucket).
const BUCKET: usize = 25 << 18;

/// [`train`] as one of the ranks of `dist` (data parallelism): every rank holds the whole model
/// and its optimizer state, trains on its own share of each step's sequences, and averages the
/// gradients with the others before each update; rank 0 alone writes the run's files.
pub fn train_with(
    cfg: &Config,
    run_dir: &Path,
    resume: bool,
    dist: &mut dyn Collective,
) -> Result<Summary> {
    let (world, rank, main) = (dist.size(), dist.rank(), dist.is_main());
    if cfg.is_encoder() {
        if world > 1 {
            return Err(Error::config(
                "model.kind",
                "data-parallel training (several processes) is available for the decoders \
                 (llama, hgrn-bit), not yet for the encoder",
            ));
        }
        return crate::encoder_train::train(cfg, run_dir, resume);
    }
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    if cfg.train.threads > 0 {
        tch::set_num_threads(cfg.train.threads as i32);
    }
    let device = rank_device(cfg.train.device.resolve()?, dist);
    crate::cuda_graph::check_device(cfg, device)?;
    let t = &cfg.train;

    if main {
        eprintln!("frugal: loading data");
    }
    let (train_docs, val_docs) = run::documents(cfg)?;
    // Rank 0 makes the tokenizer (trained or copied) and writes it into the run folder; the
    // other ranks then read that file.
    let tok = if main {
        run::tokenizer(cfg, run_dir, &train_docs, resume)
    } else {
        Err(Error::Msg(String::new()))
    };
    dist.barrier().map_err(dist_err)?;
    let tok = match tok {
        Ok(t) => t,
        Err(_) if !main => run::tokenizer(cfg, run_dir, &train_docs, true)?,
        Err(e) => return Err(e),
    };
    let vocab = tok.get_vocab_size(true) as i64;
    let shape = cfg.decoder_config(vocab)?;
    // The resolved config marks the folder as a run: written once the inputs are known good,
    // so that a run refused for bad input can be retried into the same folder.
    if main {
        let resolved = toml::to_string(cfg).map_err(|e| Error::Msg(format!("config: {e}")))?;
        atomic::write(&run_dir.join("config.toml"), resolved.as_bytes())?;
    }
    let train_ds = run::dataset(&tok, &train_docs, t.seq_len, "training data")?;
    let val_ds = run::dataset(&tok, &val_docs, t.seq_len, "validation data")?;
    drop((train_docs, val_docs));
    let unigram = run::unigram_loss(train_ds.tokens(), val_ds.tokens(), vocab as usize);
    if main {
        eprintln!(
            "frugal: {} training tokens ({} sequences of {}), {} validation tokens, vocabulary \
             {vocab}{}",
            train_ds.tokens().len(),
            train_ds.num_sequences(),
            t.seq_len,
            val_ds.tokens().len(),
            if world > 1 {
                format!(
                    "; {world} processes, each {} sequences per micro-batch",
                    t.batch_size
                )
            } else {
                String::new()
            }
        );
    }

    let baseline_rss = memory::current_rss_bytes();
    if let tch::Device::Cuda(i) = device {
        // memory.json's GPU peaks count from here (the model is not built yet).
        let _ = frugal_kernels::torch_cuda::reset_peak(i);
    }
    let checkpoint = if resume {
        Some(checkpoint::latest(run_dir)?)
    } else {
        None
    };
    let adapter = cfg.adapter.enabled();
    // An adapter run's checkpoints hold the adapter alone: the base is always the pretrained
    // model's.
    let weights = match &checkpoint {
        Some(ck) if !adapter => Some(ck.join("model.safetensors")),
        _ => run::pretrained_weights(cfg),
    };
    if adapter && weights.is_none() {
        eprintln!("frugal: warning: an adapter on a randomly initialised base (model.from_pretrained is not set)");
    }
    let mut m = run::model(cfg, &shape, device, weights.as_deref())?;
    let params = if adapter {
        let p = match &checkpoint {
            Some(ck) => m.load_adapter(ck, &cfg.adapter.name)?,
            None => m.add_adapter(cfg)?,
        };
        m.set_training(true);
        p
    } else {
        frugal_models::weights::named_variables(&m.vs)
    };
    let tensors: Vec<tch::Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
    // Which rank steps each parameter: all of them everywhere, or each its owner's with a
    // sharded optimizer state.
    let zero1 = cfg.dist.zero1 && world > 1;
    let owner = if zero1 {
        owners(
            &tensors.iter().map(|t| t.numel()).collect::<Vec<_>>(),
            world,
        )
    } else {
        vec![rank; tensors.len()]
    };
    // NCCL runs its collectives even for one process (the path a one-GPU test can check).
    let nccl = dist.device_collective().is_some();
    if world > 1 || nccl {
        // Every rank starts from rank 0's weights.
        let all: Vec<usize> = (0..tensors.len()).collect();
        broadcast_from_owners(dist, &tensors, &all, &vec![0; tensors.len()])?;
    }
    let n_params: i64 = tensors.iter().map(|t| t.numel() as i64).sum();
    if main {
        eprintln!(
            "frugal: {} {} ({:.2}M {}parameters) on {device:?}, {:?}",
            cfg.model.kind,
            if cfg.model.from_pretrained.is_empty() {
                &cfg.model.size
            } else {
                &cfg.model.from_pretrained
            },
            n_params as f64 / 1e6,
            if adapter { "trainable " } else { "" },
            cfg.train.dtype
        );
    }
    let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
    let groups = Groups::of(&names, shape.num_blocks())?;
    let mut opt = crate::optimizers::build(cfg, params, t.lr)?;
    let plan = Plan {
        layerwise: cfg.optim.layerwise,
        checkpointing: t.checkpointing,
        ce_chunk: t.ce_chunk as i64,
        blockwise: false,
    };

    let mut state = TrainerState {
        step: 0,
        tokens: 0,
        sampler: Sampler::new(train_ds.num_sequences(), t.seed).state(),
        elapsed_s: 0.0,
        prev_grad_norm: None,
        tt_late_start_size: None,
    };
    if let Some(ck) = &checkpoint {
        // With a sharded state, each rank its own shard; a sharded checkpoint resumes sharded
        // only (its optimizer.safetensors holds rank 0's share alone).
        let file = ck.join(checkpoint::shard_file(if zero1 { rank } else { 0 }));
        if zero1 && !file.is_file() {
            return Err(Error::Msg(format!(
                "{}: no optimizer state for rank {rank} (was the run saved with dist.zero1 by \
                 {world} ranks?)",
                file.display()
            )));
        }
        if !zero1 && ck.join(checkpoint::shard_file(1)).is_file() {
            return Err(Error::Msg(format!(
                "{}: the optimizer state is sharded (saved with dist.zero1); resume it with \
                 dist.zero1 and as many ranks",
                ck.display()
            )));
        }
        opt.load(&file)?;
        state = checkpoint::read_state(&ck)?;
        if main {
            eprintln!(
                "frugal: resuming from {} (step {})",
                ck.display(),
                state.step
            );
        }
    }
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut history = if main {
        Metrics::open(&metrics_path, state.step)?
    } else {
        Metrics::in_memory()
    };
    let mut sampler = Sampler::from_state(train_ds.num_sequences(), state.sampler.clone());

    let mut progress = if main {
        Progress::new(t.max_steps, state.step)
    } else {
        Progress::with_writer(t.max_steps, state.step, false, Box::new(std::io::sink()))
    };
    let mut clock = StepClock::new(&state, cfg.optim.is_galore(), device);
    let mut val_loss = f64::NAN;
    let mut interrupted = false;
    let tokens_per_step = (t.batch_size * t.seq_len * t.grad_accum * world) as u64;
    let projected = cfg.dist.galore_projected && cfg.optim.is_galore();
    // Overlapping the all-reduces with the backward pass (not with per-layer updates, nor with
    // the projected all-reduce: the config refuses those). Over NCCL the gradients stay on the
    // GPU and are reduced after the backward pass (overlap is MPI's, on host buffers).
    let overlap = cfg.dist.overlap && world > 1 && !plan.layerwise && !projected && !nccl;
    // The captured step (`train.cuda_graph`), and the steps this process has run.
    let mut step_graph: Option<crate::cuda_graph::StepGraph> = None;
    let mut steps_here = 0u64;
    while state.step < t.max_steps {
        let step = state.step + 1;
        if adapter {
            // The adapters' dropout draws from torch's generator: seeded per step, so that a
            // resumed run draws what the uninterrupted one drew.
            tch::manual_seed(t.seed as i64 ^ (step as i64).wrapping_mul(0x9E37_79B9));
        }
        let lr = lr_at(step, t.lr, t.warmup_steps, t.max_steps, t.min_lr_ratio);
        opt.set_lr(lr);
        let t0 = Instant::now();
        let reduced_before = dist.bytes_reduced();
        let mut loss_sum = 0.0;
        // Per-layer updates clip by the previous step's norm (the first step is not clipped).
        let clip = match state.prev_grad_norm {
            Some(n) if plan.layerwise && t.max_grad_norm > 0.0 && n > t.max_grad_norm => {
                t.max_grad_norm / (n + 1e-6)
            }
            _ => 1.0,
        };
        let mut micro_norms = 0.0;
        // All-reduces started during the last micro-batch's backward pass (`dist.overlap`): the
        // parameters of each, and the operations.
        let mut started_idx: Vec<Vec<usize>> = Vec::new();
        let mut started: Vec<frugal_dist::InFlight> = Vec::new();
        // The gradient norm, where the replayed graph clipped and stepped.
        let mut graph_norm: Option<f64> = None;
        for k in 0..t.grad_accum {
            let last = k + 1 == t.grad_accum;
            // The step's sequences for all ranks, drawn alike on every rank; this rank's share.
            let all = sampler.next_indices(t.batch_size * world);
            let (x, y) = train_ds.batch(&all[rank * t.batch_size..(rank + 1) * t.batch_size]);
            let mut sq = 0.0;
            let plan = step::Plan {
                blockwise: overlap && last,
                ..plan
            };
            let mut sink = |idx: &[usize], grads: Option<Vec<tch::Tensor>>| -> Result<()> {
                let Some(grads) = grads else {
                    // The group's `.grad` is complete: start averaging it while the backward
                    // pass goes on.
                    let (defined, grads): (Vec<usize>, Vec<tch::Tensor>) = idx
                        .iter()
                        .map(|&i| (i, tensors[i].grad()))
                        .filter(|(_, g)| g.defined())
                        .unzip();
                    if !defined.is_empty() {
                        let buf = host_f32(&grads.iter().collect::<Vec<_>>())?;
                        started.push(dist.start_all_reduce_sum(buf).map_err(dist_err)?);
                        started_idx.push(defined);
                    }
                    return dist.progress(&mut started).map_err(dist_err);
                };
                // Each group's gradients averaged over the ranks before its update.
                reduce_grads(
                    dist,
                    opt.as_ref(),
                    idx,
                    &grads.iter().collect::<Vec<_>>(),
                    projected,
                )?;
                for g in &grads {
                    // As `grad_norm`: each tensor's norm in f32, squares summed.
                    let n = g.to_kind(tch::Kind::Float).norm().double_value(&[]);
                    sq += n * n;
                }
                if clip < 1.0 {
                    // In place: these gradients are this step's own, held nowhere else.
                    for g in &grads {
                        let _ = g.shallow_clone().g_mul_scalar_(clip);
                    }
                }
                // This rank's share (all of them without a sharded state).
                let (mine, grads): (Vec<usize>, Vec<tch::Tensor>) = idx
                    .iter()
                    .zip(grads)
                    .filter(|(i, _)| owner[**i] == rank)
                    .map(|(i, g)| (*i, g))
                    .unzip();
                if last {
                    opt.step_with_grads(&mine, grads)?;
                    if zero1 {
                        broadcast_from_owners(dist, &tensors, idx, &owner)?;
                    }
                    Ok(())
                } else {
                    opt.accumulate_with_grads(&mine, grads)
                }
            };
            let batch = step::Batch {
                ids: &x.to_device(device),
                targets: &y.to_device(device),
                scale: 1.0 / t.grad_accum as f64,
            };
            if cfg.train.cuda_graph && steps_here >= crate::cuda_graph::WARMUP_STEPS {
                // The captured step (captured at the first such step).
                if step_graph.is_none() {
                    let with_opt =
                        crate::cuda_graph::recordable_optimizer(opt.as_mut(), cfg, world > 1)?;
                    let (net, params, scale) = (&m.net, &tensors, batch.scale);
                    let max_norm = t.max_grad_norm;
                    step_graph = Some(crate::cuda_graph::StepGraph::capture(
                        &tensors,
                        &[batch.ids, batch.targets],
                        with_opt.then_some(opt.as_mut()),
                        |inputs| {
                            let loss = net.loss(&inputs[0], &inputs[1]);
                            (&loss * scale).backward();
                            let mut out = vec![loss.detach()];
                            if with_opt {
                                out.extend(frugal_optim::clip_grad_norm_on_device(
                                    params, max_norm,
                                ));
                            }
                            Ok(out)
                        },
                    )?);
                    if main {
                        let graph = step_graph.as_ref().expect("captured above");
                        progress.message(&graph.captured_message(step));
                    }
                }
                let graph = step_graph.as_mut().expect("captured above");
                graph.prepare(opt.as_mut())?;
                let with_opt = graph.has_optimizer();
                let out = graph.replay(&[batch.ids, batch.targets])?;
                loss_sum += out[0].double_value(&[]);
                if with_opt {
                    graph_norm = Some(out.get(1).map_or(0.0, |n| n.double_value(&[])));
                }
            } else {
                loss_sum += step::micro_step(&m.net, &tensors, &groups, &plan, &batch, &mut sink)?;
            }
            micro_norms += sq.sqrt();
        }
        // The overlapped all-reduces: wait for each, in the order started, and put the means
        // into `.grad`.
        for (idx, op) in started_idx.into_iter().zip(started) {
            let buf = dist.finish_all_reduce(op).map_err(dist_err)?;
            let grads: Vec<tch::Tensor> = idx.iter().map(|&i| tensors[i].grad()).collect();
            copy_mean_into(&grads.iter().collect::<Vec<_>>(), &buf, world)?;
        }
        let mut loss = loss_sum / t.grad_accum as f64;
        // The mean loss over the ranks, and whether any rank was asked to stop.
        let mut stop = INTERRUPTED.load(Ordering::SeqCst);
        if world > 1 {
            let mut v = [loss as f32, stop as u8 as f32];
            dist.all_reduce_sum(&mut v).map_err(dist_err)?;
            loss = f64::from(v[0]) / world as f64;
            stop = v[1] > 0.0;
        }
        if !loss.is_finite() {
            return Err(Error::Msg(format!(
                "step {step}: loss is {loss}; lower train.lr (now {}) or check the data",
                t.lr
            )));
        }
        let grad_norm = if plan.layerwise {
            state.prev_grad_norm = Some(micro_norms);
            micro_norms
        } else if let Some(n) = graph_norm {
            n
        } else {
            // The gradients averaged over the ranks (every rank has the same defined ones),
            // unless that overlapped the backward pass.
            let (idx, grads): (Vec<usize>, Vec<tch::Tensor>) = tensors
                .iter()
                .map(|t| t.grad())
                .enumerate()
                .filter(|(_, g)| g.defined())
                .unzip();
            if !overlap {
                reduce_grads(
                    dist,
                    opt.as_ref(),
                    &idx,
                    &grads.iter().collect::<Vec<_>>(),
                    projected,
                )?;
            }
            let n = if t.max_grad_norm > 0.0 {
                clip_grad_norm(&tensors, t.max_grad_norm)
            } else {
                frugal_optim::grad_norm(&tensors)
            };
            if zero1 {
                let mine: Vec<usize> = (0..tensors.len()).filter(|&i| owner[i] == rank).collect();
                opt.step_indices(&mine)?;
                let all: Vec<usize> = (0..tensors.len()).collect();
                broadcast_from_owners(dist, &tensors, &all, &owner)?;
            } else {
                opt.step()?;
            }
            opt.zero_grad();
            n
        };
        steps_here += 1;
        let (mut line, tps) = clock.finish(
            &mut state,
            &sampler,
            opt.as_ref(),
            t0,
            step,
            tokens_per_step,
            (loss, lr, grad_norm),
        );
        if world > 1 || nccl {
            // Payload bytes this rank all-reduced in the step (gradients, loss and stop flag).
            line["allreduce_bytes"] = json!(dist.bytes_reduced() - reduced_before);
        }
        progress.update(step, loss, tps);

        let last = step == t.max_steps;
        // Rank 0 alone evaluates and writes; the others go on to the next step's all-reduce.
        if main && ((t.eval_every > 0 && step % t.eval_every == 0) || last) {
            // The last evaluation scores the whole split (as `frugal eval` does) unless told.
            let batches = if last {
                t.final_eval_batches
            } else {
                t.eval_batches
            };
            m.set_training(false);
            let (vl, _) = run::evaluate(&m.net, &val_ds, t.batch_size, batches, device);
            m.set_training(true);
            val_loss = vl;
            line["val_loss"] = json!(vl);
            line["val_ppl"] = json!(vl.exp());
            progress.message(&format!(
                "step {step}: val_loss {vl:.4} (ppl {:.2}), unigram {unigram:.4}",
                vl.exp()
            ));
        }
        history.push(line)?;
        if main && line_has_val(&history) {
            history.plot(&run_dir.join("loss.png"), unigram);
        }
        if (t.save_every > 0 && step % t.save_every == 0) || last || stop {
            save_checkpoint(
                run_dir,
                &m,
                opt.as_ref(),
                &state,
                t.keep_checkpoints,
                dist,
                zero1,
            )?;
            if main && adapter {
                m.save_adapter(&run_dir.join("adapter"))?;
            }
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
    m.set_training(false);
    let summary = |val_loss: f64, peak_rss_bytes: u64| Summary {
        run_dir: run_dir.to_path_buf(),
        steps: state.step,
        tokens: state.tokens,
        train_loss: history.recent_loss(10),
        val_loss,
        unigram_val_loss: unigram,
        peak_rss_bytes,
        baseline_rss_bytes: baseline_rss,
        interrupted,
        val_accuracy: None,
        baseline_name: None,
    };
    if !main {
        return Ok(summary(val_loss, memory::peak_rss_bytes()));
    }
    if val_loss.is_nan() && !interrupted {
        // Nothing left to train (a resume at or past max_steps): still report the model.
        val_loss = run::evaluate(&m.net, &val_ds, t.batch_size, t.final_eval_batches, device).0;
    }
    history.plot(&run_dir.join("loss.png"), unigram);

    // The accounting from shapes exists for the LLaMA (`--dry-run`).
    let plans = shape.llama().map(|s| crate::memplan::plan(cfg, s));
    let mut acc = Accounting::default();
    acc.add_tensors("parameters", tensors.iter());
    if let (true, Some((planned, _))) = (plan.layerwise, &plans) {
        // One group's gradients at a time, never kept in `.grad`.
        acc.add("gradients", planned.get("gradients"));
    } else {
        acc.add_tensors("gradients", tensors.iter());
    }
    acc.add("optimizer_state", opt.state_bytes());
    let (mut report, peak) = clock.memory_report(device, baseline_rss, &acc, &m.vs);
    if adapter {
        report["frozen_base"] = frozen_base_bytes(&m);
    }
    if world > 1 {
        // The accounting is rank 0's: with a sharded state, its share of the optimizer state.
        report["dist"] = json!({
            "processes": world,
            "zero1": zero1,
            "galore_projected": projected,
            "overlap": overlap,
        });
    }
    if let Some((planned, adamw)) = &plans {
        report["plan"] = planned.to_json();
        report["adamw_full_gradients"] = adamw.to_json();
    }
    report["plan_note"] = json!("plan: the accounting computed from shapes (activations and logits estimated), as `frugal train --dry-run` prints it; adamw_full_gradients: the same for plain AdamW with full gradients, no checkpointing, no chunking");
    atomic::write(
        &run_dir.join("memory.json"),
        serde_json::to_string_pretty(&report)
            .expect("json")
            .as_bytes(),
    )?;

    Ok(summary(val_loss, peak))
}

/// The bookkeeping every training loop does once a step's update is done: the trainer state's
/// counters, the peak memory so far, the GaLore bases' share of the step, and the step's
/// `metrics.jsonl` line.
pub(crate) struct StepClock {
    started: Instant,
    svd_seen: f64,
    /// The process's peak resident memory when the last step ended (before its evaluation and
    /// checkpoint).
    pub steps_peak: u64,
    galore: bool,
    /// The CUDA device whose caching allocator the steps' GPU peaks are read from.
    cuda: Option<usize>,
    /// The allocator's peak of allocated bytes when the last step ended.
    steps_gpu_peak: Option<i64>,
}

/// The caching allocator's statistics of `device` when it is a CUDA device whose statistics
/// Frugal's libtorch extension can read.
fn gpu_stats(device: tch::Device) -> Option<frugal_kernels::torch_cuda::MemoryStats> {
    match device {
        tch::Device::Cuda(i) => frugal_kernels::torch_cuda::memory_stats(i).ok(),
        _ => None,
    }
}

impl StepClock {
    /// Starts the clock of a run that has already trained for `state.elapsed_s` seconds;
    /// `galore`: report `svd_s` (seconds of the step spent computing bases).
    pub fn new(state: &TrainerState, galore: bool, device: tch::Device) -> Self {
        let cuda = match device {
            tch::Device::Cuda(i) => Some(i),
            _ => None,
        };
        Self {
            started: Instant::now() - std::time::Duration::from_secs_f64(state.elapsed_s),
            svd_seen: 0.0,
            steps_peak: 0,
            galore,
            cuda,
            steps_gpu_peak: None,
        }
    }

    /// Records step `step` (begun at `t0`, `tokens` trained) in `state` and returns its metrics
    /// line and tokens per second.
    #[allow(clippy::too_many_arguments)]
    pub fn finish(
        &mut self,
        state: &mut TrainerState,
        sampler: &Sampler,
        opt: &dyn frugal_optim::Optimizer,
        t0: Instant,
        step: u64,
        tokens: u64,
        (loss, lr, grad_norm): (f64, f64, f64),
    ) -> (serde_json::Value, f64) {
        let step_time = t0.elapsed().as_secs_f64();
        self.steps_peak = memory::peak_rss_bytes();
        let svd_total = opt.projection_seconds();
        let svd_s = svd_total - self.svd_seen;
        self.svd_seen = svd_total;
        state.step = step;
        state.tokens += tokens;
        state.sampler = sampler.state();
        state.elapsed_s = self.started.elapsed().as_secs_f64();
        let tps = tokens as f64 / step_time;
        let mut line = json!({
            "step": step, "loss": loss, "lr": lr, "tokens": state.tokens,
            "tokens_per_s": tps, "step_time_s": step_time, "grad_norm": grad_norm,
            "rss_peak_bytes": self.steps_peak,
        });
        if self.galore {
            // Seconds of this step spent computing GaLore bases (part of step_time_s).
            line["svd_s"] = json!(svd_s);
        }
        if let Some(stats) = self.cuda.and_then(|i| gpu_stats(tch::Device::Cuda(i))) {
            // The caching allocator's peak so far: what the GPU's memory must hold.
            self.steps_gpu_peak = Some(stats.peak_allocated);
            line["gpu_peak_allocated_bytes"] = json!(stats.peak_allocated);
        }
        (line, tps)
    }

    /// The part of `memory.json` every run writes: the accounting `acc`, the measured peaks
    /// (the whole run's, read now, and the steps') against `baseline_rss`, and every variable
    /// of `vs` with its shape and bytes. Returns it with the whole run's peak.
    pub fn memory_report(
        &self,
        device: tch::Device,
        baseline_rss: u64,
        acc: &Accounting,
        vs: &tch::nn::VarStore,
    ) -> (serde_json::Value, u64) {
        let peak = memory::peak_rss_bytes();
        let by_tensor: Vec<serde_json::Value> = frugal_models::weights::named_variables(vs)
            .iter()
            .map(|(n, t)| json!({"name": n, "shape": t.size(), "bytes": memory::tensor_bytes(t)}))
            .collect();
        let report = json!({
            "device": format!("{device:?}"),
            "accounting": acc.bytes,
            "accounting_total_bytes": acc.total(),
            "measured": {
                "baseline_rss_bytes": baseline_rss,
                "peak_rss_bytes": peak,
                "peak_above_baseline_bytes": peak.saturating_sub(baseline_rss),
                "steps_peak_rss_bytes": self.steps_peak,
                "steps_peak_above_baseline_bytes": self.steps_peak.saturating_sub(baseline_rss),
                "note": "baseline: resident memory after libtorch started and the data was loaded, before the model was built; peak: the whole run's (evaluations and checkpoints included); steps_peak: the peak when the last training step ended, before its evaluation and checkpoint; activations and workspace are the measured peak above the baseline minus the accounted bytes",
            },
            "activations_and_workspace_bytes": peak.saturating_sub(baseline_rss).saturating_sub(acc.total()),
            "parameters": by_tensor,
        });
        let mut report = report;
        if let Some(stats) = gpu_stats(device) {
            let peak_gpu = u64::try_from(stats.peak_allocated).unwrap_or(0);
            report["measured"]["gpu"] = json!({
                "allocated_bytes": stats.allocated,
                "peak_allocated_bytes": stats.peak_allocated,
                "reserved_bytes": stats.reserved,
                "peak_reserved_bytes": stats.peak_reserved,
                "steps_peak_allocated_bytes": self.steps_gpu_peak,
                "note": "libtorch's CUDA caching allocator: allocated counts live tensors, reserved what it holds from the driver (its cache too); peaks since the run started",
            });
            // On a GPU the model, its state and the activations live in the allocator's memory.
            report["activations_and_workspace_bytes"] = json!(peak_gpu.saturating_sub(acc.total()));
        }
        (report, peak)
    }
}

pub(crate) fn line_has_val(m: &Metrics) -> bool {
    m.lines.last().is_some_and(|l| l.get("val_loss").is_some())
}

/// `metrics.jsonl`, kept in memory for the plot; on resume, lines past the checkpoint's step
/// are dropped so that the file reads as one uninterrupted run.
pub(crate) struct Metrics {
    path: PathBuf,
    lines: Vec<serde_json::Value>,
    file: Option<std::fs::File>,
}

impl Metrics {
    pub(crate) fn open(path: &Path, upto_step: u64) -> Result<Self> {
        let mut lines = Vec::new();
        if upto_step > 0 {
            if let Ok(text) = std::fs::read_to_string(path) {
                for l in text.lines() {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(l) {
                        if v["step"].as_u64().is_some_and(|s| s <= upto_step) {
                            lines.push(v);
                        }
                    }
                }
            }
        }
        let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
        atomic::write(path, body.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            lines,
            file: Some(file),
        })
    }

    /// Lines kept in memory only (the ranks other than 0 of a data-parallel run).
    pub(crate) fn in_memory() -> Self {
        Self {
            path: PathBuf::new(),
            lines: Vec::new(),
            file: None,
        }
    }

    pub(crate) fn push(&mut self, line: serde_json::Value) -> Result<()> {
        if let Some(f) = &mut self.file {
            writeln!(f, "{line}").map_err(|e| Error::io(&self.path, e))?;
        }
        self.lines.push(line);
        Ok(())
    }

    /// The lines so far (this run's, and on resume those before the checkpoint).
    pub(crate) fn lines(&self) -> &[serde_json::Value] {
        &self.lines
    }

    pub(crate) fn recent_loss(&self, n: usize) -> f64 {
        let tail: Vec<f64> = self
            .lines
            .iter()
            .rev()
            .take(n)
            .filter_map(|l| l["loss"].as_f64())
            .collect();
        tail.iter().sum::<f64>() / tail.len().max(1) as f64
    }

    fn plot(&self, path: &Path, unigram: f64) {
        self.plot_with(path, unigram, "unigram (val)");
    }

    /// The loss curve with a horizontal `baseline` line named `baseline_name`.
    pub(crate) fn plot_with(&self, path: &Path, unigram: f64, baseline_name: &str) {
        let pick = |key: &str| -> Vec<(f64, f64)> {
            self.lines
                .iter()
                .filter_map(|l| Some((l["step"].as_f64()?, l[key].as_f64()?)))
                .collect()
        };
        let train = pick("loss");
        let val = pick("val_loss");
        let base: Vec<(f64, f64)> = match (train.first(), train.last()) {
            (Some(a), Some(b)) => vec![(a.0, unigram), (b.0, unigram)],
            _ => vec![],
        };
        let series = [
            Series {
                name: "train",
                points: &train,
                rgb: [31, 119, 180],
            },
            Series {
                name: "validation",
                points: &val,
                rgb: [214, 39, 40],
            },
            Series {
                name: baseline_name,
                points: &base,
                rgb: [150, 150, 150],
            },
        ];
        if let Err(e) = plot::write_loss_png(path, "loss", "step", "loss (nats/token)", &series) {
            eprintln!("frugal: warning: cannot write {}: {e}", path.display());
        }
    }
}

/// Prints the end-of-run summary.
pub fn print_summary(s: &Summary) {
    let ppl = |l: f64| l.exp();
    println!();
    println!(
        "{}",
        if s.interrupted {
            "run interrupted (checkpoint saved)"
        } else {
            "run finished"
        }
    );
    println!("  steps                {}", s.steps);
    println!("  tokens               {}", s.tokens);
    println!(
        "  train loss           {:.4} (ppl {:.2}, mean of the last 10 steps)",
        s.train_loss,
        ppl(s.train_loss)
    );
    println!(
        "  validation loss      {:.4} (ppl {:.2})",
        s.val_loss,
        ppl(s.val_loss)
    );
    if let Some(acc) = s.val_accuracy {
        println!("  validation accuracy  {acc:.4}");
    }
    match &s.baseline_name {
        Some(name) => println!("  {name:<20} {:.4}", s.unigram_val_loss),
        None => println!(
            "  unigram val loss     {:.4} (ppl {:.2}), the loss of a model that ignores context",
            s.unigram_val_loss,
            ppl(s.unigram_val_loss)
        ),
    }
    println!(
        "  peak memory          {} resident ({} above the {} baseline)",
        human_bytes(s.peak_rss_bytes),
        human_bytes(s.peak_rss_bytes.saturating_sub(s.baseline_rss_bytes)),
        human_bytes(s.baseline_rss_bytes)
    );
    println!("  run directory        {}", s.run_dir.display());
}

/// What the frozen base of an adapter run holds: its quantized matrices (bytes as stored,
/// parameters, bytes per parameter) and its other variables (embeddings, norms, head, dense
/// linear weights).
fn frozen_base_bytes(m: &run::Model) -> serde_json::Value {
    let (mut qbytes, mut qparams) = (0u64, 0u64);
    for (_, l) in m.net.linears() {
        if let Some(q) = l.quantized() {
            qbytes += q.weight.stored_bytes();
            qparams += q.weight.numel() as u64;
        }
    }
    let (mut other, mut other_params) = (0u64, 0u64);
    for (name, t) in frugal_models::weights::named_variables(&m.vs) {
        if !frugal_models::adapted::is_adapter_variable(&name) {
            other += (t.numel() * t.kind().elt_size_in_bytes()) as u64;
            other_params += t.numel() as u64;
        }
    }
    json!({
        "quantized_bytes": qbytes,
        "quantized_params": qparams,
        "quantized_bytes_per_param": if qparams > 0 { qbytes as f64 / qparams as f64 } else { 0.0 },
        "other_bytes": other,
        "other_params": other_params,
        "total_bytes": qbytes + other,
    })
}

#[cfg(test)]
mod tests {
    use super::owners;

    /// Guarantee: the sharded state's owners balance the values, largest first, lowest rank on
    /// ties, and one rank owns everything alone.
    #[test]
    fn owners_balance_by_size() {
        assert_eq!(owners(&[10, 3, 7, 2, 1], 2), vec![0, 1, 1, 0, 1]);
        assert_eq!(owners(&[4, 4, 4], 3), vec![0, 1, 2]);
        assert_eq!(owners(&[5, 6, 7], 1), vec![0, 0, 0]);
    }
}
