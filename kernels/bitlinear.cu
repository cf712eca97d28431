// BitLinear's input path (the MatMul-free LM): RMSNorm with a gain fused with per-token int8
// activation quantization, and its straight-through backward.
//
// Each kernel has a CPU reference in frugal-kernels (`cpu::rmsnorm_quant`,
// `cpu::rmsnorm_quant_backward`); the formulas are those of frugal-models' BitLinear:
//   r = 1 / sqrt(mean(x^2) + eps),  n = x r g,  s = 127 / max(max|n|, 1e-5),
//   out = clamp(round(n s), -128, 127) / s.
// The backward treats the quantizer as the identity (straight-through): with dn the gradient
// of out and x^ = x r,
//   dx = r (dn g - x^ mean(dn g x^)),  dg = sum over rows of dn x^.
#include "common.cuh"

// out and rstd for `rows` rows of `n` f32 values. One block per row; launch with blockDim.x a
// multiple of 32, at most 1024.
extern "C" __global__ void rmsnorm_quant_f32(const float* __restrict__ x,
                                             const float* __restrict__ gain,
                                             float* __restrict__ out, float* __restrict__ rstd,
                                             i64 rows, i64 n, float eps) {
    const i64 row = blockIdx.x;
    if (row >= rows) {
        return;  // uniform across the block
    }
    const float* xr = x + row * n;
    float* outr = out + row * n;
    float ss = 0.0f;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
        ss += xr[i] * xr[i];
    }
    ss = frugal_block_all_reduce(ss, false);
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    float amax = 0.0f;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
        amax = fmaxf(amax, fabsf(xr[i] * r * gain[i]));
    }
    amax = frugal_block_all_reduce(amax, true);
    const float scale = (1.0f / fmaxf(amax, 1e-5f)) * 127.0f;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
        const float q = fminf(fmaxf(rintf(xr[i] * r * gain[i] * scale), -128.0f), 127.0f);
        outr[i] = q / scale;
    }
    if (threadIdx.x == 0) {
        rstd[row] = r;
    }
}

// dx for `rows` rows of `n`, given dn (the gradient of rmsnorm_quant_f32's out), x, the gain
// and the rstd the forward wrote. One block per row; blockDim.x as above.
extern "C" __global__ void rmsnorm_quant_backward_f32(const float* __restrict__ dn,
                                                      const float* __restrict__ x,
                                                      const float* __restrict__ gain,
                                                      const float* __restrict__ rstd,
                                                      float* __restrict__ dx, i64 rows, i64 n) {
    const i64 row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const float r = rstd[row];
    const float* dnr = dn + row * n;
    const float* xr = x + row * n;
    float dot = 0.0f;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
        dot += dnr[i] * gain[i] * xr[i] * r;
    }
    const float mean = frugal_block_all_reduce(dot, false) / (float)n;
    float* dxr = dx + row * n;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
        dxr[i] = r * (dnr[i] * gain[i] - xr[i] * r * mean);
    }
}

// dg[i] = sum over rows of dn[row, i] x[row, i] rstd[row]: one thread per column (neighbouring
// threads read neighbouring columns), a fixed order over rows, so the sum is deterministic.
extern "C" __global__ void rmsnorm_gain_grad_f32(const float* __restrict__ dn,
                                                 const float* __restrict__ x,
                                                 const float* __restrict__ rstd,
                                                 float* __restrict__ dgain, i64 rows, i64 n) {
    FRUGAL_GRID_STRIDE(i, n) {
        float acc = 0.0f;
        for (i64 row = 0; row < rows; ++row) {
            acc += dn[row * n + i] * x[row * n + i] * rstd[row];
        }
        dgain[i] = acc;
    }
}
