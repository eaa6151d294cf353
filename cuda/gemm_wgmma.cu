// Explicit matrix products on Hopper's warpgroup matrix products (wgmma, sm_90a), bf16 operands, float32 sums:
//
//   C[z, m, n] = sum_{(i, k) in slice z} A[i, m, k] B[i, n, k]   (i a batch item),
//
// both operands row-major along the reduction (every row of A and of B a contiguous run of k). Where a convolution's
// map is small and its channels many (the deep stages: 320 channels on 10 x 14 x 12 positions), the implicit
// products of conv_wgmma.cu have few positions to share out and many channel tiles, each reloading the map; written
// out as columns once (conv.cu's conv_im2col_bf16), the weight gradient is this one product with long rows on both
// sides, dW[cn, (cw, a)] = sum_o narrow[cn, o] col[(cw, a), o]. The forward and input gradient of such convs from
// 512 channels on small 2D maps are the same product the other way round, over the source map's rows (conv.cu's
// conv_im2row_bf16): out[c', (n, o)] = sum_{(c, a)} W'[c', (c, a)] rows[(n, o), (c, a)] (conv_fprop_gemm_wgmma_bf16,
// conv_dgrad_gemm_wgmma_bf16 with the weight flipped; one slice). The 1x1x1 convolutions of more than 128 channels
// are such products straight over the channels-first maps, D[j, i] = sum_k W(k, j) X[k, i] per batch item
// (conv_pointwise): a map's rows run along the positions, so they are staged MN-major (64 positions per 128-byte row,
// wgmma's transpose immediate) rather than copied channels-last first.
// - A block computes a 128 x BN tile of C, BN 128 or 256 (the _n256 kernels): warpgroup g of its two the rows 64 g ..
//   64 g + 63, one wgmma m64nBNk16 per 16 reduction indices (BN / 2 float32 accumulators per thread). Both operands
//   come from L2 once per tile, so the tile's bytes per multiply-add set the speed: ncu of the 128 x 128 tile
//   (2026-12-06, H100, amos-2d 512 -> 512 at 20x20) had its warps waiting on the cp.async copies most of the time at
//   2.7 TB/s from L2, and the implicit products at 2.4 TB/s; 128 x 256 moves a quarter fewer bytes per multiply-add,
//   in half as many blocks (the host picks the width that finishes first: conv.rs's widest_pays).
// - Each stage holds 64 reduction indices of the A and B rows, one 128-byte row per operand row, in the K-major layout
//   with the 128-byte swizzle (wgmma.cuh's descriptor_sw128: piece j of row r at piece j ^ (r % 8)); the unswizzled
//   layout of core matrices ran these products at 80-90 TFLOP/s on the H100 (2026-12-06: 512 x 20x20 weight gradient
//   0.263 ms, cuDNN 0.157), the tensor cores' reads of 8 rows' 16 bytes at a time meeting the same banks. A thread
//   copies four 16-byte pieces per operand and stage by cp.async: 8 consecutive threads read one row's 128 contiguous
//   bytes.
// - Four stages: the copies run two stages ahead of the products, and the products of one stage run while the next
//   is issued (wgmma.wait_group 1). A stage's slot is refilled two iterations after its products were issued: each
//   warpgroup has by then waited for them, and the barrier between says so for both.
// - Rows past M or N and reduction indices past an item's K are copied as zeros (cp.async with fewer source bytes),
//   so any M, N and K work; the products of those zeros are not written out.
// Every output is one sum in a fixed order (k-steps in order, the tensor core's own within one): results do not
// depend on scheduling.
//
// Cost: 2 K FLOPs per element of C; bytes A and B once per tile column and row (ceil(N / BN) and ceil(M / 128)
// times, much of it from L2), C once as float32.
#include "common.cuh"
#include "gemm.cuh"
#include "gemm_wgmma.cuh"
#include "mma.cuh"
#include "wgmma.cuh"

