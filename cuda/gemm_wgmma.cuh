// Parameters of the explicit matrix products on Hopper's warpgroup matrix products (gemm_wgmma.cu, sm_90a; bf16
// operands, float32 accumulation).
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

#include "gemm.cuh"

// A block: GEMM_WGMMA_THREADS threads (two warpgroups of 64 rows each) compute a GEMM_WGMMA_BM x BN tile of C from
// GEMM_WGMMA_STAGES shared-memory stages of GEMM_WGMMA_BK reduction indices each; BN is GEMM_WGMMA_BN, or
// GEMM_WGMMA_BN_WIDE for the _n256 kernels (and 64 for the implicit products' _n64 ones).
constexpr int GEMM_WGMMA_THREADS = 256;
constexpr int GEMM_WGMMA_BM = 128;
constexpr int GEMM_WGMMA_BN = 128;
constexpr int GEMM_WGMMA_BN_WIDE = 256;
constexpr int GEMM_WGMMA_BK = 64;
constexpr int GEMM_WGMMA_STAGES = 4;

// C[z, m, n] = sum_{(i, k) in slice z} A[i, m, k] B[i, n, k] for m < M, n < N: a reduction over batch items i <
// items and k < K, taken in steps of GEMM_WGMMA_BK indices of one item (an item's last step may be short), the steps
// numbered item by item and slice z = steps [z slice_steps, (z + 1) slice_steps). Both operands are row-major along k
// (the "TN" product: every row a contiguous run of k): A[i, m, k] = a[i a_item + m a_ld + k], B[i, n, k] = b[i b_item +
// n b_ld + k]; a, b 16-byte aligned, a_ld, b_ld, a_item, b_item multiples of 8. C is float32, row-major (M, N), slice
// z at c + z M N: the partial sums of a split reduction, added in order afterwards (conv.cu's sum_slices), so the
// result does not depend on scheduling. Grid (ceil(M / GEMM_WGMMA_BM), ceil(N / BN), slices) with BN =
// GEMM_WGMMA_BN or GEMM_WGMMA_BN_WIDE (_n256), GEMM_WGMMA_THREADS threads, dynamic shared memory GEMM_WGMMA_STAGES x
// (GEMM_WGMMA_BM + BN) x GEMM_WGMMA_BK x 2 bytes.
template <typename T>
struct GemmWgmmaParams {
    const T* a;
    const T* b;
    float* c;
    int64_t a_ld;
    int64_t b_ld;
    int64_t a_item;
    int64_t b_item;
    int m;
    int n;
    int k;
    int items;
    int slice_steps;
};

