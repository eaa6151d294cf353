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
#include "mma.cuh"

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
// The weight gradient writes c_acc (its partial products), the other roles c: the one that is not null.
#define LINEAR_GEMM_KERNEL(NAME)                                                                                   \
    extern "C" __global__ void __launch_bounds__(GEMM_THREADS) NAME(const GemmParams<float> p) {                   \
        gemm_f32(p.a, p.a_si, p.a_sk, p.b, p.b_sk, p.b_sj, p.bias, p.bias != nullptr, p.c_acc ? p.c_acc : p.c,     \
                 p.M, p.N, p.K, p.k_slice, p.c_slice);                                                             \
    }
LINEAR_GEMM_KERNEL(linear_fprop_f32)  // y = x W^T (+ b)
LINEAR_GEMM_KERNEL(linear_dgrad_f32)  // dx = g W
LINEAR_GEMM_KERNEL(linear_wgrad_f32)  // dW = g^T x, split over tokens

namespace {

template <int BN>
using TcShape = mma::Shape<GEMM_TC_BM, BN, GEMM_TC_BK, GEMM_TC_STAGES, 4, 2>;
static_assert(TcShape<GEMM_TC_BN>::THREADS == GEMM_TC_THREADS, "8 warps");

// How a stage's tile of an operand is copied: 16 bytes at a time (16-byte aligned base and rows), for bf16 a pair of
// elements at a time (4-byte aligned base, rows of an even number of elements: x_proj's rows of dt_rank + 2 N = 34,
// its dt slice's rows of 2), else one element at a time.
enum class Copy { Vec16, Pairs, Elements };
template <typename T>
__device__ __forceinline__ Copy copy_mode(const T* base, int64_t ld) {
    const int64_t row_bytes = ld * (int64_t)sizeof(T);
    if (aligned16(base) && row_bytes % 16 == 0) return Copy::Vec16;
    if (sizeof(T) == 2 && ((uintptr_t)base & 3) == 0 && row_bytes % 4 == 0) return Copy::Pairs;
    return Copy::Elements;
}

// Issues the copies of the R x C block at (r0, c0) of a row-major operand of T elements whose rows are ld elements
// apart and of which rows < r_end and columns < c_end exist (the rest is zero-filled), into shared rows of sld
// elements, as `mode` says (c0 and sld are multiples of 16 bytes). Element copies: cp.async for 4-byte elements; a
// plain load and store for bf16, which cp.async cannot copy alone (visible to the block after the pipeline's next
// barrier all the same, but not in flight during the products).
template <int R, int C, int THREADS, typename T>
__device__ __forceinline__ void load_block(T* dst, int sld, const T* src, int64_t ld, int64_t r0, int64_t r_end,
                                           int64_t c0, int64_t c_end, Copy mode) {
    // E elements per copy of B bytes: the first `count` of them from src, the rest zero.
    auto copies = [&](auto per_copy, auto issue) {
        constexpr int E = decltype(per_copy)::value, V = R * C / E;
        static_assert(C % E == 0 && (V % THREADS == 0 || THREADS % V == 0), "whole copies per thread");
#pragma unroll
        for (int i = 0; i < (V + THREADS - 1) / THREADS; ++i) {
            const int e = threadIdx.x + i * THREADS, r = e / (C / E), c = e % (C / E) * E;
            if (V < THREADS && e >= V) break;
            const int64_t gr = r0 + r, gc = c0 + c;
            const int count = gr < r_end ? (int)max((int64_t)0, min((int64_t)E, c_end - gc)) : 0;
            issue(dst + r * sld + c, count > 0 ? src + gr * ld + gc : src, count);
        }
    };
    if (mode == Copy::Vec16) {
        copies(std::integral_constant<int, 16 / (int)sizeof(T)>{},
               [](T* d, const T* s, int count) { mma::cp_async16(d, s, count); });
    } else if (sizeof(T) == 2 && mode == Copy::Pairs) {
        copies(std::integral_constant<int, 2>{},
               [](T* d, const T* s, int count) { mma::cp_async4(d, s, count * (int)sizeof(T)); });
    } else if constexpr (sizeof(T) == 4) {
        copies(std::integral_constant<int, 1>{},
               [](T* d, const T* s, int count) { mma::cp_async4(d, s, count * (int)sizeof(T)); });
    } else {
        copies(std::integral_constant<int, 1>{}, [](T* d, const T* s, int count) { *d = count ? *s : T(0.0f); });
    }
}

// Writes the block's float32 accumulators to out, row-major (M, N) (the weight gradient's partial products): two
// adjacent columns at once where N and out allow, 8-byte pairs that fill whole 32-byte sectors per 4 lanes.
template <class Acc>
__device__ __forceinline__ void store_tile(const Acc& acc, float* out, int64_t i0, int64_t j0, int64_t M, int64_t N) {
    const bool pairs = N % 2 == 0 && ((uintptr_t)out & 7) == 0;
#pragma unroll
    for (int i = 0; i < Acc::MI; ++i)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int64_t row = i0 + Acc::row(i, 2 * half);
            if (row >= M) continue;
#pragma unroll
            for (int j = 0; j < Acc::NI; ++j) {
                const int64_t col = j0 + Acc::col(j, 0);
                const float v0 = acc.v[i][j][2 * half], v1 = acc.v[i][j][2 * half + 1];
                float* at = out + row * N + col;
                if (pairs && col + 1 < N) {
                    *reinterpret_cast<float2*>(at) = make_float2(v0, v1);
                    continue;
                }
                if (col < N) at[0] = v0;
                if (col + 1 < N) at[1] = v1;
            }
        }
}

