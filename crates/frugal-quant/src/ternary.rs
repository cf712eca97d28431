//! Ternary weights (BitNet b1.58 absmean): codes in {-1, 0, 1} with an f32 scale per tensor or
//! per group of output rows, packed four 2-bit codes per byte.
//!
//! Quantization: s = mean(|W|) over the scale's rows (accumulated in f64, then f32; clamped
//! to at least 1e-5), q = clamp(round(W / s), -1, 1) with round half to even as `torch.round` does
//! (W / s in f32). Packing: code q + 1 in 2 bits; element 4k + j of the row-major weight sits in
//! bits 2j..2j+1 of byte k (the lowest bits hold the first element); the last byte is padded
//! with code 1 (zero). Keys for a weight `NAME` (see `docs/formats.md`, "ternary"): `NAME`
//! uint8 (ceil(n/4),), `NAME.scale` f32 (rows / rows_per_scale,), and the JSON description
//! `NAME.quant_state.frugal__ternary` (UTF-8 bytes as uint8).

use crate::int8::{check_kind, check_len, check_shape, fetch, to_vec};
use crate::{QuantError, Result};
use tch::{Kind, Tensor};

/// Name of the format in its JSON description.
pub const FORMAT: &str = "ternary";

/// The smallest scale (BitNet's clamp), so an all-zero weight stays finite.
pub const MIN_SCALE: f32 = 1e-5;

/// A ternary weight of shape (rows = out, cols = in).
#[derive(Debug, Clone, PartialEq)]
pub struct Ternary {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Rows sharing one scale (`rows` for one scale per tensor); divides `rows`.
    pub rows_per_scale: usize,
    /// Packed codes q + 1, four per byte, first element in the lowest bits; ceil(n/4) bytes.
    pub packed: Vec<u8>,
    /// One scale per group of `rows_per_scale` rows.
    pub scales: Vec<f32>,
}

impl Ternary {
    /// Quantizes the row-major weight `w` of shape (rows, cols); `rows_per_scale` of `None`
    /// means one scale for the whole tensor.
    ///
    /// Errors when `w.len() != rows * cols`, a dimension is 0, or `rows_per_scale` is 0 or does
    /// not divide `rows`.
    pub fn quantize(
        w: &[f32],
        rows: usize,
        cols: usize,
        rows_per_scale: Option<usize>,
    ) -> Result<Self> {
        check_len(w, rows, cols)?;
        let rps = rows_per_scale.unwrap_or(rows);
        if rps == 0 || rows % rps != 0 {
            return Err(QuantError::BadSize {
                what: "rows_per_scale",
                got: rps,
                allowed: "a nonzero divisor of the number of rows",
            });
        }
        let per = rps * cols;
        let scales: Vec<f32> = w
            .chunks(per)
            .map(|c| {
                let s = (c.iter().map(|&x| x.abs() as f64).sum::<f64>() / c.len() as f64) as f32;
                s.max(MIN_SCALE)
            })
            .collect();
        let n = w.len();
        let mut packed = vec![0x55u8; n.div_ceil(4)];
        for (k, &x) in w.iter().enumerate() {
            let s = scales[k / per];
            let q = (x / s).round_ties_even().clamp(-1.0, 1.0) as i32;
            let byte = &mut packed[k / 4];
            let sh = 2 * (k % 4);
            *byte = (*byte & !(3 << sh)) | (((q + 1) as u8) << sh);
        }
        Ok(Self {
            rows,
            cols,
            rows_per_scale: rps,
            packed,
            scales,
        })
    }

    /// The codes unpacked, row-major, as -1, 0 or 1.
    pub fn codes(&self) -> Vec<i8> {
        (0..self.rows * self.cols)
            .map(|k| ((self.packed[k / 4] >> (2 * (k % 4))) & 3) as i8 - 1)
            .collect()
    }

