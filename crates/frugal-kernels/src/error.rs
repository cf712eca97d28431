//! The crate's error type: every entry point reports a missing GPU, driver or libnvrtc as a value.

/// What can go wrong when compiling or launching a kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// No usable CUDA driver or device (or libtorch was built without CUDA).
    #[error("CUDA is not available: {0}")]
    NoCuda(String),
    /// libnvrtc could not be loaded from any of the places searched.
    #[error(
        "libnvrtc could not be loaded; searched: {searched:?}. Set LIBTORCH to the torch \
         wheel's folder (its nvidia/cu13/lib holds libnvrtc) or FRUGAL_NVRTC to the library's path"
    )]
    NoNvrtc {
        /// Full paths and bare library names that were tried, in order.
        searched: Vec<String>,
    },
    /// nvrtc rejected the source.
    #[error("nvrtc could not compile {name} for {arch}: {message}")]
    Compile {
        /// The kernel family (source file) name.
        name: String,
        /// The `--gpu-architecture` value.
        arch: String,
        /// nvrtc's error and program log.
        message: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver error: {0}")]
    Driver(String),
    /// Arguments of the wrong device, dtype, shape or layout.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// An error reported by libtorch through Frugal's extension (a message of its own, or of
    /// the Rust function it called back).
    #[error("{0}")]
    Libtorch(String),
    /// An error from tch.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// `Result` with [`KernelError`].
pub type Result<T> = std::result::Result<T, KernelError>;

impl From<cudarc::driver::DriverError> for KernelError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        KernelError::Driver(format!("{e:?}"))
    }
}
