//! Adapters on the BERT-style encoder end to end: a tiny masked-LM run is the frozen base; an
//! adapter run on it (masked LM; classification, whose new pooler and classifier train too)
//! trains the adapter alone, saves PEFT's files (checkpoints hold the adapter alone), resumes
//! bit for bit, evaluates (`frugal eval --run`, `--model BASE --adapter DIR`), and refuses bad
//! combinations by key. The cross-check against Hugging Face PEFT
//! (`encoder_peft_check.py`, beside this file) loads the base folder in transformers, applies
//! Frugal's adapter with `PeftModel.from_pretrained`, and compares logits and losses.

mod common;

use common::*;
use frugal_core::safetensors_io::{self, SafetensorsFile};
use frugal_models::encoder::EncoderConfig;
use frugal_train::config::Config;
use frugal_train::encoder_model::{micro_loss, EncoderModel, Net};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Settings of a tiny encoder on the test corpus.
fn encoder_settings(corpus: &Path) -> Vec<String> {
    let mut s = small_settings(corpus);
    s.extend([
        "model.kind=\"encoder\"".into(),
        "model.size=\"encoder-tiny\"".into(),
    ]);
    s
}

/// A masked-LM run of 4 steps: the base of the adapter runs.
fn base_run(dir: &Path, corpus: &Path) -> PathBuf {
    let out = dir.join("base");
    let mut sets = encoder_settings(corpus);
    sets.extend(["train.max_steps=4".into(), "train.eval_every=0".into()]);
    assert!(
        run(train_cmd(dir, &out, &sets)).status.success(),
        "base run"
    );
    out
}

/// The settings of an adapter run of `kind` on `base`, then `extra`.
fn adapter_settings(corpus: &Path, base: &Path, kind: &str, extra: &[&str]) -> Vec<String> {
    let mut s = encoder_settings(corpus);
    s.extend([
        format!("model.from_pretrained=\"{}\"", base.display()),
        format!("adapter.kind=\"{kind}\""),
        "adapter.r=4".into(),
        "adapter.alpha=8".into(),
        "adapter.group_size=32".into(),
        "train.lr=0.01".into(),
    ]);
    s.extend(extra.iter().map(|e| e.to_string()));
    s
}

/// The settings that make an adapter run a classification run on `task`.
fn classification(task: &Path) -> Vec<String> {
    vec![
        "train.objective=\"classification\"".into(),
        format!("data.task_path=\"{}\"", task.display()),
        "train.batch_size=16".into(),
    ]
}

