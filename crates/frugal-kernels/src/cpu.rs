//! Plain CPU references for every kernel in `kernels/quant.cu`, on slices, plus the packing
//! helpers that build their inputs. Tests compare each GPU kernel against these.

use crate::error::{KernelError, Result};

/// The 16 NF4 code values (QLoRA / bitsandbytes), indexed by the 4-bit code; the same table as
/// `FRUGAL_NF4_CODES` in `kernels/quant.cu`.
pub const NF4_CODES: [f32; 16] = frugal_quant::codebook::NF4;

fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(KernelError::Invalid(msg()))
    }
}

/// Packs 4-bit codes two per byte, the first element in the high nibble (an odd tail leaves the
/// low nibble 0). Codes above 15 are an error.
pub fn pack_nf4_codes(codes: &[u8]) -> Result<Vec<u8>> {
    check(codes.iter().all(|&c| c < 16), || {
        "NF4 codes must be < 16".into()
    })?;
    Ok(codes
        .chunks(2)
        .map(|pair| (pair[0] << 4) | pair.get(1).copied().unwrap_or(0))
        .collect())
}

/// The 4-bit code of flat element `i` of a packed NF4 buffer.
fn nf4_code(packed: &[u8], i: usize) -> usize {
    let byte = packed[i / 2];
    usize::from(if i % 2 == 1 { byte & 0xF } else { byte >> 4 })
}

fn check_nf4(packed: &[u8], absmax: &[f32], n: usize, block_size: usize) -> Result<()> {
    check(block_size > 0, || "block_size must be positive".into())?;
    check(packed.len() >= n.div_ceil(2), || {
        format!(
            "{n} NF4 elements need {} packed bytes, got {}",
            n.div_ceil(2),
            packed.len()
        )
    })?;
    check(absmax.len() >= n.div_ceil(block_size), || {
        format!(
            "{n} elements in blocks of {block_size} need {} absmax values, got {}",
            n.div_ceil(block_size),
            absmax.len()
        )
    })
}

/// Dequantizes `n` NF4 elements: `out[i] = NF4_CODES[code(i)] * absmax[i / block_size]`.
pub fn dequant_nf4(packed: &[u8], absmax: &[f32], n: usize, block_size: usize) -> Result<Vec<f32>> {
    check_nf4(packed, absmax, n, block_size)?;
    Ok((0..n)
        .map(|i| NF4_CODES[nf4_code(packed, i)] * absmax[i / block_size])
        .collect())
}

/// `y[o] = sum_i W[o, i] x[i]` for an NF4 weight W of shape `(out_features, x.len())`,
/// row-major, packed over the flat index as in [`dequant_nf4`]. Accumulates in f64.
pub fn gemv_nf4(
    packed: &[u8],
    absmax: &[f32],
    block_size: usize,
    x: &[f32],
    out_features: usize,
) -> Result<Vec<f32>> {
    let in_features = x.len();
    check_nf4(packed, absmax, out_features * in_features, block_size)?;
    Ok((0..out_features)
        .map(|o| {
            let row = o * in_features;
            let sum: f64 = x
                .iter()
                .enumerate()
                .map(|(i, &xi)| {
                    let w = NF4_CODES[nf4_code(packed, row + i)] * absmax[(row + i) / block_size];
                    f64::from(w) * f64::from(xi)
                })
                .sum();
            sum as f32
        })
        .collect())
}

/// Packs a GPTQ int4 weight: `q` of shape `(out_features, in_features)` row-major (values < 16)
/// into `qweight` int32 `(in/8, out)` with `q[i,o]` in bits `4*(i%8)` of `qweight[i/8, o]`.
pub fn pack_gptq_qweight(q: &[u8], in_features: usize, out_features: usize) -> Result<Vec<i32>> {
    check(
        in_features & 7 == 0 && q.len() == in_features * out_features,
        || {
            format!(
                "q must hold out*in values with in % 8 == 0 (in {in_features}, out {out_features})"
            )
        },
    )?;
    check(q.iter().all(|&v| v < 16), || {
        "int4 values must be < 16".into()
    })?;
    let mut packed = vec![0u32; in_features / 8 * out_features];
    for o in 0..out_features {
        for i in 0..in_features {
            packed[i / 8 * out_features + o] |= u32::from(q[o * in_features + i]) << (4 * (i % 8));
        }
    }
    Ok(packed.into_iter().map(|v| v as i32).collect())
}

