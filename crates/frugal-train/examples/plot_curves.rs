//! Plots one key of several runs' `metrics.jsonl` on one chart (the trainer's own PNG plotting),
//! for benchmarks that compare runs (`cargo xtask bench galore-quality`; xtask itself depends on
//! the standard library only).
//!
//! ```text
//! cargo run --release -p frugal-train --example plot_curves -- OUT.png KEY TITLE \
//!     NAME=RUN/metrics.jsonl [NAME=RUN/metrics.jsonl]...
//! ```
//!
//! Each series is the `(step, KEY)` pairs of the lines of its file that have both.

use frugal_train::plot::{write_loss_png, Series};
use std::path::Path;
use std::process::ExitCode;

/// Line colours, in the order of the series.
const COLOURS: [[u8; 3]; 6] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [148, 103, 189],
    [255, 127, 14],
    [127, 127, 127],
];

/// `(step, key)` of every line of a `metrics.jsonl` text that has both.
fn points(text: &str, key: &str) -> Vec<(f64, f64)> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_f64()?, v[key].as_f64()?)))
        .collect()
}

/// Reads each NAME=METRICS.jsonl series and writes the chart.
fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        eprintln!("usage: plot_curves OUT.png KEY TITLE NAME=METRICS.jsonl...");
        return ExitCode::from(2);
    }
    let (out, key, title) = (&args[0], &args[1], &args[2]);
    let mut data = Vec::new();
    for spec in &args[3..] {
        let Some((name, path)) = spec.split_once('=') else {
            eprintln!("plot_curves: '{spec}' is not NAME=METRICS.jsonl");
            return ExitCode::from(2);
        };
        match std::fs::read_to_string(path) {
            Ok(text) => data.push((name.to_string(), points(&text, key))),
            Err(e) => {
                eprintln!("plot_curves: cannot read {path}: {e}");
                return ExitCode::from(1);
            }
        }
    }
    let series: Vec<Series> = data
        .iter()
        .zip(COLOURS.iter().cycle())
        .map(|((name, pts), rgb)| Series {
            name,
            points: pts,
            rgb: *rgb,
        })
        .collect();
    match write_loss_png(Path::new(out), title, "step", key, &series) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("plot_curves: cannot write {out}: {e}");
            ExitCode::from(1)
        }
    }
}
