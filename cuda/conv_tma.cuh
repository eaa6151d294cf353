// The convolution weight gradient on Hopper's tensor memory accelerator (TMA) and warpgroup products (conv_tma.cu):
//
//   dW[cn, cw, a] = sum_{n, o} narrow[n, o, cn] wide[n, s o + a - pad, cw]        (0 outside the wide map)
//
// over channels-last copies of both maps (each voxel's channels contiguous, rounded up to a multiple of 8), kernel
// taps a = (az, ay, ax) of KZ x 3 x 3, stride s of 1 or 2 per axis. Each map is described to the TMA unit by a
// CUtensorMap of 5 axes (channels, x, y, z, batch item; bf16, 128-byte swizzle) made by the host (src/ops/conv.rs,
// Gpu::tensor_map_bf16) with boxes of 64 channels x box_x x box_y positions (box_x box_y = 64, box_x a multiple of
// 8): the narrow map's, and the wide map's of box_x x (box_y + 2) positions at stride 1 along y (the positions of a
// narrow box and the two rows its taps along y add), or at stride 2 two boxes of box_x x (box_y + 1) positions
// taken at steps of 2 along y (the even taps' rows from 2 y0 - pad, the odd tap's from 2 y0 - pad + 1), and every
// box taken at steps of s along x (the map's element strides).
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <stdint.h>

// Threads per block of conv_wgrad_tma_sum, and the consumers of the pipelined kernels: two warpgroups.
constexpr int CONV_TMA_THREADS = 256;
// Threads per block of the pipelined kernels (the weight gradient and the products): the two warpgroups that multiply
// and one producer warp that issues the copies.
constexpr int CONV_TMA_PIPELINE_THREADS = CONV_TMA_THREADS + 32;
// Narrow channels per block (the wgmma's m) are 128 in the _m128 kernels (each warpgroup 64 of them) and 64 in the _m64
// ones (both warpgroups on the same 64, each over half of every k-block's positions, for maps of at most 64 narrow
// channels); wide channels per block and tap (its n):
constexpr int CONV_TMA_COLS = 64;
// Positions per k-block (one box of box_x x box_y), and the taps that a block computes: one column (az, ax), ay = 0..2,
// whose wide operands lie in one box of box_x x (box_y + 2) positions, at most 3 x 64 (box_x 64).
constexpr int CONV_TMA_POSITIONS = 64;
constexpr int CONV_TMA_COLUMN_TAPS = 3;
// Stages of the pipeline, each the narrow boxes (two, or one for _m64) of 64 x 64 bf16 and the wide box (at most the
// bytes of 3 narrow ones).
constexpr int CONV_TMA_STAGES = 4;
constexpr int CONV_TMA_BOX_BYTES = CONV_TMA_POSITIONS * 64 * 2;
// Dynamic shared memory: the stages, 1024 bytes to align them to the swizzle's atoms, and the stages' two barriers
// (full, empty) of 8 bytes each.
constexpr int CONV_TMA_SHARED_BYTES_M128 =
    CONV_TMA_STAGES * (2 + CONV_TMA_COLUMN_TAPS) * CONV_TMA_BOX_BYTES + 1024 + 16 * CONV_TMA_STAGES;
constexpr int CONV_TMA_SHARED_BYTES_M64 =
    CONV_TMA_STAGES * (1 + CONV_TMA_COLUMN_TAPS) * CONV_TMA_BOX_BYTES + 1024 + 16 * CONV_TMA_STAGES;

// Grid (ceil(c_narrow / rows), ceil(c_wide / 64) x KZ x 3 tap columns, slices); slice s sums the k-blocks
// [s kblocks_per_slice, (s + 1) kblocks_per_slice) of the kblocks = batch x depth x y_blocks x x_blocks boxes of
// narrow positions (box b: x block b % x_blocks, then y block, z, batch item) into partial[s, a, cn, cw] (float32,
// taps outermost so that a block's rows are whole; conv_wgrad_tma_sum adds the slices into dW's layout);
// CONV_TMA_PIPELINE_THREADS threads.
struct ConvWgradTmaParams {
    // The narrow map, channels last: axes (c_narrow rounded up to 8, x, y, z, batch).
    CUtensorMap narrow_map;
    // The wide map, channels last: axes (c_wide rounded up to 8, x, y, z, batch).
    CUtensorMap wide_map;
    float* partial;
    int c_narrow;
    int c_wide;
    // The narrow map's depth (z positions per batch item).
    int depth;
    int pad[3];
    // The conv's stride per axis (z, y, x), each 1 or 2 (along y the box layout above; the wide map's box steps s
    // along x and y).
    int stride[3];
    int box_x;
    int box_y;
    int x_blocks;
    int y_blocks;
    int kblocks;
    int kblocks_per_slice;
};

