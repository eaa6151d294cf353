// Depthwise causal convolution along the sequence axis (Mamba's conv1d). Tokens x (G, L, C) channels last, weight
// w (C, K), bias b (C); taps before the start of a sequence are zero:
//
//   forward:  y[g, t, c]  = b[c] + sum_{k<K} w[c, k] x[g, t - (K-1) + k, c]           (terms with index < 0 dropped)
//   input:    dx[g, s, c] = sum_{k<K} w[c, k] gy[g, s + (K-1) - k, c]                  (terms with index >= L dropped)
//   weight:   dw[c, k]    = sum_{g, t} gy[g, t, c] x[g, t - (K-1) + k, c]
//                         = sum_{g, s} x[g, s, c] gy[g, s + (K-1) - k, c]              (s = t - (K-1) + k)
//   bias:     db[c]       = sum_{g, t} gy[g, t, c]
//
// With flip the sequences are read from their last token: token t of sequence g is row g L + L - 1 - t of x, gy and
// the output, and the formulas hold in that token order (the backward Mamba's conv, anti-causal in memory, on its
// tokens in place instead of flipped copies).
//
// With silu (Mamba's x = SiLU(conv1d(x)) as one op) the forward stores SiLU(y), and the backward, given
// gy = dL/dSiLU(y), recomputes y from x and the bias instead of reading a stored copy, and works on g in place of gy:
//   y[g, t, c] as above,   g[g, t, c] = gy[g, t, c] SiLU'(y[g, t, c]),   SiLU'(v) = s(v) (1 + v (1 - s(v)))
// so the pre-activation y is never stored (one (G, L, C) tensor less per Mamba block, and no separate SiLU passes).
//
// Storage: every kernel is a template over the storage type T of the tokens x, gy and the output (float or
// __nv_bfloat16), in instances NAME_f32 and NAME_bf16 that compute in float32 (each element read with to_f32, each
// output rounded once with from_f32<T>); the weight, the bias and the partial sums of their gradients are float32.
//
// Work: a thread takes a group of W channels [c, c + W) and a run of CONV1D_RUN consecutive tokens of one sequence,
// [t0, t0 + CONV1D_RUN) (run q = g runs + t0 / CONV1D_RUN, runs = ceil(L / CONV1D_RUN); tokens at or past L are
// padding, computed on zeros and not stored). It streams the run token by token through a window of NT rows of W
// channels in registers, so each row of x or gy is read once per run, plus NT - 1 rows of halo that the neighbouring
// run (the next run lane of the same block) reads too, mostly from L1. Token and channel come from the block and
// thread indices: one 32-bit division per run, none per element. Blocks are (channel lanes, run lanes), channel lanes
// consecutive in memory, so a warp's accesses are whole rows of W consecutive channels of neighbouring runs. A run
// wholly inside its sequence (all but a sequence's last run when CONV1D_RUN does not divide L) is unrolled without
// conditions on its stores, which lets the compiler issue all of the run's loads before its first store.
//   vector kernels (NAME_f32, NAME_bf16): NT = K = CONV1D_TAPS (4, Mamba's d_conv); the forward moves W = VEC<T>
//     channels per access (16 bytes), the backward W = CONV1D_BACKWARD_WIDTH = 4 (16 bytes of float32, 8 of bf16),
//     which keeps its taps, window and sums in registers. The host takes them when K = 4, C is a multiple of W and
//     every buffer is 16-byte aligned.
//   scalar kernels (NAME_scalar_f32, _bf16): W = 1 channel, any K <= NT = CONV1D_MAX_K; window position j holds tap
//     k = j - (NT - K), and positions j < NT - K are skipped.
//
// causal_conv1d_forward: window win[j] = x[t - (NT-1) + j], y[t] = b + sum_k w[k] win[k + NT - K] in the order of k.
// causal_conv1d_backward: window gw[d] = gy[s + d] (zero past the sequence) and the row x[s]; from the same loads
//   dx[s] = sum_k w[k] gw[K-1-k],   dw[k] += x[s] gw[K-1-k],   db += gw[0]
// (the second form of dw above), so dx, dw and db read x and gy once. With silu, gw[d] = g[s + d], and a second window
// xw of NT rows of x runs NT - 1 tokens ahead of s: xw[j] = x[s + j], what y[s + NT - 1] (the token whose g enters
// gw next) reads, and xw[0] = x[s] is the row dw needs, so x is still read once (plus the halo). The parameter
// gradients reduce over all G L tokens deterministically: a thread adds its runs in order (iters runs, a block's run
// lanes apart), the block adds its run lanes in order (lane 0 first) in shared memory and writes one partial row per
// block of runs
//   part[r, c K + k] = run block r's part of dw[c, k],    part[r, C K + c] = its part of db[c]
// which sum_rows_f32 (gemm.cu) then sums over the run blocks r in order. Every order depends on the shape only.
//
// Cost per element of x, K taps, in units of the storage size E (4 bytes float32, 2 bf16; bytes: least traffic;
// FLOPs: adds and multiplies count one each; see src/ops/mod.rs): causal_conv1d_forward 2E bytes (read x, write y)
// and 2K FLOPs; causal_conv1d_backward 3E bytes (read x and gy, write dx) and 4K + 1 FLOPs, plus 4 (C K + C) bytes
// of partial sums per block of runs (about 1% more at Mamba's shapes). Memory-bound: the vector kernels issue about
// 9 instructions per element on the forward and 14 (float32) to 18 (bf16) on the backward (sm_90 SASS of a whole
// run), a third or less of the time the bytes take on an H200. With silu they are not memory-bound: expf and an IEEE
// division per element grow the forward's PTX from 985 to 3793 instructions, and at flare-3d's shapes (H200,
// 2026-12-04, `profile`) the fused forward ran at 1364 GB/s against 3127 for the conv alone, 2.23 ms against 1.91 for
// conv1d then SiLU per step, the backward 4.04 ms against 3.34.
#include "common.cuh"
#include "conv1d.cuh"

