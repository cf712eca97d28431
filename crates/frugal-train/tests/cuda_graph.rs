//! `train.cuda_graph`: refused by key where it cannot run; with a GPU, the replayed forward and
//! backward pass trains to the weights of eager steps.

mod common;

use common::{assert_clean_error, corpus, run, train_cmd, weight_diff};

fn settings(corpus: &std::path::Path, extra: &[&str]) -> Vec<String> {
    common::short_run(corpus, 5, extra)
}

#[test]
fn cuda_graph_is_refused_by_key_where_it_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 6);
    for (extra, needle) in [
        (&["train.cuda_graph=true"][..], "train.cuda_graph"),
        (
            &["train.cuda_graph=true", "optim.layerwise=true"][..],
            "does not combine with optim.layerwise",
        ),
        (
            &["train.cuda_graph=true", "train.grad_accum=2"][..],
            "does not combine with train.grad_accum",
        ),
    ] {
        let out = run(train_cmd(
            dir.path(),
            &dir.path().join("refused"),
            &settings(&corpus, extra),
        ));
        assert_clean_error(&out, needle);
    }
}

#[test]
fn replayed_steps_equal_eager_steps_on_a_gpu() {
    if !tch::Cuda::is_available() {
        println!("skipped: no CUDA GPU");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 12);
    for kind in ["llama", "hgrn-bit"] {
        let model = format!("model.kind=\"{kind}\"");
        let (eager, graph) = (
            dir.path().join(format!("{kind}-eager")),
            dir.path().join(format!("{kind}-graph")),
        );
        let base = ["train.device=\"cuda\"", model.as_str()];
        assert!(
            run(train_cmd(dir.path(), &eager, &settings(&corpus, &base)))
                .status
                .success()
        );
        let with_graph = [base[0], base[1], "train.cuda_graph=true"];
        let out = run(train_cmd(
            dir.path(),
            &graph,
            &settings(&corpus, &with_graph),
        ));
        assert!(out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("captured as a CUDA graph"),
            "{kind}: the graph was captured"
        );
        let d = weight_diff(&eager, &graph);
        assert!(
            d < 1e-4,
            "{kind}: 3 replayed steps moved the weights by {d}"
        );
    }
}
