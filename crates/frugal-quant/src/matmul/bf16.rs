//! bf16 helpers shared by the bf16-compute products: rounding f32 to bf16 (round to nearest,
//! ties to even), widening back, and the CPU check for the AVX512-BF16 kernels.

/// The bf16 bits of `v` rounded to nearest, ties to even (overflow goes to ±infinity; a NaN
/// stays a quiet NaN).
pub(crate) fn to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) as u16) | 0x40;
    }
    // Adding 0x7FFF plus the lowest kept bit carries into the kept bits exactly when the
    // dropped half is above one half, or equal to it with an odd kept part.
    (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of the bf16 bits `h` (exact).
pub(crate) fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `v` rounded to the nearest bf16 value (ties to even), as f32.
#[cfg(test)]
pub(crate) fn round_bf16(v: f32) -> f32 {
    from_bf16(to_bf16(v))
}

/// Whether this CPU runs the bf16 kernels (AVX-512 F, BW and BF16, plus AVX2 and FMA).
pub fn bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::avx512_available()
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The 512-bit integer vector `v` seen as 32 bf16 values (the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn as_bh(v: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512bh {
    // SAFETY: both are plain 64-byte SIMD vectors; every bit pattern is a valid value of each.
    unsafe { std::mem::transmute::<std::arch::x86_64::__m512i, std::arch::x86_64::__m512bh>(v) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ties go to even, halfway-plus rounds up, overflow to infinity, NaN stays NaN, and every
    /// bf16 value round-trips.
    #[test]
    fn rounding() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even gives 1.
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 1.0);
        // 1 + 3 · 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: rounds to 1 + 2^-6.
        assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert_eq!(
            round_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)),
            1.0 + 2f32.powi(-7)
        );
        assert_eq!(round_bf16(-1.0 - 2f32.powi(-8)), -1.0);
        assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
        assert!(round_bf16(f32::NAN).is_nan());
        for h in 0..=u16::MAX {
            let v = from_bf16(h);
            if !v.is_nan() {
                assert_eq!(to_bf16(v), h, "{h:#x}");
            }
        }
    }
}