namespace {

constexpr int THREADS = GEMM_WGMMA_THREADS, BM = GEMM_WGMMA_BM, BK = GEMM_WGMMA_BK;
constexpr int STAGES = GEMM_WGMMA_STAGES;
static_assert(THREADS == 256 && BM == 128, "two warpgroups of 64 rows");
static_assert(BK == 64 && STAGES >= 3, "one 128-byte swizzled row per operand row; a slot refilled two iterations "
                                       "after its products");
constexpr int ROW = BK * 2;      // bytes of a staged row
constexpr int ATOM = 8 * ROW;    // bytes of 8 rows: the swizzle's period and the stride byte offset
constexpr int A_BYTES = BM * BK * 2;
template <int BN>
constexpr int STAGE_BYTES = (BM + BN) * BK * 2;
// A thread's 16-byte pieces of a stage's operand of R rows: piece e = threadIdx.x + THREADS i is row e / PIECES_PER_ROW,
// piece kg = e % PIECES_PER_ROW of it (the same kg for every i: THREADS is a multiple of PIECES_PER_ROW).
constexpr int PIECES_PER_ROW = BK / 8;
static_assert(THREADS % PIECES_PER_ROW == 0, "a thread's pieces share their place in the row");

using bf16 = __nv_bfloat16;

// Where a staged 16-byte piece comes from: `count` elements at src (0 to 8), the rest zero-filled.
struct Piece {
    const bf16* src;
    int count;
};

// Issues the cp.async copies of a stage's R operand rows into the layout at dst: the thread's piece i (row r, piece
// kg) from at(i, r, kg).
template <int R, class At>
__device__ __forceinline__ void load_pieces(unsigned char* dst, At at) {
    constexpr int PIECES = R * PIECES_PER_ROW;
    static_assert(PIECES % THREADS == 0, "whole 16-byte pieces per thread");
#pragma unroll
    for (int i = 0; i < PIECES / THREADS; ++i) {
        const int e = threadIdx.x + THREADS * i, r = e / PIECES_PER_ROW, kg = e % PIECES_PER_ROW;
        const Piece piece = at(i, r, kg);
        mma::cp_async16(reinterpret_cast<bf16*>(dst + r * ROW + (kg ^ (r % 8)) * 16), piece.src, piece.count);
    }
}

// The descriptor of k-step ks of an operand staged at `at` by load_pieces: K-major (each 128-byte row an operand row,
// 64 k), the k-step 32 bytes along the rows; MN-major (each row 64 consecutive m or n of one k, blocks of 64 rows for
// the next 64 m or n), the k-step 16 rows further.
template <bool MN>
__device__ __forceinline__ uint64_t operand(uint32_t at, int ks) {
    return MN ? wgmma::descriptor_sw128(at + 2 * ATOM * ks, ATOM, BK * ROW) : wgmma::descriptor_sw128(at + 32 * ks, ATOM);
}

// The products of one block's tile over `steps` k-steps: stage_in(step, slot) issues the cp.async copies of step's
// BM x BK of A (at slot) and BN x BK of B (at slot + A_BYTES) through load_pieces, K-major or (A_MN, B_MN) MN-major,
// called once per step, in order; d receives the warpgroup's 64 x BN sums.
template <int BN, bool A_MN = false, bool B_MN = false, class StageIn>
__device__ __forceinline__ void pipeline(int steps, StageIn stage_in, float (&d)[BN / 2]) {
    extern __shared__ __align__(1024) unsigned char smem[];
    const int group = threadIdx.x / 128;
    // One commit group per call (empty past the last step) keeps the count uniform.
    auto load = [&](int step) {
        if (step < steps) stage_in(step, smem + step % STAGES * STAGE_BYTES<BN>);
        mma::cp_async_commit();
    };
#pragma unroll
    for (int step = 0; step < STAGES - 2; ++step) load(step);
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) d[i] = 0.0f;
    const uint32_t base = (uint32_t)__cvta_generic_to_shared(smem);
    for (int step = 0; step < steps; ++step) {
        mma::cp_async_wait<STAGES - 3>();
        wgmma::fence_proxy_async();
        __syncthreads();
        load(step + STAGES - 2);
        const uint32_t at = base + step % STAGES * STAGE_BYTES<BN>;
        const uint32_t a_at = at + group * 64 * ROW, b_at = at + A_BYTES;
        wgmma::fence();
#pragma unroll
        for (int ks = 0; ks < BK / 16; ++ks)
            wgmma::mma_async<BN, A_MN, B_MN>(d, operand<A_MN>(a_at, ks), operand<B_MN>(b_at, ks), true);
        wgmma::commit();
        wgmma::wait<1>();
    }
    wgmma::wait<0>();
    mma::cp_async_wait<0>();
}