/// Packs GPTQ zero points `z` of shape `(groups, out_features)` into `qzeros` int32
/// `(groups, out/8)` with `z[g,o]` in bits `4*(o%8)` of `qzeros[g, o/8]`.
pub fn pack_gptq_qzeros(z: &[u8], groups: usize, out_features: usize) -> Result<Vec<i32>> {
    check(
        out_features & 7 == 0 && z.len() == groups * out_features,
        || format!("z must hold groups*out values with out % 8 == 0 (out {out_features})"),
    )?;
    check(z.iter().all(|&v| v < 16), || {
        "int4 zero points must be < 16".into()
    })?;
    let cols = out_features / 8;
    let mut packed = vec![0u32; groups * cols];
    for g in 0..groups {
        for o in 0..out_features {
            packed[g * cols + o / 8] |= u32::from(z[g * out_features + o]) << (4 * (o % 8));
        }
    }
    Ok(packed.into_iter().map(|v| v as i32).collect())
}

fn check_gptq(
    qweight: &[i32],
    qzeros: &[i32],
    scales: &[f32],
    in_features: usize,
    out_features: usize,
    group_size: usize,
) -> Result<()> {
    check(group_size > 0, || "group_size must be positive".into())?;
    check(in_features & 7 == 0 && out_features & 7 == 0, || {
        format!("in ({in_features}) and out ({out_features}) features must be multiples of 8")
    })?;
    let groups = in_features.div_ceil(group_size);
    check(qweight.len() == in_features / 8 * out_features, || {
        "qweight size mismatch".into()
    })?;
    check(qzeros.len() == groups * out_features / 8, || {
        "qzeros size mismatch".into()
    })?;
    check(scales.len() == groups * out_features, || {
        "scales size mismatch".into()
    })
}

/// Element `(o, i)` of a GPTQ int4 weight in the layout of [`dequant_int4_gptq`]:
/// `scales[g,o] * (q[i,o] - z[g,o])`, `g = i / group_size`.
fn gptq_weight(
    qweight: &[i32],
    qzeros: &[i32],
    scales: &[f32],
    out_features: usize,
    group_size: usize,
    i: usize,
    o: usize,
) -> f32 {
    let g = i / group_size;
    let q = (qweight[i / 8 * out_features + o] as u32 >> (4 * (i % 8))) & 0xF;
    let z = (qzeros[g * (out_features / 8) + o / 8] as u32 >> (4 * (o % 8))) & 0xF;
    scales[g * out_features + o] * (q as i32 - z as i32) as f32
}

/// Dequantizes a GPTQ int4 weight to `W` of shape `(out_features, in_features)` row-major:
/// `W[o,i] = scales[g,o] * (q[i,o] - z[g,o])`, `g = i / group_size`, with `qweight` int32
/// `(in/8, out)`, `qzeros` int32 `(groups, out/8)`, `scales` `(groups, out)` and
/// `groups = ceil(in / group_size)`. Zero points are used as stored (no `+1`).
pub fn dequant_int4_gptq(
    qweight: &[i32],
    qzeros: &[i32],
    scales: &[f32],
    in_features: usize,
    out_features: usize,
    group_size: usize,
) -> Result<Vec<f32>> {
    check_gptq(
        qweight,
        qzeros,
        scales,
        in_features,
        out_features,
        group_size,
    )?;
    let mut w = vec![0f32; in_features * out_features];
    for o in 0..out_features {
        for i in 0..in_features {
            w[o * in_features + i] =
                gptq_weight(qweight, qzeros, scales, out_features, group_size, i, o);
        }
    }
    Ok(w)
}

/// `y[o] = sum_i W[o,i] x[i]` for a GPTQ int4 weight W of shape `(out_features, x.len())` in
/// the layout of [`dequant_int4_gptq`] (`in_features = x.len()`), without materializing W.
/// Accumulates in f64.
pub fn gemv_int4_gptq(
    qweight: &[i32],
    qzeros: &[i32],
    scales: &[f32],
    x: &[f32],
    out_features: usize,
    group_size: usize,
) -> Result<Vec<f32>> {
    let in_features = x.len();
    check_gptq(
        qweight,
        qzeros,
        scales,
        in_features,
        out_features,
        group_size,
    )?;
    Ok((0..out_features)
        .map(|o| {
            let sum: f64 = x
                .iter()
                .enumerate()
                .map(|(i, &xi)| {
                    let w = gptq_weight(qweight, qzeros, scales, out_features, group_size, i, o);
                    f64::from(w) * f64::from(xi)
                })
                .sum();
            sum as f32
        })
        .collect())
}

