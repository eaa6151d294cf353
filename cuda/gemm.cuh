// Parameters of the matrix products and the column sums of gemm.cu.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

// The tile of C one block computes (GEMM_TM x GEMM_TN), the K step staged in shared memory, the shared-memory row
// padding, and the threads per block (each owns a 4 x 4 sub-tile).
constexpr int GEMM_TM = 64;
constexpr int GEMM_TN = 64;
constexpr int GEMM_TK = 16;
constexpr int GEMM_PAD = 4;
constexpr int GEMM_THREADS = 256;
// The tensor-core products (linear_*_tf32): block tile GEMM_TC_BM rows x GEMM_TC_BN or GEMM_TC_BN_NARROW columns,
// GEMM_TC_BK reduction indices per stage, GEMM_TC_STAGES stages in flight, GEMM_TC_THREADS threads (8 warps).
constexpr int GEMM_TC_BM = 128;
constexpr int GEMM_TC_BN = 64;
constexpr int GEMM_TC_BN_NARROW = 32;
constexpr int GEMM_TC_BK = 16;
constexpr int GEMM_TC_STAGES = 3;
constexpr int GEMM_TC_THREADS = 256;
// The streaming products (linear_*_stream_bf16_nBN): row tiles of GEMM_STREAM_BM rows, GEMM_STREAM_THREADS threads
// (a warp per 16 rows), GEMM_STREAM_STAGES tiles of A in the ring, reductions of at most GEMM_STREAM_MAX_K.
constexpr int GEMM_STREAM_BM = 64;
constexpr int GEMM_STREAM_THREADS = 128;
constexpr int GEMM_STREAM_STAGES = 4;
constexpr int GEMM_STREAM_MAX_K = 128;
// sum_rows_f32: block (SUM_ROWS_COLS, SUM_ROWS_LANES): columns per block, row lanes.
constexpr int SUM_ROWS_COLS = 32;
constexpr int SUM_ROWS_LANES = 8;

// One product C[z] = sum_{k in slice z} A(i, k) B(k, j) (+ bias[j]), A(i, k) = a[i a_si + k a_sk],
// B(k, j) = b[k b_sk + j b_sj], C row-major (M, N): written to c in the storage type T (forward, input gradient) or,
// for the weight gradient, slice z to c_acc + z c_slice in float32 (partial sums stay float32 until sum_rows_f32 has
// added them). Grid (ceil(M / tile rows), ceil(N / tile columns), slices). T is float or __nv_bfloat16.
template <typename T>
struct GemmParams {
    const T* a;
    const T* b;
    const T* bias;  // (N), or null for none
    T* c;           // forward and input gradient
    float* c_acc;   // weight gradient: the float32 partial products
    int64_t a_si;
    int64_t a_sk;
    int64_t b_sk;
    int64_t b_sj;
    int64_t M;
    int64_t N;
    int64_t K;
    int64_t k_slice;  // reduction rows per slice (blockIdx.z)
    int64_t c_slice;  // elements between the slices' partial products
    // The channels-first products (conv_*_pointwise_bf16_nBN) run `batch` items of M rows each: item b's A at
    // a + b a_sb and its C at c + b c_sb, C(i, j) at j M + i. The linear products leave these 0.
    int64_t batch;
    int64_t a_sb;
    int64_t c_sb;
};

// The backward of a streaming linear layer from one read of g (linear_backward_stream_bf16_kBK_mBMW): over M tokens
// t, with N outputs j and K inputs k,
//   dx[t, k] = sum_j g[t, j] W[j, k],     dW_s[j, k] = sum_{t in slice s} g[t, j] x[t, k]
// (the input and weight gradients of linear.rs's streaming products, which read g once each). Slice s = blockIdx.x
// takes the token tiles s, s + gridDim.x, ... and writes its float32 dW_s at dw_acc + s dw_slice (summed over the
// slices in order afterwards). g, x rows whole 16-byte pieces or pairs, W (N, K) row-major, dx (M, K) row-major.
template <typename T>
struct LinearBackwardParams {
    const T* g;  // (M, N), rows g_ld apart
    const T* x;  // (M, K), rows x_ld apart
    const T* w;  // (N, K)
    T* dx;       // (M, K)
    float* dw_acc;
    int64_t g_ld;
    int64_t x_ld;
    int64_t M;
    int64_t N;
    int64_t K;
    int64_t dw_slice;
};

// y[s, q] = sum_{p in slice s} x[p ld + q] for q < cols, slices of rows_per_slice rows. Grid (ceil(cols / 32), slices).
struct SumRowsParams {
    const float* x;
    float* y;
    int64_t rows;
    int64_t cols;
    int64_t ld;
    int64_t rows_per_slice;
};

