// The weight gradient of a convolution of stride 1 or 2 per axis, and below its forward and input gradient
// (conv_tma_product: the kernels conv_fprop_tma_bf16* and conv_dgrad_tma_bf16*), as warpgroup products over boxes that
// the TMA unit copies from channels-last maps (formulas and parameters in conv_tma.cuh). The weight gradient:
//
//   dW[cn, cw, a] = sum_{n, o} narrow[n, o, cn] wide[n, s o + a - pad, cw]
//
// a GEMM per tap with the positions as its reduction: m = cn, n = cw, k = o.
// - Why TMA: the halo kernels of conv_wgmma.cu load channels-first maps element by element (16 loads per voxel of 16
//   channels) and shift the halo by a tap within shared memory; here a tap's operand is a box of the wide map whose
//   corner is shifted by the tap, and the TMA unit copies it with one instruction, zeros outside the map (the padding)
//   included. In a channels-last map a position is a row of 64 channels (128 bytes), so a box of 64 positions is 64
//   such rows whatever the shift: no sector is read for less than its bytes.
// - A block owns ROWS narrow channels, 64 wide channels and one column of taps (az, ay = 0..2, ax), and sums over its
//   slice of k-blocks: per k-block (64 positions, box_x x box_y of one slice z of one item, box_x a multiple of 8) the
//   narrow boxes (ROWS / 64 of 64 channels) and one wide box of box_x x (box_y + 2) positions, its corner shifted by
//   (az, ax), are one stage (at most 40 or 32 KB). In shared memory a box is rows (positions, in box order) of 64
//   channels with the 128-byte swizzle, which is wgmma's MN-major operand layout for m (narrow) and n (wide) alike; tap
//   ay's wide operand is the wide box from row ay box_x on (the narrow box shifted by ay rows: whole 8-row atoms), so
//   the three taps share one box (24 KB of boxes per k-block of 16 x 4 positions instead of 3 x 8: as the products' tap
//   columns). A strided conv's wide box is taken at steps of s (TMA element strides), the narrow box's corner times s:
//   its rows are then the positions that the narrow box's taps read, as at stride 1; at stride 2 along y the even taps
//   ay = 0, 2 read rows 2 y - 1 and 2 y + 1 of one box of box_y + 1 rows at steps of 2 (a row apart), and the odd tap
//   another, from 2 y (box_x at most 32, so that both fit where the stride-1 box did). Per k-step of 16 positions one
//   m64n64k16 per tap. ROWS 128: warpgroup g takes narrow box g and every k-step; ROWS 64 (maps of at most 64 narrow
//   channels, which would leave half of a 128-row tile empty): both take the one narrow box, warpgroup g k-steps 2 g
//   and 2 g + 1, and the second's sums are added to the first's at the end.
// - Pipeline (tma_produce, tma_consume; shared with the products): a producer warp, beside the two warpgroups, issues
//   the copies of each k-block into its stage, CONV_TMA_STAGES k-blocks ahead, each stage's copies completing its full
//   barrier (expected bytes, PTX mbarrier); the warpgroups wait on a stage's full barrier and issue its products, and
//   each warp, once the previous k-block's products are done (wgmma wait 1), arrives on that stage's empty barrier,
//   which the producer waits on before refilling the stage. No block barrier per k-block: a warpgroup that runs ahead
//   does not wait for the other (with the issuing thread among the warpgroups and a block barrier per k-block, ncu
//   counted 2.1 warps stalled on the barrier per issued instruction in the product).
// - A block writes its sums tap by tap as whole rows of 64 wide channels, partial[slice, a, cn, cw], and
//   conv_wgrad_tma_sum adds the slices in order into dW[cn, cw, a] (written in dW's order, each tap's element a
//   separate 4-byte store, the weight gradient of a deep 3D stage took 0.27 ms for 1.2 GFLOP: ncu, 13.8 million sector
//   writes). Each output is one sum in a fixed order: results do not depend on scheduling.
//
// Cost: 2 prod(taps) c_narrow c_wide FLOPs per narrow position; per block and k-block at most 40 KB of boxes (from
// L2: a wide position is read by 3 x 3 tap columns x its column tiles).
#include "common.cuh"
#include "conv_tma.cuh"
#include "wgmma.cuh"

#include <type_traits>

