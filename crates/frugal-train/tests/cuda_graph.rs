//! `train.cuda_graph`: refused by key where it cannot run; with a GPU, the replayed steps
//! (forward, backward and, with AdamW, clipping and the update) train to the weights of eager
//! steps, for the decoders and the encoder, dense and with TT layers whose ranks are pruned
//! during the run (the step is captured again).

mod common;

use common::{assert_clean_error, corpus, run, train_cmd, weight_diff};

/// A tiny encoder.
const ENCODER: [&str; 2] = ["model.kind=\"encoder\"", "model.size=\"encoder-tiny\""];

fn settings(corpus: &std::path::Path, extra: &[&str]) -> Vec<String> {
    common::short_run(corpus, 5, extra)
}

#[test]
fn cuda_graph_is_refused_by_key_where_it_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 6);
    for (i, (extra, needle)) in [
        (&["train.cuda_graph=true"][..], "train.cuda_graph"),
        (
            &["train.cuda_graph=true", "optim.layerwise=true"][..],
            "does not combine with optim.layerwise",
        ),
        (
            &["train.cuda_graph=true", "train.grad_accum=2"][..],
            "does not combine with train.grad_accum",
        ),
        (
            &["train.cuda_graph=true", ENCODER[0], ENCODER[1]][..],
            "train.cuda_graph",
        ),
        (
            &[
                "train.cuda_graph=true",
                ENCODER[0],
                ENCODER[1],
                "train.checkpointing=true",
            ][..],
            "does not combine with train.checkpointing",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let out = run(train_cmd(
            dir.path(),
            &dir.path().join(format!("refused-{i}")),
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
        let (d, log) = eager_and_replayed(dir.path(), kind, &settings(&corpus, &[&model]));
        assert!(
            log.contains("forward, backward, clipping and optimizer step captured"),
            "{kind}: the whole step was captured: {log}"
        );
        assert!(
            d < 1e-4,
            "{kind}: 3 replayed steps moved the weights by {d}"
        );
    }
}

/// Runs `base` eagerly and with `train.cuda_graph`, both on the GPU, and returns the largest
/// weight difference and the graph run's progress messages.
fn eager_and_replayed(dir: &std::path::Path, name: &str, base: &[String]) -> (f64, String) {
    let (eager, graph) = (
        dir.join(format!("{name}-eager")),
        dir.join(format!("{name}-graph")),
    );
    let mut sets = base.to_vec();
    sets.push("train.device=\"cuda\"".into());
    assert!(
        run(train_cmd(dir, &eager, &sets)).status.success(),
        "{name}: eager"
    );
    sets.push("train.cuda_graph=true".into());
    let out = run(train_cmd(dir, &graph, &sets));
    assert!(out.status.success(), "{name}: with the graph");
    (
        weight_diff(&eager, &graph),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn replayed_encoder_steps_equal_eager_steps_on_a_gpu() {
    if !tch::Cuda::is_available() {
        println!("skipped: no CUDA GPU");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 12);
    // A dense encoder: AdamW's step and the clipping are in the graph.
    let dense = settings(&corpus, &ENCODER);
    let (d, log) = eager_and_replayed(dir.path(), "encoder", &dense);
    assert!(
        log.contains("forward, backward, clipping and optimizer step captured"),
        "{log}"
    );
    assert!(
        d < 1e-4,
        "encoder: 3 replayed steps moved the weights by {d}"
    );
    // A TT encoder whose ranks are pruned at the end of a 3-step early stage: the step is
    // captured in the early stage, again after the pruning's warm-up steps.
    let tt = common::short_run(
        &corpus,
        9,
        &[
            ENCODER[0],
            ENCODER[1],
            "model.linear.kind=\"tt\"",
            "model.linear.rank=6",
            "model.linear.order=2",
            "tt.rank_adapt=true",
            "tt.early_steps=3",
            "tt.threshold=0.99",
            "tt.rank_lr=0.05",
            "tt.prune_every=4",
        ],
    );
    let (d, log) = eager_and_replayed(dir.path(), "tt-encoder", &tt);
    assert!(
        log.matches("forward and backward captured").count() >= 2,
        "captured again after pruning: {log}"
    );
    assert!(
        d < 1e-3,
        "TT encoder: replayed steps moved the weights by {d}"
    );
}
