// Depthwise causal convolution along the sequence axis (Mamba's conv1d). Tokens x (G, L, C) channels last, weight
// w (C, K), bias b (C); taps before the start of a sequence are zero:
//
//   forward:  y[g, t, c]  = b[c] + sum_{k<K} w[c, k] x[g, t - (K-1) + k, c]           (terms with index < 0 dropped)
//   input:    dx[g, s, c] = sum_{k<K} w[c, k] gy[g, s + (K-1) - k, c]                  (terms with index >= L dropped)
//   weight:   dw[c, k]    = sum_{g, t} gy[g, t, c] x[g, t - (K-1) + k, c]
//   bias:     db[c]       = sum_{g, t} gy[g, t, c]
//
// Storage: every kernel is a template over the storage type T of the tokens x, gy and the output (float or
// __nv_bfloat16), in two instances NAME_f32 and NAME_bf16 that compute in float32 (each element read with to_f32, each
// output rounded once with from_f32<T>); the weight, the bias and the partial sums of their gradients are float32.
//
// Flat index i = (g L + t) C + c; moving by one token moves i by C. The forward and the input gradient run one thread
// per element; consecutive threads take consecutive channels, so every load and store is coalesced.
//
// The parameter gradients reduce over all G L tokens, deterministically in two stages: causal_conv1d_param_partials
// gives each block 32 channels and one fixed slice of rows_per_slice token rows (r = g L + t); its 8 row lanes add
// rows ty, ty + 8, ... in order, lane 0 adds the 8 lane sums in order, and the block writes one partial row
// (32 = CONV1D_COLS and 8 = CONV1D_LANES of conv1d.cuh, where Conv1dParams, taken by all three kernels, is declared)
//   part[s, c K + k] = slice-s part of dw[c, k],    part[s, C K + c] = slice-s part of db[c]
// which sum_rows_f32 (gemm.cu) then sums over the slices s in order.
//
// Cost per element of x, K taps, in units of the storage size E (4 bytes float32, 2 bf16; bytes: least traffic;
// FLOPs: adds and multiplies count one each; see src/ops/mod.rs): causal_conv1d_forward and
// causal_conv1d_backward_input 2E bytes and 2K FLOPs; causal_conv1d_param_partials 2E bytes (x and gy) and 2K + 1
// FLOPs. Memory-bound.
#include "common.cuh"
#include "conv1d.cuh"

namespace {

template <typename T>
__device__ void causal_conv1d_forward(const Conv1dParams<T>& p) {
    const T* __restrict__ x = p.x;
    const float* __restrict__ w = p.w;
    const float* __restrict__ bias = p.bias;
    T* __restrict__ y = p.out;
    const int64_t L = p.L, C = p.C;
    const int K = p.K;
    FOR_EACH(i, p.G * L * C) {
        const int64_t c = i % C, t = (i / C) % L;
        float s = bias[c];
        for (int k = 0; k < K; ++k) {
            const int64_t src = t - (K - 1) + k;
            if (src >= 0) s += w[c * K + k] * to_f32(x[i + (src - t) * C]);
        }
        y[i] = from_f32<T>(s);
    }
}

template <typename T>
__device__ void causal_conv1d_backward_input(const Conv1dParams<T>& p) {
    const T* __restrict__ gy = p.gy;
    const float* __restrict__ w = p.w;
    T* __restrict__ dx = p.out;
    const int64_t L = p.L, C = p.C;
    const int K = p.K;
    FOR_EACH(i, p.G * L * C) {
        const int64_t c = i % C, s = (i / C) % L;
        float acc = 0.0f;
        for (int k = 0; k < K; ++k) {
            const int64_t t = s + (K - 1) - k;
            if (t < L) acc += w[c * K + k] * to_f32(gy[i + (t - s) * C]);
        }
        dx[i] = from_f32<T>(acc);
    }
}

// Block (CONV1D_COLS, CONV1D_LANES), grid (ceil(C / CONV1D_COLS), slices). part has one row of C K + C values per
// slice.
template <typename T>
__device__ void causal_conv1d_param_partials(const Conv1dParams<T>& p) {
    const T* __restrict__ x = p.x;
    const T* __restrict__ gy = p.gy;
    float* __restrict__ part = p.part;
    const int64_t L = p.L, C = p.C;
    const int K = p.K;
    __shared__ float lanes[CONV1D_LANES][CONV1D_MAX_K + 1][CONV1D_COLS];
    const int64_t c = (int64_t)blockIdx.x * CONV1D_COLS + threadIdx.x;
    const int64_t r_begin = (int64_t)blockIdx.y * p.rows_per_slice;
    const int64_t r_end = min(p.G * L, r_begin + p.rows_per_slice);
    float acc[CONV1D_MAX_K + 1];  // acc[k] for the weight taps, acc[CONV1D_MAX_K] for the bias
#pragma unroll
    for (int k = 0; k <= CONV1D_MAX_K; ++k) acc[k] = 0.0f;
    if (c < C) {
        for (int64_t r = r_begin + threadIdx.y; r < r_end; r += CONV1D_LANES) {
            const int64_t t = r % L;
            const float g = to_f32(gy[r * C + c]);
            acc[CONV1D_MAX_K] += g;
#pragma unroll
            for (int k = 0; k < CONV1D_MAX_K; ++k) {
                const int64_t src = t - (K - 1) + k;
                if (k < K && src >= 0) acc[k] += g * to_f32(x[(r + src - t) * C + c]);
            }
        }
    }
#pragma unroll
    for (int k = 0; k <= CONV1D_MAX_K; ++k) lanes[threadIdx.y][k][threadIdx.x] = acc[k];
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float* row = part + (int64_t)blockIdx.y * (C * K + C);
        for (int k = 0; k <= K; ++k) {
            const int slot = k < K ? k : CONV1D_MAX_K;
            float s = 0.0f;
#pragma unroll
            for (int l = 0; l < CONV1D_LANES; ++l) s += lanes[l][slot][threadIdx.x];
            if (k < K) row[c * K + k] = s;
            else row[C * K + c] = s;
        }
    }
}

}  // namespace

TYPED_KERNEL(causal_conv1d_forward_f32, causal_conv1d_forward_bf16, causal_conv1d_forward, Conv1dParams)
TYPED_KERNEL(causal_conv1d_backward_input_f32, causal_conv1d_backward_input_bf16, causal_conv1d_backward_input,
             Conv1dParams)

// The parameter partials with their launch bounds (a block of CONV1D_COLS x CONV1D_LANES threads), in both instances.
#define PARAM_PARTIALS_KERNEL(NAME, TYPE)                                                                       \
    extern "C" __global__ void __launch_bounds__(CONV1D_COLS * CONV1D_LANES) NAME(const Conv1dParams<TYPE> p) { \
        causal_conv1d_param_partials<TYPE>(p);                                                                  \
    }
PARAM_PARTIALS_KERNEL(causal_conv1d_param_partials_f32, float)
PARAM_PARTIALS_KERNEL(causal_conv1d_param_partials_bf16, __nv_bfloat16)
