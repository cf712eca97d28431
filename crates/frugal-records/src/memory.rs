//! `memory.json`: the memory report a run writes at its end. Both an accounting (bytes by
//! category, and every variable's bytes) and a measurement (peak resident memory against the
//! idle baseline; on CUDA, the caching allocator's figures).

use crate::metrics::TtMetrics;
use crate::RecordsError;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// `memory.json`, the memory report of a run (rank 0's with several processes).
///
/// Every run writes the accounting, the measurement and the variables; the other fields only
/// where they apply. Fields this type does not name are kept in [`extra`](Self::extra). Build
/// one with [`MemoryReport::new`], then set the optional fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MemoryReport {
    /// The device the run trained on, as libtorch names it (`"Cpu"`, `"Cuda(0)"`).
    pub device: String,
    /// Bytes by category of what the run held: `parameters`, `gradients`, `optimizer_state`
    /// (with per-layer updates, `gradients` is one group's at a time).
    pub accounting: BTreeMap<String, u64>,
    /// The sum of `accounting` (bytes).
    pub accounting_total_bytes: u64,
    /// The measured peaks.
    pub measured: MeasuredMemory,
    /// The measured peak above the baseline (on CUDA, the allocator's peak) minus
    /// `accounting_total_bytes`: what activations and workspace took (bytes, 0 when the
    /// accounting exceeds the peak).
    pub activations_and_workspace_bytes: u64,
    /// Every variable of the model with its shape and bytes, in the model's order.
    pub parameters: Vec<TensorBytes>,
    /// Adapter runs: what the frozen base holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_base: Option<FrozenBase>,
    /// Runs of several processes: how they trained (the accounting is rank 0's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dist: Option<DistSetup>,
    /// Decoder runs: the accounting computed from shapes, as `frugal train --dry-run` prints
    /// it (activations and logits estimated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlannedBytes>,
    /// Decoder runs: the same accounting for plain AdamW with full gradients, no checkpointing
    /// and no chunking, at the same model and batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adamw_full_gradients: Option<PlannedBytes>,
    /// Decoder runs: what `plan` and `adamw_full_gradients` are, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_note: Option<String>,
    /// Encoder runs: the model trained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelInfo>,
    /// Encoder runs with rank adaptation: the TT figures at the end, ranks included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tt: Option<TtMetrics>,
    /// Fields this type does not name, kept as they were read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl MemoryReport {
    /// A report with the fields every run has; `accounting_total_bytes` is the sum of
    /// `accounting`.
    pub fn new(
        device: impl Into<String>,
        accounting: BTreeMap<String, u64>,
        measured: MeasuredMemory,
        activations_and_workspace_bytes: u64,
        parameters: Vec<TensorBytes>,
    ) -> Self {
        Self {
            device: device.into(),
            accounting_total_bytes: accounting.values().sum(),
            accounting,
            measured,
            activations_and_workspace_bytes,
            parameters,
            frozen_base: None,
            dist: None,
            plan: None,
            adamw_full_gradients: None,
            plan_note: None,
            model: None,
            tt: None,
            extra: Map::new(),
        }
    }

    /// The `memory.json` at `path`. The error names the file.
    pub fn read(path: impl AsRef<Path>) -> Result<Self, RecordsError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| RecordsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| RecordsError::Parse {
            path: path.to_path_buf(),
            line: None,
            source,
        })
    }
}

/// What was measured: resident memory of the process (CPU), and on CUDA the allocator's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeasuredMemory {
    /// Resident memory after libtorch started and the data was loaded, before the model was
    /// built (bytes).
    pub baseline_rss_bytes: u64,
    /// The whole run's peak resident memory, evaluations and checkpoints included (bytes).
    pub peak_rss_bytes: u64,
    /// `peak_rss_bytes - baseline_rss_bytes` (bytes, 0 at least).
    pub peak_above_baseline_bytes: u64,
    /// The peak when the last training step ended, before its evaluation and checkpoint
    /// (bytes; 0 when no step ran in this process).
    pub steps_peak_rss_bytes: u64,
    /// `steps_peak_rss_bytes - baseline_rss_bytes` (bytes, 0 at least).
    pub steps_peak_above_baseline_bytes: u64,
    /// What the figures mean, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// On CUDA: the caching allocator's figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuMemory>,
}

impl MeasuredMemory {
    /// The measurement of `baseline`, the whole run's `peak` and the steps' `steps_peak`
    /// (bytes), with the differences to the baseline, no note and no GPU figures.
    pub fn new(baseline_rss_bytes: u64, peak_rss_bytes: u64, steps_peak_rss_bytes: u64) -> Self {
        Self {
            baseline_rss_bytes,
            peak_rss_bytes,
            peak_above_baseline_bytes: peak_rss_bytes.saturating_sub(baseline_rss_bytes),
            steps_peak_rss_bytes,
            steps_peak_above_baseline_bytes: steps_peak_rss_bytes
                .saturating_sub(baseline_rss_bytes),
            note: None,
            gpu: None,
        }
    }
}

