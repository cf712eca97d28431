//! Adapters against Hugging Face PEFT (fixtures from `fixtures/peft/gen_peft.py`): a LoRA,
//! rsLoRA and DoRA adapter that PEFT saved load onto the same base and give PEFT's logits;
//! merged equals unmerged; saving writes PEFT's file back; the sharded base loads like the
//! single file; PiSSA starts where PEFT's does; and an adapter for another base is refused.

use frugal_adapters::peft::{self, KEY_PREFIX};
use frugal_adapters::{LoraConfig, Targets};
use frugal_core::safetensors_io::{self, SafetensorsFile};
use frugal_models::adapted::{self, load_adapter, merge_all};
use frugal_models::llama::{Llama, LlamaConfig};
use frugal_models::{weights, EmbeddingKind, LinearKind};
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft")
}

fn config() -> LlamaConfig {
    let text = std::fs::read_to_string(fixtures().join("tiny_llama/config.json")).unwrap();
    LlamaConfig::from_hf_json(&text).unwrap()
}

/// The tiny base, loaded from `file` (relative to the fixtures).
fn base(file: &str) -> (VarStore, Llama) {
    let mut vs = VarStore::new(Device::Cpu);
    let mut model = Llama::new(
        &vs.root(),
        &config(),
        &LinearKind::Dense,
        &EmbeddingKind::Dense,
        Kind::Float,
    )
    .unwrap();
    weights::load_model(&mut vs, &mut model.linears_mut(), &fixtures().join(file)).unwrap();
    (vs, model)
}