namespace {

constexpr int THREADS = CONV_TMA_THREADS, STAGES = CONV_TMA_STAGES, BOX = CONV_TMA_BOX_BYTES;
constexpr int PIPELINE_THREADS = CONV_TMA_PIPELINE_THREADS;
constexpr int COLUMN_TAPS = CONV_TMA_COLUMN_TAPS, KSTEPS = CONV_TMA_POSITIONS / 16;
static_assert(CONV_TMA_COLS == 64 && THREADS == 256, "two warpgroups of m64, one n64 per tap");
static_assert(CONV_TMA_POSITIONS % 16 == 0 && BOX % 1024 == 0, "whole k-steps; boxes on swizzle atoms");

// The PTX barrier of a stage (mbarrier: an arrival count and a count of bytes still expected; a phase completes when
// both reach zero, and its parity flips).
__device__ __forceinline__ void barrier_init(uint32_t bar, int arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}
// Publishes the initialised barriers to the TMA unit (the async proxy).
__device__ __forceinline__ void barrier_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// One arrival.
__device__ __forceinline__ void barrier_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// One arrival that also announces `bytes` to come from copies completing on the barrier.
__device__ __forceinline__ void barrier_expect(uint32_t bar, int bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Waits until the barrier's phase of parity `parity` has completed.
__device__ __forceinline__ void barrier_wait(uint32_t bar, int parity) {
    uint32_t done = 0;
    while (!done) {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    }
}
// The box of `map` whose first element is at coordinates (c0 .. c4) into shared memory at dst, completing `bar`.
__device__ __forceinline__ void copy_box(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, int c3, int c4,
                                         uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5, "
        "%6}], [%7];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "r"(bar)
        : "memory");
}

// The same for a box of a 3-axis map.
__device__ __forceinline__ void copy_box(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
        "[%5];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
}

// The MN-major descriptor of k-step s of a box at shared address `at`: rows of 64 channels, 8-row atoms 1024 bytes
// apart along k (one 64-wide block along m or n: its offset is never used).
__device__ __forceinline__ uint64_t box_operand(uint32_t at, int s) {
    return wgmma::descriptor_sw128(at + 2 * 1024 * s, 1024, BOX);
}

// The first 1024-byte boundary of the dynamic shared memory at smem: the 128-byte swizzle repeats every 1024 bytes,
// and the TMA unit and the wgmma descriptors address the boxes from such a boundary (the header's sizes reserve the
// 1024 bytes this may skip).
__device__ __forceinline__ uint32_t swizzle_base(const unsigned char* smem) {
    return ((uint32_t)__cvta_generic_to_shared(smem) + 1023) & ~1023u;
}

// The corner of box b of a map cut into boxes of box_x x box_y positions: x block b % x_blocks, then the y block, the
// depth index z (of depth) and the batch item n.
struct BoxCorner {
    int x, y, z, n;
};
__device__ __forceinline__ BoxCorner box_corner(int b, int x_blocks, int y_blocks, int box_x, int box_y, int depth) {
    const int x = b % x_blocks * box_x;
    b /= x_blocks;
    const int y = b % y_blocks * box_y;
    b /= y_blocks;
    return {x, y, b % depth, b / depth};
}
// Position q of the box at `box` in the map, the box 8 << shift positions wide (box_x 8, 16 or 32): no division.
__device__ __forceinline__ int2 box_position(BoxCorner box, int q, int shift) {
    return make_int2(box.x + (q & ((8 << shift) - 1)), box.y + (q >> (shift + 3)));
}

// The k-block pipeline of both kernels, over STAGES_N stages whose barriers lie at `bars`: full[s] at bars + 8 s (one
// arrival, the producer's, and the copies' bytes) and empty[s] at bars + 8 (STAGES_N + s) (one arrival per consumer
// warp); the k-th completion of a barrier has parity k & 1. tma_pipeline_init initialises them (every thread calls
// it), then the producer warp runs tma_produce and leaves, and the two warpgroups run tma_consume.
template <int STAGES_N>
__device__ __forceinline__ void tma_pipeline_init(uint32_t bars) {
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES_N; ++s) {
            barrier_init(bars + 8 * s, 1);
            barrier_init(bars + 8 * (STAGES_N + s), THREADS / 32);
        }
        barrier_init_fence();
    }
    __syncthreads();
}

