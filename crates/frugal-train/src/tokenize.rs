//! Tokenizers: a user's `tokenizer.json`, or a byte-level BPE trained on the training text and
//! cached by a stable hash of that text; encoding documents into one token stream.

use std::fs;
use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::data::{one_line, DataError, Document};

/// The end-of-text token of the trained BPE (id 0), appended after every document.
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// The padding token of the trained BPE (id 1).
pub const PAD_TOKEN: &str = "<|pad|>";
/// The smallest vocabulary a byte-level BPE can have: 256 bytes and the 2 special tokens.
pub const MIN_BPE_VOCAB: usize = 258;

/// Documents encoded per `encode_batch` call (bounds the memory of the intermediate encodings).
const ENCODE_CHUNK: usize = 256;

/// Bumped whenever the trained tokenizer's recipe changes, so that stale caches are not reused.
const RECIPE_TAG: &[u8] = b"frugal-bpe-v1";

/// 64-bit FNV-1a, stable across runs, platforms and Rust versions (unlike `std::hash`).
#[derive(Debug, Clone, Copy)]
pub struct Fnv1a64(u64);

impl Default for Fnv1a64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a64 {
    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }

    /// The hash of everything fed so far.
    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// A stable 64-bit hash of a list of texts (each prefixed by its length, so that the split
/// between texts matters) and of the BPE recipe.
pub fn texts_hash(texts: &[&str]) -> u64 {
    let mut h = Fnv1a64::default();
    h.update(RECIPE_TAG);
    for text in texts {
        h.update(&(text.len() as u64).to_le_bytes());
        h.update(text.as_bytes());
    }
    h.finish()
}

/// Trains a byte-level BPE on `texts`: ByteLevel pre-tokenizer (no prefix space) and decoder,
/// the 256-byte initial alphabet, and the special tokens `<|endoftext|>` (id 0) and `<|pad|>`
/// (id 1). `vocab_size` counts the special tokens.
pub fn train_bpe(texts: &[&str], vocab_size: usize) -> Result<Tokenizer, DataError> {
    if vocab_size < MIN_BPE_VOCAB {
        return Err(DataError::InvalidValue {
            key: "tokenizer.vocab_size".to_string(),
            value: vocab_size.to_string(),
            reason: format!(
                "is too small for a byte-level BPE (at least {MIN_BPE_VOCAB}: 256 bytes and 2 \
                 special tokens)"
            ),
        });
    }
    if texts.iter().all(|t| t.is_empty()) {
        return Err(DataError::Tokenizer {
            message: "no text to train the BPE on".to_string(),
        });
    }
    let byte_level = ByteLevel::new(false, true, true);
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(byte_level));
    tokenizer.with_decoder(Some(byte_level));
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![
            AddedToken::from(EOS_TOKEN, true),
            AddedToken::from(PAD_TOKEN, true),
        ])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tokenizer
        .train(&mut trainer, texts.iter())
        .map_err(|e| DataError::Tokenizer {
            message: format!("BPE training failed: {}", one_line(e)),
        })?;
    Ok(tokenizer)
}

/// The cache file for a trained BPE: `cache_dir/bpe-<hash>-<vocab>.json`.
pub fn cached_tokenizer_path(texts: &[&str], vocab_size: usize, cache_dir: &Path) -> PathBuf {
    cache_dir.join(format!("bpe-{:016x}-{vocab_size}.json", texts_hash(texts)))
}

/// Reads a `tokenizer.json`, with errors naming the file.
pub fn load_tokenizer_file(path: &Path) -> Result<Tokenizer, DataError> {
    Tokenizer::from_file(path).map_err(|e| DataError::BadTokenizer {
        path: path.display().to_string(),
        message: one_line(e),
    })
}

