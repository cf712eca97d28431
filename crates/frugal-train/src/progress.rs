//! Training progress display: a bar redrawn in place on a terminal, plain lines otherwise.
//!
//! On a terminal (stderr, or `FRUGAL_PROGRESS=bar`) each [`Progress::update`] redraws one line
//! with `'\r'`: a bar, `step/total`, the loss, tokens per second and an ETA from the average step
//! time so far. Elsewhere (logs, pipes, or `FRUGAL_PROGRESS=plain`) it prints a plain line for the
//! first update, then at most every 10 seconds or every `log_every` steps, and always at the last
//! step.

use std::io::{self, IsTerminal, Write};
use std::time::{Duration, Instant};

/// Default time between plain lines.
const PLAIN_INTERVAL: Duration = Duration::from_secs(10);
/// Shortest time between two redraws of the bar.
const BAR_INTERVAL: Duration = Duration::from_millis(100);
/// Width of the bar between its brackets, in characters.
const BAR_WIDTH: usize = 20;
/// Clears from the cursor to the end of the line.
const CLEAR_EOL: &str = "\x1b[K";

/// The latest state reported to [`Progress::update`].
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    step: u64,
    loss: f64,
    tokens_per_s: f64,
    at: Instant,
}

/// Progress of a training run, shown on stderr (or an injected writer).
///
/// Output errors are ignored: progress is best effort. Dropping a `Progress` calls
/// [`Progress::finish`].
pub struct Progress {
    total: u64,
    start_step: u64,
    started: Instant,
    bar: bool,
    out: Box<dyn Write + Send>,
    log_every: u64,
    interval: Duration,
    last: Option<Snapshot>,
    last_plain: Option<(Instant, u64)>,
    last_draw: Option<Instant>,
    bar_shown: bool,
    finished: bool,
}

impl Progress {
    /// Progress from `start_step` (e.g. a resumed run) to `total_steps`, written to stderr.
    ///
    /// Draws a bar when stderr is a terminal and plain lines otherwise; the environment variable
    /// `FRUGAL_PROGRESS=plain` or `FRUGAL_PROGRESS=bar` overrides the detection.
    pub fn new(total_steps: u64, start_step: u64) -> Self {
        let is_terminal = match std::env::var("FRUGAL_PROGRESS") {
            Ok(v) if v.trim().eq_ignore_ascii_case("plain") => false,
            Ok(v) if v.trim().eq_ignore_ascii_case("bar") => true,
            _ => io::stderr().is_terminal(),
        };
        Self::with_writer(total_steps, start_step, is_terminal, Box::new(io::stderr()))
    }

    /// Like [`Progress::new`], but writes to `writer` and draws a bar exactly when
    /// `is_terminal` (the environment is not consulted).
    pub fn with_writer(
        total_steps: u64,
        start_step: u64,
        is_terminal: bool,
        writer: Box<dyn Write + Send>,
    ) -> Self {
        Progress {
            total: total_steps,
            start_step,
            started: Instant::now(),
            bar: is_terminal,
            out: writer,
            log_every: 0,
            interval: PLAIN_INTERVAL,
            last: None,
            last_plain: None,
            last_draw: None,
            bar_shown: false,
            finished: false,
        }
    }

    /// In plain mode, also prints a line at every step that is a multiple of `steps`
    /// (0, the default, turns this off).
    pub fn with_log_every(mut self, steps: u64) -> Self {
        self.log_every = steps;
        self
    }

    /// In plain mode, prints a line when at least `interval` has passed since the last one
    /// (default 10 seconds).
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Whether this display redraws a bar (`true`) or prints plain lines (`false`).
    pub fn is_bar(&self) -> bool {
        self.bar
    }

