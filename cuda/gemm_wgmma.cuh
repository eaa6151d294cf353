// Parameters of the explicit matrix products on Hopper's warpgroup matrix products (gemm_wgmma.cu, sm_90a; bf16
// operands, float32 accumulation).
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

// A block: GEMM_WGMMA_THREADS threads (two warpgroups of 64 rows each) compute a GEMM_WGMMA_BM x GEMM_WGMMA_BN tile of
// C from GEMM_WGMMA_STAGES shared-memory stages of GEMM_WGMMA_BK reduction indices each.
constexpr int GEMM_WGMMA_THREADS = 256;
constexpr int GEMM_WGMMA_BM = 128;
constexpr int GEMM_WGMMA_BN = 128;
constexpr int GEMM_WGMMA_BK = 64;
constexpr int GEMM_WGMMA_STAGES = 4;

// C[z, m, n] = sum_{(i, k) in slice z} A[i, m, k] B[i, n, k] for m < M, n < N: a reduction over batch items i <
// items and k < K, taken in steps of GEMM_WGMMA_BK indices of one item (an item's last step may be short), the steps
// numbered item by item and slice z = steps [z slice_steps, (z + 1) slice_steps). Both operands are row-major along k
// (the "TN" product: every row a contiguous run of k): A[i, m, k] = a[i a_item + m a_ld + k], B[i, n, k] = b[i b_item +
// n b_ld + k]; a, b 16-byte aligned, a_ld, b_ld, a_item, b_item multiples of 8. C is float32, row-major (M, N), slice
// z at c + z M N: the partial sums of a split reduction, added in order afterwards (conv.cu's sum_slices), so the
// result does not depend on scheduling. Grid (ceil(M / GEMM_WGMMA_BM), ceil(N / GEMM_WGMMA_BN), slices),
// GEMM_WGMMA_THREADS threads, dynamic shared memory GEMM_WGMMA_STAGES x (GEMM_WGMMA_BM + GEMM_WGMMA_BN) x
// GEMM_WGMMA_BK x 2 bytes.
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
