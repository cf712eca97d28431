//! Training data: the default corpus, user documents, the validation split, token packing,
//! batching and the resumable shuffling sampler.
//!
//! Documents come either from the default corpus (the Rust sources of a pinned list of crates in
//! the local cargo registry, see [`DEFAULT_CORPUS_CRATES`]) or from user files
//! ([`load_documents`]). They are tokenized and concatenated by
//! [`crate::tokenize::encode_documents`], packed into non-overlapping windows by
//! [`TokenDataset`], and visited in a seeded order by [`Sampler`].

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

/// Errors of the data pipeline. Every message is one line and names the file, key or value at
/// fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder could not be read.
    #[error("{path}: {error}")]
    Io {
        /// The path at fault.
        path: String,
        /// What went wrong.
        error: std::io::Error,
    },
    /// The data spec names neither an existing file or folder nor a glob pattern.
    #[error("{key}: '{spec}' does not exist")]
    NotFound {
        /// The configuration key (e.g. `data.path`).
        key: String,
        /// The spec as given.
        spec: String,
    },
    /// A glob pattern matched nothing.
    #[error("{key}: no file matches '{pattern}'")]
    NoMatch {
        /// The configuration key (e.g. `data.path`).
        key: String,
        /// The pattern as given.
        pattern: String,
    },
    /// A glob pattern does not parse.
    #[error("{key}: invalid glob pattern '{pattern}': {message}")]
    BadGlob {
        /// The configuration key (e.g. `data.path`).
        key: String,
        /// The pattern as given.
        pattern: String,
        /// The parser's complaint.
        message: String,
    },
    /// A data folder with no file in it.
    #[error("{key}: folder '{spec}' holds no file")]
    EmptyFolder {
        /// The configuration key (e.g. `data.path`).
        key: String,
        /// The folder as given.
        spec: String,
    },
    /// A single data file that holds no text.
    #[error("{path}: file is empty")]
    EmptyFile {
        /// The file.
        path: String,
    },
    /// The data spec matched files, but none of them holds any text.
    #[error("{key}: no text in '{spec}' ({files} file(s), all empty)")]
    NoText {
        /// The configuration key (e.g. `data.path`).
        key: String,
        /// The spec as given.
        spec: String,
        /// How many files were read.
        files: usize,
    },
    /// A text file that is not UTF-8.
    #[error("{path}: not UTF-8 text ({message})")]
    NotUtf8 {
        /// The file.
        path: String,
        /// Where decoding failed.
        message: String,
    },
    /// A bad record in a JSON or JSON Lines file.
    #[error("{path} line {line}: {message}")]
    BadRecord {
        /// The file.
        path: String,
        /// The 1-based line number (1 for a whole-file JSON document).
        line: usize,
        /// What is wrong with the record.
        message: String,
    },
    /// Neither `CARGO_HOME` nor `HOME` is set, so the cargo registry cannot be found.
    #[error("default corpus: cannot find the cargo registry (set CARGO_HOME or HOME)")]
    NoCargoHome,
    /// A crate of the pinned default corpus is missing from the local cargo registry.
    #[error(
        "default corpus: crate {name}-{version} is not in the cargo registry \
         ({registry}/*/); run `cargo fetch` in the Frugal workspace"
    )]
    MissingCrate {
        /// The crate name.
        name: String,
        /// The pinned version.
        version: String,
        /// The registry source folder searched (`$CARGO_HOME/registry/src`).
        registry: String,
    },
    /// A pinned crate folder holds no Rust source.
    #[error("default corpus: {dir} holds no .rs file")]
    EmptyCrate {
        /// The crate folder.
        dir: String,
    },
    /// Too few tokens for even one training window.
    #[error(
        "train.seq_len: the data has {tokens} tokens, fewer than seq_len + 1 = {needed} \
         (use more data or a smaller seq_len)"
    )]
    TooFewTokens {
        /// Tokens available.
        tokens: usize,
        /// Tokens needed (`seq_len + 1`).
        needed: usize,
    },
    /// A setting with an unusable value.
    #[error("{key}: {value} {reason}")]
    InvalidValue {
        /// The configuration key.
        key: String,
        /// The value given.
        value: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A tokenizer file that cannot be read or parsed.
    #[error("{path}: not a usable tokenizer file: {message}")]
    BadTokenizer {
        /// The file.
        path: String,
        /// The parser's complaint.
        message: String,
    },
    /// Tokenizer training, saving or encoding failed.
    #[error("tokenizer: {message}")]
    Tokenizer {
        /// What failed.
        message: String,
    },
}

impl DataError {
    pub(crate) fn io(path: impl AsRef<Path>, error: std::io::Error) -> Self {
        DataError::Io {
            path: path.as_ref().display().to_string(),
            error,
        }
    }
}

