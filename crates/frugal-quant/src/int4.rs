//! Group-wise asymmetric 4-bit weights in the GPTQ (AutoGPTQ / GPTQModel) layout, format v2.
//!
//! Keys for a layer `P` (see `docs/formats.md`, "int4 (GPTQ layout)"): `P.qweight` int32
//! (in/8, out), `P.qzeros` int32 (groups, out/8), `P.scales` f16 (groups, out), `P.g_idx` int32
//! (in,). Nibbles are little-end first: q[i, o] = (qweight[i/8, o] >> 4*(i%8)) & 0xF and
//! z[g, o] = (qzeros[g, o/8] >> 4*(o%8)) & 0xF; W[o, i] = scale[g_idx[i], o] * (q[i, o] -
//! z[g_idx[i], o]). Format v2 stores the zero itself (v1 stores zero - 1).
//!
//! The float-zero variant (QA-LoRA after merge) replaces `P.qzeros` by `P.zeros` f32
//! (groups, out) and adds a JSON description `P.quant_state.frugal__gptq_float_zero`.

use crate::int8::{check_kind, check_len, check_shape, fetch, round_to_f16, to_vec};
use crate::{QuantError, Result};
use tch::{Kind, Tensor};

/// Name of the float-zero format in its JSON description.
pub const FLOAT_ZERO_FORMAT: &str = "gptq_float_zero";

/// A 4-bit weight of shape (rows = out, cols = in) in the GPTQ layout, format v2.
#[derive(Debug, Clone, PartialEq)]
pub struct Int4Gptq {
    /// Output features (a multiple of 8).
    pub rows: usize,
    /// Input features (a multiple of 8).
    pub cols: usize,
    /// Input columns per group; equals `cols` for a single group (GPTQ's `-1`).
    pub group_size: usize,
    /// Codes, eight per word along the input dimension, row-major (cols/8, rows).
    pub qweight: Vec<i32>,
    /// Integer zeros, eight per word along the output dimension, row-major (groups, rows/8).
    /// Ignored (and may be empty) when `zeros_f32` is set.
    pub qzeros: Vec<i32>,
    /// Scales, row-major (groups, rows), each exactly representable in f16.
    pub scales: Vec<f32>,
    /// Group of each input column, length `cols` (i / group_size without act-order).
    pub g_idx: Vec<i32>,
    /// Float zero points, row-major (groups, rows), used instead of `qzeros` when set
    /// (QA-LoRA merged weights).
    pub zeros_f32: Option<Vec<f32>>,
}

