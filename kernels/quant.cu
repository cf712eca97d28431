// Quantization kernels: dequantization of NF4, GPTQ int4 and ternary weights, and GEMVs (batch 1)
// on NF4, GPTQ int4 and ternary weights that never materialize the dense weight.
//
// Kernel names carry the output dtype. Each has a CPU reference in frugal-kernels (`cpu::*`);
// the layouts are documented there and in REFERENCE.md ("Quantization formats").
#include "common.cuh"

// The 16 NF4 code values (QLoRA / bitsandbytes), indexed by the 4-bit code.
__constant__ float FRUGAL_NF4_CODES[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// 4-bit code of flat element i: two codes per byte, the first element in the high nibble.
__device__ __forceinline__ int nf4_code(const u8* packed, i64 i) {
    const u8 byte = packed[i >> 1];
    return (i & 1) ? (byte & 0xF) : (byte >> 4);
}

// out[i] = NF4[code(i)] * absmax[i / block_size], for i in [0, n).
extern "C" __global__ void dequant_nf4_f32(const u8* __restrict__ packed,
                                           const float* __restrict__ absmax,
                                           float* __restrict__ out, i64 n, i64 block_size) {
    FRUGAL_GRID_STRIDE(i, n) {
        out[i] = FRUGAL_NF4_CODES[nf4_code(packed, i)] * absmax[i / block_size];
    }
}

// y[o] = sum_i W[o, i] * x[i] with W (out_features, in_features) row-major, NF4-packed over the
// flat index o * in_features + i as in dequant_nf4_f32. One block per output row; the block's
// threads stride over the row, then reduce through warp shuffles and shared memory.
// Launch with blockDim.x a multiple of 32, at most 1024.
extern "C" __global__ void gemv_nf4_f32(const u8* __restrict__ packed,
                                        const float* __restrict__ absmax,
                                        const float* __restrict__ x, float* __restrict__ y,
                                        i64 out_features, i64 in_features, i64 block_size) {
    __shared__ float partial[32];
    const i64 o = blockIdx.x;
    if (o >= out_features) {
        return;
    }
    const i64 row = o * in_features;
    float acc = 0.0f;
    for (i64 i = threadIdx.x; i < in_features; i += blockDim.x) {
        const i64 flat = row + i;
        acc += FRUGAL_NF4_CODES[nf4_code(packed, flat)] * absmax[flat / block_size] * x[i];
    }
    acc = frugal_warp_sum(acc);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane == 0) {
        partial[warp] = acc;
    }
    __syncthreads();
    if (warp == 0) {
        const int warps = (blockDim.x + 31) >> 5;
        float v = lane < warps ? partial[lane] : 0.0f;
        v = frugal_warp_sum(v);
        if (lane == 0) {
            y[o] = v;
        }
    }
}

// GPTQ int4 (AutoGPTQ layout). qweight: int32 (in/8, out), q[i,o] = (qweight[i/8,o] >> 4*(i%8)) & 0xF;
// qzeros: int32 (groups, out/8), z[g,o] = (qzeros[g,o/8] >> 4*(o%8)) & 0xF; scales: f32
// (groups, out); g = i / group_size. Output W (out, in) row-major: W[o,i] = scale[g,o] * (q - z).
extern "C" __global__ void dequant_int4_gptq_f32(const i32* __restrict__ qweight,
                                                 const i32* __restrict__ qzeros,
                                                 const float* __restrict__ scales,
                                                 float* __restrict__ out, i64 in_features,
                                                 i64 out_features, i64 group_size) {
    FRUGAL_GRID_STRIDE(idx, in_features * out_features) {
        const i64 o = idx / in_features;
        const i64 i = idx - o * in_features;
        const i64 g = i / group_size;
        const unsigned qw = (unsigned)qweight[(i >> 3) * out_features + o];
        const unsigned qz = (unsigned)qzeros[g * (out_features >> 3) + (o >> 3)];
        const int q = (int)((qw >> (4 * (i & 7))) & 0xF);
        const int z = (int)((qz >> (4 * (o & 7))) & 0xF);
        out[idx] = scales[g * out_features + o] * (float)(q - z);
    }
}

// Ternary: 2-bit codes c = w + 1 (0, 1, 2 for -1, 0, +1), four per byte, element 4k+j in bits
// 2j..2j+1 of byte k. out[i] = (c - 1) * scale.
extern "C" __global__ void dequant_ternary_f32(const u8* __restrict__ packed, float scale,
                                               float* __restrict__ out, i64 n) {
    FRUGAL_GRID_STRIDE(i, n) {
        const int c = (packed[i >> 2] >> (2 * (i & 3))) & 0x3;
        out[i] = (float)(c - 1) * scale;
    }
}