fn json_file(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `frugal eval ARGS` as JSON.
fn eval(dir: &Path, args: &[&str]) -> serde_json::Value {
    let mut c = frugal(dir);
    c.arg("eval").args(args);
    let out = run(c);
    assert!(out.status.success(), "eval {args:?} failed");
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
}

/// The tensor names of an adapter folder's weights file.
fn adapter_keys(dir: &Path) -> Vec<String> {
    SafetensorsFile::open(&dir.join("adapter_model.safetensors"))
        .unwrap()
        .names()
}

/// The base run's shape and weights (its latest checkpoint).
fn base_parts(base: &Path) -> (EncoderConfig, PathBuf) {
    let text = std::fs::read_to_string(base.join("config.json")).unwrap();
    let latest = std::fs::read_to_string(base.join("checkpoints/latest")).unwrap();
    let file = base
        .join("checkpoints")
        .join(latest.trim())
        .join("model.safetensors");
    (EncoderConfig::from_hf_json(&text).unwrap(), file)
}

/// Guarantee: a masked-LM adapter run on a masked-LM run writes PEFT's files for
/// `BertForMaskedLM` (`task_type` null, PEFT's BERT default targets `query` and `value`, keys
/// `base_model.model.bert.encoder.layer.N.attention.self.query.lora_A.weight`...) into every
/// checkpoint, which holds nothing else, and into `adapter/`, leaving the base run's files as
/// they were; resumed from its middle checkpoint (dropout on, gradient accumulation) it gives
/// the uninterrupted run's losses, validation losses and adapter bit for bit; `frugal eval
/// --run` gives its last validation loss, and `frugal eval --model BASE --adapter RUN/adapter`
/// scores text with it.
#[test]
fn mlm_adapter_run_saves_peft_files_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 20);
    let base = base_run(dir.path(), &corpus);
    let (_, base_weights) = base_parts(&base);
    let base_bytes = std::fs::read(&base_weights).unwrap();
    let full = dir.path().join("full");
    let sets = adapter_settings(
        &corpus,
        &base,
        "lora",
        &[
            "adapter.dropout=0.1",
            "train.grad_accum=2",
            "train.max_steps=6",
            "train.save_every=3",
            "train.keep_checkpoints=0",
            "train.eval_every=3",
        ],
    );
    assert!(run(train_cmd(dir.path(), &full, &sets)).status.success());

    for ck in ["checkpoints/step-3", "checkpoints/step-6", "adapter"] {
        let d = full.join(ck);
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            assert!(d.join(f).is_file(), "{ck}/{f}");
        }
        assert!(!d.join("model.safetensors").exists(), "{ck} holds the base");
    }
    let mut want = Vec::new();
    for layer in 0..2 {
        for m in ["query", "value"] {
            for ab in ["A", "B"] {
                want.push(format!(
                    "base_model.model.bert.encoder.layer.{layer}.attention.self.{m}.lora_{ab}.weight"
                ));
            }
        }
    }
    want.sort();
    assert_eq!(adapter_keys(&full.join("adapter")), want);
    let cfg = json_file(&full.join("adapter/adapter_config.json"));
    assert_eq!(cfg["peft_type"], "LORA");
    assert!(cfg["task_type"].is_null(), "{cfg}");
    assert_eq!(cfg["target_modules"], serde_json::json!(["query", "value"]));
    assert!(cfg["modules_to_save"].is_null());
    assert_eq!(cfg["base_model_name_or_path"], base.to_str().unwrap());
    assert_eq!(cfg["r"], 4);
    assert!(
        std::fs::read(&base_weights).unwrap() == base_bytes,
        "the base run's weights changed"
    );
    let memory = json_file(&full.join("memory.json"));
    assert!(memory["frozen_base"]["other_params"].as_u64().unwrap() > 0);

    let part = dir.path().join("part");
    copy_dir(&full, &part);
    std::fs::remove_dir_all(part.join("checkpoints/step-6")).unwrap();
    std::fs::write(part.join("checkpoints/latest"), "step-3\n").unwrap();
    let mut c = frugal(dir.path());
    c.arg("train").arg("--resume").arg(&part);
    assert!(run(c).status.success());
    assert_eq!(losses(&full).len(), 6);
    assert_eq!(losses(&full), losses(&part));
    let vals = |r: &Path| -> Vec<String> {
        metrics(r)
            .iter()
            .map(|l| l["val_loss"].to_string())
            .collect()
    };
    assert_eq!(vals(&full), vals(&part));
    for f in [
        "checkpoints/step-6/adapter_model.safetensors",
        "adapter/adapter_model.safetensors",
    ] {
        let (a, b) = (
            std::fs::read(full.join(f)).unwrap(),
            std::fs::read(part.join(f)).unwrap(),
        );
        assert!(a == b, "{f}: the resumed adapter differs");
    }

    let last = metrics(&full)[5]["val_loss"].as_f64().unwrap();
    let e = eval(dir.path(), &["--run", full.to_str().unwrap()]);
    let l = e["loss"].as_f64().unwrap();
    assert!((l - last).abs() < 1e-5, "eval {l} vs last val_loss {last}");
    let data = corpus.join("doc000.txt");
    let (b, d) = (base.to_str().unwrap(), data.to_str().unwrap());
    let a = full.join("adapter");
    let with = eval(
        dir.path(),
        &["--model", b, "--adapter", a.to_str().unwrap(), "--data", d],
    );
    let plain = eval(dir.path(), &["--model", b, "--data", d]);
    let (w, p) = (
        with["loss"].as_f64().unwrap(),
        plain["loss"].as_f64().unwrap(),
    );
    assert!(w.is_finite() && p.is_finite() && w != p, "{w} vs {p}");
}