// Calls store(row, col, v0, v1) for the pairs of C this thread holds after `pipeline`: v0, v1 = C[row, col],
// C[row, col + 1] of the block's tile at (m0, n0), d[4 j + 2 h + e] = C[m0 + 64 group + 16 warp + lane / 4 + 8 h, n0 +
// 8 j + 2 (lane % 4) + e], for rows below m_end and col below n_end (col + 1 may be past it: `store` checks).
template <int BN, class Store>
__device__ __forceinline__ void store_rows(const float (&d)[BN / 2], int64_t m0, int64_t n0, int64_t m_end,
                                           int64_t n_end, Store store) {
    const int group = threadIdx.x / 128, warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int64_t row = m0 + 64 * group + 16 * warp + lane / 4 + 8 * h;
        if (row >= m_end) continue;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            const int64_t col = n0 + 8 * j + 2 * (lane % 4);
            if (col < n_end) store(row, (int)col, d[4 * j + 2 * h], d[4 * j + 2 * h + 1]);
        }
    }
}

// out[0] = v0 and, where `both`, out[1] = v1: one 8-byte store where `pairs` (rows of an even length, so that an even
// column is 8-byte aligned), else two.
__device__ __forceinline__ void store_pair(float* out, float v0, float v1, bool both, bool pairs) {
    if (both && pairs) {
        *reinterpret_cast<float2*>(out) = make_float2(v0, v1);
        return;
    }
    out[0] = v0;
    if (both) out[1] = v1;
}

// The same in bf16: one 4-byte store where `pairs`.
__device__ __forceinline__ void store_pair(bf16* out, float v0, float v1, bool both, bool pairs) {
    if (both && pairs) {
        *reinterpret_cast<__nv_bfloat162*>(out) = __floats2bfloat162_rn(v0, v1);
        return;
    }
    out[0] = __float2bfloat16(v0);
    if (both) out[1] = __float2bfloat16(v1);
}

// Rows r0 .. r0 + R - 1 of an operand at src (rows ld elements apart; those from r_end on zeros), reduction indices
// k0 .. k0 + BK - 1 (those from k_end on zeros).
template <int R>
__device__ __forceinline__ void load_rows(unsigned char* dst, const bf16* src, int64_t ld, int r0, int r_end,
                                          int64_t k0, int64_t k_end) {
    load_pieces<R>(dst, [&](int, int r, int kg) {
        const int64_t k = k0 + 8 * kg;
        const int count = r0 + r < r_end ? (int)max((int64_t)0, min((int64_t)8, k_end - k)) : 0;
        return Piece{count > 0 ? src + (int64_t)(r0 + r) * ld + k : src, count};
    });
}

template <int BN>
__device__ __forceinline__ void gemm_tn(const GemmWgmmaParams<bf16>& p) {
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int item_steps = (p.k + BK - 1) / BK;
    const int64_t first = (int64_t)blockIdx.z * p.slice_steps;
    const int steps = (int)max((int64_t)0, min((int64_t)p.slice_steps, (int64_t)p.items * item_steps - first));

    // Step `step` of the slice is the slice's first + step of all: item (first + step) / item_steps, reduction
    // indices from k0 = (first + step) % item_steps BK, carried from step to step (`pipeline` stages the steps in
    // order) rather than divided out each step.
    int64_t item = first / item_steps;
    int k0 = (int)(first % item_steps) * BK;
    auto stage_in = [&](int, unsigned char* slot) {
        load_rows<BM>(slot, p.a + item * p.a_item, p.a_ld, m0, p.m, k0, p.k);
        load_rows<BN>(slot + A_BYTES, p.b + item * p.b_item, p.b_ld, n0, p.n, k0, p.k);
        k0 += BK;
        if (k0 >= p.k) k0 = 0, ++item;
    };
    float d[BN / 2];
    pipeline<BN>(steps, stage_in, d);

    float* c = p.c + (int64_t)blockIdx.z * p.m * p.n;
    store_rows<BN>(d, m0, n0, p.m, p.n, [&](int64_t row, int col, float v0, float v1) {
        store_pair(c + row * p.n + col, v0, v1, col + 1 < p.n, p.n % 2 == 0);
    });
}

