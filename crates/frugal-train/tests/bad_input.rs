//! Every bad input of the foundation issue is a one-line error naming the key, file or shape,
//! with exit code 2, never a panic; a failed run loses nothing already saved.

mod common;

use common::*;

fn small(dir: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let corpus = corpus(dir, 10);
    let mut sets = small_settings(&corpus);
    sets.extend(["train.max_steps=2".to_string(), "train.eval_every=0".into()]);
    sets.extend(extra.iter().map(|s| s.to_string()));
    sets
}

#[test]
fn unknown_config_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(train_cmd(
        dir.path(),
        &dir.path().join("r"),
        &small(dir.path(), &["train.learning_rate=1.0"]),
    ));
    assert_clean_error(&out, "learning_rate");
}

#[test]
fn wrong_type_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(train_cmd(
        dir.path(),
        &dir.path().join("r"),
        &small(dir.path(), &["train.batch_size=\"big\""]),
    ));
    assert_clean_error(&out, "train.batch_size");
}

#[test]
fn missing_config_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = frugal(dir.path());
    c.args(["train", "--config", "/nonexistent/frugal.toml"]);
    assert_clean_error(&run(c), "/nonexistent/frugal.toml");
}

#[test]
fn missing_data_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(train_cmd(
        dir.path(),
        &dir.path().join("r"),
        &small(dir.path(), &["data.path=\"/nonexistent/corpus.txt\""]),
    ));
    assert_clean_error(&out, "/nonexistent/corpus.txt");
}

#[test]
fn empty_corpus_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let set = format!("data.path=\"{}\"", empty.display());
    let out = run(train_cmd(
        dir.path(),
        &dir.path().join("r"),
        &small(dir.path(), &[&set]),
    ));
    assert_clean_error(&out, "empty.txt");
}

#[test]
fn sequence_longer_than_the_model_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(train_cmd(
        dir.path(),
        &dir.path().join("r"),
        &small(dir.path(), &["train.seq_len=4096"]),
    ));
    assert_clean_error(&out, "train.seq_len");
}

#[test]
fn checkpoint_of_another_shape_is_named_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().join("r");
    assert!(run(train_cmd(dir.path(), &r, &small(dir.path(), &[])))
        .status
        .success());
    let before = std::fs::read(r.join("checkpoints/step-2/model.safetensors")).unwrap();
    let mut c = frugal(dir.path());
    c.arg("train").arg("--resume").arg(&r).args([
        "--set",
        "model.hidden_size=48",
        "--set",
        "train.max_steps=4",
    ]);
    assert_clean_error(&run(c), "shape");
    let after = std::fs::read(r.join("checkpoints/step-2/model.safetensors")).unwrap();
    assert!(before == after, "the saved checkpoint changed");
    assert_eq!(
        std::fs::read_to_string(r.join("checkpoints/latest"))
            .unwrap()
            .trim(),
        "step-2"
    );
}

#[test]
fn truncated_safetensors_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().join("r");
    assert!(run(train_cmd(dir.path(), &r, &small(dir.path(), &[])))
        .status
        .success());
    let f = r.join("checkpoints/step-2/model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let mut c = frugal(dir.path());
    c.arg("inspect").arg(&f);
    assert_clean_error(&run(c), "model.safetensors");
    let mut c = frugal(dir.path());
    c.arg("eval").arg("--run").arg(&r);
    assert_clean_error(&run(c), "not a valid safetensors");
}

#[test]
fn existing_run_folder_is_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().join("r");
    let sets = small(dir.path(), &[]);
    assert!(run(train_cmd(dir.path(), &r, &sets)).status.success());
    assert_clean_error(&run(train_cmd(dir.path(), &r, &sets)), "--resume");
}