/// Guarantee: a classifier's adapter run trains the adapter and the new pooler and
/// classifier (saved as PEFT saves `modules_to_save`: `base_model.model.classifier.weight`,
/// `task_type` `SEQ_CLS`), learns the which-words task well above chance, and `frugal eval
/// --run` reports its last validation loss and accuracy.
#[test]
fn classifier_adapter_trains_the_head_and_saves_it_as_peft() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 20);
    let base = base_run(dir.path(), &corpus);
    let task = dir.path().join("task.tsv");
    task_tsv(&task, 300, 7);
    let r = dir.path().join("cls");
    let mut sets = adapter_settings(
        &corpus,
        &base,
        "lora",
        &["train.max_steps=40", "train.eval_every=20"],
    );
    sets.extend(classification(&task));
    sets.push("train.lr=0.03".into());
    assert!(run(train_cmd(dir.path(), &r, &sets)).status.success());
    let keys = adapter_keys(&r.join("adapter"));
    for head in [
        "base_model.model.bert.pooler.dense.weight",
        "base_model.model.bert.pooler.dense.bias",
        "base_model.model.classifier.weight",
        "base_model.model.classifier.bias",
    ] {
        assert!(keys.iter().any(|k| k == head), "{head} not in {keys:?}");
    }
    assert_eq!(keys.len(), 4 + 2 * 2 * 2, "{keys:?}");
    let cfg = json_file(&r.join("adapter/adapter_config.json"));
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(
        cfg["modules_to_save"],
        serde_json::json!(["pooler", "classifier", "score"])
    );
    assert!(!r.join("checkpoints/step-40/model.safetensors").exists());
    let lines = metrics(&r);
    let acc = lines[39]["val_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.85, "validation accuracy {acc} (chance 0.5)");
    let e = eval(dir.path(), &["--run", r.to_str().unwrap()]);
    assert!((e["accuracy"].as_f64().unwrap() - acc).abs() < 1e-9, "{e}");
    let vl = lines[39]["val_loss"].as_f64().unwrap();
    assert!((e["loss"].as_f64().unwrap() - vl).abs() < 1e-5, "{e}");
}

/// Guarantee: with an adapter only the adapter's variables (and a classifier's new pooler and
/// classifier) change in optimizer steps: every other variable of the base is bit-identical
/// and takes no gradient, every trainable one moves; for LoRA, DoRA (with activation
/// checkpointing), QLoRA (an NF4 base) and QA-LoRA (an int4 base) on the masked LM, and LoRA
/// on a classifier.
#[test]
fn only_the_adapter_and_a_new_head_train() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 20);
    let base = base_run(dir.path(), &corpus);
    let task = dir.path().join("task.tsv");
    task_tsv(&task, 40, 3);
    let (shape, weights) = base_parts(&base);
    for (kind, cls, checkpointing) in [
        ("lora", false, false),
        ("dora", false, true),
        ("qlora", false, false),
        ("qalora", false, false),
        ("lora", true, false),
    ] {
        let mut sets = adapter_settings(&corpus, &base, kind, &[]);
        if cls {
            sets.extend(classification(&task));
        }
        let cfg: Config = frugal_train::config::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/default.toml"),
            &sets,
        )
        .unwrap();
        let what = format!("{kind} (classifier {cls}, checkpointing {checkpointing})");
        let mut m =
            EncoderModel::new(&cfg.model_build(), &shape, cls.then_some(2), Device::Cpu).unwrap();
        m.load_pretrained(&weights).unwrap();
        let params = m.add_adapter(&cfg).unwrap();
        let heads = params
            .iter()
            .filter(|(n, _)| !frugal_models::adapted::is_adapter_variable(n))
            .count();
        assert_eq!(heads, if cls { 4 } else { 0 }, "{what}: {params:?}");
        let family = m.linears()[0].1.quantized().map(|q| q.weight.family());
        let want = match kind {
            "qlora" => Some("4bit"),
            "qalora" => Some("int4"),
            _ => None,
        };
        assert_eq!(family, want, "{what}: the base's quantization");
        let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
        let frozen: Vec<(String, Tensor)> = frugal_models::weights::named_variables(&m.vs)
            .into_iter()
            .filter(|(n, _)| !names.contains(n))
            .map(|(n, t)| (n, t.detach().copy()))
            .collect();
        let before: Vec<Tensor> = params.iter().map(|(_, t)| t.detach().copy()).collect();
        let tensors: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
        let mut opt =
            frugal_train::optimizers::build(&cfg.optim, cfg.train.seed, params, 0.01).unwrap();
        m.set_training(true);
        tch::manual_seed(5);
        let ids = Tensor::randint(shape.vocab_size, [4, 12], (Kind::Int64, Device::Cpu));
        let inputs = if cls {
            vec![
                ids.shallow_clone(),
                ids.zeros_like(),
                ids.ones_like(),
                Tensor::from_slice(&[0i64, 1, 1, 0]),
            ]
        } else {
            let pick = ids.remainder(3).eq(0);
            vec![
                ids.shallow_clone(),
                ids.where_self(&pick, &ids.full_like(-100)),
            ]
        };
        for _ in 0..3 {
            let (loss, _, ck) = micro_loss(&m, &inputs, checkpointing, false);
            loss.backward();
            if let Some(ck) = ck {
                ck.backward(m.encoder());
            }
            opt.step().unwrap();
            opt.zero_grad();
        }
        let vars = m.vs.variables();
        for (n, t) in &frozen {
            assert!(vars[n].equal(t), "{what}: base variable {n} changed");
            assert!(!vars[n].requires_grad(), "{what}: {n} takes a gradient");
        }
        for ((n, b), t) in names.iter().zip(&before).zip(&tensors) {
            let moved = (t - b).abs().max().double_value(&[]);
            assert!(moved > 0.0, "{what}: {n} did not train");
        }
        assert!(matches!(m.net, Net::Cls(_)) == cls);
    }
}

