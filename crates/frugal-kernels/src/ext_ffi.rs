//! Declarations of `csrc/ext.cpp`, the C++ extension compiled by the build script.

use std::ffi::{c_char, c_int, c_void};

use torch_sys::C_tensor;

/// A Rust callback: borrowed tensors in, results pushed with [`frugal_ext_push`] into `out`;
/// null on success or a message from [`message_from_rust`].
pub(crate) type Callback = unsafe extern "C" fn(
    state: *mut c_void,
    ts: *const *mut C_tensor,
    n: usize,
    out: *mut c_void,
) -> *mut c_char;

/// The Rust side of one autograd function call, as `csrc/ext.cpp` declares it.
#[repr(C)]
pub(crate) struct RustCallbacks {
    pub state: *mut c_void,
    pub forward: Callback,
    pub backward: Callback,
    pub free_message: unsafe extern "C" fn(*mut c_char),
    pub drop: unsafe extern "C" fn(*mut c_void),
}

/// An opaque `FrugalGraph` of the extension.
#[repr(C)]
pub(crate) struct FrugalGraph {
    _private: [u8; 0],
}

unsafe extern "C" {
    pub(crate) fn frugal_ext_free_string(s: *mut c_char);
    pub(crate) fn frugal_ext_push(out: *mut c_void, t: *mut C_tensor);
    pub(crate) fn frugal_ext_shallow_clone(t: *mut C_tensor) -> *mut C_tensor;
    pub(crate) fn frugal_ext_apply(
        cb: RustCallbacks,
        inputs: *const *mut C_tensor,
        n_in: usize,
        sink: unsafe extern "C" fn(*mut c_void, *mut C_tensor),
        sink_ctx: *mut c_void,
    ) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn frugal_ext_fused_adamw(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        exp_avgs: *const *mut C_tensor,
        exp_avg_sqs: *const *mut C_tensor,
        steps: *const *mut C_tensor,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> *mut c_char;
    pub(crate) fn frugal_ext_grad_enabled() -> c_int;
    pub(crate) fn frugal_ext_has_cuda() -> c_int;
    pub(crate) fn frugal_ext_current_stream(device: c_int, stream: *mut *mut c_void)
        -> *mut c_char;
    pub(crate) fn frugal_ext_memory_stats(device: c_int, out4: *mut i64) -> *mut c_char;
    pub(crate) fn frugal_ext_reset_peak(device: c_int) -> *mut c_char;
    pub(crate) fn frugal_ext_empty_cache() -> *mut c_char;
    pub(crate) fn frugal_ext_graph_new(device: c_int, out: *mut *mut FrugalGraph) -> *mut c_char;
    pub(crate) fn frugal_ext_graph_free(g: *mut FrugalGraph);
    pub(crate) fn frugal_ext_graph_capture_begin(g: *mut FrugalGraph) -> *mut c_char;
    pub(crate) fn frugal_ext_graph_capture_end(g: *mut FrugalGraph) -> *mut c_char;
    pub(crate) fn frugal_ext_graph_replay(g: *mut FrugalGraph) -> *mut c_char;
}

/// Takes a message returned by the extension (null: success) and frees it.
pub(crate) fn check(message: *mut c_char) -> Result<(), String> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return of the extension is a NUL-terminated string from malloc, ours to
    // free once, here.
    let text = unsafe { std::ffi::CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: as above; freed once.
    unsafe { frugal_ext_free_string(message) };
    Err(text)
}

/// A message for the extension, freed by [`free_message_from_rust`].
pub(crate) fn message_from_rust(text: &str) -> *mut c_char {
    let clean: String = text
        .chars()
        .map(|c| if c == '\0' { ' ' } else { c })
        .collect();
    std::ffi::CString::new(clean)
        .expect("NULs were replaced")
        .into_raw()
}

/// Frees a message of [`message_from_rust`].
///
/// # Safety
/// `message` came from [`message_from_rust`] and is freed once.
pub(crate) unsafe extern "C" fn free_message_from_rust(message: *mut c_char) {
    if !message.is_null() {
        // SAFETY: per the contract, the pointer came from `CString::into_raw`.
        drop(unsafe { std::ffi::CString::from_raw(message) });
    }
}