    /// Reports that `step` is done with training loss `loss` at `tokens_per_s` tokens per second.
    pub fn update(&mut self, step: u64, loss: f64, tokens_per_s: f64) {
        let now = Instant::now();
        self.last = Some(Snapshot {
            step,
            loss,
            tokens_per_s,
            at: now,
        });
        let is_last = step >= self.total;
        if self.bar {
            let due = self
                .last_draw
                .is_none_or(|t| now.duration_since(t) >= BAR_INTERVAL);
            if due || is_last {
                self.draw_bar();
            }
        } else {
            let due = match self.last_plain {
                None => true,
                Some((t, s)) => {
                    s != step
                        && (is_last
                            || now.duration_since(t) >= self.interval
                            || (self.log_every > 0 && step % self.log_every == 0))
                }
            };
            if due {
                self.print_plain();
            }
        }
    }

    /// Prints `line` (an evaluation result, say) on its own line; on a terminal the bar is
    /// cleared first and drawn again below it.
    pub fn message(&mut self, line: &str) {
        if self.bar && self.bar_shown {
            let _ = write!(self.out, "\r{CLEAR_EOL}");
            self.bar_shown = false;
        }
        let _ = writeln!(self.out, "{line}");
        if self.bar && self.last.is_some() && !self.finished {
            self.draw_bar();
        } else {
            let _ = self.out.flush();
        }
    }

