//! What setting a task up shares between the tasks ([`crate::task_lm`],
//! [`crate::task_encoder`]): the tokenizer made by rank 0 first, the resolved config that marks
//! a folder as a run, the memory report's baseline, and the frozen base of an adapter run.

use crate::config::Config;
use crate::task::Task;
use frugal_core::{atomic, memory, Error, Result};
use frugal_dist::Collective;
use frugal_records::FrozenBase;
use std::path::Path;
use tch::nn::VarStore;

/// A task as built: the task and the resident memory measured after its data was loaded,
/// before its model was built (the memory report's baseline).
pub struct Built<T> {
    /// The task.
    pub task: T,
    /// Resident bytes before the model.
    pub baseline_rss_bytes: u64,
}

/// Measures the baseline of the memory report: resident memory now, and on a GPU the
/// allocator's peak counted from here.
pub fn baseline_now(device: tch::Device) -> u64 {
    if let tch::Device::Cuda(i) = device {
        let _ = frugal_kernels::torch_cuda::reset_peak(i);
    }
    memory::current_rss_bytes()
}

impl<T: Task + 'static> Built<T> {
    /// The task as a trait object, with its baseline.
    pub fn boxed(self) -> (Box<dyn Task>, u64) {
        (Box::new(self.task), self.baseline_rss_bytes)
    }
}

/// Runs `make` on rank 0 of `dist` first (it writes what the others read, as the tokenizer
/// into the run folder), then, once every rank is there, on the others with `true` (read what
/// rank 0 wrote); rank 0's own call gets `resume`. An error of rank 0's is returned after the
/// barrier, so the others do not wait for it.
pub fn rank0_first<T>(
    dist: &mut dyn Collective,
    resume: bool,
    make: impl Fn(bool) -> Result<T>,
) -> Result<T> {
    let main = dist.is_main();
    let made = if main {
        make(resume)
    } else {
        Err(Error::Msg(String::new()))
    };
    dist.barrier().map_err(|e| Error::Msg(e.to_string()))?;
    match made {
        Ok(t) => Ok(t),
        Err(_) if !main => make(true),
        Err(e) => Err(e),
    }
}

/// Writes the resolved `cfg` as the run folder's `config.toml` (atomically): what marks the
/// folder as a run, written once the inputs are known good so that a run refused for bad input
/// can be retried into the same folder.
pub fn write_resolved_config(cfg: &Config, run_dir: &Path) -> Result<()> {
    let resolved = toml::to_string(cfg).map_err(|e| Error::Msg(format!("config: {e}")))?;
    atomic::write(&run_dir.join("config.toml"), resolved.as_bytes())
}

/// What the frozen base of an adapter run holds: its quantized matrices among `linears`
/// (bytes as stored, parameters, bytes per parameter) and its other variables in `vs` that
/// take no gradient (embeddings, norms, head, dense linear weights).
pub fn frozen_base_bytes(
    linears: &[(String, &dyn frugal_models::linear::Linear)],
    vs: &VarStore,
) -> FrozenBase {
    let (mut qbytes, mut qparams) = (0u64, 0u64);
    for (_, l) in linears {
        if let Some(q) = l.quantized() {
            qbytes += q.weight.stored_bytes();
            qparams += q.weight.numel() as u64;
        }
    }
    let (mut other, mut other_params) = (0u64, 0u64);
    for (_, t) in frugal_models::weights::named_variables(vs) {
        if !t.requires_grad() {
            other += (t.numel() * t.kind().elt_size_in_bytes()) as u64;
            other_params += t.numel() as u64;
        }
    }
    FrozenBase {
        quantized_bytes: qbytes,
        quantized_params: qparams,
        quantized_bytes_per_param: if qparams > 0 {
            qbytes as f64 / qparams as f64
        } else {
            0.0
        },
        other_bytes: other,
        other_params,
        total_bytes: qbytes + other,
    }
}