// The producer warp: its first thread issues k-block i into stage i % STAGES_N (issue(i): its copies, completing the
// stage's full barrier), for i >= STAGES_N once the empty barrier says that k-block i - STAGES_N's products are done.
template <int STAGES_N, typename Issue>
__device__ __forceinline__ void tma_produce(uint32_t bars, int count, Issue&& issue) {
    if (threadIdx.x != THREADS) return;
    for (int i = 0; i < count; ++i) {
        if (i >= STAGES_N) barrier_wait(bars + 8 * (STAGES_N + i % STAGES_N), (i / STAGES_N - 1) & 1);
        issue(i);
    }
}

// The two warpgroups, over k-blocks begin .. end - 1: each waits on a k-block's full barrier, issues its products
// (consume(i), between a wgmma fence and commit), and once k-block i - 1's products are done (wait 1) each of its
// warps arrives on that stage's empty barrier. Returns with every product done. (consume must issue its products
// unconditionally: a wgmma under a branch is serialised by ptxas, C7520; k-blocks of different products are
// consumed by successive calls.)
template <int STAGES_N, typename Consume>
__device__ __forceinline__ void tma_consume(uint32_t bars, int begin, int end, Consume&& consume) {
    // The lane read once: read between two k-blocks' products, ptxas serialised the wgmma instructions (C7515).
    const bool arriving = (threadIdx.x & 31) == 0;
    for (int i = begin; i < end; ++i) {
        barrier_wait(bars + 8 * (i % STAGES_N), i / STAGES_N & 1);
        wgmma::fence();
        consume(i);
        wgmma::commit();
        wgmma::wait<1>();
        if (i >= 1 && arriving) barrier_arrive(bars + 8 * (STAGES_N + (i - 1) % STAGES_N));
    }
    wgmma::wait<0>();
}

// A barrier of the two warpgroups alone (named barrier 1; the producer warp has left).
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;\n" ::"n"(THREADS) : "memory"); }

}  // namespace

