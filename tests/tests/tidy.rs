//! The tidy test: conventions that matter, enforced in the normal test suite. Every `.rs` file
//! opens with a `//!` line and has no trailing whitespace, `cargo fmt --check` is clean, and
//! frugal-train's modules import each other in no cycle.

use std::collections::{BTreeMap, BTreeSet};
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

/// Guarantee: the top-level modules of frugal-train do not import each other in a cycle, so
/// each can be read, tested and moved starting from the modules it uses.
#[test]
fn frugal_train_modules_import_no_cycle() {
    let src = root().join("crates/frugal-train/src");
    let cycles = module_cycles(&src);
    assert!(
        cycles.is_empty(),
        "modules of {} that import each other through `crate::` (move what both need into \
         a module of its own):\n{}",
        src.display(),
        cycles.join("\n")
    );
}

/// Guarantee: [`crate_refs`] finds the modules of `crate::X::` paths and of `use crate::{..}`
/// groups, and skips comments, `$crate` and nested groups' inner names.
#[test]
fn crate_refs_reads_paths_and_use_groups() {
    let text = "use crate::{config::{self, Config}, data,\n    run};\n\
                fn f() { crate::train::go(); } // crate::plot::x\n\
                macro_rules! m { () => { $crate::tsv::x() } }\n\
                use crate::step;\n";
    let refs: Vec<String> = crate_refs(text).into_iter().collect();
    assert_eq!(refs, ["config", "data", "run", "step", "train"]);
}

/// The groups of top-level modules of the crate at `src` that import each other (each one a
/// strongly connected part of [`module_graph`] with two modules or more), one line each: the
/// modules, then the imports between them.
fn module_cycles(src: &Path) -> Vec<String> {
    let graph = module_graph(src);
    // Every module each one reaches through its imports.
    let reach: BTreeMap<&String, BTreeSet<&String>> = graph
        .keys()
        .map(|start| {
            let mut seen = BTreeSet::new();
            let mut todo = vec![start];
            while let Some(m) = todo.pop() {
                for next in &graph[m] {
                    if seen.insert(next) {
                        todo.push(next);
                    }
                }
            }
            (start, seen)
        })
        .collect();
    let mut placed = BTreeSet::new();
    let mut cycles = Vec::new();
    for m in graph.keys() {
        if placed.contains(m) {
            continue;
        }
        let group: BTreeSet<&String> = reach[m]
            .iter()
            .copied()
            .filter(|other| *other != m && reach[other].contains(m))
            .chain([m])
            .collect();
        placed.extend(group.iter().copied());
        if group.len() < 2 {
            continue;
        }
        let edges: Vec<String> = group
            .iter()
            .flat_map(|a| {
                graph[*a]
                    .iter()
                    .filter(|b| group.contains(b))
                    .map(move |b| format!("{a} -> {b}"))
            })
            .collect();
        let names: Vec<&str> = group.iter().map(|s| s.as_str()).collect();
        cycles.push(format!("{{{}}}: {}", names.join(", "), edges.join(", ")));
    }
    cycles
}

/// The import graph of the crate at `src`: for each top-level module (`src/X.rs` or `src/X/`;
/// the crate roots `lib.rs` and `main.rs` are not modules), the other modules its files name
/// through `crate::` (see [`crate_refs`]).
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        let p = e.path();
        let (Some(stem), is_dir) = (p.file_stem().and_then(|s| s.to_str()), p.is_dir()) else {
            continue;
        };
        if is_dir {
            let mut inside = Vec::new();
            rust_files(&p, &mut inside);
            files.entry(stem.to_string()).or_default().extend(inside);
        } else if p.extension().is_some_and(|x| x == "rs") && stem != "lib" && stem != "main" {
            files.entry(stem.to_string()).or_default().push(p);
        }
    }
    assert!(
        files.len() > 1,
        "{}: found {} modules",
        src.display(),
        files.len()
    );
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, paths) in &files {
        let mut refs = BTreeSet::new();
        for p in paths {
            refs.extend(crate_refs(&std::fs::read_to_string(p).unwrap()));
        }
        refs.retain(|r| r != module && files.contains_key(r));
        graph.insert(module.clone(), refs);
    }
    graph
}

/// The first names after `crate::` in Rust source `text`: `X` of a `crate::X` path, and each
/// item's first name in a `use crate::{X, Y::z}` group. Line comments are skipped, and so are
/// `$crate` and `other_crate::` paths.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
        .collect::<Vec<_>>()
        .join("\n");
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let ident = |s: &str| -> String { s.chars().take_while(|&c| is_ident(c)).collect() };
    let mut refs = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        if code[..at]
            .chars()
            .next_back()
            .is_some_and(|c| is_ident(c) || c == '$')
        {
            continue;
        }
        let rest = code[at + "crate::".len()..].trim_start();
        let Some(group) = rest.strip_prefix('{') else {
            refs.insert(ident(rest));
            continue;
        };
        // The first name of each item at the group's top level.
        let mut depth = 1;
        let mut item_start = true;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 1 => break,
                '}' => depth -= 1,
                ',' if depth == 1 => item_start = true,
                c if item_start && depth == 1 && is_ident(c) => {
                    refs.insert(ident(&group[i..]));
                    item_start = false;
                }
                _ => {}
            }
        }
    }
    refs.retain(|r| !r.is_empty() && r != "self");
    refs
}
