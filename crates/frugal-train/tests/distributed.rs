//! Data-parallel training under a real `mpirun` on this machine (loopback, one thread per
//! rank): two processes with a micro-batch of B each give the weights of one process with 2B;
//! rank 0 alone writes the run's files. Needs the MPI backend (`--features frugal-dist/mpi`, as
//! `cargo xtask test` builds where Open MPI is installed) and `mpirun`; without them the tests
//! say so and pass, unless `FRUGAL_MPI=1` makes them mandatory.

mod common;

use common::{corpus, run, train_cmd, weight_diff};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether MPI runs here; panics when `FRUGAL_MPI=1` says it must.
fn mpi_ready() -> bool {
    let mpirun = Command::new("mpirun").arg("--version").output().is_ok();
    let ready = frugal_dist::HAS_MPI && mpirun;
    if !ready {
        assert!(
            std::env::var("FRUGAL_MPI").as_deref() != Ok("1"),
            "FRUGAL_MPI=1 but the MPI backend (built: {}) or mpirun (found: {mpirun}) is missing",
            frugal_dist::HAS_MPI
        );
        eprintln!("skipped: needs the mpi feature and Open MPI's mpirun");
    }
    ready
}

/// A temporary folder with a 12-document corpus when MPI runs here (see [`mpi_ready`]).
fn mpi_dir() -> Option<(tempfile::TempDir, PathBuf)> {
    if !mpi_ready() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 12);
    Some((dir, corpus))
}

/// A copy of the 4-step run `full` named `name`, cut back to its step-2 checkpoint.
fn cut_back(full: &Path, name: &str) -> PathBuf {
    let part = full.with_file_name(name);
    common::copy_dir(full, &part);
    std::fs::remove_dir_all(part.join("checkpoints/step-4")).unwrap();
    std::fs::write(part.join("checkpoints/latest"), "step-2\n").unwrap();
    part
}

/// `mpirun -n N` of the command `single` (a `frugal` command), as root where need be, with the
/// test's private cache.
fn mpirun(dir: &Path, n: usize, single: &Command) -> Command {
    let mut c = Command::new("mpirun");
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("FRUGAL_CACHE", dir.join("cache"))
        .env("FRUGAL_PROGRESS", "plain")
        .args(["--oversubscribe", "-n", &n.to_string()])
        .arg(single.get_program())
        .args(single.get_args());
    c
}

/// `mpirun -n N frugal train ...`, run.
fn mpirun_train(dir: &Path, n: usize, out: &Path, sets: &[String]) -> std::process::Output {
    run(mpirun(dir, n, &train_cmd(dir, out, sets)))
}

fn settings(corpus: &Path, batch: usize, extra: &[&str]) -> Vec<String> {
    let batch = format!("train.batch_size={batch}");
    let mut sets = vec![batch.as_str()];
    sets.extend(extra);
    common::short_run(corpus, 3, &sets)
}

/// The runs both data-parallel comparisons make: plain AdamW, per-layer updates, GaLore-AdamW
/// (`galore`'s settings), and the all-reduces overlapping the backward pass, alone and with
/// gradient accumulation and checkpointing.
fn plans<'a>(galore: &[&'a str]) -> Vec<(&'static str, Vec<&'a str>)> {
    vec![
        ("adamw", vec![]),
        ("layerwise", vec!["optim.layerwise=true"]),
        ("galore", galore.to_vec()),
        ("overlap", vec!["dist.overlap=true"]),
        (
            "overlap-accum",
            vec![
                "dist.overlap=true",
                "train.grad_accum=2",
                "train.checkpointing=true",
            ],
        ),
    ]
}