    /// Shows the final state and ends the bar's line; later calls do nothing.
    pub fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        if self.bar {
            if self.last.is_some() {
                self.draw_bar();
            }
            if self.bar_shown {
                let _ = writeln!(self.out);
                self.bar_shown = false;
            }
        } else if let Some(last) = self.last {
            if self.last_plain.map(|(_, s)| s) != Some(last.step) {
                self.print_plain();
            }
        }
        let _ = self.out.flush();
    }

    /// Redraws the bar line from the latest snapshot.
    fn draw_bar(&mut self) {
        let Some(snap) = self.last else { return };
        let frac = self.fraction(snap.step);
        let filled = ((frac * BAR_WIDTH as f64).floor() as usize).min(BAR_WIDTH);
        let mut bar = "=".repeat(filled);
        if filled < BAR_WIDTH {
            bar.push('>');
            bar.push_str(&" ".repeat(BAR_WIDTH - filled - 1));
        }
        let line = format!(
            "[{bar}] {:>3.0}% {}/{} loss {:.4} {} tok/s ETA {}",
            frac * 100.0,
            snap.step,
            self.total,
            snap.loss,
            format_rate(snap.tokens_per_s),
            self.eta(snap),
        );
        let _ = write!(self.out, "\r{line}{CLEAR_EOL}");
        let _ = self.out.flush();
        self.bar_shown = true;
        self.last_draw = Some(snap.at);
    }

    /// Prints one plain line from the latest snapshot.
    fn print_plain(&mut self) {
        let Some(snap) = self.last else { return };
        let elapsed = snap.at.duration_since(self.started).as_secs_f64();
        let _ = writeln!(
            self.out,
            "step {}/{} ({:.1}%) | loss {:.4} | {} tok/s | elapsed {} | ETA {}",
            snap.step,
            self.total,
            self.fraction(snap.step) * 100.0,
            snap.loss,
            format_rate(snap.tokens_per_s),
            format_duration(elapsed),
            self.eta(snap),
        );
        let _ = self.out.flush();
        self.last_plain = Some((snap.at, snap.step));
    }

    /// Share of the run done at `step`, in `0..=1`.
    fn fraction(&self, step: u64) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            (step as f64 / self.total as f64).clamp(0.0, 1.0)
        }
    }

    /// Time left at the average step time since the start, or `"--"` before any step is done.
    fn eta(&self, snap: Snapshot) -> String {
        let done = snap.step.saturating_sub(self.start_step);
        if done == 0 {
            return "--".to_string();
        }
        let remaining = self.total.saturating_sub(snap.step);
        let per_step = snap.at.duration_since(self.started).as_secs_f64() / done as f64;
        format_duration(per_step * remaining as f64)
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Formats a duration in seconds compactly: `"12s"`, `"3m05s"`, `"1h02m"`, `"2d03h"`.
///
/// Rounds to whole seconds; negative or non-finite input gives `"--"`.
pub fn format_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "--".to_string();
    }
    let s = secs.round() as u64;
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// Formats a rate compactly: `"950"`, `"12.3k"`, `"1.25M"`; non-finite gives `"-"`.
fn format_rate(r: f64) -> String {
    if !r.is_finite() {
        "-".to_string()
    } else if r.abs() >= 1e6 {
        format!("{:.2}M", r / 1e6)
    } else if r.abs() >= 1e4 {
        format!("{:.1}k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer whose bytes the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[test]
    fn durations() {
        assert_eq!(format_duration(0.0), "0s");
        assert_eq!(format_duration(12.3), "12s");
        assert_eq!(format_duration(59.6), "1m00s");
        assert_eq!(format_duration(185.0), "3m05s");
        assert_eq!(format_duration(3720.0), "1h02m");
        assert_eq!(format_duration(2.0 * 86_400.0 + 3.0 * 3600.0), "2d03h");
        assert_eq!(format_duration(f64::NAN), "--");
        assert_eq!(format_duration(-1.0), "--");
    }

    #[test]
    fn rates() {
        assert_eq!(format_rate(950.4), "950");
        assert_eq!(format_rate(12_345.0), "12.3k");
        assert_eq!(format_rate(1_250_000.0), "1.25M");
    }

    #[test]
    fn plain_mode_prints_lines_without_carriage_returns() {
        let buf = Shared::default();
        let mut p = Progress::with_writer(100, 0, false, Box::new(buf.clone())).with_log_every(25);
        assert!(!p.is_bar());
        for step in 1..=100 {
            p.update(step, 3.0 - step as f64 / 100.0, 1234.0);
        }
        p.message("eval loss 2.5");
        p.finish();
        p.finish();
        drop(p);
        let out = buf.text();
        assert!(!out.contains('\r'), "{out:?}");
        assert!(!out.contains('\x1b'), "{out:?}");
        let lines: Vec<&str> = out.lines().collect();
        // First step, steps 25, 50, 75, 100, then the message.
        assert_eq!(lines.len(), 6, "{out}");
        assert!(lines[0].starts_with("step 1/100 "), "{out}");
        assert!(lines[4].starts_with("step 100/100 (100.0%)"), "{out}");
        assert_eq!(lines[5], "eval loss 2.5");
    }

    #[test]
    fn plain_mode_prints_last_state_on_finish() {
        let buf = Shared::default();
        let mut p = Progress::with_writer(1000, 10, false, Box::new(buf.clone()));
        for step in 11..=20 {
            p.update(step, 2.0, 100.0);
        }
        p.finish();
        let out = buf.text();
        assert_eq!(out.lines().count(), 2, "{out}");
        assert!(
            out.lines().last().unwrap().starts_with("step 20/1000 "),
            "{out}"
        );
    }

    #[test]
    fn bar_mode_redraws_and_clears_for_messages() {
        let buf = Shared::default();
        let mut p = Progress::with_writer(10, 0, true, Box::new(buf.clone()));
        p.update(1, 3.0, 5000.0);
        p.message("eval 2.9");
        for step in 2..=10 {
            p.update(step, 2.0, 5000.0);
        }
        p.finish();
        let out = buf.text();
        assert!(out.starts_with("\r["), "{out:?}");
        assert!(
            out.contains(&format!("\r{CLEAR_EOL}eval 2.9\n\r[")),
            "{out:?}"
        );
        assert!(out.contains("10/10 loss 2.0000"), "{out:?}");
        assert!(out.ends_with('\n'), "{out:?}");
        assert_eq!(out.matches('\n').count(), 2, "{out:?}");
    }
}