template <int KZ, int ROWS>
__device__ __forceinline__ void conv_wgrad_tma(const ConvWgradTmaParams& p) {
    constexpr int NARROW = ROWS / 64, STAGE = (NARROW + COLUMN_TAPS) * BOX;
    constexpr int SHARED = ROWS == 128 ? CONV_TMA_SHARED_BYTES_M128 : CONV_TMA_SHARED_BYTES_M64;
    static_assert((ROWS == 128 || ROWS == 64) && STAGES * STAGE + 1024 + 16 * STAGES == SHARED, "the header's sizes");
    // Warpgroup g's k-steps of a k-block: all of them (ROWS 128), or its half (ROWS 64).
    constexpr int STEPS = ROWS == 128 ? KSTEPS : KSTEPS / 2;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const uint32_t base = swizzle_base(smem_raw), bars = base + STAGES * STAGE;
    const int t = threadIdx.x, group = t >> 7;
    const int cn0 = blockIdx.x * ROWS, column = blockIdx.y % (KZ * 3);
    const int cw0 = blockIdx.y / (KZ * 3) * CONV_TMA_COLS, az = column / 3, ax = column % 3;
    const int kb0 = blockIdx.z * p.kblocks_per_slice, count = min(p.kblocks, kb0 + p.kblocks_per_slice) - kb0;
    // The wide boxes of a k-block (the header's layout): sy of box_x x (box_y + 2 / sy) positions each.
    const int sy = p.stride[1];
    const uint32_t wide_box = p.box_x * (p.box_y + 2 / sy) * 128;
    const int bytes = NARROW * BOX + sy * wide_box;

    // k-block i of the slice into stage i % STAGES: the narrow boxes, then the wide boxes of the column's taps, the
    // narrow box's corner times the stride, shifted by (az, 0 or 1 (the odd taps' box at stride 2), ax) less the
    // padding.
    auto issue = [&](int i) {
        const auto [x0, y0, z, n] = box_corner(kb0 + i, p.x_blocks, p.y_blocks, p.box_x, p.box_y, p.depth);
        const uint32_t at = base + i % STAGES * STAGE, bar = bars + 8 * (i % STAGES);
        barrier_expect(bar, bytes);
        for (int h = 0; h < NARROW; ++h) copy_box(at + h * BOX, &p.narrow_map, cn0 + 64 * h, x0, y0, z, n, bar);
        const int wx = p.stride[2] * x0 + ax - p.pad[2], wz = p.stride[0] * z + az - p.pad[0];
        for (int b = 0; b < sy; ++b)
            copy_box(at + NARROW * BOX + b * wide_box, &p.wide_map, cw0, wx, sy * y0 - p.pad[1] + b, wz, n, bar);
    };
    tma_pipeline_init<STAGES>(bars);
    if (t >= THREADS) return tma_produce<STAGES>(bars, count, issue);
    float acc[COLUMN_TAPS][CONV_TMA_COLS / 2];
#pragma unroll
    for (int ay = 0; ay < COLUMN_TAPS; ++ay)
#pragma unroll
        for (int k = 0; k < CONV_TMA_COLS / 2; ++k) acc[ay][k] = 0.0f;
    // Tap ay's wide operand: box ay % sy from row ay / sy on (a row of a box: box_x positions, one tap along y
    // further at stride 1, two at stride 2).
    uint32_t tap_at[COLUMN_TAPS];
#pragma unroll
    for (int ay = 0; ay < COLUMN_TAPS; ++ay) tap_at[ay] = NARROW * BOX + ay % sy * wide_box + ay / sy * p.box_x * 128;
    const int narrow_box = ROWS == 128 ? group : 0, first_step = ROWS == 128 ? 0 : group * STEPS;
    tma_consume<STAGES>(bars, 0, count, [&](int i) {
        const uint32_t at = base + i % STAGES * STAGE;
#pragma unroll
        for (int s = first_step; s < first_step + STEPS; ++s) {
            const uint64_t a = box_operand(at + narrow_box * BOX, s);
#pragma unroll
            for (int ay = 0; ay < COLUMN_TAPS; ++ay)
                wgmma::mma_async<CONV_TMA_COLS, true, true>(acc[ay], a, box_operand(at + tap_at[ay], s), true);
        }
    });

    // Thread l of warp w of a warpgroup holds D[16 w + l / 4 + 8 h, 8 j + 2 (l % 4) + e] of each tap's 64 x 64 tile
    // (wgmma.cuh) at acc[ay][4 j + 2 h + e]. ROWS 64: the second warpgroup's sums (the other half of the positions)
    // through the free stages, added by the first, which alone writes.
    if constexpr (ROWS == 64) {
        float* other = reinterpret_cast<float*>(smem_raw + (base - (uint32_t)__cvta_generic_to_shared(smem_raw)));
        const int lane128 = t & 127;
        consumers_sync();
        if (group == 1)
#pragma unroll
            for (int ay = 0; ay < COLUMN_TAPS; ++ay)
#pragma unroll
                for (int k = 0; k < CONV_TMA_COLS / 2; ++k)
                    other[(ay * CONV_TMA_COLS / 2 + k) * 128 + lane128] = acc[ay][k];
        consumers_sync();
        if (group == 1) return;
#pragma unroll
        for (int ay = 0; ay < COLUMN_TAPS; ++ay)
#pragma unroll
            for (int k = 0; k < CONV_TMA_COLS / 2; ++k)
                acc[ay][k] += other[(ay * CONV_TMA_COLS / 2 + k) * 128 + lane128];
    }
    const int lane = t & 31, warp = (t >> 5) & 3;
    const int64_t plane = (int64_t)p.c_narrow * p.c_wide;
    float* out = p.partial + (int64_t)blockIdx.z * KZ * 9 * plane;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int cn = cn0 + 64 * (ROWS == 128 ? group : 0) + 16 * warp + lane / 4 + 8 * h;
        if (cn >= p.c_narrow) continue;
#pragma unroll
        for (int j = 0; j < CONV_TMA_COLS / 8; ++j) {
            const int cw = cw0 + 8 * j + 2 * (lane % 4);
#pragma unroll
            for (int ay = 0; ay < COLUMN_TAPS; ++ay) {
                float* at = out + ((az * 3 + ay) * 3 + ax) * plane + (int64_t)cn * p.c_wide + cw;
                const float v0 = acc[ay][4 * j + 2 * h], v1 = acc[ay][4 * j + 2 * h + 1];
                // A pair of wide channels as one 8-byte store where both exist and the pair is 8-byte aligned.
                if (cw + 1 < p.c_wide && (reinterpret_cast<uintptr_t>(at) & 7) == 0) {
                    *reinterpret_cast<float2*>(at) = make_float2(v0, v1);
                } else {
                    if (cw < p.c_wide) at[0] = v0;
                    if (cw + 1 < p.c_wide) at[1] = v1;
                }
            }
        }
    }
}

