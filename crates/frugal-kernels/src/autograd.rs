//! Custom autograd functions written in Rust: a forward and a backward of your own, recorded
//! in libtorch's graph like any built-in operation, on the CPU and on CUDA.
//!
//! tch exposes no `torch.autograd.Function`; the extension in `csrc/ext.cpp` provides one whose
//! forward and backward call back into a [`CustomFunction`]. Use it where composing tch
//! operations would keep too much for the backward pass (a scan, a fused quantizer), or where a
//! kernel of this crate computes the forward.
//!
//! ```
//! use frugal_kernels::autograd::{apply, CustomFunction};
//! use tch::{Kind, Tensor};
//!
//! /// y = x^3, keeping x for the backward.
//! struct Cube(Option<Tensor>);
//!
//! impl CustomFunction for Cube {
//!     fn forward(&mut self, inputs: &[Tensor]) -> frugal_kernels::Result<Vec<Tensor>> {
//!         self.0 = Some(inputs[0].detach());
//!         Ok(vec![inputs[0].pow_tensor_scalar(3)])
//!     }
//!     fn backward(&mut self, grads: &[Tensor]) -> frugal_kernels::Result<Vec<Option<Tensor>>> {
//!         let x = self.0.take().expect("forward ran");
//!         Ok(vec![Some(&grads[0] * x.square() * 3.0)])
//!     }
//! }
//!
//! # fn main() -> frugal_kernels::Result<()> {
//! let x = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
//! let y = apply(Cube(None), &[&x])?.remove(0);
//! y.sum(Kind::Float).backward();
//! assert_eq!(Vec::<f32>::try_from(x.grad())?, vec![3.0, 12.0]);
//! # Ok(())
//! # }
//! ```

use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::Tensor;
use torch_sys::C_tensor;

use crate::error::{KernelError, Result};
use crate::ext_ffi::{self, RustCallbacks};

/// A differentiable operation computed by Rust code.
///
/// [`apply`] runs [`forward`](Self::forward) with gradient recording off and gives its outputs a
/// graph node; when the backward pass reaches that node, [`backward`](Self::backward) runs once
/// (per backward pass), possibly on another thread, hence `Send`.
///
/// Keep what the backward needs in `self`: inputs as they are, outputs only as `detach()`ed
/// copies (an output holds the node that holds `self`; keeping the output itself would be a
/// reference cycle that never frees).
pub trait CustomFunction: Send + 'static {
    /// The outputs (at least one) for `inputs`.
    fn forward(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>>;

    /// The gradients with respect to each input, in order (`None`: no gradient), given the
    /// gradient of each output (zeros for an output that received none).
    fn backward(&mut self, grad_outputs: &[Tensor]) -> Result<Vec<Option<Tensor>>>;
}

struct State<F> {
    function: F,
    inputs: usize,
}

/// Borrowed extension tensors as owned tch handles on the same tensors.
///
/// # Safety
/// `ts` points to `n` valid tensor pointers.
unsafe fn borrowed(ts: *const *mut C_tensor, n: usize) -> Vec<Tensor> {
    (0..n)
        .map(|i| {
            // SAFETY: `ts[i]` is valid per the contract; the clone is a new heap tensor that
            // the returned `Tensor` owns and frees.
            unsafe { Tensor::from_ptr(ext_ffi::frugal_ext_shallow_clone(*ts.add(i))) }
        })
        .collect()
}

/// Runs `body`, turning an error or a panic into a message for the extension.
fn to_message(
    what: &str,
    body: impl FnOnce() -> Result<Vec<Option<Tensor>>>,
    out: *mut c_void,
) -> *mut c_char {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(tensors)) => {
            for t in tensors {
                let ptr = match t {
                    Some(mut t) => {
                        let ptr = t.as_mut_ptr();
                        // The extension takes ownership of the heap tensor and deletes it.
                        std::mem::forget(t);
                        ptr
                    }
                    None => std::ptr::null_mut(),
                };
                // SAFETY: `out` is the extension's result list; `ptr` is owned or null.
                unsafe { ext_ffi::frugal_ext_push(out, ptr) };
            }
            std::ptr::null_mut()
        }
        Ok(Err(e)) => ext_ffi::message_from_rust(&format!("{what}: {e}")),
        Err(panic) => {
            let text = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            ext_ffi::message_from_rust(&format!("{what} panicked: {text}"))
        }
    }
}

