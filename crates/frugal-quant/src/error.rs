//! Errors of the quantizers: each names the tensor, the shape or the setting at fault.

/// What can go wrong when quantizing, packing or reading quantized tensors.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// A block or group size that the format does not allow.
    #[error("{what} {got} is not allowed ({allowed})")]
    BadSize {
        /// `block_size` or `group_size`.
        what: &'static str,
        /// The size asked for.
        got: usize,
        /// What is allowed.
        allowed: &'static str,
    },
    /// A shape that does not divide as the format needs.
    #[error("{name}: shape {shape:?} {reason}")]
    Shape {
        /// The tensor.
        name: String,
        /// Its shape.
        shape: Vec<i64>,
        /// What does not divide.
        reason: String,
    },
    /// A tensor of a dtype the quantizer does not take.
    #[error("{name}: dtype {dtype} is not supported ({expected})")]
    Dtype {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: String,
        /// What is expected.
        expected: &'static str,
    },
    /// Stored tensors that do not agree with each other or with their description.
    #[error("{name}: inconsistent quantized tensors: {reason}")]
    Inconsistent {
        /// The weight's name.
        name: String,
        /// What disagrees.
        reason: String,
    },
    /// An option or value the quantizers do not know.
    #[error("{name}: {reason}")]
    Option {
        /// The option (`--format`).
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// An error from libtorch while moving data.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// `Result` with [`QuantError`].
pub type Result<T, E = QuantError> = std::result::Result<T, E>;