#define CONV_WGRAD_TMA_KERNEL(NAME, KZ, ROWS)                                                                  \
    extern "C" __global__ void __launch_bounds__(PIPELINE_THREADS, 1)                                          \
        NAME(const __grid_constant__ ConvWgradTmaParams p) {                                                   \
        conv_wgrad_tma<KZ, ROWS>(p);                                                                           \
    }
CONV_WGRAD_TMA_KERNEL(conv_wgrad_tma_bf16_k333_m128, 3, 128)
CONV_WGRAD_TMA_KERNEL(conv_wgrad_tma_bf16_k133_m128, 1, 128)
CONV_WGRAD_TMA_KERNEL(conv_wgrad_tma_bf16_k333_m64, 3, 64)
CONV_WGRAD_TMA_KERNEL(conv_wgrad_tma_bf16_k133_m64, 1, 64)

// dW[pair, a] = sum_s partial[s, a, pair] with pair = cn c_wide + cw (formula in conv_tma.cuh): a block's pairs' taps
// read as rows of pairs, staged [a][pair] (one float of padding per row against bank conflicts) and written as the
// block's one run of pairs x taps.
extern "C" __global__ void __launch_bounds__(THREADS) conv_wgrad_tma_sum(const ConvWgradTmaSumParams p) {
    constexpr int PAIRS = CONV_TMA_SUM_PAIRS, PITCH = PAIRS + 1;
    __shared__ float staged[CONV_TMA_MAX_TAPS * PITCH];
    const int64_t pair0 = (int64_t)blockIdx.x * PAIRS;
    const int pairs = (int)min((int64_t)PAIRS, p.pairs - pair0);
    for (int e = threadIdx.x; e < p.taps * PAIRS; e += THREADS) {
        const int a = e / PAIRS, q = e % PAIRS;
        if (q >= pairs) continue;
        float s = 0.0f;
        for (int slice = 0; slice < p.slices; ++slice)
            s += p.partial[((int64_t)slice * p.taps + a) * p.pairs + pair0 + q];
        staged[a * PITCH + q] = s;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < pairs * p.taps; e += THREADS)
        p.out[pair0 * p.taps + e] = staged[e % p.taps * PITCH + e / p.taps];
}

