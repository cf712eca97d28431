// Shared helpers for Frugal's CUDA kernels.
//
// nvrtc sees no file system: frugal-kernels embeds this header and splices it in place of
// `#include "common.cuh"` before compiling, so it must stay self-contained (no system headers).
#pragma once

typedef unsigned char u8;
typedef int i32;
typedef long long i64;

// Grid-stride loop over [0, n): every thread of the grid visits indices tid, tid + stride, ...
#define FRUGAL_GRID_STRIDE(i, n)                                                                   \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                             \
         i += (i64)blockDim.x * gridDim.x)

// Sum of `v` across the 32 lanes of a warp; every lane receives the result.
__device__ __forceinline__ float frugal_warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_down_sync(0xffffffffu, v, offset);
    }
    return __shfl_sync(0xffffffffu, v, 0);
}

// Maximum of `v` across the 32 lanes of a warp; every lane receives the result.
__device__ __forceinline__ float frugal_warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, offset));
    }
    return __shfl_sync(0xffffffffu, v, 0);
}

// Sum (is_max false) or maximum (is_max true) of `v` over the whole block, returned to every
// thread. blockDim.x must be a multiple of 32, at most 1024; every thread of the block must call
// it; it may be called several times in a row.
__device__ __forceinline__ float frugal_block_all_reduce(float v, bool is_max) {
    __shared__ float partial[32];
    __shared__ float total;
    v = is_max ? frugal_warp_max(v) : frugal_warp_sum(v);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    __syncthreads();  // an earlier call's readers are done with `partial` and `total`
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    if (warp == 0) {
        const int warps = (blockDim.x + 31) >> 5;
        const float mine = lane < warps ? partial[lane] : (is_max ? -3.0e38f : 0.0f);
        const float all = is_max ? frugal_warp_max(mine) : frugal_warp_sum(mine);
        if (lane == 0) {
            total = all;
        }
    }
    __syncthreads();
    return total;
}
