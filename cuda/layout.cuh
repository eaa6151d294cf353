// Parameters of the layout kernels of layout.cu (moves of elements, no arithmetic), generic over the storage type T
// (float or __nv_bfloat16); every kernel comes in a float32 and a bf16 instance, NAME_f32 and NAME_bf16.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

// pim_partition / pim_merge: one block moves a tile of PIM_TILE channels x PIM_SPAN * PIM_TILE voxels with
// PIM_TILE x PIM_ROWS threads (block (PIM_TILE, PIM_ROWS); each thread moves PIM_SPAN * PIM_TILE / PIM_ROWS
// elements).
constexpr int PIM_TILE = 32;
constexpr int PIM_ROWS = 8;
constexpr int PIM_SPAN = 4;

// A map (N, C, D, H, W) and its tokens (G, L, row); per spatial axis a (d, h, w), the token row of voxel coordinate s is
// (s / window[a]) outer[a] + (s % window[a]) inner[a], summed over the axes, plus n D H W. A token row holds the C
// channels and, where row > C, zeros after them (partition writes them, merge skips them): with one window per axis
// and row-major inner multipliers, partition is the channels-last copy of the wgmma convolutions (src/ops/conv.rs's
// channels_last, row = C rounded up to 8). Grid y of partition: ceil(row / PIM_TILE); of merge: ceil(C / PIM_TILE).
template <typename T>
struct PimParams {
    const T* src;       // the map (partition) or the tokens (merge)
    T* dst;             // the tokens (partition) or the map (merge)
    int64_t C;          // channels
    int64_t row;        // elements per token row, >= C
    int64_t size[3];    // D, H, W
    int64_t window[3];  // p_d, p_h, p_w
    int64_t outer[3];   // mi_a: the row multiplier of the block index s / p_a
    int64_t inner[3];   // mj_a: the row multiplier of the offset s % p_a
};

// copy_rows: dst[r * dst_row + dst_off + k] = src[r * src_row + src_off + k] for r < rows, k < len.
// narrow_backward: dx (rows x dst_row) from g (rows x len): dx[r, j] = g[r, j - dst_off] inside the slice, else 0.
// narrow_add_backward: dx[r, dst_off + k] += g[r, k] for r < rows, k < len: dx is the input's gradient so far.
template <typename T>
struct CopyRowsParams {
    const T* src;
    T* dst;
    int64_t rows;
    int64_t len;
    int64_t src_row;
    int64_t src_off;
    int64_t dst_row;
    int64_t dst_off;
};

// flip_seq: y[g, l, c] = x[g, L - 1 - l, c].
template <typename T>
struct FlipParams {
    const T* x;
    T* y;
    int64_t G;
    int64_t L;
    int64_t C;
};

// depth_to_space: taps as channels moved to their voxels (a transposed conv whose kernel equals its stride): z (N, C K,
// D, H, W) with K = kd kh kw and y (N, C, D kd, H kh, W kw) hold the same elements,
// y[n, c, d kd + a, h kh + b, w kw + e] = z[n, c K + (a kh + b) kw + e, d, h, w].
template <typename T>
struct DepthToSpaceParams {
    const T* src;     // z
    T* dst;           // y
    int64_t N;        // batch
    int64_t C;        // channels of y
    int64_t size[3];  // D, H, W: z's spatial sizes
    int64_t k[3];     // kd, kh, kw
};

// block (PIM_TILE, PIM_ROWS), grid in layout.cu
extern "C" __global__ void pim_partition_f32(const PimParams<float> p);
extern "C" __global__ void pim_partition_bf16(const PimParams<__nv_bfloat16> p);
// the same launch
extern "C" __global__ void pim_merge_f32(const PimParams<float> p);
extern "C" __global__ void pim_merge_bf16(const PimParams<__nv_bfloat16> p);
// one chunk of VEC<T> elements of the copied rows per thread (grid_vec), any grid
extern "C" __global__ void copy_rows_f32(const CopyRowsParams<float> p);
extern "C" __global__ void copy_rows_bf16(const CopyRowsParams<__nv_bfloat16> p);
// one chunk of VEC<T> elements of dx per thread (grid_vec), any grid
extern "C" __global__ void narrow_backward_f32(const CopyRowsParams<float> p);
extern "C" __global__ void narrow_backward_bf16(const CopyRowsParams<__nv_bfloat16> p);
extern "C" __global__ void narrow_add_backward_f32(const CopyRowsParams<float> p);
extern "C" __global__ void narrow_add_backward_bf16(const CopyRowsParams<__nv_bfloat16> p);
// one chunk of VEC<T> elements of y per thread (grid_vec), any grid
extern "C" __global__ void flip_seq_f32(const FlipParams<float> p);
extern "C" __global__ void flip_seq_bf16(const FlipParams<__nv_bfloat16> p);
// one chunk of VEC<T> elements of the destination per thread (grid_vec), any grid
extern "C" __global__ void depth_to_space_f32(const DepthToSpaceParams<float> p);
extern "C" __global__ void depth_to_space_bf16(const DepthToSpaceParams<__nv_bfloat16> p);