// Writes a product's sums: D[16 w + l / 4 + 8 h, 8 j + 2 (l % 4) + e] at acc[4 j + 2 h + e] is row m0 + (ROWS 128:
// 64 g) + that, position (ROWS 64: 128 g +) q of the box (x0 + q % box_x, y0 + q / box_x), at out_step o + out_phase in
// the output map, plus the bias.
// ROWS 32 (conv_dgrad_tma_bf16_n32): the positions are the product's m, the channels its n: D[16 w + l / 4 + 8 h,
// 8 j + 2 (l % 4) + e] of warpgroup g's m64 tile i at acc[16 i + 4 j + 2 h + e] is position 128 g + 64 i + that row,
// channel that column. Positions by box_position, without a division.
template <int ROWS>
__device__ __forceinline__ void store_product(const ConvTmaProductParams<__nv_bfloat16>& p, const float* acc, int m0,
                                              BoxCorner box) {
    constexpr int N = 128;
    const int t = threadIdx.x, group = t >> 7, lane = t & 31, warp = (t >> 5) & 3;
    const int64_t plane = (int64_t)p.out_size[1] * p.out_size[2];
    const int q0 = ROWS == 128 ? 0 : group * N;
    const int zo = p.out_step[0] * box.z + p.out_phase[0], shift = __ffs(p.box_x) - 4;
    if constexpr (ROWS == 32) {
        // This thread's 8 channels m = 8 j + 2 (l % 4) + e lie a plane of the output apart: their rows and biases
        // once per box, not per element (a 64-bit channel offset and a bias load per element: about 25 SASS
        // instructions a 2-byte store, now about 8).
        const int64_t channel = (int64_t)p.out_size[0] * plane;
        __nv_bfloat16* slice = p.out + (int64_t)box.n * p.c_out * channel + (int64_t)zo * plane;
        __nv_bfloat16* rows[8];
        float bias[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int m = 8 * (k / 2) + 2 * (lane % 4) + k % 2;
            rows[k] = m < p.c_out ? slice + m * channel : nullptr;
            bias[k] = m < p.c_out && p.bias ? __bfloat162float(p.bias[m]) : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int2 o = box_position(box, q0 + 64 * i + 16 * warp + lane / 4 + 8 * h, shift);
                if (o.x >= p.size[2] || o.y >= p.size[1]) continue;
                const int at =
                    (p.out_step[1] * o.y + p.out_phase[1]) * p.out_size[2] + p.out_step[2] * o.x + p.out_phase[2];
#pragma unroll
                for (int k = 0; k < 8; ++k)
                    if (rows[k]) rows[k][at] = __float2bfloat16_rn(acc[16 * i + 4 * (k / 2) + 2 * h + k % 2] + bias[k]);
            }
    } else {
        // This thread's positions q = q0 + 8 j + c + e (c = 2 (l % 4)): as a box row is whole groups of 8, e = 0 and 1
        // lie in one row, so the output's rows are pairs of neighbours wherever the grid is the map itself (stride 1
        // along y and x: the forwards, a stride-1 input gradient) and a row of the map has an even length: one 4-byte
        // store per pair. This is most of the epilogue, which the warpgroups run between a box's products and the
        // next's while the tensor cores wait: with each element's position worked out by two divisions it was about 38
        // SASS instructions a 2-byte store, by that count more than half of the 20.3 M warp instructions ncu counted on
        // amos-2d's 128 x 80x80 forward (H100, 2026-12-08); now about 18 a 4-byte store.
        const int c = 2 * (lane % 4);
        const bool pairs = p.out_step[1] == 1 && p.out_step[2] == 1 && p.out_phase[1] == 0 && p.out_phase[2] == 0 &&
                           p.out_size[2] % 2 == 0;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int m = m0 + (ROWS == 128 ? 64 * group : 0) + 16 * warp + lane / 4 + 8 * h;
            if (m >= p.c_out) continue;
            const float bias = p.bias ? __bfloat162float(p.bias[m]) : 0.0f;
            __nv_bfloat16* row = p.out + (((int64_t)box.n * p.c_out + m) * p.out_size[0] + zo) * plane;
#pragma unroll
            for (int j = 0; j < N / 8; ++j) {
                const int2 o = box_position(box, q0 + 8 * j + c, shift);
                const int x = o.x, y = o.y;
                if (y >= p.size[1]) continue;
                const float v0 = acc[4 * j + 2 * h] + bias, v1 = acc[4 * j + 2 * h + 1] + bias;
                if (pairs) {
                    if (x < p.size[2])
                        *reinterpret_cast<__nv_bfloat162*>(row + y * p.out_size[2] + x) = __floats2bfloat162_rn(v0, v1);
                    continue;
                }
                const int64_t at = (int64_t)(p.out_step[1] * y + p.out_phase[1]) * p.out_size[2] + p.out_phase[2];
                if (x < p.size[2]) row[at + p.out_step[2] * x] = __float2bfloat16_rn(v0);
                if (x + 1 < p.size[2]) row[at + p.out_step[2] * (x + 1)] = __float2bfloat16_rn(v1);
            }
        }
    }
}