/// Squeezes a message from another library onto one line.
pub(crate) fn one_line(message: impl std::fmt::Display) -> String {
    let text = message.to_string();
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One document: a file, a JSON Lines record, or one Rust source file of the default corpus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// Where it came from, e.g. `serde-1.0.229/src/de/mod.rs` or `data/x.jsonl:12`.
    pub name: String,
    /// Its text.
    pub text: String,
    /// For an instruction record (`prompt` and `response`), the length in bytes of the prompt
    /// part of `text` (the prompt and the newline after it): its tokens are context, not
    /// targets, so the loss is on the response alone.
    pub prompt: Option<usize>,
}

// ---------------------------------------------------------------------------------------------
// Default corpus
// ---------------------------------------------------------------------------------------------

/// The crates whose Rust sources form the default corpus, by exact name and version, read from
/// `$CARGO_HOME/registry/src/*/NAME-VERSION/` in this order (about 7.9 MB of `.rs` text).
///
/// The list is PINNED on purpose: it does not follow `Cargo.lock`, so adding or updating a
/// dependency never changes the corpus (and so never changes the default tokenizer, the
/// validation split or the loss curves). Every crate here is compiled on Linux for the workspace,
/// so a build (or `cargo fetch`) puts its sources in the registry. Change it only deliberately,
/// together with the numbers that depend on it.
pub const DEFAULT_CORPUS_CRATES: &[(&str, &str)] = &[
    ("serde", "1.0.229"),
    ("serde_core", "1.0.229"),
    ("serde_json", "1.0.154"),
    ("toml", "0.9.12+spec-1.1.0"),
    ("glob", "0.3.4"),
    ("clap_builder", "4.6.7"),
    ("tokenizers", "0.22.2"),
    ("safetensors", "0.6.2"),
    ("png", "0.18.1"),
    ("rayon", "1.12.0"),
    ("regex-automata", "0.4.19"),
];

/// The cargo registry's source folder: `$CARGO_HOME/registry/src`, CARGO_HOME defaulting to
/// `~/.cargo`.
pub fn cargo_registry_src() -> Result<PathBuf, DataError> {
    let home = match std::env::var_os("CARGO_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(home) => PathBuf::from(home).join(".cargo"),
            None => return Err(DataError::NoCargoHome),
        },
    };
    Ok(home.join("registry").join("src"))
}

/// Finds `NAME-VERSION` under any index folder of `registry` (index folders sorted by name).
fn find_crate_dir(registry: &Path, name: &str, version: &str) -> Option<PathBuf> {
    let mut indexes: Vec<PathBuf> = fs::read_dir(registry)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    indexes.sort();
    let dir_name = format!("{name}-{version}");
    indexes
        .into_iter()
        .map(|i| i.join(&dir_name))
        .find(|d| d.is_dir())
}

/// Loads the default corpus from the given registry source folder (see [`default_corpus`]).
pub fn default_corpus_from(registry: &Path) -> Result<Vec<Document>, DataError> {
    let mut docs = Vec::new();
    for &(name, version) in DEFAULT_CORPUS_CRATES {
        let dir =
            find_crate_dir(registry, name, version).ok_or_else(|| DataError::MissingCrate {
                name: name.to_string(),
                version: version.to_string(),
                registry: registry.display().to_string(),
            })?;
        let mut files = Vec::new();
        walk_files(&dir, &mut files, &mut HashSet::new(), false)?;
        files.retain(|p| p.extension().is_some_and(|e| e == "rs"));
        files.sort();
        if files.is_empty() {
            return Err(DataError::EmptyCrate {
                dir: dir.display().to_string(),
            });
        }
        let crate_dir_name = format!("{name}-{version}");
        for file in files {
            let text = read_text(&file)?;
            if text.trim().is_empty() {
                continue;
            }
            let rel = file.strip_prefix(&dir).unwrap_or(&file);
            let rel: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            docs.push(Document {
                name: format!("{crate_dir_name}/{}", rel.join("/")),
                text,
                prompt: None,
            });
        }
    }
    Ok(docs)
}

/// The default corpus: the Rust sources (`*.rs`, files sorted by path, in that order) of the
/// crates in [`DEFAULT_CORPUS_CRATES`], from the local cargo registry
/// (`$CARGO_HOME/registry/src/*/NAME-VERSION/`). One document per file, named by its path
/// relative to the registry index folder, e.g. `serde-1.0.229/src/de/mod.rs`. Errors if a crate
/// is missing, naming it and saying to run `cargo fetch`.
pub fn default_corpus() -> Result<Vec<Document>, DataError> {
    default_corpus_from(&cargo_registry_src()?)
}

// ---------------------------------------------------------------------------------------------
// User documents
// ---------------------------------------------------------------------------------------------

