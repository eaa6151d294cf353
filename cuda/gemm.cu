// Matrix products for the fully connected layers, and the deterministic column sums that finish every reduction
// over tokens (bias gradients, split-K partials, per-block partials of the scan and conv1d parameter gradients).
//
// gemm_f32: one device function for the three products of a linear layer (kernels linear_fprop, linear_dgrad,
// linear_wgrad, taking GemmParams of gemm.cuh; sum_rows_f32 takes SumRowsParams), with the operands addressed
// through strides:
//
//   C[z][i, j] = sum_{k in slice z} A(i, k) B(k, j)  (+ bias[j])     i < M, j < N,
//   A(i, k) = a[i * a_si + k * a_sk],   B(k, j) = b[k * b_sk + j * b_sj],   C row-major (M, N), slice z at z * c_slice.
//
//   forward  y  = x W^T : A = x (M, K)            a_si = K,    a_sk = 1;     B(k, j) = W[j, k]  b_sk = 1,    b_sj = K
//   input    dx = g W   : A = g (M, Nout)          a_si = Nout, a_sk = 1;     B(k, j) = W[k, j]  b_sk = K,    b_sj = 1
//   weight   dW = g^T x : A(i, k) = g[k, i]        a_si = 1,    a_sk = Nout;  B(k, j) = x[k, j]  b_sk = K,    b_sj = 1
//
// The weight gradient reduces over all M tokens: blockIdx.z splits that reduction into fixed slices of k_slice rows
// whose partial products land in separate buffers, summed afterwards by sum_rows_f32 in a fixed order (split-K
// without atomics, so the result does not depend on scheduling).
//
// Tiling: a block of 256 threads computes a 64 x 64 tile of C; each thread owns a 4 x 4 sub-tile (rows 4 ty .. 4 ty + 3,
// columns 4 tx .. 4 tx + 3) held in registers. The K axis is walked 16 at a time: the 64 x 16 slab of A and the
// 16 x 64 slab of B are staged in shared memory k-major (as[k][i], bs[k][j]) so that the inner loop reads a float4 of
// each and does 16 FMAs. Global loads follow whichever stride of an operand is 1, so that consecutive threads read
// consecutive addresses; out-of-range rows, columns and k are loaded as zeros. The k-major slabs and the 4 x 4
// register tiles are the shape a tensor-core (mma) version keeps.
//
// sum_rows_f32: y[s, q] = sum_{p in slice s} x[p * ld + q] for q < cols, slices of rows_per_slice rows. A block
// covers 32 columns with 8 row lanes; lane ty adds rows ty, ty + 8, ... in order, then lane 0 adds the 8 lane sums in
// order. Large row counts run in two rounds (slices, then the sum of the slices), chosen by the host from the
// shapes alone, so the summation order is fixed.
//
// Cost (bytes: least traffic, 4 per float; FLOPs: adds and multiplies count one each; see src/ops/mod.rs):
// linear_fprop, linear_dgrad, linear_wgrad 2K FLOPs per element of C (K the reduction) for at least
// 4 (1 + K/N + K/M) bytes per element, about 4 (1 + K/N) when M is millions of tokens; the stage-0 in_proj forward of
// the 3D reference (K = 32, N = 128) has 13 FLOPs per byte, bound by memory in float32. sum_rows_f32: 4 bytes and
// 1 FLOP per element summed.
#include "common.cuh"
#include "gemm.cuh"

// GEMM_PAD keeps the k-major slab stores off a single bank; rows stay 16-byte aligned for float4 reads.
static_assert(GEMM_THREADS == (GEMM_TM / 4) * (GEMM_TN / 4) && GEMM_TM == GEMM_TN, "a 4 x 4 sub-tile per thread");
static_assert(GEMM_TM * GEMM_TK == 4 * GEMM_THREADS, "4 staged elements of each operand per thread");

