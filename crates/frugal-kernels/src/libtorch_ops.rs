//! libtorch operations that tch does not bind, reached through Frugal's extension.

use tch::{Kind, Tensor};
use torch_sys::C_tensor;

use crate::error::{KernelError, Result};
use crate::ext_ffi;

/// AdamW's hyper-parameters for [`fused_adamw`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWHyper {
    /// Learning rate.
    pub lr: f64,
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// ε.
    pub eps: f64,
}

/// One step of libtorch's fused AdamW (`torch.optim.AdamW(fused=True)`, `at::_fused_adamw_`)
/// over `params` in place, with their `grads`, moments and step counters (`steps`: one f32
/// scalar tensor per parameter, incremented). CPU and CUDA; the baseline that Frugal's optimizer
/// kernels are measured against.
pub fn fused_adamw(
    params: &[&Tensor],
    grads: &[&Tensor],
    exp_avgs: &[&Tensor],
    exp_avg_sqs: &[&Tensor],
    steps: &[&Tensor],
    h: AdamWHyper,
) -> Result<()> {
    let n = params.len();
    if [grads.len(), exp_avgs.len(), exp_avg_sqs.len(), steps.len()]
        .iter()
        .any(|&len| len != n)
    {
        return Err(KernelError::Invalid(format!(
            "fused_adamw: {n} parameters but {} gradients, {} first moments, {} second moments \
             and {} step counters",
            grads.len(),
            exp_avgs.len(),
            exp_avg_sqs.len(),
            steps.len()
        )));
    }
    if let Some(s) = steps
        .iter()
        .find(|s| s.kind() != Kind::Float || s.numel() != 1)
    {
        return Err(KernelError::Invalid(format!(
            "fused_adamw: step counters must be f32 scalars, got {:?} {:?}",
            s.kind(),
            s.size()
        )));
    }
    let ptrs = |ts: &[&Tensor]| -> Vec<*mut C_tensor> {
        ts.iter().map(|t| t.as_ptr().cast_mut()).collect()
    };
    let (p, g, m, v, s) = (
        ptrs(params),
        ptrs(grads),
        ptrs(exp_avgs),
        ptrs(exp_avg_sqs),
        ptrs(steps),
    );
    // SAFETY: five arrays of `n` valid tensor pointers, borrowed for the call.
    let message = unsafe {
        ext_ffi::frugal_ext_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.as_ptr(),
            n,
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
        )
    };
    ext_ffi::check(message).map_err(KernelError::Libtorch)
}
