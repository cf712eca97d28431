//! `frugal quantize`, `frugal dequantize` and `frugal inspect` on quantized files and folders:
//! every format round-trips within its error, tensors left alone stay bit-identical, folders
//! get the `quantization_config` transformers expects, and bad options are named errors.

mod common;

use common::*;
use frugal_core::safetensors_io::{self, SafetensorsFile};
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn write_model(path: &Path) {
    tch::manual_seed(3);
    let t = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 0.05;
    let tensors = vec![
        ("model.embed_tokens.weight".to_string(), t(&[64, 128])),
        (
            "model.layers.0.self_attn.q_proj.weight".to_string(),
            t(&[128, 128]),
        ),
        (
            "model.layers.0.mlp.up_proj.weight".to_string(),
            t(&[256, 128]),
        ),
        (
            "model.layers.0.mlp.down_proj.weight".to_string(),
            t(&[128, 256]),
        ),
        (
            "model.layers.0.input_layernorm.weight".to_string(),
            Tensor::ones([128], (Kind::Float, Device::Cpu)),
        ),
        ("lm_head.weight".to_string(), t(&[64, 128])),
    ];
    safetensors_io::save(path, &tensors, None).unwrap();
}

fn load(path: &Path) -> Vec<(String, Tensor)> {
    safetensors_io::load(path, Device::Cpu).unwrap()
}

/// Guarantee: for each format, quantize then dequantize gives every linear weight back within
/// the format's error, and leaves embeddings, norms and the head bit-identical.
#[test]
fn every_format_round_trips_through_files() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("model.safetensors");
    write_model(&input);
    let original = load(&input);
    // Relative Frobenius error allowed per format.
    for (format, extra, tol) in [
        ("nf4", vec!["--double-quant"], 0.12),
        ("fp4", vec!["--block-size", "128"], 0.2),
        ("int8", vec![], 0.01),
        ("int4", vec!["--group-size", "64"], 0.12),
        ("ternary", vec![], 0.75),
    ] {
        let q = dir.path().join(format!("{format}.safetensors"));
        let back = dir.path().join(format!("{format}-back.safetensors"));
        let out = run({
            let mut c = frugal(dir.path());
            c.arg("quantize")
                .arg(&input)
                .arg(&q)
                .args(["--format", format])
                .args(&extra);
            c
        });
        assert!(out.status.success(), "{format}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("smaller"),
            "{format}: no table"
        );
        let out = run({
            let mut c = frugal(dir.path());
            c.arg("inspect").arg(&q);
            c
        });
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("bits per parameter") && text.contains(format),
            "{format}: {text}"
        );
        let out = run({
            let mut c = frugal(dir.path());
            c.arg("dequantize").arg(&q).arg(&back);
            c
        });
        assert!(out.status.success(), "{format}");
        let restored = load(&back);
        assert_eq!(restored.len(), original.len(), "{format}: tensor count");
        for ((n, a), (m, b)) in original.iter().zip(&restored) {
            assert_eq!(n, m);
            let linear = n.contains("_proj");
            if linear {
                let rel = ((a - b).norm().double_value(&[])) / a.norm().double_value(&[]);
                assert!(rel < tol && rel > 0.0, "{format} {n}: relative error {rel}");
            } else {
                assert!(a.equal(b), "{format} {n}: changed although not selected");
            }
        }
    }
}

/// Guarantee: a model folder gets config.json's quantization_config (and GPTQ's
/// quantize_config.json), its other files copied; dequantize removes the config again.
#[test]
fn folders_get_the_quantization_config() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    std::fs::create_dir_all(&m).unwrap();
    write_model(&m.join("model.safetensors"));
    std::fs::write(
        m.join("config.json"),
        r#"{"model_type": "llama", "hidden_size": 128}"#,
    )
    .unwrap();
    std::fs::write(m.join("tokenizer.json"), "{}").unwrap();
    for (format, method) in [("nf4", "bitsandbytes"), ("int4", "gptq")] {
        let out_dir = dir.path().join(format);
        let mut c = frugal(dir.path());
        c.arg("quantize")
            .arg(&m)
            .arg(&out_dir)
            .args(["--format", format]);
        assert!(run(c).status.success());
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out_dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["quantization_config"]["quant_method"], method);
        assert_eq!(cfg["hidden_size"], 128);
        assert!(out_dir.join("tokenizer.json").is_file());
        assert_eq!(
            out_dir.join("quantize_config.json").is_file(),
            format == "int4"
        );
        let back = dir.path().join(format!("{format}-back"));
        let mut c = frugal(dir.path());
        c.arg("dequantize").arg(&out_dir).arg(&back);
        assert!(run(c).status.success());
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(back.join("config.json")).unwrap())
                .unwrap();
        assert!(cfg.get("quantization_config").is_none());
        assert!(SafetensorsFile::open(&back.join("model.safetensors"))
            .unwrap()
            .names()
            .contains(&"model.layers.0.mlp.up_proj.weight".to_string()));
    }
}

/// Guarantee: bad options and shapes that do not divide are one-line errors naming the problem.
#[test]
fn bad_options_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("model.safetensors");
    write_model(&input);
    let q = dir.path().join("q.safetensors");
    let case = |args: &[&str], needle: &str| {
        let mut c = frugal(dir.path());
        c.arg("quantize").arg(&input).arg(&q).args(args);
        assert_clean_error(&run(c), needle);
        assert!(!q.exists(), "a failed quantize left an output file");
    };
    case(&["--format", "int3"], "int3");
    case(&["--format", "nf4", "--block-size", "48"], "block_size");
    case(&["--format", "int4", "--group-size", "96"], "group_size");
    case(&["--format", "nf4", "--include", "("], "--include");
    case(
        &["--format", "nf4", "--include", "nothing_matches"],
        "no tensor was selected",
    );
}