/// Recursively collects the files below `dir`. Symbolic links to files are followed; links to
/// folders are followed once (cycles are skipped). With `skip_hidden`, names starting with `.`
/// are skipped.
fn walk_files(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    seen: &mut HashSet<PathBuf>,
    skip_hidden: bool,
) -> Result<(), DataError> {
    let canonical = fs::canonicalize(dir).map_err(|e| DataError::io(dir, e))?;
    if !seen.insert(canonical) {
        return Ok(());
    }
    let entries = fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let path = entry.path();
        if skip_hidden && entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        // `metadata` follows symbolic links; a dangling link is an error naming it.
        let meta = fs::metadata(&path).map_err(|e| DataError::io(&path, e))?;
        if meta.is_dir() {
            walk_files(&path, out, seen, skip_hidden)?;
        } else if meta.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

/// Reads a whole file as UTF-8 text (dropping a leading byte-order mark), with errors naming the
/// file.
fn read_text(path: &Path) -> Result<String, DataError> {
    let bytes = fs::read(path).map_err(|e| DataError::io(path, e))?;
    let mut text = String::from_utf8(bytes).map_err(|e| DataError::NotUtf8 {
        path: path.display().to_string(),
        message: format!("invalid byte at offset {}", e.utf8_error().valid_up_to()),
    })?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

fn has_glob_chars(spec: &str) -> bool {
    spec.contains(['*', '?', '['])
}

/// Expands a spec into a sorted list of files. `single` is true when the spec is one file.
fn expand_spec(key: &str, spec: &str) -> Result<(Vec<PathBuf>, bool), DataError> {
    let path = Path::new(spec);
    if path.is_file() {
        return Ok((vec![path.to_path_buf()], true));
    }
    if path.is_dir() {
        let mut files = Vec::new();
        walk_files(path, &mut files, &mut HashSet::new(), true)?;
        files.sort();
        return Ok((files, false));
    }
    if !has_glob_chars(spec) {
        return Err(DataError::NotFound {
            key: key.to_string(),
            spec: spec.to_string(),
        });
    }
    let paths = glob::glob(spec).map_err(|e| DataError::BadGlob {
        key: key.to_string(),
        pattern: spec.to_string(),
        message: one_line(e.msg),
    })?;
    let mut files = Vec::new();
    let mut seen = HashSet::new();
    for entry in paths {
        let found = entry.map_err(|e| {
            let path = e.path().to_path_buf();
            DataError::io(path, std::io::Error::from(e))
        })?;
        if found.is_dir() {
            let mut below = Vec::new();
            walk_files(&found, &mut below, &mut seen, true)?;
            files.extend(below);
        } else if found.is_file() {
            files.push(found);
        }
    }
    if files.is_empty() {
        return Err(DataError::NoMatch {
            key: key.to_string(),
            pattern: spec.to_string(),
        });
    }
    files.sort();
    files.dedup();
    Ok((files, false))
}

/// The text of one JSON record: a `text` string, or `prompt` and `response` joined by a newline
/// (then also the prompt part's length in bytes). A bare JSON string is taken as the text.
fn record_text(value: &serde_json::Value) -> Result<(String, Option<usize>), String> {
    use serde_json::Value;
    let obj = match value {
        Value::Object(obj) => obj,
        Value::String(s) => return Ok((s.clone(), None)),
        _ => return Err("expected a JSON object with a 'text' field".to_string()),
    };
    if let Some(text) = obj.get("text") {
        return match text {
            Value::String(s) => Ok((s.clone(), None)),
            _ => Err("'text' is not a string".to_string()),
        };
    }
    match (obj.get("prompt"), obj.get("response")) {
        (Some(Value::String(p)), Some(Value::String(r))) => {
            Ok((format!("{p}\n{r}"), Some(p.len() + 1)))
        }
        (Some(_), Some(Value::String(_))) => Err("'prompt' is not a string".to_string()),
        (Some(_), Some(_)) => Err("'response' is not a string".to_string()),
        _ => Err("no 'text' field, nor 'prompt' and 'response'".to_string()),
    }
}

/// Reads JSON Lines: one record per non-blank line.
fn read_jsonl(path: &Path, text: &str, out: &mut Vec<Document>) -> Result<(), DataError> {
    let shown = path.display().to_string();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| DataError::BadRecord {
            path: shown.clone(),
            line: i + 1,
            message,
        };
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| bad(format!("invalid JSON ({})", one_line(e))))?;
        let (text, prompt) = record_text(&value).map_err(bad)?;
        if !text.is_empty() {
            out.push(Document {
                name: format!("{shown}:{}", i + 1),
                text,
                prompt,
            });
        }
    }
    Ok(())
}

/// Reads a `.json` file: an array of records, a single record, or (when the whole file is not one
/// JSON value) JSON Lines.
fn read_json(path: &Path, text: &str, out: &mut Vec<Document>) -> Result<(), DataError> {
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => return read_jsonl(path, text, out),
    };
    let shown = path.display().to_string();
    let records = match value {
        serde_json::Value::Array(items) => items,
        other => vec![other],
    };
    for (i, record) in records.iter().enumerate() {
        let (text, prompt) = record_text(record).map_err(|message| DataError::BadRecord {
            path: shown.clone(),
            line: 1,
            message: format!("record {}: {message}", i + 1),
        })?;
        if !text.is_empty() {
            out.push(Document {
                name: format!("{shown}#{}", i + 1),
                text,
                prompt,
            });
        }
    }
    Ok(())
}

