//! Sequence-classification data: TSV files of `text<TAB>label` or `text<TAB>text2<TAB>label`
//! rows, their labels mapped to class ids, and padded batches for the encoder.
//!
//! - A first line whose last field is `label` (any case) is a header and is skipped.
//! - Empty lines are skipped; every other row must have the same number of fields (2 or 3)
//!   and a non-empty label. Errors name the file and the line.
//! - Labels are strings; ids are given in order of first appearance in the training file
//!   ([`LabelMap`]), and the run keeps the mapping in `labels.json`.

use crate::tokenize::EncoderTokens;
use frugal_core::{Error, Result};
use std::path::Path;
use tch::Tensor;
use tokenizers::Tokenizer;

/// One row of a TSV file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The first text.
    pub text: String,
    /// The second text of a pair, if the file has three columns.
    pub text2: Option<String>,
    /// The label, as written.
    pub label: String,
    /// Line number in the file (1-based).
    pub line: usize,
}

/// Reads the examples of a TSV file; `key` names the config key in errors about the file as a
/// whole (`data.task_path: ...`).
pub fn read(key: &str, path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::config(key, format!("cannot read {}: {e}", path.display())))?;
    parse(&text, &path.display().to_string())
}

/// Parses TSV text; `name` (the file) starts every error.
pub fn parse(text: &str, name: &str) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    let mut columns = None;
    let mut first = true;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let row = raw.strip_suffix('\r').unwrap_or(raw);
        if row.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = row.split('\t').collect();
        if std::mem::take(&mut first)
            && fields
                .last()
                .is_some_and(|l| l.trim().eq_ignore_ascii_case("label"))
        {
            columns = Some(fields.len());
            continue;
        }
        let bad = |what: String| Error::Msg(format!("{name}: line {line}: {what}"));
        if fields.len() < 2 {
            return Err(bad(
                "missing label (rows are text<TAB>label or text<TAB>text2<TAB>label)".into(),
            ));
        }
        if fields.len() > 3 {
            return Err(bad(format!(
                "{} fields; rows are text<TAB>label or text<TAB>text2<TAB>label",
                fields.len()
            )));
        }
        match columns {
            Some(n) if n != fields.len() => {
                return Err(bad(format!(
                    "{} fields where the rows above have {n} (missing label or text?)",
                    fields.len()
                )))
            }
            _ => columns = Some(fields.len()),
        }
        let label = fields[fields.len() - 1].trim();
        if label.is_empty() {
            return Err(bad("missing label (the last field is empty)".into()));
        }
        out.push(Example {
            text: fields[0].to_string(),
            text2: (fields.len() == 3).then(|| fields[1].to_string()),
            label: label.to_string(),
            line,
        });
    }
    if out.is_empty() {
        return Err(Error::Msg(format!("{name}: no examples")));
    }
    Ok(out)
}

/// Splits off validation examples: row i is validation when `i % every == every - 1` (the
/// rule of the text data's `data.val_every`).
pub fn split(rows: Vec<Example>, every: usize) -> (Vec<Example>, Vec<Example>) {
    let every = every.max(1);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (i, e) in rows.into_iter().enumerate() {
        if every > 1 && i % every == every - 1 {
            val.push(e);
        } else {
            train.push(e);
        }
    }
    (train, val)
}

/// Label strings and their class ids (the position in the list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    /// Labels by class id.
    pub labels: Vec<String>,
}

impl LabelMap {
    /// Labels in order of first appearance.
    pub fn from_examples(rows: &[Example]) -> Self {
        let mut labels: Vec<String> = Vec::new();
        for e in rows {
            if !labels.contains(&e.label) {
                labels.push(e.label.clone());
            }
        }
        Self { labels }
    }

    /// The class id of every example; an unknown label is an error naming `file` and the line.
    pub fn ids(&self, rows: &[Example], file: &str) -> Result<Vec<i64>> {
        rows.iter()
            .map(|e| {
                self.labels
                    .iter()
                    .position(|l| *l == e.label)
                    .map(|i| i as i64)
                    .ok_or_else(|| {
                        Error::Msg(format!(
                            "{file}: line {}: label '{}' is not one of the training labels ({})",
                            e.line,
                            e.label,
                            self.labels.join(", ")
                        ))
                    })
            })
            .collect()
    }

    /// As JSON: the list of labels, index = class id.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.labels).expect("strings")
    }

    /// Reads [`LabelMap::to_json`]'s form.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let labels: Vec<String> = serde_json::from_str(&text)
            .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
        Ok(Self { labels })
    }
}

/// Examples as token ids: `[CLS] text [SEP]` or `[CLS] text [SEP] text2 [SEP]`, token types 0
/// for the first segment and 1 for the second, truncated (longest text first) to `max_len`.
#[derive(Debug, Clone)]
pub struct EncodedSet {
    /// Token ids per example.
    pub ids: Vec<Vec<i64>>,
    /// Token types per example.
    pub types: Vec<Vec<i64>>,
    /// Class ids.
    pub labels: Vec<i64>,
    /// Padding id.
    pub pad: i64,
}