impl Int4Gptq {
    /// Quantizes the row-major weight `w` of shape (rows = out, cols = in) with groups of
    /// `group_size` consecutive input columns.
    ///
    /// `group_size` is 32, 64 or 128, or `cols` for one group per row (GPTQ's `-1`). Errors
    /// ([`QuantError::BadSize`] / [`QuantError::Shape`]) for another group size, or when `cols`
    /// or `rows` is not a multiple of 8, or `cols` not a multiple of `group_size`.
    ///
    /// Per (group, output row), as GPTQ's quantizer: the range [min, max] is widened to hold 0
    /// (an all-zero group uses [-1, 1]); scale = (max - min) / 15, rounded to f16 (ties to
    /// even; a scale that rounds to 0 becomes 2^-24); zero = clamp(round(-min / scale), 0, 15);
    /// q = clamp(round(w / scale) + zero, 0, 15), all in f32 with round half to even (as
    /// `torch.round`). Codes are computed with the stored f16 scale.
    pub fn quantize(w: &[f32], rows: usize, cols: usize, group_size: usize) -> Result<Self> {
        check_len(w, rows, cols)?;
        if !matches!(group_size, 32 | 64 | 128) && group_size != cols {
            return Err(QuantError::BadSize {
                what: "group_size",
                got: group_size,
                allowed: "32, 64, 128, or the number of input columns (one group)",
            });
        }
        let shape = vec![rows as i64, cols as i64];
        let bad = |reason: &str| QuantError::Shape {
            name: "weight".into(),
            shape: shape.clone(),
            reason: reason.to_string(),
        };
        if cols % 8 != 0 {
            return Err(bad("has in (cols) not a multiple of 8"));
        }
        if rows % 8 != 0 {
            return Err(bad("has out (rows) not a multiple of 8"));
        }
        if cols % group_size != 0 {
            return Err(bad(&format!(
                "has in not a multiple of group_size {group_size}"
            )));
        }
        if let Some(x) = w.iter().find(|x| !x.is_finite()) {
            return Err(QuantError::Inconsistent {
                name: "weight".into(),
                reason: format!("holds the non-finite value {x}"),
            });
        }
        let groups = cols / group_size;
        let mut qweight = vec![0u32; cols / 8 * rows];
        let mut qzeros = vec![0u32; groups * rows / 8];
        let mut scales = vec![0f32; groups * rows];
        for o in 0..rows {
            for g in 0..groups {
                let vals = &w[o * cols + g * group_size..o * cols + (g + 1) * group_size];
                let mut lo = vals.iter().copied().fold(0f32, f32::min);
                let mut hi = vals.iter().copied().fold(0f32, f32::max);
                if lo == 0.0 && hi == 0.0 {
                    lo = -1.0;
                    hi = 1.0;
                }
                let mut scale = round_to_f16((hi - lo) / 15.0);
                if scale == 0.0 {
                    scale = f32::powi(2.0, -24);
                }
                if scale.is_infinite() {
                    return Err(QuantError::Inconsistent {
                        name: "weight".into(),
                        reason: format!("row {o} group {g}: range exceeds what an f16 scale holds"),
                    });
                }
                let zero = (-lo / scale).round_ties_even().clamp(0.0, 15.0);
                scales[g * rows + o] = scale;
                qzeros[g * (rows / 8) + o / 8] |= (zero as u32) << (4 * (o % 8));
                for (k, &x) in vals.iter().enumerate() {
                    let i = g * group_size + k;
                    let q = ((x / scale).round_ties_even() + zero).clamp(0.0, 15.0) as u32;
                    qweight[(i / 8) * rows + o] |= q << (4 * (i % 8));
                }
            }
        }
        Ok(Self {
            rows,
            cols,
            group_size,
            qweight: qweight.into_iter().map(|x| x as i32).collect(),
            qzeros: qzeros.into_iter().map(|x| x as i32).collect(),
            scales,
            g_idx: (0..cols).map(|i| (i / group_size) as i32).collect(),
            zeros_f32: None,
        })
    }

    /// Number of groups (rows of `scales`).
    pub fn groups(&self) -> usize {
        self.scales.len() / self.rows
    }

    /// The group size to write in a GPTQ config: -1 for a single group that is not 32, 64 or
    /// 128 columns wide, else `group_size`.
    pub fn gptq_group_size(&self) -> i64 {
        if self.groups() == 1 && !matches!(self.group_size, 32 | 64 | 128) {
            -1
        } else {
            self.group_size as i64
        }
    }

    /// The code q[i, o] (0..=15) of input column `i`, output row `o`.
    pub fn code(&self, i: usize, o: usize) -> u8 {
        ((self.qweight[(i / 8) * self.rows + o] as u32 >> (4 * (i % 8))) & 0xF) as u8
    }

    /// The zero point of group `g`, output row `o` (float zeros when set).
    pub fn zero(&self, g: usize, o: usize) -> f32 {
        match &self.zeros_f32 {
            Some(z) => z[g * self.rows + o],
            None => {
                ((self.qzeros[g * (self.rows / 8) + o / 8] as u32 >> (4 * (o % 8))) & 0xF) as f32
            }
        }
    }

