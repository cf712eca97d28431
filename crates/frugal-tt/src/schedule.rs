//! CoMERA's two-stage objective (arXiv 2405.14377, Sec. 3.2): early, the loss plus a weighted
//! rank penalty; late, each step descends whichever of loss and size is relatively further from
//! its target.

use frugal_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// The `tt` table's rank-adaptation settings. Defaults are the published ones where CoMERA gives
/// them (penalty weight 0.01, loss target 0.8, threshold 1e-2); the paper counts the early stage
/// in epochs (20 on MNLI), Frugal in optimizer steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ComeraConfig {
    /// `tt.early_steps`: optimizer steps of the early stage (loss + penalty); the late stage
    /// starts at this step. Default 1000.
    pub early_steps: u64,
    /// `tt.penalty_weight`: weight of the rank penalty in the early stage. Default 0.01.
    pub penalty_weight: f64,
    /// `tt.loss_target`: the late stage's loss target. Default 0.8.
    pub loss_target: f64,
    /// `tt.compression_target`: the late stage's size target as a fraction of the size at the
    /// stage's start, in (0, 1]. Default 0.5.
    pub compression_target: f64,
    /// `tt.threshold`: rank-variable entries with `|D| <= threshold` count as pruned. Default
    /// 1e-2.
    pub threshold: f64,
}

impl Default for ComeraConfig {
    fn default() -> Self {
        ComeraConfig {
            early_steps: 1000,
            penalty_weight: 0.01,
            loss_target: 0.8,
            compression_target: 0.5,
            threshold: crate::rank::PRUNE_THRESHOLD,
        }
    }
}

impl ComeraConfig {
    /// Checks the values; errors name the key (`tt.compression_target` outside (0, 1], a
    /// negative or non-finite `tt.penalty_weight`, a `tt.loss_target` or `tt.threshold` not
    /// above 0).
    pub fn validate(&self) -> Result<()> {
        let c = self.compression_target;
        if !(c > 0.0 && c <= 1.0) {
            return Err(Error::config(
                "tt.compression_target",
                format!("{c} is outside (0, 1]: the size target is this fraction of the size at the late stage's start"),
            ));
        }
        if !(self.penalty_weight.is_finite() && self.penalty_weight >= 0.0) {
            return Err(Error::config(
                "tt.penalty_weight",
                format!("{} must be finite and >= 0", self.penalty_weight),
            ));
        }
        if !(self.loss_target.is_finite() && self.loss_target > 0.0) {
            return Err(Error::config(
                "tt.loss_target",
                format!("{} must be finite and > 0", self.loss_target),
            ));
        }
        if !(self.threshold.is_finite() && self.threshold > 0.0) {
            return Err(Error::config(
                "tt.threshold",
                format!("{} must be finite and > 0", self.threshold),
            ));
        }
        Ok(())
    }
}

/// What a training step minimises.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// Early stage: `loss + weight · penalty` ([`crate::RankedCores::penalty`], summed over the
    /// layers' penalties or averaged, as the trainer documents).
    LossPlusPenalty(f64),
    /// Late stage, the loss is relatively further from its target: descend the loss.
    Loss,
    /// Late stage, the size is relatively further from its target: descend the differentiable
    /// size proxy ([`crate::RankedCores::size_proxy`], summed over layers).
    Size,
}

/// The two-stage schedule: [`ComeraConfig`] plus the size at the late stage's start (latched on
/// the first late step).
#[derive(Debug, Clone)]
pub struct ComeraSchedule {
    config: ComeraConfig,
    late_start_size: Option<f64>,
}

impl ComeraSchedule {
    /// A schedule; the config is validated.
    pub fn new(config: ComeraConfig) -> Result<Self> {
        config.validate()?;
        Ok(ComeraSchedule {
            config,
            late_start_size: None,
        })
    }

    /// The config.
    pub fn config(&self) -> &ComeraConfig {
        &self.config
    }

    /// The size target, `compression_target · size at the late stage's start`, once known.
    pub fn size_target(&self) -> Option<f64> {
        self.late_start_size
            .map(|s| s * self.config.compression_target)
    }

    /// The size at the late stage's start, once latched.
    pub fn late_start_size(&self) -> Option<f64> {
        self.late_start_size
    }

    /// Sets the size at the late stage's start (for resuming from a checkpoint).
    pub fn set_late_start_size(&mut self, size: Option<f64>) {
        self.late_start_size = size;
    }

    /// The objective of step `step` (counted from 0) given the current loss and live size (the
    /// sum of [`crate::RankedCores::live_size`] over the layers). Steps before `early_steps`
    /// return `LossPlusPenalty(penalty_weight)`; the first later call latches `size` as the
    /// stage's starting size; then [`late_objective`] decides.
    pub fn objective(&mut self, step: u64, loss: f64, size: f64) -> Objective {
        if step < self.config.early_steps {
            return Objective::LossPlusPenalty(self.config.penalty_weight);
        }
        let start = *self.late_start_size.get_or_insert(size);
        late_objective(
            loss,
            self.config.loss_target,
            size,
            start * self.config.compression_target,
        )
    }
}

/// The late stage's choice: the relative gaps `(loss - loss_target) / loss_target` and
/// `(size - size_target) / size_target` are compared and the larger is descended (`Loss` on a
/// tie, and when both targets are met the larger gap still decides, so training goes on).
pub fn late_objective(loss: f64, loss_target: f64, size: f64, size_target: f64) -> Objective {
    let loss_gap = (loss - loss_target) / loss_target;
    let size_gap = (size - size_target) / size_target;
    if size_gap > loss_gap {
        Objective::Size
    } else {
        Objective::Loss
    }
}