/// The body shared by [`forward`] and [`backward`]: `call` on the function's state and the
/// `n` tensors at `ts`, its results pushed into the extension's list `out`.
///
/// # Safety
/// `state` is the `State<F>` boxed by `apply`, alive until `drop_state`; the extension calls
/// forward and backward one at a time, with `n` valid tensors at `ts`.
unsafe fn callback<F: CustomFunction>(
    what: &str,
    state: *mut c_void,
    ts: *const *mut C_tensor,
    n: usize,
    out: *mut c_void,
    call: impl FnOnce(&mut State<F>, &[Tensor]) -> Result<Vec<Option<Tensor>>>,
) -> *mut c_char {
    // SAFETY: per this function's contract.
    let state = unsafe { &mut *state.cast::<State<F>>() };
    // SAFETY: per this function's contract.
    let tensors = unsafe { borrowed(ts, n) };
    to_message(what, || call(state, &tensors), out)
}

unsafe extern "C" fn forward<F: CustomFunction>(
    state: *mut c_void,
    ts: *const *mut C_tensor,
    n: usize,
    out: *mut c_void,
) -> *mut c_char {
    let call = |state: &mut State<F>, inputs: &[Tensor]| {
        let outputs = state.function.forward(inputs)?;
        if outputs.is_empty() {
            return Err(KernelError::Invalid("forward returned no outputs".into()));
        }
        Ok(outputs.into_iter().map(Some).collect())
    };
    // SAFETY: the extension calls this with the state of `apply` and `n` valid inputs.
    unsafe { callback("custom autograd forward", state, ts, n, out, call) }
}

unsafe extern "C" fn backward<F: CustomFunction>(
    state: *mut c_void,
    ts: *const *mut C_tensor,
    n: usize,
    out: *mut c_void,
) -> *mut c_char {
    let call = |state: &mut State<F>, grads: &[Tensor]| {
        let want = state.inputs;
        let grads = state.function.backward(grads)?;
        if grads.len() != want {
            return Err(KernelError::Invalid(format!(
                "backward returned {} gradients for {want} inputs",
                grads.len()
            )));
        }
        Ok(grads)
    };
    // SAFETY: the extension calls this with the state of `apply` and `n` valid gradients.
    unsafe { callback("custom autograd backward", state, ts, n, out, call) }
}

unsafe extern "C" fn drop_state<F>(state: *mut c_void) {
    // SAFETY: `state` is the box leaked by `apply`, dropped once by the extension.
    let state = unsafe { Box::from_raw(state.cast::<State<F>>()) };
    // A panic must not unwind into C++: report it and go on (the state is gone either way).
    if catch_unwind(AssertUnwindSafe(|| drop(state))).is_err() {
        eprintln!("frugal: a custom autograd function panicked while being dropped");
    }
}

unsafe extern "C" fn sink(ctx: *mut c_void, t: *mut C_tensor) {
    // SAFETY: `ctx` is the `Vec<Tensor>` of `apply`, `t` a new heap tensor we now own.
    unsafe { (*ctx.cast::<Vec<Tensor>>()).push(Tensor::from_ptr(t)) };
}

/// Whether autograd records operations on this thread now (`torch.is_grad_enabled()`): false
/// inside `tch::no_grad`.
pub fn grad_enabled() -> bool {
    // SAFETY: reads a thread-local flag.
    unsafe { ext_ffi::frugal_ext_grad_enabled() != 0 }
}

/// Applies `function` to `inputs`, recording it in the autograd graph: the outputs' gradients
/// reach the inputs through [`CustomFunction::backward`].
///
/// Errors (and panics) of the forward come back here; those of the backward come back from the
/// call that runs the backward pass (`Tensor::f_backward` and the like).
pub fn apply<F: CustomFunction>(function: F, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
    let state = Box::new(State {
        function,
        inputs: inputs.len(),
    });
    let callbacks = RustCallbacks {
        state: Box::into_raw(state).cast(),
        forward: forward::<F>,
        backward: backward::<F>,
        free_message: ext_ffi::free_message_from_rust,
        drop: drop_state::<F>,
    };
    let ptrs: Vec<*mut C_tensor> = inputs.iter().map(|t| t.as_ptr().cast_mut()).collect();
    let mut outputs: Vec<Tensor> = Vec::new();
    // SAFETY: the callbacks match the extension's contract for a `State<F>`, whose ownership
    // passes to the extension; the input pointers are borrowed for the call; `sink` receives
    // `outputs`, alive for the call.
    let message = unsafe {
        ext_ffi::frugal_ext_apply(
            callbacks,
            ptrs.as_ptr(),
            ptrs.len(),
            sink,
            (&mut outputs as *mut Vec<Tensor>).cast(),
        )
    };
    ext_ffi::check(message).map_err(KernelError::Libtorch)?;
    Ok(outputs)
}
