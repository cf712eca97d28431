//! End-to-end test of a second Ctrl-C on a real `frugal train` process: it ends the process at
//! once with status 130 and leaves the latest checkpoint whole. (One Ctrl-C, which saves a
//! checkpoint after the step and stops: `cli.rs`.)

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStderr, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

/// The longest any wait of these tests may take before the test fails instead of hanging.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Guarantee: a second Ctrl-C in the middle of a step ends `frugal train` at once, without
/// finishing the step, with exit status 130 (not a death by signal, no panic); the checkpoint
/// that `checkpoints/latest` names stays whole, and `--resume` continues the run from it.
#[test]
fn second_ctrl_c_exits_130_at_once_and_keeps_the_latest_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 20);
    let mut sets = small_settings(&corpus);
    // Steps of a few hundred ms on CPU, so that both Ctrl-Cs land inside one step.
    sets.extend(
        [
            "model.hidden_size=256",
            "model.intermediate_size=512",
            "train.batch_size=16",
            "train.seq_len=128",
            "train.max_steps=1000",
            "train.save_every=2",
            "train.eval_every=0",
            "train.final_eval_batches=2",
        ]
        .map(String::from),
    );
    let run_dir = dir.path().join("run");
    let mut child = Reaped(
        train_cmd(dir.path(), &run_dir, &sets)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stderr = StderrLines::read(child.0.stderr.take().unwrap());

    // A complete checkpoint, then the moment a later step begins (its predecessor is logged).
    let latest = run_dir.join("checkpoints/latest");
    wait_until("a first checkpoint", &mut child, || latest.exists());
    let logged = metrics_lines(&run_dir);
    wait_until("a step after the checkpoint", &mut child, || {
        metrics_lines(&run_dir) > logged
    });

    sigint(&child.0);
    assert!(
        stderr.wait_for("saving a checkpoint after this step"),
        "no message for the first Ctrl-C: {}",
        stderr.text
    );
    sigint(&child.0);
    let status = wait_exit(&mut child);
    stderr.read_to_end();
    let err = &stderr.text;
    assert_eq!(status.code(), Some(130), "status {status:?}; stderr: {err}");
    assert!(err.contains("second Ctrl-C"), "{err}");
    assert!(
        !err.contains("interrupted: checkpoint saved"),
        "the step finished after the second Ctrl-C: {err}"
    );
    assert!(!err.contains("panicked"), "panic: {err}");

    // The checkpoint `latest` names loads and training goes on from it.
    let stopped = checkpoint_step(&run_dir);
    assert!(stopped >= 2, "latest checkpoint at step {stopped}");
    let mut resume = frugal(dir.path());
    resume
        .arg("train")
        .arg("--resume")
        .arg(&run_dir)
        .arg("--set")
        .arg(format!("train.max_steps={}", stopped + 2));
    let out = run(resume);
    assert!(
        out.status.success(),
        "resume after the second Ctrl-C failed"
    );
    assert_eq!(checkpoint_step(&run_dir), stopped + 2);
}

/// A child process that is killed and reaped when the test ends, failed or not.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The lines of a child's stderr as they come (read on a thread), and the text so far.
struct StderrLines {
    lines: Receiver<String>,
    text: String,
}

impl StderrLines {
    fn read(stderr: ChildStderr) -> Self {
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        StderrLines {
            lines,
            text: String::new(),
        }
    }

    /// Reads lines until one contains `needle` (true), stderr closes or [`TIMEOUT`] passes.
    fn wait_for(&mut self, needle: &str) -> bool {
        let deadline = Instant::now() + TIMEOUT;
        while let Some(line) = self.next_line(deadline) {
            if line.contains(needle) {
                return true;
            }
        }
        false
    }

    /// Reads the rest, until stderr closes (or [`TIMEOUT`] passes).
    fn read_to_end(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        while self.next_line(deadline).is_some() {}
    }

    /// The next line, also added to `text`; `None` once stderr closes or `deadline` passes.
    fn next_line(&mut self, deadline: Instant) -> Option<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = self.lines.recv_timeout(left).ok()?;
        self.text.push_str(&line);
        self.text.push('\n');
        Some(line)
    }
}

/// Polls `done` every 5 ms; fails if the child exits first or [`TIMEOUT`] passes.
fn wait_until(what: &str, child: &mut Reaped, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("frugal exited ({status}) before {what}");
        }
        assert!(t0.elapsed() < TIMEOUT, "no {what} after {TIMEOUT:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for the child to exit, at most [`TIMEOUT`].
fn wait_exit(child: &mut Reaped) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status;
        }
        assert!(
            t0.elapsed() < TIMEOUT,
            "frugal still running {TIMEOUT:?} after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn sigint(child: &Child) {
    // SAFETY: sending SIGINT to our own child process, not yet reaped.
    let r = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(r, 0, "kill -INT failed");
}

/// The number of steps logged in the run's `metrics.jsonl` (0 before it exists).
fn metrics_lines(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
}

/// The step of the checkpoint that `checkpoints/latest` names; that folder must exist.
fn checkpoint_step(run: &Path) -> u64 {
    let name = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    let name = name.trim();
    assert!(
        run.join("checkpoints")
            .join(name)
            .join("model.safetensors")
            .is_file(),
        "checkpoints/latest names {name}, which has no model.safetensors"
    );
    name.strip_prefix("step-").unwrap().parse().unwrap()
}
