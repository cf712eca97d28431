//! [`GaloreConfig`]: the projector's settings, with galore-torch's defaults.

use frugal_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// Which side of the gradient `G` (m x n) is projected (galore-torch's `proj_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProjType {
    /// `right` when m >= n, else `left` (galore-torch's default): the projected gradient keeps
    /// the long side, m x r for a tall or square matrix and r x n for a wide one.
    #[default]
    Std,
    /// The opposite of `std`: `left` when m >= n, else `right`.
    ReverseStd,
    /// P = `U[:, :r]` (m x r), low = Pᵀ G (r x n), back = P low.
    Left,
    /// P = `Vh[:r]` (r x n), low = G Pᵀ (m x r), back = low P.
    Right,
    /// Both: L = `U[:, :r]`, R = `Vh[:r]`, low = Lᵀ G Rᵀ (r x r), back = L low R.
    Full,
}

/// How the basis is computed from the gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SvdMethod {
    /// `torch.linalg.svd(G.float(), full_matrices=False)`, as galore-torch does, with one fixed
    /// sign per singular pair (the largest entry of each left singular vector non-negative), so
    /// that a run trains the same on any CPU.
    #[default]
    Exact,
    /// Randomized SVD (Halko, Martinsson and Tropp 2011): a Gaussian sketch of
    /// `rank + oversampling` columns, `power_iters` power iterations re-orthonormalised by QR
    /// after every product, then the exact SVD of the small projected matrix. The sketch is
    /// drawn from [`GaloreConfig::seed`] and the step, so runs are reproducible.
    Randomized {
        /// Extra sketch columns beyond the rank (default 8).
        #[serde(default = "default_oversampling")]
        oversampling: i64,
        /// Power iterations (default 2).
        #[serde(default = "default_power_iters")]
        power_iters: i64,
    },
}

impl SvdMethod {
    /// The randomized method with its default oversampling (8) and power iterations (2).
    pub fn randomized() -> Self {
        SvdMethod::Randomized {
            oversampling: default_oversampling(),
            power_iters: default_power_iters(),
        }
    }
}

fn default_oversampling() -> i64 {
    8
}

fn default_power_iters() -> i64 {
    2
}

/// Settings of a [`crate::GaloreProjector`]. Defaults are galore-torch's (rank 128, gap 200,
/// scale 0.25, `std`), with the exact SVD and every extension off.
///
/// In TOML: `rank = 64`, `proj_type = "reverse_std"`, `svd = "exact"` or
/// `svd = { randomized = { oversampling = 8, power_iters = 2 } }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GaloreConfig {
    /// Rank r of the subspace; clamped to min(m, n) of each gradient (galore-torch's slicing
    /// clamps too, except in `reverse_std` on a wide matrix, where it fails).
    pub rank: i64,
    /// The basis is recomputed when the step, counted from 0 before it is taken, is a multiple
    /// of this gap (so at step 0 first).
    pub update_proj_gap: i64,
    /// Factor applied by `project_back` (galore-torch's `scale`).
    pub scale: f64,
    /// Which side is projected.
    pub proj_type: ProjType,
    /// How the basis is computed.
    pub svd: SvdMethod,
    /// Seed of the randomized SVD's sketches (mixed with the step of each refresh).
    pub seed: u64,
    /// Lazy refresh (after Q-GaLore): at every scheduled refresh, compare the new top singular
    /// vector with the previous one; when the mean |cosine| over the last `lazy_window`
    /// comparisons reaches `lazy_threshold`, double the gap (see [`crate::GaloreProjector`]).
    pub lazy_refresh: bool,
    /// Agreement threshold of the lazy refresh (Q-GaLore: 0.4).
    pub lazy_threshold: f64,
    /// Number of consecutive comparisons averaged by the lazy refresh (Q-GaLore: 5).
    pub lazy_window: i64,
    /// When the basis changes, move the optimizer's moments into the new subspace
    /// (`reproject_first_moment` / `reproject_second_moment` return `Some`).
    pub reproject_moments: bool,
}

impl Default for GaloreConfig {
    fn default() -> Self {
        GaloreConfig {
            rank: 128,
            update_proj_gap: 200,
            scale: 0.25,
            proj_type: ProjType::Std,
            svd: SvdMethod::Exact,
            seed: 0,
            lazy_refresh: false,
            lazy_threshold: 0.4,
            lazy_window: 5,
            reproject_moments: false,
        }
    }
}

impl GaloreConfig {
    /// Checks every value; errors name the key (`galore.rank`, ...).
    pub fn validate(&self) -> Result<()> {
        if self.rank < 1 {
            return Err(Error::config(
                "galore.rank",
                format!("must be at least 1, got {}", self.rank),
            ));
        }
        if self.update_proj_gap < 1 {
            return Err(Error::config(
                "galore.update_proj_gap",
                format!("must be at least 1, got {}", self.update_proj_gap),
            ));
        }
        if !self.scale.is_finite() {
            return Err(Error::config(
                "galore.scale",
                format!("must be finite, got {}", self.scale),
            ));
        }
        if let SvdMethod::Randomized {
            oversampling,
            power_iters,
        } = self.svd
        {
            if oversampling < 0 {
                return Err(Error::config(
                    "galore.svd.randomized.oversampling",
                    format!("must be >= 0, got {oversampling}"),
                ));
            }
            if power_iters < 0 {
                return Err(Error::config(
                    "galore.svd.randomized.power_iters",
                    format!("must be >= 0, got {power_iters}"),
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.lazy_threshold) {
            return Err(Error::config(
                "galore.lazy_threshold",
                format!("must be in [0, 1], got {}", self.lazy_threshold),
            ));
        }
        if self.lazy_window < 1 {
            return Err(Error::config(
                "galore.lazy_window",
                format!("must be at least 1, got {}", self.lazy_window),
            ));
        }
        Ok(())
    }
}