// The products' outputs (+ bias[j] when given) in the storage type, row-major (M, N): the block's BM x BN accumulators
// staged at `stage` (the pipeline's tiles, free once every warp has finished with them) in rows padded by 16 bytes
// (the fragment pairs of 8 rows then fall on different banks), and written out as whole rows of 16-byte pieces where
// N and out allow. Stored straight
// from the fragments, a bf16 store instruction writes 16 bytes into each of 8 rows: half sectors, which kept L2 at 73%
// of its throughput with DRAM at 31% (ncu, the stage-0 in_proj forward, 2026-12-04).
template <class Acc, int BM, int BN, typename O, typename B>
__device__ __forceinline__ void store_tile_staged(const Acc& acc, unsigned char* stage, O* out, int64_t i0, int64_t j0,
                                                  int64_t M, int64_t N, const B* bias) {
    constexpr int VEC = 16 / sizeof(O), LD = BN + VEC, CHUNKS = BN / VEC;
    O* staged = reinterpret_cast<O*>(stage);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < Acc::MI; ++i)
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
            for (int j = 0; j < Acc::NI; ++j) {
                const int r = Acc::row(i, 2 * half), c = Acc::col(j, 0);
                float v0 = acc.v[i][j][2 * half], v1 = acc.v[i][j][2 * half + 1];
                if (bias) {
                    if (j0 + c < N) v0 += (float)bias[j0 + c];
                    if (j0 + c + 1 < N) v1 += (float)bias[j0 + c + 1];
                }
                staged[r * LD + c] = O(v0);
                staged[r * LD + c + 1] = O(v1);
            }
    __syncthreads();
    const bool vec = (N * (int64_t)sizeof(O)) % 16 == 0 && aligned16(out);
    for (int e = threadIdx.x; e < BM * CHUNKS; e += blockDim.x) {
        const int r = e / CHUNKS, c = e % CHUNKS * VEC;
        const int64_t row = i0 + r, col = j0 + c;
        if (row >= M || col >= N) continue;
        if (vec && col + VEC <= N) {
            *reinterpret_cast<uint4*>(out + row * N + col) = *reinterpret_cast<const uint4*>(&staged[r * LD + c]);
        } else {
            for (int q = 0; q < VEC && col + q < N; ++q) out[row * N + col + q] = staged[r * LD + c + q];
        }
    }
}

// C[z] = sum_{k in slice z} A(i, k) B(k, j) (+ bias[j]) on the tensor cores, operands of type T. A_K_MAJOR: A runs
// along i in memory (a_si = 1, stored [k][i]), else along k (a_sk = 1, [i][k]); B_K_MAJOR: B runs along j (b_sj = 1,
// [k][j]), else along k (b_sk = 1, [j][k]). ACC: write float32 partial products to c_acc (the weight gradient),
// else T to c.
template <typename T, int BN, bool A_K_MAJOR, bool B_K_MAJOR, bool ACC>
__device__ __forceinline__ void gemm_tc(const GemmParams<T>& p) {
    using S = TcShape<BN>;
    using Acc = mma::Acc<S>;
    constexpr int BM = S::BM, BK = S::BK;
    __shared__ __align__(16) mma::Tiles<S, A_K_MAJOR, B_K_MAJOR, T> tiles;
    const int64_t i0 = (int64_t)blockIdx.x * BM, j0 = (int64_t)blockIdx.y * BN;
    const int64_t k_begin = (int64_t)blockIdx.z * p.k_slice, k_end = min(p.K, k_begin + p.k_slice);
    const int64_t a_ld = A_K_MAJOR ? p.a_sk : p.a_si, b_ld = B_K_MAJOR ? p.b_sk : p.b_sj;
    const Copy a_copy = copy_mode(p.a, a_ld), b_copy = copy_mode(p.b, b_ld);

    auto no_table = [](int, int) {};
    auto load = [&](int stage, int slot) {
        const int64_t k0 = k_begin + (int64_t)stage * BK;
        if (A_K_MAJOR)
            load_block<BK, BM, S::THREADS>(tiles.a[slot], tiles.A_LD, p.a, a_ld, k0, k_end, i0, p.M, a_copy);
        else
            load_block<BM, BK, S::THREADS>(tiles.a[slot], tiles.A_LD, p.a, a_ld, i0, p.M, k0, k_end, a_copy);
        if (B_K_MAJOR)
            load_block<BK, BN, S::THREADS>(tiles.b[slot], tiles.B_LD, p.b, b_ld, k0, k_end, j0, p.N, b_copy);
        else
            load_block<BN, BK, S::THREADS>(tiles.b[slot], tiles.B_LD, p.b, b_ld, j0, p.N, k0, k_end, b_copy);
    };
    Acc acc;
    mma::pipeline(tiles, (int)((k_end - k_begin + BK - 1) / BK), no_table, load, acc);

    if constexpr (ACC) {
        float* out = p.c_acc + (int64_t)blockIdx.z * p.c_slice;
        store_tile<Acc>(acc, out, i0, j0, p.M, p.N);
    } else {
        static_assert(sizeof(tiles) >= BM * (BN + 16 / sizeof(T)) * sizeof(T), "the staged tile fits in the stages");
        store_tile_staged<Acc, BM, BN>(acc, reinterpret_cast<unsigned char*>(&tiles), p.c, i0, j0, p.M, p.N, p.bias);
    }
}

}  // namespace