/// Packs ternary values (-1, 0, 1) as 2-bit codes `w + 1`, four per byte, element `4k+j` in
/// bits `2j..2j+1` of byte `k`.
pub fn pack_ternary(values: &[i8]) -> Result<Vec<u8>> {
    check(values.iter().all(|v| (-1..=1).contains(v)), || {
        "ternary values must be -1, 0 or 1".into()
    })?;
    Ok(values
        .chunks(4)
        .map(|c| {
            c.iter()
                .enumerate()
                .fold(0u8, |b, (j, &v)| b | (((v + 1) as u8) << (2 * j)))
        })
        .collect())
}

/// Dequantizes `n` ternary elements: `out[i] = (code(i) - 1) * scale` (code 3 is not produced
/// by [`pack_ternary`]; it decodes to `2 * scale`, as on the GPU).
pub fn dequant_ternary(packed: &[u8], scale: f32, n: usize) -> Result<Vec<f32>> {
    check(packed.len() >= n.div_ceil(4), || {
        format!(
            "{n} ternary elements need {} packed bytes, got {}",
            n.div_ceil(4),
            packed.len()
        )
    })?;
    Ok((0..n)
        .map(|i| {
            let code = (packed[i / 4] >> (2 * (i % 4))) & 0x3;
            (i32::from(code) - 1) as f32 * scale
        })
        .collect())
}

