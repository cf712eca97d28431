//! Global-norm gradient clipping, as `torch.nn.utils.clip_grad_norm_`.

use tch::{Kind, Tensor};

/// The L2 norm of all gradients of `params` together, a 0-dim f32 tensor on their device
/// (`None` when none has a gradient).
fn total_norm(params: &[Tensor]) -> Option<Tensor> {
    let norms: Vec<Tensor> = params
        .iter()
        .map(|p| p.grad())
        .filter(|g| g.defined())
        .map(|g| g.to_kind(Kind::Float).norm().pow_tensor_scalar(2))
        .collect();
    if norms.is_empty() {
        return None;
    }
    Some(Tensor::stack(&norms, 0).sum(Kind::Float).sqrt())
}

/// The L2 norm of all gradients of `params` together (0 when none has a gradient).
pub fn grad_norm(params: &[Tensor]) -> f64 {
    total_norm(params).map_or(0.0, |n| n.double_value(&[]))
}

/// Scales all gradients so that their global norm is at most `max_norm`; returns the norm
/// before clipping. Like torch, the factor is `max_norm / (norm + 1e-6)`, applied only when
/// below one.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> f64 {
    let total = grad_norm(params);
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        tch::no_grad(|| {
            for p in params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(coef);
                }
            }
        });
    }
    total
}

/// [`clip_grad_norm`] (or, with `max_norm <= 0`, [`grad_norm`]) without reading anything
/// back to the host, so that a CUDA graph can record it: the norm before clipping is returned
/// as a 0-dim f32 tensor on the gradients' device, and every gradient is multiplied by
/// `min(1, max_norm / (norm + 1e-6))` (as `torch.nn.utils.clip_grad_norm_` does). `None` when
/// no parameter has a gradient.
pub fn clip_grad_norm_on_device(params: &[Tensor], max_norm: f64) -> Option<Tensor> {
    let total = total_norm(params)?;
    if max_norm > 0.0 {
        let coef = ((&total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
        tch::no_grad(|| {
            for p in params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.g_mul_(&coef);
                }
            }
        });
    }
    Some(total)
}
