//! NF4 and FP4 (QLoRA, Dettmers et al. 2023): block-wise absmax 4-bit quantization with optional
//! double quantization of the absmax values, stored in bitsandbytes' Hugging Face layout so that
//! files go both ways between Frugal and bitsandbytes/transformers.
//!
//! Layout (see `docs/formats.md` and FORMATS.md): the weight is flattened row-major and cut into
//! blocks of `block_size` consecutive values (blocks cross rows; the last may be partial). Each
//! value becomes the index of the code nearest to `value / absmax(block)` (ties to the lower
//! code, as bitsandbytes' CPU quantizer); byte k holds code 2k in the high nibble and code 2k+1
//! in the low one. Double quantization subtracts the mean of the absmax values and quantizes the
//! rest with the signed 8-bit dynamic map in blocks of 256.

use crate::codebook::{self, Nearest, Tie};
use crate::dynamic::{Blockwise8, DynamicMap};
use crate::{QuantError, Result};
use rayon::prelude::*;
use tch::{Kind, Tensor};

/// NF4 or FP4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FourBitKind {
    /// NormalFloat 4: quantiles of a normal distribution.
    Nf4,
    /// 4-bit float (1 sign, 2 exponent, 1 mantissa bit; bitsandbytes' variant).
    Fp4,
}

impl FourBitKind {
    /// `"nf4"` or `"fp4"`.
    pub fn name(self) -> &'static str {
        match self {
            FourBitKind::Nf4 => "nf4",
            FourBitKind::Fp4 => "fp4",
        }
    }

    /// The 16 values by code index.
    pub fn codes(self) -> [f32; 16] {
        match self {
            FourBitKind::Nf4 => codebook::NF4,
            FourBitKind::Fp4 => codebook::fp4(),
        }
    }

    /// The code that stands for zero (pads an odd count).
    fn zero_code(self) -> u8 {
        match self {
            FourBitKind::Nf4 => 7,
            FourBitKind::Fp4 => 0,
        }
    }
}

/// How to quantize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FourBitConfig {
    /// NF4 or FP4.
    pub kind: FourBitKind,
    /// Values per absmax block: a power of two from 32 to 4096 (bitsandbytes' default 64).
    pub block_size: usize,
    /// Quantize the absmax values too (about 0.127 instead of 0.5 bits per parameter at 64).
    pub double_quant: bool,
}

impl Default for FourBitConfig {
    fn default() -> Self {
        Self {
            kind: FourBitKind::Nf4,
            block_size: 64,
            double_quant: false,
        }
    }
}

/// Block size of the double quantization (bitsandbytes' `nested_blocksize`).
pub const NESTED_BLOCK: usize = 256;

/// The per-block scales, plain or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    Plain(Vec<f32>),
    /// 8-bit codes over the signed dynamic map, per-256-block absmax, and the subtracted mean.
    Double {
        /// One code per block.
        codes: Vec<u8>,
        /// One f32 per 256 blocks.
        nested_absmax: Vec<f32>,
        /// The mean that was subtracted.
        offset: f32,
    },
}

/// A 4-bit quantized tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct FourBit {
    /// NF4 or FP4.
    pub kind: FourBitKind,
    /// The original shape.
    pub shape: Vec<i64>,
    /// The original dtype's name as torch spells it (`"float32"`, `"bfloat16"`, `"float16"`).
    pub dtype: String,
    /// Values per block.
    pub block_size: usize,
    /// Two codes per byte, first in the high nibble.
    pub packed: Vec<u8>,
    /// Per-block scales.
    pub absmax: Absmax,
}

fn check_block(block_size: usize) -> Result<()> {
    if block_size.is_power_of_two() && (32..=4096).contains(&block_size) {
        Ok(())
    } else {
        Err(QuantError::BadSize {
            what: "block_size",
            got: block_size,
            allowed: "a power of two from 32 to 4096",
        })
    }
}

