//! Tensor-train compression with rank adaptation (CoMERA, Yang et al., NeurIPS 2024): TT algebra
//! on dense tensors, TT linear and embedding layers whose ranks shrink during training, and
//! physical pruning so that memory and time shrink with them.
//!
//! The pieces, usable alone: [`Tt`] (TT-SVD capped by rank and relative accuracy, rounding,
//! reconstruction), [`TtMatrix`], [`balanced_modes`] and [`pad_to_modes`] to pick modes;
//! [`TtLinear`] (cores over the input then the output modes, computed as `(X L) R` so the batch
//! never meets a core) and [`TtEmbedding`] (rows looked up core by core for distinct ids);
//! [`RankedCores`] (rank variables, penalty, live size, masking, pruning) and
//! [`ComeraSchedule`] (the two-stage objective).
//!
//! ```no_run
//! use frugal_tt::{balanced_modes, Tt, TtLinear};
//! use tch::{nn, Device, Kind, Tensor};
//! let a = Tensor::randn([8, 8, 12], (Kind::Double, Device::Cpu));
//! let tt = Tt::svd(&a, Some(4), Some(1e-3))?; // ranks at most 4
//! assert_eq!(tt.full().size(), vec![8, 8, 12]);
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let modes = balanced_modes(768, 3)?; // [8, 8, 12]
//! let layer = TtLinear::new(&vs.root().sub("fc"), 768, 768, &modes, &modes, 30, true, Kind::Float)?;
//! let y = layer.forward(&Tensor::randn([4, 768], (Kind::Float, Device::Cpu)));
//! assert_eq!(y.size(), vec![4, 768]);
//! let penalty = layer.ranked().penalty(); // add 0.01 x this to the loss in the early stage
//! # Ok::<(), frugal_core::Error>(())
//! ```

mod embedding;
mod linear;
mod modes;
mod rank;
mod schedule;
mod tt;
mod ttm;

pub use embedding::TtEmbedding;
pub use linear::{published_init, TtLinear};
pub use modes::{
    balanced_modes, capped_ranks, check_modes, modes_product, pad_to_modes, BALANCED_RATIO,
};
pub use rank::{RankedCores, TtLayer, PRUNE_THRESHOLD};
pub use schedule::{late_objective, ComeraConfig, ComeraSchedule, Objective};
pub use tt::Tt;
pub use ttm::TtMatrix;
