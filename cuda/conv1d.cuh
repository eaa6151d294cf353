// Parameters of the depthwise causal conv1d kernels of conv1d.cu.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

// The taps of the vector kernels (Mamba's d_conv); the scalar kernels take any K up to CONV1D_MAX_K.
constexpr int CONV1D_TAPS = 4;
constexpr int CONV1D_MAX_K = 8;
// Channels per thread of the vector backward kernels (the forward's are common.cuh's VEC<T>, 16 bytes): 16 bytes of
// float32, 8 of bf16, so that the taps, the window and the sums of dw and db fit in registers.
constexpr int CONV1D_BACKWARD_WIDTH = 4;
// Consecutive tokens of one sequence per thread (a run), and threads per block: block (channel lanes, run lanes) with
// channel lanes * run lanes <= CONV1D_THREADS.
constexpr int CONV1D_RUN = 8;
constexpr int CONV1D_THREADS = 256;

// Tokens (G, L, C) channels last, weight (C, K), bias (C). The tokens x, gy and out are of the storage type T (float
// or __nv_bfloat16); the weight, the bias and the partial sums of their gradients are float32. Blocks (channel lanes,
// run lanes), at most CONV1D_THREADS threads; grid (run blocks, channel blocks). A thread takes a group of channels
// and, per iteration, a run of CONV1D_RUN tokens of one sequence; the sizes fit int (the host checks G L < 2^30).
template <typename T>
struct Conv1dParams {
    const T* x;          // the input tokens
    const float* w;      // the weight
    const float* bias;   // forward: the bias
    const T* gy;         // backward: the gradient of the output
    T* out;              // y (forward) or dx (backward)
    float* part;         // backward: one row [dw (C K) | db (C)] per run block (null: not wanted)
    int G;               // sequences
    int L;               // tokens per sequence
    int C;               // channels
    int K;               // taps
    int runs;            // runs per sequence, ceil(L / CONV1D_RUN)
    int iters;           // backward: runs per thread; run block r takes runs [r iters lanes, (r + 1) iters lanes)
    int silu;            // 1: the op is SiLU(conv): the forward applies it, the backward recomputes its input from x
                         // (and the bias) and multiplies gy by SiLU' (Mamba's x = SiLU(conv1d(x)) as one op)
    int flip;            // 1: the sequences run backwards through memory: token t of sequence g is row g L + L - 1 - t
                         // of x, gy and out (the backward Mamba's, read in place instead of flipped copies)
};

// Each in a float32 and a bf16 instance (computing in float32). The vector kernels need K = CONV1D_TAPS, C a multiple
// of their channels per thread (forward VEC<T>, backward CONV1D_BACKWARD_WIDTH) and every buffer 16-byte aligned; the
// scalar kernels (one channel per thread) take the rest.
extern "C" __global__ void causal_conv1d_forward_f32(const Conv1dParams<float> p);
extern "C" __global__ void causal_conv1d_forward_bf16(const Conv1dParams<__nv_bfloat16> p);
extern "C" __global__ void causal_conv1d_forward_scalar_f32(const Conv1dParams<float> p);
extern "C" __global__ void causal_conv1d_forward_scalar_bf16(const Conv1dParams<__nv_bfloat16> p);
// dx and the per-block partial sums of dw and db, from one read of x and gy (with silu, also of the bias).
extern "C" __global__ void causal_conv1d_backward_f32(const Conv1dParams<float> p);
extern "C" __global__ void causal_conv1d_backward_bf16(const Conv1dParams<__nv_bfloat16> p);
extern "C" __global__ void causal_conv1d_backward_scalar_f32(const Conv1dParams<float> p);
extern "C" __global__ void causal_conv1d_backward_scalar_bf16(const Conv1dParams<__nv_bfloat16> p);
