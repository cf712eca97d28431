//! Block-wise 8-bit quantization over bitsandbytes' dynamic maps (Dettmers et al. 2022), used
//! for 8-bit optimizer state and for the double quantization of 4-bit absmax values.
//!
//! Each block of `block_size` consecutive values keeps its absmax (f32); each value becomes the
//! index of the map entry nearest to `value / absmax`. Unlike bitsandbytes' CPU path (an
//! approximate 65536-entry grid), the nearest code here is exact, with ties to the even index
//! as on CUDA.

use crate::codebook;
use rayon::prelude::*;
use std::sync::OnceLock;

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

    /// The map's nearest-code search (built once per map).
    pub fn lookup(self) -> &'static Lookup {
        static SIGNED: OnceLock<Lookup> = OnceLock::new();
        static UNSIGNED: OnceLock<Lookup> = OnceLock::new();
        let cell = match self {
            DynamicMap::Signed => &SIGNED,
            DynamicMap::Unsigned => &UNSIGNED,
        };
        cell.get_or_init(|| Lookup::new(self.codes()))
    }
}

/// Exact nearest-code search over a 256-entry map on [-1, 1], with ties to the even index (the
/// same answers as [`codebook::Nearest`] with [`codebook::Tie::EvenIndex`], several times faster).
///
/// Values are binned by the top bits of their f32 pattern, so bins are narrow where the dynamic
/// map's codes are dense (near 0) and wide where they are sparse: each bin stores how many code
/// midpoints lie below its lowest value, and a search scans up from there, at most a step or
/// two.
#[derive(Debug, Clone)]
pub struct Lookup {
    codes: [f32; 256],
    mids: [f32; 255],
    /// Per bin: the number of midpoints below the bin's lowest value.
    start: Vec<u8>,
}

/// Bits of the f32 pattern dropped to form a bin (7 mantissa bits kept).
const BIN_SHIFT: u32 = 16;
/// Bins per sign: magnitudes 0 ..= 1.0.
const HALF_BINS: usize = (1.0f32.to_bits() >> BIN_SHIFT) as usize + 1;

impl Lookup {
    fn new(codes: [f32; 256]) -> Self {
        let mut mids = [0f32; 255];
        for (m, w) in mids.iter_mut().zip(codes.windows(2)) {
            *m = (w[0] + w[1]) * 0.5;
        }
        let below = |x: f32| mids.partition_point(|&m| m < x) as u8;
        let start = (0..2 * HALF_BINS)
            .map(|b| {
                let lowest = if b < HALF_BINS {
                    // Negative bin of magnitude index q: its most negative value.
                    let q = (HALF_BINS - 1 - b) as u32;
                    -f32::from_bits(((q + 1) << BIN_SHIFT) - 1).min(1.0)
                } else {
                    f32::from_bits(((b - HALF_BINS) as u32) << BIN_SHIFT)
                };
                below(lowest)
            })
            .collect();
        Self { codes, mids, start }
    }

    /// The map's values.
    pub fn codes(&self) -> &[f32; 256] {
        &self.codes
    }

    /// Index of the code nearest to `x` in [-1, 1] (ties to the even index; NaN gives 0).
    #[inline]
    pub fn index(&self, x: f32) -> u8 {
        if !(-1.0..=1.0).contains(&x) {
            return if x > 1.0 { 255 } else { 0 };
        }
        let bits = x.to_bits();
        let q = ((bits & 0x7fff_ffff) >> BIN_SHIFT) as usize;
        let bin = if bits >> 31 == 1 {
            HALF_BINS - 1 - q
        } else {
            HALF_BINS + q
        };
        let mut i = self.start[bin] as usize;
        while i < 255 && self.mids[i] < x {
            i += 1;
        }
        if i < 255 && self.mids[i] == x && i % 2 == 1 {
            i += 1;
        }
        i as u8
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
        let nearest = map.lookup();
        let mut codes = vec![0u8; x.len()];
        let absmax: Vec<f32> = codes
            .par_chunks_mut(block_size)
            .zip(x.par_chunks(block_size))
            .map(|(out, block)| {
                let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let div = amax.max(f32::MIN_POSITIVE);
                for (o, &v) in out.iter_mut().zip(block) {
                    *o = nearest.index((v / div).clamp(-1.0, 1.0));
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
        let codes_f = self.map.lookup().codes();
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
    use crate::codebook::{Nearest, Tie};

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

    #[test]
    fn lookup_agrees_with_the_exact_search() {
        for map in [DynamicMap::Signed, DynamicMap::Unsigned] {
            let codes = map.codes();
            let exact = Nearest::new(&codes, Tie::EvenIndex);
            let fast = map.lookup();
            // Every midpoint (ties) and its neighbours, every code, and a dense sweep
            // (uniform and log-spaced, both signs).
            let mut xs: Vec<f32> = vec![0.0, -0.0, 1.0, -1.0, f32::MIN_POSITIVE, 1e-40];
            for w in codes.windows(2) {
                let m = (w[0] + w[1]) * 0.5;
                xs.extend([m, m.next_up(), m.next_down(), w[0], w[1]]);
            }
            for i in 0..=200_000 {
                let u = i as f32 / 100_000.0 - 1.0;
                let l = 10f32.powf(-9.0 * i as f32 / 200_000.0);
                xs.extend([u, l, -l]);
            }
            for x in xs.into_iter().filter(|x| (-1.0..=1.0).contains(x)) {
                assert_eq!(
                    fast.index(x) as usize,
                    exact.index(x),
                    "{map:?}: x = {x:e} ({:#x})",
                    x.to_bits()
                );
            }
            assert_eq!(fast.index(f32::NAN), 0);
        }
    }
}