/// Loads one file into documents.
fn load_file(path: &Path, out: &mut Vec<Document>) -> Result<(), DataError> {
    let text = read_text(path)?;
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") => read_jsonl(path, &text, out),
        Some("json") => read_json(path, &text, out),
        _ => {
            if !text.is_empty() {
                out.push(Document {
                    name: path.display().to_string(),
                    text,
                    prompt: None,
                });
            }
            Ok(())
        }
    }
}

/// Loads user documents from `spec` (see [`load_documents`]), naming `key` (e.g.
/// `data.val_path` or `--data`) in errors.
pub fn load_documents_for(key: &str, spec: &str) -> Result<Vec<Document>, DataError> {
    let (files, single) = expand_spec(key, spec)?;
    let mut docs = Vec::new();
    for file in &files {
        load_file(file, &mut docs)?;
    }
    docs.retain(|d| !d.text.trim().is_empty());
    if docs.is_empty() {
        if single {
            return Err(DataError::EmptyFile {
                path: files[0].display().to_string(),
            });
        }
        if files.is_empty() {
            return Err(DataError::EmptyFolder {
                key: key.to_string(),
                spec: spec.to_string(),
            });
        }
        return Err(DataError::NoText {
            key: key.to_string(),
            spec: spec.to_string(),
            files: files.len(),
        });
    }
    Ok(docs)
}

/// Loads user documents. `spec` is a file, a folder (every file below it, recursively, sorted by
/// path; names starting with `.` are skipped) or a glob pattern (folders it matches are walked
/// too). Plain text files (any extension other than `.jsonl`/`.json`) are one document each;
/// `.jsonl` files give one document per line, from a `text` field, or `prompt` and `response`
/// joined by a newline; `.json` files hold an array of such records (or one record). Documents
/// with only white space are dropped; an empty result is an error naming the spec. Errors name
/// the key `data.path`.
pub fn load_documents(spec: &str) -> Result<Vec<Document>, DataError> {
    load_documents_for("data.path", spec)
}

// ---------------------------------------------------------------------------------------------
// Validation split
// ---------------------------------------------------------------------------------------------

/// The default validation split: every 20th document (5%).
pub const DEFAULT_VAL_EVERY: usize = 20;

/// Splits documents into (train, validation), deterministically: document `i` goes to validation
/// when `i % every == every - 1`. If that leaves validation empty and there are at least two
/// documents, the last one is validation; a single document is cut at a char boundary near 95%
/// of its text. `every` below 2 is taken as 2.
pub fn split_validation(docs: Vec<Document>, every: usize) -> (Vec<Document>, Vec<Document>) {
    let every = every.max(2);
    let n = docs.len();
    if n == 1 {
        let doc = docs.into_iter().next().expect("one document");
        let mut cut = doc.text.len() * 95 / 100;
        while !doc.text.is_char_boundary(cut) {
            cut += 1;
        }
        let (head, tail) = doc.text.split_at(cut);
        let train = vec![Document {
            name: doc.name.clone(),
            text: head.to_string(),
            prompt: None,
        }];
        let val = if tail.is_empty() {
            Vec::new()
        } else {
            vec![Document {
                name: doc.name,
                text: tail.to_string(),
                prompt: None,
            }]
        };
        return (train, val);
    }
    let mut train = Vec::with_capacity(n);
    let mut val = Vec::with_capacity(n / every + 1);
    for (i, doc) in docs.into_iter().enumerate() {
        if i % every == every - 1 {
            val.push(doc);
        } else {
            train.push(doc);
        }
    }
    if val.is_empty() && n >= 2 {
        if let Some(last) = train.pop() {
            val.push(last);
        }
    }
    (train, val)
}

// ---------------------------------------------------------------------------------------------
// Packing and batching
// ---------------------------------------------------------------------------------------------

/// A token stream packed into non-overlapping windows of `seq_len + 1` tokens: window `i` covers
/// tokens `i * seq_len ..= (i + 1) * seq_len`; its input is the first `seq_len` tokens and its
/// target the same shifted by one.
#[derive(Debug, Clone)]
pub struct TokenDataset {
    tokens: Vec<u32>,
    seq_len: usize,
    /// Which tokens are targets (None: all): a window's target at a token that is not one is
    /// -100, which the loss skips (the prompt of an instruction record).
    scored: Option<Vec<bool>>,
}

