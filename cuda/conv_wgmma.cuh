// Parameters of the halo-tile convolution products on Hopper's warpgroup matrix products (conv_wgmma.cu, sm_90a;
// bf16 operands, float32 accumulation): the stride-1 products of conv_halo.cuh's ConvHaloParams (a stride-1 conv's
// forward, the input gradient's stride phases of any conv) computed by wgmma from the same packed weight.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

// A block: CONV_WGMMA_THREADS threads (two warpgroups), a box of CONV_WGMMA_TILES tiles of 64 output positions (8
// rows of CONV_WGMMA_TILE_X along the last axis, the m of one wgmma) and BN = 64 or (the _n32 kernels) 32 output
// channels; per pipeline stage a chunk of CONV_WGMMA_CHUNK source channels (one k-step of 16 per tap).
constexpr int CONV_WGMMA_THREADS = 256;
constexpr int CONV_WGMMA_TILES = 4;
constexpr int CONV_WGMMA_TILE_X = 8;
constexpr int CONV_WGMMA_CHUNK = 16;
constexpr int CONV_WGMMA_BN = 64;
constexpr int CONV_WGMMA_BN_NARROW = 32;
// The most halo voxels a box stages (a halo of 3 slices comes in boxes of 2 or 4: 4 x 18 x 10 at most; one of 1 in
// any box, 1 x 34 x 10 at most).
constexpr int CONV_WGMMA_MAX_HALO = 720;

// The products' _cl kernels read their source (ConvWgmmaParams' src) channels last, src[n, v, c] at (n V + v) c_pad + c
// with c_pad = c rounded up to a multiple of 8 (the channels past c zero): a halo voxel's 16 channels of a stage are
// then two 16-byte cp.async copies, where from channels-first maps they are 16 element loads through registers (or
// 8-byte loads of 4 voxels). layout.cu's pim_partition writes that copy of a channels-first map (one window over
// the whole map, token rows of c_pad elements: src/ops/conv.rs's channels_last).

// out[n, col, dst_base + dst_step . r] = b[col] + sum_{c, q} src[n, c, r + lo + q] Wp[c, q, col] over output rows r in
// rows (per axis), source channels c < c_src and taps q in taps (at most 3 per axis), source positions outside
// src_size reading 0 (src channels first, or last for the _cl kernels, above); Wp is conv_halo.cuh's packed weight
// (conv_pack_bf16, chunk 16, c_dst_pad a multiple of BN).
// The box is box_z (1, 2 or 4) slices x 8 (4 / box_z) rows x 8 columns of output positions, its halo = prod(box +
// taps - 1) voxels at most CONV_WGMMA_MAX_HALO; the boxes (batch * ceil(rows[0] / box_z) * ceil(rows[1] / (8 (4 /
// box_z))) * ceil(rows[2] / 8) of them) are dealt to the blocks in turn: block x takes boxes x, x + grid x, ... Grid
// (at most boxes, ceil(c_dst / BN)), dynamic shared memory 2 * 16 * (2 halo + prod(taps) 2 BN) bytes.
template <typename T>
struct ConvWgmmaParams {
    const T* src;
    const T* packed;  // the packed weight
    const T* bias;  // (c_dst), or null for none
    T* dst;
    int c_src;
    int c_dst;
    int c_dst_pad;
    int src_size[3];
    int dst_size[3];
    int rows[3];
    int lo[3];  // source offset of tap 0 from the output position
    int dst_base;  // flat output position of row (0, 0, 0)
    int dst_step[3];  // flat output steps per row along each axis
    int taps[3];
    int box_z;  // output slices per box: 1, 2 or 4
    int boxes;
};

