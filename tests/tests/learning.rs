//! Across crates: the trainer, the model and the optimizer together learn — validation loss
//! ends well below the unigram loss on text whose next word follows from the context — and a
//! CUDA run works when a GPU is present.

use frugal_train::config::{self, Config};
use std::path::Path;

/// Text where each word predicts the next: counting runs of random start and length.
fn counting_corpus(dir: &Path) -> std::path::PathBuf {
    let words = [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen",
    ];
    let root = dir.join("counting");
    std::fs::create_dir_all(&root).unwrap();
    let mut s = 99u64;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as usize
    };
    for d in 0..24 {
        let mut text = String::new();
        for _ in 0..60 {
            let start = next() % words.len();
            let len = 3 + next() % 8;
            for k in 0..len {
                text.push_str(words[(start + k) % words.len()]);
                text.push(' ');
            }
            text.push_str("|\n");
        }
        std::fs::write(root.join(format!("d{d:02}.txt")), text).unwrap();
    }
    root
}

fn small_config(corpus: &Path, device: &str, dtype: &str, steps: u64) -> Config {
    let mut table = toml::Table::new();
    let sets = [
        format!("data.path=\"{}\"", corpus.display()),
        "data.val_every=6".into(),
        "tokenizer.vocab_size=300".into(),
        "model.hidden_size=64".into(),
        "model.intermediate_size=128".into(),
        "model.num_layers=2".into(),
        "model.num_heads=4".into(),
        format!("train.device=\"{device}\""),
        format!("train.dtype=\"{dtype}\""),
        "train.batch_size=8".into(),
        "train.seq_len=64".into(),
        format!("train.max_steps={steps}"),
        "train.warmup_steps=5".into(),
        "train.lr=0.01".into(),
        "train.eval_every=0".into(),
        "train.eval_batches=0".into(),
        "train.threads=2".into(),
    ];
    config::apply_overrides(&mut table, &sets).unwrap();
    config::from_table(table).unwrap()
}

/// Guarantee: 80 steps take the validation loss to less than half the unigram loss.
#[test]
fn training_beats_the_unigram_model() {
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("FRUGAL_CACHE", dir.path().join("cache"));
    let corpus = counting_corpus(dir.path());
    let cfg = small_config(&corpus, "cpu", "f32", 80);
    let s = frugal_train::train::train(&cfg, &dir.path().join("run"), false).unwrap();
    assert_eq!(s.steps, 80);
    assert!(
        s.val_loss < 0.5 * s.unigram_val_loss,
        "val loss {} vs unigram {}",
        s.val_loss,
        s.unigram_val_loss
    );
}

/// Guarantee: with a GPU, a bf16 run on CUDA trains (finite, falling loss); without one, the
/// test says it is skipped.
#[test]
fn cuda_bf16_training_when_a_gpu_is_present() {
    if !tch::Cuda::is_available() {
        eprintln!("skipped: no CUDA GPU on this machine");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("FRUGAL_CACHE", dir.path().join("cache"));
    let corpus = counting_corpus(dir.path());
    let cfg = small_config(&corpus, "cuda", "bf16", 60);
    let s = frugal_train::train::train(&cfg, &dir.path().join("run"), false).unwrap();
    assert!(
        s.val_loss.is_finite() && s.val_loss < 0.7 * s.unigram_val_loss,
        "{s:?}"
    );
}

/// Guarantee: the quick start's config loads and trains on the default corpus (two steps
/// here; `cargo xtask train` runs all of them).
#[test]
fn default_config_trains_on_the_default_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let sets = [
        "train.max_steps=2".to_string(),
        "train.device=\"cpu\"".into(),
        "train.eval_batches=2".into(),
    ];
    let cfg = config::load(&root.join("configs/default.toml"), &sets).unwrap();
    let s = frugal_train::train::train(&cfg, &dir.path().join("run"), false).unwrap();
    assert_eq!(s.steps, 2);
    assert!(s.val_loss.is_finite());
    assert!(dir
        .path()
        .join("run/checkpoints/step-2/model.safetensors")
        .is_file());
}

fn metric_losses(run: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// Guarantee: two micro-batches of 4 accumulate to the step one batch of 8 takes (same
/// sequences, same mean loss), up to float rounding.
#[test]
fn gradient_accumulation_equals_the_larger_batch() {
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("FRUGAL_CACHE", dir.path().join("cache"));
    let corpus = counting_corpus(dir.path());
    let whole = small_config(&corpus, "cpu", "f32", 4);
    let mut accum = whole.clone();
    accum.train.batch_size = 4;
    accum.train.grad_accum = 2;
    frugal_train::train::train(&whole, &dir.path().join("whole"), false).unwrap();
    frugal_train::train::train(&accum, &dir.path().join("accum"), false).unwrap();
    let (a, b) = (
        metric_losses(&dir.path().join("whole")),
        metric_losses(&dir.path().join("accum")),
    );
    assert_eq!(a.len(), 4);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-4, "losses {a:?} vs {b:?}");
    }
    assert!(a[3] < a[0], "the loss falls: {a:?}");
}
