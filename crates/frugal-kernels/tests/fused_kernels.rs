//! BitLinear's fused RMSNorm + int8 quantization and the 8-bit AdamW step: the CPU references
//! against libtorch's own operations and autograd (CI), and each CUDA kernel against its CPU
//! reference (with a GPU).

mod common;

use common::{max_abs_diff, to_vec};

use frugal_kernels::adamw8bit::{step_block, StepConsts, BLOCK_SIZE};
use frugal_kernels::bitlinear::{rmsnorm_quant, rmsnorm_quant_backward};
use frugal_kernels::Kernels;
use frugal_quant::dynamic::{Blockwise8, DynamicMap};
use tch::{Device, Kind, Tensor};

/// The formulas in libtorch operations, differentiated by autograd with the quantizer's
/// straight-through estimator: `(out, dx, dgain)` for upstream gradient `dn`.
fn torch_reference(x: &Tensor, gain: &Tensor, dn: &Tensor, eps: f64) -> (Tensor, Tensor, Tensor) {
    let x = x.detach().set_requires_grad(true);
    let g = gain.detach().set_requires_grad(true);
    let var = x.square().mean_dim(-1, true, Kind::Float);
    let n = &x * (var + eps).rsqrt() * &g;
    let scale = n
        .abs()
        .amax([-1i64].as_slice(), true)
        .clamp_min(1e-5)
        .reciprocal()
        * 127.0;
    let q = (&n * &scale).round().clamp(-128.0, 127.0) / &scale;
    let out = &n + (q - &n).detach();
    let grads = Tensor::run_backward(&[(&out * dn).sum(Kind::Float)], &[&x, &g], false, false);
    (
        out.detach(),
        grads[0].shallow_clone(),
        grads[1].shallow_clone(),
    )
}

#[test]
fn rmsnorm_quant_reference_matches_libtorch() {
    tch::manual_seed(5);
    for (rows, n) in [(1i64, 8i64), (7, 96), (33, 250)] {
        let x = Tensor::randn([rows, n], (Kind::Float, Device::Cpu)) * 3.0;
        let gain = Tensor::rand([n], (Kind::Float, Device::Cpu)) + 0.5;
        let dn = Tensor::randn([rows, n], (Kind::Float, Device::Cpu));
        let (want_out, want_dx, want_dg) = torch_reference(&x, &gain, &dn, 1e-8);
        let (out, rstd) = rmsnorm_quant(&to_vec(&x), &to_vec(&gain), 1e-8).unwrap();
        assert_eq!(rstd.len(), rows as usize);
        // The output is a multiple of 1/scale; a different rounding of r can move a value at a
        // rounding boundary by one step, so compare within a step (max |out| / 127).
        let step = to_vec(&want_out).iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        let d = max_abs_diff(&out, &to_vec(&want_out));
        assert!(d <= step * 1.01, "({rows}, {n}) out: {d} (step {step})");
        let (dx, dg) =
            rmsnorm_quant_backward(&to_vec(&dn), &to_vec(&x), &to_vec(&gain), &rstd).unwrap();
        let d = max_abs_diff(&dx, &to_vec(&want_dx));
        assert!(d < 1e-4, "({rows}, {n}) dx: {d}");
        let d = max_abs_diff(&dg, &to_vec(&want_dg));
        assert!(d < 1e-3, "({rows}, {n}) dgain: {d}");
    }
    assert!(
        rmsnorm_quant(&[1.0; 10], &[1.0; 4], 1e-8).is_err(),
        "10 values are not rows of 4"
    );
}

#[test]
fn adamw8bit_block_matches_the_f32_formulas() {
    // Dequantized moments after one step of the 8-bit block equal the f32 step's within the
    // codes' resolution, and `delta` equals the f32 formula for the same moments.
    let n = 3 * BLOCK_SIZE + 17;
    let g: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
        .collect();
    let (m0, v0): (Vec<f32>, Vec<f32>) = (0..n)
        .map(|i| (((i * 13 % 29) as f32 - 14.0) * 1e-3, (i % 7) as f32 * 1e-5))
        .unzip();
    let mut m = Blockwise8::quantize(&m0, BLOCK_SIZE, DynamicMap::Signed);
    let mut v = Blockwise8::quantize(&v0, BLOCK_SIZE, DynamicMap::Unsigned);
    let (m_start, v_start) = (m.dequantize(), v.dequantize());
    let k = StepConsts::new(1e-3, 0.9, 0.999, 1e-8, 3.0);
    let mut delta = vec![0f32; n];
    let blocks = g
        .chunks(BLOCK_SIZE)
        .zip(m.codes.chunks_mut(BLOCK_SIZE))
        .zip(v.codes.chunks_mut(BLOCK_SIZE))
        .zip(delta.chunks_mut(BLOCK_SIZE))
        .zip(m.absmax.iter_mut().zip(v.absmax.iter_mut()));
    for ((((gb, mc), vc), d), (am, av)) in blocks {
        step_block(&k, gb, mc, am, vc, av, d);
    }
    let (m1, v1) = (m.dequantize(), v.dequantize());
    for j in 0..n {
        let mj = 0.9 * m_start[j] + 0.1 * g[j];
        let vj = 0.999 * v_start[j] + 0.001 * g[j] * g[j];
        let want = (mj * k.step) / (vj.sqrt() / k.c2 + k.eps);
        assert!(
            (delta[j] - want).abs() <= 1e-6 * want.abs().max(1e-3),
            "delta {j}"
        );
        let am = m.absmax[j / BLOCK_SIZE];
        let av = v.absmax[j / BLOCK_SIZE];
        assert!((m1[j] - mj).abs() <= 0.05 * am, "m {j}: {} vs {mj}", m1[j]);
        assert!((v1[j] - vj).abs() <= 0.05 * av, "v {j}: {} vs {vj}", v1[j]);
    }
}