/// libtorch's CUDA caching allocator at the end of the run: allocated counts live tensors,
/// reserved what it holds from the driver (its cache too); peaks since the run started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuMemory {
    /// Bytes held by live tensors.
    pub allocated_bytes: u64,
    /// The most bytes held by live tensors.
    pub peak_allocated_bytes: u64,
    /// Bytes held from the driver.
    pub reserved_bytes: u64,
    /// The most bytes held from the driver.
    pub peak_reserved_bytes: u64,
    /// The allocated peak when the last training step ended (bytes); `null` when no step ran
    /// in this process (written as `null`, not left out).
    #[serde(default)]
    pub steps_peak_allocated_bytes: Option<u64>,
    /// What the figures mean, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One variable of the model (`memory.json`'s `parameters` list).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorBytes {
    /// Its name in the model's weights (`model.layers.0.mlp.up_proj.weight`).
    pub name: String,
    /// Its shape.
    pub shape: Vec<i64>,
    /// Its bytes as stored.
    pub bytes: u64,
}

/// What the frozen base of an adapter run holds: its quantized matrices and its other
/// variables (embeddings, norms, head, dense linear weights).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrozenBase {
    /// Bytes of the quantized matrices as stored (codes, scales, zero points).
    pub quantized_bytes: u64,
    /// Parameters of the quantized matrices.
    pub quantized_params: u64,
    /// `quantized_bytes / quantized_params` (0 without quantized matrices).
    pub quantized_bytes_per_param: f64,
    /// Bytes of the base's other variables.
    pub other_bytes: u64,
    /// Parameters of the base's other variables.
    pub other_params: u64,
    /// `quantized_bytes + other_bytes`.
    pub total_bytes: u64,
}

/// How the processes of a data-parallel run trained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DistSetup {
    /// The number of processes (ranks).
    pub processes: u64,
    /// Whether the optimizer state was sharded (ZeRO stage 1): the accounting is then rank
    /// 0's share.
    pub zero1: bool,
    /// Whether GaLore's projected gradients were all-reduced instead of the full ones.
    pub galore_projected: bool,
    /// Whether the all-reduce overlapped the backward pass.
    pub overlap: bool,
}

/// An accounting computed from shapes: bytes by category and their total (the `plan` and
/// `adamw_full_gradients` of `memory.json`, `{category: bytes, ..., "total": bytes}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedBytes {
    /// Bytes by category: `parameters`, `frozen_quantized`, `gradients`, `optimizer_state`,
    /// `activations`, `logits`.
    #[serde(flatten)]
    pub by_category: BTreeMap<String, u64>,
    /// The sum of every category (bytes).
    pub total: u64,
}

impl PlannedBytes {
    /// `by_category` with its total.
    pub fn new(by_category: BTreeMap<String, u64>) -> Self {
        Self {
            total: by_category.values().sum(),
            by_category,
        }
    }
}

