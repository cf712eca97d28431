//! LLM.int8 weights (bitsandbytes `Linear8bitLt`): int8 codes with one f32 absmax per output row.
//!
//! Layout as bitsandbytes saves it through transformers (see `docs/formats.md` and
//! FORMATS.md "LLM.int8"): `P.weight` int8 (out, in), `P.SCB` f32 (out,), `P.weight_format`
//! uint8 scalar 0 ("row"). Quantization follows bitsandbytes: the weight is first cast to f16,
//! SCB = row max |W| (the f16 values, as f32), CB = round-half-even(W * (127 / SCB)) with the
//! product in f32; a zero row gives SCB 0 and codes 0. Dequantization is CB * SCB / 127.
//! The outlier threshold of LLM.int8 concerns activations at matmul time and is not stored.

use crate::{QuantError, Result};
use tch::{Kind, Tensor};

/// Rounds an f32 to the nearest f16 value (ties to even), returned as f32.
///
/// Values beyond the f16 range become ±infinity, as a cast to f16 does; NaN stays NaN.
/// Subnormal f16 values (multiples of 2^-24 below 2^-14) are produced exactly.
pub fn round_to_f16(x: f32) -> f32 {
    if !x.is_finite() || x == 0.0 {
        return x;
    }
    let a = x.abs();
    let quantum = if a < f32::powi(2.0, -14) {
        f32::powi(2.0, -24)
    } else {
        // Exponent of a: a = 1.m * 2^e; f16 keeps 10 mantissa bits.
        let e = ((a.to_bits() >> 23) & 0xff) as i32 - 127;
        f32::powi(2.0, e - 10)
    };
    // Division and multiplication by a power of two are exact here.
    let r = (a / quantum).round_ties_even() * quantum;
    let r = if r > 65504.0 { f32::INFINITY } else { r };
    r.copysign(x)
}

/// Fetches tensor `name` through `get`, on the CPU, or says it is missing.
pub(crate) fn fetch(get: &impl Fn(&str) -> Option<Tensor>, name: &str) -> Result<Tensor> {
    get(name)
        .map(|t| t.to_device(tch::Device::Cpu).contiguous())
        .ok_or_else(|| QuantError::Inconsistent {
            name: name.to_string(),
            reason: "tensor is missing".into(),
        })
}

/// Errors unless `t` has one of `kinds`.
pub(crate) fn check_kind(
    t: &Tensor,
    name: &str,
    kinds: &[Kind],
    expected: &'static str,
) -> Result<()> {
    if kinds.contains(&t.kind()) {
        Ok(())
    } else {
        Err(QuantError::Dtype {
            name: name.to_string(),
            dtype: format!("{:?}", t.kind()),
            expected,
        })
    }
}

/// Errors unless `t` has shape `want`.
pub(crate) fn check_shape(t: &Tensor, name: &str, want: &[i64]) -> Result<()> {
    let shape = t.size();
    if shape == want {
        Ok(())
    } else {
        Err(QuantError::Shape {
            name: name.to_string(),
            shape,
            reason: format!("is not the expected {want:?}"),
        })
    }
}

/// Copies a tensor's elements out, flattened, as `T` (the dtype was checked by the caller).
pub(crate) fn to_vec<T: tch::kind::Element + Copy>(t: &Tensor) -> Result<Vec<T>> {
    Ok(Vec::<T>::try_from(&t.reshape([-1i64]))?)
}

/// Errors unless `w` holds `rows * cols` values and both are nonzero.
pub(crate) fn check_len(w: &[f32], rows: usize, cols: usize) -> Result<()> {
    if rows == 0 || cols == 0 || w.len() != rows * cols {
        return Err(QuantError::Shape {
            name: "weight".into(),
            shape: vec![rows as i64, cols as i64],
            reason: format!("does not match {} values (or is empty)", w.len()),
        });
    }
    Ok(())
}

/// An LLM.int8 (row-wise absmax) quantized weight of shape (rows = out, cols = in).
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Rowwise {
    /// Codes, row-major (rows, cols).
    pub codes: Vec<i8>,
    /// Per-row absmax of the f16-cast weight (bitsandbytes' `SCB`), length `rows`.
    pub scb: Vec<f32>,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
}

