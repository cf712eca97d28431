//! The NCCL backend (`dist.backend = "nccl"`): refused with a clear error where it cannot run,
//! and with a GPU, one rank through NCCL's collectives gives the weights of a process alone
//! (the one-GPU check of the NCCL path; several GPUs run the `distributed` benchmark's
//! comparison instead).

mod common;

use common::{assert_clean_error, corpus, run, train_cmd, weight_diff};

fn settings(corpus: &std::path::Path, extra: &[&str]) -> Vec<String> {
    common::short_run(corpus, 3, extra)
}

#[test]
fn nccl_is_refused_by_key_where_it_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 6);
    let out = run(train_cmd(
        dir.path(),
        &dir.path().join("cpu"),
        &settings(&corpus, &["dist.backend=\"nccl\""]),
    ));
    assert_clean_error(&out, "dist.backend");
    let out = run(train_cmd(
        dir.path(),
        &dir.path().join("bad"),
        &settings(&corpus, &["dist.backend=\"gloo\""]),
    ));
    assert_clean_error(
        &out,
        "dist.backend: unknown variant `gloo`, expected one of",
    );
}

#[test]
fn one_nccl_rank_equals_one_process_on_a_gpu() {
    if !tch::Cuda::is_available() {
        println!("skipped: no CUDA GPU");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 12);
    let (alone, nccl) = (dir.path().join("alone"), dir.path().join("nccl"));
    let out = run(train_cmd(
        dir.path(),
        &alone,
        &settings(&corpus, &["train.device=\"cuda\""]),
    ));
    assert!(out.status.success());
    let out = run(train_cmd(
        dir.path(),
        &nccl,
        &settings(&corpus, &["train.device=\"cuda\"", "dist.backend=\"nccl\""]),
    ));
    assert!(out.status.success());
    let d = weight_diff(&alone, &nccl);
    assert!(d < 1e-5, "NCCL with one rank moved the weights by {d}");
    let metrics = std::fs::read_to_string(nccl.join("metrics.jsonl")).unwrap();
    let line: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert!(
        line["allreduce_bytes"].as_u64().is_some_and(|b| b > 0),
        "the gradients went through NCCL: {line}"
    );
    assert!(
        !nccl
            .read_dir()
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".nccl-id")),
        "the rendezvous file is removed"
    );
}
