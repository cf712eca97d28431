//! The records a training run leaves in its folder, as serde types: [`MetricsLine`] is one line
//! of `metrics.jsonl` (one JSON object per step), [`MemoryReport`] is `memory.json` (the
//! accounting of bytes by category, the measured peaks and every variable's bytes). The trainer
//! writes them and the benchmarks (`cargo xtask bench`) read them through the same types, so a
//! field is named, typed and documented in one place. The crate depends on serde alone (no
//! libtorch), so that quick tools can read runs.
//!
//! Each record keeps the fields it does not name in `extra` (a task or a hook may add its own),
//! and writes them back: reading and writing a record changes nothing. Non-finite floats are
//! written as `null`, as `serde_json` writes them, and read back as NaN.
//!
//! ```
//! use frugal_records::MetricsLine;
//! // step, loss, lr, tokens, tokens_per_s, step_time_s, grad_norm, rss_peak_bytes
//! let mut line = MetricsLine::new(2, 3.5, 1e-3, 4096, 2048.0, 1.0, 0.7, 1 << 30);
//! line.val_loss = Some(3.25);
//! let text = serde_json::to_string(&line)?;
//! let back: MetricsLine = serde_json::from_str(&text)?;
//! assert_eq!(back, line);
//! # Ok::<(), serde_json::Error>(())
//! ```
//!
//! A run folder is read with [`MetricsLine::read_jsonl`] and [`MemoryReport::read`]; their
//! errors ([`RecordsError`]) name the file, and the line of `metrics.jsonl`.

#![warn(missing_docs)]

mod error;
mod float;
mod memory;
mod metrics;

pub use error::RecordsError;
pub use memory::{
    DistSetup, FrozenBase, GpuMemory, MeasuredMemory, MemoryReport, ModelInfo, PlannedBytes,
    TensorBytes,
};
pub use metrics::{MetricsLine, TtMetrics};

/// The file name of the metrics lines in a run folder.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// The file name of the memory report in a run folder.
pub const MEMORY_FILE: &str = "memory.json";