    /// The weight back, row-major (rows = out, cols = in):
    /// W[o, i] = scale[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o]) in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        use rayon::prelude::*;
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols.max(1))
            .enumerate()
            .for_each(|(o, row)| {
                for (i, w) in row.iter_mut().enumerate() {
                    let g = self.g_idx[i] as usize;
                    let s = self.scales[g * self.rows + o];
                    *w = s * (self.code(i, o) as f32 - self.zero(g, o));
                }
            });
        out
    }

    /// Storage per weight in bits: 4 for the code plus the zeros (4 bits, or 32 for float
    /// zeros), f16 scales and int32 `g_idx`, spread over all weights.
    pub fn bits_per_param(&self) -> f64 {
        let n = (self.rows * self.cols) as f64;
        let per_group =
            self.rows as f64 * (16.0 + if self.zeros_f32.is_some() { 32.0 } else { 4.0 });
        (4.0 * n + per_group * self.groups() as f64 + 32.0 * self.cols as f64) / n
    }

    /// The GPTQ tensors for layer `prefix`: `prefix.qweight` int32 (in/8, out),
    /// `prefix.qzeros` int32 (groups, out/8) (format v2), `prefix.scales` f16 (groups, out),
    /// `prefix.g_idx` int32 (in,). With float zeros, `prefix.zeros` f32 (groups, out) and the
    /// JSON `prefix.quant_state.frugal__gptq_float_zero` (uint8) replace `prefix.qzeros`.
    pub fn to_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let (r, c, g) = (self.rows as i64, self.cols as i64, self.groups() as i64);
        let mut out = vec![
            (
                format!("{prefix}.qweight"),
                Tensor::from_slice(&self.qweight).reshape([c / 8, r]),
            ),
            (
                format!("{prefix}.scales"),
                Tensor::from_slice(&self.scales)
                    .reshape([g, r])
                    .to_kind(Kind::Half),
            ),
            (format!("{prefix}.g_idx"), Tensor::from_slice(&self.g_idx)),
        ];
        match &self.zeros_f32 {
            None => out.push((
                format!("{prefix}.qzeros"),
                Tensor::from_slice(&self.qzeros).reshape([g, r / 8]),
            )),
            Some(z) => {
                out.push((
                    format!("{prefix}.zeros"),
                    Tensor::from_slice(z).reshape([g, r]),
                ));
                let json = serde_json::json!({
                    "format": FLOAT_ZERO_FORMAT,
                    "shape": [self.rows, self.cols],
                    "dtype": "float32",
                    "group_size": self.group_size,
                    "bits": 4,
                });
                out.push((
                    format!("{prefix}.quant_state.frugal__{FLOAT_ZERO_FORMAT}"),
                    Tensor::from_slice(json.to_string().as_bytes()),
                ));
            }
        }
        out
    }

    /// Reads the tensors of [`Int4Gptq::to_tensors`] through `get`. `v1` says the integer
    /// zeros are in format v1 (stored zero - 1): 1 is added on reading (a v1 zero of 16
    /// cannot be held in v2 and is an error). `prefix.zeros` (f16 or f32) is read as float
    /// zeros when `prefix.qzeros` is absent. `scales` may be f16 or f32 (rounded to f16).
    pub fn from_tensors(
        prefix: &str,
        v1: bool,
        get: impl Fn(&str) -> Option<Tensor>,
    ) -> Result<Self> {
        let qn = format!("{prefix}.qweight");
        let qw = fetch(&get, &qn)?;
        check_kind(&qw, &qn, &[Kind::Int], "int32")?;
        let shape = qw.size();
        if shape.len() != 2 {
            return Err(QuantError::Shape {
                name: qn,
                shape,
                reason: "is not 2-D (in/8, out)".into(),
            });
        }
        let (cols, rows) = (shape[0] * 8, shape[1]);
        let sn = format!("{prefix}.scales");
        let sc = fetch(&get, &sn)?;
        check_kind(&sc, &sn, &[Kind::Half, Kind::Float], "float16 or float32")?;
        let ss = sc.size();
        if ss.len() != 2 || ss[1] != rows || ss[0] < 1 {
            return Err(QuantError::Shape {
                name: sn,
                shape: ss,
                reason: format!("is not (groups, {rows})"),
            });
        }
        let groups = ss[0];
        let gn = format!("{prefix}.g_idx");
        let gi = fetch(&get, &gn)?;
        check_kind(&gi, &gn, &[Kind::Int, Kind::Int64], "int32")?;
        check_shape(&gi, &gn, &[cols])?;
        let g_idx: Vec<i32> = to_vec(&gi.to_kind(Kind::Int))?;
        if let Some(bad) = g_idx.iter().find(|&&g| g < 0 || g as i64 >= groups) {
            return Err(QuantError::Inconsistent {
                name: gn,
                reason: format!("group index {bad} outside 0..{groups}"),
            });
        }
        let zn = format!("{prefix}.qzeros");
        let (qzeros, zeros_f32) = match get(&zn) {
            Some(z) => {
                let z = z.to_device(tch::Device::Cpu).contiguous();
                check_kind(&z, &zn, &[Kind::Int], "int32")?;
                if rows % 8 != 0 {
                    return Err(QuantError::Shape {
                        name: qn,
                        shape: vec![cols / 8, rows],
                        reason: "has out not a multiple of 8".into(),
                    });
                }
                check_shape(&z, &zn, &[groups, rows / 8])?;
                let mut words: Vec<i32> = to_vec(&z)?;
                if v1 {
                    for w in &mut words {
                        let mut out = 0u32;
                        for k in 0..8 {
                            let nib = ((*w as u32 >> (4 * k)) & 0xF) + 1;
                            if nib > 15 {
                                return Err(QuantError::Inconsistent {
                                    name: zn,
                                    reason: "a v1 zero of 16 cannot be held in format v2".into(),
                                });
                            }
                            out |= nib << (4 * k);
                        }
                        *w = out as i32;
                    }
                }
                (words, None)
            }
            None => {
                let fzn = format!("{prefix}.zeros");
                let z = fetch(&get, &fzn).map_err(|_| QuantError::Inconsistent {
                    name: zn.clone(),
                    reason: format!("neither {zn} nor {fzn} is present"),
                })?;
                check_kind(&z, &fzn, &[Kind::Half, Kind::Float], "float16 or float32")?;
                check_shape(&z, &fzn, &[groups, rows])?;
                (Vec::new(), Some(to_vec::<f32>(&z.to_kind(Kind::Float))?))
            }
        };
        let scales: Vec<f32> = to_vec::<f32>(&sc.to_kind(Kind::Float))?
            .into_iter()
            .map(round_to_f16)
            .collect();
        let (rows, cols, groups) = (rows as usize, cols as usize, groups as usize);
        Ok(Self {
            rows,
            cols,
            group_size: cols.div_ceil(groups),
            qweight: to_vec(&qw)?,
            qzeros,
            scales,
            g_idx,
            zeros_f32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn weight(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| ((i as f32) * 0.618).sin() * 0.1)
            .collect()
    }

    /// Group sizes other than 32/64/128/in and shapes that do not divide are refused with
    /// the matching error.
    #[test]
    fn bad_sizes() {
        let w = weight(16, 64);
        assert!(matches!(
            Int4Gptq::quantize(&w, 16, 64, 16),
            Err(QuantError::BadSize { .. })
        ));
        assert!(matches!(
            Int4Gptq::quantize(&w, 16, 64, 128),
            Err(QuantError::Shape { .. })
        ));
        let w = weight(12, 64);
        assert!(matches!(
            Int4Gptq::quantize(&w, 12, 64, 32),
            Err(QuantError::Shape { .. })
        ));
        let w = weight(8, 100);
        assert!(matches!(
            Int4Gptq::quantize(&w, 8, 100, 100),
            Err(QuantError::Shape { .. })
        ));
        assert!(Int4Gptq::quantize(&[f32::NAN; 64 * 8], 8, 64, 64).is_err());
    }

    /// Per group, the dequantized weight is within half a step (scale / 2, plus the f16
    /// rounding of the scale over 15 steps) of the input,
    /// scales are f16 values, and a single group (group_size = in) reports -1 to GPTQ.
    #[test]
    fn error_bound_and_single_group() {
        let w = weight(16, 96);
        let q = Int4Gptq::quantize(&w, 16, 96, 96).unwrap();
        assert_eq!(q.groups(), 1);
        assert_eq!(q.gptq_group_size(), -1);
        let d = q.dequantize();
        for o in 0..16 {
            let s = q.scales[o];
            assert_eq!(round_to_f16(s), s);
            for i in 0..96 {
                // Half a step, plus what rounding the scale to f16 (2^-11 relative) moves the
                // extremes of the grid (15 steps).
                assert!((w[o * 96 + i] - d[o * 96 + i]).abs() <= s * (0.5 + 15.0 / 2048.0) + 1e-6);
            }
        }
        let q = Int4Gptq::quantize(&weight(8, 128), 8, 128, 32).unwrap();
        assert_eq!(q.groups(), 4);
        assert_eq!(q.gptq_group_size(), 32);
        let expect = (4.0 * 1024.0 + 4.0 * 8.0 * 20.0 + 32.0 * 128.0) / 1024.0;
        assert!((q.bits_per_param() - expect).abs() < 1e-12);
    }

    /// Packing follows FORMATS.md: nibble i % 8 of qweight[i / 8, o] is q[i, o], nibble o % 8
    /// of qzeros[g, o / 8] is z[g, o]; an all-zero weight packs zero 8 (0x88888888, v2).
    #[test]
    fn packing_order() {
        let q = Int4Gptq::quantize(&vec![0.0; 8 * 32], 8, 32, 32).unwrap();
        assert!(q.qzeros.iter().all(|&z| z as u32 == 0x8888_8888));
        assert!(q.qweight.iter().all(|&z| z as u32 == 0x8888_8888));
        // One row with an increasing ramp 0..=15 in its first 16 columns.
        let mut w = vec![0f32; 8 * 32];
        for (i, x) in w.iter_mut().take(16).enumerate() {
            *x = i as f32;
        }
        let q = Int4Gptq::quantize(&w, 8, 32, 32).unwrap();
        assert_eq!(q.scales[0], 1.0);
        assert_eq!(q.zero(0, 0), 0.0);
        assert_eq!(q.qweight[0] as u32, 0x7654_3210);
        assert_eq!(q.qweight[8] as u32, 0xFEDC_BA98);
        assert_eq!(q.dequantize()[..16], w[..16]);
    }

    /// to_tensors then from_tensors gives back the same weight, for integer zeros (v2 keys,
    /// dtypes, shapes), for v1 reading (zeros + 1) and for float zeros.
    #[test]
    fn tensors_round_trip() {
        let w = weight(16, 64);
        let q = Int4Gptq::quantize(&w, 16, 64, 32).unwrap();
        let map: HashMap<String, Tensor> = q.to_tensors("p").into_iter().collect();
        assert_eq!(map["p.qweight"].size(), vec![8, 16]);
        assert_eq!(map["p.qweight"].kind(), Kind::Int);
        assert_eq!(map["p.qzeros"].size(), vec![2, 2]);
        assert_eq!(map["p.scales"].kind(), Kind::Half);
        assert_eq!(map["p.scales"].size(), vec![2, 16]);
        assert_eq!(map["p.g_idx"].kind(), Kind::Int);
        let get = |n: &str| map.get(n).map(|t| t.shallow_clone());
        assert_eq!(Int4Gptq::from_tensors("p", false, get).unwrap(), q);

        // v1 stores zero - 1.
        let v1 = Tensor::from_slice(
            &q.qzeros
                .iter()
                .map(|&z| {
                    let mut o = 0u32;
                    for k in 0..8 {
                        o |= (((z as u32 >> (4 * k)) & 0xF) - 1) << (4 * k);
                    }
                    o as i32
                })
                .collect::<Vec<_>>(),
        )
        .reshape([2, 2]);
        let back = Int4Gptq::from_tensors("p", true, |n| {
            if n == "p.qzeros" {
                Some(v1.shallow_clone())
            } else {
                get(n)
            }
        })
        .unwrap();
        assert_eq!(back, q);

        let mut f = q.clone();
        f.zeros_f32 = Some((0..32).map(|k| 7.5 + k as f32 * 0.01).collect());
        f.qzeros.clear();
        let fmap: HashMap<String, Tensor> = f.to_tensors("p").into_iter().collect();
        assert!(!fmap.contains_key("p.qzeros"));
        assert_eq!(fmap["p.zeros"].kind(), Kind::Float);
        assert!(fmap.contains_key("p.quant_state.frugal__gptq_float_zero"));
        let back =
            Int4Gptq::from_tensors("p", false, |n| fmap.get(n).map(|t| t.shallow_clone())).unwrap();
        assert_eq!(back, f);
        assert_eq!(back.dequantize(), f.dequantize());

        let err =
            Int4Gptq::from_tensors("p", false, |n| (n != "p.scales").then(|| get(n)).flatten())
                .unwrap_err();
        assert!(err.to_string().contains("p.scales"), "{err}");
        let err = Int4Gptq::from_tensors("p", false, |n| {
            if n == "p.g_idx" {
                Some(Tensor::from_slice(&[0i32; 63]))
            } else {
                get(n)
            }
        })
        .unwrap_err();
        assert!(matches!(err, QuantError::Shape { .. }), "{err}");
    }
}