fn reference(name: &str) -> Tensor {
    SafetensorsFile::open(&fixtures().join("peft_logits.safetensors"))
        .unwrap()
        .tensor(name, Device::Cpu)
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn logits(model: &Llama) -> Tensor {
    tch::no_grad(|| model.forward(&reference("ids"), None))
}

/// Guarantee: the sharded checkpoint (index + shards) loads to the same model as the single
/// file, and both give transformers' logits.
#[test]
fn sharded_base_loads_like_the_single_file() {
    let (_, single) = base("tiny_llama/model.safetensors");
    let (_, sharded) = base("tiny_llama_sharded/model.safetensors.index.json");
    let (a, b) = (logits(&single), logits(&sharded));
    assert_eq!(max_diff(&a, &b), 0.0);
    assert!(max_diff(&a, &reference("base")) < 1e-4);
    // And back: saving gives the checkpoint's tensors under their own names.
    let (vs, model) = base("tiny_llama_sharded/model.safetensors.index.json");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model.safetensors");
    weights::save_model(&vs, &model.linears(), &out).unwrap();
    let (x, y) = (
        SafetensorsFile::open(&fixtures().join("tiny_llama/model.safetensors")).unwrap(),
        SafetensorsFile::open(&out).unwrap(),
    );
    assert_eq!(x.names(), y.names());
    for n in x.names() {
        let same = x
            .tensor(&n, Device::Cpu)
            .unwrap()
            .equal(&y.tensor(&n, Device::Cpu).unwrap());
        assert!(same, "{n}");
    }
}

/// Guarantee: for LoRA, rsLoRA and DoRA, PEFT's adapter on the base gives PEFT's logits
/// within 1e-4; merged gives PEFT's merged logits and equals unmerged within 1e-4; unmerging
/// gives the adapter's logits back; the adapter changes the logits (it is not zero).
#[test]
fn peft_adapters_give_peft_logits_merged_and_unmerged() {
    for name in ["lora", "rslora", "dora"] {
        let (vs, mut model) = base("tiny_llama/model.safetensors");
        let file = peft::read(&fixtures().join(name)).unwrap();
        let layers = load_adapter(&vs, model.linears_mut(), "default", &file).unwrap();
        let expect_layers = match name {
            "lora" => 4,
            _ => 14,
        };
        assert_eq!(layers.len(), expect_layers, "{name}");
        let ours = logits(&model);
        let theirs = reference(&format!("{name}.logits"));
        let d = max_diff(&ours, &theirs);
        assert!(d < 1e-4, "{name}: |ours - PEFT| = {d}");
        assert!(
            max_diff(&ours, &reference("base")) > 1e-2,
            "{name}: the adapter acts"
        );

        merge_all(model.linears_mut(), true).unwrap();
        let merged = logits(&model);
        let d = max_diff(&merged, &ours);
        assert!(d < 1e-4, "{name}: merged vs unmerged {d}");
        let d = max_diff(&merged, &reference(&format!("{name}.merged")));
        assert!(d < 1e-4, "{name}: merged vs PEFT merged {d}");
        merge_all(model.linears_mut(), false).unwrap();
        let d = max_diff(&logits(&model), &ours);
        assert!(d < 1e-4, "{name}: unmerged back {d}");

        // merge_and_unload: plain dense layers, no adapter variables left, PEFT's merged logits.
        adapted::merge_and_unload(&vs, model.linears_mut(), Kind::Float).unwrap();
        assert!(model.linears().iter().all(|(_, l)| l.adapted().is_none()));
        assert!(vs
            .variables()
            .keys()
            .all(|k| !adapted::is_adapter_variable(k)));
        let d = max_diff(&logits(&model), &reference(&format!("{name}.merged")));
        assert!(d < 1e-4, "{name}: merged and unloaded vs PEFT merged {d}");
    }
}

/// Guarantee: an adapter loaded and saved again gives PEFT's file back (same keys, same
/// tensors) and a config that reads back the same.
#[test]
fn saving_writes_peft_names_back() {
    for name in ["lora", "dora"] {
        let (vs, mut model) = base("tiny_llama/model.safetensors");
        let file = peft::read(&fixtures().join(name)).unwrap();
        load_adapter(&vs, model.linears_mut(), "default", &file).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("adapter");
        let linears = model.linears();
        peft::write(&out, &file.config, &adapted::active_adapters(&linears)).unwrap();
        let a = SafetensorsFile::open(&fixtures().join(name).join(peft::WEIGHTS_FILE)).unwrap();
        let b = SafetensorsFile::open(&out.join(peft::WEIGHTS_FILE)).unwrap();
        assert_eq!(a.names(), b.names(), "{name}");
        assert!(a.names().iter().all(|k| k.starts_with(KEY_PREFIX)));
        for k in a.names() {
            let (x, y) = (
                a.tensor(&k, Device::Cpu).unwrap(),
                b.tensor(&k, Device::Cpu).unwrap(),
            );
            assert_eq!(max_diff(&x, &y), 0.0, "{name}: {k}");
        }
        assert_eq!(b.metadata().get("format").map(String::as_str), Some("pt"));
        let back = peft::read(&out).unwrap();
        assert_eq!(back.config, file.config, "{name}");
    }
}

/// Guarantee: an adapter Frugal saved loads in PEFT and gives our logits there (run when
/// PEFT is installed: `cargo xtask test` installs it and sets FRUGAL_PEFT=1, which makes a
/// missing PEFT a failure instead of a skip).
#[test]
fn frugal_adapter_loads_in_peft() {
    let python = std::env::var("FRUGAL_PYTHON").unwrap_or_else(|_| "python3".into());
    let required = std::env::var("FRUGAL_PEFT").is_ok_and(|v| v == "1");
    let has_peft = std::process::Command::new(&python)
        .args(["-c", "import peft, transformers"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_peft {
        assert!(
            !required,
            "FRUGAL_PEFT=1 but {python} cannot import peft and transformers"
        );
        eprintln!("skipped: {python} has no peft/transformers (cargo xtask test installs them)");
        return;
    }
    // A DoRA adapter of our own, trained one step so that nothing is at its initial value.
    let (vs, mut model) = base("tiny_llama/model.safetensors");
    let cfg = LoraConfig {
        r: 2,
        alpha: 4.0,
        use_dora: true,
        target_modules: Targets::Names(vec!["k_proj".into(), "down_proj".into()]),
        ..LoraConfig::default()
    };
    adapted::add_adapter(&vs, model.linears_mut(), "default", &cfg, "adapter").unwrap();
    let trainable = adapted::freeze_base(&vs);
    assert_eq!(
        trainable.len(),
        2 * 2 * 3,
        "A, B, magnitude of 2 layers x 2 blocks"
    );
    tch::no_grad(|| {
        for (_, t) in &trainable {
            let noise = t.randn_like() * 0.05;
            let _ = t.shallow_clone().g_add_(&noise);
        }
    });
    let ours = logits(&model);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adapter");
    let linears = model.linears();
    peft::write(&out, &cfg, &adapted::active_adapters(&linears)).unwrap();
    let ids_file = dir.path().join("ids.safetensors");
    safetensors_io::save(&ids_file, &[("ids".into(), reference("ids"))], None).unwrap();
    let logits_file = dir.path().join("logits.safetensors");
    let status = std::process::Command::new(&python)
        .arg(fixtures().join("peft_check.py"))
        .arg(fixtures().join("tiny_llama"))
        .arg(&out)
        .arg(&ids_file)
        .arg(&logits_file)
        .status()
        .unwrap();
    assert!(status.success(), "peft_check.py failed");
    let theirs = SafetensorsFile::open(&logits_file)
        .unwrap()
        .tensor("logits", Device::Cpu)
        .unwrap();
    let d = max_diff(&ours, &theirs);
    assert!(d < 1e-4, "PEFT on our adapter: {d}");
}

/// Guarantee: PiSSA's start equals PEFT's (B A and the residual base weight; products, since
/// singular vectors' signs are arbitrary), and it leaves the model's function unchanged.
#[test]
fn pissa_starts_like_peft() {
    let f = SafetensorsFile::open(&fixtures().join("pissa_reference.safetensors")).unwrap();
    let get = |n: &str| f.tensor(n, Device::Cpu).unwrap();
    let s = get("scaling").double_value(&[0]);
    let (a, b, residual) = frugal_adapters::pissa(&get("W"), 4, s);
    assert!(max_diff(&b.matmul(&a), &get("BA")) < 1e-4);
    assert!(max_diff(&residual, &get("residual")) < 1e-4);

    let (vs, mut model) = base("tiny_llama/model.safetensors");
    let before = logits(&model);
    let cfg = LoraConfig {
        r: 4,
        init: frugal_adapters::Init::Pissa,
        target_modules: Targets::Names(vec!["q_proj".into()]),
        ..LoraConfig::default()
    };
    adapted::add_adapter(&vs, model.linears_mut(), "default", &cfg, "adapter").unwrap();
    assert!(max_diff(&logits(&model), &before) < 1e-4);
}

/// Guarantee: an adapter for another base (a layer the model lacks, or other shapes), rank 0
/// and a target module that chooses nothing are errors that name the problem.
#[test]
fn bad_adapters_are_refused_by_name() {
    // Fewer blocks: the file's layer 1 does not exist.
    let mut small = config();
    small.num_hidden_layers = 1;
    let vs = VarStore::new(Device::Cpu);
    let mut model = Llama::new(
        &vs.root(),
        &small,
        &LinearKind::Dense,
        &EmbeddingKind::Dense,
        Kind::Float,
    )
    .unwrap();
    let file = peft::read(&fixtures().join("lora")).unwrap();
    let err = load_adapter(&vs, model.linears_mut(), "default", &file)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.1.self_attn.q_proj") && err.contains("another base"),
        "{err}"
    );
    assert!(adapted::freeze_base(&vs).is_empty(), "nothing was added");

    // Another width of the MLP: DoRA's mlp layers do not fit.
    let mut wide = config();
    wide.intermediate_size = 64;
    let vs = VarStore::new(Device::Cpu);
    let mut model = Llama::new(
        &vs.root(),
        &wide,
        &LinearKind::Dense,
        &EmbeddingKind::Dense,
        Kind::Float,
    )
    .unwrap();
    let file = peft::read(&fixtures().join("dora")).unwrap();
    let err = load_adapter(&vs, model.linears_mut(), "default", &file)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.0.mlp.down_proj") && err.contains("A [4, 48]"),
        "{err}"
    );

    let (vs, mut model) = base("tiny_llama/model.safetensors");
    let zero = LoraConfig {
        r: 0,
        ..LoraConfig::default()
    };
    let err = adapted::add_adapter(&vs, model.linears_mut(), "a", &zero, "adapter")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("adapter.r") && err.contains("at least 1"),
        "{err}"
    );
    let typo = LoraConfig {
        target_modules: Targets::Names(vec!["q_prj".into()]),
        ..LoraConfig::default()
    };
    let err = adapted::add_adapter(&vs, model.linears_mut(), "a", &typo, "adapter")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("adapter.target_modules") && err.contains("'q_prj'"),
        "{err}"
    );

    // A file whose A and B disagree with adapter_config.json's r.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("lora/adapter_config.json")).unwrap(),
    )
    .unwrap();
    cfg["r"] = serde_json::json!(8);
    std::fs::write(bad.join(peft::CONFIG_FILE), cfg.to_string()).unwrap();
    std::fs::copy(
        fixtures().join("lora").join(peft::WEIGHTS_FILE),
        bad.join(peft::WEIGHTS_FILE),
    )
    .unwrap();
    let err = peft::read(&bad).unwrap_err().to_string();
    assert!(
        err.contains("r = 8") && err.contains("adapter_model.safetensors"),
        "{err}"
    );
}

