// Parameters of the halo-tile convolution products of conv_halo.cu (at most 3 taps per axis; bf16 or tf32).
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

// The block tile: a box of BM output positions (1 x (BM / tile_x) x tile_x), BM = CONV_HALO_BM or, for the wide
// tile where such boxes cover little more of the map (conv.rs), CONV_HALO_BM_LARGE, x CONV_HALO_BN or
// CONV_HALO_BN_NARROW output channels; per pipeline stage
// a chunk of source channels of CONV_HALO_WORDS 32-bit operand words (16 bf16 channels as pairs, or 8 float32
// channels: one mma k-step per tap); CONV_HALO_THREADS threads (8 warps: 4 along the positions x 2 along the
// channels, or for the narrow tile 8 along the positions). The weight gradient's box is CONV_HALO_BM positions.
constexpr int CONV_HALO_BM = 128;
constexpr int CONV_HALO_BM_LARGE = 256;
// Boxes of the products whose source steps by 2 along y and x (a strided conv's forward; along z by 1 or 2, a constant
// of the kernel: _s64, _s64z2): their halo is split by phase and about four times the box (tile_x 8 or 16), held at
// CONV_HALO_PAIR_STRIDE_LARGE.
constexpr int CONV_HALO_BM_STRIDED = 64;
constexpr int CONV_HALO_BN = 64;
constexpr int CONV_HALO_BN_NARROW = 32;
constexpr int CONV_HALO_WORDS = 8;
constexpr int CONV_HALO_THREADS = 256;
// Taps per axis the halo holds.
constexpr int CONV_HALO_MAX_TAPS = 3;
// 32-bit words between two operand words' rows of the halo, per box: at least its most voxels (3 taps per axis:
// 3 x 6 x 34 = 612 for 128 positions, 3 x 10 x 34 = 1020 for 256); 8 mod 32 spreads a warp's fragment loads over the
// banks.
constexpr int CONV_HALO_PAIR_STRIDE = 616;
constexpr int CONV_HALO_PAIR_STRIDE_LARGE = 1032;

// One product out[n, col, dst_base + dst_step . r] = b[col] + sum_{c, q} src[n, c, s r + lo + q] Wp[c, q, col] (the
// output at a flat position of its map) over output positions r in rows (per axis), source channels c < c_src and
// taps q in taps (per axis), source positions outside src_size reading 0: the source is walked one position per tap
// and, per row, s = 1 or, in the kernels of boxes of CONV_HALO_BM_STRIDED, s = (1 or 2, 2, 2) (a strided conv's
// forward); the output may be written at a stride (dst_step: a stride phase of a strided conv's input gradient,
// conv.rs's wide_from_narrow); Wp is the packed weight of conv_pack_*: [ceil(c_src / chunk)][prod(taps)]
// [c_dst_pad][chunk], chunk = CONV_HALO_WORDS * 4 / sizeof(T) channels. Grid (batch * rows[0] *
// ceil(rows[1] / tile_y) * ceil(rows[2] / tile_x), ceil(c_dst / BN)) with tile_y = BM / tile_x, CONV_HALO_THREADS
// threads, dynamic shared memory 2 * 4 * CONV_HALO_WORDS * (pair stride + prod(taps) * BN) bytes (the pair stride
// of the kernel's box: CONV_HALO_PAIR_STRIDE for CONV_HALO_BM, else _LARGE).
template <typename T>
struct ConvHaloParams {
    const T* src;
    const T* packed;  // the packed weight
    const T* bias;  // (c_dst), or null for none
    T* dst;
    int batch;
    int c_src;
    int c_dst;
    int c_dst_pad;  // c_dst rounded up to the tile's columns
    int src_size[3];
    int dst_size[3];
    int rows[3];
    int lo[3];  // source offset of tap 0 from the output position
    int dst_base;  // flat output position of row (0, 0, 0)
    int dst_step[3];  // flat output steps per row along each axis (the map's strides, times the output stride)
    int taps[3];
    int tile_x;  // 8, 16 or 32: output positions of the box along the last axis
};

// packed[(((k / chunk * prod(taps) + q) * parts + part) * c_dst_pad + col) * (chunk / parts) + k % (chunk / parts)] =
// w[col*w_dst + k*w_src + tap(a)] with part = k % chunk / (chunk / parts) (parts 1: a row of the chunk's channels per
// column, the halo products'; 2: conv_wgmma.cu's two halves of 8 channels, each a row per column)
// (float32 rounded to tf32) for source channel k < c_src and col < c_dst (else 0), the tap a of the product's
// enumeration (conv.cuh's ConvGemmParams) for halo tap q: per axis q' = taps - 1 - q where flip is set (the product
// walks the source backwards), else q, and a = tap_mul*q' + tap_add, tap(a) flat over kernel. Grid-stride over len.
template <typename T>
struct ConvPackParams {
    const T* w;
    T* packed;
    int c_src;
    int c_dst;
    int c_dst_pad;
    int w_src;
    int w_dst;
    int kernel[3];
    int taps[3];
    int tap_mul[3];
    int tap_add[3];
    int flip[3];
    int parts;  // 1 or 2
    int64_t len;
};

