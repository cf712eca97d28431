//! Frugal's trainer: configuration, data, the training loop, schedules, checkpoints, metrics,
//! and the commands behind the `frugal` binary (`train`, `eval`, `generate`, `quantize`,
//! `compress`, `inspect`...).
//!
//! ```no_run
//! let cfg = frugal_train::config::load(std::path::Path::new("configs/default.toml"),
//!     &["train.max_steps=50".to_string()])?;
//! let summary = frugal_train::train::train(&cfg, std::path::Path::new("runs/try"), false)?;
//! frugal_train::train::print_summary(&summary);
//! # Ok::<(), frugal_core::Error>(())
//! ```

pub mod checkpoint;
pub mod comera;
pub mod commands;
pub mod compress_cmd;
pub mod config;
pub mod cuda_graph;
pub mod data;
pub mod encoder_adapter;
pub mod encoder_eval;
mod encoder_io;
pub mod encoder_model;
pub mod export_cmd;
pub mod interrupt;
pub mod memplan;
pub mod merge_cmd;
pub mod optimizers;
pub mod plot;
pub mod progress;
pub mod quantize_cmd;
pub mod records;
pub mod run;
pub mod schedule;
pub mod step;
pub mod sync;
pub mod task;
pub mod task_encoder;
pub mod task_lm;
pub mod task_setup;
pub mod tokenize;
pub mod train;
pub mod trainer;
pub mod tsv;