/// Guarantee: what an encoder's adapter does not combine with is a one-line error naming the
/// key: an adapter on hgrn-bit, a target that chooses no layer of the encoder (llama's names),
/// rank adaptation of the frozen base, QLoRA over a TT base, and a masked-LM adapter on a base
/// without the masked-LM head.
#[test]
fn bad_encoder_adapter_settings_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 10);
    let base = base_run(dir.path(), &corpus);
    // The base without its masked-LM head.
    let headless = dir.path().join("headless");
    std::fs::create_dir_all(&headless).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(base.join(f), headless.join(f)).unwrap();
    }
    let (_, weights) = base_parts(&base);
    let body: Vec<(String, Tensor)> = safetensors_io::load(&weights, Device::Cpu)
        .unwrap()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("cls."))
        .collect();
    safetensors_io::save(&headless.join("model.safetensors"), &body, None).unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "model.kind=\"hgrn-bit\"",
                "model.size=\"tiny\"",
                "model.from_pretrained=\"\"",
            ],
            "adapter.kind",
        ),
        (&["adapter.target_modules=[\"q_proj\"]"], "'q_proj'"),
        (
            &[
                "model.linear.kind=\"tt\"",
                "adapter.kind=\"lora\"",
                "tt.rank_adapt=true",
            ],
            "tt.rank_adapt",
        ),
        (
            &["model.linear.kind=\"tt\"", "adapter.kind=\"qlora\""],
            "model.linear",
        ),
        (
            &[&format!("model.from_pretrained=\"{}\"", headless.display())],
            "model.from_pretrained",
        ),
    ];
    for (i, (extra, needle)) in cases.iter().enumerate() {
        let mut sets = adapter_settings(&corpus, &base, "lora", extra);
        sets.push("train.max_steps=1".into());
        let out = run(train_cmd(
            dir.path(),
            &dir.path().join(format!("x{i}")),
            &sets,
        ));
        assert_clean_error(&out, needle);
    }
}

/// A Hugging Face model folder of a run: its `config.json`, `tokenizer.json` and latest
/// checkpoint's `model.safetensors`.
fn model_folder(run_dir: &Path, out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(run_dir.join(f), out.join(f)).unwrap();
    }
    let (_, weights) = base_parts(run_dir);
    std::fs::copy(weights, out.join("model.safetensors")).unwrap();
}

/// The largest absolute difference of two tensors.
fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Frugal's logits and loss of `inputs` (masked LM `[ids, labels]`; classification `[ids,
/// types, mask, labels]`) with the base `weights` and the adapter folder `adapter`, as
/// `frugal eval` builds them.
fn frugal_outputs(
    cfg: &Config,
    shape: &EncoderConfig,
    weights: &Path,
    adapter: &Path,
    inputs: &[Tensor],
    num_labels: Option<i64>,
) -> (Tensor, f64) {
    let mut m = EncoderModel::new(&cfg.model_build(), shape, num_labels, Device::Cpu).unwrap();
    m.load_pretrained(weights).unwrap();
    m.load_adapter(adapter, "default").unwrap();
    m.set_training(false);
    tch::no_grad(|| {
        let (loss, _, _) = micro_loss(&m, inputs, false, false);
        let logits = match (&m.net, inputs) {
            (Net::Mlm(mlm), [ids, _]) => mlm.logits(ids, None, None),
            (Net::Cls(c), [ids, types, mask, _]) => c.classify_logits(ids, Some(types), Some(mask)),
            _ => unreachable!("inputs of the model's objective"),
        };
        (logits, loss.double_value(&[]))
    })
}

