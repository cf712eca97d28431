// The 8-bit block-wise AdamW step (bitsandbytes' AdamW8bit, Dettmers et al. 2022) on moments
// stored as codes of the dynamic map with one f32 absmax per block of 256 values.
//
// The CPU reference is frugal-kernels' `adamw8bit::step_block`, which frugal-optim's AdamW8bit
// runs on the CPU: per block, dequantize both moments, update them in f32, emit the update
//   delta = (m * step) / (sqrt(v) / c2 + eps),   step = -lr / (1 - b1^t), c2 = sqrt(1 - b2^t),
// take the new absmax values, and requantize to the nearest code (ties to the even index). The
// caller applies delta (and the weight decay) to the weight, or maps it back (GaLore).
#include "common.cuh"

#define FRUGAL_Q8_BLOCK 256

// Index of the code of `codes` (256 ascending values in [-1, 1]) nearest to x, ties to the
// even index: the number of midpoints below x, plus one on an exact tie at an odd index.
__device__ __forceinline__ int frugal_nearest_code(const float* codes, float x) {
    if (!(x >= -1.0f && x <= 1.0f)) {
        return x > 1.0f ? 255 : 0;
    }
    int lo = 0;
    int hi = 255;  // midpoints 0..254; find the first with mid >= x
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        const float m = __fmul_rn(__fadd_rn(codes[mid], codes[mid + 1]), 0.5f);
        if (m < x) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if (lo < 255 && __fmul_rn(__fadd_rn(codes[lo], codes[lo + 1]), 0.5f) == x && (lo & 1) == 1) {
        lo += 1;
    }
    return lo;
}

// One block of 256 threads per quantization block of 256 values (the last may be partial):
// g (n f32), m_codes / v_codes (n u8, in place), m_absmax / v_absmax (one per block, in place),
// signed_map / unsigned_map (256 f32 each), delta (n f32, written).
extern "C" __global__ void adamw8bit_step_f32(const float* __restrict__ g,
                                              u8* __restrict__ m_codes, float* __restrict__ m_absmax,
                                              u8* __restrict__ v_codes, float* __restrict__ v_absmax,
                                              const float* __restrict__ signed_map,
                                              const float* __restrict__ unsigned_map,
                                              float* __restrict__ delta, i64 n, float beta1,
                                              float beta2, float one_minus_beta1,
                                              float one_minus_beta2, float step, float c2,
                                              float eps) {
    __shared__ float smap[256];
    __shared__ float umap[256];
    smap[threadIdx.x] = signed_map[threadIdx.x];
    umap[threadIdx.x] = unsigned_map[threadIdx.x];
    __syncthreads();
    const i64 block = blockIdx.x;
    const i64 j = block * FRUGAL_Q8_BLOCK + threadIdx.x;
    const bool live = j < n;
    float m = 0.0f;
    float v = 0.0f;
    if (live) {
        const float gj = g[j];
        // __fmul_rn / __fadd_rn are never contracted into fused multiply-adds, so every
        // operation rounds as the CPU reference's does, and the codes agree exactly.
        m = __fadd_rn(__fmul_rn(__fmul_rn(smap[m_codes[j]], m_absmax[block]), beta1),
                      __fmul_rn(gj, one_minus_beta1));
        v = __fadd_rn(__fmul_rn(__fmul_rn(umap[v_codes[j]], v_absmax[block]), beta2),
                      __fmul_rn(__fmul_rn(gj, one_minus_beta2), gj));
        delta[j] = __fdiv_rn(__fmul_rn(m, step), __fadd_rn(__fdiv_rn(__fsqrt_rn(v), c2), eps));
    }
    const float mmax = frugal_block_all_reduce(fabsf(m), true);
    const float vmax = frugal_block_all_reduce(fabsf(v), true);
    if (live) {
        const float dm = fmaxf(mmax, 1.17549435e-38f);
        const float dv = fmaxf(vmax, 1.17549435e-38f);
        m_codes[j] = (u8)frugal_nearest_code(smap, fminf(fmaxf(__fdiv_rn(m, dm), -1.0f), 1.0f));
        v_codes[j] = (u8)frugal_nearest_code(umap, fminf(fmaxf(__fdiv_rn(v, dv), -1.0f), 1.0f));
    }
    if (threadIdx.x == 0) {
        m_absmax[block] = mmax;
        v_absmax[block] = vmax;
    }
}
