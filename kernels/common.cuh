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