impl Int8Rowwise {
    /// Quantizes the row-major weight `w` of shape (rows, cols) as bitsandbytes does.
    ///
    /// Errors when `w.len() != rows * cols` or a dimension is 0.
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        check_len(w, rows, cols)?;
        let mut codes = vec![0i8; rows * cols];
        let mut scb = vec![0f32; rows];
        for r in 0..rows {
            let row = &w[r * cols..(r + 1) * cols];
            let max = row
                .iter()
                .map(|&x| round_to_f16(x).abs())
                .fold(0f32, f32::max);
            scb[r] = max;
            if max == 0.0 {
                continue;
            }
            let mul = 127.0f32 / max;
            for (c, &x) in codes[r * cols..(r + 1) * cols].iter_mut().zip(row) {
                *c = (round_to_f16(x) * mul)
                    .round_ties_even()
                    .clamp(-127.0, 127.0) as i8;
            }
        }
        Ok(Self {
            codes,
            scb,
            rows,
            cols,
        })
    }

    /// The weight back, row-major (rows, cols): CB * SCB / 127 in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.codes.len());
        for r in 0..self.rows {
            let s = self.scb[r];
            out.extend(
                self.codes[r * self.cols..(r + 1) * self.cols]
                    .iter()
                    .map(|&c| c as f32 * s / 127.0),
            );
        }
        out
    }

    /// Storage per weight in bits, SCB included: 8 + 32 / cols.
    pub fn bits_per_param(&self) -> f64 {
        (8.0 * (self.rows * self.cols) as f64 + 32.0 * self.rows as f64)
            / (self.rows * self.cols) as f64
    }

    /// The tensors bitsandbytes saves for a `Linear8bitLt` named `prefix`: `prefix.weight` int8
    /// (out, in), `prefix.SCB` f32 (out,), `prefix.weight_format` uint8 scalar 0.
    pub fn to_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let (r, c) = (self.rows as i64, self.cols as i64);
        vec![
            (
                format!("{prefix}.weight"),
                Tensor::from_slice(&self.codes).reshape([r, c]),
            ),
            (format!("{prefix}.SCB"), Tensor::from_slice(&self.scb)),
            (
                format!("{prefix}.weight_format"),
                Tensor::from_slice(&[0u8]).reshape([0i64; 0]),
            ),
        ]
    }

    /// Reads the tensors of [`Int8Rowwise::to_tensors`] through `get` (name to tensor).
    ///
    /// `prefix.weight_format` may be absent; when present it must be 0 ("row"). Errors name
    /// the missing tensor, or the one of the wrong dtype or shape.
    pub fn from_tensors(prefix: &str, get: impl Fn(&str) -> Option<Tensor>) -> Result<Self> {
        let wn = format!("{prefix}.weight");
        let w = fetch(&get, &wn)?;
        check_kind(&w, &wn, &[Kind::Int8], "int8")?;
        let shape = w.size();
        if shape.len() != 2 {
            return Err(QuantError::Shape {
                name: wn,
                shape,
                reason: "is not 2-D (out, in)".into(),
            });
        }
        let sn = format!("{prefix}.SCB");
        let s = fetch(&get, &sn)?;
        check_kind(&s, &sn, &[Kind::Float], "float32")?;
        check_shape(&s, &sn, &[shape[0]])?;
        let fname = format!("{prefix}.weight_format");
        if let Some(f) = get(&fname) {
            let v: Vec<i64> = to_vec(&f.to_device(tch::Device::Cpu).to_kind(Kind::Int64))?;
            if v != [0] {
                return Err(QuantError::Inconsistent {
                    name: fname,
                    reason: format!("weight_format {v:?} is not 0 (row-wise)"),
                });
            }
        }
        Ok(Self {
            codes: to_vec(&w)?,
            scb: to_vec(&s)?,
            rows: shape[0] as usize,
            cols: shape[1] as usize,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// `round_to_f16` agrees bit for bit with libtorch's f32 -> f16 -> f32 cast, including
    /// ties, subnormals, overflow to infinity and signs.
    #[test]
    fn round_to_f16_matches_torch() {
        let mut xs: Vec<f32> = (0..20000)
            .map(|i| ((i as f32) * 0.7311).sin() * 10f32.powi((i % 13) - 8))
            .collect();
        xs.extend([
            0.0,
            -0.0,
            1.0 + f32::powi(2.0, -11),
            1.0 + 3.0 * f32::powi(2.0, -11),
            f32::powi(2.0, -25),
            f32::powi(2.0, -24) * 1.5,
            f32::powi(2.0, -14) * 0.99999,
            65504.0,
            65519.0,
            65520.0,
            -70000.0,
            1e-30,
        ]);
        let t = Tensor::from_slice(&xs)
            .to_kind(Kind::Half)
            .to_kind(Kind::Float);
        let want: Vec<f32> = Vec::try_from(&t).unwrap();
        for (x, w) in xs.iter().zip(&want) {
            assert_eq!(round_to_f16(*x).to_bits(), w.to_bits(), "x = {x:e}");
        }
    }

    /// Known values: max maps to ±127, a zero row gives SCB 0 and codes 0, and dequantized
    /// values lie within half a step (SCB / 254) of the f16-cast input.
    #[test]
    fn quantize_basics() {
        let w = [0.5f32, -1.0, 0.25, 0.0, 0.0, 0.0];
        let q = Int8Rowwise::quantize(&w, 2, 3).unwrap();
        assert_eq!(q.scb, vec![1.0, 0.0]);
        assert_eq!(q.codes, vec![64, -127, 32, 0, 0, 0]); // 63.5 rounds to even 64
        let d = q.dequantize();
        for (a, b) in w.iter().zip(&d) {
            assert!((a - b).abs() <= 1.0 / 254.0 + 1e-7);
        }
        assert!((q.bits_per_param() - (8.0 + 32.0 / 3.0)).abs() < 1e-12);
    }

    /// Wrong lengths or empty shapes are refused.
    #[test]
    fn bad_shapes() {
        assert!(matches!(
            Int8Rowwise::quantize(&[1.0; 5], 2, 3),
            Err(QuantError::Shape { .. })
        ));
        assert!(Int8Rowwise::quantize(&[], 0, 3).is_err());
    }

    /// to_tensors then from_tensors gives back the same codes and SCB, with the keys, dtypes
    /// and shapes of bitsandbytes; missing or misshaped tensors are named in the error.
    #[test]
    fn tensors_round_trip() {
        let w: Vec<f32> = (0..48).map(|i| (i as f32 * 0.37).cos()).collect();
        let q = Int8Rowwise::quantize(&w, 6, 8).unwrap();
        let map: HashMap<String, Tensor> = q.to_tensors("l").into_iter().collect();
        assert_eq!(map["l.weight"].kind(), Kind::Int8);
        assert_eq!(map["l.weight"].size(), vec![6, 8]);
        assert_eq!(map["l.SCB"].kind(), Kind::Float);
        assert_eq!(map["l.weight_format"].size(), Vec::<i64>::new());
        assert_eq!(map["l.weight_format"].kind(), Kind::Uint8);
        let back = Int8Rowwise::from_tensors("l", |n| map.get(n).map(|t| t.shallow_clone()));
        assert_eq!(back.unwrap(), q);

        let err =
            Int8Rowwise::from_tensors("l", |n| (n != "l.SCB").then(|| map[n].shallow_clone()))
                .unwrap_err();
        assert!(err.to_string().contains("l.SCB"), "{err}");
        let err = Int8Rowwise::from_tensors("l", |n| {
            Some(if n == "l.SCB" {
                Tensor::zeros([5], (Kind::Float, tch::Device::Cpu))
            } else {
                map.get(n)?.shallow_clone()
            })
        })
        .unwrap_err();
        assert!(matches!(err, QuantError::Shape { .. }), "{err}");
        let err = Int8Rowwise::from_tensors("l", |n| {
            Some(if n == "l.weight" {
                map[n].to_kind(Kind::Float)
            } else {
                map.get(n)?.shallow_clone()
            })
        })
        .unwrap_err();
        assert!(matches!(err, QuantError::Dtype { .. }), "{err}");
    }
}
