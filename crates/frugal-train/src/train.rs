//! `frugal train`: sets a run up from its configuration (the device, the task with its data and
//! model, the hooks its methods need, the optimizer) and hands it to the one loop,
//! [`crate::trainer::Trainer::fit`].

use crate::checkpoint;
use crate::comera::Comera;
use crate::config::Config;
use crate::interrupt::Interrupter;
use crate::task::{AdapterSeed, Hook};
use crate::task_encoder::EncoderTask;
use crate::task_lm::CausalLm;
use crate::trainer::{Run, Trainer};
use frugal_core::{Error, Result};
use frugal_dist::Collective;
use std::path::Path;

pub use crate::records::{print_summary, Summary};

/// Trains as `cfg` says into `run_dir` in this process alone. With `resume`, continues from the
/// run's latest checkpoint (exactly: on CPU the losses and weights equal those of an
/// uninterrupted run).
pub fn train(cfg: &Config, run_dir: &Path, resume: bool) -> Result<Summary> {
    train_with(
        cfg,
        run_dir,
        resume,
        &mut frugal_dist::Single::default(),
        &Interrupter::new(),
    )
}

/// [`train`] as one of the ranks of `dist` (data parallelism; see
/// [`crate::trainer::Trainer::fit`]); `stop` asks the run to save a checkpoint and return.
pub fn train_with(
    cfg: &Config,
    run_dir: &Path,
    resume: bool,
    dist: &mut dyn Collective,
    stop: &Interrupter,
) -> Result<Summary> {
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    if cfg.train.threads > 0 {
        tch::set_num_threads(cfg.train.threads as i32);
    }
    let device = crate::sync::rank_device(cfg.train.device.resolve()?, dist);
    crate::cuda_graph::check_device(&cfg.train, device)?;
    if cfg.tt.rank_adapt && dist.size() > 1 {
        return Err(Error::config(
            "tt.rank_adapt",
            "is not available with several processes yet: the late stage decides from one \
             micro-batch's loss whether a step updates the weights, which the ranks would \
             have to agree on",
        ));
    }
    if dist.is_main() {
        eprintln!("frugal: loading data");
    }
    let checkpoint = if resume {
        Some(checkpoint::latest(run_dir)?)
    } else {
        None
    };
    let ck = checkpoint.as_deref();
    let (mut task, baseline_rss_bytes) = if cfg.is_encoder() {
        EncoderTask::build(cfg, run_dir, ck, device, dist)?.boxed()
    } else {
        CausalLm::build(cfg, run_dir, ck, device, dist)?.boxed()
    };

    // The methods' hooks; rank adaptation takes the rank variables out of the parameters into
    // its own optimizer.
    let mut hooks: Vec<Box<dyn Hook>> = Vec::new();
    if cfg.adapter.enabled() {
        hooks.push(Box::new(AdapterSeed {
            seed: cfg.train.seed,
        }));
    }
    let mut params = task.trainable();
    if cfg.tt.rank_adapt {
        let (mut layers, _) = task.tt_layers_mut();
        let (c, main) = Comera::new(
            &cfg.tt,
            &cfg.optim,
            cfg.train.max_steps,
            &mut layers,
            params,
        )?;
        hooks.push(Box::new(c));
        params = main;
    }
    if dist.is_main() {
        eprintln!(
            "frugal: {} on {device:?}, {:?}",
            task.describe(),
            cfg.train.dtype
        );
    }
    let opt = crate::optimizers::build(
        &cfg.optim,
        cfg.train.seed,
        params
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect(),
        cfg.train.lr,
    )?;
    let trainer = Trainer {
        train: &cfg.train,
        dist: &cfg.dist,
        layerwise: cfg.optim.layerwise,
        galore: cfg.optim.is_galore(),
    };
    let run = Run {
        dir: run_dir,
        checkpoint: ck,
        device,
        baseline_rss_bytes,
        stop: stop.clone(),
    };
    trainer.fit(task.as_mut(), opt, params, hooks, dist, &run)
}