// One name per role and storage type (the storage each role reads fixes the tile layouts), _n32 for at most 32
// output columns. Two blocks per SM: with three copy modes ptxas gave the bf16 products up to 182 registers (one
// block); held to 128, at most 20 bytes spill.
#define LINEAR_TC_KERNEL(NAME, T, BN, A_K_MAJOR, B_K_MAJOR, ACC)                                                  \
    extern "C" __global__ void __launch_bounds__(GEMM_TC_THREADS, 2) NAME(const GemmParams<T> p) {                  \
        gemm_tc<T, BN, A_K_MAJOR, B_K_MAJOR, ACC>(p);                                                            \
    }
LINEAR_TC_KERNEL(linear_fprop_tf32, float, GEMM_TC_BN, false, false, false)  // y = x W^T: x along k, W along k
LINEAR_TC_KERNEL(linear_fprop_tf32_n32, float, GEMM_TC_BN_NARROW, false, false, false)
LINEAR_TC_KERNEL(linear_dgrad_tf32, float, GEMM_TC_BN, false, true, false)  // dx = g W: g along k, W along j
LINEAR_TC_KERNEL(linear_dgrad_tf32_n32, float, GEMM_TC_BN_NARROW, false, true, false)
LINEAR_TC_KERNEL(linear_wgrad_tf32, float, GEMM_TC_BN, true, true, true)  // dW = g^T x: g along i, x along j
LINEAR_TC_KERNEL(linear_wgrad_tf32_n32, float, GEMM_TC_BN_NARROW, true, true, true)
LINEAR_TC_KERNEL(linear_fprop_bf16, __nv_bfloat16, GEMM_TC_BN, false, false, false)
LINEAR_TC_KERNEL(linear_fprop_bf16_n32, __nv_bfloat16, GEMM_TC_BN_NARROW, false, false, false)
LINEAR_TC_KERNEL(linear_dgrad_bf16, __nv_bfloat16, GEMM_TC_BN, false, true, false)
LINEAR_TC_KERNEL(linear_dgrad_bf16_n32, __nv_bfloat16, GEMM_TC_BN_NARROW, false, true, false)
LINEAR_TC_KERNEL(linear_wgrad_bf16, __nv_bfloat16, GEMM_TC_BN, true, true, true)
LINEAR_TC_KERNEL(linear_wgrad_bf16_n32, __nv_bfloat16, GEMM_TC_BN_NARROW, true, true, true)

