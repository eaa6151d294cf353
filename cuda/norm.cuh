// Parameters of the normalisation kernels of norm.cu.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

// InstanceNorm: voxels per chunk (one warp's work in the chunk kernels), warps per block of the chunk kernels, and
// so threads per block.
constexpr int IN_CHUNK = 2048;
constexpr int IN_WARPS = 4;
constexpr int IN_THREADS = IN_WARPS * 32;
// LayerNorm: channels per group (one lane's contiguous span of a row: 16 bytes of bf16, 32 of float32), threads per
// block of the row kernels, groups per lane of the _wide kernels, and the widest rows of the row kernels (a group per
// lane of a warp) and of the _wide ones.
constexpr int LN_GROUP = 8;
constexpr int LN_THREADS = 128;
constexpr int LN_WIDE_GROUPS = 2;
constexpr int LN_NARROW_CHANNELS = 32 * LN_GROUP;
constexpr int LN_WIDE_CHANNELS = 32 * LN_GROUP * LN_WIDE_GROUPS;

// InstanceNorm of x (N, C, V) over each plane p = n C + c of V voxels; stats are per plane, chunk values per
// (plane, chunk) of IN_CHUNK voxels, indexed p * chunks + k. Each kernel's comment in norm.cu says which fields it
// uses. x, g and out are of the storage type T (float or __nv_bfloat16); gamma, beta, the statistics and every sum
// are float32.
template <typename T>
struct InstanceNormParams {
    const T* x;          // the input
    const T* g;          // backward: the gradient of y
    const float* gamma;  // (C)
    const float* beta;   // (C)
    const float* mean;   // per plane (apply, backward)
    const float* rstd;   // per plane, 1 / sqrt(var + eps)
    const float* sum_g;  // backward: per plane, sum of g
    const float* sum_gx; // backward: per plane, sum of g xhat
    float* chunk_mean;   // per chunk: mean (chunk_moments writes, combine reads)
    float* chunk_m2;     // per chunk: sum of squared deviations from the chunk mean
    float* chunk_g;      // per chunk: sum of g (chunk_grad_sums)
    float* chunk_gx;     // per chunk: sum of g xhat
    float* mean_out;     // combine: per-plane mean
    float* rstd_out;     // combine: per-plane rstd
    const T* skip;       // apply: a map added to y before the activation (a residual block's shortcut), or null
    T* out;              // y (apply) or dx (backward_dx)
    float* dgamma;       // param_grads
    float* dbeta;        // param_grads
    int64_t V;           // voxels per plane
    int64_t C;           // channels
    int64_t N;           // samples
    int64_t chunks;      // chunks per plane
    float eps;
    int act;             // -1: none; else the ActivationCode fused after the affine (apply, grad sums, dx)
};

// LayerNorm of x (rows, C) over each row of C contiguous channels. x, g and out are of the storage type T; gamma,
// beta, the statistics and the partial sums are float32.
template <typename T>
struct LayerNormParams {
    const T* x;
    const T* g;            // backward: the gradient of y
    const float* gamma;    // (C)
    const float* beta;     // (C)
    const float* mean;     // backward: per row
    const float* rstd;     // backward: per row
    T* out;                // y (forward) or dx (backward; null: dx not wanted)
    float* mean_out;       // forward: per-row mean
    float* rstd_out;       // forward: per-row rstd
    float* pgamma;         // backward: (C, row blocks), the gridDim.x blocks' partial sums (null: not wanted)
    float* pbeta;          // backward: (C, row blocks)
    int64_t rows;
    int64_t C;
    int64_t rows_per_block;  // rows of one block, a multiple of its teams (blockDim.x / lanes)
    int lanes;             // lanes per row (its team): a power of two <= 32 with lanes * LN_GROUP * groups >= C
    float eps;
};

// Fixed-order row sums of a (rows, len) matrix: out[r] = sum_j a[r, j], one block per row.
struct NormSumRowsParams {
    const float* a;
    float* out;
    int64_t len;
};

// The kernels that read or write x, g or out, each in a float32 and a bf16 instance (computing in float32).
// x -> chunk_mean, chunk_m2
extern "C" __global__ void instance_norm_chunk_moments_f32(const InstanceNormParams<float> p);
extern "C" __global__ void instance_norm_chunk_moments_bf16(const InstanceNormParams<__nv_bfloat16> p);
// x, mean, rstd, gamma, beta -> out = y
extern "C" __global__ void instance_norm_apply_f32(const InstanceNormParams<float> p);
extern "C" __global__ void instance_norm_apply_bf16(const InstanceNormParams<__nv_bfloat16> p);
// x, g, mean, rstd (gamma, beta with an activation) -> chunk_g, chunk_gx
extern "C" __global__ void instance_norm_chunk_grad_sums_f32(const InstanceNormParams<float> p);
extern "C" __global__ void instance_norm_chunk_grad_sums_bf16(const InstanceNormParams<__nv_bfloat16> p);
// x, g, mean, rstd, gamma, sum_g, sum_gx (beta with an activation) -> out = dx
extern "C" __global__ void instance_norm_backward_dx_f32(const InstanceNormParams<float> p);
extern "C" __global__ void instance_norm_backward_dx_bf16(const InstanceNormParams<__nv_bfloat16> p);
// x, gamma, beta -> out = y, mean_out, rstd_out; rows of up to LN_NARROW_CHANNELS channels (_wide: up to
// LN_WIDE_CHANNELS)
extern "C" __global__ void layer_norm_forward_f32(const LayerNormParams<float> p);
extern "C" __global__ void layer_norm_forward_bf16(const LayerNormParams<__nv_bfloat16> p);
extern "C" __global__ void layer_norm_forward_wide_f32(const LayerNormParams<float> p);
extern "C" __global__ void layer_norm_forward_wide_bf16(const LayerNormParams<__nv_bfloat16> p);
// x, g, mean, rstd, gamma -> out = dx, pgamma, pbeta (each when not null); dynamic shared memory: blockDim.x / 32 * C
// floats when pgamma is given. Rows as the forward's.
extern "C" __global__ void layer_norm_backward_f32(const LayerNormParams<float> p);
extern "C" __global__ void layer_norm_backward_bf16(const LayerNormParams<__nv_bfloat16> p);
extern "C" __global__ void layer_norm_backward_wide_f32(const LayerNormParams<float> p);
extern "C" __global__ void layer_norm_backward_wide_bf16(const LayerNormParams<__nv_bfloat16> p);
// The kernels of float32 statistics only: they read none of x, g and out, so one instance serves both storage types.
extern "C" __global__ void instance_norm_combine(const InstanceNormParams<float> p);      // -> mean_out, rstd_out
extern "C" __global__ void instance_norm_param_grads(const InstanceNormParams<float> p);  // -> dgamma, dbeta
extern "C" __global__ void instance_norm_sum_chunks(const NormSumRowsParams p);
extern "C" __global__ void layer_norm_sum_partials(const NormSumRowsParams p);