namespace {

// SiLU's sigmoid by common.cuh's fast_sigmoid: with expf and an IEEE division the SiLU forward issued 3.5 times the
// instructions of the conv alone and ran at 1364 GB/s against its 3127 (flare-3d profile, H200, 2026-12-04). The
// forward and the backward's recompute call the same function, so SiLU' is taken at the value the forward used.

// Taps held in registers by a thread of W channels: the vector kernels (W > 1) take K = CONV1D_TAPS, the scalar ones
// any K up to CONV1D_MAX_K.
template <int W>
constexpr int TAPS = W > 1 ? CONV1D_TAPS : CONV1D_MAX_K;

// A row of W channels of T as one access: one element, 16 bytes (common.cuh's load_vec / store_vec), or 8 bytes (the
// bf16 rows of the vector backward, 4 channels).
template <typename T, int W>
__device__ __forceinline__ void load_row(const T* at, float (&v)[W]) {
    if constexpr (W == 1) {
        v[0] = to_f32(*at);
    } else if constexpr (W == VEC<T>) {
        load_vec<T>(at, v);
    } else {
        static_assert(W * sizeof(T) == 8, "rows are 1 element, 16 bytes or 8 bytes");
        const uint2 raw = *reinterpret_cast<const uint2*>(at);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int k = 0; k < W; ++k) v[k] = to_f32(e[k]);
    }
}
template <typename T, int W>
__device__ __forceinline__ void store_row(T* at, const float (&v)[W]) {
    if constexpr (W == 1) {
        *at = from_f32<T>(v[0]);
    } else if constexpr (W == VEC<T>) {
        store_vec<T>(at, v);
    } else {
        static_assert(W * sizeof(T) == 8, "rows are 1 element, 16 bytes or 8 bytes");
        uint2 raw;
        T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
        for (int k = 0; k < W; ++k) e[k] = from_f32<T>(v[k]);
        *reinterpret_cast<uint2*>(at) = raw;
    }
}

// The row of W channels at base[at] when `inside` its sequence, else the zeros of the padding. `at` is only added
// to base when inside, so no address outside the buffer is formed.
template <typename T, int W>
__device__ __forceinline__ void load_token(const T* __restrict__ base, int64_t at, bool inside, float (&v)[W]) {
    if (inside) {
        load_row<T, W>(base + at, v);
    } else {
#pragma unroll
        for (int e = 0; e < W; ++e) v[e] = 0.0f;
    }
}

// W float32 values at `at`: 16-byte loads when W is a multiple of 4 (`at` is then 16-byte aligned).
template <int W>
__device__ __forceinline__ void load_f32(const float* __restrict__ at, float (&v)[W]) {
    if constexpr (W % 4 == 0) {
#pragma unroll
        for (int e = 0; e < W; e += 4) {
            const float4 r = *reinterpret_cast<const float4*>(at + e);
            v[e] = r.x, v[e + 1] = r.y, v[e + 2] = r.z, v[e + 3] = r.w;
        }
    } else {
#pragma unroll
        for (int e = 0; e < W; ++e) v[e] = at[e];
    }
}