// out[n, m, step o + phase] = b[m] + sum over the tap columns c and their taps i of sum_k Wp[w_c + i, m, k]
// src[n, mul o + off_c + i e_y, k] (conv_tma.cuh: the columns, the forward, the input gradient and its stride phases).
// A block owns 128 rows m (two warpgroups of m64; or 64 rows for both and 256 positions, 128 each, in the _m64 kernels,
// for at most 64 output channels) and, one after the other, boxes of 128 output positions o (box_x x box_y of one slice
// z of one item, box_x 8, 16 or 32), and per box walks the k-blocks (a tap column c, 64 channels k). Per k-block the
// TMA unit copies the column's taps of Wp (one box of 3 taps x rows x 64, or 1 or 2 of one tap each) and one source box
// of box_x x box_rows positions x 64 channels at the column's offset (zeros outside the map: the padding; at the map's
// steps along x and y, a strided forward's); tap i's source operand is that box from row i box_x on: the output box
// shifted by i rows, 128 consecutive positions. All are K-major rows of 128 bytes in the 128-byte swizzle, and i box_x
// rows are whole 1024-byte swizzle atoms (box_x a multiple of 8), so one descriptor form serves every tap. Per k-step
// of 16 channels one m64n128k16 per warpgroup and tap. Why a column of taps per k-block: every box comes from L2, and
// with a box per tap a 128 x 128 x 64 product needed 32 KB (15 TB/s at the tensor cores' rate); the three taps of a
// stride-1 column share one source box, 68 KB instead of 96 per three products (H100, flare-3d 128 x 20x56x48 forward:
// 0.226 -> 0.191 ms, ncu's tensor pipe 49 -> 58% active, its L2 throughput 45 -> 41% of peak: less to wait for rather
// than a saturated cache). The same pipeline as the weight gradient's (tma_produce, tma_consume),
// CONV_TMA_PRODUCT_STAGES k-blocks in flight, the producer running on into the block's next box while the warpgroups
// write a box's sums (with a block per box, each block's first copies waited on an empty pipeline and its last sums on
// no copies). Each output is one sum in a fixed order.
template <int ROWS>
__device__ __forceinline__ void conv_tma_product(const ConvTmaProductParams<__nv_bfloat16>& p) {
    // ROWS 128: each warpgroup 64 of the rows and all P = 128 positions; ROWS 64 (at most 64 output channels, which
    // would leave half of a 128-row tile empty): both on the 64 rows, warpgroup g on positions 128 g .. 128 g + 127 of
    // a box of P = 256; ROWS 32 (at most 32 output channels): the same positions, each warpgroup's 128 as two m64
    // tiles of the product (the source box's rows are K-major as an A operand too) against the 32 rows of Wp as n.
    constexpr int STAGES_P = CONV_TMA_PRODUCT_STAGES, N = 128, P = ROWS == 128 ? N : 2 * N;
    static_assert(ROWS == 128 || ROWS == 64 || ROWS == 32, "the three tiles");
    constexpr int TILE = ROWS * 64 * 2, STAGE = CONV_TMA_PRODUCT_STAGE_BYTES;
    static_assert(STAGES_P * STAGE + 1024 + 16 * STAGES_P == CONV_TMA_PRODUCT_SHARED, "the header's sizes");
    static_assert(P == (ROWS == 128 ? CONV_TMA_PRODUCT_POSITIONS : CONV_TMA_PRODUCT_POSITIONS_M64), "the header's");
    static_assert(STAGE % 1024 == 0 && 3 * TILE % 1024 == 0, "stages and source boxes start on swizzle atoms");
    static_assert(3 * TILE + (P + 2 * CONV_TMA_PRODUCT_BOX_X_MAX) * 128 <= STAGE, "a stage holds the boxes");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const uint32_t base = swizzle_base(smem_raw), bars = base + STAGES_P * STAGE;
    const int t = threadIdx.x, group = t >> 7;
    const int m0 = blockIdx.x * ROWS;
    const int chunks = (p.c_src + 63) / 64, count = p.columns * chunks;
    const int source_bytes = p.box_x * p.box_rows * 128;
    // This block's boxes: blockIdx.y, then every gridDim.y-th.
    const int boxes = (p.boxes - (int)blockIdx.y + (int)gridDim.y - 1) / (int)gridDim.y;
    auto corner = [&](int b) {
        return box_corner(blockIdx.y + b * gridDim.y, p.x_blocks, p.y_blocks, p.box_x, p.box_y, p.size[0]);
    };

    // k-block i (box i / count; tap column c, channels 64 (i % chunks) ... of it) into stage i % STAGES_P: the
    // column's taps of Wp, then the source box.
    auto issue = [&](int i) {
        const BoxCorner box = corner(i / count);
        const int c = i % count / chunks, k0 = i % chunks * 64, taps = p.col_taps[c];
        const uint32_t at = base + i % STAGES_P * STAGE, bar = bars + 8 * (i % STAGES_P);
        barrier_expect(bar, taps * TILE + source_bytes);
        if (taps == 3)
            copy_box(at, &p.weight_map3, k0, m0, p.col_weight[c], bar);
        else
            for (int j = 0; j < taps; ++j) copy_box(at + j * TILE, &p.weight_map, k0, m0, p.col_weight[c] + j, bar);
        copy_box(at + 3 * TILE, &p.src_map, k0, p.src_mul[2] * box.x + p.col_x[c],
                 p.src_mul[1] * box.y + p.col_y[c], p.src_mul[0] * box.z + p.col_z[c], box.n, bar);
    };
    tma_pipeline_init<STAGES_P>(bars);
    if (t >= THREADS) return tma_produce<STAGES_P>(bars, boxes * count, issue);
    float acc[N / 2];
    const uint32_t row_shift = p.box_x * 128;  // one row of the box: a tap further
    // This warpgroup's rows of Wp's boxes and first position of the output box.
    const uint32_t a_rows = ROWS == 128 ? group * 64 * 128 : 0, b_first = ROWS == 128 ? 0 : group * N * 128;
    // The columns of 3, then of 2, then of 1 tap (the host's order), each run of k-blocks consumed with its count of
    // products fixed.
    int begin;
    auto consume_columns = [&](auto taps_of_run) {
        constexpr int TAPS = decltype(taps_of_run)::value;
        int run = 0;
        for (int c = 0; c < p.columns; ++c) run += p.col_taps[c] == TAPS;
        tma_consume<STAGES_P>(bars, begin, begin + run * chunks, [&](int i) {
            const uint32_t at = base + i % STAGES_P * STAGE;
#pragma unroll
            for (int j = 0; j < TAPS; ++j)
#pragma unroll
                for (int s = 0; s < 4; ++s) {
                    const uint32_t weights = at + j * TILE + a_rows + 32 * s;
                    const uint32_t source = at + 3 * TILE + b_first + j * row_shift + 32 * s;
                    if constexpr (ROWS == 32) {
                        // The positions as m (two m64 tiles of this warpgroup's 128), the 32 channels as n.
#pragma unroll
                        for (int tile = 0; tile < 2; ++tile)
                            wgmma::mma_async<32>(*reinterpret_cast<float(*)[16]>(acc + 16 * tile),
                                                 wgmma::descriptor_sw128(source + tile * 64 * 128, 1024),
                                                 wgmma::descriptor_sw128(weights, 1024), true);
                    } else {
                        wgmma::mma_async<N>(acc, wgmma::descriptor_sw128(weights, 1024),
                                            wgmma::descriptor_sw128(source, 1024), true);
                    }
                }
        });
        begin += run * chunks;
    };
    for (int b = 0; b < boxes; ++b) {
#pragma unroll
        for (int k = 0; k < N / 2; ++k) acc[k] = 0.0f;
        begin = b * count;
        consume_columns(std::integral_constant<int, 3>());
        consume_columns(std::integral_constant<int, 2>());
        consume_columns(std::integral_constant<int, 1>());
        const BoxCorner box = corner(b);
        store_product<ROWS>(p, acc, m0, box);
    }
}

