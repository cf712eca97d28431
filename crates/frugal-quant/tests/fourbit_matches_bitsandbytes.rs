//! NF4 / FP4 against bitsandbytes 0.50.2 (fixture from `fixtures/gen_fourbit.py`): the same
//! codes, the same dequantized values, and files that go both ways in its Hugging Face layout.

use frugal_core::safetensors_io::SafetensorsFile;
use frugal_quant::codebook;
use frugal_quant::fourbit::{Absmax, FourBit, FourBitConfig, FourBitKind};
use std::path::Path;
use tch::{Device, Kind, Tensor};

const CASES: &[(&str, FourBitKind, usize, bool)] = &[
    ("nf4_b64", FourBitKind::Nf4, 64, false),
    ("nf4_b64_dq", FourBitKind::Nf4, 64, true),
    ("nf4_b128_odd", FourBitKind::Nf4, 128, false),
    ("nf4_b32_dq_odd", FourBitKind::Nf4, 32, true),
    ("fp4_b64", FourBitKind::Fp4, 64, false),
    ("fp4_b256_dq", FourBitKind::Fp4, 256, true),
    ("nf4_zero_block", FourBitKind::Nf4, 64, false),
];

fn fixture() -> SafetensorsFile {
    SafetensorsFile::open(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fourbit.safetensors"),
    )
    .unwrap()
}

fn get(f: &SafetensorsFile, name: &str) -> Tensor {
    f.tensor(name, Device::Cpu).unwrap()
}

fn floats(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1).to_kind(Kind::Float)).unwrap()
}

fn bytes(t: &Tensor) -> Vec<u8> {
    Vec::<u8>::try_from(t.flatten(0, -1)).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Guarantee: our 4-bit codes equal bitsandbytes' (its CPU quantizer: reciprocal multiply in
/// full blocks, ties to the lower code), for NF4 and FP4, odd sizes, partial blocks, zero blocks.
#[test]
fn codes_equal_bitsandbytes() {
    let f = fixture();
    for &(case, kind, bs, dq) in CASES {
        let x = get(&f, &format!("{case}.x"));
        let shape = x.size();
        let ours = FourBit::quantize(
            &floats(&x),
            &shape,
            &FourBitConfig {
                kind,
                block_size: bs,
                double_quant: dq,
            },
        )
        .unwrap();
        let theirs = bytes(&get(&f, &format!("{case}.w")));
        let diff = ours
            .packed
            .iter()
            .zip(&theirs)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            diff,
            0,
            "{case}: {diff} of {} packed bytes differ",
            theirs.len()
        );
    }
}

/// Guarantee: reading bitsandbytes' serialization and dequantizing gives bitsandbytes'
/// dequantized values within 1e-6 (plain and double-quantized absmax).
#[test]
fn dequantize_of_their_files_matches_theirs() {
    let f = fixture();
    for &(case, kind, bs, dq) in CASES {
        let q =
            FourBit::from_tensors(&format!("{case}.w"), |k| f.tensor(k, Device::Cpu).ok()).unwrap();
        assert_eq!(
            (
                q.kind,
                q.block_size,
                matches!(q.absmax, Absmax::Double { .. })
            ),
            (kind, bs, dq),
            "{case}"
        );
        let want = floats(&get(&f, &format!("{case}.deq")));
        let d = max_diff(&q.dequantize(), &want);
        assert!(d <= 1e-6, "{case}: max |difference| {d}");
    }
}