/// Guarantee: several named adapters sit on one base with one active; switching changes the
/// output, and none active gives the base's.
#[test]
fn several_adapters_one_active() {
    let (vs, mut model) = base("tiny_llama/model.safetensors");
    let lora = peft::read(&fixtures().join("lora")).unwrap();
    let rs = peft::read(&fixtures().join("rslora")).unwrap();
    load_adapter(&vs, model.linears_mut(), "lora", &lora).unwrap();
    load_adapter(&vs, model.linears_mut(), "rs", &rs).unwrap();
    // q_proj has both; the first added is active.
    let d = max_diff(&logits(&model), &reference("lora.logits"));
    assert!(d > 1e-3, "rsLoRA is active on the layers without LoRA");
    for (_, l) in model.linears_mut() {
        if let Some(a) = l.adapted_mut() {
            a.set_active(Some("rs")).unwrap();
        }
    }
    assert!(max_diff(&logits(&model), &reference("rslora.logits")) < 1e-4);
    for (_, l) in model.linears_mut() {
        if let Some(a) = l.adapted_mut() {
            a.set_active(None).unwrap();
        }
    }
    assert!(max_diff(&logits(&model), &reference("base")) < 1e-4);
    let err = model.linears_mut()[0]
        .1
        .adapted_mut()
        .unwrap()
        .set_active(Some("nope"))
        .unwrap_err();
    assert!(err.to_string().contains("'nope'"));
}

