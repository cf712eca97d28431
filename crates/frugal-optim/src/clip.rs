//! Global-norm gradient clipping, as `torch.nn.utils.clip_grad_norm_`.

use tch::{Kind, Tensor};

/// The L2 norm of all gradients of `params` together (0 when none has a gradient).
pub fn grad_norm(params: &[Tensor]) -> f64 {
    let norms: Vec<Tensor> = params
        .iter()
        .map(|p| p.grad())
        .filter(|g| g.defined())
        .map(|g| g.to_kind(Kind::Float).norm().pow_tensor_scalar(2))
        .collect();
    if norms.is_empty() {
        return 0.0;
    }
    Tensor::stack(&norms, 0)
        .sum(Kind::Float)
        .sqrt()
        .double_value(&[])
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