// conv weight gradient from the wide map's columns (conv.cu's conv_im2col_bf16): dW[cn, (cw, a)] = sum_o
// narrow[cn, o] col[(cw, a), o] per batch item and slice.
extern "C" __global__ void conv_wgrad_gemm_wgmma_bf16(const GemmWgmmaParams<__nv_bfloat16> p);
// conv forward and input gradient as explicit products (Pairing::explicit_product): out[c, (n, o)] = sum_k W[c, k]
// rows[(n, o), k] with conv.cu's conv_im2row_bf16 rows of the source map (the input gradient's W flipped first by
// conv_weight_flip_bf16), one slice
extern "C" __global__ void conv_fprop_gemm_wgmma_bf16(const GemmWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_gemm_wgmma_bf16(const GemmWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_wgrad_gemm_wgmma_bf16_n256(const GemmWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_gemm_wgmma_bf16_n256(const GemmWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_gemm_wgmma_bf16_n256(const GemmWgmmaParams<__nv_bfloat16> p);

// The implicit convolution products (Pairing::implicit_product): one stride-phase product of conv.cuh's
// ConvGemmParams over a channels-last source (conv_wgmma.cuh: src[n, v, c] at (n V + v) c_pad + c, c_pad = c_src
// rounded up to 8),
//   out[n, col, dst_base + dst_step . r] = b[col] + sum_{q, c} src[n, src_mul r + lo + q, c] Wp[c, q, col]
// over output rows r (rows per axis), taps q (taps per axis) and c < c_src, source positions outside src_size
// reading 0, as one matrix product: C[(n, r), col] with the reduction over kk = q c_pad + c in k-steps of
// GEMM_WGMMA_BK (a step may span taps), A gathered from the source, B from Wp, conv_halo.cuh's packed weight with
// two parts ([ceil(c_src / 16)][prod(taps)][2][c_dst_pad][8], c_dst_pad a multiple of the tile's columns). Any
// source stride: a strided conv's forward, the input gradient's stride phases. Grid (ceil(batch prod(rows) /
// GEMM_WGMMA_BM), ceil(c_dst / BN)) with BN = GEMM_WGMMA_BN, 64 (the _n64 kernels) or GEMM_WGMMA_BN_WIDE (_n256),
// GEMM_WGMMA_THREADS threads, dynamic shared memory GEMM_WGMMA_STAGES x (GEMM_WGMMA_BM + BN) x GEMM_WGMMA_BK x 2
// bytes; batch prod(rows) and c_pad prod(src_size) below 2^31.
template <typename T>
struct ConvImplicitParams {
    const T* src;
    const T* packed;
    const T* bias;  // (c_dst), or null for none
    T* dst;
    int batch;
    int c_src;
    int c_dst;
    int c_dst_pad;
    int src_size[3];
    int dst_size[3];
    int rows[3];
    int src_mul[3];
    int lo[3];  // source offset of tap 0 from src_mul r
    int dst_base;
    int dst_step[3];
    int taps[3];
};
extern "C" __global__ void conv_fprop_implicit_wgmma_bf16(const ConvImplicitParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_implicit_wgmma_bf16_n64(const ConvImplicitParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_implicit_wgmma_bf16(const ConvImplicitParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_implicit_wgmma_bf16_n64(const ConvImplicitParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_implicit_wgmma_bf16_n256(const ConvImplicitParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_implicit_wgmma_bf16_n256(const ConvImplicitParams<__nv_bfloat16> p);

// The 1x1x1 convolution products on channels-first maps, gemm.cuh's GemmParams in their channels-first form (the
// contract of gemm.cu's conv_*_pointwise_bf16_n* streaming kernels): per item b, C[b](i, j) = sum_k A[b](i, k) B(k, j)
// (+ bias[j]) with A[b](i, k) = a[b a_sb + k a_sk + i] (the source map, a_sk = M positions) and C[b](i, j) = c[b c_sb +
// j M + i]; conv_fprop: W stored [j][k] (b_sk = 1, b_sj = K), conv_dgrad and conv_transpose_fprop: [k][j] (b_sk = N,
// b_sj = 1). Any K; M, the [k][j] kinds' N and the [j][k] kind's K multiples of 8, a, b, c 16-byte aligned. Grid
// (ceil(N / GEMM_WGMMA_BM), ceil(M / GEMM_WGMMA_BN), batch), GEMM_WGMMA_THREADS threads, dynamic shared memory
// GEMM_WGMMA_STAGES x (GEMM_WGMMA_BM + GEMM_WGMMA_BN) x GEMM_WGMMA_BK x 2 bytes.
extern "C" __global__ void conv_fprop_pointwise_wgmma_bf16(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_pointwise_wgmma_bf16(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void conv_transpose_fprop_pointwise_wgmma_bf16(const GemmParams<__nv_bfloat16> p);

// The transposed convolution's forward (kernel = stride, no padding) as one channels-first 1x1x1 product of its taps
// as channels, stored straight into y:
//   y[n, co, id kd + a, ih kh + b, iw kw + c] = b[co] + sum_ci x[n, ci, id, ih, iw] w[ci, co K + t],
// t = (a kh + b) kw + c, K = kd kh kw; x (batch, c_in, D, H, W), w (c_in, c_out K) as PyTorch stores it, y (batch,
// c_out, D kd, H kh, W kw). D H W and c_out K multiples of 8, x and w 16-byte aligned, y's elements per item below
// 2^31. Grid (ceil(c_out K / GEMM_WGMMA_BM), ceil(D H W / GEMM_WGMMA_BN), batch), GEMM_WGMMA_THREADS threads, dynamic
// shared memory as the 1x1x1 products above.
template <typename T>
struct ConvTransposeWgmmaParams {
    const T* x;
    const T* w;
    const T* bias;  // (c_out), or null for none
    T* y;
    int batch;
    int c_in;
    int c_out;
    int size[3];  // D, H, W of x
    int k[3];     // kd, kh, kw
};
extern "C" __global__ void conv_transpose_fprop_wgmma_bf16(const ConvTransposeWgmmaParams<__nv_bfloat16> p);

// The linear layers' products that gemm.cu's streaming kernels do not take (reductions beyond GEMM_STREAM_MAX_K,
// weight gradients beyond 128 x 128: the deep Mamba layers' in_proj, x_proj and out_proj), gemm.cuh's GemmParams with
// each role's unit strides (gemm.cuh): forward C = y = x W^T (+ bias) and input gradient C = dx = g W in bf16, weight
// gradient dW = g^T x as float32 slices (slice z: reduction indices [z k_slice, (z + 1) k_slice), k_slice a multiple
// of GEMM_WGMMA_BK, at c_acc + z c_slice). The strides that are not 1 (the rows' lengths) multiples of 8, a and b
// 16-byte aligned; any M, N, K. Grid (ceil(M / GEMM_WGMMA_BM), ceil(N / BN), slices) with BN = GEMM_WGMMA_BN or 64
// (the _n64 kernels), GEMM_WGMMA_THREADS threads, dynamic shared memory GEMM_WGMMA_STAGES x (GEMM_WGMMA_BM + BN) x
// GEMM_WGMMA_BK x 2 bytes.
extern "C" __global__ void linear_fprop_wgmma_bf16(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void linear_fprop_wgmma_bf16_n64(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void linear_dgrad_wgmma_bf16(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void linear_dgrad_wgmma_bf16_n64(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void linear_wgrad_wgmma_bf16(const GemmParams<__nv_bfloat16> p);
extern "C" __global__ void linear_wgrad_wgmma_bf16_n64(const GemmParams<__nv_bfloat16> p);