/// Guarantee: Frugal's encoder adapters load in Hugging Face PEFT 0.21 exactly as saved
/// (`PeftModel.from_pretrained` on the base folder in transformers holds every tensor of the
/// file, no more, no less) and give Frugal's outputs there: a masked-LM LoRA adapter (PEFT's
/// default targets), a masked-LM DoRA adapter on every block linear layer, and a classifier's
/// LoRA adapter with its pooler and classifier (`SEQ_CLS`, `modules_to_save`); logits and
/// losses agree within 1e-5 (f32; measured: at most 3e-7).
#[test]
fn encoder_adapters_load_in_peft_and_match() {
    let Some(python) = peft_python() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 20);
    let base = base_run(dir.path(), &corpus);
    let folder = dir.path().join("base_model");
    model_folder(&base, &folder);
    let task = dir.path().join("task.tsv");
    task_tsv(&task, 80, 5);
    let (shape, weights) = base_parts(&base);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/encoder_peft_check.py");
    let cases: [(&str, &str, &[&str]); 3] = [
        ("mlm-lora", "lora", &[]),
        (
            "mlm-dora",
            "dora",
            &["adapter.target_modules=\"all-linear\""],
        ),
        ("cls-lora", "lora", &["classification"]),
    ];
    for (name, kind, extra) in cases {
        let cls = extra.contains(&"classification");
        let mut sets = adapter_settings(&corpus, &base, kind, &["train.max_steps=3"]);
        if cls {
            sets.extend(classification(&task));
        } else {
            sets.extend(extra.iter().map(|s| s.to_string()));
        }
        let out = dir.path().join(name);
        assert!(run(train_cmd(dir.path(), &out, &sets)).status.success());
        let adapter = out.join("adapter");
        let cfg = frugal_train::run::read_config(&out, &[]).unwrap();

        tch::manual_seed(9);
        let ids = Tensor::randint(shape.vocab_size, [3, 10], (Kind::Int64, Device::Cpu));
        let (inputs, num_labels) = if cls {
            // Rows of 10, 7 and 5 real tokens (then padding), the second half of each of type 1.
            let (mut mask, mut types) = (Vec::new(), Vec::new());
            for n in [10i64, 7, 5] {
                for j in 0..10 {
                    mask.push(i64::from(j < n));
                    types.push(i64::from(j >= n / 2 && j < n));
                }
            }
            let mask = Tensor::from_slice(&mask).view([3, 10]);
            let ids = ids.where_self(&mask.ne(0), &ids.zeros_like());
            let types = Tensor::from_slice(&types).view([3, 10]);
            let labels = Tensor::from_slice(&[0i64, 1, 1]);
            (vec![ids, types, mask, labels], Some(2))
        } else {
            let labels = ids.where_self(&ids.remainder(4).eq(1), &ids.full_like(-100));
            (vec![ids.shallow_clone(), labels], None)
        };
        let (ours, our_loss) =
            frugal_outputs(&cfg, &shape, &weights, &adapter, &inputs, num_labels);

        let names = if cls {
            ["ids", "token_types", "attention_mask", "labels"].as_slice()
        } else {
            ["ids", "labels"].as_slice()
        };
        let named: Vec<(String, Tensor)> = names
            .iter()
            .zip(&inputs)
            .map(|(n, t)| (n.to_string(), t.shallow_clone()))
            .collect();
        let inputs_file = dir.path().join(format!("{name}.inputs.safetensors"));
        safetensors_io::save(&inputs_file, &named, None).unwrap();
        let out_file = dir.path().join(format!("{name}.peft.safetensors"));
        let status = std::process::Command::new(&python)
            .arg(&script)
            .arg(&folder)
            .arg(&adapter)
            .arg(&inputs_file)
            .arg(&out_file)
            .status()
            .unwrap();
        assert!(status.success(), "{name}: encoder_peft_check.py failed");
        let f = SafetensorsFile::open(&out_file).unwrap();
        let theirs = f.tensor("logits", Device::Cpu).unwrap();
        let their_loss = f.tensor("loss", Device::Cpu).unwrap().double_value(&[]);
        assert_eq!(ours.size(), theirs.size(), "{name}");
        let d = max_diff(&ours, &theirs);
        let dl = (our_loss - their_loss).abs();
        eprintln!("{name}: |logits - PEFT's| <= {d:.2e}, |loss - PEFT's| = {dl:.2e}");
        assert!(d < 1e-5, "{name}: logits differ from PEFT's by {d}");
        assert!(dl < 1e-5, "{name}: loss {our_loss} vs PEFT's {their_loss}");
    }
}