// The implicit convolution product (formula in gemm_wgmma.cuh): C = positions x output channels, A's row of a
// position gathered per k-step from the channels-last source (one tap's 8-channel pieces: kk = q c_pad + c), B the
// packed weight's rows. A thread's A pieces share their k-piece kg (load_pieces), so one (q, c) per k-step serves
// all four of its rows, whose source coordinates at tap 0 are computed once.
template <int BN>
__device__ __forceinline__ void conv_implicit(const ConvImplicitParams<bf16>& p) {
    constexpr int A_PIECES = BM * PIECES_PER_ROW / THREADS;
    const int t = threadIdx.x, kg = t % PIECES_PER_ROW;
    const int taps = p.taps[0] * p.taps[1] * p.taps[2], c_pad = (p.c_src + 7) & ~7;
    const int steps = (taps * c_pad + BK - 1) / BK;
    const int rows = p.rows[0] * p.rows[1] * p.rows[2], positions = p.batch * rows;
    const int src_vox = p.src_size[0] * p.src_size[1] * p.src_size[2];
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    // Position m's batch item and row coordinates.
    auto position = [&](int m, int& n, int (&r)[3]) {
        n = m / rows;
        int rest = m - n * rows;
        r[2] = rest % p.rows[2];
        rest /= p.rows[2];
        r[1] = rest % p.rows[1];
        r[0] = rest / p.rows[1];
    };
    // This thread's A rows t / PIECES_PER_ROW + (THREADS / PIECES_PER_ROW) i: their source coordinates at tap 0
    // (far outside for rows past the positions) and the source element of (tap 0, channel 0), so that a k-step's
    // piece is that plus one offset shared by all four rows (tap q's voxel shift times c_pad, plus the channel).
    int at0[A_PIECES][3];
    const bf16* row0[A_PIECES];
#pragma unroll
    for (int i = 0; i < A_PIECES; ++i) {
        const int m = m0 + (t + THREADS * i) / PIECES_PER_ROW;
        int n = 0, r[3] = {0, 0, 0};
        if (m < positions) position(m, n, r);
#pragma unroll
        for (int a = 0; a < 3; ++a) at0[i][a] = m < positions ? p.src_mul[a] * r[a] + p.lo[a] : -(1 << 30);
        const int64_t voxel0 = m < positions ? ((int64_t)at0[i][0] * p.src_size[1] + at0[i][1]) * p.src_size[2] +
                                                   at0[i][2]
                                             : 0;
        row0[i] = p.src + ((int64_t)n * src_vox + voxel0) * c_pad;
    }
    // This thread's k-piece kk = step BK + 8 kg = q c_pad + c (tap q = (q0, q1, q2)), carried from step to step:
    // `pipeline` stages steps 0, 1, 2, ... in order, and the divisions that would find (q, c) from kk each step were a
    // third of the loop's instructions (PTX).
    int q = 0, q0 = 0, q1 = 0, q2 = 0, c = 8 * kg;
    auto carry = [&]() {
        for (; c >= c_pad; c -= c_pad) {
            ++q;
            if (++q2 == p.taps[2]) {
                q2 = 0;
                if (++q1 == p.taps[1]) q1 = 0, ++q0;
            }
        }
    };
    carry();
    auto stage_in = [&](int, unsigned char* slot) {
        const bool k_ok = q < taps;
        const int shift = ((q0 * p.src_size[1] + q1) * p.src_size[2] + q2) * c_pad + c;
        load_pieces<BM>(slot, [&](int i, int, int) {
            const bool ok = k_ok && (unsigned)(at0[i][0] + q0) < (unsigned)p.src_size[0] &&
                            (unsigned)(at0[i][1] + q1) < (unsigned)p.src_size[1] &&
                            (unsigned)(at0[i][2] + q2) < (unsigned)p.src_size[2];
            return Piece{ok ? row0[i] + shift : p.src, ok ? 8 : 0};
        });
        // The packed weight's piece (chunk c / 16, half c / 8 % 2, tap q) of column n0 + r; c_dst_pad is a multiple
        // of BN, so every column of the tile is packed (zeros past c_dst).
        const bf16* w = p.packed + ((((int64_t)(c / 16) * taps + q) * 2 + c / 8 % 2) * p.c_dst_pad + n0) * 8;
        load_pieces<BN>(slot + A_BYTES, [&](int, int r, int) {
            return Piece{k_ok ? w + (int64_t)r * 8 : p.packed, k_ok ? 8 : 0};
        });
        c += BK;
        carry();
    };
    float d[BN / 2];
    pipeline<BN>(steps, stage_in, d);

    // d[4 j + 2 h + e] = C[64 group + 16 warp + lane / 4 + 8 h, 8 j + 2 (lane % 4) + e].
    const int group = t / 128, warp = t / 32 % 4, lane = t % 32;
    const int dst_vox = p.dst_size[0] * p.dst_size[1] * p.dst_size[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int m = m0 + 64 * group + 16 * warp + lane / 4 + 8 * h;
        if (m >= positions) continue;
        int n, r[3];
        position(m, n, r);
        bf16* out = p.dst + (int64_t)n * p.c_dst * dst_vox + p.dst_base + r[0] * p.dst_step[0] +
                    r[1] * p.dst_step[1] + r[2] * p.dst_step[2];
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int col = n0 + 8 * j + 2 * (lane % 4) + e;
                if (col < p.c_dst)
                    out[(int64_t)col * dst_vox] = __float2bfloat16(
                        d[4 * j + 2 * h + e] + (p.bias ? __bfloat162float(p.bias[col]) : 0.0f));
            }
    }
}