/// The model an encoder run trained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// `model.kind` (`"encoder"`).
    pub kind: String,
    /// `model.size`, the preset's name.
    pub size: String,
    /// The training objective (`"mlm"`, `"classify"`).
    pub objective: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `memory.json` of a real LLaMA run, its `parameters` cut short (`tests/data/README.md`).
    const RUN: &str = include_str!("../tests/data/llama-memory.json");
    /// `memory.json` of a real encoder run with CoMERA's rank adaptation.
    const COMERA_RUN: &str = include_str!("../tests/data/encoder-comera-memory.json");

    /// Guarantee: a report as the trainer writes it reads into the type and writes back to the
    /// same JSON value.
    fn round_trip(text: &str) -> MemoryReport {
        let want: Value = serde_json::from_str(text).unwrap();
        let report: MemoryReport = serde_json::from_str(text).unwrap();
        assert_eq!(serde_json::to_value(&report).unwrap(), want);
        report
    }

    #[test]
    fn real_reports_round_trip() {
        let r = round_trip(RUN);
        assert!(r.extra.is_empty(), "{:?}", r.extra);
        assert_eq!(r.device, "Cpu");
        assert_eq!(r.accounting_total_bytes, r.accounting.values().sum::<u64>());
        assert!(r.measured.note.is_some() && r.plan_note.is_some());
        assert_eq!(r.measured.gpu, None);
        let plan = r.plan.as_ref().unwrap();
        assert_eq!(plan.total, plan.by_category.values().sum::<u64>());
        assert!(r.adamw_full_gradients.is_some());
        assert_eq!(r.parameters[0].name, "lm_head.weight");
        assert_eq!((r.model, r.tt), (None, None));

        let e = round_trip(COMERA_RUN);
        assert!(e.extra.is_empty(), "{:?}", e.extra);
        let model = e.model.as_ref().unwrap();
        assert_eq!(
            (model.kind.as_str(), model.objective.as_str()),
            ("encoder", "mlm")
        );
        let tt = e.tt.as_ref().unwrap();
        assert_eq!(tt.tt_stage.as_deref(), Some("late"));
        assert_eq!(tt.tt_ranks.as_ref().map(BTreeMap::len), Some(2));
        assert_eq!((e.plan, e.plan_note), (None, None));
    }

    /// Guarantee: the fields of adapter, data-parallel, CUDA and encoder runs read into their
    /// own types and write back unchanged; a GPU's `steps_peak_allocated_bytes` of `null` is
    /// written back as `null`.
    #[test]
    fn every_optional_field_round_trips() {
        // Built as the trainers build it (`StepClock::memory_report`, `frozen_base_bytes`,
        // the loops' `dist`, `model` and `tt`).
        let mut v: Value = serde_json::from_str(RUN).unwrap();
        v["frozen_base"] = json!({
            "quantized_bytes": 1032, "quantized_params": 2000, "quantized_bytes_per_param": 0.516,
            "other_bytes": 4194304, "other_params": 1048576, "total_bytes": 4195336,
        });
        v["dist"] = json!({"processes": 2, "zero1": false, "galore_projected": true,
            "overlap": true});
        v["model"] = json!({"kind": "encoder", "size": "encoder-6", "objective": "mlm"});
        v["tt"] = json!({"tt_size": 100, "tt_params": 120, "tt_compression": 8.5,
            "tt_stage": "late", "tt_objective": "size", "tt_size_target": 80.0,
            "tt_ranks": {"a": [1, 3, 1]}});
        for steps_peak in [json!(5_000_000), Value::Null] {
            v["measured"]["gpu"] = json!({
                "allocated_bytes": 1_000_000, "peak_allocated_bytes": 6_000_000,
                "reserved_bytes": 8_000_000, "peak_reserved_bytes": 9_000_000,
                "steps_peak_allocated_bytes": steps_peak,
                "note": "libtorch's CUDA caching allocator",
            });
            let r = round_trip(&v.to_string());
            assert_eq!(r.dist.as_ref().unwrap().processes, 2);
            assert_eq!(r.frozen_base.as_ref().unwrap().total_bytes, 4195336);
            assert_eq!(
                r.tt.as_ref().unwrap().tt_ranks.as_ref().unwrap()["a"],
                [1, 3, 1]
            );
            assert_eq!(
                r.measured.gpu.as_ref().unwrap().peak_allocated_bytes,
                6_000_000
            );
            assert!(r.extra.is_empty());
        }
    }

    /// Guarantee: a field the type does not name lands in `extra` and is written back.
    #[test]
    fn unknown_fields_survive_in_extra() {
        let mut v: Value = serde_json::from_str(RUN).unwrap();
        v["cache"] = json!({"kv_bytes": 42});
        let r = round_trip(&v.to_string());
        assert_eq!(r.extra.len(), 1);
        assert_eq!(r.extra["cache"]["kv_bytes"], json!(42));
    }

    /// Guarantee: a report built through the constructors writes what the trainer writes.
    #[test]
    fn constructors_fill_the_derived_fields() {
        let mut measured = MeasuredMemory::new(100, 350, 300);
        measured.note = Some("n".into());
        let acc = BTreeMap::from([
            ("parameters".to_string(), 40),
            ("gradients".to_string(), 40),
        ]);
        let params = vec![TensorBytes {
            name: "w".into(),
            shape: vec![2, 5],
            bytes: 40,
        }];
        let mut r = MemoryReport::new("Cpu", acc, measured, 170, params);
        r.plan = Some(PlannedBytes::new(BTreeMap::from([(
            "gradients".to_string(),
            7,
        )])));
        let want = json!({
            "device": "Cpu",
            "accounting": {"gradients": 40, "parameters": 40},
            "accounting_total_bytes": 80,
            "measured": {
                "baseline_rss_bytes": 100, "peak_rss_bytes": 350, "peak_above_baseline_bytes": 250,
                "steps_peak_rss_bytes": 300, "steps_peak_above_baseline_bytes": 200, "note": "n",
            },
            "activations_and_workspace_bytes": 170,
            "parameters": [{"name": "w", "shape": [2, 5], "bytes": 40}],
            "plan": {"gradients": 7, "total": 7},
        });
        assert_eq!(serde_json::to_value(&r).unwrap(), want);
    }

    #[test]
    fn errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("frugal-records-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory.json");
        std::fs::write(&path, r#"{"device": "Cpu"}"#).unwrap();
        let e = MemoryReport::read(&path).unwrap_err().to_string();
        assert!(e.contains("memory.json: missing field"), "{e}");
        std::fs::write(&path, RUN).unwrap();
        assert_eq!(MemoryReport::read(&path).unwrap(), round_trip(RUN));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
