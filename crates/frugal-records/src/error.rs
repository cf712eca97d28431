//! What reading a record can fail with: the file, and for `metrics.jsonl` the line.

use std::fmt;
use std::path::PathBuf;

/// A record that could not be read: the file could not be read, or one of its records is not
/// valid JSON of the record's type.
#[derive(Debug)]
pub enum RecordsError {
    /// The file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A record of the file is not what its type says (a missing field, a wrong type, not
    /// JSON).
    Parse {
        /// The file.
        path: PathBuf,
        /// The line, counted from 1, for a file of one record per line (`metrics.jsonl`);
        /// `None` for a file that is one record (`memory.json`).
        line: Option<usize>,
        /// What serde_json says is wrong.
        source: serde_json::Error,
    },
}

impl RecordsError {
    /// The file that could not be read.
    pub fn path(&self) -> &std::path::Path {
        match self {
            Self::Read { path, .. } | Self::Parse { path, .. } => path,
        }
    }
}

impl fmt::Display for RecordsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read { path, source } => write!(f, "cannot read {}: {source}", path.display()),
            Self::Parse {
                path,
                line: Some(line),
                source,
            } => write!(f, "{} line {line}: {source}", path.display()),
            Self::Parse {
                path,
                line: None,
                source,
            } => write!(f, "{}: {source}", path.display()),
        }
    }
}

impl std::error::Error for RecordsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Read { source, .. } => Some(source),
            Self::Parse { source, .. } => Some(source),
        }
    }
}
