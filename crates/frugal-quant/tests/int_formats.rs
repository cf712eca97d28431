//! Checks the int8, int4 (GPTQ v2) and ternary quantizers against independent torch
//! implementations: `tests/fixtures/int_formats.safetensors`, written by `fixtures/gen_int.py`.

use frugal_core::safetensors_io::SafetensorsFile;
use frugal_quant::int4::Int4Gptq;
use frugal_quant::int8::Int8Rowwise;
use frugal_quant::ternary::Ternary;
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn fixture() -> SafetensorsFile {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/int_formats.safetensors");
    SafetensorsFile::open(&p).expect("fixture: run tests/fixtures/gen_int.py")
}

fn get(f: &SafetensorsFile, name: &str) -> Tensor {
    f.tensor(name, Device::Cpu).unwrap()
}

fn vec_of<T: tch::kind::Element + Copy>(t: &Tensor) -> Vec<T> {
    Vec::<T>::try_from(&t.reshape([-1i64])).unwrap()
}

/// Case names of `format` in the fixture (`format.CASE.w`).
fn cases(f: &SafetensorsFile, format: &str) -> Vec<String> {
    let c: Vec<String> = f
        .names()
        .into_iter()
        .filter_map(|n| {
            n.strip_prefix(&format!("{format}."))?
                .strip_suffix(".w")
                .map(str::to_string)
        })
        .collect();
    assert!(c.len() >= 3, "{format}: too few cases {c:?}");
    c
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (k, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= tol, "{what}[{k}]: {a} vs {b}");
    }
}

/// Int8: codes and SCB equal bitsandbytes' rule (f16 cast, round half to even, zero row ->
/// SCB 0), dequantized within 1e-6; the tensors read back through `from_tensors`.
#[test]
fn int8_matches_torch_reference() {
    let f = fixture();
    for c in cases(&f, "int8") {
        let w = get(&f, &format!("int8.{c}.w"));
        let (rows, cols) = w.size2().unwrap();
        let q = Int8Rowwise::quantize(&vec_of::<f32>(&w), rows as usize, cols as usize).unwrap();
        assert_eq!(
            q.codes,
            vec_of::<i8>(&get(&f, &format!("int8.{c}.codes"))),
            "{c}: codes"
        );
        assert_eq!(
            q.scb,
            vec_of::<f32>(&get(&f, &format!("int8.{c}.scb"))),
            "{c}: SCB"
        );
        let want = vec_of::<f32>(&get(&f, &format!("int8.{c}.deq")));
        assert_close(&q.dequantize(), &want, 1e-6, &c);
        let map: HashMap<String, Tensor> = q.to_tensors("x").into_iter().collect();
        let back = Int8Rowwise::from_tensors("x", |n| map.get(n).map(|t| t.shallow_clone()));
        assert_eq!(back.unwrap(), q, "{c}: round trip");
    }
}

/// Int4: qweight, qzeros (v2), f16 scales and g_idx equal the torch GPTQ quantizer and
/// AutoGPTQ packing bit for bit, including an all-zero group and an all-positive row;
/// dequantized within 1e-6; reading the reference tensors gives the same weight.
#[test]
fn int4_matches_torch_reference() {
    let f = fixture();
    for c in cases(&f, "int4") {
        let p = vec_of::<i64>(&get(&f, &format!("int4.{c}.params")));
        let (rows, cols, gs) = (p[0] as usize, p[1] as usize, p[2] as usize);
        let w = vec_of::<f32>(&get(&f, &format!("int4.{c}.w")));
        let q = Int4Gptq::quantize(&w, rows, cols, gs).unwrap();
        let t = |k: &str| get(&f, &format!("int4.{c}.{k}"));
        assert_eq!(q.qweight, vec_of::<i32>(&t("qweight")), "{c}: qweight");
        assert_eq!(q.qzeros, vec_of::<i32>(&t("qzeros")), "{c}: qzeros");
        assert_eq!(t("scales").kind(), Kind::Half);
        assert_eq!(q.scales, vec_of::<f32>(&t("scales")), "{c}: scales");
        assert_eq!(q.g_idx, vec_of::<i32>(&t("g_idx")), "{c}: g_idx");
        assert_close(&q.dequantize(), &vec_of::<f32>(&t("deq")), 1e-6, &c);
        let back = Int4Gptq::from_tensors("r", false, |n| {
            let k = n.strip_prefix("r.")?;
            f.tensor(&format!("int4.{c}.{k}"), Device::Cpu).ok()
        })
        .unwrap();
        assert_eq!(back.dequantize(), q.dequantize(), "{c}: read back");
        assert_eq!(back.group_size, gs);
    }
}

/// Ternary: packed bytes (order, padding) and scales equal the torch BitNet absmean
/// reference, per tensor and per row group, zero row included; dequantized within 1e-6; the
/// tensors read back through `from_tensors`.
#[test]
fn ternary_matches_torch_reference() {
    let f = fixture();
    for c in cases(&f, "ternary") {
        let p = vec_of::<i64>(&get(&f, &format!("ternary.{c}.params")));
        let (rows, cols, rps) = (p[0] as usize, p[1] as usize, p[2] as usize);
        let w = vec_of::<f32>(&get(&f, &format!("ternary.{c}.w")));
        let q = Ternary::quantize(&w, rows, cols, Some(rps)).unwrap();
        let t = |k: &str| get(&f, &format!("ternary.{c}.{k}"));
        assert_eq!(q.packed, vec_of::<u8>(&t("packed")), "{c}: packed");
        assert_eq!(q.scales, vec_of::<f32>(&t("scales")), "{c}: scales");
        assert_close(&q.dequantize(), &vec_of::<f32>(&t("deq")), 1e-6, &c);
        let map: HashMap<String, Tensor> = q.to_tensors("x").into_iter().collect();
        let back = Ternary::from_tensors("x", |n| map.get(n).map(|t| t.shallow_clone()));
        assert_eq!(back.unwrap(), q, "{c}: round trip");
    }
}