/// Guarantee: 2 ranks with micro-batch 2 give the weights of 1 process with micro-batch 4
/// (within 1e-5), plain and with per-layer updates, for AdamW and GaLore-AdamW, and with the
/// all-reduces overlapping the backward pass (also with accumulation and checkpointing); rank 0 alone
/// writes metrics (one line per step) and checkpoints; a different batch lands elsewhere, so
/// the comparison can fail.
#[test]
fn two_ranks_equal_one_process_with_twice_the_batch() {
    let Some((dir, corpus)) = mpi_dir() else {
        return;
    };
    let galore = [
        "optim.name=\"galore-adamw\"",
        "optim.galore.rank=8",
        "optim.galore.update_proj_gap=2",
    ];
    for (tag, extra) in plans(&galore) {
        let one: PathBuf = dir.path().join(format!("{tag}-one"));
        assert!(
            run(train_cmd(dir.path(), &one, &settings(&corpus, 4, &extra)))
                .status
                .success()
        );
        let two = dir.path().join(format!("{tag}-two"));
        let o = mpirun_train(dir.path(), 2, &two, &settings(&corpus, 2, &extra));
        assert!(o.status.success(), "{tag}: mpirun failed");
        let d = weight_diff(&one, &two);
        assert!(d < 1e-5, "{tag}: 2 ranks differ from 1 process by {d}");
        let metrics = std::fs::read_to_string(two.join("metrics.jsonl")).unwrap();
        assert_eq!(metrics.lines().count(), 3, "{tag}: {metrics}");
        assert!(two.join("checkpoints/step-3/model.safetensors").exists());
    }
    // Not vacuous: one process with the per-rank batch trains elsewhere.
    let half = dir.path().join("half");
    assert!(
        run(train_cmd(dir.path(), &half, &settings(&corpus, 2, &[])))
            .status
            .success()
    );
    let d = weight_diff(&half, &dir.path().join("adamw-two"));
    assert!(d > 1e-4, "batch 2 vs 2 x 2 differ by only {d}");
    // The overlapped all-reduces move the same bytes as the ones after the backward pass.
    let bytes = |tag: &str| allreduce_bytes(&dir.path().join(format!("{tag}-two")));
    assert_eq!(bytes("overlap"), bytes("adamw"));
    let memory = std::fs::read_to_string(dir.path().join("overlap-two/memory.json")).unwrap();
    assert!(memory.contains("\"overlap\": true"), "{memory}");
}

/// The process ids of rank `rank` of the `mpirun` whose command line names `out`.
fn rank_pids(out: &Path, rank: usize) -> Vec<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    let out = out.to_string_lossy().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            let read = |f: &str| std::fs::read(format!("/proc/{pid}/{f}")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&read("cmdline")).to_string();
            let env = String::from_utf8_lossy(&read("environ")).to_string();
            cmd.contains(&out) && !cmd.contains("mpirun") && env.split('\0').any(|v| v == want)
        })
        .collect()
}

