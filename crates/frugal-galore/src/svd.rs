//! Truncated SVD bases: torch's exact SVD, a seeded randomized SVD, and the fallback chain used
//! when an SVD fails.

use frugal_core::{Error, Result};
use tch::{Device, Kind, Tensor};

/// Leading singular vectors of a matrix: `u` (m x k, orthonormal columns) and `vh`
/// (k x n, orthonormal rows), k = min(rank, m, n).
#[derive(Debug)]
pub(crate) struct Truncated {
    pub(crate) u: Tensor,
    pub(crate) vh: Tensor,
}

/// torch's `linalg.svd(a, full_matrices=False)`, truncated to `rank` (`a` is 2-D), signs made
/// [`canonical`].
///
/// Goes through `torch.svd(some=True)`, which calls `linalg_svd` and returns V = Vhᴴ: tch binds
/// `linalg_svd`'s optional `driver` as a plain string, and any string, even empty, is refused
/// on CPU.
pub(crate) fn exact(a: &Tensor, rank: i64) -> Result<Truncated> {
    let (u, _s, v) = a.f_svd(true, true)?;
    let k = rank.min(u.size()[1]);
    canonical(Truncated {
        u: u.f_narrow(1, 0, k)?,
        vh: v.f_narrow(1, 0, k)?.f_transpose(0, 1)?,
    })
}

/// Fixes the sign of every singular pair: the entry of largest magnitude in each column of `u`
/// is made non-negative, and the matching row of `vh` flips with it. LAPACK's signs differ
/// between CPUs and libraries (the same libtorch picked other signs on AMD and Intel machines),
/// and GaLore's moments carry over a basis refresh, so without a fixed sign the same run would
/// train differently on different machines. `gen_galore.py` applies the same rule to
/// galore-torch's SVD for the fixtures.
pub(crate) fn canonical(t: Truncated) -> Result<Truncated> {
    let idx = t.u.f_abs()?.f_argmax(0, true)?;
    let picked = t.u.f_gather(0, &idx, false)?;
    let sign = picked.f_ge(0.0)?.f_to_kind(t.u.kind())? * 2.0 - 1.0;
    Ok(Truncated {
        vh: t.vh.f_mul(&sign.f_transpose(0, 1)?)?,
        u: t.u.f_mul(&sign)?,
    })
}

/// SplitMix64 (Steele, Lea and Flood 2014): a tiny, well-mixed 64-bit generator.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: 53 random bits.
    fn next_open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// `count` standard normal draws (Box-Muller).
    pub(crate) fn normals(&mut self, count: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(count + 1);
        while out.len() < count {
            let r = (-2.0 * self.next_open01().ln()).sqrt();
            let theta = 2.0 * std::f64::consts::PI * self.next_open01();
            out.push(r * theta.cos());
            out.push(r * theta.sin());
        }
        out.truncate(count);
        out
    }
}

/// The seed of the sketch drawn at `step` by a projector seeded with `seed`.
pub(crate) fn sketch_seed(seed: u64, step: i64) -> u64 {
    let mut g = SplitMix64(seed ^ SplitMix64(step as u64).next_u64());
    g.next_u64()
}

/// A Gaussian matrix (rows x cols) from `seed`, drawn on the CPU in f64 (so it is the same on
/// every device), then moved to `kind` and `device`.
pub(crate) fn gaussian(
    rows: i64,
    cols: i64,
    seed: u64,
    kind: Kind,
    device: Device,
) -> Result<Tensor> {
    let values = SplitMix64(seed).normals((rows * cols) as usize);
    Ok(Tensor::from_slice(&values)
        .f_reshape([rows, cols])?
        .f_to_kind(kind)?
        .f_to_device(device)?)
}

fn orthonormal(a: &Tensor) -> Result<Tensor> {
    Ok(Tensor::f_linalg_qr(a, "reduced")?.0)
}

/// Randomized truncated SVD of `a` (m x n) in `a`'s kind: Y = A Ω with Ω Gaussian
/// (n x (rank + oversampling)), Q = qr(Y); `power_iters` times Q = qr(A qr(Aᵀ Q)); then the
/// exact SVD of B = Qᵀ A and U = Q U_B.
pub(crate) fn randomized(
    a: &Tensor,
    rank: i64,
    oversampling: i64,
    power_iters: i64,
    seed: u64,
) -> Result<Truncated> {
    let (m, n) = (a.size()[0], a.size()[1]);
    let k = (rank + oversampling).min(m).min(n).max(1);
    let omega = gaussian(n, k, seed, a.kind(), a.device())?;
    let at = a.f_transpose(0, 1)?;
    let mut q = orthonormal(&a.f_matmul(&omega)?)?;
    for _ in 0..power_iters {
        let z = orthonormal(&at.f_matmul(&q)?)?;
        q = orthonormal(&a.f_matmul(&z)?)?;
    }
    let b = q.f_transpose(0, 1)?.f_matmul(a)?;
    let small = exact(&b, rank)?;
    canonical(Truncated {
        u: q.f_matmul(&small.u)?,
        vh: small.vh,
    })
}