// The weight gradient of a stride-1 convolution of a KZ x 3 x 3 kernel (KZ 1 or 3; a 2D 3x3 conv is 1x3x3 here) on
// wgmma, dW[cn, cw, a] = sum_{n, o} narrow[n, cn, o] wide[n, cw, o + a - pad] (c_narrow x narrow voxels and c_wide x
// wide voxels below 2^31; pad 1 along y and x; the wide map's width a multiple of 4 and `wide` 8-byte aligned): block
// (x, y, z) computes narrow channels cn of tile x (CONV_WGMMA_WG_ROWS, the m of the wgmma), wide channels cw of tile y
// (COLS = CONV_WGMMA_WG_COLS_K3 or _K1 by the kernel's depth, its n) and every tap, over the boxes of narrow positions
// (BOX_Z x 8 (4 / BOX_Z) x 8, the products' boxes, enumerated over batch x narrow_size) from z boxes_per_slice up to
// min(boxes, (z + 1) boxes_per_slice), and writes partial[z, cn, cw 9 KZ + a] (conv.cuh's slice layout, summed in
// order by sum_slices). KZ and BOX_Z are the kernel's (its name: _k333_z4 is KZ 3, BOX_Z 4). Grid (ceil(c_narrow /
// CONV_WGMMA_WG_ROWS), ceil(c_wide / COLS), slices), CONV_WGMMA_THREADS threads, dynamic shared memory 2 * 16 * (COLS
// / 8 halo + CONV_WGMMA_WG_ROWS * CONV_WGMMA_WG_PITCH) bytes with halo = (BOX_Z + KZ - 1) (8 (4 / BOX_Z) + 2) 10
// voxels.
template <typename T>
struct ConvWgradWgmmaParams {
    const T* narrow;
    const T* wide;
    float* partial;
    int c_narrow;
    int c_wide;
    int narrow_size[3];
    int wide_size[3];
    int pad[3];
    int boxes;
    int boxes_per_slice;
};
constexpr int CONV_WGMMA_WG_ROWS = 64;
constexpr int CONV_WGMMA_WG_COLS_K3 = 16;
constexpr int CONV_WGMMA_WG_COLS_K1 = 32;
// 16-byte units between two narrow channels' staged rows: a box's 32 rows of 8 positions and one more, so that the 8
// rows of an ldmatrix fall in 8 different bank groups.
constexpr int CONV_WGMMA_WG_PITCH = 33;

// One name per role (conv forward, conv input gradient); _n32 for outputs of at most 32 channels. The plain names take
// any taps (at most 3 per axis) and box depth from the parameters; _k333_z4 and the like are a 3x3x3 or 1x3x3
// kernel in boxes of 4, 2 or 1 slices, their own geometry (p.taps and p.box_z must match it; from a channels-first
// source lo -1 along y and x, the source's width a multiple of 4 and src 8-byte aligned). The _cl names read a
// channels-last source (above), with no condition on its width or alignment.
extern "C" __global__ void conv_fprop_wgmma_bf16(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_wgmma_bf16_k333_z4(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_wgmma_bf16_k333_z2(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_wgmma_bf16_k133_z4(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_wgmma_bf16_k133_z2(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_wgmma_bf16_k133_z1(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_wgmma_bf16_n32(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_wgmma_bf16_n32_k333_z4(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_wgmma_bf16_n32_k333_z2(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_wgmma_bf16_n32_k133_z4(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_wgmma_bf16_n32_k133_z2(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_wgmma_bf16_n32_k133_z1(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_wgmma_bf16(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_wgmma_bf16_k333_z4(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_wgmma_bf16_k333_z2(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_wgmma_bf16_k133_z4(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_wgmma_bf16_k133_z2(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_wgmma_bf16_k133_z1(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_wgmma_bf16_n32(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_wgmma_bf16_n32_k333_z4(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_wgmma_bf16_n32_k333_z2(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_wgmma_bf16_n32_k133_z4(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_wgmma_bf16_n32_k133_z2(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_wgmma_bf16_n32_k133_z1(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_wgmma_cl_bf16(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_wgmma_cl_bf16_k333_z4(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_wgmma_cl_bf16_k333_z2(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_wgmma_cl_bf16_k133_z4(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_wgmma_cl_bf16_k133_z2(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_wgmma_cl_bf16_k133_z1(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_wgmma_cl_bf16_n32(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_wgmma_cl_bf16_n32_k333_z4(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_wgmma_cl_bf16_n32_k333_z2(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_wgmma_cl_bf16_n32_k133_z4(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_wgmma_cl_bf16_n32_k133_z2(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_wgmma_cl_bf16_n32_k133_z1(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_wgmma_cl_bf16(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_wgmma_cl_bf16_k333_z4(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_wgmma_cl_bf16_k333_z2(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_wgmma_cl_bf16_k133_z4(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_wgmma_cl_bf16_k133_z2(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_wgmma_cl_bf16_k133_z1(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_wgmma_cl_bf16_n32(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_wgmma_cl_bf16_n32_k333_z4(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_wgmma_cl_bf16_n32_k333_z2(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_wgmma_cl_bf16_n32_k133_z4(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_wgmma_cl_bf16_n32_k133_z2(const ConvWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_wgmma_cl_bf16_n32_k133_z1(const ConvWgmmaParams<__nv_bfloat16> p);
// conv weight gradient, per kernel (3x3x3, 1x3x3) and box depth (4, 2, 1 slices).
extern "C" __global__ void conv_wgrad_wgmma_bf16_k333_z4(const ConvWgradWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_wgrad_wgmma_bf16_k333_z2(const ConvWgradWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_wgrad_wgmma_bf16_k133_z4(const ConvWgradWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_wgrad_wgmma_bf16_k133_z2(const ConvWgradWgmmaParams<__nv_bfloat16> p);
extern "C" __global__ void conv_wgrad_wgmma_bf16_k133_z1(const ConvWgradWgmmaParams<__nv_bfloat16> p);