/// Guarantee: a rank that stalls (stopped by SIGSTOP) makes rank 0 stop after `dist.timeout_s`
/// with an error naming the all-reduce, the job ends instead of hanging, and the last
/// checkpoint stays whole (it evaluates).
#[test]
fn a_stalled_rank_stops_the_job_and_the_checkpoint_survives() {
    let Some((dir, corpus)) = mpi_dir() else {
        return;
    };
    let out = dir.path().join("stalled");
    let mut sets = settings(&corpus, 2, &["dist.timeout_s=3"]);
    sets.extend(["train.max_steps=100000".into(), "train.save_every=2".into()]);
    let mut c = mpirun(dir.path(), 2, &train_cmd(dir.path(), &out, &sets));
    c.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = c.spawn().unwrap();
    let t0 = std::time::Instant::now();
    while !out.join("checkpoints/step-4").exists() {
        assert!(
            t0.elapsed().as_secs() < 120,
            "no checkpoint after 2 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let pids = rank_pids(&out, 1);
    assert_eq!(pids.len(), 1, "rank 1's process: {pids:?}");
    let stop = Command::new("kill")
        .args(["-STOP", &pids[0].to_string()])
        .status()
        .unwrap();
    assert!(stop.success());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("rank 0 of 2: all-reduce of") && err.contains("did not complete within 3 s"),
        "{err}"
    );
    assert!(t0.elapsed().as_secs() < 120, "took {:?}", t0.elapsed());
    // The latest checkpoint is whole: it evaluates.
    let mut e = common::frugal(dir.path());
    e.arg("eval").arg("--run").arg(&out);
    let o = run(e);
    assert!(o.status.success());
}

/// The `allreduce_bytes` of every step of a run's metrics.
fn allreduce_bytes(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["allreduce_bytes"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// Guarantee: averaging GaLore's projected gradients instead of the full ones gives the same
/// weights within 1e-5 over the first refresh period (plain and per-layer), and moves fewer
/// bytes on every step but the refresh (step 1, where the full gradients are averaged so that
/// both ranks compute the same basis).
#[test]
fn projected_all_reduce_follows_the_full_one() {
    let Some((dir, corpus)) = mpi_dir() else {
        return;
    };
    let galore = [
        "optim.name=\"galore-adamw\"",
        "optim.galore.rank=4",
        "optim.galore.update_proj_gap=10",
        "train.max_grad_norm=0.0",
    ];
    for (tag, extra) in [("plain", None), ("layerwise", Some("optim.layerwise=true"))] {
        let with = |more: &str| {
            let mut v: Vec<&str> = galore.to_vec();
            v.extend(extra);
            v.push(more);
            settings(&corpus, 2, &v)
        };
        let full = dir.path().join(format!("{tag}-full"));
        let proj = dir.path().join(format!("{tag}-projected"));
        let o = mpirun_train(dir.path(), 2, &full, &with("dist.galore_projected=false"));
        assert!(o.status.success());
        let o = mpirun_train(dir.path(), 2, &proj, &with("dist.galore_projected=true"));
        assert!(o.status.success());
        let d = weight_diff(&full, &proj);
        assert!(d < 1e-5, "{tag}: projected all-reduce differs by {d}");
        let (bf, bp) = (allreduce_bytes(&full), allreduce_bytes(&proj));
        assert_eq!(
            bf[0], bp[0],
            "{tag}: the refresh step averages full gradients"
        );
        for s in 1..3 {
            assert!(
                bp[s] < bf[s],
                "{tag} step {}: {} vs {}",
                s + 1,
                bp[s],
                bf[s]
            );
        }
    }
}

/// Guarantee: every rank resumes from the run's latest checkpoint: a 2-rank run cut back to its
/// step-2 checkpoint and resumed under mpirun ends with the uninterrupted run's losses and
/// weights.
#[test]
fn two_ranks_resume_exactly() {
    let Some((dir, corpus)) = mpi_dir() else {
        return;
    };
    let sets = settings(&corpus, 2, &["train.max_steps=4", "train.save_every=2"]);
    let full = dir.path().join("full");
    assert!(mpirun_train(dir.path(), 2, &full, &sets).status.success());
    let part = cut_back(&full, "part");
    let single = {
        let mut c = common::frugal(dir.path());
        c.arg("train").arg("--resume").arg(&part);
        c
    };
    assert!(run(mpirun(dir.path(), 2, &single)).status.success());
    assert_eq!(common::losses(&full), common::losses(&part));
    let d = weight_diff(&full, &part);
    assert!(d == 0.0, "resumed weights differ by {d}");
}

/// Guarantee: the encoder trains data-parallel like the decoders (plain, with per-layer
/// updates, a sharded optimizer state, GaLore's projected all-reduce, all-reduces overlapping
/// the backward pass): masked LM (each example's
/// masks seeded by its position among the step's examples, not by how they are split into
/// ranks, and each rank's mean weighed by its share of the masked tokens) and classification
/// under `mpirun -n 2` end with the weights of one process with twice the batch, within 5e-5
/// (f32 rounding of the differently grouped sums, through 3 Adam steps; seen: 2e-6 to 1.1e-5),
/// and the per-rank batch alone trains elsewhere (by 3e-2: not vacuous).
#[test]
fn encoder_two_ranks_equal_one_process_with_twice_the_batch() {
    let Some((dir, corpus)) = mpi_dir() else {
        return;
    };
    let tsv = dir.path().join("task.tsv");
    let rows: String = (0..60)
        .map(|i| {
            format!(
                "{} words here {i}\t{}\n",
                ["good", "bad"][i % 2],
                ["pos", "neg"][i % 2]
            )
        })
        .collect();
    std::fs::write(&tsv, rows).unwrap();
    let task = format!("data.task_path=\"{}\"", tsv.display());
    let encoder = ["model.kind=\"encoder\"", "model.size=\"encoder-tiny\""];
    for (tag, extra) in [
        ("mlm", vec![]),
        ("mlm-accum", vec!["train.grad_accum=2"]),
        ("mlm-layerwise", vec!["optim.layerwise=true"]),
        ("mlm-zero1", vec!["dist.zero1=true"]),
        (
            "mlm-galore-projected",
            vec![
                "optim.name=\"galore-adamw\"",
                "optim.galore.rank=8",
                "optim.galore.update_proj_gap=2",
                "dist.galore_projected=true",
            ],
        ),
        (
            "mlm-overlap",
            vec!["dist.overlap=true", "train.checkpointing=true"],
        ),
        (
            "cls",
            vec!["train.objective=\"classification\"", task.as_str()],
        ),
    ] {
        let with = |batch: usize| {
            let mut v: Vec<&str> = encoder.to_vec();
            v.extend(&extra);
            settings(&corpus, batch, &v)
        };
        let one = dir.path().join(format!("{tag}-one"));
        let o = run(train_cmd(dir.path(), &one, &with(4)));
        assert!(o.status.success(), "{tag}: one process failed");
        let two = dir.path().join(format!("{tag}-two"));
        let o = mpirun_train(dir.path(), 2, &two, &with(2));
        assert!(o.status.success(), "{tag}: mpirun failed");
        let d = weight_diff(&one, &two);
        assert!(d < 5e-5, "{tag}: 2 ranks differ from 1 process by {d}");
        if tag == "mlm" {
            let half = dir.path().join("mlm-half");
            assert!(run(train_cmd(dir.path(), &half, &with(2))).status.success());
            let d = weight_diff(&half, &two);
            assert!(d > 1e-4, "batch 2 vs 2 x 2 differ by only {d}");
        }
    }
}

/// Guarantee: what several processes need is a clear error: a run without `--out` (every
/// rank must name the same folder), and rank adaptation (its late stage decides per rank).
#[test]
fn refusals_under_mpirun_are_named() {
    if !mpi_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 5);
    let mut sets = settings(&corpus, 2, &[]);
    sets.extend(
        [
            "model.linear.kind=\"tt\"",
            "model.linear.rank=4",
            "tt.rank_adapt=true",
        ]
        .map(String::from),
    );
    let o = mpirun_train(dir.path(), 2, &dir.path().join("tt"), &sets);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("tt.rank_adapt") && err.contains("several processes"),
        "{err}"
    );

    let mut single = common::frugal(dir.path());
    single
        .arg("train")
        .arg("--config")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/default.toml"));
    for s in settings(&corpus, 2, &[]) {
        single.arg("--set").arg(s);
    }
    let o = run(mpirun(dir.path(), 2, &single));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("give --out RUN_DIR"), "{err}");

    // Overlap with what forms or averages gradients its own way.
    for (extra, needle) in [
        (
            &["dist.overlap=true", "optim.layerwise=true"][..],
            "has no effect with optim.layerwise",
        ),
        (
            &[
                "dist.overlap=true",
                "dist.galore_projected=true",
                "optim.name=\"galore-adamw\"",
            ][..],
            "cannot be combined with dist.galore_projected",
        ),
    ] {
        let o = run(train_cmd(
            dir.path(),
            &dir.path().join("refused"),
            &settings(&corpus, 2, extra),
        ));
        common::assert_clean_error(&o, needle);
    }
}