impl FourBit {
    /// Quantizes `x` (row-major, of shape `shape`).
    pub fn quantize(x: &[f32], shape: &[i64], cfg: &FourBitConfig) -> Result<Self> {
        check_block(cfg.block_size)?;
        let numel: i64 = shape.iter().product();
        if numel as usize != x.len() || numel == 0 {
            return Err(QuantError::Shape {
                name: "input".into(),
                shape: shape.to_vec(),
                reason: format!("does not hold the {} values given", x.len()),
            });
        }
        let codes_f = cfg.kind.codes();
        let mut order: Vec<usize> = (0..16).collect();
        order.sort_by(|&a, &b| codes_f[a].total_cmp(&codes_f[b]));
        let sorted: Vec<f32> = order.iter().map(|&i| codes_f[i]).collect();
        let nearest = Nearest::new(&sorted, Tie::Lower);
        let bs = cfg.block_size;
        let n = x.len();
        let mut codes = vec![0u8; n];
        let absmax: Vec<f32> = codes
            .par_chunks_mut(bs)
            .zip(x.par_chunks(bs))
            .map(|(out, block)| {
                let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let div = amax.max(1e-38);
                let full = block.len() == bs;
                let recip = 1.0f32 / div;
                for (o, &v) in out.iter_mut().zip(block) {
                    // bitsandbytes multiplies by the reciprocal in full blocks, divides in the
                    // partial last one.
                    let s = if full { v * recip } else { v / div };
                    *o = order[nearest.index(s.clamp(-1.0, 1.0))] as u8;
                }
                amax
            })
            .collect();
        let mut packed = vec![0u8; n.div_ceil(2)];
        let zero = cfg.kind.zero_code();
        for (k, byte) in packed.iter_mut().enumerate() {
            let hi = codes[2 * k];
            let lo = codes.get(2 * k + 1).copied().unwrap_or(zero);
            *byte = (hi << 4) | lo;
        }
        let absmax = if cfg.double_quant {
            let offset =
                (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32;
            let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
            let q = Blockwise8::quantize(&centred, NESTED_BLOCK, DynamicMap::Signed);
            Absmax::Double {
                codes: q.codes,
                nested_absmax: q.absmax,
                offset,
            }
        } else {
            Absmax::Plain(absmax)
        };
        Ok(Self {
            kind: cfg.kind,
            shape: shape.to_vec(),
            dtype: "float32".into(),
            block_size: bs,
            packed,
            absmax,
        })
    }

    /// Number of values.
    pub fn numel(&self) -> usize {
        self.shape.iter().product::<i64>() as usize
    }

    /// Number of absmax blocks.
    pub fn num_blocks(&self) -> usize {
        self.numel().div_ceil(self.block_size)
    }

    /// The codes, one per value.
    pub fn codes(&self) -> Vec<u8> {
        let n = self.numel();
        let mut out = Vec::with_capacity(n + 1);
        for &b in &self.packed {
            out.push(b >> 4);
            out.push(b & 0xF);
        }
        out.truncate(n);
        out
    }

    /// The per-block absmax values (decoded when double-quantized).
    pub fn absmax_values(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(a) => a.clone(),
            Absmax::Double {
                codes,
                nested_absmax,
                offset,
            } => {
                let map = codebook::dynamic_signed();
                codes
                    .iter()
                    .enumerate()
                    .map(|(b, &c)| map[c as usize] * nested_absmax[b / NESTED_BLOCK] + offset)
                    .collect()
            }
        }
    }

