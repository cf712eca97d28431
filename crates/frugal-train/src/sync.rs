//! Gradient synchronisation, the one component through which the trainer talks to the other
//! processes of a data-parallel run (`frugal_dist::Collective`: one process, MPI or NCCL):
//! the first weights broadcast from rank 0, gradients averaged before each update (in buckets;
//! on the GPU through NCCL without host copies; GaLore's projected gradients with
//! `dist.galore_projected`; started during the backward pass with `dist.overlap`), the
//! optimizer state sharded by parameter (`dist.zero1`: each rank steps its own share and
//! broadcasts it), the mean loss and the stop flag, and the sharded checkpoint's files.
//!
//! With one process and no GPU collectives every operation returns at once, so the loop calls
//! the same methods whatever the launch.

use crate::checkpoint::{self, TrainerState};
use crate::config::DistConfig;
use frugal_core::{Error, Result};
use frugal_dist::Collective;
use std::path::{Path, PathBuf};

/// Data parallelism as the loop sees it (see the module documentation).
pub struct GradSync<'d> {
    dist: &'d mut dyn Collective,
    /// The optimizer state is sharded (`dist.zero1` with several processes).
    pub zero1: bool,
    /// GaLore's projected gradients are averaged (`dist.galore_projected` with GaLore).
    pub projected: bool,
    /// All-reduces start during the backward pass (`dist.overlap`, MPI, several processes,
    /// without per-layer updates).
    pub overlap: bool,
    /// The rank that steps each parameter.
    owner: Vec<usize>,
    /// All-reduces started during the last micro-batch's backward pass: the parameters of
    /// each, and the operations.
    started_idx: Vec<Vec<usize>>,
    started: Vec<frugal_dist::InFlight>,
}

impl<'d> GradSync<'d> {
    /// The component for the parameters of sizes `sizes` (values) under `cfg`; `galore`: the
    /// optimizer projects gradients; `layerwise`: per-layer updates.
    pub fn new(
        dist: &'d mut dyn Collective,
        cfg: &DistConfig,
        sizes: &[usize],
        galore: bool,
        layerwise: bool,
    ) -> Self {
        let (world, rank) = (dist.size(), dist.rank());
        let zero1 = cfg.zero1 && world > 1;
        let owner = if zero1 {
            owners(sizes, world)
        } else {
            vec![rank; sizes.len()]
        };
        let projected = cfg.galore_projected && galore;
        let nccl = dist.device_collective().is_some();
        // Overlap is MPI's, on host buffers: over NCCL the gradients stay on the GPU and are
        // reduced after the backward pass.
        let overlap = cfg.overlap && world > 1 && !layerwise && !projected && !nccl;
        Self {
            dist,
            zero1,
            projected,
            overlap,
            owner,
            started_idx: Vec::new(),
            started: Vec::new(),
        }
    }

    /// Processes in the run.
    pub fn world(&self) -> usize {
        self.dist.size()
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.dist.rank()
    }

    /// Whether this is rank 0 (which alone writes the run's files).
    pub fn is_main(&self) -> bool {
        self.dist.is_main()
    }

    /// Whether collectives run at all (several processes, or NCCL even for one: the path a
    /// one-GPU test can check).
    pub fn active(&mut self) -> bool {
        self.dist.size() > 1 || self.dist.device_collective().is_some()
    }

    /// Payload bytes all-reduced so far.
    pub fn bytes_reduced(&self) -> u64 {
        self.dist.bytes_reduced()
    }

    /// Waits for every rank.
    pub fn barrier(&mut self) -> Result<()> {
        self.dist.barrier().map_err(dist_err)
    }

    /// Whether parameter `i` is stepped by this rank.
    pub fn owns(&self, i: usize) -> bool {
        self.owner[i] == self.dist.rank()
    }

    /// Gives every rank rank 0's values of `tensors` (the first weights).
    pub fn broadcast_initial(&mut self, tensors: &[tch::Tensor]) -> Result<()> {
        if !self.active() {
            return Ok(());
        }
        let all: Vec<usize> = (0..tensors.len()).collect();
        broadcast_from_owners(self.dist, tensors, &all, &vec![0; tensors.len()])
    }

    /// Averages the gradients `grads` of the optimizer's parameters at `idx` over the ranks,
    /// in place (projected where `dist.galore_projected` applies).
    pub fn reduce(
        &mut self,
        opt: &dyn frugal_optim::Optimizer,
        idx: &[usize],
        grads: &[&tch::Tensor],
    ) -> Result<()> {
        reduce_grads(self.dist, opt, idx, grads, self.projected)
    }

    /// Averages plain tensors (gradients of parameters no projector knows) over the ranks.
    pub fn reduce_plain(&mut self, grads: &[&tch::Tensor]) -> Result<()> {
        all_reduce_mean(self.dist, grads)
    }

    /// `dist.overlap`: the group `idx` of `tensors` has its complete `.grad`: starts averaging
    /// it while the backward pass goes on.
    pub fn start_group(&mut self, tensors: &[tch::Tensor], idx: &[usize]) -> Result<()> {
        let (defined, grads): (Vec<usize>, Vec<tch::Tensor>) = idx
            .iter()
            .map(|&i| (i, tensors[i].grad()))
            .filter(|(_, g)| g.defined())
            .unzip();
        if !defined.is_empty() {
            let buf = host_f32(&grads.iter().collect::<Vec<_>>())?;
            self.started
                .push(self.dist.start_all_reduce_sum(buf).map_err(dist_err)?);
            self.started_idx.push(defined);
        }
        self.dist.progress(&mut self.started).map_err(dist_err)
    }