// The streaming products (linear_fprop_stream_bf16_nBN, linear_dgrad_stream_bf16_nBN): y = x W^T and dx = g W when
// the reduction is short (K <= GEMM_STREAM_MAX_K) and the rows are many (tokens), which makes the product a copy
// with a little arithmetic: about 2 (K + N) bytes per row for 2 K N FLOPs. The tiled products above then wait on
// memory with little of it in flight: a block loads its whole reduction (two stages at K = 32), multiplies, stores,
// and only then loads again (in_proj's products moved 0.96 TB/s inside the flare-3d step on the H200, `profile`
// 2026-12-05; 1.65 TB/s alone in the kernels bench, of the card's 4.8). Here a block keeps
// its BN columns of W in shared memory for its whole life and walks row tiles i = blockIdx.x, + gridDim.x, ...
// (gridDim.x is what the GPU holds at once, gridDim.y = ceil(N / BN)), GEMM_STREAM_STAGES - 1 tiles of A ahead by
// cp.async while it multiplies and stores the current one:
//
//   C[i, j] = sum_{k < K} A(i, k) B(k, j) (+ bias[j]),   A(i, k) = a[i a_si + k] (rows in 16-byte pieces or pairs),
//   B(k, j) = b[k b_sk + j b_sj]: fprop W[j, k] (b_sk = 1, stored [j][k]), dgrad W[k, j] (b_sj = 1, stored [k][j]).
//
// Tile: GEMM_STREAM_BM = 64 rows, warp w of 4 owns rows 16 w .. 16 w + 15 and all BN columns (BN / 8 m16n8k16
// accumulators). K is padded to KP = ceil(K / 16) 16 with zeros. Shared memory (dynamic, bf16 elements; rows padded
// by 16 bytes so that ldmatrix's 8 rows fall in 8 bank groups): the A ring [STAGES][BM][KP + 8], B as [BN][KP + 8]
// (fprop) or [KP][BN + 8] (dgrad), and each warp's output rows [16][BN + 8], written from the fragments and then
// copied out as whole 16-byte pieces of rows. The host sizes it with the same formula (linear.rs,
// `stream_shared_bytes`); a launch with less traps.
//
// Channels first (CF; conv_*_pointwise_bf16_nBN, the 1x1x1 convolutions of (N, C, positions) maps): the rows are the
// positions of batch item b, A(i, k) = a[b a_sb + k a_sk + i] and C(i, j) = c[b c_sb + j M + i], so a row tile of A is
// K rows of 64 consecutive positions, copied into [KP][BM + 8] and read by ldmatrix.trans, and each warp stages its
// output as columns [BN][16 + 8], stored as two 16-byte pieces of each of C's rows. Row tiles are per item (M is a
// multiple of 8 and C 16-byte aligned, the host's rule: a launch that breaks it traps); the fragments and the ring
// are the same.
namespace {

// Copies rows [r0, r0 + rows) x columns [0, cols) (cols a multiple of 8) of a row-major bf16 operand whose rows are
// ld elements apart, rows >= r_end and columns >= c_end read as zero, into shared rows of sld elements: by cp.async
// (in flight until the caller waits) in 16-byte pieces (mode Vec16) or pairs of elements (Pairs: x_proj's rows of
// 34, dt's of 2), else element by element (plain loads, visible after the caller's next barrier).
__device__ __forceinline__ void copy_rows_bf16(__nv_bfloat16* dst, int sld, const __nv_bfloat16* src, int64_t ld,
                                               int64_t r0, int rows, int64_t r_end, int cols, int64_t c_end,
                                               Copy mode) {
    if (mode == Copy::Elements) {
        for (int e = threadIdx.x; e < rows * cols; e += blockDim.x) {
            const int r = e / cols, c = e % cols;
            const int64_t gr = r0 + r;
            dst[r * sld + c] = gr < r_end && c < c_end ? src[gr * ld + c] : __float2bfloat16(0.0f);
        }
        return;
    }
    const int width = mode == Copy::Vec16 ? 8 : 2, pieces = cols / width;
    for (int e = threadIdx.x; e < rows * pieces; e += blockDim.x) {
        const int r = e / pieces, c = e % pieces * width;
        const int64_t gr = r0 + r;
        const int count = gr < r_end ? (int)max((int64_t)0, min((int64_t)width, c_end - c)) : 0;
        const __nv_bfloat16* from = count > 0 ? src + gr * ld + c : src;
        if (width == 8)
            mma::cp_async16(dst + r * sld + c, from, count);
        else
            mma::cp_async4(dst + r * sld + c, from, 2 * count);
    }
}

// The token-tile loop of the streaming products: tiles blockIdx.x, + gridDim.x, ... below `tiles`. load(it) issues
// tile it's copies into ring slot it % GEMM_STREAM_STAGES as one cp.async group (an empty group past the last tile),
// GEMM_STREAM_STAGES - 1 iterations ahead of body(it), which reads that slot. The barrier before each body publishes
// its tile and frees the slot the next load overwrites (the previous body's).
template <typename Load, typename Body>
__device__ __forceinline__ void stream_tiles(int64_t tiles, Load load, Body body) {
    constexpr int STAGES = GEMM_STREAM_STAGES;
#pragma unroll
    for (int it = 0; it < STAGES - 1; ++it) load(it);
    for (int64_t it = 0; blockIdx.x + it * gridDim.x < tiles; ++it) {
        mma::cp_async_wait<STAGES - 2>();
        __syncthreads();
        load(it + STAGES - 1);
        body(it);
    }
    mma::cp_async_wait<0>();
}

// The calling warp's 16 rows x BN columns of a streaming tile: acc[j] += A B over the reduction [0, KP) (a multiple
// of 16), A the tile's rows 16 warp .. + 15 (at, rows ALD apart; CF: k-major, [KP][ALD]), B the block's columns of W
// (bs, [BN][BLD] or, B_K_MAJOR, [KP][BLD]). acc[j][h]: row g + 8 (h / 2), column 8 j + 2 tq + h % 2.
template <int BN, bool B_K_MAJOR, bool CF>
__device__ __forceinline__ void stream_rows_mma(const __nv_bfloat16* at, int ALD, const __nv_bfloat16* bs, int BLD, int KP,
                                                float (&acc)[BN / 8][4]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, r8 = lane & 7, mat = lane >> 3;
    for (int k0 = 0; k0 < KP; k0 += 16) {
        // Matrix m of the x4: rows 16 warp + 8 (m % 2) .. + 7, reduction indices k0 + 8 (m / 2) .. + 7.
        unsigned a[4];
        if constexpr (CF)
            mma::ldmatrix_x4<true>(a, at + (k0 + 8 * (mat >> 1) + r8) * ALD + warp * 16 + 8 * (mat & 1));
        else
            mma::ldmatrix_x4<false>(a, at + (warp * 16 + r8 + 8 * (mat & 1)) * ALD + k0 + 8 * (mat >> 1));
#pragma unroll
        for (int j = 0; j < BN / 8; j += 2) {
            // Matrix m of the x4: n-tile j + m / 2, reduction indices k0 + 8 (m % 2) .. + 7.
            unsigned b[4];
            const int n = 8 * (j + (mat >> 1)), k = k0 + 8 * (mat & 1);
            if constexpr (B_K_MAJOR)
                mma::ldmatrix_x4<true>(b, bs + (k + r8) * BLD + n);
            else
                mma::ldmatrix_x4<false>(b, bs + (n + r8) * BLD + k);
            mma::mma_bf16(acc[j], a, b[0], b[1]);
            mma::mma_bf16(acc[j + 1], a, b[2], b[3]);
        }
    }
}

// Stores the calling warp's rows of stream_rows_mma (+ bias[j]) into C's rows row0 .. row0 + 15 (below M), columns
// j0 .. j0 + BN - 1 (below N), rows ldc apart: through the warp's staging rows out_rows ([16][BN + 8]) as whole
// 16-byte pieces where `vec` (C 16-byte aligned, ldc and j0 multiples of 8), else element by element.
template <int BN>
__device__ __forceinline__ void stream_store_rows(const float (&acc)[BN / 8][4], const float (&bias)[BN / 8][2],
                                                  __nv_bfloat16* out_rows, __nv_bfloat16* c, int64_t ldc, int64_t row0,
                                                  int64_t M, int64_t N, int64_t j0, bool vec) {
    constexpr int OLD = BN + 8, PIECES = BN / 8;
    const int lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int h = 0; h < 4; h += 2) {
            const int r = g + 4 * h, col = 8 * j + 2 * tq;
            *reinterpret_cast<__nv_bfloat162*>(out_rows + r * OLD + col) =
                __floats2bfloat162_rn(acc[j][h] + bias[j][0], acc[j][h + 1] + bias[j][1]);
        }
    __syncwarp();
    for (int e = lane; e < 16 * PIECES; e += 32) {
        const int r = e / PIECES, cc = e % PIECES * 8;
        const int64_t row = row0 + r, col = j0 + cc;
        if (row >= M || col >= N) continue;
        __nv_bfloat16* dst = c + row * ldc + col;
        const __nv_bfloat16* src = out_rows + r * OLD + cc;
        if (vec && col + 8 <= N) {
            *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
        } else {
            for (int q = 0; q < 8 && col + q < N; ++q) dst[q] = src[q];
        }
    }
    __syncwarp();  // the rows are read before the next tile writes them
}