/// The tokenizer of a run: the user's `tokenizer.json` when given (an error naming the file if it
/// does not parse); else the byte-level BPE cached at `cache_dir/bpe-<hash>-<vocab>.json`, where
/// the hash is a stable FNV-1a over `texts`, trained with [`train_bpe`] and written atomically
/// only when that file is missing (or unreadable).
pub fn load_or_train_tokenizer(
    user_file: Option<&Path>,
    texts: &[&str],
    vocab_size: usize,
    cache_dir: &Path,
) -> Result<Tokenizer, DataError> {
    if let Some(path) = user_file {
        return load_tokenizer_file(path);
    }
    let path = cached_tokenizer_path(texts, vocab_size, cache_dir);
    if path.is_file() {
        if let Ok(tok) = Tokenizer::from_file(&path) {
            return Ok(tok);
        }
    }
    let tok = train_bpe(texts, vocab_size)?;
    let json = tok.to_string(false).map_err(|e| DataError::Tokenizer {
        message: format!("cannot serialize the trained BPE: {}", one_line(e)),
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    frugal_core::atomic::write(&path, json.as_bytes()).map_err(|e| DataError::Tokenizer {
        message: format!("cannot cache the tokenizer: {e}"),
    })?;
    Ok(tok)
}

/// The end-of-text id: `<|endoftext|>`, else `</s>`, `<eos>`, `<|end_of_text|>`; `None` when the
/// tokenizer has none of them.
pub fn find_eos_id(tok: &Tokenizer) -> Option<u32> {
    [EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>"]
        .iter()
        .find_map(|t| tok.token_to_id(t))
}

/// The end-of-text id appended after each document: see [`find_eos_id`]; 0 when the tokenizer
/// has no such token.
pub fn eos_id(tok: &Tokenizer) -> u32 {
    find_eos_id(tok).unwrap_or(0)
}

/// The encoder's mask token, added to the trained BPE for encoder runs (after the learned
/// vocabulary: ids 0 and 1 and every merge keep their ids, so a cached tokenizer still loads).
pub const MASK_TOKEN: &str = "<|mask|>";
/// The encoder's summary token, first in every sequence (BERT's `[CLS]`).
pub const CLS_TOKEN: &str = "<|cls|>";
/// The encoder's separator, after each text of a classification example (BERT's `[SEP]`).
pub const SEP_TOKEN: &str = "<|sep|>";

/// The special ids an encoder run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderTokens {
    /// Replaces selected tokens in masked-LM inputs.
    pub mask: u32,
    /// First token of every sequence.
    pub cls: u32,
    /// After each text of an example.
    pub sep: u32,
    /// Padding (the tokenizer's pad token, else end-of-text).
    pub pad: u32,
    /// End of a document in the packed pre-training stream.
    pub eos: u32,
}

impl EncoderTokens {
    /// Ids that are never selected for masked-LM prediction.
    pub fn special(&self) -> [u32; 5] {
        [self.mask, self.cls, self.sep, self.pad, self.eos]
    }
}

/// Finds (or adds as special tokens) what an encoder needs: a mask, a summary and a separator
/// token. A tokenizer that has BERT's `[MASK]`/`[CLS]`/`[SEP]` or RoBERTa's
/// `<mask>`/`<s>`/`</s>` keeps them; otherwise `<|mask|>`, `<|cls|>`, `<|sep|>` are appended
/// after the existing vocabulary, so that no existing id changes. Idempotent.
pub fn add_encoder_tokens(tok: &mut Tokenizer) -> EncoderTokens {
    let mut find_or_add = |names: &[&str], ours: &str| -> u32 {
        if let Some(id) = names.iter().find_map(|t| tok.token_to_id(t)) {
            return id;
        }
        tok.add_special_tokens(&[AddedToken::from(ours, true)]);
        tok.token_to_id(ours).expect("just added")
    };
    let mask = find_or_add(&[MASK_TOKEN, "[MASK]", "<mask>"], MASK_TOKEN);
    let cls = find_or_add(&[CLS_TOKEN, "[CLS]", "<s>"], CLS_TOKEN);
    let sep = find_or_add(&[SEP_TOKEN, "[SEP]", "</s>"], SEP_TOKEN);
    let eos = find_eos_id(tok).unwrap_or(sep);
    let pad = [PAD_TOKEN, "[PAD]", "<pad>"]
        .iter()
        .find_map(|t| tok.token_to_id(t))
        .unwrap_or(eos);
    EncoderTokens {
        mask,
        cls,
        sep,
        pad,
        eos,
    }
}

/// Encodes documents (no special tokens added, truncation and padding of a user tokenizer
/// ignored) and concatenates them, with the end-of-text id after each.
pub fn encode_documents(tok: &Tokenizer, docs: &[Document]) -> Result<Vec<u32>, DataError> {
    let unlimited;
    let tok = if tok.get_truncation().is_some() || tok.get_padding().is_some() {
        let mut t = tok.clone();
        t.with_truncation(None)
            .map_err(|e| DataError::Tokenizer {
                message: one_line(e),
            })?
            .with_padding(None);
        unlimited = t;
        &unlimited
    } else {
        tok
    };
    let eos = eos_id(tok);
    let mut out = Vec::new();
    for chunk in docs.chunks(ENCODE_CHUNK) {
        let inputs: Vec<&str> = chunk.iter().map(|d| d.text.as_str()).collect();
        let encodings = match tok.encode_batch_fast(inputs, false) {
            Ok(encodings) => encodings,
            Err(batch_error) => {
                // Find the document at fault to name it.
                for doc in chunk {
                    if let Err(e) = tok.encode_fast(doc.text.as_str(), false) {
                        return Err(DataError::Tokenizer {
                            message: format!("cannot encode {}: {}", doc.name, one_line(e)),
                        });
                    }
                }
                return Err(DataError::Tokenizer {
                    message: format!("cannot encode {}: {}", chunk[0].name, one_line(batch_error)),
                });
            }
        };
        for encoding in encodings {
            out.extend_from_slice(encoding.get_ids());
            out.push(eos);
        }
    }
    Ok(out)
}

/// [`encode_documents`], and which tokens are targets: None when every token is (plain text);
/// for instruction records (a document with a `prompt` part), the prompt's tokens are not
/// (`false`), the response's and the end-of-text token are. The prompt and the response are
/// encoded separately, so that no token straddles the boundary.
pub fn encode_with_targets(
    tok: &Tokenizer,
    docs: &[Document],
) -> Result<(Vec<u32>, Option<Vec<bool>>), DataError> {
    if docs.iter().all(|d| d.prompt.is_none()) {
        return Ok((encode_documents(tok, docs)?, None));
    }
    let eos = eos_id(tok);
    let encode = |doc: &Document, text: &str| -> Result<Vec<u32>, DataError> {
        tok.encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| DataError::Tokenizer {
                message: format!("cannot encode {}: {}", doc.name, one_line(e)),
            })
    };
    let (mut ids, mut scored) = (Vec::new(), Vec::new());
    for doc in docs {
        let cut = doc.prompt.unwrap_or(0).min(doc.text.len());
        let (prompt, response) = doc.text.split_at(cut);
        let p = if prompt.is_empty() {
            Vec::new()
        } else {
            encode(doc, prompt)?
        };
        let r = encode(doc, response)?;
        scored.extend(std::iter::repeat_n(false, p.len()));
        scored.extend(std::iter::repeat_n(true, r.len() + 1));
        ids.extend(p);
        ids.extend(r);
        ids.push(eos);
    }
    Ok((ids, Some(scored)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "fn main() {\n    println!(\"héllo, wörld — 你好\");\n    let x = 1 + 2;\n}\n\
        The quick brown fox jumps over the lazy dog. The quick brown fox again, and again.\n\t\tTabs \
        and  double  spaces.\n";

    fn doc(name: &str, text: &str) -> Document {
        Document {
            name: name.to_string(),
            text: text.to_string(),
            prompt: None,
        }
    }

    #[test]
    fn fnv1a_known_values() {
        let mut h = Fnv1a64::default();
        assert_eq!(h.finish(), 0xcbf29ce484222325);
        h.update(b"a");
        assert_eq!(h.finish(), 0xaf63dc4c8601ec8c);
        let mut h = Fnv1a64::default();
        h.update(b"foobar");
        assert_eq!(h.finish(), 0x85944171f73967e8);
        assert_ne!(texts_hash(&["ab", "c"]), texts_hash(&["a", "bc"]));
        assert_eq!(texts_hash(&["ab", "c"]), texts_hash(&["ab", "c"]));
    }

    #[test]
    fn trains_and_round_trips() {
        let texts = [SAMPLE; 4];
        let tok = train_bpe(&texts, 300).unwrap();
        assert_eq!(tok.token_to_id(EOS_TOKEN), Some(0));
        assert_eq!(tok.token_to_id(PAD_TOKEN), Some(1));
        assert_eq!(eos_id(&tok), 0);
        let vocab = tok.get_vocab_size(true);
        assert!((258..=300).contains(&vocab), "{vocab}");
        assert!(vocab > 258, "no merges learned");
        for text in [SAMPLE, "unseen: Ωμέγα 🦀 \r\n  x", ""] {
            let enc = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        }
        // Merges make the sample shorter than its bytes.
        assert!(tok.encode(SAMPLE, false).unwrap().len() < SAMPLE.len() * 3 / 4);
    }

    #[test]
    fn bad_training_inputs_are_errors() {
        let err = train_bpe(&[SAMPLE], 100).unwrap_err().to_string();
        assert!(
            err.starts_with("tokenizer.vocab_size: 100 is too small"),
            "{err}"
        );
        let err = train_bpe(&["", ""], 1000).unwrap_err().to_string();
        assert_eq!(err, "tokenizer: no text to train the BPE on");
    }

    #[test]
    fn encodes_documents_with_eos_after_each() {
        let tok = train_bpe(&[SAMPLE], 300).unwrap();
        let docs = [doc("a", "hello"), doc("b", SAMPLE), doc("c", "x")];
        let ids = encode_documents(&tok, &docs).unwrap();
        let mut want = Vec::new();
        for d in &docs {
            want.extend(
                tok.encode(d.text.as_str(), false)
                    .unwrap()
                    .get_ids()
                    .iter()
                    .copied(),
            );
            want.push(0);
        }
        assert_eq!(ids, want);
        assert_eq!(ids.iter().filter(|&&t| t == 0).count(), 3);
        assert_eq!(tok.decode(&ids, true).unwrap(), format!("hello{SAMPLE}x"));
    }

    #[test]
    fn encode_ignores_user_truncation() {
        let mut tok = train_bpe(&[SAMPLE], 300).unwrap();
        let full = encode_documents(&tok, &[doc("s", SAMPLE)]).unwrap();
        tok.with_truncation(Some(tokenizers::TruncationParams {
            max_length: 4,
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(encode_documents(&tok, &[doc("s", SAMPLE)]).unwrap(), full);
    }

    #[test]
    fn caches_and_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let texts = [SAMPLE, "second text"];
        let path = cached_tokenizer_path(&texts, 280, &cache);
        assert!(!path.exists());
        let first = load_or_train_tokenizer(None, &texts, 280, &cache).unwrap();
        assert!(path.is_file());
        let mtime = fs::metadata(&path).unwrap().modified().unwrap();
        // No temporary files left behind.
        assert_eq!(fs::read_dir(&cache).unwrap().count(), 1);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let second = load_or_train_tokenizer(None, &texts, 280, &cache).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), mtime);
        assert_eq!(
            first.to_string(false).unwrap(),
            second.to_string(false).unwrap()
        );
        // A cache hit reads the file instead of training: plant a different tokenizer there.
        let planted = train_bpe(&["something else entirely"], 259).unwrap();
        fs::write(&path, planted.to_string(false).unwrap()).unwrap();
        let third = load_or_train_tokenizer(None, &texts, 280, &cache).unwrap();
        assert_eq!(third.get_vocab_size(true), planted.get_vocab_size(true));
        // Other texts or another vocabulary size use another file.
        assert_ne!(cached_tokenizer_path(&texts[..1], 280, &cache), path);
        assert_ne!(cached_tokenizer_path(&texts, 281, &cache), path);
        // A corrupt cache file is replaced by a fresh training.
        fs::write(&path, "not json").unwrap();
        let fourth = load_or_train_tokenizer(None, &texts, 280, &cache).unwrap();
        assert_eq!(
            fourth.to_string(false).unwrap(),
            first.to_string(false).unwrap()
        );
    }

    #[test]
    fn user_tokenizer_file() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("tokenizer.json");
        let tok = train_bpe(&[SAMPLE], 270).unwrap();
        tok.save(&good, false).unwrap();
        let cache = dir.path().join("cache");
        let loaded = load_or_train_tokenizer(Some(&good), &[SAMPLE], 8192, &cache).unwrap();
        assert_eq!(loaded.get_vocab_size(true), tok.get_vocab_size(true));
        assert!(!cache.exists(), "a user tokenizer must not train or cache");
        let bad = dir.path().join("bad.json");
        fs::write(&bad, "{\"model\": 3}").unwrap();
        let err = load_or_train_tokenizer(Some(&bad), &[SAMPLE], 300, &cache).unwrap_err();
        let err = err.to_string();
        assert!(err.starts_with(&format!("{}: not a usable tokenizer file: ", bad.display())));
        assert!(!err.contains('\n'));
        let missing = dir.path().join("missing.json");
        let err = load_tokenizer_file(&missing).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}: ", missing.display())),
            "{err}"
        );
    }

    /// Guarantee: the encoder's tokens are appended after the vocabulary: ids 0 and 1 and
    /// every learned token keep their ids, the text encodes as before, adding twice changes
    /// nothing, and a saved tokenizer of an older run (without them) loads and gets them.
    #[test]
    fn encoder_tokens_keep_existing_ids() {
        let dir = tempfile::tempdir().unwrap();
        let old = train_bpe(&[SAMPLE; 4], 300).unwrap();
        let path = dir.path().join("tokenizer.json");
        old.save(&path, false).unwrap();
        let mut tok = load_tokenizer_file(&path).unwrap();
        let before = tok.get_vocab_size(true) as u32;
        let t = add_encoder_tokens(&mut tok);
        assert_eq!(tok.token_to_id(EOS_TOKEN), Some(0));
        assert_eq!(tok.token_to_id(PAD_TOKEN), Some(1));
        assert_eq!((t.eos, t.pad), (0, 1));
        let mut new_ids = [t.mask, t.cls, t.sep];
        new_ids.sort();
        assert_eq!(new_ids, [before, before + 1, before + 2]);
        assert_eq!(tok.get_vocab_size(true) as u32, before + 3);
        assert_eq!(old.get_vocab(true).len() + 3, tok.get_vocab(true).len());
        for (token, id) in old.get_vocab(true) {
            assert_eq!(tok.token_to_id(&token), Some(id), "{token}");
        }
        assert_eq!(
            tok.encode(SAMPLE, false).unwrap().get_ids(),
            old.encode(SAMPLE, false).unwrap().get_ids()
        );
        let enc = tok.encode(format!("a{MASK_TOKEN}b"), false).unwrap();
        assert!(enc.get_ids().contains(&t.mask));
        assert_eq!(add_encoder_tokens(&mut tok), t);
        assert_eq!(tok.get_vocab_size(true) as u32, before + 3);
        // Through a file and back, as a run folder keeps it.
        let saved = dir.path().join("run-tokenizer.json");
        tok.save(&saved, false).unwrap();
        let mut again = load_tokenizer_file(&saved).unwrap();
        assert_eq!(add_encoder_tokens(&mut again), t);
    }

    #[test]
    fn eos_fallbacks() {
        let mut tok = Tokenizer::new(BPE::default());
        assert_eq!(find_eos_id(&tok), None);
        assert_eq!(eos_id(&tok), 0);
        tok.add_special_tokens(&[
            AddedToken::from("<s>", true),
            AddedToken::from("</s>", true),
        ]);
        assert_eq!(eos_id(&tok), 1);
    }
}
