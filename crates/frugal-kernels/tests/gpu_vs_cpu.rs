//! Each CUDA kernel against its CPU reference (on a GPU), and clean errors without one.

mod common;

use common::{max_abs_diff, to_vec};

use frugal_kernels::{cpu, KernelError, Kernels};
use tch::{Device, Kind, Tensor};

/// A small deterministic generator (xorshift), so the test needs no extra crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n)
            .map(|_| lo + (hi - lo) * (self.next() >> 40) as f32 / (1u64 << 24) as f32)
            .collect()
    }
}

#[test]
fn kernels_match_cpu_reference_on_gpu() {
    if !tch::Cuda::is_available() {
        println!("skipped: no CUDA GPU");
        return;
    }
    let dev = Device::Cuda(0);
    let k = Kernels::global();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);

    // NF4 dequant, including an odd element count and a partial last block.
    for (n, block) in [(64 * 1000, 64), (4097, 64), (3usize, 2usize)] {
        let packed = rng.bytes(n.div_ceil(2));
        let absmax = rng.uniform(n.div_ceil(block), 0.1, 3.0);
        let want = cpu::dequant_nf4(&packed, &absmax, n, block).unwrap();
        let got = k
            .dequant_nf4_f32(
                &Tensor::from_slice(&packed).to_device(dev),
                &Tensor::from_slice(&absmax).to_device(dev),
                &[n as i64],
                block,
            )
            .unwrap();
        let diff = max_abs_diff(&to_vec(&got), &want);
        assert!(diff <= 1e-6, "dequant_nf4_f32 n {n}: max abs diff {diff}");
    }

    // NF4 GEMV, batch 1.
    for (out_f, in_f, block) in [(384usize, 1024usize, 64usize), (7, 100, 64), (1, 33, 16)] {
        let packed = rng.bytes((out_f * in_f).div_ceil(2));
        let absmax = rng.uniform((out_f * in_f).div_ceil(block), 0.1, 2.0);
        let x = rng.uniform(in_f, -1.0, 1.0);
        let want = cpu::gemv_nf4(&packed, &absmax, block, &x, out_f).unwrap();
        let got = k
            .gemv_nf4_f32(
                &Tensor::from_slice(&packed).to_device(dev),
                &Tensor::from_slice(&absmax).to_device(dev),
                &Tensor::from_slice(&x).to_device(dev),
                out_f,
                block,
            )
            .unwrap();
        let got = to_vec(&got);
        let scale = want.iter().map(|v| v.abs()).fold(1e-3, f32::max);
        let rel = max_abs_diff(&got, &want) / scale;
        assert!(
            rel <= 1e-4,
            "gemv_nf4_f32 {out_f}x{in_f}: relative diff {rel}"
        );
    }

    // GPTQ int4.
    for (in_f, out_f, group) in [(256usize, 64usize, 128usize), (64, 16, 32), (96, 8, 64)] {
        let groups = in_f.div_ceil(group);
        let q: Vec<u8> = rng
            .bytes(in_f * out_f)
            .into_iter()
            .map(|b| b & 0xF)
            .collect();
        let z: Vec<u8> = rng
            .bytes(groups * out_f)
            .into_iter()
            .map(|b| b & 0xF)
            .collect();
        let scales = rng.uniform(groups * out_f, 0.01, 0.2);
        let qweight = cpu::pack_gptq_qweight(&q, in_f, out_f).unwrap();
        let qzeros = cpu::pack_gptq_qzeros(&z, groups, out_f).unwrap();
        let want = cpu::dequant_int4_gptq(&qweight, &qzeros, &scales, in_f, out_f, group).unwrap();
        let as2d = |v: &[i32], r: usize, c: usize| {
            Tensor::from_slice(v)
                .reshape([r as i64, c as i64])
                .to_device(dev)
        };
        let got = k
            .dequant_int4_gptq_f32(
                &as2d(&qweight, in_f / 8, out_f),
                &as2d(&qzeros, groups, out_f / 8),
                &Tensor::from_slice(&scales)
                    .reshape([groups as i64, out_f as i64])
                    .to_device(dev),
                group,
            )
            .unwrap();
        assert_eq!(got.size(), vec![out_f as i64, in_f as i64]);
        let diff = max_abs_diff(&to_vec(&got), &want);
        assert!(
            diff <= 1e-6,
            "dequant_int4_gptq_f32 {in_f}x{out_f}: max abs diff {diff}"
        );
    }

    // Ternary.
    for n in [4 * 5000, 4097, 1usize] {
        let values: Vec<i8> = rng
            .bytes(n)
            .into_iter()
            .map(|b| (b % 3) as i8 - 1)
            .collect();
        let packed = cpu::pack_ternary(&values).unwrap();
        let want = cpu::dequant_ternary(&packed, 0.037, n).unwrap();
        let got = k
            .dequant_ternary_f32(
                &Tensor::from_slice(&packed).to_device(dev),
                0.037,
                &[n as i64],
            )
            .unwrap();
        let diff = max_abs_diff(&to_vec(&got), &want);
        assert!(
            diff <= 1e-6,
            "dequant_ternary_f32 n {n}: max abs diff {diff}"
        );
    }

    // GPTQ int4 GEMV, batch 1: in/8 not a multiple of 32, groups not a multiple of 8, a
    // partial last group.
    for (in_f, out_f, group) in [
        (4096usize, 256usize, 128usize),
        (1000, 24, 128),
        (72, 8, 20),
        (8, 8, 8),
    ] {
        let groups = in_f.div_ceil(group);
        let q: Vec<u8> = rng
            .bytes(in_f * out_f)
            .into_iter()
            .map(|b| b & 0xF)
            .collect();
        let z: Vec<u8> = rng
            .bytes(groups * out_f)
            .into_iter()
            .map(|b| b & 0xF)
            .collect();
        let scales = rng.uniform(groups * out_f, 0.01, 0.2);
        let x = rng.uniform(in_f, -1.0, 1.0);
        let qweight = cpu::pack_gptq_qweight(&q, in_f, out_f).unwrap();
        let qzeros = cpu::pack_gptq_qzeros(&z, groups, out_f).unwrap();
        let want = cpu::gemv_int4_gptq(&qweight, &qzeros, &scales, &x, out_f, group).unwrap();
        let as2d = |v: &[i32], r: usize, c: usize| {
            Tensor::from_slice(v)
                .reshape([r as i64, c as i64])
                .to_device(dev)
        };
        let got = k
            .gemv_int4_gptq_f32(
                &as2d(&qweight, in_f / 8, out_f),
                &as2d(&qzeros, groups, out_f / 8),
                &Tensor::from_slice(&scales)
                    .reshape([groups as i64, out_f as i64])
                    .to_device(dev),
                &Tensor::from_slice(&x).to_device(dev),
                group,
            )
            .unwrap();
        assert_eq!(got.size(), vec![out_f as i64]);
        let got = to_vec(&got);
        let scale = want.iter().map(|v| v.abs()).fold(1e-3, f32::max);
        let rel = max_abs_diff(&got, &want) / scale;
        assert!(
            rel <= 1e-4,
            "gemv_int4_gptq_f32 {out_f}x{in_f} group {group}: relative diff {rel}"
        );
    }

    // Ternary GEMV, batch 1: rows not byte-aligned (in % 4 != 0) and in below one warp.
    for (out_f, in_f) in [(512usize, 2048usize), (7, 1001), (3, 5), (1, 1)] {
        let values: Vec<i8> = rng
            .bytes(out_f * in_f)
            .into_iter()
            .map(|b| (b % 3) as i8 - 1)
            .collect();
        let packed = cpu::pack_ternary(&values).unwrap();
        let x = rng.uniform(in_f, -1.0, 1.0);
        let want = cpu::gemv_ternary(&packed, 0.037, &x, out_f).unwrap();
        let got = k
            .gemv_ternary_f32(
                &Tensor::from_slice(&packed).to_device(dev),
                0.037,
                &Tensor::from_slice(&x).to_device(dev),
                out_f,
            )
            .unwrap();
        assert_eq!(got.size(), vec![out_f as i64]);
        let got = to_vec(&got);
        let scale = want.iter().map(|v| v.abs()).fold(1e-3, f32::max);
        let rel = max_abs_diff(&got, &want) / scale;
        assert!(
            rel <= 1e-4,
            "gemv_ternary_f32 {out_f}x{in_f}: relative diff {rel}"
        );
    }

    // Wrong inputs are errors, not crashes.
    let on_cpu = Tensor::from_slice(&[0u8; 4]);
    let absmax = Tensor::from_slice(&[1.0f32]).to_device(dev);
    assert!(matches!(
        k.dequant_nf4_f32(&on_cpu, &absmax, &[8], 64),
        Err(KernelError::Invalid(_))
    ));
}