__device__ __forceinline__ void gemm_f32(const float* __restrict__ a, int64_t a_si, int64_t a_sk,
                                         const float* __restrict__ b, int64_t b_sk, int64_t b_sj,
                                         const float* __restrict__ bias, int has_bias, float* __restrict__ c,
                                         int64_t M, int64_t N, int64_t K, int64_t k_slice, int64_t c_slice) {
    __shared__ __align__(16) float as[GEMM_TK][GEMM_TM + GEMM_PAD];
    __shared__ __align__(16) float bs[GEMM_TK][GEMM_TN + GEMM_PAD];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int64_t i0 = (int64_t)blockIdx.x * GEMM_TM, j0 = (int64_t)blockIdx.y * GEMM_TN;
    const int64_t k_begin = (int64_t)blockIdx.z * k_slice;
    const int64_t k_end = min(K, k_begin + k_slice);
    const bool a_k_contiguous = a_sk == 1, b_j_contiguous = b_sj == 1;

    float acc[4][4];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[r][q] = 0.0f;

    for (int64_t k0 = k_begin; k0 < k_end; k0 += GEMM_TK) {
        // 64 x 16 elements of each operand, 4 per thread.
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int e = tid + r * 256;
            int ii, kk;
            if (a_k_contiguous) { kk = e % GEMM_TK; ii = e / GEMM_TK; }
            else { ii = e % GEMM_TM; kk = e / GEMM_TM; }
            const int64_t gi = i0 + ii, gk = k0 + kk;
            as[kk][ii] = (gi < M && gk < k_end) ? a[gi * a_si + gk * a_sk] : 0.0f;
            int jj;
            if (b_j_contiguous) { jj = e % GEMM_TN; kk = e / GEMM_TN; }
            else { kk = e % GEMM_TK; jj = e / GEMM_TK; }
            const int64_t gj = j0 + jj, gk2 = k0 + kk;
            bs[kk][jj] = (gj < N && gk2 < k_end) ? b[gk2 * b_sk + gj * b_sj] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < GEMM_TK; ++kk) {
            const float4 av = *reinterpret_cast<const float4*>(&as[kk][ty * 4]);
            const float4 bv = *reinterpret_cast<const float4*>(&bs[kk][tx * 4]);
            const float ar[4] = {av.x, av.y, av.z, av.w}, br[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int q = 0; q < 4; ++q) acc[r][q] = fmaf(ar[r], br[q], acc[r][q]);
        }
        __syncthreads();
    }

    float* out = c + (int64_t)blockIdx.z * c_slice;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int64_t i = i0 + ty * 4 + r;
        if (i >= M) continue;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int64_t j = j0 + tx * 4 + q;
            if (j < N) out[i * N + j] = acc[r][q] + (has_bias ? bias[j] : 0.0f);
        }
    }
}

// One kernel name per product of a linear layer (the same code), so that a profile says which pass it is timing.
#define LINEAR_GEMM_KERNEL(NAME)                                                                                   \
    extern "C" __global__ void __launch_bounds__(GEMM_THREADS) NAME(const GemmParams p) {                          \
        gemm_f32(p.a, p.a_si, p.a_sk, p.b, p.b_sk, p.b_sj, p.bias, p.bias != nullptr, p.c, p.M, p.N, p.K,          \
                 p.k_slice, p.c_slice);                                                                            \
    }
LINEAR_GEMM_KERNEL(linear_fprop)  // y = x W^T (+ b)
LINEAR_GEMM_KERNEL(linear_dgrad)  // dx = g W
LINEAR_GEMM_KERNEL(linear_wgrad)  // dW = g^T x, split over tokens

// Block (SUM_ROWS_COLS, SUM_ROWS_LANES) = (32, 8): threadIdx.x picks the column, threadIdx.y the row lane; grid
// (ceil(cols / 32), slices).
static_assert(SUM_ROWS_COLS == 32 && SUM_ROWS_LANES == 8, "the lane sums below are written for blocks of (32, 8)");
extern "C" __global__ void __launch_bounds__(SUM_ROWS_COLS * SUM_ROWS_LANES) sum_rows_f32(const SumRowsParams p) {
    const float* __restrict__ x = p.x;
    float* __restrict__ y = p.y;
    const int64_t rows = p.rows, cols = p.cols, ld = p.ld, rows_per_slice = p.rows_per_slice;
    __shared__ float lanes[8][33];
    const int64_t q = (int64_t)blockIdx.x * 32 + threadIdx.x;
    const int64_t r_begin = (int64_t)blockIdx.y * rows_per_slice;
    const int64_t r_end = min(rows, r_begin + rows_per_slice);
    float s = 0.0f;
    if (q < cols)
        for (int64_t r = r_begin + threadIdx.y; r < r_end; r += 8) s += x[r * ld + q];
    lanes[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && q < cols) {
        float t = 0.0f;
#pragma unroll
        for (int l = 0; l < 8; ++l) t += lanes[l][threadIdx.x];
        y[(int64_t)blockIdx.y * cols + q] = t;
    }
}