// Rows k0 .. k0 + BK - 1 of an operand stored MN-major at src (row k: R consecutive m or n from mn0, rows ld elements
// apart; those from k_end and the m or n from mn_end read as zeros; mn0 and ld multiples of 8), staged as
// `operand<true>` reads them: row r of the stage is k = r % BK of block r / BK of 64 m or n.
template <int R>
__device__ __forceinline__ void load_mn_rows(unsigned char* dst, const bf16* src, int64_t ld, int mn0, int mn_end,
                                             int64_t k0, int64_t k_end) {
    load_pieces<R>(dst, [&](int, int r, int kg) {
        const int64_t k = k0 + r % BK;
        const int mn = mn0 + r / BK * 64 + 8 * kg;
        const int count = k < k_end ? max(0, min(8, mn_end - mn)) : 0;
        return Piece{count > 0 ? src + k * ld + mn : src, count};
    });
}

// Rows of an operand stored K-major (load_rows: R rows of k from mn0, ld apart) or MN-major (load_mn_rows: rows of k,
// ld apart, of R / BK blocks of 64 m or n from mn0), as `operand<MN>` reads them.
template <int R, bool MN>
__device__ __forceinline__ void load_operand(unsigned char* dst, const bf16* src, int64_t ld, int mn0, int mn_end,
                                             int64_t k0, int64_t k_end) {
    if constexpr (MN)
        load_mn_rows<R>(dst, src, ld, mn0, mn_end, k0, k_end);
    else
        load_rows<R>(dst, src, ld, mn0, mn_end, k0, k_end);
}