    /// The weight back, row-major (rows, cols): q * s.
    pub fn dequantize(&self) -> Vec<f32> {
        let per = self.rows_per_scale * self.cols;
        self.codes()
            .into_iter()
            .enumerate()
            .map(|(k, q)| q as f32 * self.scales[k / per])
            .collect()
    }

    /// Storage per weight in bits: the packed bytes plus the f32 scales (about 2).
    pub fn bits_per_param(&self) -> f64 {
        (8.0 * self.packed.len() as f64 + 32.0 * self.scales.len() as f64)
            / (self.rows * self.cols) as f64
    }

    /// The tensors for weight `NAME = prefix.weight`: `NAME` uint8 (ceil(n/4),), `NAME.scale`
    /// f32 (rows / rows_per_scale,), `NAME.quant_state.frugal__ternary` JSON bytes (uint8) with
    /// `format`, `shape`, `dtype` ("float32"), `rows_per_scale`.
    pub fn to_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let json = serde_json::json!({
            "format": FORMAT,
            "shape": [self.rows, self.cols],
            "dtype": "float32",
            "rows_per_scale": self.rows_per_scale,
        });
        vec![
            (format!("{prefix}.weight"), Tensor::from_slice(&self.packed)),
            (
                format!("{prefix}.weight.scale"),
                Tensor::from_slice(&self.scales),
            ),
            (
                format!("{prefix}.weight.quant_state.frugal__{FORMAT}"),
                Tensor::from_slice(json.to_string().as_bytes()),
            ),
        ]
    }

    /// Reads the tensors of [`Ternary::to_tensors`] through `get`. The shape and
    /// `rows_per_scale` come from the JSON description; errors name a missing tensor, a
    /// malformed description, sizes that disagree with it, or a byte holding code 3.
    pub fn from_tensors(prefix: &str, get: impl Fn(&str) -> Option<Tensor>) -> Result<Self> {
        let jn = format!("{prefix}.weight.quant_state.frugal__{FORMAT}");
        let j = fetch(&get, &jn)?;
        check_kind(&j, &jn, &[Kind::Uint8], "uint8")?;
        let bytes: Vec<u8> = to_vec(&j)?;
        let bad = |reason: String| QuantError::Inconsistent {
            name: jn.clone(),
            reason,
        };
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("bad JSON: {e}")))?;
        if v["format"] != FORMAT {
            return Err(bad(format!("format {} is not \"{FORMAT}\"", v["format"])));
        }
        let shape: Vec<usize> = v["shape"]
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
            .filter(|s: &Vec<usize>| s.len() == 2 && s[0] > 0 && s[1] > 0)
            .ok_or_else(|| bad(format!("shape {} is not [rows, cols]", v["shape"])))?;
        let (rows, cols) = (shape[0], shape[1]);
        let rps = match &v["rows_per_scale"] {
            serde_json::Value::Null => rows,
            x => x
                .as_u64()
                .map(|x| x as usize)
                .filter(|&r| r > 0 && rows % r == 0)
                .ok_or_else(|| bad(format!("rows_per_scale {x} does not divide {rows}")))?,
        };
        let wn = format!("{prefix}.weight");
        let w = fetch(&get, &wn)?;
        check_kind(&w, &wn, &[Kind::Uint8], "uint8")?;
        check_shape(&w, &wn, &[(rows * cols).div_ceil(4) as i64])?;
        let sn = format!("{prefix}.weight.scale");
        let s = fetch(&get, &sn)?;
        check_kind(&s, &sn, &[Kind::Float], "float32")?;
        check_shape(&s, &sn, &[(rows / rps) as i64])?;
        let packed: Vec<u8> = to_vec(&w)?;
        if packed
            .iter()
            .any(|&b| (0..4).any(|j| (b >> (2 * j)) & 3 == 3))
        {
            return Err(QuantError::Inconsistent {
                name: wn,
                reason: "holds the invalid 2-bit code 3".into(),
            });
        }
        Ok(Self {
            rows,
            cols,
            rows_per_scale: rps,
            packed,
            scales: to_vec(&s)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Known values: s = mean |W|, codes round half to even then clamp, bit order puts the
    /// first element in the lowest bits, padding uses code 1.
    #[test]
    fn known_values() {
        // mean |w| = 1.0; w/s = 0.5 -> 0 (half to even), 1.5 -> 1 (clamped from 2), -2.0 -> -1.
        let w = [0.5f32, 1.5, -2.0, 0.0, 1.0];
        let t = Ternary::quantize(&w, 1, 5, None).unwrap();
        assert_eq!(t.scales, vec![1.0]);
        assert_eq!(t.codes(), vec![0, 1, -1, 0, 1]);
        // byte 0: codes+1 = 1, 2, 0, 1 -> 1 | 2<<2 | 0<<4 | 1<<6; byte 1: 2 then padding 1s.
        assert_eq!(t.packed, vec![0b01_00_10_01, 0b01_01_01_10]);
        assert_eq!(t.dequantize(), vec![0.0, 1.0, -1.0, 0.0, 1.0]);
        assert!((t.bits_per_param() - (16.0 + 32.0) / 5.0).abs() < 1e-12);
        let z = Ternary::quantize(&[0.0; 8], 2, 4, Some(1)).unwrap();
        assert_eq!(z.scales, vec![MIN_SCALE; 2]);
        assert_eq!(z.packed, vec![0x55, 0x55]);
    }

    /// rows_per_scale of 0 or one that does not divide rows, and wrong lengths, are refused.
    #[test]
    fn bad_sizes() {
        let w = [1.0f32; 12];
        assert!(matches!(
            Ternary::quantize(&w, 3, 4, Some(2)),
            Err(QuantError::BadSize { .. })
        ));
        assert!(Ternary::quantize(&w, 3, 4, Some(0)).is_err());
        assert!(matches!(
            Ternary::quantize(&w, 3, 5, None),
            Err(QuantError::Shape { .. })
        ));
    }

    /// to_tensors then from_tensors gives back the same weight; keys, dtypes and shapes are
    /// as documented; a bad description, a misshaped scale or a code 3 is an error.
    #[test]
    fn tensors_round_trip() {
        let w: Vec<f32> = (0..8 * 41).map(|i| ((i as f32) * 0.37).sin()).collect();
        let t = Ternary::quantize(&w, 8, 41, Some(2)).unwrap();
        let map: HashMap<String, Tensor> = t.to_tensors("m").into_iter().collect();
        assert_eq!(map["m.weight"].kind(), Kind::Uint8);
        assert_eq!(map["m.weight"].size(), vec![82]);
        assert_eq!(map["m.weight.scale"].size(), vec![4]);
        let get = |n: &str| map.get(n).map(|t| t.shallow_clone());
        assert_eq!(Ternary::from_tensors("m", get).unwrap(), t);

        let err = Ternary::from_tensors("m", |n| {
            if n == "m.weight.scale" {
                Some(Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)))
            } else {
                get(n)
            }
        })
        .unwrap_err();
        assert!(matches!(err, QuantError::Shape { .. }), "{err}");
        let err = Ternary::from_tensors("m", |n| {
            if n == "m.weight" {
                Some(Tensor::full([82], 0xff, (Kind::Uint8, tch::Device::Cpu)))
            } else {
                get(n)
            }
        })
        .unwrap_err();
        assert!(err.to_string().contains("code 3"), "{err}");
        let err = Ternary::from_tensors("m", |n| {
            if n.contains("quant_state") {
                Some(Tensor::from_slice(br#"{"format":"nf4"}"#.as_slice()))
            } else {
                get(n)
            }
        })
        .unwrap_err();
        assert!(err.to_string().contains("format"), "{err}");
        let err = Ternary::from_tensors("m", |n| (n != "m.weight").then(|| get(n)).flatten())
            .unwrap_err();
        assert!(err.to_string().contains("m.weight"), "{err}");
    }
}
