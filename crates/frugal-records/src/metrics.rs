//! One line of `metrics.jsonl`: what a training step did, and on evaluation steps what the
//! evaluation measured.

use crate::float::{nan_for_null, some_nan_for_null};
use crate::RecordsError;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// One line of `metrics.jsonl`: one training step, written when its update is done (and its
/// evaluation, on evaluation steps).
///
/// The first eight fields are on every line; the others only where they apply (GaLore, a GPU,
/// several processes, an evaluation, a classifier, CoMERA's rank adaptation). Fields a task or
/// a hook adds that this type does not name are kept in [`extra`](Self::extra). Build one with
/// [`MetricsLine::new`], then set the optional fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MetricsLine {
    /// The optimizer step this line records, counted from 1.
    pub step: u64,
    /// Training loss of the step (nats: per token, per masked token for masked-LM, per example
    /// for a classifier), averaged over its micro-batches and processes.
    #[serde(deserialize_with = "nan_for_null")]
    pub loss: f64,
    /// Learning rate the step used.
    #[serde(deserialize_with = "nan_for_null")]
    pub lr: f64,
    /// Tokens trained on so far, this step included (all processes together).
    pub tokens: u64,
    /// The step's tokens over its wall time (tokens per second).
    #[serde(deserialize_with = "nan_for_null")]
    pub tokens_per_s: f64,
    /// Wall time of the step, forward to optimizer update (seconds).
    #[serde(deserialize_with = "nan_for_null")]
    pub step_time_s: f64,
    /// Global L2 norm of the step's gradients, before clipping (with per-layer updates and
    /// gradient accumulation, the sum of the micro-batches' norms: an upper bound).
    #[serde(deserialize_with = "nan_for_null")]
    pub grad_norm: f64,
    /// The process's peak resident memory when the step ended (bytes).
    pub rss_peak_bytes: u64,
    /// With GaLore: seconds of the step spent computing projection bases (part of
    /// `step_time_s`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "some_nan_for_null"
    )]
    pub svd_s: Option<f64>,
    /// On CUDA: the caching allocator's peak of allocated bytes since the run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_peak_allocated_bytes: Option<u64>,
    /// With several processes: payload bytes this rank all-reduced in the step (gradients,
    /// loss and stop flag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allreduce_bytes: Option<u64>,
    /// On evaluation steps: validation loss (nats, as `loss`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "some_nan_for_null"
    )]
    pub val_loss: Option<f64>,
    /// On evaluation steps of language models: validation perplexity, `exp(val_loss)`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "some_nan_for_null"
    )]
    pub val_ppl: Option<f64>,
    /// Classifiers: the fraction of the step's examples predicted right (0 to 1).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "some_nan_for_null"
    )]
    pub accuracy: Option<f64>,
    /// Classifiers, on evaluation steps: the fraction of validation examples predicted right.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "some_nan_for_null"
    )]
    pub val_accuracy: Option<f64>,
    /// Rank adaptation: live TT parameters (those the rank masks keep).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tt_size: Option<i64>,
    /// Rank adaptation: TT core parameters as stored (pruned entries included until the cores
    /// are physically pruned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tt_params: Option<i64>,
    /// Rank adaptation: dense parameters of the TT layers over `tt_size`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "some_nan_for_null"
    )]
    pub tt_compression: Option<f64>,
    /// Rank adaptation: the schedule's stage, `"early"` or `"late"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tt_stage: Option<String>,
    /// Rank adaptation: what the step descended, `"loss+penalty"`, `"loss"` or `"size"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tt_objective: Option<String>,
    /// Rank adaptation, once the late stage has latched it: the size (live TT parameters) it
    /// aims at.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "some_nan_for_null"
    )]
    pub tt_size_target: Option<f64>,
    /// Rank adaptation, on evaluation and pruning steps: the live ranks of every TT layer by
    /// name (`[1, r1, ..., 1]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tt_ranks: Option<BTreeMap<String, Vec<i64>>>,
    /// Fields this type does not name, kept as they were read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl MetricsLine {
    /// A line with the fields every step has, and none of the optional ones.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        step: u64,
        loss: f64,
        lr: f64,
        tokens: u64,
        tokens_per_s: f64,
        step_time_s: f64,
        grad_norm: f64,
        rss_peak_bytes: u64,
    ) -> Self {
        Self {
            step,
            loss,
            lr,
            tokens,
            tokens_per_s,
            step_time_s,
            grad_norm,
            rss_peak_bytes,
            svd_s: None,
            gpu_peak_allocated_bytes: None,
            allreduce_bytes: None,
            val_loss: None,
            val_ppl: None,
            accuracy: None,
            val_accuracy: None,
            tt_size: None,
            tt_params: None,
            tt_compression: None,
            tt_stage: None,
            tt_objective: None,
            tt_size_target: None,
            tt_ranks: None,
            extra: Map::new(),
        }
    }

    /// Sets the line's `tt_*` fields from `tt` (those `tt` lacks are cleared).
    pub fn set_tt(&mut self, tt: TtMetrics) {
        self.tt_size = Some(tt.tt_size);
        self.tt_params = Some(tt.tt_params);
        self.tt_compression = Some(tt.tt_compression);
        self.tt_stage = tt.tt_stage;
        self.tt_objective = tt.tt_objective;
        self.tt_size_target = tt.tt_size_target;
        self.tt_ranks = tt.tt_ranks;
    }

    /// Every line of the `metrics.jsonl` at `path`, in file order; blank lines are skipped.
    /// The error names the file and the first line that is not a metrics line.
    pub fn read_jsonl(path: impl AsRef<Path>) -> Result<Vec<Self>, RecordsError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| RecordsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_jsonl(&text).map_err(|(line, source)| RecordsError::Parse {
            path: path.to_path_buf(),
            line: Some(line),
            source,
        })
    }

    /// Every line of `text` (the contents of a `metrics.jsonl`), in order; blank lines are
    /// skipped. The error is the first bad line (counted from 1) and why.
    pub fn parse_jsonl(text: &str) -> Result<Vec<Self>, (usize, serde_json::Error)> {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| serde_json::from_str(l).map_err(|e| (i + 1, e)))
            .collect()
    }
}