// Exact float32 SIMT products (GEMM_TM x GEMM_TN tiles): the parity path (--math exact).
extern "C" __global__ void linear_fprop_f32(const GemmParams<float> p);  // y = x W^T (+ b)
extern "C" __global__ void linear_dgrad_f32(const GemmParams<float> p);  // dx = g W
extern "C" __global__ void linear_wgrad_f32(const GemmParams<float> p);  // dW = g^T x, split over tokens
// The same products on the tensor cores, float32 accumulation: tf32 from float32 storage, bf16 from bf16 storage;
// _n32 for N <= GEMM_TC_BN_NARROW. Each role fixes which strides are 1: fprop a_sk = b_sk = 1, dgrad a_sk = b_sj = 1,
// wgrad a_si = b_sj = 1.
extern "C" __global__ void linear_fprop_tf32(const GemmParams<float> p);
extern "C" __global__ void linear_fprop_tf32_n32(const GemmParams<float> p);
extern "C" __global__ void linear_dgrad_tf32(const GemmParams<float> p);
extern "C" __global__ void linear_dgrad_tf32_n32(const GemmParams<float> p);
extern "C" __global__ void linear_wgrad_tf32(const GemmParams<float> p);
extern "C" __global__ void linear_wgrad_tf32_n32(const GemmParams<float> p);
extern "C" __global__ void linear_fprop_bf16(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void linear_fprop_bf16_n32(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void linear_dgrad_bf16(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void linear_dgrad_bf16_n32(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void linear_wgrad_bf16(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void linear_wgrad_bf16_n32(const GemmParams<__nv_bfloat16> p);
// y = x W^T and dx = g W for short reductions over many rows (K <= GEMM_STREAM_MAX_K, a_sk = 1, the rows of A whole
// 16-byte pieces or pairs), bf16, BN = 32, 64 or 128 columns per block: each block keeps its columns of W in shared
// memory and walks row tiles blockIdx.x, + gridDim.x, ... (grid: (resident blocks / gridDim.y, ceil(N / BN))), with
// dynamic shared memory as gemm.cu states. fprop b_sk = 1, dgrad b_sj = 1.
extern "C" __global__ void linear_fprop_stream_bf16_n32(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void linear_fprop_stream_bf16_n64(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void linear_fprop_stream_bf16_n128(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void linear_dgrad_stream_bf16_n32(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void linear_dgrad_stream_bf16_n64(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void linear_dgrad_stream_bf16_n128(const GemmParams<__nv_bfloat16> p);
// dW = g^T x over many tokens (a_si = b_sj = 1, rows of g and x whole 16-byte pieces or pairs), bf16, in dW tiles of
// 32, 64 or 128 rows x 32 or 64 columns: grid (slices, tiles of dW); slice s sums the token tiles s, s + slices, ...
// into c_acc + s c_slice (float32), dynamic shared memory as gemm.cu states.
extern "C" __global__ void linear_wgrad_stream_bf16_m32_n32(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void linear_wgrad_stream_bf16_m32_n64(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void linear_wgrad_stream_bf16_m64_n32(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void linear_wgrad_stream_bf16_m64_n64(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void linear_wgrad_stream_bf16_m128_n32(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void linear_wgrad_stream_bf16_m128_n64(const GemmParams<__nv_bfloat16> p);
// The fused backward: K <= BK inputs (32 or 64), N <= BMW outputs (32, 64 or 128; BMW <= GEMM_STREAM_MAX_K), grid
// (slices), dynamic shared memory as gemm.cu states.
extern "C" __global__ void linear_backward_stream_bf16_k32_m32(const LinearBackwardParams<__nv_bfloat16> p);
extern "C" __global__ void linear_backward_stream_bf16_k32_m64(const LinearBackwardParams<__nv_bfloat16> p);
extern "C" __global__ void linear_backward_stream_bf16_k32_m128(const LinearBackwardParams<__nv_bfloat16> p);
extern "C" __global__ void linear_backward_stream_bf16_k64_m32(const LinearBackwardParams<__nv_bfloat16> p);
extern "C" __global__ void linear_backward_stream_bf16_k64_m64(const LinearBackwardParams<__nv_bfloat16> p);
extern "C" __global__ void linear_backward_stream_bf16_k64_m128(const LinearBackwardParams<__nv_bfloat16> p);
// The same streaming products on channels-first maps (N, C, positions), for the 1x1x1 convolutions: per item b,
// C[b](i, j) = sum_k A[b](i, k) B(k, j) (+ bias[j]) over the positions i, A[b](i, k) = a[b a_sb + k a_sk + i] (a_si = 1,
// a_sk = M, M a multiple of 8) and C[b](i, j) = c[b c_sb + j M + i]: conv_fprop (y = W x, W stored [j][k], b_sk = 1),
// conv_dgrad (dx = W^T g, W stored [k][j], b_sj = 1) and conv_transpose_fprop (its taps as channels, z = W^T x,
// b_sj = 1). Grid (resident blocks / gridDim.y, ceil(N / BN)).
extern "C" __global__ void conv_fprop_pointwise_bf16_n32(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_pointwise_bf16_n64(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_pointwise_bf16_n128(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_pointwise_bf16_n32(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_pointwise_bf16_n64(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_pointwise_bf16_n128(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void conv_transpose_fprop_pointwise_bf16_n32(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void conv_transpose_fprop_pointwise_bf16_n64(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void conv_transpose_fprop_pointwise_bf16_n128(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void sum_rows_f32(const SumRowsParams p);
