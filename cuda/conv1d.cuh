// Parameters of the depthwise causal conv1d kernels of conv1d.cu.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

// The largest kernel size the parameter-gradient kernel keeps in registers (Mamba uses 4).
constexpr int CONV1D_MAX_K = 8;
// causal_conv1d_param_partials: block (CONV1D_COLS, CONV1D_LANES), CONV1D_COLS channels per block, CONV1D_LANES row
// lanes.
constexpr int CONV1D_COLS = 32;
constexpr int CONV1D_LANES = 8;

// Tokens (G, L, C) channels last, weight (C, K), bias (C). The tokens x, gy and out are of the storage type T (float
// or __nv_bfloat16); the weight, the bias and the partial sums of their gradients are float32.
template <typename T>
struct Conv1dParams {
    const T* x;              // the input tokens (forward, param_partials)
    const float* w;          // the weight (forward, backward_input)
    const float* bias;       // the bias (forward)
    const T* gy;             // the gradient of the output (backward_input, param_partials)
    T* out;                  // y (forward) or dx (backward_input)
    float* part;             // param_partials: one row [dw (C K) | db (C)] per slice of token rows
    int64_t G;               // sequences
    int64_t L;               // tokens per sequence
    int64_t C;               // channels
    int K;                   // taps
    int64_t rows_per_slice;  // param_partials: token rows per slice (grid y)
};

// Each in a float32 and a bf16 instance (computing in float32).
// One thread per element, any grid.
extern "C" __global__ void causal_conv1d_forward_f32(const Conv1dParams<float> p);
extern "C" __global__ void causal_conv1d_forward_bf16(const Conv1dParams<__nv_bfloat16> p);
// One thread per element, any grid.
extern "C" __global__ void causal_conv1d_backward_input_f32(const Conv1dParams<float> p);
extern "C" __global__ void causal_conv1d_backward_input_bf16(const Conv1dParams<__nv_bfloat16> p);
// Grid (ceil(C / 32), slices).
extern "C" __global__ void causal_conv1d_param_partials_f32(const Conv1dParams<float> p);
extern "C" __global__ void causal_conv1d_param_partials_bf16(const Conv1dParams<__nv_bfloat16> p);