// Sum of `v` over the whole block; thread 0 receives the result (other threads get garbage).
// blockDim.x must be a multiple of 32, at most 1024; every thread of the block must call it.
__device__ __forceinline__ float frugal_block_sum(float v) {
    __shared__ float partial[32];
    v = frugal_warp_sum(v);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    v = 0.0f;
    if (warp == 0) {
        const int warps = (blockDim.x + 31) >> 5;
        v = frugal_warp_sum(lane < warps ? partial[lane] : 0.0f);
    }
    return v;
}

// y[o] = sum_i W[o, i] * x[i] for a GPTQ int4 weight in the layout of dequant_int4_gptq_f32
// (in_features a multiple of 8, out_features a multiple of 8), without materializing W. One warp
// per output o: lane l walks the packed rows r = l, l + 32, ... of qweight column o (eight inputs
// 8r..8r+7 per int32), accumulating sum (q - z) * x per group in f32 and scaling once per group
// run; then a warp-shuffle reduction. Launch with blockDim.x a multiple of 32 (blockDim.x / 32
// outputs per block) and enough blocks to cover out_features.
extern "C" __global__ void gemv_int4_gptq_f32(const i32* __restrict__ qweight,
                                              const i32* __restrict__ qzeros,
                                              const float* __restrict__ scales,
                                              const float* __restrict__ x, float* __restrict__ y,
                                              i64 in_features, i64 out_features, i64 group_size) {
    const i64 o = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (o >= out_features) {
        return;  // whole warps only: o is uniform across a warp
    }
    const int lane = threadIdx.x & 31;
    const i64 rows = in_features >> 3;
    const i64 zcols = out_features >> 3;
    const int zshift = 4 * (int)(o & 7);
    float acc = 0.0f;
    for (i64 r = lane; r < rows; r += 32) {
        const unsigned qw = (unsigned)qweight[r * out_features + o];
        const i64 i0 = r << 3;
        const i64 g0 = i0 / group_size;
        const i64 g7 = (i0 + 7) / group_size;
        if (g0 == g7) {
            // The eight inputs share one group: one zero point and one scale.
            const float z = (float)(((unsigned)qzeros[g0 * zcols + (o >> 3)] >> zshift) & 0xF);
            float s = 0.0f;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                s += ((float)((qw >> (4 * j)) & 0xF) - z) * x[i0 + j];
            }
            acc += scales[g0 * out_features + o] * s;
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const i64 g = (i0 + j) / group_size;
                const float z = (float)(((unsigned)qzeros[g * zcols + (o >> 3)] >> zshift) & 0xF);
                const float q = (float)((qw >> (4 * j)) & 0xF);
                acc += scales[g * out_features + o] * (q - z) * x[i0 + j];
            }
        }
    }
    acc = frugal_warp_sum(acc);
    if (lane == 0) {
        y[o] = acc;
    }
}

// y[o] = scale * sum_i c'[o, i] * x[i] for ternary weights packed as in dequant_ternary_f32 over
// the flat index o * in_features + i (row-major (out, in)), c' = code - 1. Adds and subtracts x
// only (code 0: -x, 1: nothing, 2: +x, 3: +2x, as dequant_ternary_f32 decodes it); the scale is
// applied once per output. One block per output row; threads stride over the row, then reduce
// through warp shuffles and shared memory. Launch with blockDim.x a multiple of 32, at most 1024.
extern "C" __global__ void gemv_ternary_f32(const u8* __restrict__ packed, float scale,
                                            const float* __restrict__ x, float* __restrict__ y,
                                            i64 out_features, i64 in_features) {
    const i64 o = blockIdx.x;
    if (o >= out_features) {
        return;  // uniform across the block
    }
    const i64 row = o * in_features;
    float acc = 0.0f;
    for (i64 i = threadIdx.x; i < in_features; i += blockDim.x) {
        const i64 flat = row + i;
        const int c = (packed[flat >> 2] >> (2 * (flat & 3))) & 0x3;
        const float xi = x[i];
        if (c == 0) {
            acc -= xi;
        } else if (c == 2) {
            acc += xi;
        } else if (c == 3) {
            acc += xi;
            acc += xi;
        }
    }
    acc = frugal_block_sum(acc);
    if (threadIdx.x == 0) {
        y[o] = acc * scale;
    }
}
