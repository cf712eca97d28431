//! The memory meter: resident memory of this process (current and peak) and byte accounting
//! of tensors by category.

use serde::Serialize;
use std::collections::BTreeMap;

fn status_field_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].split_whitespace().next()?.parse().ok()
}

/// Resident memory of this process now, in bytes (0 where the OS does not tell).
pub fn current_rss_bytes() -> u64 {
    status_field_kib("VmRSS:").map_or(0, |k| k * 1024)
}

/// Peak resident memory of this process so far, in bytes. It never goes down inside a process:
/// measure each method in a fresh process.
pub fn peak_rss_bytes() -> u64 {
    if let Some(k) = status_field_kib("VmHWM:") {
        return k * 1024;
    }
    // SAFETY: getrusage only writes into the struct we pass.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut ru) == 0 {
            return ru.ru_maxrss as u64 * 1024;
        }
    }
    0
}

/// Bytes a tensor's elements take (not counting storage shared with other views).
pub fn tensor_bytes(t: &tch::Tensor) -> u64 {
    t.numel() as u64 * t.kind().elt_size_in_bytes() as u64
}

/// Bytes by category (parameters, gradients, optimizer state, activations...), for reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Accounting {
    /// Category name to bytes.
    pub bytes: BTreeMap<String, u64>,
}

impl Accounting {
    /// Adds `bytes` to `category`.
    pub fn add(&mut self, category: &str, bytes: u64) {
        *self.bytes.entry(category.to_string()).or_default() += bytes;
    }

    /// Adds the bytes of every tensor in `tensors` to `category`.
    pub fn add_tensors<'a>(
        &mut self,
        category: &str,
        tensors: impl IntoIterator<Item = &'a tch::Tensor>,
    ) {
        let total = tensors.into_iter().map(tensor_bytes).sum();
        self.add(category, total);
    }

    /// The sum over all categories.
    pub fn total(&self) -> u64 {
        self.bytes.values().sum()
    }
}

/// Formats bytes for people: `1.23 GB`, `456.0 MB`, `12.0 kB`.
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.1} kB", b / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_follows_a_large_allocation() {
        // Other tests in this process may have raised the peak before: compare the resident
        // memory with the block held, then require the peak to be at least that.
        let before = current_rss_bytes();
        let v = vec![1u8; 64 << 20];
        assert!(v.iter().step_by(4096).all(|&x| x == 1));
        let with = current_rss_bytes();
        assert!(with >= before + (60 << 20), "resident {before} -> {with}");
        assert!(peak_rss_bytes() >= with, "peak below the resident memory");
        drop(v);
    }

    #[test]
    fn accounting_sums_tensor_bytes() {
        let mut a = Accounting::default();
        let t = tch::Tensor::zeros([10, 10], (tch::Kind::Float, tch::Device::Cpu));
        a.add_tensors("parameters", [&t, &t]);
        a.add("optimizer_state", 8);
        assert_eq!(a.bytes["parameters"], 800);
        assert_eq!(a.total(), 808);
    }
}