impl TokenDataset {
    /// Wraps a token stream. Errors if `seq_len` is 0 or there are fewer than `seq_len + 1`
    /// tokens.
    pub fn new(tokens: Vec<u32>, seq_len: usize) -> Result<Self, DataError> {
        if seq_len == 0 {
            return Err(DataError::InvalidValue {
                key: "train.seq_len".to_string(),
                value: "0".to_string(),
                reason: "must be at least 1".to_string(),
            });
        }
        if tokens.len() < seq_len + 1 {
            return Err(DataError::TooFewTokens {
                tokens: tokens.len(),
                needed: seq_len + 1,
            });
        }
        Ok(Self {
            tokens,
            seq_len,
            scored: None,
        })
    }

    /// Marks which tokens are targets (`scored[i]` for token `i`; the others become -100 in
    /// [`TokenDataset::batch`]'s targets). Errors when the lengths differ.
    pub fn with_scored(mut self, scored: Vec<bool>) -> Result<Self, DataError> {
        if scored.len() != self.tokens.len() {
            return Err(DataError::InvalidValue {
                key: "scored".into(),
                value: scored.len().to_string(),
                reason: format!("must have one entry per token ({})", self.tokens.len()),
            });
        }
        self.scored = Some(scored);
        Ok(self)
    }

    /// Whether some targets are not scored (prompt tokens of instruction data): the count of
    /// scored targets then varies from batch to batch.
    pub fn has_scored(&self) -> bool {
        self.scored.is_some()
    }

    /// The number of windows: `(tokens - 1) / seq_len`.
    pub fn num_sequences(&self) -> usize {
        (self.tokens.len() - 1) / self.seq_len
    }

    /// The window length (tokens per input row).
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The number of tokens in the stream.
    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// The token stream.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Builds (inputs, targets) for the given windows: int64 tensors of shape
    /// `(indices.len(), seq_len)` on the CPU; targets that are not scored are -100.
    ///
    /// # Panics
    /// If an index is `>= num_sequences()` (a caller bug, not bad input).
    pub fn batch(&self, indices: &[usize]) -> (Tensor, Tensor) {
        let n = self.num_sequences();
        let s = self.seq_len;
        let mut inputs = Vec::with_capacity(indices.len() * s);
        let mut targets = Vec::with_capacity(indices.len() * s);
        for &i in indices {
            assert!(
                i < n,
                "TokenDataset::batch: window {i} out of range (0..{n})"
            );
            let window = &self.tokens[i * s..=(i + 1) * s];
            inputs.extend(window[..s].iter().map(|&t| i64::from(t)));
            match &self.scored {
                None => targets.extend(window[1..].iter().map(|&t| i64::from(t))),
                Some(scored) => targets.extend(
                    window[1..]
                        .iter()
                        .zip(&scored[i * s + 1..=(i + 1) * s])
                        .map(|(&t, &keep)| if keep { i64::from(t) } else { -100 }),
                ),
            }
        }
        let shape = [indices.len() as i64, s as i64];
        (
            Tensor::from_slice(&inputs).view(shape),
            Tensor::from_slice(&targets).view(shape),
        )
    }

    /// Every window in order, `batch_size` at a time (the last batch may be smaller), for
    /// evaluation. A `batch_size` of 0 is taken as 1.
    pub fn sequential_batches(
        &self,
        batch_size: usize,
    ) -> impl Iterator<Item = (Tensor, Tensor)> + '_ {
        let batch_size = batch_size.max(1);
        let n = self.num_sequences();
        (0..n).step_by(batch_size).map(move |start| {
            let indices: Vec<usize> = (start..(start + batch_size).min(n)).collect();
            self.batch(&indices)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Sampler
// ---------------------------------------------------------------------------------------------

/// SplitMix64 (Steele, Lea and Flood, 2014): a small, fast, well-mixed 64-bit generator whose
/// whole state is one `u64`, so that it can be saved and restored exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The internal state; `SplitMix64::new(rng.state())` continues where `rng` stands.
    pub fn state(&self) -> u64 {
        self.state
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.state)
    }

    /// A uniform number in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A number in `0..bound` by multiply-shift (0 when `bound` is 0).
    pub fn below(&mut self, bound: usize) -> usize {
        ((u128::from(self.next_u64()) * bound as u128) >> 64) as usize
    }
}

/// SplitMix64's finalizer.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The permutation of `0..n` for `epoch`: a Fisher-Yates shuffle driven by SplitMix64 seeded
/// from `(seed, epoch)` only.
fn epoch_permutation(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut rng = SplitMix64::new(mix64(
        seed ^ mix64(epoch.wrapping_add(0x6A09_E667_F3BC_C909)),
    ));
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i + 1);
        perm.swap(i, j);
    }
    perm
}

/// Where a [`Sampler`] stands; saved in checkpoints so that a run resumes exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    /// The run's data seed.
    pub seed: u64,
    /// The current epoch (0-based).
    pub epoch: u64,
    /// How many windows of the current epoch's permutation were already handed out.
    pub position: usize,
}

/// Hands out window indices for training: each epoch visits every window once, in a permutation
/// that depends only on (seed, epoch, number of windows).
#[derive(Debug, Clone)]
pub struct Sampler {
    num_sequences: usize,
    state: SamplerState,
    perm: Vec<usize>,
}

