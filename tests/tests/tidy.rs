//! The tidy test: conventions that matter, enforced in the normal test suite. Every `.rs` file
//! opens with a `//!` line and has no trailing whitespace, and `cargo fmt --check` is clean.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') {
            continue;
        }
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn all_rust_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for d in ["crates", "xtask", "tests", "build"] {
        rust_files(&root().join(d), &mut files);
    }
    assert!(files.len() > 10, "found only {} .rs files", files.len());
    files
}

#[test]
fn every_rust_file_starts_with_a_doc_line() {
    let bad: Vec<String> = all_rust_files()
        .into_iter()
        .filter(|p| {
            !std::fs::read_to_string(p)
                .unwrap_or_default()
                .starts_with("//!")
        })
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        bad.is_empty(),
        "files without a leading //! line:\n{}",
        bad.join("\n")
    );
}

#[test]
fn no_trailing_whitespace() {
    let mut bad = Vec::new();
    for p in all_rust_files() {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        for (i, line) in text.lines().enumerate() {
            if line.ends_with(' ') || line.ends_with('\t') {
                bad.push(format!("{}:{}", p.display(), i + 1));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "trailing whitespace at:\n{}",
        bad.join("\n")
    );
}

#[test]
fn cargo_fmt_is_clean() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["fmt", "--all", "--", "--check"])
        .current_dir(root())
        .output()
        .expect("cargo fmt runs (rustup component add rustfmt)");
    assert!(
        out.status.success(),
        "cargo fmt --check finds unformatted code:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The default corpus is pinned by crate name and version; a fresh machine has those sources
/// only if Cargo.lock still pins the same versions. A dependency bump that drops one fails here,
/// not in a user's first `cargo xtask train`.
#[test]
fn default_corpus_crates_are_in_cargo_lock() {
    let lock = std::fs::read_to_string(root().join("Cargo.lock")).unwrap();
    let missing: Vec<String> = frugal_train::data::DEFAULT_CORPUS_CRATES
        .iter()
        .filter(|(name, version)| {
            !lock.contains(&format!("name = \"{name}\"\nversion = \"{version}\"\n"))
        })
        .map(|(n, v)| format!("{n} {v}"))
        .collect();
    assert!(
        missing.is_empty(),
        "pinned corpus crates no longer in Cargo.lock (update DEFAULT_CORPUS_CRATES): {missing:?}"
    );
}