// The main loop of the 1x1x1 convolution products on channels-first maps: d receives the warpgroup's 64 x BN of
// D[j, i] = sum_k W(k, j) X[k, i] for the block's tile (j0, i0), j the output channels (the wgmma's m, BM per block), i
// the positions (its n, BN per block), k < kk the source channels; X's rows (a channel's `positions`) at x, W stored
// [k][j] (W_KJ: rows of n) or [j][k] (rows of kk) at w. X's rows are staged MN-major as they lie, W MN-major or
// K-major as it lies: no copy of either in another layout.
template <int BN, bool W_KJ>
__device__ __forceinline__ void pointwise_product(const bf16* x, int positions, const bf16* w, int n, int64_t kk,
                                                  int j0, int i0, float (&d)[BN / 2]) {
    const int steps = (int)((kk + BK - 1) / BK);
    int64_t k0 = 0;
    auto stage_in = [&](int, unsigned char* slot) {
        load_operand<BM, W_KJ>(slot, w, W_KJ ? n : kk, j0, n, k0, kk);
        load_mn_rows<BN>(slot + A_BYTES, x, positions, i0, positions, k0, kk);
        k0 += BK;
    };
    pipeline<BN, W_KJ, true>(steps, stage_in, d);
}

// The 1x1x1 convolution products (formula in gemm_wgmma.cuh) per batch item: each thread stores its accumulators'
// position pairs into the channel rows of C with the bias.
template <bool W_KJ>
__device__ __forceinline__ void conv_pointwise(const GemmParams<bf16>& p) {
    constexpr int BN = GEMM_WGMMA_BN;
    const int j0 = blockIdx.x * BM, i0 = blockIdx.y * BN;
    const int64_t item = blockIdx.z;
    float d[BN / 2];
    pointwise_product<BN, W_KJ>(p.a + item * p.a_sb, (int)p.M, p.b, (int)p.N, p.K, j0, i0, d);

    // D[j, i] at c + item c_sb + j M + i; M (the positions) is even, so every pair is whole.
    bf16* c = p.c + item * p.c_sb;
    store_rows<BN>(d, j0, i0, p.N, p.M, [&](int64_t j, int i, float v0, float v1) {
        const float b = p.bias ? __bfloat162float(p.bias[j]) : 0.0f;
        store_pair(c + j * p.M + i, v0 + b, v1 + b, true, true);
    });
}

// The linear layers' products (formula in gemm_wgmma.cuh), each operand staged as it lies: K-major (its rows along the
// reduction: x and g as A, W's rows in the forward) through load_rows, MN-major (rows along m or n: W in dx = g W, g
// and x in dW = g^T x) through load_mn_rows and wgmma's transpose bits, so no operand is copied first. PARTIAL: the
// weight gradient's slice blockIdx.z of k_slice reduction indices (tokens) into float32 c_acc + z c_slice; otherwise
// the whole reduction into C in bf16, with the bias.
template <int BN, bool A_MN, bool B_MN, bool PARTIAL>
__device__ __forceinline__ void linear_product(const GemmParams<bf16>& p) {
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int64_t k_begin = PARTIAL ? blockIdx.z * p.k_slice : 0;
    const int64_t k_end = PARTIAL ? min(p.K, k_begin + p.k_slice) : p.K;
    const int steps = (int)((k_end - k_begin + BK - 1) / BK);
    const int m = (int)p.M, n = (int)p.N;
    int64_t k0 = k_begin;
    auto stage_in = [&](int, unsigned char* slot) {
        // A(i, k) = a[i a_si + k a_sk]: its rows are a_sk apart when MN-major, a_si when K-major; B likewise.
        load_operand<BM, A_MN>(slot, p.a, A_MN ? p.a_sk : p.a_si, m0, m, k0, k_end);
        load_operand<BN, B_MN>(slot + A_BYTES, p.b, B_MN ? p.b_sk : p.b_sj, n0, n, k0, k_end);
        k0 += BK;
    };
    float d[BN / 2];
    pipeline<BN, A_MN, B_MN>(steps, stage_in, d);

    if constexpr (PARTIAL) {
        float* c = p.c_acc + blockIdx.z * p.c_slice;
        store_rows<BN>(d, m0, n0, m, n, [&](int64_t row, int col, float v0, float v1) {
            store_pair(c + row * n + col, v0, v1, col + 1 < n, n % 2 == 0);
        });
    } else {
        const bool pairs = n % 2 == 0 && (uintptr_t)p.c % 4 == 0;
        store_rows<BN>(d, m0, n0, m, n, [&](int64_t row, int col, float v0, float v1) {
            const bool both = col + 1 < n;
            if (p.bias) {
                v0 += __bfloat162float(p.bias[col]);
                if (both) v1 += __bfloat162float(p.bias[col + 1]);
            }
            store_pair(p.c + row * n + col, v0, v1, both, pairs);
        });
    }
}