// The taps of channels [c, c + W) by window position: wt[j][e] = w[c + e, j - (NT - K)], zero for j < NT - K.
template <int W, int NT>
__device__ __forceinline__ void load_taps(const float* __restrict__ w, int c, int K, float (&wt)[NT][W]) {
    if constexpr (W > 1) {
        // The vector kernels: K = NT = 4, so channel c's taps are the 16-byte row w[c, 0..4).
        static_assert(NT == 4, "the vector kernels read one float4 of taps per channel");
#pragma unroll
        for (int e = 0; e < W; ++e) {
            const float4 r = *reinterpret_cast<const float4*>(w + (int64_t)(c + e) * NT);
            wt[0][e] = r.x, wt[1][e] = r.y, wt[2][e] = r.z, wt[3][e] = r.w;
        }
    } else {
#pragma unroll
        for (int j = 0; j < NT; ++j) wt[j][0] = j >= NT - K ? w[(int64_t)c * K + j - (NT - K)] : 0.0f;
    }
}

// Moves a window of NT rows one token on: row j takes row j + 1 (the last row is then loaded anew).
template <int NT, int W>
__device__ __forceinline__ void slide(float (&win)[NT][W]) {
#pragma unroll
    for (int j = 0; j + 1 < NT; ++j) {
#pragma unroll
        for (int e = 0; e < W; ++e) win[j][e] = win[j + 1][e];
    }
}

// Run q: tokens [t0, t0 + CONV1D_RUN) of sequence g = q / runs, the index of x[g, t0, c] and the step between
// consecutive tokens' rows (C, or -C when the sequence runs backwards through memory: flip).
struct Run {
    int t0;
    int64_t at;
    int64_t step;
};
template <typename T>
__device__ __forceinline__ Run run_at(const Conv1dParams<T>& p, int q, int c) {
    const int g = q / p.runs;
    const int t0 = (q - g * p.runs) * CONV1D_RUN;
    const int64_t row = (int64_t)g * p.L + (p.flip ? p.L - 1 - t0 : t0);
    return {t0, row * p.C + c, p.flip ? -(int64_t)p.C : (int64_t)p.C};
}

// One run of the forward; FULL: all of its tokens are inside the sequence.
template <typename T, int W, int NT, bool FULL>
__device__ __forceinline__ void forward_run(const Conv1dParams<T>& p, const Run r, int first, const float (&wt)[NT][W],
                                            const float (&b)[W]) {
    const int64_t C = r.step;  // the next token's row, forwards or backwards through memory
    // win[j] = x[t - (NT-1) + j] at the current token t (win[NT - 1] = x[t]); rows before the sequence are zero.
    float win[NT][W];
#pragma unroll
    for (int j = 0; j < NT - 1; ++j) {
        const int back = NT - 1 - j;
        load_token<T, W>(p.x, r.at - back * C, j >= first && r.t0 >= back, win[j]);
    }
#pragma unroll
    for (int i = 0; i < CONV1D_RUN; ++i) {
        const bool inside = FULL || r.t0 + i < p.L;
        load_token<T, W>(p.x, r.at + i * C, inside, win[NT - 1]);
        float y[W];
#pragma unroll
        for (int e = 0; e < W; ++e) y[e] = b[e];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            if (j >= first) {
#pragma unroll
                for (int e = 0; e < W; ++e) y[e] += wt[j][e] * win[j][e];
            }
        }
        if (p.silu) {
#pragma unroll
            for (int e = 0; e < W; ++e) y[e] *= fast_sigmoid(y[e]);
        }
        if (inside) store_row<T, W>(p.out + r.at + i * C, y);
        slide(win);
    }
}

// Block (channel lanes, run lanes), grid (ceil(G runs / run lanes), ceil(C / (W channel lanes))): one run per thread.
template <typename T, int W>
__device__ __forceinline__ void causal_conv1d_forward(const Conv1dParams<T>& p) {
    constexpr int NT = TAPS<W>;
    const int c = (blockIdx.y * blockDim.x + threadIdx.x) * W;
    const int q = blockIdx.x * blockDim.y + threadIdx.y;
    if (c >= p.C || q >= p.G * p.runs) return;
    const int first = W > 1 ? 0 : NT - p.K;  // the first window position with a tap
    float wt[NT][W], b[W];
    load_taps<W, NT>(p.w, c, p.K, wt);
    load_f32<W>(p.bias + c, b);
    const Run r = run_at(p, q, c);
    // A whole run inside its sequence (every run but the last of a sequence whose L is not a multiple of the run)
    // stores without conditions, so the loads of the unrolled run can be scheduled ahead of the stores.
    if (r.t0 + CONV1D_RUN <= p.L) {
        forward_run<T, W, NT, true>(p, r, first, wt, b);
    } else {
        forward_run<T, W, NT, false>(p, r, first, wt, b);
    }
}