#define CONV_TMA_PRODUCT_KERNEL(NAME, ROWS)                                                                          \
    extern "C" __global__ void __launch_bounds__(PIPELINE_THREADS, 1)                                               \
        NAME(const __grid_constant__ ConvTmaProductParams<__nv_bfloat16> p) {                                       \
        conv_tma_product<ROWS>(p);                                                                                   \
    }
// The same product under a name per role (the forward, the input gradient), so that a profile tells them apart.
CONV_TMA_PRODUCT_KERNEL(conv_fprop_tma_bf16, 128)
CONV_TMA_PRODUCT_KERNEL(conv_dgrad_tma_bf16, 128)
CONV_TMA_PRODUCT_KERNEL(conv_fprop_tma_bf16_m64, 64)
CONV_TMA_PRODUCT_KERNEL(conv_dgrad_tma_bf16_m64, 64)
CONV_TMA_PRODUCT_KERNEL(conv_dgrad_tma_bf16_n32, 32)

// Wp[a', m, k] from W (conv_tma.cuh): element e = (a' c_out + m) k_pad + k holds tap a = tap_of[a'] of W[m, k] (flip
// 0) or of W[k, m] (flip 1).
extern "C" __global__ void conv_tma_pack_bf16(const ConvTmaPackParams<__nv_bfloat16> p) {
    FOR_EACH(e, p.elements) {
        const int k = (int)(e % p.k_pad), m = (int)(e / p.k_pad % p.c_out), a = p.tap_of[e / p.k_pad / p.c_out];
        __nv_bfloat16 v = __float2bfloat16_rn(0.0f);
        if (k < p.c_src)
            v = p.flip ? p.w[((int64_t)k * p.c_out + m) * p.taps + a] : p.w[((int64_t)m * p.c_src + k) * p.taps + a];
        p.out[e] = v;
    }
}