/// `y[o] = scale * sum_i (code(o, i) - 1) x[i]` for a ternary weight of shape
/// `(out_features, x.len())`, row-major, packed over the flat index as in [`dequant_ternary`].
/// Accumulates in f64.
pub fn gemv_ternary(packed: &[u8], scale: f32, x: &[f32], out_features: usize) -> Result<Vec<f32>> {
    let in_features = x.len();
    let n = out_features
        .checked_mul(in_features)
        .ok_or_else(|| KernelError::Invalid("weight too large".into()))?;
    check(packed.len() >= n.div_ceil(4), || {
        format!(
            "{n} ternary elements need {} packed bytes, got {}",
            n.div_ceil(4),
            packed.len()
        )
    })?;
    Ok((0..out_features)
        .map(|o| {
            let row = o * in_features;
            let sum: f64 = x
                .iter()
                .enumerate()
                .map(|(i, &xi)| {
                    let flat = row + i;
                    let code = (packed[flat / 4] >> (2 * (flat % 4))) & 0x3;
                    f64::from(i32::from(code) - 1) * f64::from(xi)
                })
                .sum();
            (sum * f64::from(scale)) as f32
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_packs_high_nibble_first_and_dequantizes() {
        let packed = pack_nf4_codes(&[0, 15, 7, 8, 1]).unwrap();
        assert_eq!(packed, vec![0x0F, 0x78, 0x10]);
        let absmax = [2.0, 0.5];
        let out = dequant_nf4(&packed, &absmax, 5, 4).unwrap();
        assert_eq!(
            out,
            vec![-2.0, 2.0, 0.0, 2.0 * NF4_CODES[8], 0.5 * NF4_CODES[1]]
        );
    }

    #[test]
    fn nf4_table_is_sorted_and_symmetric_at_ends() {
        assert!(NF4_CODES.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            (NF4_CODES[0], NF4_CODES[7], NF4_CODES[15]),
            (-1.0, 0.0, 1.0)
        );
    }

    #[test]
    fn nf4_size_errors() {
        assert!(dequant_nf4(&[0], &[1.0], 3, 4).is_err());
        assert!(dequant_nf4(&[0, 0], &[1.0], 3, 2).is_err());
        assert!(dequant_nf4(&[0, 0], &[1.0], 3, 0).is_err());
    }

    #[test]
    fn gemv_matches_dense_product() {
        // W = [[1, -1, 0], [0.5*c9, 1, -1]] with absmax per block of 3 (one block per row).
        let packed = pack_nf4_codes(&[15, 0, 7, 9, 15, 0]).unwrap();
        let absmax = [1.0, 0.5];
        let x = [2.0, 3.0, 4.0];
        let y = gemv_nf4(&packed, &absmax, 3, &x, 2).unwrap();
        let expect1 = 0.5 * NF4_CODES[9] * 2.0 + 0.5 * 3.0 - 0.5 * 4.0;
        assert_eq!(y[0], -1.0);
        assert!((y[1] - expect1).abs() < 1e-6);
        let w = dequant_nf4(&packed, &absmax, 6, 3).unwrap();
        for o in 0..2 {
            let d: f32 = (0..3).map(|i| w[o * 3 + i] * x[i]).sum();
            assert!((d - y[o]).abs() < 1e-6);
        }
    }

    #[test]
    fn gptq_round_trip_by_hand() {
        let (inf, outf, gs) = (16, 8, 8);
        let q: Vec<u8> = (0..inf * outf).map(|k| (k * 7 % 16) as u8).collect();
        let z: Vec<u8> = (0..2 * outf).map(|k| (k % 16) as u8).collect();
        let scales: Vec<f32> = (0..2 * outf).map(|k| 0.25 + k as f32 * 0.125).collect();
        let qw = pack_gptq_qweight(&q, inf, outf).unwrap();
        let qz = pack_gptq_qzeros(&z, 2, outf).unwrap();
        assert_eq!(qw.len(), 2 * outf);
        assert_eq!(qz.len(), 2);
        let w = dequant_int4_gptq(&qw, &qz, &scales, inf, outf, gs).unwrap();
        for o in 0..outf {
            for i in 0..inf {
                let g = i / gs;
                let want =
                    scales[g * outf + o] * (f32::from(q[o * inf + i]) - f32::from(z[g * outf + o]));
                assert_eq!(w[o * inf + i], want, "o {o} i {i}");
            }
        }
        // One explicit bit position: q[i=9, o=3] sits in bits 4..8 of qweight[1, 3].
        assert_eq!((qw[outf + 3] as u32 >> 4) & 0xF, u32::from(q[3 * inf + 9]));
    }

    #[test]
    fn ternary_packs_low_bits_first() {
        let packed = pack_ternary(&[-1, 0, 1, 1, 0]).unwrap();
        assert_eq!(packed, vec![0b10_10_01_00, 0b01]);
        let out = dequant_ternary(&packed, 0.5, 5).unwrap();
        assert_eq!(out, vec![-0.5, 0.0, 0.5, 0.5, 0.0]);
        assert!(pack_ternary(&[2]).is_err());
        assert!(dequant_ternary(&packed, 1.0, 9).is_err());
    }

    #[test]
    fn gptq_gemv_matches_dequant_then_dot() {
        let (inf, outf, gs) = (24usize, 16usize, 16usize);
        let groups = inf.div_ceil(gs);
        let q: Vec<u8> = (0..inf * outf).map(|k| (k * 5 % 16) as u8).collect();
        let z: Vec<u8> = (0..groups * outf).map(|k| (k * 3 % 16) as u8).collect();
        let scales: Vec<f32> = (0..groups * outf).map(|k| 0.5 + k as f32 * 0.25).collect();
        let qw = pack_gptq_qweight(&q, inf, outf).unwrap();
        let qz = pack_gptq_qzeros(&z, groups, outf).unwrap();
        let x: Vec<f32> = (0..inf).map(|i| (i as f32 - 10.0) * 0.125).collect();
        let w = dequant_int4_gptq(&qw, &qz, &scales, inf, outf, gs).unwrap();
        let y = gemv_int4_gptq(&qw, &qz, &scales, &x, outf, gs).unwrap();
        for o in 0..outf {
            let d: f64 = (0..inf)
                .map(|i| f64::from(w[o * inf + i]) * f64::from(x[i]))
                .sum();
            assert!((d as f32 - y[o]).abs() <= 1e-4 * d.abs().max(1.0) as f32);
        }
        assert!(gemv_int4_gptq(&qw, &qz, &scales, &x[..16], outf, gs).is_err());
    }

    #[test]
    fn ternary_gemv_by_hand() {
        // W = [[-1, 0, 1], [1, 1, -1]], flat-packed across the row boundary.
        let packed = pack_ternary(&[-1, 0, 1, 1, 1, -1]).unwrap();
        let y = gemv_ternary(&packed, 0.5, &[2.0, 3.0, 4.0], 2).unwrap();
        assert_eq!(y, vec![0.5 * (-2.0 + 4.0), 0.5 * (2.0 + 3.0 - 4.0)]);
        assert!(gemv_ternary(&packed, 1.0, &[1.0; 5], 2).is_err());
    }
}