/// Encodes examples with their class ids.
pub fn encode(
    tok: &Tokenizer,
    t: &EncoderTokens,
    rows: &[Example],
    labels: Vec<i64>,
    max_len: usize,
) -> Result<EncodedSet> {
    let enc = |s: &str, line: usize| -> Result<Vec<i64>> {
        Ok(tok
            .encode_fast(s, false)
            .map_err(|e| Error::Msg(format!("line {line}: cannot encode: {e}")))?
            .get_ids()
            .iter()
            .map(|&i| i64::from(i))
            .collect())
    };
    let (cls, sep) = (i64::from(t.cls), i64::from(t.sep));
    let mut ids = Vec::with_capacity(rows.len());
    let mut types = Vec::with_capacity(rows.len());
    for e in rows {
        let mut a = enc(&e.text, e.line)?;
        let mut b = match &e.text2 {
            Some(s) => Some(enc(s, e.line)?),
            None => None,
        };
        let specials = if b.is_some() { 3 } else { 2 };
        let room = max_len.saturating_sub(specials);
        loop {
            let total = a.len() + b.as_ref().map_or(0, |b| b.len());
            if total <= room {
                break;
            }
            match &mut b {
                Some(bb) if bb.len() > a.len() => {
                    bb.pop();
                }
                _ => {
                    a.pop();
                }
            }
        }
        let mut row = vec![cls];
        row.extend(&a);
        row.push(sep);
        let mut ty = vec![0; row.len()];
        if let Some(b) = b {
            row.extend(&b);
            row.push(sep);
            ty.resize(row.len(), 1);
        }
        row.truncate(max_len.max(1));
        ty.truncate(row.len());
        ids.push(row);
        types.push(ty);
    }
    Ok(EncodedSet {
        ids,
        types,
        labels,
        pad: i64::from(t.pad),
    })
}

/// A padded batch: ids, token types, attention mask (1 at real tokens) `(B, T)` with T the
/// longest example of the batch, class ids `(B,)`, and the real tokens.
pub struct Batch {
    /// Token ids.
    pub ids: Tensor,
    /// Token types.
    pub types: Tensor,
    /// 1 at real tokens, 0 at padding.
    pub mask: Tensor,
    /// Class ids.
    pub labels: Tensor,
    /// Real tokens in the batch.
    pub tokens: u64,
}

impl EncodedSet {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The examples at `indices`, padded to the longest.
    pub fn batch(&self, indices: &[usize]) -> Batch {
        self.batch_padded(indices, 0)
    }

    /// The longest example's tokens.
    pub fn longest(&self) -> usize {
        self.ids.iter().map(Vec::len).max().unwrap_or(1)
    }

    /// The examples at `indices`, padded to `len` tokens or to the longest of them if longer
    /// (a fixed `len`, [`EncodedSet::longest`], gives every batch one shape, as a replayed
    /// CUDA graph needs; the padding is masked).
    pub fn batch_padded(&self, indices: &[usize], len: usize) -> Batch {
        let t = indices
            .iter()
            .map(|&i| self.ids[i].len())
            .max()
            .unwrap_or(1)
            .max(len);
        let mut ids = Vec::with_capacity(indices.len() * t);
        let mut types = Vec::with_capacity(indices.len() * t);
        let mut mask = Vec::with_capacity(indices.len() * t);
        let mut tokens = 0u64;
        for &i in indices {
            let (row, ty) = (&self.ids[i], &self.types[i]);
            tokens += row.len() as u64;
            for j in 0..t {
                ids.push(row.get(j).copied().unwrap_or(self.pad));
                types.push(ty.get(j).copied().unwrap_or(0));
                mask.push(i64::from(j < row.len()));
            }
        }
        let shape = [indices.len() as i64, t as i64];
        let labels: Vec<i64> = indices.iter().map(|&i| self.labels[i]).collect();
        Batch {
            ids: Tensor::from_slice(&ids).view(shape),
            types: Tensor::from_slice(&types).view(shape),
            mask: Tensor::from_slice(&mask).view(shape),
            labels: Tensor::from_slice(&labels),
            tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pairs_headers_and_names_bad_rows() {
        let rows = parse(
            "sentence\tlabel\nthe cat\tyes\n\nno dog here\tno\n",
            "f.tsv",
        )
        .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].text, "the cat");
        assert_eq!(rows[1].line, 4);
        assert_eq!(rows[1].text2, None);
        let pairs = parse("a\tb\tpos\r\nc\td\tneg\n", "p.tsv").unwrap();
        assert_eq!(pairs[0].text2.as_deref(), Some("b"));
        assert_eq!(pairs[0].label, "pos");
        let err = parse("a\tyes\nonly text\n", "f.tsv")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("f.tsv: line 2: missing label"), "{err}");
        let err = parse("a\tyes\nb\t \n", "f.tsv").unwrap_err().to_string();
        assert!(err.starts_with("f.tsv: line 2: missing label"), "{err}");
        let err = parse("a\tb\tyes\nc\tno\n", "f.tsv")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("f.tsv: line 2:"), "{err}");
        let err = parse("\n\n", "e.tsv").unwrap_err().to_string();
        assert_eq!(err, "e.tsv: no examples");
    }

    #[test]
    fn labels_in_order_of_first_appearance() {
        let rows = parse("a\tz\nb\ty\nc\tz\nd\tx\n", "f").unwrap();
        let map = LabelMap::from_examples(&rows);
        assert_eq!(map.labels, ["z", "y", "x"]);
        assert_eq!(map.ids(&rows, "f").unwrap(), [0, 1, 0, 2]);
        let other = parse("e\tw\n", "v.tsv").unwrap();
        let err = map.ids(&other, "v.tsv").unwrap_err().to_string();
        assert!(err.starts_with("v.tsv: line 1: label 'w'"), "{err}");
        let (train, val) = split(rows, 2);
        assert_eq!(train.len(), 2);
        assert_eq!(val[0].text, "b");
    }
}