/// The optimizer-state bytes of a run's memory accounting (rank 0's).
fn optimizer_state_bytes(run: &Path) -> f64 {
    let text = std::fs::read_to_string(run.join("memory.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["accounting"]["optimizer_state"].as_f64().unwrap()
}

/// Guarantee: with the optimizer state sharded (ZeRO stage 1), 2 ranks give the weights of the
/// unsharded run within 1e-6 (AdamW plain and per-layer, GaLore-AdamW, overlapped all-reduces
/// alone and with accumulation and checkpointing), rank 0 holds about
/// half of the optimizer state, each checkpoint carries rank 1's shard, and a resumed run ends
/// exactly where the uninterrupted one does.
#[test]
fn sharded_optimizer_state_keeps_the_weights_and_resumes() {
    let Some((dir, corpus)) = mpi_dir() else {
        return;
    };
    let galore = ["optim.name=\"galore-adamw\"", "optim.galore.rank=8"];
    for (tag, extra) in plans(&galore) {
        let with = |zero1: bool| {
            let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
            v.push(format!("dist.zero1={zero1}"));
            settings(
                &corpus,
                2,
                &v.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            )
        };
        let plain = dir.path().join(format!("{tag}-replicated"));
        let sharded = dir.path().join(format!("{tag}-zero1"));
        assert!(mpirun_train(dir.path(), 2, &plain, &with(false))
            .status
            .success());
        assert!(mpirun_train(dir.path(), 2, &sharded, &with(true))
            .status
            .success());
        let d = weight_diff(&plain, &sharded);
        assert!(d < 1e-6, "{tag}: sharded state differs by {d}");
        let ratio = optimizer_state_bytes(&sharded) / optimizer_state_bytes(&plain);
        assert!(
            (0.3..0.7).contains(&ratio),
            "{tag}: rank 0 holds {ratio} of the state"
        );
        let ck = sharded.join("checkpoints/step-3");
        assert!(ck.join("optimizer-rank1.safetensors").is_file(), "{tag}");
        assert!(!sharded.join("checkpoints/.shards-step-3").exists());
    }
    // Resume from step 2 of a 4-step sharded run.
    let sets = settings(
        &corpus,
        2,
        &["dist.zero1=true", "train.max_steps=4", "train.save_every=2"],
    );
    let full = dir.path().join("zero1-full");
    assert!(mpirun_train(dir.path(), 2, &full, &sets).status.success());
    let part = cut_back(&full, "zero1-part");
    let mut single = common::frugal(dir.path());
    single.arg("train").arg("--resume").arg(&part);
    assert!(run(mpirun(dir.path(), 2, &single)).status.success());
    assert_eq!(common::losses(&full), common::losses(&part));
    assert!(weight_diff(&full, &part) == 0.0);
    // A sharded checkpoint does not resume unsharded (it would lose rank 1's state).
    let mut single = common::frugal(dir.path());
    single.args(["train", "--resume"]).arg(&part).args([
        "--set",
        "dist.zero1=false",
        "--set",
        "train.max_steps=6",
    ]);
    let o = run(mpirun(dir.path(), 2, &single));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("the optimizer state is sharded"));
}
