//! The error type shared by Frugal's crates: each variant names what went wrong and where.

use std::path::PathBuf;

/// Errors of Frugal's library crates. Messages are one line and name the file, key or shape.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A safetensors file is malformed or truncated.
    #[error("{}: not a valid safetensors file ({reason})", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// A tensor has a shape other than the one expected.
    #[error("{name}: shape {got:?}, expected {expected:?}")]
    Shape {
        /// The tensor's name.
        name: String,
        /// The expected shape.
        expected: Vec<i64>,
        /// The shape found.
        got: Vec<i64>,
    },
    /// A tensor that should be there is not.
    #[error("{}: no tensor named '{name}'", path.display())]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The missing tensor.
        name: String,
    },
    /// A configuration value is wrong.
    #[error("{key}: {reason}")]
    Config {
        /// The key, as written in the config (`train.seq_len`).
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An error from libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// Anything else, described.
    #[error("{0}")]
    Msg(String),
}

impl Error {
    /// An I/O error about `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A configuration error about `key`.
    pub fn config(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// `Result` with Frugal's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