// 3x3x3 and 1x3x3 (or 2D 3x3) kernels of 128 narrow channels per block, and of 64 (3x3x3 for strided convs only:
// conv.rs says why).
extern "C" __global__ void conv_wgrad_tma_bf16_k333_m128(const __grid_constant__ ConvWgradTmaParams p);
extern "C" __global__ void conv_wgrad_tma_bf16_k133_m128(const __grid_constant__ ConvWgradTmaParams p);
extern "C" __global__ void conv_wgrad_tma_bf16_k333_m64(const __grid_constant__ ConvWgradTmaParams p);
extern "C" __global__ void conv_wgrad_tma_bf16_k133_m64(const __grid_constant__ ConvWgradTmaParams p);

// dW[cn, cw, a] = sum over slices s (in order) of partial[s, a, cn, cw]: one thread per (cn, cw) and tap, blocks of
// CONV_TMA_SUM_PAIRS (cn, cw) pairs, their taps transposed through shared memory so that both sides are read and
// written in whole rows. Grid ceil(c_narrow c_wide / CONV_TMA_SUM_PAIRS), CONV_TMA_THREADS threads.
struct ConvWgradTmaSumParams {
    const float* partial;
    float* out;
    int64_t pairs;
    int taps;
    int slices;
};
constexpr int CONV_TMA_SUM_PAIRS = 64;
extern "C" __global__ void conv_wgrad_tma_sum(const ConvWgradTmaSumParams p);

// The forward and the input gradient of a conv as the same product over TMA boxes (conv_tma.cu), of stride 1 or 2
// per axis, on a grid of output positions o (size) that lie at out_step o + out_phase in the output map (out_size):
//
//   out[n, m, out_step o + out_phase] = b[m] + sum_c sum_{i < taps_c} sum_k Wp[w_c + i, m, k]
//                                                                         src[n, mul o + off_c + i e_y, k]
//
// over tap columns c (col_*: at most CONV_TMA_MAX_COLUMNS), each a source offset off_c = (col_z, col_y, col_x) and a
// run of taps_c (1 to 3) taps whose source rows follow one another (e_y: one index of the source box along y, which
// steps by the map's step along y), their packed weights from w_c on (col_weight); the columns of 3 taps first, then
// those of 2, then of 1 (the kernel consumes each run with its count of products fixed). The host (src/ops/conv.rs,
// `Pairing::tma_launches`) builds the columns of each pass. The forward of a conv of kernel k, stride s and padding
// p: m = its output channel, k its input channel, mul = s, the source map taken at steps of s along x and y (TMA
// element strides), one column per (az, ax) and residue r of ay modulo s_y, its taps ay = r, r + s_y, ... (a stride-1
// column: the three taps along y), off = (az - p_z, r - p_y, ax - p_x). The input gradient: m = its input channel, k
// its output channel, src = the conv's output gradient g (the narrow map), one product per stride phase rho (the
// input positions s o + rho: mul = 1, out_step = s, out_phase = rho; a stride-1 conv's one phase is the whole map):
// the taps a with a = rho + p (mod s) per axis, which read g at o + (rho + p - a) / s, a column per (az, ax), its taps
// ay in decreasing order (increasing source rows).
// src channels last (k < c_src rounded up to 8, described by src_map with boxes of 64 channels x box_x x box_rows
// positions: the output box of box_x x box_y = CONV_TMA_PRODUCT_POSITIONS positions, box_x 8, 16 or 32, and the rows
// that the longest run of taps adds), Wp packed by conv_tma_pack_bf16 (axes k, m, a': weight_map, boxes of 64 x rows
// x 1 tap, and weight_map3 of 3 taps), out channels first (c_out channels), bias b (c_out, or null). Grid
// (ceil(c_out / rows), at most `boxes`), CONV_TMA_PIPELINE_THREADS threads, CONV_TMA_PRODUCT_SHARED bytes of dynamic
// shared memory: one block per SM, each walking its boxes so that the producer copies the next box's first k-blocks
// while the warpgroups write the last one's sums.
constexpr int CONV_TMA_MAX_COLUMNS = 18;
template <typename T>
struct ConvTmaProductParams {
    // The source map, channels last: axes (c_src rounded up to 8, x, y, z, batch).
    CUtensorMap src_map;
    // The packed weight: axes (c_src rounded up to 8, c_out, packed taps), boxes of one tap (weight_map) and of three
    // (weight_map3: a column of 3 taps in one copy; as 3 copies the stride-1 forwards were up to 13% slower, H200).
    CUtensorMap weight_map;
    CUtensorMap weight_map3;
    T* out;
    const T* bias;
    int c_src;
    int c_out;
    // The grid of output positions (z, y, x) of this product, and the output map's size.
    int size[3];
    int out_size[3];
    // Output position o of the grid lies at out_step o + out_phase in the output map (per axis z, y, x).
    int out_step[3];
    int out_phase[3];
    // A column's source box for the output box at corner o: mul o + its offset (per axis z, y, x).
    int src_mul[3];
    int columns;
    int col_z[CONV_TMA_MAX_COLUMNS];
    int col_y[CONV_TMA_MAX_COLUMNS];
    int col_x[CONV_TMA_MAX_COLUMNS];
    // Taps of the column (1 to 3), and its first tap in the packed weight.
    int col_taps[CONV_TMA_MAX_COLUMNS];
    int col_weight[CONV_TMA_MAX_COLUMNS];
    int box_x;
    int box_y;
    // Rows of a source box: box_y and the rows that the longest run of taps adds.
    int box_rows;
    int x_blocks;
    int y_blocks;
    // Output boxes of the grid (batch x size[0] x y_blocks x x_blocks): block (i, j) takes boxes j, j + gridDim.y, ...
    int boxes;
};
// Output positions per block: 128 (128 rows of output channels), 256 in the _m64 kernels (64 rows, at most 64 output
// channels: each warpgroup on 128 of the positions) and in conv_dgrad_tma_bf16_n32.
constexpr int CONV_TMA_PRODUCT_POSITIONS = 128;
constexpr int CONV_TMA_PRODUCT_POSITIONS_M64 = 256;
// The widest output box (box_x is 8, 16 or 32: whole 8-row swizzle atoms per row of the box).
constexpr int CONV_TMA_PRODUCT_BOX_X_MAX = 32;
constexpr int CONV_TMA_PRODUCT_STAGES = 3;
// A stage: three taps of 128 rows of the packed weight (48 KB), and the source box of at most 128 + 2 x 32 positions
// (24 KB), 64 channels each (the _m64 kernels: 3 x 64 rows, 24 KB, and at most 256 + 2 x 32 positions, 40 KB).
constexpr int CONV_TMA_PRODUCT_STAGE_BYTES =
    3 * 128 * 64 * 2 + (CONV_TMA_PRODUCT_POSITIONS + 2 * CONV_TMA_PRODUCT_BOX_X_MAX) * 64 * 2;