/// The `tt_*` fields of rank adaptation (CoMERA) at one step: on the metrics lines, and at the
/// end of the run as `memory.json`'s `tt`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TtMetrics {
    /// Live TT parameters (those the rank masks keep).
    pub tt_size: i64,
    /// TT core parameters as stored.
    pub tt_params: i64,
    /// Dense parameters of the TT layers over `tt_size`.
    #[serde(deserialize_with = "nan_for_null")]
    pub tt_compression: f64,
    /// The schedule's stage, `"early"` or `"late"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tt_stage: Option<String>,
    /// What the step descended, `"loss+penalty"`, `"loss"` or `"size"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tt_objective: Option<String>,
    /// Once latched: the size the late stage aims at (live TT parameters).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "some_nan_for_null"
    )]
    pub tt_size_target: Option<f64>,
    /// The live ranks of every TT layer by name (`[1, r1, ..., 1]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tt_ranks: Option<BTreeMap<String, Vec<i64>>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A real LLaMA run of 3 steps, evaluations at steps 2 and 3 (`tests/data/README.md`).
    const RUN: &str = include_str!("../tests/data/llama-metrics.jsonl");
    /// A real encoder run with CoMERA's rank adaptation: 3 steps, the late stage from step 2.
    const COMERA_RUN: &str = include_str!("../tests/data/encoder-comera-metrics.jsonl");

    /// Guarantee: a line as the trainer writes it reads into the type and writes back to the
    /// same JSON value.
    fn round_trip(text: &str) -> MetricsLine {
        let want: Value = serde_json::from_str(text).unwrap();
        let line: MetricsLine = serde_json::from_str(text).unwrap();
        assert_eq!(serde_json::to_value(&line).unwrap(), want, "{text}");
        line
    }

    #[test]
    fn real_runs_round_trip() {
        for run in [RUN, COMERA_RUN] {
            let lines = MetricsLine::parse_jsonl(run).unwrap();
            assert_eq!(lines.len(), 3);
            for (line, text) in lines.iter().zip(run.lines()) {
                assert_eq!(&round_trip(text), line);
                assert!(line.extra.is_empty(), "{:?}", line.extra);
            }
            assert_eq!(lines[0].val_loss, None);
            assert!(lines[1].val_loss.is_some());
        }
        let llama = MetricsLine::parse_jsonl(RUN).unwrap();
        assert_eq!((llama[2].step, llama[2].tokens), (3, 6144));
        assert!(llama[1].val_ppl.is_some());
        let comera = MetricsLine::parse_jsonl(COMERA_RUN).unwrap();
        assert_eq!(comera[0].tt_stage.as_deref(), Some("early"));
        assert_eq!(comera[0].tt_ranks, None);
        assert_eq!(comera[1].tt_objective.as_deref(), Some("size"));
        assert_eq!(comera[1].tt_ranks.as_ref().map(BTreeMap::len), Some(2));
        assert!(comera[1].tt_size_target.is_some());
    }

    /// Guarantee: every optional field the trainers write (GaLore, CUDA, several processes,
    /// classifiers, CoMERA) reads into its own field and writes back unchanged.
    #[test]
    fn every_optional_field_round_trips() {
        // Built as the trainers build it (`StepClock::finish`, the loops, `Comera::add_metrics`).
        let text = json!({
            "step": 7, "loss": 2.5, "lr": 0.001, "tokens": 7168,
            "tokens_per_s": 5120.5, "step_time_s": 0.2, "grad_norm": 1.25,
            "rss_peak_bytes": 1_500_000_000u64,
            "svd_s": 0.0125, "gpu_peak_allocated_bytes": 123_456_789u64,
            "allreduce_bytes": 232_294_408u64, "val_loss": 2.4, "val_ppl": 2.4f64.exp(),
            "accuracy": 0.75, "val_accuracy": 0.5,
            "tt_size": 1234, "tt_params": 2048, "tt_compression": 9.5,
            "tt_stage": "late", "tt_objective": "loss+penalty", "tt_size_target": 600.5,
            "tt_ranks": {"bert.encoder.layer.0.attention.self.query": [1, 4, 3, 1]},
        })
        .to_string();
        let line = round_trip(&text);
        assert_eq!(line.allreduce_bytes, Some(232_294_408));
        assert_eq!(line.tt_objective.as_deref(), Some("loss+penalty"));
        assert_eq!(
            line.tt_ranks.as_ref().unwrap()["bert.encoder.layer.0.attention.self.query"],
            [1, 4, 3, 1]
        );
        assert!(line.extra.is_empty());
    }

    /// Guarantee: a field the type does not name lands in `extra` and is written back.
    #[test]
    fn unknown_fields_survive_in_extra() {
        let text = r#"{"step":1,"loss":9.0,"lr":0.0,"tokens":8,"tokens_per_s":8.0,"step_time_s":1.0,"grad_norm":2.0,"rss_peak_bytes":10,"val_loss":8.5,"click_auc":0.71,"hook":{"name":"x","n":[1,2]}}"#;
        let line = round_trip(text);
        assert_eq!(line.extra.len(), 2);
        assert_eq!(line.extra["click_auc"], json!(0.71));
        assert_eq!(line.extra["hook"], json!({"name": "x", "n": [1, 2]}));
        assert_eq!(line.val_loss, Some(8.5));
    }

    /// Guarantee: a non-finite float, which serde_json writes as `null`, reads back as NaN and
    /// is written as `null` again; an absent optional field stays absent.
    #[test]
    fn null_floats_read_as_nan() {
        let text = r#"{"step":3,"loss":null,"lr":0.001,"tokens":24,"tokens_per_s":8.0,"step_time_s":1.0,"grad_norm":null,"rss_peak_bytes":10,"val_loss":900.0,"val_ppl":null}"#;
        let line = round_trip(text);
        assert!(line.loss.is_nan() && line.grad_norm.is_nan());
        assert!(line.val_ppl.unwrap().is_nan());
        assert_eq!(line.svd_s, None);
        let mut built = MetricsLine::new(3, f64::NAN, 0.001, 24, 8.0, 1.0, f64::INFINITY, 10);
        built.val_loss = Some(900.0);
        built.val_ppl = Some(900f64.exp());
        let want: Value = serde_json::from_str(text).unwrap();
        assert_eq!(serde_json::to_value(&built).unwrap(), want);
    }

    #[test]
    fn set_tt_sets_every_tt_field() {
        let mut line = MetricsLine::new(1, 1.0, 1.0, 1, 1.0, 1.0, 1.0, 1);
        let tt = TtMetrics {
            tt_size: 10,
            tt_params: 20,
            tt_compression: 4.0,
            tt_stage: Some("early".into()),
            tt_objective: None,
            tt_size_target: None,
            tt_ranks: Some(BTreeMap::from([("a".to_string(), vec![1, 2, 1])])),
        };
        line.set_tt(tt.clone());
        let v = serde_json::to_value(&line).unwrap();
        let back: TtMetrics = serde_json::from_value(v).unwrap();
        assert_eq!(back, tt);
    }

    /// Guarantee: a missing required field, or a line that is not JSON, is an error that names
    /// the file and the line (counted from 1, blank lines included).
    #[test]
    fn errors_name_file_and_line() {
        let dir = std::env::temp_dir().join(format!("frugal-records-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        let good = RUN.lines().next().unwrap();
        std::fs::write(&path, format!("{good}\n\n{{\"step\": 2, \"loss\": 1.0}}\n")).unwrap();
        let e = MetricsLine::read_jsonl(&path).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("metrics.jsonl line 3: missing field"), "{msg}");
        assert!(matches!(e, RecordsError::Parse { line: Some(3), .. }));
        std::fs::write(&path, format!("{good}\n\n{good}\n")).unwrap();
        assert_eq!(MetricsLine::read_jsonl(&path).unwrap().len(), 2);
        let missing = MetricsLine::read_jsonl(dir.join("none.jsonl")).unwrap_err();
        assert!(missing.to_string().starts_with("cannot read "), "{missing}");
        assert_eq!(missing.path(), dir.join("none.jsonl"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