// One run of the backward: dx of its tokens, and its terms of dw and db added to acc (acc[j]: window position j's
// tap, acc[NT]: the bias); FULL: all of its tokens are inside the sequence; SILU: the op is SiLU(conv) (b: the bias).
template <typename T, int W, int NT, bool FULL, bool SILU>
__device__ __forceinline__ void backward_run(const Conv1dParams<T>& p, const Run r, int first,
                                             const float (&wt)[NT][W], const float (&b)[W],
                                             float (&acc)[NT + 1][W]) {
    const int64_t C = r.step;  // the next token's row, forwards or backwards through memory
    // SILU: xw[j] = x[t - (NT-1) + j] after grad_at(t - t0), rows before the sequence zero (positions j < first, which
    // have no tap, are not loaded); it starts as the rows before the run.
    float xw[NT][W];
    if constexpr (SILU) {
#pragma unroll
        for (int j = 1; j < NT; ++j) {
            const int back = NT - j;
            load_token<T, W>(p.x, r.at - back * C, j - 1 >= first && r.t0 >= back, xw[j]);
        }
    }
    // The gradient entering the conv at token t0 + d: gy, times SiLU'(y) recomputed from the window of x.
    auto grad_at = [&](int d, float (&g)[W]) {
        const bool inside = r.t0 + d < p.L;
        load_token<T, W>(p.gy, r.at + d * C, inside, g);
        if constexpr (SILU) {
            slide(xw);
            load_token<T, W>(p.x, r.at + d * C, inside, xw[NT - 1]);
#pragma unroll
            for (int e = 0; e < W; ++e) {
                float y = b[e];
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    if (j >= first) y += wt[j][e] * xw[j][e];
                }
                const float sig = fast_sigmoid(y);
                g[e] *= sig * (1.0f + y * (1.0f - sig));
            }
        }
    };
    // gw[d] = g[s + d] at the current token s; rows at or past the sequence end are zero. Position NT - 1 - j pairs
    // with tap j: g[s + (K-1) - k] for k = j - first.
    float gw[NT][W];
#pragma unroll
    for (int d = 0; d < NT - 1; ++d) grad_at(d, gw[d]);
#pragma unroll
    for (int i = 0; i < CONV1D_RUN; ++i) {
        const int s = r.t0 + i;
        grad_at(i + NT - 1, gw[NT - 1]);
        float xs[W], dx[W];
        const bool inside = FULL || s < p.L;
        if constexpr (SILU) {
#pragma unroll
            for (int e = 0; e < W; ++e) xs[e] = xw[0][e];  // x[s], zero past the sequence
        } else {
            load_token<T, W>(p.x, r.at + i * C, inside, xs);
        }
#pragma unroll
        for (int e = 0; e < W; ++e) dx[e] = 0.0f;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            if (j >= first) {
#pragma unroll
                for (int e = 0; e < W; ++e) {
                    dx[e] += wt[j][e] * gw[NT - 1 - j][e];
                    acc[j][e] += xs[e] * gw[NT - 1 - j][e];
                }
            }
        }
#pragma unroll
        for (int e = 0; e < W; ++e) acc[NT][e] += gw[0][e];
        if (inside) store_row<T, W>(p.out + r.at + i * C, dx);
        slide(gw);
    }
}