    /// The values back, row-major: `code_value * absmax(block)` in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let codes_f = self.kind.codes();
        let absmax = self.absmax_values();
        let codes = self.codes();
        let mut out = vec![0f32; codes.len()];
        out.par_chunks_mut(self.block_size)
            .zip(codes.par_chunks(self.block_size))
            .zip(absmax.par_iter())
            .for_each(|((o, c), &a)| {
                for (o, &c) in o.iter_mut().zip(c) {
                    *o = codes_f[c as usize] * a;
                }
            });
        out
    }

    /// Bytes stored: codes, absmax (and nested absmax and offset), not the constant code books.
    pub fn bytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Absmax::Plain(a) => 4 * a.len(),
                Absmax::Double {
                    codes,
                    nested_absmax,
                    ..
                } => codes.len() + 4 * nested_absmax.len() + 4,
            }
    }

    /// Bits per parameter as stored ([`FourBit::bytes`] * 8 / values).
    pub fn bits_per_param(&self) -> f64 {
        self.bytes() as f64 * 8.0 / self.numel() as f64
    }

    /// The quant-state JSON, with bitsandbytes' field order.
    fn quant_state_json(&self) -> String {
        let shape: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        let mut s = format!(
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
            self.kind.name(),
            self.block_size,
            self.dtype,
            shape.join(", ")
        );
        if let Absmax::Double { offset, .. } = &self.absmax {
            s.push_str(&format!(
                ", \"nested_blocksize\": {NESTED_BLOCK}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                *offset as f64
            ));
        }
        s.push('}');
        s
    }

    /// The tensors bitsandbytes' Hugging Face serialization holds for weight `name`
    /// (`name`, `name.absmax`, `name.quant_map`, nested tensors, `name.quant_state.bitsandbytes__nf4`).
    pub fn to_tensors(&self, name: &str) -> Vec<(String, Tensor)> {
        let mut out = vec![
            (
                name.to_string(),
                Tensor::from_slice(&self.packed).reshape([self.packed.len() as i64, 1]),
            ),
            (
                format!("{name}.quant_map"),
                Tensor::from_slice(&self.kind.codes()),
            ),
        ];
        match &self.absmax {
            Absmax::Plain(a) => out.push((format!("{name}.absmax"), Tensor::from_slice(a))),
            Absmax::Double {
                codes,
                nested_absmax,
                ..
            } => {
                out.push((format!("{name}.absmax"), Tensor::from_slice(codes)));
                out.push((
                    format!("{name}.nested_absmax"),
                    Tensor::from_slice(nested_absmax),
                ));
                out.push((
                    format!("{name}.nested_quant_map"),
                    Tensor::from_slice(&codebook::dynamic_signed()),
                ));
            }
        }
        let json = self.quant_state_json();
        out.push((
            format!("{name}.quant_state.bitsandbytes__{}", self.kind.name()),
            Tensor::from_slice(json.as_bytes()),
        ));
        out
    }

    /// Reads weight `name` from bitsandbytes' serialization; `get` looks a tensor up by key.
    /// Every tensor is checked against the JSON description; an error names what disagrees.
    pub fn from_tensors(name: &str, get: impl Fn(&str) -> Option<Tensor>) -> Result<Self> {
        let bad = |reason: String| QuantError::Inconsistent {
            name: name.to_string(),
            reason,
        };
        let (kind, state) = [FourBitKind::Nf4, FourBitKind::Fp4]
            .into_iter()
            .find_map(|k| {
                get(&format!("{name}.quant_state.bitsandbytes__{}", k.name())).map(|t| (k, t))
            })
            .ok_or_else(|| bad("no quant_state.bitsandbytes__nf4 or __fp4 tensor".into()))?;
        let bytes = to_u8(&state)?;
        let json: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("quant_state is not JSON ({e})")))?;
        if json["quant_type"].as_str() != Some(kind.name()) {
            return Err(bad(format!(
                "quant_type {} under a __{} key",
                json["quant_type"],
                kind.name()
            )));
        }
        let block_size = json["blocksize"]
            .as_u64()
            .ok_or_else(|| bad("quant_state has no blocksize".into()))?
            as usize;
        check_block(block_size)?;
        let shape: Vec<i64> = json["shape"]
            .as_array()
            .ok_or_else(|| bad("quant_state has no shape".into()))?
            .iter()
            .map(|d| {
                d.as_i64()
                    .ok_or_else(|| bad("shape holds a non-integer".into()))
            })
            .collect::<Result<_>>()?;
        let dtype = json["dtype"].as_str().unwrap_or("float32").to_string();
        let numel = shape.iter().product::<i64>() as usize;
        let nb = numel.div_ceil(block_size);
        let packed = to_u8(&get(name).ok_or_else(|| bad("the packed weight is missing".into()))?)?;
        if packed.len() != numel.div_ceil(2) {
            return Err(bad(format!(
                "{} packed bytes for shape {shape:?} (expected {})",
                packed.len(),
                numel.div_ceil(2)
            )));
        }
        if let Some(map) = get(&format!("{name}.quant_map")) {
            if to_f32(&map)? != kind.codes() {
                return Err(bad(format!(
                    "quant_map is not the {} code book",
                    kind.name()
                )));
            }
        }
        let absmax_t =
            get(&format!("{name}.absmax")).ok_or_else(|| bad("absmax is missing".into()))?;
        let absmax = if json.get("nested_offset").is_some() {
            let codes = to_u8(&absmax_t)?;
            let nested = to_f32(
                &get(&format!("{name}.nested_absmax"))
                    .ok_or_else(|| bad("nested_absmax is missing".into()))?,
            )?;
            let nested_block = json["nested_blocksize"]
                .as_u64()
                .unwrap_or(NESTED_BLOCK as u64) as usize;
            if nested_block != NESTED_BLOCK {
                return Err(bad(format!(
                    "nested_blocksize {nested_block} (only {NESTED_BLOCK} is supported)"
                )));
            }
            if let Some(map) = get(&format!("{name}.nested_quant_map")) {
                if to_f32(&map)? != codebook::dynamic_signed() {
                    return Err(bad("nested_quant_map is not the signed dynamic map".into()));
                }
            }
            if codes.len() != nb || nested.len() != nb.div_ceil(NESTED_BLOCK) {
                return Err(bad(format!(
                    "{} absmax codes and {} nested absmax for {nb} blocks",
                    codes.len(),
                    nested.len()
                )));
            }
            let offset = json["nested_offset"]
                .as_f64()
                .ok_or_else(|| bad("nested_offset is not a number".into()))?
                as f32;
            Absmax::Double {
                codes,
                nested_absmax: nested,
                offset,
            }
        } else {
            let a = to_f32(&absmax_t)?;
            if a.len() != nb {
                return Err(bad(format!("{} absmax values for {nb} blocks", a.len())));
            }
            Absmax::Plain(a)
        };
        Ok(Self {
            kind,
            shape,
            dtype,
            block_size,
            packed,
            absmax,
        })
    }
}