/// Whether every element of `t` is finite.
pub(crate) fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(t.f_isfinite()?.f_all()?.int64_value(&[]) != 0)
}

/// Tries `attempts` in order and returns the first result whose vectors are all finite, with
/// the index of the attempt; the errors of the failed attempts are collected in the message
/// when all fail.
pub(crate) fn first_success(
    attempts: &[(&str, &dyn Fn() -> Result<Truncated>)],
) -> std::result::Result<(usize, Truncated), String> {
    let mut failures = Vec::new();
    for (index, (label, attempt)) in attempts.iter().enumerate() {
        match attempt() {
            Ok(t) => match (all_finite(&t.u), all_finite(&t.vh)) {
                (Ok(true), Ok(true)) => return Ok((index, t)),
                (Err(e), _) | (_, Err(e)) => failures.push(format!("{label}: {e}")),
                _ => failures.push(format!("{label}: non-finite singular vectors")),
            },
            Err(e) => failures.push(format!("{label}: {}", first_line(&e))),
        }
    }
    Err(failures.join("; "))
}

fn first_line(e: &Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Canonical signs do not depend on the signs LAPACK returned: flipping any singular pair
    /// gives the same basis, the product U Vh is kept, and each column's largest entry is
    /// non-negative.
    #[test]
    fn canonical_signs_ignore_the_input_signs() {
        tch::manual_seed(5);
        let a = Tensor::randn([9, 6], (Kind::Float, Device::Cpu));
        let t = exact(&a, 4).unwrap();
        let flip = Tensor::from_slice(&[-1.0f32, 1.0, -1.0, -1.0]).view([1, 4]);
        let flipped = canonical(Truncated {
            u: &t.u * &flip,
            vh: &t.vh * flip.transpose(0, 1),
        })
        .unwrap();
        assert!(flipped.u.equal(&t.u) && flipped.vh.equal(&t.vh));
        let big = t.u.abs().argmax(0, true);
        assert!(t.u.gather(0, &big, false).ge(0.0).all().int64_value(&[]) == 1);
        let raw = a.svd(true, true);
        let k4 = |x: &Tensor| x.narrow(1, 0, 4);
        let product = k4(&raw.0).matmul(&k4(&raw.2).transpose(0, 1));
        let d = (t.u.matmul(&t.vh) - product).abs().max().double_value(&[]);
        assert!(d < 1e-6, "{d}");
        let r = randomized(&a, 4, 2, 2, 7).unwrap();
        let big = r.u.abs().argmax(0, true);
        assert!(r.u.gather(0, &big, false).ge(0.0).all().int64_value(&[]) == 1);
    }

    #[test]
    fn sketches_are_standard_normal_and_reproducible() {
        let a = SplitMix64(5).normals(20_001);
        assert_eq!(a, SplitMix64(5).normals(20_001));
        assert_ne!(a[..10], SplitMix64(6).normals(10)[..]);
        let mean = a.iter().sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
        assert_ne!(sketch_seed(0, 0), sketch_seed(0, 1));
        assert_ne!(sketch_seed(0, 7), sketch_seed(1, 7));
    }

    #[test]
    fn first_success_skips_errors_and_non_finite_results() {
        let m = Tensor::from_slice(&[3.0f32, 1.0, 1.0, 2.0, 0.5, 0.0]).reshape([3, 2]);
        let fail = || -> Result<Truncated> { Err(Error::Msg("nope".into())) };
        let nan = || -> Result<Truncated> {
            let t = exact(&m, 1)?;
            Ok(Truncated {
                u: t.u * f64::NAN,
                vh: t.vh,
            })
        };
        let ok = || exact(&m, 1);
        let attempts: [(&str, &dyn Fn() -> Result<Truncated>); 3] =
            [("a", &fail), ("b", &nan), ("c", &ok)];
        assert_eq!(first_success(&attempts).unwrap().0, 2);
        let attempts: [(&str, &dyn Fn() -> Result<Truncated>); 2] = [("a", &fail), ("b", &nan)];
        let e = first_success(&attempts).unwrap_err();
        assert!(e.contains("a: nope") && e.contains("b: non-finite"), "{e}");
    }
}
