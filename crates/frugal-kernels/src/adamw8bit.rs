//! The 8-bit block-wise AdamW step of `kernels/adamw8bit.cu` and its CPU reference,
//! [`step_block`], which frugal-optim's `AdamW8bit` runs on the CPU.
//!
//! Moments are stored as codes of the dynamic map (signed for the first, unsigned for the
//! second) with one f32 absmax per block of [`BLOCK_SIZE`] values
//! ([`frugal_quant::dynamic::Blockwise8`]). A step of one block dequantizes both moments,
//! updates them in f32, writes the update `delta` that bitsandbytes adds to the weight before
//! its decay, takes the new absmax values and requantizes (nearest code, ties to the even index).

use tch::{Device, Kind, Tensor};

use crate::error::{KernelError, Result};
use crate::gpu::{cuda_input, expect_numel, same_device, to_i64, Kernels, Scalar};
use crate::registry::ADAMW8BIT;
use frugal_quant::dynamic::DynamicMap;

/// Values per quantization block.
pub const BLOCK_SIZE: usize = 256;

/// The per-step constants of the update, in f32 as the kernels use them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepConsts {
    /// β1.
    pub beta1: f32,
    /// β2.
    pub beta2: f32,
    /// 1 - β1 (computed in f64).
    pub one_minus_beta1: f32,
    /// 1 - β2 (computed in f64).
    pub one_minus_beta2: f32,
    /// `-lr / (1 - β1^t)`.
    pub step: f32,
    /// `sqrt(1 - β2^t)`.
    pub c2: f32,
    /// ε.
    pub eps: f32,
}

impl StepConsts {
    /// The constants of step `t` (counted from 1).
    pub fn new(lr: f64, beta1: f64, beta2: f64, eps: f64, t: f64) -> Self {
        Self {
            beta1: beta1 as f32,
            beta2: beta2 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            step: (-lr / (1.0 - beta1.powf(t))) as f32,
            c2: (1.0 - beta2.powf(t)).sqrt() as f32,
            eps: eps as f32,
        }
    }
}

/// One block (at most [`BLOCK_SIZE`] values) of the step, in place: `g` the gradient, the
/// moments' codes and absmax, and `delta` (written) of `g`'s length. Every operation rounds in
/// f32 in the order of the CUDA kernel, so both give the same codes.
pub fn step_block(
    k: &StepConsts,
    g: &[f32],
    m_codes: &mut [u8],
    m_absmax: &mut f32,
    v_codes: &mut [u8],
    v_absmax: &mut f32,
    delta: &mut [f32],
) {
    let (sm, sv) = (DynamicMap::Signed.lookup(), DynamicMap::Unsigned.lookup());
    let mut mb = [0f32; BLOCK_SIZE];
    let mut vb = [0f32; BLOCK_SIZE];
    let n = g.len().min(BLOCK_SIZE);
    let (mut mmax, mut vmax) = (0f32, 0f32);
    for j in 0..n {
        let mj = sm.codes()[m_codes[j] as usize] * *m_absmax * k.beta1 + g[j] * k.one_minus_beta1;
        let vj =
            sv.codes()[v_codes[j] as usize] * *v_absmax * k.beta2 + g[j] * k.one_minus_beta2 * g[j];
        delta[j] = (mj * k.step) / (vj.sqrt() / k.c2 + k.eps);
        mmax = mmax.max(mj.abs());
        vmax = vmax.max(vj.abs());
        mb[j] = mj;
        vb[j] = vj;
    }
    let (dm, dv) = (mmax.max(f32::MIN_POSITIVE), vmax.max(f32::MIN_POSITIVE));
    for j in 0..n {
        m_codes[j] = sm.index((mb[j] / dm).clamp(-1.0, 1.0));
        v_codes[j] = sv.index((vb[j] / dv).clamp(-1.0, 1.0));
    }
    *m_absmax = mmax;
    *v_absmax = vmax;
}

impl Kernels {
    /// The step of [`step_block`] over every block on a GPU: `g` f32 `(n,)`; the codes (uint8,
    /// `n`) and absmax values (f32, one per block) of both moments, updated in place; returns
    /// `delta` f32 `(n,)`.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw8bit_step_f32(
        &self,
        g: &Tensor,
        m_codes: &mut Tensor,
        m_absmax: &mut Tensor,
        v_codes: &mut Tensor,
        v_absmax: &mut Tensor,
        k: &StepConsts,
    ) -> Result<Tensor> {
        crate::gpu::check_cuda()?;
        let ordinal = same_device(&[
            (cuda_input(g, "g", Kind::Float)?, "g"),
            (cuda_input(m_codes, "m_codes", Kind::Uint8)?, "m_codes"),
            (cuda_input(m_absmax, "m_absmax", Kind::Float)?, "m_absmax"),
            (cuda_input(v_codes, "v_codes", Kind::Uint8)?, "v_codes"),
            (cuda_input(v_absmax, "v_absmax", Kind::Float)?, "v_absmax"),
        ])?;
        let n = g.numel();
        let blocks = n.div_ceil(BLOCK_SIZE);
        expect_numel(m_codes, "m_codes", n)?;
        expect_numel(v_codes, "v_codes", n)?;
        expect_numel(m_absmax, "m_absmax", blocks)?;
        expect_numel(v_absmax, "v_absmax", blocks)?;
        let dev = Device::Cuda(ordinal);
        let delta = Tensor::empty([to_i64(n, "n")?], (Kind::Float, dev));
        if n == 0 {
            return Ok(delta);
        }
        let grid = u32::try_from(blocks)
            .ok()
            .filter(|&b| b < i32::MAX as u32)
            .ok_or_else(|| KernelError::Invalid("too many blocks".into()))?;
        let smap = Tensor::from_slice(DynamicMap::Signed.lookup().codes()).to_device(dev);
        let umap = Tensor::from_slice(DynamicMap::Unsigned.lookup().codes()).to_device(dev);
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (BLOCK_SIZE as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let scalars = [
            Scalar::I64(to_i64(n, "n")?),
            Scalar::F32(k.beta1),
            Scalar::F32(k.beta2),
            Scalar::F32(k.one_minus_beta1),
            Scalar::F32(k.one_minus_beta2),
            Scalar::F32(k.step),
            Scalar::F32(k.c2),
            Scalar::F32(k.eps),
        ];
        // SAFETY: the kernel takes the eight buffers in this order, then an i64 and seven f32;
        // every buffer's size was checked above; it needs exactly 256 threads per block, as
        // launched. The two maps stay valid until the launch completes, since torch's
        // allocator reuses their blocks only in the stream's order.
        unsafe {
            self.launch_on(
                ordinal,
                &ADAMW8BIT,
                "adamw8bit_step_f32",
                &[
                    g, m_codes, m_absmax, v_codes, v_absmax, &smap, &umap, &delta,
                ],
                &scalars,
                cfg,
            )
        }?;
        Ok(delta)
    }
}