fn to_u8(t: &Tensor) -> Result<Vec<u8>> {
    Ok(Vec::<u8>::try_from(t.flatten(0, -1).to_kind(Kind::Uint8))?)
}

fn to_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(t.flatten(0, -1).to_kind(Kind::Float))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_block_sizes_are_named() {
        let x = vec![0.5f32; 128];
        for bs in [0, 16, 48, 8192] {
            let cfg = FourBitConfig {
                block_size: bs,
                ..Default::default()
            };
            let err = FourBit::quantize(&x, &[128], &cfg).unwrap_err().to_string();
            assert!(
                err.contains("block_size") && err.contains(&bs.to_string()),
                "{err}"
            );
        }
        let err = FourBit::quantize(&x, &[3, 5], &FourBitConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("[3, 5]"), "{err}");
    }

    #[test]
    fn double_quant_stays_under_4_13_bits_at_block_64() {
        let x: Vec<f32> = (0..4096 * 64)
            .map(|i| ((i % 977) as f32 - 488.0) / 300.0)
            .collect();
        let cfg = FourBitConfig {
            double_quant: true,
            ..Default::default()
        };
        let q = FourBit::quantize(&x, &[4096, 64], &cfg).unwrap();
        assert!(q.bits_per_param() <= 4.13, "{}", q.bits_per_param());
        let plain = FourBit::quantize(&x, &[4096, 64], &FourBitConfig::default()).unwrap();
        assert!((plain.bits_per_param() - 4.5).abs() < 1e-9);
    }
}
