//! Checkpoints: `checkpoints/step-N/` with `model.safetensors`, `optimizer.safetensors` and
//! `trainer_state.json`, built in a temporary folder and renamed into place; then
//! `checkpoints/latest` names it. An interrupted write leaves the previous checkpoint intact.
//! Runs with more than one optimizer write the others beside `optimizer.safetensors` under
//! their own names (rank adaptation: [`crate::comera::TT_OPTIMIZER_FILE`]); data-parallel runs
//! with a sharded optimizer state (`dist.zero1`) add each other rank's shard,
//! `optimizer-rank{r}.safetensors` ([`shard_file`]).

use crate::data::SamplerState;
use frugal_core::{atomic, Error, Result};
use frugal_optim::Optimizer;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything besides weights and optimizer state that a resumed run needs to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    /// Training tokens seen.
    pub tokens: u64,
    /// Where the data order stands (seed, epoch, position): the only randomness after
    /// initialisation, since the models have no dropout.
    pub sampler: SamplerState,
    /// Seconds of training so far.
    pub elapsed_s: f64,
    /// With per-layer updates: the previous step's gradient norm, which clips the next step.
    #[serde(default)]
    pub prev_grad_norm: Option<f64>,
    /// With rank adaptation (`tt.rank_adapt`): the live TT size latched at the late stage's
    /// start (its target is `tt.compression_target` times it); absent before the late stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tt_late_start_size: Option<f64>,
}

/// The checkpoints folder of a run.
pub fn dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

/// What a checkpoint holds beside `trainer_state.json`.
pub struct Parts<'a> {
    /// Writes the model's weights to the path it is given (`model.safetensors`).
    pub model: &'a dyn Fn(&Path) -> Result<()>,
    /// The optimizer (`optimizer.safetensors`).
    pub optimizer: &'a dyn Optimizer,
    /// Other optimizers, by file name (rank adaptation: [`crate::comera::TT_OPTIMIZER_FILE`]).
    pub extra_optimizers: &'a [(&'a str, &'a dyn Optimizer)],
    /// Files moved in, by name in the checkpoint (the other ranks' shards of a sharded
    /// optimizer state).
    pub files: &'a [(String, PathBuf)],
    /// The trainer's state.
    pub state: &'a TrainerState,
}

/// Writes checkpoint `checkpoints/step-N/` of `parts` (N: the state's step) into run folder
/// `run`, built in a temporary folder and renamed into place, then names it in
/// `checkpoints/latest` and keeps the newest `keep` (0: all).
pub fn save(run: &Path, parts: &Parts<'_>, keep: usize) -> Result<PathBuf> {
    let Parts {
        model: write_model,
        optimizer: opt,
        extra_optimizers: extra,
        files,
        state,
    } = *parts;
    let root = dir(run);
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    let name = format!("step-{}", state.step);
    let target = root.join(&name);
    atomic::write_dir(&target, |tmp| {
        write_model(&tmp.join("model.safetensors"))?;
        opt.save(&tmp.join("optimizer.safetensors"))?;
        for (file, o) in extra {
            o.save(&tmp.join(file))?;
        }
        for (name, src) in files {
            let to = tmp.join(name);
            std::fs::rename(src, &to)
                .or_else(|_| std::fs::copy(src, &to).map(|_| ()))
                .map_err(|e| Error::io(src, e))?;
        }
        let json = serde_json::to_vec_pretty(state).expect("plain struct");
        atomic::write(&tmp.join("trainer_state.json"), &json)
    })?;
    atomic::write(&root.join("latest"), format!("{name}\n").as_bytes())?;
    if keep > 0 {
        prune(&root, keep, &name);
    }
    Ok(target)
}

fn prune(root: &Path, keep: usize, newest: &str) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let mut steps: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let step = n.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    steps.sort();
    let excess = steps.len().saturating_sub(keep);
    for (_, path) in steps.into_iter().take(excess) {
        if !path.ends_with(newest) {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

/// The newest complete checkpoint of a run (the one `checkpoints/latest` names).
pub fn latest(run: &Path) -> Result<PathBuf> {
    let latest = dir(run).join("latest");
    let name = std::fs::read_to_string(&latest).map_err(|_| {
        Error::Msg(format!(
            "{}: no complete checkpoint (missing {})",
            run.display(),
            latest.display()
        ))
    })?;
    let path = dir(run).join(name.trim());
    if !path.join("trainer_state.json").is_file() {
        return Err(Error::Msg(format!(
            "{}: checkpoint is incomplete",
            path.display()
        )));
    }
    Ok(path)
}

/// Reads a checkpoint's trainer state.
pub fn read_state(checkpoint: &Path) -> Result<TrainerState> {
    let p = checkpoint.join("trainer_state.json");
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Msg(format!("{}: {e}", p.display())))
}

/// The checkpoint file of rank `rank`'s optimizer shard (`dist.zero1`): rank 0's is
/// `optimizer.safetensors`, as in any run.
pub fn shard_file(rank: usize) -> String {
    if rank == 0 {
        "optimizer.safetensors".into()
    } else {
        format!("optimizer-rank{rank}.safetensors")
    }
}
