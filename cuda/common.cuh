// Shared by every kernel file: index types and small device helpers.
#pragma once
#include <stdint.h>

// Grid-stride loop over [0, n): every element is visited exactly once whatever the grid size.
#define FOR_EACH(i, n) for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (int64_t)(n); \
                            i += (int64_t)gridDim.x * blockDim.x)

// A flat index over a box of sizes e[0] x e[1] x e[2] -> its coordinates: (i / (e1*e2), i / e2 % e1, i % e2).
__device__ __forceinline__ void split3(int i, const int e[3], int out[3]) {
    out[2] = i % e[2];
    i /= e[2];
    out[1] = i % e[1];
    out[0] = i / e[1];
}

// Activation codes, matching crate::ops::activation::Activation.
enum ActivationCode { ACT_LEAKY_RELU = 0, ACT_SILU = 1, ACT_SOFTPLUS = 2 };

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

// softplus(x) = ln(1 + e^x), linear above 20 as in PyTorch.
__device__ __forceinline__ float softplusf(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

__device__ __forceinline__ float activation_value(int act, float x) {
    switch (act) {
        case ACT_LEAKY_RELU: return x > 0.0f ? x : 0.01f * x;
        case ACT_SILU: return x * sigmoidf(x);
        default: return softplusf(x);
    }
}

__device__ __forceinline__ float activation_derivative(int act, float x) {
    switch (act) {
        case ACT_LEAKY_RELU: return x > 0.0f ? 1.0f : 0.01f;
        case ACT_SILU: { float s = sigmoidf(x); return s * (1.0f + x * (1.0f - s)); }
        default: return x > 20.0f ? 1.0f : sigmoidf(x);
    }
}

// Block-wide sum over blockDim.x threads (a multiple of 32, at most 1024); every thread gets the result.
// `scratch` must hold 32 values of shared memory. Used with float and double.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int nwarps = (blockDim.x + 31) >> 5;
    v = lane < nwarps ? scratch[lane] : T(0);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