template <int BN, bool B_K_MAJOR, bool CF>
__device__ __forceinline__ void gemm_stream_bf16(const GemmParams<__nv_bfloat16>& p) {
    using bf16 = __nv_bfloat16;
    constexpr int BM = GEMM_STREAM_BM, STAGES = GEMM_STREAM_STAGES, NT = BN / 8;
    static_assert(GEMM_STREAM_THREADS == 32 * (BM / 16) && BN % 16 == 0, "a warp per 16 rows, n-tiles in pairs");
    // CF (channels first): A's tiles k-major [KP][BM + 8], the output staged as columns [BN][16 + 8] per warp.
    const int KP = (int)(p.K + 15) / 16 * 16, ALD = CF ? BM + 8 : KP + 8, BLD = B_K_MAJOR ? BN + 8 : KP + 8;
    constexpr int OLD = CF ? 16 + 8 : BN + 8, OUT = CF ? BN : 16;
    extern __shared__ __align__(16) unsigned char stream_smem[];
    bf16* as = reinterpret_cast<bf16*>(stream_smem);   // [STAGES][BM][ALD] or [STAGES][KP][ALD]
    const int a_size = (CF ? KP : BM) * ALD;
    bf16* bs = as + STAGES * a_size;                    // [BN][BLD] or [KP][BLD]
    bf16* os = bs + (B_K_MAJOR ? KP : BN) * BLD;        // [warps][16][OLD] or [warps][BN][OLD]
    unsigned smem_bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(smem_bytes));
    if ((size_t)(os + (BM / 16) * OUT * OLD) - (size_t)stream_smem > smem_bytes || p.K > GEMM_STREAM_MAX_K) __trap();
    // CF: every channel of every item is whole 16-byte pieces (the host's rule), so C is stored by pieces only.
    if (CF && (p.M % 8 != 0 || p.c_sb % 8 != 0 || !aligned16(p.c))) __trap();

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
    // Row tiles: per item (CF: batch items of M rows, tiles never straddle two) ceil(M / BM) of them.
    const int64_t j0 = (int64_t)blockIdx.y * BN, item_tiles = (p.M + BM - 1) / BM;
    const int64_t tiles = item_tiles * (CF ? p.batch : 1);
    if (B_K_MAJOR)
        copy_rows_bf16(bs, BLD, p.b + j0, p.b_sk, 0, KP, p.K, BN, p.N - j0, copy_mode(p.b + j0, p.b_sk));
    else
        copy_rows_bf16(bs, BLD, p.b + j0 * p.b_sj, p.b_sj, 0, BN, p.N - j0, KP, p.K,
                       copy_mode(p.b + j0 * p.b_sj, p.b_sj));
    const Copy a_mode = copy_mode(p.a, CF ? p.a_sk : p.a_si);  // Vec16 or Pairs: the host routes no other
    auto load_a = [&](int64_t it) {
        const int64_t tile = blockIdx.x + it * gridDim.x;
        bf16* dst = as + (it % STAGES) * a_size;
        if (tile < tiles) {
            if constexpr (CF) {
                const int64_t item = tile / item_tiles, i0 = tile % item_tiles * BM;
                copy_rows_bf16(dst, ALD, p.a + item * p.a_sb + i0, p.a_sk, 0, KP, p.K, BM, p.M - i0, a_mode);
            } else {
                copy_rows_bf16(dst, ALD, p.a, p.a_si, tile * BM, BM, p.M, KP, p.K, a_mode);
            }
        }
        mma::cp_async_commit();
    };

    float bias[NT][2];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int64_t col = j0 + 8 * j + 2 * tq + h;
            bias[j][h] = p.bias && col < p.N ? __bfloat162float(p.bias[col]) : 0.0f;
        }
    bf16* out_rows = os + warp * OUT * OLD;
    const bool vec_out = (p.N * 2) % 16 == 0 && aligned16(p.c) && j0 % 8 == 0;  // rows of C (not CF)

    stream_tiles(tiles, load_a, [&](int64_t it) {
        const bf16* at = as + (it % STAGES) * a_size;
        float acc[NT][4] = {};
        stream_rows_mma<BN, B_K_MAJOR, CF>(at, ALD, bs, BLD, KP, acc);
        const int64_t tile = blockIdx.x + it * gridDim.x;
        if constexpr (CF) {
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int h = 0; h < 4; h += 2) {
                    const int r = g + 4 * h, c = 8 * j + 2 * tq;
                    out_rows[c * OLD + r] = __float2bfloat16(acc[j][h] + bias[j][0]);
                    out_rows[(c + 1) * OLD + r] = __float2bfloat16(acc[j][h + 1] + bias[j][1]);
                }
            __syncwarp();
            // Column j of the warp's rows: 16 positions, two 16-byte pieces of C's row j.
            const int64_t item = tile / item_tiles, row0 = tile % item_tiles * BM + warp * 16;
            for (int e = lane; e < 2 * BN; e += 32) {
                const int c = e / 2, r = e % 2 * 8;
                const int64_t row = row0 + r, col = j0 + c;
                if (row >= p.M || col >= p.N) continue;
                *reinterpret_cast<uint4*>(p.c + item * p.c_sb + col * p.M + row) =
                    *reinterpret_cast<const uint4*>(out_rows + c * OLD + r);
            }
            __syncwarp();  // the rows are read before the next tile writes them
        } else {
            stream_store_rows<BN>(acc, bias, out_rows, p.c, p.N, tile * BM + warp * 16, p.M, p.N, j0, vec_out);
        }
    });
}