// The transposed convolution's forward (formula in gemm_wgmma.cuh): the 1x1x1 product of its taps as channels, j = co
// K + t, each sum stored straight into its voxel of y with b[co] (no z, no bias per tap, no depth_to_space pass). A
// thread's positions i0 + 8 jj + 2 (lane % 4) + e are carried voxel by voxel from the first (one division), its two
// rows' (co, tap) found once.
template <int BN>
__device__ __forceinline__ void conv_transpose_fused(const ConvTransposeWgmmaParams<bf16>& p) {
    const int taps = p.k[0] * p.k[1] * p.k[2], n = p.c_out * taps;
    const int positions = p.size[0] * p.size[1] * p.size[2];
    const int j0 = blockIdx.x * BM, i0 = blockIdx.y * BN;
    const int64_t item = blockIdx.z;
    float d[BN / 2];
    pointwise_product<BN, true>(p.x + item * p.c_in * positions, positions, p.w, n, p.c_in, j0, i0, d);

    const int group = threadIdx.x / 128, warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32;
    const int hy = p.size[1] * p.k[1], wy = p.size[2] * p.k[2];
    const int64_t vy = (int64_t)p.size[0] * p.k[0] * hy * wy;
    // Row h's element offset in y at voxel (0, 0, 0) of the input (channel co, tap (a, b, c)), and its bias.
    int64_t row[2];
    float bias[2];
    bool live[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int j = j0 + 64 * group + 16 * warp + lane / 4 + 8 * h;
        live[h] = j < n;
        const int co = j / taps, t = j % taps;
        const int c = t % p.k[2], b = t / p.k[2] % p.k[1], a = t / (p.k[1] * p.k[2]);
        row[h] = (item * p.c_out + co) * vy + ((int64_t)a * hy + b) * wy + c;
        bias[h] = live[h] && p.bias ? __bfloat162float(p.bias[co]) : 0.0f;
    }
    // The input voxel (id, ih, iw) of position i, advanced `by` positions at a time.
    int i = i0 + 2 * (lane % 4);
    int iw = i % p.size[2], ih = i / p.size[2] % p.size[1], id = i / (p.size[1] * p.size[2]);
    auto advance = [&](int by) {
        for (iw += by; iw >= p.size[2]; iw -= p.size[2])
            if (++ih == p.size[1]) ih = 0, ++id;
    };
#pragma unroll
    for (int jj = 0; jj < BN / 8; ++jj) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            if (i + e < positions) {
                const int64_t voxel = ((int64_t)id * p.k[0] * hy + ih * p.k[1]) * wy + iw * p.k[2];
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    if (live[h]) p.y[row[h] + voxel] = __float2bfloat16(d[4 * jj + 2 * h + e] + bias[h]);
            }
            advance(e == 0 ? 1 : 7);
        }
        i += 8;
    }
}

}  // namespace

// One entry per role and tile width (gemm_wgmma.cuh), so that a profile tells the passes apart: kernel NAME on
// PARAMS<bf16> runs BODY(p) with BLOCKS blocks per SM.
#define GEMM_WGMMA_KERNEL(NAME, PARAMS, BLOCKS, BODY)                                                      \
    extern "C" __global__ void __launch_bounds__(GEMM_WGMMA_THREADS, BLOCKS)                              \
        NAME(const PARAMS<__nv_bfloat16> p) {                                                             \
        BODY(p);                                                                                          \
    }
