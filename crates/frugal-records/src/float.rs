//! Floats that may be `null`: serde_json writes a non-finite `f64` (a diverged loss, an
//! overflowed perplexity) as `null`; these read `null` back as NaN, so that such a record still
//! reads, and writes the same `null` again.

use serde::{Deserialize, Deserializer};

/// A number, or NaN for `null`.
pub fn nan_for_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// For an optional field (absent is `None`, through `#[serde(default)]`): a number, or NaN for
/// `null`, so that a present `null` is written back rather than dropped.
pub fn some_nan_for_null<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    nan_for_null(d).map(Some)
}