// The weight gradient dW = g^T x of the same layers, streamed the same way: C[i, j] = sum_k A(i, k) B(k, j) with the
// reduction over the tokens k, A(i, k) = g[k, i] (a_si = 1, rows a_sk apart), B(k, j) = x[k, j] (b_sj = 1, rows b_sk
// apart), both rows whole 16-byte pieces or pairs. Block (s, t): dW tile t (BMW x BNW, of ceil(M / BMW) x
// ceil(N / BNW), row major), token tiles s, s + gridDim.x, ... of GEMM_STREAM_BM tokens each, GEMM_STREAM_STAGES - 1
// of them in flight; its float32 sums go to c_acc + s c_slice (row-major (M, N)), which sum_rows_f32 then adds in
// slice order (no atomics: the same bits on every run). Warps 2 x 2 over the tile, both operands read by
// ldmatrix.trans from their token-major tiles [GEMM_STREAM_BM][BMW + 8] and [GEMM_STREAM_BM][BNW + 8] (dynamic shared
// memory, the ring of both; `stream_wgrad_shared_bytes` in linear.rs).
// acc += A B over one token tile of GEMM_STREAM_BM tokens: A(i, t) = at[t ALD + i] (g's tile, token-major), B(t, j) =
// bt[t BLD + j] (x's tile), both read by ldmatrix.trans; warps 2 x 2 over the BMW x BNW tile of Acc.
template <typename Acc>
__device__ __forceinline__ void stream_wgrad_mma(const __nv_bfloat16* at, int ALD, const __nv_bfloat16* bt, int BLD,
                                                 Acc& acc) {
    const int lane = threadIdx.x & 31, r8 = lane & 7, mat = lane >> 3;
    const int wm = (threadIdx.x >> 5) % 2 * Acc::WTM, wn = (threadIdx.x >> 5) / 2 * Acc::WTN;
#pragma unroll
    for (int k0 = 0; k0 < GEMM_STREAM_BM; k0 += 16) {
        // A (x4, transposed): matrix m holds dW rows wm + 16 i + 8 (m % 2) .. + 7, tokens k0 + 8 (m / 2) .. + 7;
        // B (x4, transposed): n-tile j + m / 2, tokens k0 + 8 (m % 2) .. + 7.
        unsigned a[Acc::MI][4], b[Acc::NI][2];
#pragma unroll
        for (int i = 0; i < Acc::MI; ++i)
            mma::ldmatrix_x4<true>(a[i], at + (k0 + 8 * (mat >> 1) + r8) * ALD + wm + 16 * i + 8 * (mat & 1));
#pragma unroll
        for (int j = 0; j < Acc::NI; j += 2) {
            unsigned q[4];
            mma::ldmatrix_x4<true>(q, bt + (k0 + 8 * (mat & 1) + r8) * BLD + wn + 8 * (j + (mat >> 1)));
            b[j][0] = q[0];
            b[j][1] = q[1];
            b[j + 1][0] = q[2];
            b[j + 1][1] = q[3];
        }
#pragma unroll
        for (int i = 0; i < Acc::MI; ++i)
#pragma unroll
            for (int j = 0; j < Acc::NI; ++j) mma::mma_bf16(acc.v[i][j], a[i], b[j][0], b[j][1]);
    }
}