#[test]
fn without_a_gpu_every_entry_point_says_no_cuda() {
    if tch::Cuda::is_available() {
        println!("skipped: a CUDA GPU is present");
        return;
    }
    let k = Kernels::new();
    let packed = Tensor::from_slice(&[0u8; 4]);
    let absmax = Tensor::from_slice(&[1.0f32]);
    let x = Tensor::from_slice(&[1.0f32; 4]);
    let qi = Tensor::from_slice(&[0i32; 8]).reshape([1, 8]);
    let results = [
        k.dequant_nf4_f32(&packed, &absmax, &[8], 64),
        k.gemv_nf4_f32(&packed, &absmax, &x, 2, 64),
        k.dequant_int4_gptq_f32(&qi, &Tensor::from_slice(&[0i32]), &absmax, 8),
        k.dequant_ternary_f32(&packed, 1.0, &[16]),
        k.gemv_int4_gptq_f32(
            &qi,
            &Tensor::from_slice(&[0i32]),
            &Tensor::from_slice(&[1.0f32; 8]),
            &Tensor::from_slice(&[1.0f32; 8]),
            8,
        ),
        k.gemv_ternary_f32(&packed, 1.0, &x, 4),
    ];
    for r in results {
        match r {
            Err(KernelError::NoCuda(msg)) => assert!(!msg.is_empty()),
            other => panic!("expected NoCuda, got {:?}", other.map(|t| t.size())),
        }
    }
    assert!(matches!(
        frugal_kernels::check_cuda(),
        Err(KernelError::NoCuda(_))
    ));
}

