//! The stop request of a run: a handle the trainer polls once per step (the `frugal` binary's
//! Ctrl-C handler sets it; a library user sets it from wherever they decide). When set, the
//! loop finishes the step, saves a checkpoint and returns; `--resume` continues exactly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A shared stop flag (clones share it).
#[derive(Debug, Clone, Default)]
pub struct Interrupter(Arc<AtomicBool>);

impl Interrupter {
    /// A handle nobody has set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the run to stop after its current step; returns whether that had already been
    /// asked.
    pub fn request(&self) -> bool {
        self.0.swap(true, Ordering::SeqCst)
    }

    /// Whether a stop was asked.
    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
