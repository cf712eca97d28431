//! What the benchmarks share: reading numbers out of one-line JSON by key (xtask has no JSON
//! dependency), and describing the machine and the date of a run.

use std::process::Command;

/// Where `"key"` occurs as an object key in `text`: its start and the index just after its `:`.
pub fn find_key(text: &str, key: &str) -> Option<(usize, usize)> {
    let quoted = format!("\"{key}\"");
    let mut from = 0;
    while let Some(i) = text[from..].find(&quoted) {
        let start = from + i;
        let after = start + quoted.len();
        let rest = &text[after..];
        let trimmed = rest.trim_start();
        if let Some(value) = trimmed.strip_prefix(':') {
            return Some((start, text.len() - value.len()));
        }
        from = after;
    }
    None
}

/// The number that is the value of the first key `key` in `text` (a JSON object), if any.
pub fn json_number(text: &str, key: &str) -> Option<f64> {
    let (_, after) = find_key(text, key)?;
    let value = text[after..].trim_start();
    let end = value
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E')))
        .unwrap_or(value.len());
    value[..end].parse().ok().filter(|v: &f64| v.is_finite())
}

/// The machine the benchmark ran on.
pub struct Machine {
    /// Logical CPUs.
    pub nproc: usize,
    /// The CPU model name.
    pub model: String,
}

impl Machine {
    /// The machine this runs on.
    pub fn detect() -> Self {
        let nproc = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| cpu_model(&s))
            .unwrap_or_else(|| "unknown CPU".into());
        Self { nproc, model }
    }
}

/// The first `model name` of `/proc/cpuinfo`.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "model name").then(|| v.trim().to_string())
    })
}

/// The date and time now, UTC, ISO 8601.
pub fn utc_date() -> String {
    Command::new("date")
        .args(["-u", "+%FT%TZ"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}