// The weight gradient of a stride-1 convolution, dW[cn, cw, a] = sum_{n, o} narrow[n, cn, o] wide[n, cw, o + a - pad]
// (a over kernel, at most 3 per axis), from halo tiles: block (x, y, z) computes rows cw of tile x
// (CONV_HALO_WG_ROWS), columns cn of tile y (CONV_HALO_WG_COLS) and every tap, over the boxes of 128 narrow positions
// (1 x (CONV_HALO_BM / tile_x) x tile_x, enumerated over batch x narrow_size) z * boxes_per_slice ..
// min(boxes, (z + 1) * boxes_per_slice) - 1, and writes partial[z, cn, cw * prod(kernel) + a] (conv.cuh's slice
// layout, summed in order by sum_slices). Grid (ceil(c_wide / CONV_HALO_WG_ROWS), ceil(c_narrow / CONV_HALO_WG_COLS),
// slices), CONV_HALO_THREADS threads, dynamic shared memory 4 * CONV_HALO_WG_SHARED_WORDS bytes.
template <typename T>
struct ConvWgradHaloParams {
    const T* narrow;
    const T* wide;
    float* partial;
    int batch;
    int c_narrow;
    int c_wide;
    int narrow_size[3];
    int wide_size[3];
    int kernel[3];
    int pad[3];
    int tile_x;
    int boxes;
    int boxes_per_slice;
};
// Its tile, its pipeline stages (boxes in flight) and its shared memory in 32-bit words: per stage the wide map's halo
// (CONV_HALO_WG_ROWS rows of at most 612 words) and the narrow map's box (CONV_HALO_WG_COLS rows of 128 positions),
// laid out for float32 (bf16 takes about half: conv_halo.cu's WgradLayout).
constexpr int CONV_HALO_WG_ROWS = 16;
constexpr int CONV_HALO_WG_COLS = 32;
constexpr int CONV_HALO_WG_STAGES = 2;
constexpr int CONV_HALO_WG_SHARED_WORDS = CONV_HALO_WG_STAGES * (CONV_HALO_WG_ROWS * 612 + CONV_HALO_WG_COLS * 132);

// One name per role (conv forward, conv input gradient) and math, each its weight packing and its product; _n32 for
// outputs of at most 32 channels, _m256 for boxes of CONV_HALO_BM_LARGE positions, _s64 / _s64z2 for the strided
// forward's boxes of CONV_HALO_BM_STRIDED (source stride (1, 2, 2) / (2, 2, 2)).
extern "C" __global__ void conv_fprop_pack_tf32(const ConvPackParams<float> p);
extern "C" __global__ void conv_dgrad_pack_tf32(const ConvPackParams<float> p);
extern "C" __global__ void conv_fprop_pack_bf16(const ConvPackParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_pack_bf16(const ConvPackParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_halo_tf32(const ConvHaloParams<float> p);
extern "C" __global__ void conv_fprop_halo_tf32_n32(const ConvHaloParams<float> p);
extern "C" __global__ void conv_fprop_halo_tf32_m256(const ConvHaloParams<float> p);
extern "C" __global__ void conv_fprop_halo_tf32_s64(const ConvHaloParams<float> p);
extern "C" __global__ void conv_fprop_halo_tf32_s64z2(const ConvHaloParams<float> p);
extern "C" __global__ void conv_dgrad_halo_tf32(const ConvHaloParams<float> p);
extern "C" __global__ void conv_dgrad_halo_tf32_n32(const ConvHaloParams<float> p);
extern "C" __global__ void conv_dgrad_halo_tf32_m256(const ConvHaloParams<float> p);
extern "C" __global__ void conv_fprop_halo_bf16(const ConvHaloParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_halo_bf16_n32(const ConvHaloParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_halo_bf16_m256(const ConvHaloParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_halo_bf16_s64(const ConvHaloParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_halo_bf16_s64z2(const ConvHaloParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_halo_bf16(const ConvHaloParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_halo_bf16_n32(const ConvHaloParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_halo_bf16_m256(const ConvHaloParams<__nv_bfloat16> p);
extern "C" __global__ void conv_wgrad_halo_tf32(const ConvWgradHaloParams<float> p);
extern "C" __global__ void conv_wgrad_halo_bf16(const ConvWgradHaloParams<__nv_bfloat16> p);
