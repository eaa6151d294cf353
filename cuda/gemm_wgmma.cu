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
// conv_dgrad_gemm_wgmma_bf16 with the weight flipped; one slice).
// - A block computes a 128 x 128 tile of C: warpgroup g of its two the rows 64 g .. 64 g + 63, one wgmma m64n128k16
//   per 16 reduction indices (64 float32 accumulators per thread).
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
// Cost: 2 K FLOPs per element of C; bytes A and B once per tile column and row (ceil(N / 128) and ceil(M / 128)
// times, much of it from L2), C once as float32.
#include "common.cuh"
#include "gemm_wgmma.cuh"
#include "mma.cuh"
#include "wgmma.cuh"

namespace {

constexpr int THREADS = GEMM_WGMMA_THREADS, BM = GEMM_WGMMA_BM, BN = GEMM_WGMMA_BN, BK = GEMM_WGMMA_BK;
constexpr int STAGES = GEMM_WGMMA_STAGES;
static_assert(THREADS == 256 && BM == 128 && BN == 128, "two warpgroups of 64 rows, m64n128 products");
static_assert(BK == 64 && STAGES >= 3, "one 128-byte swizzled row per operand row; a slot refilled two iterations "
                                       "after its products");
constexpr int ROW = BK * 2;      // bytes of a staged row
constexpr int ATOM = 8 * ROW;    // bytes of 8 rows: the swizzle's period and the stride byte offset
constexpr int A_BYTES = BM * BK * 2, STAGE_BYTES = (BM + BN) * BK * 2;

using bf16 = __nv_bfloat16;

// Issues the cp.async copies of rows r0 .. r0 + R - 1 (those below r_end; the rest zeros) and reduction indices
// k0 .. k0 + BK - 1 (those below k_end) of the operand at src (rows ld elements apart) into the stage's layout at dst.
template <int R>
__device__ __forceinline__ void load_rows(unsigned char* dst, const bf16* src, int64_t ld, int r0, int r_end,
                                          int64_t k0, int64_t k_end) {
    constexpr int PIECES = R * BK / 8;
    static_assert(PIECES % THREADS == 0, "whole 16-byte pieces per thread");
#pragma unroll
    for (int i = 0; i < PIECES / THREADS; ++i) {
        const int e = threadIdx.x + THREADS * i, r = e / (BK / 8), kg = e % (BK / 8);
        const int64_t k = k0 + 8 * kg;
        const int count = r0 + r < r_end ? (int)max((int64_t)0, min((int64_t)8, k_end - k)) : 0;
        const bf16* from = count > 0 ? src + (int64_t)(r0 + r) * ld + k : src;
        mma::cp_async16(reinterpret_cast<bf16*>(dst + r * ROW + (kg ^ (r % 8)) * 16), from, count);
    }
}

__device__ __forceinline__ void gemm_tn(const GemmWgmmaParams<bf16>& p) {
    extern __shared__ __align__(1024) unsigned char smem[];
    const int group = threadIdx.x / 128, warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int item_steps = (p.k + BK - 1) / BK;
    const int64_t first = (int64_t)blockIdx.z * p.slice_steps;
    const int steps = (int)max((int64_t)0, min((int64_t)p.slice_steps, (int64_t)p.items * item_steps - first));

    // Stage `step` of the slice (item (first + step) / item_steps) into its slot; one commit group per call (empty
    // past the last step) keeps the count uniform.
    auto load = [&](int step) {
        if (step < steps) {
            unsigned char* slot = smem + step % STAGES * STAGE_BYTES;
            const int64_t global = first + step, item = global / item_steps;
            const int64_t k0 = global % item_steps * BK;
            load_rows<BM>(slot, p.a + item * p.a_item, p.a_ld, m0, p.m, k0, p.k);
            load_rows<BN>(slot + A_BYTES, p.b + item * p.b_item, p.b_ld, n0, p.n, k0, p.k);
        }
        mma::cp_async_commit();
    };
#pragma unroll
    for (int step = 0; step < STAGES - 2; ++step) load(step);

    float d[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) d[i] = 0.0f;
    const uint32_t base = (uint32_t)__cvta_generic_to_shared(smem);
    for (int step = 0; step < steps; ++step) {
        mma::cp_async_wait<STAGES - 3>();
        wgmma::fence_proxy_async();
        __syncthreads();
        load(step + STAGES - 2);
        const uint32_t at = base + step % STAGES * STAGE_BYTES;
        const uint32_t a_at = at + group * 64 * ROW, b_at = at + A_BYTES;
        wgmma::fence();
#pragma unroll
        for (int ks = 0; ks < BK / 16; ++ks)
            wgmma::mma_async<BN>(d, wgmma::descriptor_sw128(a_at + 32 * ks, ATOM),
                                 wgmma::descriptor_sw128(b_at + 32 * ks, ATOM), true);
        wgmma::commit();
        wgmma::wait<1>();
    }
    wgmma::wait<0>();
    mma::cp_async_wait<0>();

    // d[4 j + 2 h + e] = C[16 warp + lane / 4 + 8 h, 8 j + 2 (lane % 4) + e] of the warpgroup's 64 x 128.
    float* c = p.c + (int64_t)blockIdx.z * p.m * p.n;
    const bool pairs = p.n % 2 == 0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = m0 + 64 * group + 16 * warp + lane / 4 + 8 * h;
        if (row >= p.m) continue;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            const int col = n0 + 8 * j + 2 * (lane % 4);
            float* out = c + (int64_t)row * p.n + col;
            const float v0 = d[4 * j + 2 * h], v1 = d[4 * j + 2 * h + 1];
            if (pairs && col + 1 < p.n) {
                *reinterpret_cast<float2*>(out) = make_float2(v0, v1);
            } else {
                if (col < p.n) out[0] = v0;
                if (col + 1 < p.n) out[1] = v1;
            }
        }
    }
}

}  // namespace

// One entry per role (gemm_wgmma.cuh), so that a profile tells the passes apart.
#define GEMM_WGMMA_KERNEL(NAME)                                                                   \
    extern "C" __global__ void __launch_bounds__(GEMM_WGMMA_THREADS, 1)                           \
        NAME(const GemmWgmmaParams<__nv_bfloat16> p) {                                            \
        gemm_tn(p);                                                                               \
    }
GEMM_WGMMA_KERNEL(conv_wgrad_gemm_wgmma_bf16)
GEMM_WGMMA_KERNEL(conv_fprop_gemm_wgmma_bf16)
GEMM_WGMMA_KERNEL(conv_dgrad_gemm_wgmma_bf16)
