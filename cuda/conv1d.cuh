// Parameters of the depthwise causal conv1d kernels of conv1d.cu.
#pragma once
#include <stdint.h>

// The largest kernel size the parameter-gradient kernel keeps in registers (Mamba uses 4).
constexpr int CONV1D_MAX_K = 8;
// causal_conv1d_param_partials: block (CONV1D_COLS, CONV1D_LANES), CONV1D_COLS channels per block, CONV1D_LANES row
// lanes.
constexpr int CONV1D_COLS = 32;
constexpr int CONV1D_LANES = 8;

// Tokens (G, L, C) channels last, weight (C, K), bias (C).
struct Conv1dParams {
    const float* x;          // the input tokens (forward, param_partials)
    const float* w;          // the weight (forward, backward_input)
    const float* bias;       // the bias (forward)
    const float* gy;         // the gradient of the output (backward_input, param_partials)
    float* out;              // y (forward) or dx (backward_input)
    float* part;             // param_partials: one row [dw (C K) | db (C)] per slice of token rows
    int64_t G;               // sequences
    int64_t L;               // tokens per sequence
    int64_t C;               // channels
    int K;                   // taps
    int64_t rows_per_slice;  // param_partials: token rows per slice (grid y)
};

extern "C" __global__ void causal_conv1d_forward(const Conv1dParams p);         // one thread per element, any grid
extern "C" __global__ void causal_conv1d_backward_input(const Conv1dParams p);  // one thread per element, any grid
extern "C" __global__ void causal_conv1d_param_partials(const Conv1dParams p);  // grid (ceil(C / 32), slices)