    /// Waits for the all-reduces [`GradSync::start_group`] started, in order, and puts the
    /// means into `.grad`.
    pub fn finish_started(&mut self, tensors: &[tch::Tensor]) -> Result<()> {
        let world = self.dist.size();
        let idx = std::mem::take(&mut self.started_idx);
        let ops = std::mem::take(&mut self.started);
        for (idx, op) in idx.into_iter().zip(ops) {
            let buf = self.dist.finish_all_reduce(op).map_err(dist_err)?;
            let grads: Vec<tch::Tensor> = idx.iter().map(|&i| tensors[i].grad()).collect();
            copy_mean_into(&grads.iter().collect::<Vec<_>>(), &buf, world)?;
        }
        Ok(())
    }

    /// The weight of this rank's mean loss over `scored` units (masked tokens, scored targets)
    /// such that the mean over the ranks of the weighted losses is the mean over all the
    /// ranks' units: `scored * world / total` (1 in one process).
    pub fn share_of(&mut self, scored: u64) -> Result<f64> {
        let world = self.dist.size();
        if world == 1 {
            return Ok(1.0);
        }
        let mut v = [scored as f32];
        self.dist.all_reduce_sum(&mut v).map_err(dist_err)?;
        Ok(if v[0] > 0.0 {
            scored as f64 * world as f64 / f64::from(v[0])
        } else {
            0.0
        })
    }

    /// The mean of `loss` over the ranks, whether any rank asked to stop, and the tokens all
    /// the ranks trained on (`tokens`: this rank's).
    pub fn mean_loss_stop_tokens(
        &mut self,
        loss: f64,
        stop: bool,
        tokens: u64,
    ) -> Result<(f64, bool, u64)> {
        let world = self.dist.size();
        if world == 1 {
            return Ok((loss, stop, tokens));
        }
        let mut v = [loss as f32, stop as u8 as f32, tokens as f32];
        self.dist.all_reduce_sum(&mut v).map_err(dist_err)?;
        Ok((
            f64::from(v[0]) / world as f64,
            v[1] > 0.0,
            v[2].round() as u64,
        ))
    }

    /// After a group's update under a sharded state: every rank gets the owners' values of
    /// the parameters at `idx`.
    pub fn share_updated(&mut self, tensors: &[tch::Tensor], idx: &[usize]) -> Result<()> {
        if self.zero1 {
            broadcast_from_owners(self.dist, tensors, idx, &self.owner)?;
        }
        Ok(())
    }

    /// The optimizer's step over every parameter this rank owns, then (sharded) the owners'
    /// values to every rank.
    pub fn step(
        &mut self,
        opt: &mut dyn frugal_optim::Optimizer,
        tensors: &[tch::Tensor],
    ) -> Result<()> {
        if !self.zero1 {
            return opt.step();
        }
        let mine: Vec<usize> = (0..tensors.len()).filter(|&i| self.owns(i)).collect();
        opt.step_indices(&mine)?;
        let all: Vec<usize> = (0..tensors.len()).collect();
        self.share_updated(tensors, &all)
    }

    /// Saves a checkpoint: rank 0 writes it (`save` writes `parts` with the extra files it is
    /// given); with a sharded optimizer state every rank takes part: the others write their
    /// shards beside the checkpoints, and rank 0 moves them into the new checkpoint before it
    /// is renamed into place.
    pub fn save_checkpoint(
        &mut self,
        run_dir: &Path,
        opt: &dyn frugal_optim::Optimizer,
        state: &TrainerState,
        save: impl FnOnce(&[(String, PathBuf)]) -> Result<()>,
    ) -> Result<()> {
        let (rank, world) = (self.dist.rank(), self.dist.size());
        if !self.zero1 {
            if rank == 0 {
                save(&[])?;
            }
            return Ok(());
        }
        let staging = checkpoint::dir(run_dir).join(format!(".shards-step-{}", state.step));
        if rank > 0 {
            std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
            opt.save(&staging.join(checkpoint::shard_file(rank)))?;
        }
        self.barrier()?;
        if rank == 0 {
            let files: Vec<(String, PathBuf)> = (1..world)
                .map(|r| {
                    (
                        checkpoint::shard_file(r),
                        staging.join(checkpoint::shard_file(r)),
                    )
                })
                .collect();
            save(&files)?;
            let _ = std::fs::remove_dir_all(&staging);
        }
        Ok(())
    }

    /// The optimizer state file this rank resumes from in checkpoint `ck`, checked against
    /// how the checkpoint was saved (sharded or not).
    pub fn optimizer_file(&self, ck: &Path) -> Result<PathBuf> {
        let (rank, world) = (self.dist.rank(), self.dist.size());
        let file = ck.join(checkpoint::shard_file(if self.zero1 { rank } else { 0 }));
        if self.zero1 && !file.is_file() {
            return Err(Error::Msg(format!(
                "{}: no optimizer state for rank {rank} (was the run saved with dist.zero1 by \
                 {world} ranks?)",
                file.display()
            )));
        }
        if !self.zero1 && ck.join(checkpoint::shard_file(1)).is_file() {
            return Err(Error::Msg(format!(
                "{}: the optimizer state is sharded (saved with dist.zero1); resume it with \
                 dist.zero1 and as many ranks",
                ck.display()
            )));
        }
        Ok(file)
    }

    /// The device this rank trains on: the backend's GPU for NCCL; with several MPI ranks on
    /// CUDA, the GPU of the rank's local ordinal (modulo the GPUs there are); else `device`.
    pub fn rank_device(&mut self, device: tch::Device) -> tch::Device {
        rank_device(device, self.dist)
    }
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
pub fn rank_device(device: tch::Device, dist: &mut dyn Collective) -> tch::Device {
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