/// Guarantee (GPU): a quantized layer's packed weight uploaded to the GPU gives the CPU layer's
/// products, through the matrix-vector kernels (few rows) and the GPU dequantization (more),
/// for NF4 with double quantization, GPTQ int4 and ternary; formats without kernels are not
/// uploaded.
#[test]
fn quantized_layers_on_the_gpu_match_the_cpu() {
    use frugal_kernels::quantized::{DeviceQuantized, GEMV_MAX_ROWS};
    use frugal_quant::convert::Format;
    use frugal_quant::fourbit::{FourBitConfig, FourBitKind};
    use frugal_quant::layer::QuantizedLinear;
    if !tch::Cuda::is_available() {
        println!("skipped: no CUDA GPU");
        return;
    }
    let dev = Device::Cuda(0);
    tch::manual_seed(8);
    let w = Tensor::randn([96, 256], (Kind::Float, Device::Cpu)) * 0.05;
    let nf4 = Format::FourBit(FourBitConfig {
        kind: FourBitKind::Nf4,
        block_size: 64,
        double_quant: true,
    });
    for format in [nf4, Format::Int4 { group_size: 64 }, Format::Ternary] {
        let layer = QuantizedLinear::quantize(&w, &format).unwrap();
        let gpu = DeviceQuantized::upload(&layer, dev).expect("a format with kernels");
        let dense = layer.dequantize();
        let on_gpu = gpu.dequantize().unwrap().to_device(Device::Cpu);
        let d = (&on_gpu - &dense).abs().max().double_value(&[]);
        assert!(
            d < 1e-6,
            "{format:?}: dequantized on the GPU differs by {d}"
        );
        for rows in [1, GEMV_MAX_ROWS + 5] {
            let x = Tensor::randn([rows, 256], (Kind::Float, Device::Cpu));
            let want = x.matmul(&dense.tr());
            let got = gpu
                .forward(&x.to_device(dev))
                .unwrap()
                .to_device(Device::Cpu);
            let rel = (&got - &want).norm().double_value(&[]) / want.norm().double_value(&[]);
            assert!(
                rel < 1e-5,
                "{format:?}, {rows} rows: relative difference {rel}"
            );
        }
    }
    let int8 = QuantizedLinear::quantize(&w, &Format::Int8).unwrap();
    assert!(
        DeviceQuantized::upload(&int8, dev).is_none(),
        "int8 has no kernel here"
    );
}

/// Guarantee (CI): the kernels' CPU references read frugal-quant's NF4 (double quantization),
/// GPTQ int4 and ternary layers as those layers dequantize themselves, so a layer uploaded to
/// the GPU is the same weight there.
#[test]
fn kernel_references_read_the_quantized_layers() {
    use frugal_quant::convert::Format;
    use frugal_quant::fourbit::{FourBitConfig, FourBitKind};
    use frugal_quant::layer::{QuantizedLinear, QuantizedWeight};
    tch::manual_seed(6);
    let (rows, cols) = (24usize, 128usize);
    let w = Tensor::randn([rows as i64, cols as i64], (Kind::Float, Device::Cpu)) * 0.05;
    let nf4 = Format::FourBit(FourBitConfig {
        kind: FourBitKind::Nf4,
        block_size: 64,
        double_quant: true,
    });
    for format in [nf4, Format::Int4 { group_size: 64 }, Format::Ternary] {
        let layer = QuantizedLinear::quantize(&w, &format).unwrap();
        let want = to_vec(&layer.dequantize());
        let got = match &layer.weight {
            QuantizedWeight::FourBit(f) => {
                cpu::dequant_nf4(&f.packed, &f.absmax_values(), rows * cols, f.block_size)
            }
            QuantizedWeight::Int4(g) => {
                cpu::dequant_int4_gptq(&g.qweight, &g.qzeros, &g.scales, cols, rows, g.group_size)
            }
            QuantizedWeight::Ternary(t) => {
                cpu::dequant_ternary(&t.packed, t.scales[0], rows * cols)
            }
            other => panic!("unexpected {}", other.family()),
        }
        .unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-6, "{format:?}");
    }
}
