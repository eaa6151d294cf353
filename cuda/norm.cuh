// Parameters of the normalisation kernels of norm.cu.
#pragma once
#include <stdint.h>

// InstanceNorm: threads per block of the chunked kernels, voxels per thread, and so voxels per chunk (one block).
constexpr int IN_THREADS = 256;
constexpr int IN_ITEMS = 8;
constexpr int IN_CHUNK = IN_THREADS * IN_ITEMS;
// layer_norm_param_partials: thread rows per block (block (32, LN_PARAM_SUBROWS)).
constexpr int LN_PARAM_SUBROWS = 8;

// InstanceNorm of x (N, C, V) over each plane p = n C + c of V voxels; stats are per plane, chunk values per
// (plane, chunk) of IN_CHUNK voxels. Each kernel's comment in norm.cu says which fields it uses.
struct InstanceNormParams {
    const float* x;      // the input
    const float* g;      // backward: the gradient of y
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
    float* out;          // y (apply) or dx (backward_dx)
    float* dgamma;       // param_grads
    float* dbeta;        // param_grads
    int64_t V;           // voxels per plane
    int64_t C;           // channels
    int64_t N;           // samples
    int64_t chunks;      // chunks per plane
    float eps;
    int act;             // -1: none; else the ActivationCode fused after the affine (apply, grad sums, dx)
};

// LayerNorm of x (rows, C) over each row of C contiguous channels.
struct LayerNormParams {
    const float* x;
    const float* g;        // backward: the gradient of y
    const float* gamma;    // (C)
    const float* beta;     // (C)
    const float* mean;     // backward: per row
    const float* rstd;     // backward: per row
    float* out;            // y (forward) or dx (backward_dx)
    float* mean_out;       // forward: per-row mean
    float* rstd_out;       // forward: per-row rstd
    float* pgamma;         // param_partials: (C, row blocks)
    float* pbeta;          // param_partials: (C, row blocks)
    int64_t rows;
    int64_t C;
    int64_t rows_per_block;  // param_partials
    float eps;
};

// Fixed-order row sums of a (rows, len) matrix: out[r] = sum_j a[r, j], one block per row.
struct NormSumRowsParams {
    const float* a;
    float* out;
    int64_t len;
};

extern "C" __global__ void instance_norm_chunk_moments(const InstanceNormParams p);    // x -> chunk_mean, chunk_m2
extern "C" __global__ void instance_norm_combine(const InstanceNormParams p);          // -> mean_out, rstd_out
extern "C" __global__ void instance_norm_apply(const InstanceNormParams p);            // x, mean, rstd -> out = y
extern "C" __global__ void instance_norm_chunk_grad_sums(const InstanceNormParams p);  // -> chunk_g, chunk_gx
extern "C" __global__ void instance_norm_backward_dx(const InstanceNormParams p);      // -> out = dx
extern "C" __global__ void instance_norm_param_grads(const InstanceNormParams p);      // sum_g, sum_gx -> dgamma, dbeta
extern "C" __global__ void layer_norm_forward(const LayerNormParams p);                // -> out = y, mean_out, rstd_out
extern "C" __global__ void layer_norm_backward_dx(const LayerNormParams p);            // -> out = dx
extern "C" __global__ void layer_norm_param_partials(const LayerNormParams p);         // -> pgamma, pbeta
extern "C" __global__ void instance_norm_sum_chunks(const NormSumRowsParams p);
extern "C" __global__ void layer_norm_sum_partials(const NormSumRowsParams p);