GEMM_WGMMA_KERNEL(conv_wgrad_gemm_wgmma_bf16, GemmWgmmaParams, 1, gemm_tn<GEMM_WGMMA_BN>)
GEMM_WGMMA_KERNEL(conv_fprop_gemm_wgmma_bf16, GemmWgmmaParams, 1, gemm_tn<GEMM_WGMMA_BN>)
GEMM_WGMMA_KERNEL(conv_dgrad_gemm_wgmma_bf16, GemmWgmmaParams, 1, gemm_tn<GEMM_WGMMA_BN>)
GEMM_WGMMA_KERNEL(conv_wgrad_gemm_wgmma_bf16_n256, GemmWgmmaParams, 1, gemm_tn<GEMM_WGMMA_BN_WIDE>)
GEMM_WGMMA_KERNEL(conv_fprop_gemm_wgmma_bf16_n256, GemmWgmmaParams, 1, gemm_tn<GEMM_WGMMA_BN_WIDE>)
GEMM_WGMMA_KERNEL(conv_dgrad_gemm_wgmma_bf16_n256, GemmWgmmaParams, 1, gemm_tn<GEMM_WGMMA_BN_WIDE>)

// The implicit products: the narrow tile's 96 KB of stages let two blocks share an SM, the widest (_n256: 128
// accumulators per thread, 192 KB of stages) reads each gathered A row once for 256 output channels, a quarter fewer
// bytes per multiply-add than two 128-column tiles.
GEMM_WGMMA_KERNEL(conv_fprop_implicit_wgmma_bf16, ConvImplicitParams, 1, conv_implicit<GEMM_WGMMA_BN>)
GEMM_WGMMA_KERNEL(conv_fprop_implicit_wgmma_bf16_n64, ConvImplicitParams, 2, conv_implicit<64>)
GEMM_WGMMA_KERNEL(conv_fprop_implicit_wgmma_bf16_n256, ConvImplicitParams, 1, conv_implicit<GEMM_WGMMA_BN_WIDE>)
GEMM_WGMMA_KERNEL(conv_dgrad_implicit_wgmma_bf16, ConvImplicitParams, 1, conv_implicit<GEMM_WGMMA_BN>)
GEMM_WGMMA_KERNEL(conv_dgrad_implicit_wgmma_bf16_n64, ConvImplicitParams, 2, conv_implicit<64>)
GEMM_WGMMA_KERNEL(conv_dgrad_implicit_wgmma_bf16_n256, ConvImplicitParams, 1, conv_implicit<GEMM_WGMMA_BN_WIDE>)

// The channels-first 1x1x1 products: W stored [j][k] (the forward) or [k][j] (conv_pointwise<true>).
GEMM_WGMMA_KERNEL(conv_fprop_pointwise_wgmma_bf16, GemmParams, 1, conv_pointwise<false>)
GEMM_WGMMA_KERNEL(conv_dgrad_pointwise_wgmma_bf16, GemmParams, 1, conv_pointwise<true>)
GEMM_WGMMA_KERNEL(conv_transpose_fprop_pointwise_wgmma_bf16, GemmParams, 1, conv_pointwise<true>)
GEMM_WGMMA_KERNEL(conv_transpose_fprop_wgmma_bf16, ConvTransposeWgmmaParams, 1, conv_transpose_fused<GEMM_WGMMA_BN>)

// The linear layers' products (gemm_wgmma.cuh): y = x W^T (A, B K-major), dx = g W (B MN-major), dW = g^T x (both
// MN-major, float32 slices); 128 output columns per block, or 64 (_n64: two blocks per SM).
GEMM_WGMMA_KERNEL(linear_fprop_wgmma_bf16, GemmParams, 1, (linear_product<GEMM_WGMMA_BN, false, false, false>))
GEMM_WGMMA_KERNEL(linear_fprop_wgmma_bf16_n64, GemmParams, 2, (linear_product<64, false, false, false>))
GEMM_WGMMA_KERNEL(linear_dgrad_wgmma_bf16, GemmParams, 1, (linear_product<GEMM_WGMMA_BN, false, true, false>))
GEMM_WGMMA_KERNEL(linear_dgrad_wgmma_bf16_n64, GemmParams, 2, (linear_product<64, false, true, false>))
GEMM_WGMMA_KERNEL(linear_wgrad_wgmma_bf16, GemmParams, 1, (linear_product<GEMM_WGMMA_BN, true, true, true>))
GEMM_WGMMA_KERNEL(linear_wgrad_wgmma_bf16_n64, GemmParams, 2, (linear_product<64, true, true, true>))
