//! Checks the collectives of this job, for the tests of `frugal-dist` and for a user's cluster:
//! `mpirun -n N frugal-dist-check [--stall-rank R] [--timeout S]`.
//!
//! Every rank all-reduces, averages and broadcasts known values and compares the results with
//! the arithmetic; rank 0 prints one line per check and `ok`. With `--stall-rank R`, rank R
//! sleeps instead of joining the last all-reduce, so that the others time out after `--timeout`
//! seconds (default 60) and the job stops with the error instead of hanging.

use frugal_dist::from_env;
use std::time::Duration;

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| {
        argv.iter()
            .position(|a| a == name)
            .and_then(|i| argv.get(i + 1))
            .and_then(|v| v.parse::<f64>().ok())
    };
    let timeout = Duration::from_secs_f64(arg("--timeout").unwrap_or(60.0));
    let stall = arg("--stall-rank").map(|r| r as usize);
    let mut c = match from_env(timeout) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("frugal-dist-check: error: {e}");
            std::process::exit(2);
        }
    };
    let (rank, size) = (c.rank(), c.size());
    let fail = |what: &str| -> ! {
        eprintln!("frugal-dist-check: rank {rank} of {size}: {what}");
        std::process::exit(1);
    };
    // Sum: rank r contributes r + i at element i (n large enough to take several messages).
    let n = 100_003usize;
    let mut v: Vec<f32> = (0..n).map(|i| (rank + i % 1000) as f32).collect();
    c.all_reduce_sum(&mut v)
        .unwrap_or_else(|e| fail(&e.to_string()));
    let ranks: usize = (0..size).sum();
    if v.iter()
        .enumerate()
        .any(|(i, &x)| x != (ranks + size * (i % 1000)) as f32)
    {
        fail("all-reduce sum differs from the arithmetic");
    }
    let mut m = vec![rank as f32; 7];
    c.all_reduce_mean(&mut m)
        .unwrap_or_else(|e| fail(&e.to_string()));
    if m.iter()
        .any(|&x| (x - ranks as f32 / size as f32).abs() > 1e-6)
    {
        fail("all-reduce mean differs from the arithmetic");
    }
    let root = size - 1;
    let mut b = vec![rank as f32 + 0.5; 5];
    c.broadcast(&mut b, root)
        .unwrap_or_else(|e| fail(&e.to_string()));
    if b.iter().any(|&x| x != root as f32 + 0.5) {
        fail("broadcast differs from the root's values");
    }
    c.barrier().unwrap_or_else(|e| fail(&e.to_string()));
    if c.bytes_reduced() != 4 * (n as u64 + 7) || c.bytes_broadcast() != 20 {
        fail("byte counts differ");
    }
    // Non-blocking all-reduces, several in flight at once, finished in order.
    let mut started = Vec::new();
    for k in 0..3usize {
        let buf: Vec<f32> = (0..1000 * (k + 1))
            .map(|i| (rank * (k + 1) + i) as f32)
            .collect();
        started.push(
            c.start_all_reduce_sum(buf)
                .unwrap_or_else(|e| fail(&e.to_string())),
        );
        c.progress(&mut started)
            .unwrap_or_else(|e| fail(&e.to_string()));
    }
    for (k, op) in started.into_iter().enumerate() {
        let got = c
            .finish_all_reduce(op)
            .unwrap_or_else(|e| fail(&e.to_string()));
        if got.len() != 1000 * (k + 1)
            || got
                .iter()
                .enumerate()
                .any(|(i, &x)| x != (ranks * (k + 1) + size * i) as f32)
        {
            fail("a non-blocking all-reduce differs from the arithmetic");
        }
    }
    if stall == Some(rank) {
        std::thread::sleep(Duration::from_secs(3600));
    }
    let mut last = vec![1.0f32; 3];
    c.all_reduce_sum(&mut last)
        .unwrap_or_else(|e| fail(&e.to_string()));
    if rank == 0 {
        println!(
            "ranks {size}: all-reduce sum, mean, broadcast, barrier, byte counts, non-blocking \
             all-reduces: ok"
        );
    }
}