template <int BMW, int BNW>
__device__ __forceinline__ void gemm_wgrad_stream_bf16(const GemmParams<__nv_bfloat16>& p) {
    using bf16 = __nv_bfloat16;
    using S = mma::Shape<BMW, BNW, 16, GEMM_STREAM_STAGES, 2, 2>;
    using Acc = mma::Acc<S>;
    constexpr int BK = GEMM_STREAM_BM, STAGES = GEMM_STREAM_STAGES, ALD = BMW + 8, BLD = BNW + 8;
    static_assert(S::THREADS == GEMM_STREAM_THREADS && Acc::NI % 2 == 0, "4 warps, n-tiles in pairs");
    extern __shared__ __align__(16) unsigned char stream_smem[];
    bf16* as = reinterpret_cast<bf16*>(stream_smem);  // [STAGES][BK][ALD]
    bf16* bs = as + STAGES * BK * ALD;                 // [STAGES][BK][BLD]
    unsigned smem_bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(smem_bytes));
    if (sizeof(bf16) * STAGES * BK * (ALD + BLD) > smem_bytes) __trap();

    const int64_t tiles_n = (p.N + BNW - 1) / BNW;
    const int64_t i0 = blockIdx.y / tiles_n * BMW, j0 = blockIdx.y % tiles_n * BNW;
    const int64_t tiles = (p.K + BK - 1) / BK;
    const Copy a_mode = copy_mode(p.a, p.a_sk), b_mode = copy_mode(p.b, p.b_sk);  // Vec16 or Pairs, as routed
    auto load = [&](int64_t it) {
        const int64_t tile = blockIdx.x + it * gridDim.x;
        if (tile < tiles) {
            const int slot = (int)(it % STAGES);
            copy_rows_bf16(as + slot * BK * ALD, ALD, p.a + i0, p.a_sk, tile * BK, BK, p.K, BMW, p.M - i0, a_mode);
            copy_rows_bf16(bs + slot * BK * BLD, BLD, p.b + j0, p.b_sk, tile * BK, BK, p.K, BNW, p.N - j0, b_mode);
        }
        mma::cp_async_commit();
    };

    Acc acc;
    stream_tiles(tiles, load, [&](int64_t it) {
        stream_wgrad_mma(as + (it % STAGES) * BK * ALD, ALD, bs + (it % STAGES) * BK * BLD, BLD, acc);
    });
    store_tile<Acc>(acc, p.c_acc + (int64_t)blockIdx.x * p.c_slice, i0, j0, p.M, p.N);
}

// The fused backward of LinearBackwardParams (gemm.cuh): the input gradient of gemm_stream_bf16<BK, true, false> and
// the weight gradient of gemm_wgrad_stream_bf16<BMW, BK> from the same tiles, so g is read once instead of twice (an
// in_proj of 32 -> 128 channels moves 384 bytes per token instead of 640). A block keeps W ([BMW][BK + 8], rows j,
// zero past N: the input gradient's B) for its life and walks the token tiles s = blockIdx.x, + gridDim.x, ...,
// GEMM_STREAM_STAGES - 1 tiles of g ([BM][BMW + 8]) and x ([BM][BK + 8]) ahead; per tile each warp stores its 16 rows
// of dx (stream_rows_mma over the reduction j < KP = ceil(N / 16) 16) and adds the tile's g^T x into the block's dW
// (stream_wgrad_mma, warps 2 x 2), written at the end as slice s. The same fragments in the same order as the two
// separate products: the same bits. Shared memory (bf16 elements): the two rings, W, then the warps' staging rows
// [4][16][BK + 8] (`backward_stream_shared_bytes` in linear.rs); a launch with less traps.
template <int BK, int BMW>
__device__ __forceinline__ void linear_backward_stream_bf16(const LinearBackwardParams<__nv_bfloat16>& p) {
    using bf16 = __nv_bfloat16;
    using S = mma::Shape<BMW, BK, 16, GEMM_STREAM_STAGES, 2, 2>;
    using Acc = mma::Acc<S>;
    constexpr int BM = GEMM_STREAM_BM, STAGES = GEMM_STREAM_STAGES, GLD = BMW + 8, XLD = BK + 8, WLD = BK + 8;
    static_assert(S::THREADS == GEMM_STREAM_THREADS && Acc::NI % 2 == 0 && BMW <= GEMM_STREAM_MAX_K, "as the parts");
    extern __shared__ __align__(16) unsigned char stream_smem[];
    bf16* gs = reinterpret_cast<bf16*>(stream_smem);  // [STAGES][BM][GLD]
    bf16* xs = gs + STAGES * BM * GLD;                 // [STAGES][BM][XLD]
    bf16* ws = xs + STAGES * BM * XLD;                 // [BMW][WLD]
    bf16* os = ws + BMW * WLD;                         // [warps][16][WLD]
    unsigned smem_bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(smem_bytes));
    if ((size_t)(os + (BM / 16) * 16 * WLD) - (size_t)stream_smem > smem_bytes || p.N > BMW || p.K > BK) __trap();

    const int KP = (int)(p.N + 15) / 16 * 16;
    copy_rows_bf16(ws, WLD, p.w, p.K, 0, KP, p.N, BK, p.K, copy_mode(p.w, p.K));
    const int64_t tiles = (p.M + BM - 1) / BM;
    const Copy g_mode = copy_mode(p.g, p.g_ld), x_mode = copy_mode(p.x, p.x_ld);  // Vec16 or Pairs, as routed
    auto load = [&](int64_t it) {
        const int64_t tile = blockIdx.x + it * gridDim.x;
        if (tile < tiles) {
            const int slot = (int)(it % STAGES);
            copy_rows_bf16(gs + slot * BM * GLD, GLD, p.g, p.g_ld, tile * BM, BM, p.M, BMW, p.N, g_mode);
            copy_rows_bf16(xs + slot * BM * XLD, XLD, p.x, p.x_ld, tile * BM, BM, p.M, BK, p.K, x_mode);
        }
        mma::cp_async_commit();
    };
    const float no_bias[BK / 8][2] = {};
    const int warp = threadIdx.x >> 5;
    const bool vec_dx = p.K % 8 == 0 && aligned16(p.dx);
    Acc dw;
    stream_tiles(tiles, load, [&](int64_t it) {
        const bf16* gt = gs + (it % STAGES) * BM * GLD;
        float acc[BK / 8][4] = {};
        stream_rows_mma<BK, true, false>(gt, GLD, ws, WLD, KP, acc);
        const int64_t row0 = (blockIdx.x + it * gridDim.x) * BM + warp * 16;
        stream_store_rows<BK>(acc, no_bias, os + warp * 16 * WLD, p.dx, p.K, row0, p.M, p.K, 0, vec_dx);
        stream_wgrad_mma(gt, GLD, xs + (it % STAGES) * BM * XLD, XLD, dw);
    });
    store_tile<Acc>(dw, p.dw_acc + (int64_t)blockIdx.x * p.dw_slice, 0, 0, p.N, p.K);
}

}  // namespace