impl Sampler {
    /// A sampler at the start of epoch 0.
    pub fn new(num_sequences: usize, seed: u64) -> Self {
        Self::from_state(
            num_sequences,
            SamplerState {
                seed,
                epoch: 0,
                position: 0,
            },
        )
    }

    /// A sampler resuming from a saved state. A position past the end of the epoch is taken as
    /// the end (the next call starts the next epoch).
    pub fn from_state(num_sequences: usize, state: SamplerState) -> Self {
        let perm = epoch_permutation(state.seed, state.epoch, num_sequences);
        let state = SamplerState {
            position: state.position.min(num_sequences),
            ..state
        };
        Self {
            num_sequences,
            state,
            perm,
        }
    }

    /// The current state, to save with a checkpoint.
    pub fn state(&self) -> SamplerState {
        self.state
    }

    /// The number of windows the sampler draws from.
    pub fn num_sequences(&self) -> usize {
        self.num_sequences
    }

    /// The next `batch_size` window indices. When the current epoch runs out, the next epoch
    /// starts with a fresh permutation, so a batch may span two epochs. Empty when there are no
    /// windows.
    pub fn next_indices(&mut self, batch_size: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(batch_size);
        if self.num_sequences == 0 {
            return out;
        }
        while out.len() < batch_size {
            if self.state.position >= self.num_sequences {
                self.state.epoch += 1;
                self.state.position = 0;
                self.perm =
                    epoch_permutation(self.state.seed, self.state.epoch, self.num_sequences);
            }
            let take = (batch_size - out.len()).min(self.num_sequences - self.state.position);
            let start = self.state.position;
            out.extend_from_slice(&self.perm[start..start + take]);
            self.state.position += take;
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn write(dir: &Path, rel: &str, text: &str) -> PathBuf {
        let path = dir.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, text).unwrap();
        path
    }

    fn s(p: &Path) -> String {
        p.display().to_string()
    }

    fn doc(name: &str, text: &str) -> Document {
        Document {
            name: name.to_string(),
            text: text.to_string(),
            prompt: None,
        }
    }

    #[test]
    fn loads_a_text_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "corpus.txt", "hello world\n");
        let docs = load_documents(&s(&f)).unwrap();
        assert_eq!(docs, vec![doc(&s(&f), "hello world\n")]);
    }

    #[test]
    fn loads_jsonl_text_and_prompt_response() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "x.jsonl",
            "{\"text\": \"first\"}\n\n{\"prompt\": \"Q?\", \"response\": \"A.\", \"id\": 3}\n",
        );
        let docs = load_documents(&s(&f)).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].text, "first");
        assert_eq!(docs[0].name, format!("{}:1", s(&f)));
        assert_eq!(docs[1].text, "Q?\nA.");
        assert_eq!(docs[1].name, format!("{}:3", s(&f)));
    }

    #[test]
    fn jsonl_with_bom_and_crlf() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "w.jsonl",
            "\u{feff}{\"text\": \"a\"}\r\n{\"text\": \"b\"}\r\n",
        );
        let docs = load_documents(&s(&f)).unwrap();
        let texts: Vec<_> = docs.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(texts, ["a", "b"]);
    }

    #[test]
    fn loads_json_array() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "x.json",
            r#"[{"text": "a"}, {"prompt": "p", "response": "r"}]"#,
        );
        let docs = load_documents(&s(&f)).unwrap();
        let texts: Vec<_> = docs.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(texts, ["a", "p\nr"]);
    }

    #[test]
    fn loads_a_folder_recursively_sorted() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "b.txt", "B");
        write(dir.path(), "a/z.md", "AZ");
        write(dir.path(), "a/y.jsonl", "{\"text\": \"AY\"}\n");
        write(dir.path(), "c/empty.txt", "");
        write(dir.path(), ".hidden/secret.txt", "hidden");
        let docs = load_documents(&s(dir.path())).unwrap();
        let texts: Vec<_> = docs.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(texts, ["AY", "AZ", "B"]);
    }

    #[test]
    fn loads_a_glob() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "2.txt", "two");
        write(dir.path(), "1.txt", "one");
        write(dir.path(), "3.md", "three");
        let docs = load_documents(&format!("{}/*.txt", s(dir.path()))).unwrap();
        let texts: Vec<_> = docs.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(texts, ["one", "two"]);
    }

    #[test]
    fn glob_without_match_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let spec = format!("{}/*.txt", s(dir.path()));
        let err = load_documents(&spec).unwrap_err().to_string();
        assert_eq!(err, format!("data.path: no file matches '{spec}'"));
    }

    #[test]
    fn bad_glob_and_missing_path_are_errors() {
        let err = load_documents("/nonexistent/[abc").unwrap_err().to_string();
        assert!(
            err.starts_with("data.path: invalid glob pattern '/nonexistent/[abc'"),
            "{err}"
        );
        let err = load_documents_for("data.val_path", "/nonexistent/file.txt").unwrap_err();
        assert_eq!(
            err.to_string(),
            "data.val_path: '/nonexistent/file.txt' does not exist"
        );
    }

    #[test]
    fn empty_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "corpus.txt", "");
        let err = load_documents(&s(&f)).unwrap_err().to_string();
        assert_eq!(err, format!("{}: file is empty", s(&f)));
        let f = write(dir.path(), "blank.txt", " \n\t\n");
        let err = load_documents(&s(&f)).unwrap_err().to_string();
        assert_eq!(err, format!("{}: file is empty", s(&f)));
    }

    #[test]
    fn folder_of_empty_files_and_empty_folder_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_documents(&s(dir.path())).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("data.path: folder '{}' holds no file", s(dir.path()))
        );
        write(dir.path(), "a.txt", "");
        write(dir.path(), "b.jsonl", "{\"text\": \"\"}\n");
        let err = load_documents(&s(dir.path())).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "data.path: no text in '{}' (2 file(s), all empty)",
                s(dir.path())
            )
        );
    }

    #[test]
    fn bad_jsonl_records_are_errors_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "a.jsonl",
                "{\"text\": \"ok\"}\n{\"prompt\": \"only\"}\n",
                2,
                "no 'text' field, nor 'prompt' and 'response'",
            ),
            ("b.jsonl", "{\"text\": 3}\n", 1, "'text' is not a string"),
            ("c.jsonl", "\n\n{\"text\": \"a\"\n", 3, "invalid JSON ("),
            (
                "d.jsonl",
                "[1, 2]\n",
                1,
                "expected a JSON object with a 'text' field",
            ),
        ];
        for (name, text, line, message) in cases {
            let f = write(dir.path(), name, text);
            let err = load_documents(&s(&f)).unwrap_err().to_string();
            let want = format!("{} line {line}: {message}", s(&f));
            assert!(err.starts_with(&want), "{err} vs {want}");
            assert!(!err.contains('\n'));
        }
    }

    #[test]
    fn non_utf8_text_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bin.txt");
        fs::write(&f, [b'a', 0xff, 0xfe]).unwrap();
        let err = load_documents(&s(&f)).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("{}: not UTF-8 text (invalid byte at offset 1)", s(&f))
        );
    }

    #[test]
    fn split_every_twentieth() {
        let docs: Vec<_> = (0..45).map(|i| doc(&i.to_string(), "x")).collect();
        let (train, val) = split_validation(docs, DEFAULT_VAL_EVERY);
        let names: Vec<_> = val.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["19", "39"]);
        assert_eq!(train.len(), 43);
        assert_eq!(train[19].name, "20");
    }

    #[test]
    fn split_few_documents_takes_the_last() {
        let docs: Vec<_> = (0..3).map(|i| doc(&i.to_string(), "x")).collect();
        let (train, val) = split_validation(docs, 20);
        assert_eq!(train.len(), 2);
        assert_eq!(val, vec![doc("2", "x")]);
        let (train, val) = split_validation(Vec::new(), 20);
        assert!(train.is_empty() && val.is_empty());
    }

    #[test]
    fn split_single_document_at_char_boundary() {
        let text = "é".repeat(100); // 200 bytes, 2 per char
        let (train, val) = split_validation(vec![doc("one", &text)], 20);
        assert_eq!(train[0].text.len(), 190);
        assert_eq!(val[0].text.len(), 10);
        let text = "aé".repeat(50) + "b"; // 151 bytes; 95% = 143 falls inside 'é'
        let (train, val) = split_validation(vec![doc("one", &text)], 20);
        assert_eq!(train[0].text.clone() + &val[0].text, text);
        assert_eq!(train[0].text.len(), 144);
    }

    #[test]
    fn dataset_windows_and_batches() {
        let tokens: Vec<u32> = (0..11).collect();
        assert!(TokenDataset::new(tokens.clone(), 0).is_err());
        let err = TokenDataset::new(tokens.clone(), 11)
            .unwrap_err()
            .to_string();
        assert!(err.contains("11 tokens") && err.contains("= 12"), "{err}");
        let ds = TokenDataset::new(tokens, 3).unwrap();
        assert_eq!(ds.num_sequences(), 3);
        let (x, y) = ds.batch(&[2, 0]);
        assert_eq!(x.size(), [2, 3]);
        assert_eq!(x.kind(), tch::Kind::Int64);
        assert_eq!(
            Vec::<i64>::try_from(x.view([-1])).unwrap(),
            [6, 7, 8, 0, 1, 2]
        );
        assert_eq!(
            Vec::<i64>::try_from(y.view([-1])).unwrap(),
            [7, 8, 9, 1, 2, 3]
        );
        let sizes: Vec<_> = ds.sequential_batches(2).map(|(x, _)| x.size()[0]).collect();
        assert_eq!(sizes, [2, 1]);
        let firsts: Vec<i64> = ds
            .sequential_batches(2)
            .flat_map(|(x, _)| Vec::<i64>::try_from(x.select(1, 0)).unwrap())
            .collect();
        assert_eq!(firsts, [0, 3, 6]);
        let exact = TokenDataset::new((0..4).collect(), 3).unwrap();
        assert_eq!(exact.num_sequences(), 1);
    }

    #[test]
    fn sampler_is_a_permutation_per_epoch_and_deterministic() {
        let mut a = Sampler::new(10, 7);
        let mut b = Sampler::new(10, 7);
        let first: Vec<usize> = a.next_indices(10);
        assert_eq!(first, b.next_indices(10));
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_ne!(first, (0..10).collect::<Vec<_>>());
        let second = a.next_indices(10);
        assert_ne!(first, second);
        assert_eq!(
            a.state(),
            SamplerState {
                seed: 7,
                epoch: 1,
                position: 10
            }
        );
        assert_ne!(Sampler::new(10, 8).next_indices(10), first);
        assert_eq!(epoch_permutation(7, 1, 10), second);
        assert!(Sampler::new(0, 1).next_indices(4).is_empty());
    }

    #[test]
    fn splitmix64_reference_values_and_ranges() {
        // Reference outputs of SplitMix64 seeded with 1234567 (from the original C code).
        let mut rng = SplitMix64::new(1234567);
        assert_eq!(rng.next_u64(), 6457827717110365317);
        assert_eq!(rng.next_u64(), 3203168211198807973);
        let saved = rng.state();
        let mut copy = SplitMix64::new(saved);
        assert_eq!(rng.next_u64(), copy.next_u64());
        for _ in 0..1000 {
            let x = rng.next_f64();
            assert!((0.0..1.0).contains(&x));
            assert!(rng.below(7) < 7);
        }
        assert_eq!(rng.below(0), 0);
    }

    #[test]
    fn sampler_resumes_mid_epoch() {
        let mut full = Sampler::new(13, 42);
        let mut resumed = None;
        let mut expected = Vec::new();
        for step in 0..12 {
            if step == 5 {
                let saved = serde_json::to_string(&full.state()).unwrap();
                let state: SamplerState = serde_json::from_str(&saved).unwrap();
                resumed = Some(Sampler::from_state(13, state));
            }
            let batch = full.next_indices(4);
            if step >= 5 {
                expected.push(batch);
            }
        }
        let mut resumed = resumed.unwrap();
        let got: Vec<_> = (0..7).map(|_| resumed.next_indices(4)).collect();
        assert_eq!(got, expected);
        assert_eq!(resumed.state(), full.state());
    }

    #[test]
    fn missing_crate_names_it_and_says_cargo_fetch() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("index.example")).unwrap();
        let err = default_corpus_from(dir.path()).unwrap_err().to_string();
        let (name, version) = DEFAULT_CORPUS_CRATES[0];
        assert!(err.contains(&format!("crate {name}-{version} ")), "{err}");
        assert!(err.contains("cargo fetch"), "{err}");
    }

    #[test]
    fn default_corpus_from_a_fake_registry() {
        let dir = tempfile::tempdir().unwrap();
        for &(name, version) in DEFAULT_CORPUS_CRATES {
            let root = dir
                .path()
                .join("index.example")
                .join(format!("{name}-{version}"));
            write(&root, "src/lib.rs", &format!("//! {name}\n"));
            write(&root, "src/a/mod.rs", "fn a() {}\n");
            write(&root, "README.md", "not rust");
        }
        let docs = default_corpus_from(dir.path()).unwrap();
        assert_eq!(docs.len(), 2 * DEFAULT_CORPUS_CRATES.len());
        let (name, version) = DEFAULT_CORPUS_CRATES[0];
        assert_eq!(docs[0].name, format!("{name}-{version}/src/a/mod.rs"));
        assert_eq!(docs[1].name, format!("{name}-{version}/src/lib.rs"));
    }

    /// Runs against the real registry when the pinned crates are there (they are after the
    /// workspace was built or fetched); skips otherwise.
    #[test]
    fn default_corpus_loads_when_present() {
        let Ok(registry) = cargo_registry_src() else {
            return;
        };
        let all_present = DEFAULT_CORPUS_CRATES
            .iter()
            .all(|(n, v)| find_crate_dir(&registry, n, v).is_some());
        if !all_present {
            eprintln!("skipping: pinned crates not in {}", registry.display());
            return;
        }
        let docs = default_corpus().unwrap();
        let bytes: usize = docs.iter().map(|d| d.text.len()).sum();
        assert!(docs.len() > 400, "{} documents", docs.len());
        assert!((6_000_000..9_000_000).contains(&bytes), "{bytes} bytes");
        assert!(docs[0].name.starts_with("serde-1.0.229/"));
        let (train, val) = split_validation(docs, DEFAULT_VAL_EVERY);
        assert!(!train.is_empty() && !val.is_empty());
    }
}