/// Guarantee: what we write is what bitsandbytes writes: the same keys, dtypes and shapes;
/// for plain absmax the same bytes; with double quantization the absmax values agree to within
/// one step of the 8-bit map (bitsandbytes' CPU path picks 8-bit codes only approximately).
#[test]
fn our_files_have_their_layout() {
    let f = fixture();
    for &(case, kind, bs, dq) in CASES {
        let x = get(&f, &format!("{case}.x"));
        let ours = FourBit::quantize(
            &floats(&x),
            &x.size(),
            &FourBitConfig {
                kind,
                block_size: bs,
                double_quant: dq,
            },
        )
        .unwrap();
        let name = format!("{case}.w");
        let mut mine: Vec<(String, Tensor)> = ours.to_tensors(&name);
        mine.sort_by(|a, b| a.0.cmp(&b.0));
        let theirs: Vec<String> = f
            .names()
            .into_iter()
            .filter(|n| n == &name || n.starts_with(&format!("{name}.")))
            .collect();
        let my_names: Vec<&String> = mine.iter().map(|(n, _)| n).collect();
        assert_eq!(my_names, theirs.iter().collect::<Vec<_>>(), "{case}: keys");
        for (n, t) in &mine {
            let (shape, _) = f.info(n).unwrap();
            // The JSON's length follows the printed nested_offset, whose last digits differ.
            if !(dq && n.contains("quant_state")) {
                assert_eq!(t.size(), shape, "{n}: shape");
            }
            let want = get(&f, n);
            assert_eq!(t.kind(), want.kind(), "{n}: dtype");
            let exact = !dq || n.ends_with("quant_map") || n == &name;
            if exact && !n.contains("quant_state") {
                assert!(t.equal(&want), "{n}: values differ");
            }
        }
        let theirs_q = FourBit::from_tensors(&name, |k| f.tensor(k, Device::Cpu).ok()).unwrap();
        let (a, b) = (ours.absmax_values(), theirs_q.absmax_values());
        let step = a.iter().fold(0.0f32, |m, v| m.max(v.abs())) * 0.02;
        assert!(
            max_diff(&a, &b) <= step.max(1e-6),
            "{case}: absmax differ by {}",
            max_diff(&a, &b)
        );
        // The quant-state JSON parses to the same description.
        let js = |t: &Tensor| -> serde_json::Value { serde_json::from_slice(&bytes(t)).unwrap() };
        let key = format!("{name}.quant_state.bitsandbytes__{}", kind.name());
        let (mut m, mut t) = (
            js(&mine.iter().find(|(n, _)| n == &key).unwrap().1),
            js(&get(&f, &key)),
        );
        if dq {
            m.as_object_mut().unwrap().remove("nested_offset");
            t.as_object_mut().unwrap().remove("nested_offset");
        }
        assert_eq!(m, t, "{case}: quant_state");
    }
}

/// Guarantee: a file we write loads back to the same tensor (round trip through safetensors).
#[test]
fn round_trip_through_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let x: Vec<f32> = (0..3000)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
        .collect();
    let q = FourBit::quantize(
        &x,
        &[30, 100],
        &FourBitConfig {
            kind: FourBitKind::Fp4,
            block_size: 128,
            double_quant: true,
        },
    )
    .unwrap();
    let p = dir.path().join("q.safetensors");
    frugal_core::safetensors_io::save(&p, &q.to_tensors("layer.weight"), None).unwrap();
    let f = SafetensorsFile::open(&p).unwrap();
    let back = FourBit::from_tensors("layer.weight", |k| f.tensor(k, Device::Cpu).ok()).unwrap();
    assert_eq!(back, q);
}

/// Guarantee: a description that disagrees with the tensors is a named error, not a wrong answer.
#[test]
fn inconsistent_files_are_named_errors() {
    let f = fixture();
    let name = "nf4_b64.w";
    let err = FourBit::from_tensors(name, |k| {
        if k.ends_with(".absmax") {
            Some(Tensor::zeros([3], (Kind::Float, Device::Cpu)))
        } else {
            f.tensor(k, Device::Cpu).ok()
        }
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains(name) && err.contains("absmax"), "{err}");
    let err = FourBit::from_tensors(name, |k| {
        if k == name {
            Some(Tensor::zeros([5, 1], (Kind::Uint8, Device::Cpu)))
        } else {
            f.tensor(k, Device::Cpu).ok()
        }
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("packed bytes"), "{err}");
    let err = FourBit::from_tensors("missing.weight", |k| f.tensor(k, Device::Cpu).ok())
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.weight"), "{err}");
}

/// Guarantee: NF4 error on a seeded 1024 x 1024 randn at block 64 is within bitsandbytes'
/// reported means (abs 0.0728, relative 0.2033) plus a margin for sampling: the relative error
/// has a heavy tail near zero, so one draw varies by about 1%.
#[test]
fn nf4_error_within_bitsandbytes_bounds() {
    tch::manual_seed(0);
    let x = Tensor::randn([1024, 1024], (Kind::Float, Device::Cpu));
    let v = floats(&x);
    let q = FourBit::quantize(&v, &[1024, 1024], &FourBitConfig::default()).unwrap();
    let y = q.dequantize();
    let n = v.len() as f64;
    let abs: f64 = v
        .iter()
        .zip(&y)
        .map(|(a, b)| (a - b).abs() as f64)
        .sum::<f64>()
        / n;
    let rel: f64 = v
        .iter()
        .zip(&y)
        .map(|(a, b)| ((a - b).abs() / (a.abs() + 1e-8)) as f64)
        .sum::<f64>()
        / n;
    assert!(
        abs <= 0.0728 + 1e-3 && rel <= 0.2033 + 5e-3,
        "mean abs {abs}, mean rel {rel}"
    );
}

/// Guarantee: our hard-coded dynamic maps equal bitsandbytes' `create_dynamic_map`, bit for bit.
#[test]
fn dynamic_maps_equal_bitsandbytes() {
    let f = fixture();
    assert_eq!(
        floats(&get(&f, "dynamic_signed")),
        codebook::dynamic_signed().to_vec()
    );
    assert_eq!(
        floats(&get(&f, "dynamic_unsigned")),
        codebook::dynamic_unsigned().to_vec()
    );
}
