//! Block-wise 8-bit quantization over bitsandbytes' dynamic maps (Dettmers et al. 2022), used
//! for 8-bit optimizer state and for the double quantization of 4-bit absmax values.
//!
//! Each block of `block_size` consecutive values keeps its absmax (f32); each value becomes the
//! index of the map entry nearest to `value / absmax`. Unlike bitsandbytes' CPU path (an
//! approximate 65536-entry grid), the nearest code here is exact, with ties to the even index
//! as on CUDA.

use crate::codebook::{self, Nearest, Tie};
use rayon::prelude::*;

/// Which dynamic map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DynamicMap {
    /// Signed map, for values of both signs.
    Signed,
    /// Unsigned map, for non-negative values (Adam's second moment).
    Unsigned,
}

impl DynamicMap {
    /// The 256 codes, sorted.
    pub fn codes(self) -> [f32; 256] {
        match self {
            DynamicMap::Signed => codebook::dynamic_signed(),
            DynamicMap::Unsigned => codebook::dynamic_unsigned(),
        }
    }
}

/// Values quantized block-wise to 8-bit codes.
#[derive(Debug, Clone, PartialEq)]
pub struct Blockwise8 {
    /// One code per value.
    pub codes: Vec<u8>,
    /// Per-block absmax.
    pub absmax: Vec<f32>,
    /// Values per block.
    pub block_size: usize,
    /// The map the codes index.
    pub map: DynamicMap,
}

impl Blockwise8 {
    /// Quantizes `x` in blocks of `block_size` (the last block may be partial and has its own
    /// absmax). An all-zero block stores absmax 0 and the code of 0.
    pub fn quantize(x: &[f32], block_size: usize, map: DynamicMap) -> Self {
        assert!(block_size > 0, "block size must be positive");
        let codes_f = map.codes();
        let nearest = Nearest::new(&codes_f, Tie::EvenIndex);
        let mut codes = vec![0u8; x.len()];
        let absmax: Vec<f32> = codes
            .par_chunks_mut(block_size)
            .zip(x.par_chunks(block_size))
            .map(|(out, block)| {
                let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let div = amax.max(f32::MIN_POSITIVE);
                for (o, &v) in out.iter_mut().zip(block) {
                    *o = nearest.index((v / div).clamp(-1.0, 1.0)) as u8;
                }
                amax
            })
            .collect();
        Self {
            codes,
            absmax,
            block_size,
            map,
        }
    }

    /// The values back: `map[code] * absmax[block]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let codes_f = self.map.codes();
        let mut out = vec![0f32; self.codes.len()];
        out.par_chunks_mut(self.block_size)
            .zip(self.codes.par_chunks(self.block_size))
            .zip(self.absmax.par_iter())
            .for_each(|((o, c), &a)| {
                for (o, &c) in o.iter_mut().zip(c) {
                    *o = codes_f[c as usize] * a;
                }
            });
        out
    }

    /// Bytes of codes and absmax values.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.absmax.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_error_is_small_and_zero_blocks_stay_zero() {
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let q = Blockwise8::quantize(&x, 256, DynamicMap::Signed);
        assert_eq!(q.absmax.len(), 4);
        let y = q.dequantize();
        let err = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err < 0.02, "max error {err}");
        let z = Blockwise8::quantize(&[0.0; 300], 256, DynamicMap::Unsigned);
        assert!(z.dequantize().iter().all(|&v| v == 0.0));
        assert_eq!(z.absmax, vec![0.0, 0.0]);
    }
}