// Block (channel lanes, run lanes), grid (run blocks, ceil(C / (W channel lanes))): run block r takes the runs
// [r iters lanes, (r + 1) iters lanes), thread lane y the runs r iters lanes + i lanes + y for i < iters; part has one
// row of C K + C values per run block.
template <typename T, int W>
__device__ __forceinline__ void causal_conv1d_backward(const Conv1dParams<T>& p) {
    constexpr int NT = TAPS<W>;
    // lanes[(y (NT + 1) + j) cw + cl]: run lane y's sum for window position j (NT: the bias) of the block's channel cl.
    __shared__ __align__(16) float lanes[CONV1D_THREADS * (NT + 1) * W];
    const int c = (blockIdx.y * blockDim.x + threadIdx.x) * W;
    const int first = W > 1 ? 0 : NT - p.K;
    float acc[NT + 1][W];
#pragma unroll
    for (int j = 0; j <= NT; ++j) {
#pragma unroll
        for (int e = 0; e < W; ++e) acc[j][e] = 0.0f;
    }
    if (c < p.C) {
        float wt[NT][W], b[W] = {};
        load_taps<W, NT>(p.w, c, p.K, wt);
        if (p.silu) load_f32<W>(p.bias + c, b);
        const int runs = p.G * p.runs;
        for (int i = 0; i < p.iters; ++i) {
            const int q = (blockIdx.x * p.iters + i) * blockDim.y + threadIdx.y;
            if (q >= runs) break;
            const Run r = run_at(p, q, c);
            const bool full = r.t0 + CONV1D_RUN <= p.L;  // as in the forward
            if (p.silu) {
                if (full) backward_run<T, W, NT, true, true>(p, r, first, wt, b, acc);
                else backward_run<T, W, NT, false, true>(p, r, first, wt, b, acc);
            } else {
                if (full) backward_run<T, W, NT, true, false>(p, r, first, wt, b, acc);
                else backward_run<T, W, NT, false, false>(p, r, first, wt, b, acc);
            }
        }
    }
    if (p.part == nullptr) return;  // the same for the whole grid
    const int cw = blockDim.x * W;
    float* mine = lanes + threadIdx.y * (NT + 1) * cw + threadIdx.x * W;
#pragma unroll
    for (int j = 0; j <= NT; ++j) {
        if constexpr (W % 4 == 0) {
#pragma unroll
            for (int e = 0; e < W; e += 4) {
                *reinterpret_cast<float4*>(mine + j * cw + e) =
                    make_float4(acc[j][e], acc[j][e + 1], acc[j][e + 2], acc[j][e + 3]);
            }
        } else {
#pragma unroll
            for (int e = 0; e < W; ++e) mine[j * cw + e] = acc[j][e];
        }
    }
    __syncthreads();
    // The block's n channels from c0: output o = k n + cl is dw[c0 + cl, k] for k < K, db[c0 + cl] for k = K.
    const int K = W > 1 ? NT : p.K;
    const int c0 = blockIdx.y * cw, n = min(cw, p.C - c0);
    float* row = p.part + (int64_t)blockIdx.x * ((int64_t)p.C * (K + 1));
    for (int o = threadIdx.y * blockDim.x + threadIdx.x; o < n * (K + 1); o += blockDim.x * blockDim.y) {
        const int k = o / n, cl = o - k * n;
        const int j = k < K ? first + k : NT;
        float s = 0.0f;
        for (int y = 0; y < (int)blockDim.y; ++y) s += lanes[(y * (NT + 1) + j) * cw + cl];
        row[k < K ? (int64_t)(c0 + cl) * K + k : (int64_t)p.C * K + c0 + cl] = s;
    }
}

}  // namespace

// The instances for one storage type TYPE, vector (VECTOR) or scalar, with blocks of at most CONV1D_THREADS and two
// blocks per SM (at most 128 registers: the vector kernels use them to issue a whole run's loads at once).
#define CAUSAL_CONV_KERNEL(FORWARD, BACKWARD, TYPE, VECTOR)                                                \
    extern "C" __global__ void __launch_bounds__(CONV1D_THREADS, 2) FORWARD(const Conv1dParams<TYPE> p) {  \
        causal_conv1d_forward<TYPE, VECTOR ? VEC<TYPE> : 1>(p);                                            \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(CONV1D_THREADS, 2) BACKWARD(const Conv1dParams<TYPE> p) { \
        causal_conv1d_backward<TYPE, VECTOR ? CONV1D_BACKWARD_WIDTH : 1>(p);                               \
    }
CAUSAL_CONV_KERNEL(causal_conv1d_forward_f32, causal_conv1d_backward_f32, float, true)
CAUSAL_CONV_KERNEL(causal_conv1d_forward_bf16, causal_conv1d_backward_bf16, __nv_bfloat16, true)
CAUSAL_CONV_KERNEL(causal_conv1d_forward_scalar_f32, causal_conv1d_backward_scalar_f32, float, false)
CAUSAL_CONV_KERNEL(causal_conv1d_forward_scalar_bf16, causal_conv1d_backward_scalar_bf16, __nv_bfloat16, false)