#[test]
fn bitlinear_kernels_match_the_cpu_reference_on_gpu() {
    if !tch::Cuda::is_available() {
        println!("skipped: no CUDA GPU");
        return;
    }
    let dev = Device::Cuda(0);
    let k = Kernels::global();
    tch::manual_seed(9);
    for (rows, n) in [(1i64, 1024i64), (37, 96), (512, 1536)] {
        let x = Tensor::randn([rows, n], (Kind::Float, Device::Cpu)) * 2.0;
        let gain = Tensor::rand([n], (Kind::Float, Device::Cpu)) + 0.5;
        let dn = Tensor::randn([rows, n], (Kind::Float, Device::Cpu));
        let (want_out, want_rstd) = rmsnorm_quant(&to_vec(&x), &to_vec(&gain), 1e-8).unwrap();
        let (out, rstd) = k
            .rmsnorm_quant_f32(&x.to_device(dev), &gain.to_device(dev), 1e-8)
            .unwrap();
        let r = to_vec(&rstd);
        let rel = r
            .iter()
            .zip(&want_rstd)
            .map(|(a, b)| (a - b).abs() / b)
            .fold(0.0, f32::max);
        assert!(rel < 1e-5, "({rows}, {n}) rstd: {rel}");
        let step = want_out.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        let d = max_abs_diff(&to_vec(&out), &want_out);
        assert!(d <= step * 1.01, "({rows}, {n}) out: {d}");
        let (want_dx, want_dg) =
            rmsnorm_quant_backward(&to_vec(&dn), &to_vec(&x), &to_vec(&gain), &want_rstd).unwrap();
        let (dx, dg) = k
            .rmsnorm_quant_backward_f32(
                &dn.to_device(dev),
                &x.to_device(dev),
                &gain.to_device(dev),
                &rstd,
            )
            .unwrap();
        assert!(
            max_abs_diff(&to_vec(&dx), &want_dx) < 1e-4,
            "({rows}, {n}) dx"
        );
        let dg_tol = 1e-5 * rows as f32 * 10.0;
        assert!(
            max_abs_diff(&to_vec(&dg), &want_dg) < dg_tol,
            "({rows}, {n}) dgain"
        );
    }
}

#[test]
fn adamw8bit_kernel_matches_the_cpu_reference_on_gpu() {
    if !tch::Cuda::is_available() {
        println!("skipped: no CUDA GPU");
        return;
    }
    let dev = Device::Cuda(0);
    let n = 40 * BLOCK_SIZE + 77;
    let g: Vec<f32> = (0..n)
        .map(|i| (((i * 7919) % 2003) as f32 - 1001.0) * 1e-4)
        .collect();
    let m0: Vec<f32> = (0..n)
        .map(|i| (((i * 31) % 97) as f32 - 48.0) * 1e-4)
        .collect();
    let v0: Vec<f32> = (0..n).map(|i| ((i * 17) % 89) as f32 * 1e-7).collect();
    let mut m = Blockwise8::quantize(&m0, BLOCK_SIZE, DynamicMap::Signed);
    let mut v = Blockwise8::quantize(&v0, BLOCK_SIZE, DynamicMap::Unsigned);
    let mut gm_codes = Tensor::from_slice(&m.codes).to_device(dev);
    let mut gm_absmax = Tensor::from_slice(&m.absmax).to_device(dev);
    let mut gv_codes = Tensor::from_slice(&v.codes).to_device(dev);
    let mut gv_absmax = Tensor::from_slice(&v.absmax).to_device(dev);
    let gg = Tensor::from_slice(&g).to_device(dev);
    for t in 1..=3 {
        let k = StepConsts::new(1e-3, 0.9, 0.999, 1e-8, t as f64);
        let mut delta = vec![0f32; n];
        let blocks = m.absmax.len();
        for b in 0..blocks {
            let r = b * BLOCK_SIZE..((b + 1) * BLOCK_SIZE).min(n);
            step_block(
                &k,
                &g[r.clone()],
                &mut m.codes[r.clone()],
                &mut m.absmax[b],
                &mut v.codes[r.clone()],
                &mut v.absmax[b],
                &mut delta[r],
            );
        }
        let gdelta = Kernels::global()
            .adamw8bit_step_f32(
                &gg,
                &mut gm_codes,
                &mut gm_absmax,
                &mut gv_codes,
                &mut gv_absmax,
                &k,
            )
            .unwrap();
        assert_eq!(to_vec(&gdelta), delta, "step {t}: delta");
        assert_eq!(to_vec(&gm_absmax), m.absmax, "step {t}: m absmax");
        assert_eq!(to_vec(&gv_absmax), v.absmax, "step {t}: v absmax");
        let codes = |t: &Tensor| Vec::<u8>::try_from(t.to_device(Device::Cpu)).unwrap();
        assert_eq!(codes(&gm_codes), m.codes, "step {t}: m codes");
        assert_eq!(codes(&gv_codes), v.codes, "step {t}: v codes");
    }
}