#define GEMM_STREAM_KERNEL(NAME, BN, B_K_MAJOR, CF)                                                               \
    extern "C" __global__ void __launch_bounds__(GEMM_STREAM_THREADS) NAME(const GemmParams<__nv_bfloat16> p) { \
        gemm_stream_bf16<BN, B_K_MAJOR, CF>(p);                                                                \
    }
GEMM_STREAM_KERNEL(linear_fprop_stream_bf16_n32, 32, false, false)  // y = x W^T: W stored [j][k]
GEMM_STREAM_KERNEL(linear_fprop_stream_bf16_n64, 64, false, false)
GEMM_STREAM_KERNEL(linear_fprop_stream_bf16_n128, 128, false, false)
GEMM_STREAM_KERNEL(linear_dgrad_stream_bf16_n32, 32, true, false)  // dx = g W: W stored [k][j]
GEMM_STREAM_KERNEL(linear_dgrad_stream_bf16_n64, 64, true, false)
GEMM_STREAM_KERNEL(linear_dgrad_stream_bf16_n128, 128, true, false)
GEMM_STREAM_KERNEL(conv_fprop_pointwise_bf16_n32, 32, false, true)  // y = W x: W stored [j][k]
GEMM_STREAM_KERNEL(conv_fprop_pointwise_bf16_n64, 64, false, true)
GEMM_STREAM_KERNEL(conv_fprop_pointwise_bf16_n128, 128, false, true)
GEMM_STREAM_KERNEL(conv_dgrad_pointwise_bf16_n32, 32, true, true)  // dx = W^T g: W stored [k][j]
GEMM_STREAM_KERNEL(conv_dgrad_pointwise_bf16_n64, 64, true, true)
GEMM_STREAM_KERNEL(conv_dgrad_pointwise_bf16_n128, 128, true, true)
GEMM_STREAM_KERNEL(conv_transpose_fprop_pointwise_bf16_n32, 32, true, true)  // z = W^T x: W stored [k][j]
GEMM_STREAM_KERNEL(conv_transpose_fprop_pointwise_bf16_n64, 64, true, true)
GEMM_STREAM_KERNEL(conv_transpose_fprop_pointwise_bf16_n128, 128, true, true)
#define LINEAR_WGRAD_STREAM_KERNEL(NAME, BMW, BNW)                                                                \
    extern "C" __global__ void __launch_bounds__(GEMM_STREAM_THREADS) NAME(const GemmParams<__nv_bfloat16> p) { \
        gemm_wgrad_stream_bf16<BMW, BNW>(p);                                                                   \
    }
LINEAR_WGRAD_STREAM_KERNEL(linear_wgrad_stream_bf16_m32_n32, 32, 32)  // dW = g^T x, dW tiles of BMW x BNW
LINEAR_WGRAD_STREAM_KERNEL(linear_wgrad_stream_bf16_m32_n64, 32, 64)
LINEAR_WGRAD_STREAM_KERNEL(linear_wgrad_stream_bf16_m64_n32, 64, 32)
LINEAR_WGRAD_STREAM_KERNEL(linear_wgrad_stream_bf16_m64_n64, 64, 64)
LINEAR_WGRAD_STREAM_KERNEL(linear_wgrad_stream_bf16_m128_n32, 128, 32)
LINEAR_WGRAD_STREAM_KERNEL(linear_wgrad_stream_bf16_m128_n64, 128, 64)
#define LINEAR_BACKWARD_STREAM_KERNEL(NAME, BK, BMW)                                                        \
    extern "C" __global__ void __launch_bounds__(GEMM_STREAM_THREADS)                                       \
        NAME(const LinearBackwardParams<__nv_bfloat16> p) {                                                 \
        linear_backward_stream_bf16<BK, BMW>(p);                                                            \
    }
LINEAR_BACKWARD_STREAM_KERNEL(linear_backward_stream_bf16_k32_m32, 32, 32)  // K <= 32 inputs, N <= 32 outputs
LINEAR_BACKWARD_STREAM_KERNEL(linear_backward_stream_bf16_k32_m64, 32, 64)
LINEAR_BACKWARD_STREAM_KERNEL(linear_backward_stream_bf16_k32_m128, 32, 128)
LINEAR_BACKWARD_STREAM_KERNEL(linear_backward_stream_bf16_k64_m32, 64, 32)
LINEAR_BACKWARD_STREAM_KERNEL(linear_backward_stream_bf16_k64_m64, 64, 64)
LINEAR_BACKWARD_STREAM_KERNEL(linear_backward_stream_bf16_k64_m128, 64, 128)

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
