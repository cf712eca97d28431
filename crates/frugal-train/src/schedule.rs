//! Learning-rate schedule: linear warm-up, then cosine decay to a floor.

/// The learning rate of optimizer step `step` (1-based): `lr * step / warmup` during warm-up,
/// then `lr * (min + (1 - min) * (1 + cos(pi * p)) / 2)` with p the fraction of the remaining
/// steps done, reaching `lr * min_ratio` at `max_steps`.
pub fn lr_at(step: u64, lr: f64, warmup: u64, max_steps: u64, min_ratio: f64) -> f64 {
    if warmup > 0 && step <= warmup {
        return lr * step as f64 / warmup as f64;
    }
    let span = max_steps.saturating_sub(warmup).max(1) as f64;
    let p = ((step - warmup.min(step)) as f64 / span).clamp(0.0, 1.0);
    lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
}

#[cfg(test)]
mod tests {
    use super::lr_at;

    #[test]
    fn warmup_then_cosine_to_the_floor() {
        assert!((lr_at(1, 1.0, 10, 110, 0.1) - 0.1).abs() < 1e-12);
        assert!((lr_at(10, 1.0, 10, 110, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(60, 1.0, 10, 110, 0.1) - 0.55).abs() < 1e-12);
        assert!((lr_at(110, 1.0, 10, 110, 0.1) - 0.1).abs() < 1e-12);
        assert!(
            (lr_at(500, 1.0, 10, 110, 0.1) - 0.1).abs() < 1e-12,
            "past the end: floor"
        );
        assert!((lr_at(1, 2.0, 0, 1, 0.0) - 0.0).abs() < 1e-12);
    }
}
