//! What libtorch knows about CUDA and tch does not expose, through Frugal's extension: the
//! current stream, the caching allocator's statistics, and CUDA graphs.
//!
//! Each function checks first that libtorch sees a device and returns
//! [`KernelError::NoCuda`] otherwise, also when this crate was built against a libtorch
//! without CUDA ([`built_with_cuda`] is then false).

use std::ffi::{c_int, c_void};

use crate::error::{KernelError, Result};
use crate::ext_ffi::{self, check};

/// Whether the extension was compiled with its CUDA parts (a CUDA libtorch and the CUDA
/// runtime headers were found at build time).
pub fn built_with_cuda() -> bool {
    // SAFETY: a constant query without side effects.
    unsafe { ext_ffi::frugal_ext_has_cuda() != 0 }
}

fn device_index(device: usize) -> Result<c_int> {
    if !built_with_cuda() {
        return Err(KernelError::NoCuda(
            "Frugal's libtorch extension was built without CUDA (no libc10_cuda or no CUDA \
             runtime headers at build time)"
                .into(),
        ));
    }
    if !tch::Cuda::is_available() {
        return Err(KernelError::NoCuda("libtorch sees no CUDA device".into()));
    }
    let count = tch::Cuda::device_count();
    match c_int::try_from(device) {
        Ok(d) if i64::from(d) < count => Ok(d),
        _ => Err(KernelError::Invalid(format!(
            "cuda:{device} does not exist ({count} devices)"
        ))),
    }
}

fn ext(message: *mut std::ffi::c_char) -> Result<()> {
    check(message).map_err(KernelError::Libtorch)
}

/// libtorch's current stream on `device`, as a `CUstream` (what kernels launch on, so that
/// they are ordered with torch's work and can be captured into a CUDA graph).
pub fn current_stream(device: usize) -> Result<*mut c_void> {
    let d = device_index(device)?;
    let mut stream = std::ptr::null_mut();
    // SAFETY: `stream` is a valid out-pointer.
    ext(unsafe { ext_ffi::frugal_ext_current_stream(d, &mut stream) })?;
    Ok(stream)
}

/// The caching allocator's figures for one device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryStats {
    /// Bytes held by live tensors now.
    pub allocated: i64,
    /// Most bytes held by live tensors since the start or the last [`reset_peak`].
    pub peak_allocated: i64,
    /// Bytes the allocator holds from the driver now (live tensors and its cache).
    pub reserved: i64,
    /// Most bytes reserved since the start or the last [`reset_peak`].
    pub peak_reserved: i64,
}

/// The caching allocator's statistics for `device` (`torch.cuda.memory_stats`).
pub fn memory_stats(device: usize) -> Result<MemoryStats> {
    let d = device_index(device)?;
    let mut v = [0i64; 4];
    // SAFETY: `v` has room for the four values written.
    ext(unsafe { ext_ffi::frugal_ext_memory_stats(d, v.as_mut_ptr()) })?;
    Ok(MemoryStats {
        allocated: v[0],
        peak_allocated: v[1],
        reserved: v[2],
        peak_reserved: v[3],
    })
}

/// Resets the peaks of [`memory_stats`] to the current values (`torch.cuda.reset_peak_memory_stats`).
pub fn reset_peak(device: usize) -> Result<()> {
    let d = device_index(device)?;
    // SAFETY: no pointers involved.
    ext(unsafe { ext_ffi::frugal_ext_reset_peak(d) })
}

/// Returns the allocator's unused cached blocks to the driver (`torch.cuda.empty_cache`).
pub fn empty_cache() -> Result<()> {
    device_index(0)?;
    // SAFETY: no pointers involved.
    ext(unsafe { ext_ffi::frugal_ext_empty_cache() })
}

/// A CUDA graph (`at::cuda::CUDAGraph`): the kernels libtorch queues between
/// [`capture_begin`](Self::capture_begin) and [`capture_end`](Self::capture_end), replayed
/// with [`replay`](Self::replay) on the same memory, without the CPU work that queued them.
///
/// Capture runs on a side stream that becomes libtorch's current stream meanwhile. As with
/// `torch.cuda.graph`, run the work once or twice eagerly before capturing (warm-up), keep every
/// tensor the graph reads or writes alive, and refill inputs in place (`copy_`) before a replay.
#[derive(Debug)]
pub struct CudaGraph {
    ptr: *mut ext_ffi::FrugalGraph,
}

// SAFETY: the graph is a libtorch object with no thread affinity; `&mut self` serialises use.
unsafe impl Send for CudaGraph {}

impl CudaGraph {
    /// An empty graph for `device`.
    pub fn new(device: usize) -> Result<Self> {
        let d = device_index(device)?;
        let mut ptr = std::ptr::null_mut();
        // SAFETY: `ptr` is a valid out-pointer.
        ext(unsafe { ext_ffi::frugal_ext_graph_new(d, &mut ptr) })?;
        Ok(Self { ptr })
    }

    /// Starts capturing libtorch's (and this crate's) kernels on a side stream.
    pub fn capture_begin(&mut self) -> Result<()> {
        // SAFETY: `self.ptr` is a live graph.
        ext(unsafe { ext_ffi::frugal_ext_graph_capture_begin(self.ptr) })
    }

    /// Ends the capture and instantiates the graph; the stream before the capture is current again.
    pub fn capture_end(&mut self) -> Result<()> {
        // SAFETY: `self.ptr` is a live graph.
        ext(unsafe { ext_ffi::frugal_ext_graph_capture_end(self.ptr) })
    }

    /// Captures what `body` queues: [`capture_begin`](Self::capture_begin), `body`,
    /// [`capture_end`](Self::capture_end) (also when `body` fails, whose error wins).
    pub fn capture<T>(&mut self, body: impl FnOnce() -> Result<T>) -> Result<T> {
        self.capture_begin()?;
        let out = body();
        let end = self.capture_end();
        let out = out?;
        end?;
        Ok(out)
    }

    /// Replays the captured kernels on the current stream.
    pub fn replay(&mut self) -> Result<()> {
        // SAFETY: `self.ptr` is a live graph.
        ext(unsafe { ext_ffi::frugal_ext_graph_replay(self.ptr) })
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: `self.ptr` came from `frugal_ext_graph_new` and is freed once.
        unsafe { ext_ffi::frugal_ext_graph_free(self.ptr) }
    }
}