constexpr int CONV_TMA_PRODUCT_SHARED =
    CONV_TMA_PRODUCT_STAGES * CONV_TMA_PRODUCT_STAGE_BYTES + 1024 + 16 * CONV_TMA_PRODUCT_STAGES;
// The forward's and the input gradient's kernels (the same code), in blocks of 128 and (_m64) 64 output channels.
extern "C" __global__ void conv_fprop_tma_bf16(const __grid_constant__ ConvTmaProductParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_tma_bf16(const __grid_constant__ ConvTmaProductParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_tma_bf16_m64(const __grid_constant__ ConvTmaProductParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_tma_bf16_m64(const __grid_constant__ ConvTmaProductParams<__nv_bfloat16> p);
// The input gradient into at most 32 channels in one block of 256 positions, the positions as the product's m (two
// m64 tiles per warpgroup) and the channels as its n (m64n32k16): a 64-row tile would be at least half empty. (A
// forward of this shape was slower than the halo kernels: flare-3d's last decoder stage 64 -> 32 at 40x224x192 0.874
// -> 1.032 ms, H100, 2026-12-08.)
extern "C" __global__ void conv_dgrad_tma_bf16_n32(const __grid_constant__ ConvTmaProductParams<__nv_bfloat16> p);

// The most taps of a kernel here (3x3x3), each packed once.
constexpr int CONV_TMA_MAX_TAPS = 27;
// Wp[a', m, k] = W[m, k, tap_of[a']] (flip 0, the forward) or W[k, m, tap_of[a']] (flip 1, the input gradient) for
// k < c_src, 0 for c_src <= k < k_pad: the A operand of conv_tma_product from a conv's weight W (c_narrow, c_wide,
// taps), its taps in the order of the product's columns. One thread per element of Wp (elements = taps c_out k_pad),
// grid-stride.
template <typename T>
struct ConvTmaPackParams {
    const T* w;
    T* out;
    int c_out;
    int c_src;
    int k_pad;
    int taps;
    int flip;
    int tap_of[CONV_TMA_MAX_TAPS];
    int64_t elements;
};
extern "C" __global__ void conv_tma_pack_bf16(const ConvTmaPackParams<__nv_bfloat16> p);
