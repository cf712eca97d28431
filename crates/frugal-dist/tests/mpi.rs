//! The MPI backend under a real `mpirun` on this machine (loopback): collectives against the
//! arithmetic, and a stalled rank that makes the job stop with a timeout instead of hanging.
//! Needs the `mpi` feature and Open MPI's `mpirun`; without `mpirun` the tests say so and pass,
//! unless `FRUGAL_MPI=1` (set by `cargo xtask test` once it has installed Open MPI) makes them
//! mandatory.
#![cfg(feature = "mpi")]

use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// `mpirun -n N` of the check binary, as root where need be; None (with a message) without
/// `mpirun`.
fn mpirun(n: usize, args: &[&str]) -> Option<Output> {
    if Command::new("mpirun").arg("--version").output().is_err() {
        assert!(
            std::env::var("FRUGAL_MPI").as_deref() != Ok("1"),
            "FRUGAL_MPI=1 but mpirun is missing"
        );
        eprintln!(
            "skipped: no mpirun (install Open MPI: apt-get install openmpi-bin libopenmpi-dev)"
        );
        return None;
    }
    let mut c = Command::new("mpirun");
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .args(["--oversubscribe", "-n", &n.to_string()])
        .arg(env!("CARGO_BIN_EXE_frugal-dist-check"))
        .args(args);
    Some(c.output().expect("mpirun runs"))
}

/// Guarantee: 2 and 3 ranks all-reduce, average and broadcast as the arithmetic says, and
/// count the bytes.
#[test]
fn collectives_match_the_arithmetic() {
    for n in [2, 3] {
        let Some(o) = mpirun(n, &[]) else { return };
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && out.contains(&format!("ranks {n}:")) && out.contains("ok"),
            "{n} ranks: {out}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Guarantee: a rank that stops joining makes the others fail after the timeout, with an error
/// naming the operation, and the job ends instead of hanging.
#[test]
fn a_stalled_rank_ends_the_job_with_a_timeout() {
    let t0 = Instant::now();
    let Some(o) = mpirun(2, &["--stall-rank", "1", "--timeout", "2"]) else {
        return;
    };
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("rank 0 of 2: all-reduce of 3 f32 values did not complete within 2 s"),
        "{err}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(120),
        "took {:?}",
        t0.elapsed()
    );
}