/// Guarantee: a checkpoint with tied embeddings (`tie_word_embeddings`, no `lm_head.weight`)
/// loads, and its head is the embedding table: the logits equal those of the untied model
/// whose head is a copy of the table.
#[test]
fn tied_embeddings_load_without_lm_head() {
    let dir = tempfile::tempdir().unwrap();
    let all = safetensors_io::load(
        &fixtures().join("tiny_llama/model.safetensors"),
        Device::Cpu,
    )
    .unwrap();
    let embed = all
        .iter()
        .find(|(n, _)| n == "model.embed_tokens.weight")
        .unwrap()
        .1
        .shallow_clone();
    let tied: Vec<(String, Tensor)> = all
        .iter()
        .filter(|(n, _)| n != "lm_head.weight")
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    let untied: Vec<(String, Tensor)> = all
        .iter()
        .map(|(n, t)| {
            let t = if n == "lm_head.weight" {
                embed.shallow_clone()
            } else {
                t.shallow_clone()
            };
            (n.clone(), t)
        })
        .collect();
    safetensors_io::save(&dir.path().join("tied.safetensors"), &tied, None).unwrap();
    safetensors_io::save(&dir.path().join("untied.safetensors"), &untied, None).unwrap();
    let mut cfg = config();
    let mut vs = VarStore::new(Device::Cpu);
    let (_, plain) = {
        let mut m = Llama::new(
            &vs.root(),
            &cfg,
            &LinearKind::Dense,
            &EmbeddingKind::Dense,
            Kind::Float,
        )
        .unwrap();
        weights::load_model(
            &mut vs,
            &mut m.linears_mut(),
            &dir.path().join("untied.safetensors"),
        )
        .unwrap();
        ((), m)
    };
    cfg.tie_word_embeddings = true;
    let mut vs2 = VarStore::new(Device::Cpu);
    let mut m = Llama::new(
        &vs2.root(),
        &cfg,
        &LinearKind::Dense,
        &EmbeddingKind::Dense,
        Kind::Float,
    )
    .unwrap();
    assert!(!vs2.variables().contains_key("lm_head.weight"));
    weights::load_model(
        &mut vs2,
        &mut m.linears_mut(),
        &dir.path().join("tied.safetensors"),
    )
    .unwrap();
    assert!(max_diff(&logits(&m), &logits(&plain)) < 1e-6);
}
