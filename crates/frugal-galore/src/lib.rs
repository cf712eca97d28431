//! Gradient low-rank projection (GaLore, Zhao et al. 2024): an optimizer keeps its state for a
//! weight `(m, n)` in a rank-`r` subspace of the gradient, so that the state costs `r·max(m, n)`
//! or `r·min(m, n)` instead of `m·n`.
//!
//! The crate is usable alone: a [`GradientProjector`] projects a gradient into the subspace and
//! maps an update back. `frugal-optim` builds its GaLore optimizers (AdamW, Adafactor, 8-bit
//! AdamW) on this trait.
//!
//! [`GaloreProjector`] is GaLore's projector (galore-torch's `GaLoreProjector`, same
//! arithmetic), configured by [`GaloreConfig`]; it adds a randomized SVD, a fallback when the
//! SVD fails, Q-GaLore's lazy refresh, moment re-projection, and checkpointable state.
//!
//! ```no_run
//! use frugal_galore::{GaloreConfig, GaloreProjector, GradientProjector};
//! let config = GaloreConfig { rank: 8, update_proj_gap: 10, ..GaloreConfig::default() };
//! let mut projector = GaloreProjector::new(config)?.with_name("w");
//! let grad = tch::Tensor::randn([64, 32], (tch::Kind::Float, tch::Device::Cpu));
//! let low = projector.project(&grad, 0)?; // 64 x 8: the optimizer's state lives here
//! let update = projector.project_back(&low)?; // 64 x 32, times the scale
//! assert_eq!(update.size(), vec![64, 32]);
//! # Ok::<(), frugal_core::Error>(())
//! ```

mod config;
mod projector;
mod svd;

pub use config::{GaloreConfig, ProjType, SvdMethod};
pub use projector::GaloreProjector;

use frugal_core::Result;
use tch::Tensor;

/// Maps a parameter's gradient into a smaller space, and an update from that space back to the
/// parameter's shape. An optimizer with a projector keeps its state in the projected space.
pub trait GradientProjector: std::fmt::Debug + Send {
    /// Projects `grad` (the parameter's full gradient) for the optimizer step `step`, counted
    /// from 0 before the step is taken (GaLore recomputes its basis when `step` is a multiple of
    /// its gap, so at step 0 first).
    fn project(&mut self, grad: &Tensor, step: i64) -> Result<Tensor>;

    /// Maps `low`, an update in the projected space, back to the parameter's shape, multiplied
    /// by the projector's scale.
    fn project_back(&self, low: &Tensor) -> Result<Tensor>;

    /// Adds `alpha` times [`GradientProjector::project_back`]`(low)` to `weight`, in place. The
    /// default forms the full-size update first; a projector may multiply into the weight
    /// directly (GaLore's: one matrix product that accumulates, no full-size temporary).
    fn add_back(&self, weight: &Tensor, low: &Tensor, alpha: f64) -> Result<()> {
        add_full_back(self, weight, low, alpha)
    }

    /// When moment re-projection is enabled and the basis changed at the step of the last
    /// [`GradientProjector::project`] (so also after further `project` calls at that same step,
    /// for gradient accumulation): `moment` (a first moment in the old subspace, of the
    /// projected gradient's shape) moved into the new one. `None` when re-projection is off, the
    /// basis did not change, or the moment's shape is not the projected shape (the moment is
    /// then kept as is).
    fn reproject_first_moment(&self, moment: &Tensor) -> Option<Tensor>;

    /// Like [`GradientProjector::reproject_first_moment`], for a non-negative second moment
    /// (element-wise, of the projected gradient's shape); the result is non-negative too.
    fn reproject_second_moment(&self, moment: &Tensor) -> Option<Tensor>;

    /// Whether [`GradientProjector::reproject_first_moment`] would move a moment of the
    /// projected shape now (so that an optimizer keeping its moments in another form can skip
    /// materializing them when it would not).
    fn moments_need_reprojection(&self) -> bool {
        false
    }

    /// The projector's state (basis and counters) as named tensors under `prefix`
    /// (`{prefix}.ortho`, ...), for checkpoints.
    fn state_tensors(&self, prefix: &str) -> Vec<(String, Tensor)>;

    /// Restores the state written by [`GradientProjector::state_tensors`]; `get` reads a tensor
    /// by name. Errors name the missing or ill-shaped tensor.
    fn load_state(&mut self, prefix: &str, get: &dyn Fn(&str) -> Option<Tensor>) -> Result<()>;

    /// Bytes held by the projector (its basis).
    fn state_bytes(&self) -> u64;

    /// Whether [`GradientProjector::project`] at `step` would compute a new basis from the
    /// gradient it is given (so that data-parallel ranks must give it the same, averaged,
    /// gradient). The default says yes, the safe answer.
    fn refresh_due(&self, step: i64) -> bool {
        let _ = step;
        true
    }

    /// `grad` projected with the current basis, changing nothing (no refresh, no counters);
    /// None when there is no basis yet. Projection is linear: the mean of the ranks'
    /// projections is the projection of their mean, at `r/min(m, n)` of the bytes.
    fn project_current(&self, grad: &Tensor) -> Option<Result<Tensor>> {
        let _ = grad;
        None
    }

    /// `low` (of the projected shape) mapped back to the parameter's shape without the scale:
    /// for an orthonormal basis, projecting the result gives `low` again.
    fn lift(&self, low: &Tensor) -> Result<Tensor> {
        let _ = low;
        Err(frugal_core::Error::Msg(
            "this projector cannot lift a projected gradient".into(),
        ))
    }

    /// Wall-clock seconds this projector has spent computing bases (SVDs) since it was built,
    /// so that a trainer can report the cost of the refreshes beside the step time.
    fn basis_seconds(&self) -> f64 {
        0.0
    }
}

/// [`GradientProjector::add_back`] through the full-size update (`project_back`, scaled, added).
pub fn add_full_back<P: GradientProjector + ?Sized>(
    projector: &P,
    weight: &Tensor,
    low: &Tensor,
    alpha: f64,
) -> Result<()> {
    let full = projector.project_back(low)?.f_mul_scalar(alpha)?;
    let _ = weight
        .shallow_clone()
        .f_add_(&full.f_to_kind(weight.kind())?)?;
    Ok(())
}
