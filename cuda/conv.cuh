// Parameters of the exact float32 convolution products and the ordered sums of conv.cu.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

// The block tile of conv_gemm and conv_weight_grad: CONV_BM rows (output positions, or weight rows (cw, a)) x
// CONV_BN columns (output channels), CONV_BK reduction indices per shared-memory stage, CONV_THREADS threads
// (8 warps of 4 columns; 32 lanes of 4 rows).
constexpr int CONV_BM = 128;
constexpr int CONV_BN = 32;
constexpr int CONV_BK = 16;
constexpr int CONV_THREADS = 256;

// One implicit product out[m, col] = b[col] + sum_k A[m, k] B[k, col] (also taken by conv_tc.cu's tensor-core
// kernels, so that one product description serves both maths): rows m = (n, r) over batch x rows[0] x rows[1] x rows[2],
// columns col over c_dst output channels, reduction k = (c, q) over c_src source channels x taps[0] x taps[1] x
// taps[2], per axis d:
//   A[m, k] = src[n, c, src_mul*r + src_add + src_tap*q]   (0 outside the source map)
//   B[k, col] = w[col*w_dst + c*w_src + tap(a)],  a = tap_mul*q + tap_add,  tap(a) = (a0*kernel1 + a1)*kernel2 + a2
//   written at dst[n, col, dst_mul*r + dst_add].
// narrow_from_wide (conv forward, transposed conv input gradient) is one launch; wide_from_narrow (conv input
// gradient, transposed conv forward) one launch per stride phase. Grid (ceil(batch * prod(rows) / CONV_BM),
// ceil(c_dst / CONV_BN)), CONV_THREADS threads; batch * prod(rows) < 2^31. T is the storage type: float (the exact
// kernels here and tf32 ones of conv_tc.cu) or __nv_bfloat16 (conv_tc.cu's bf16 kernels); sums are float32.
template <typename T>
struct ConvGemmParams {
    const T* src;
    const T* w;
    const T* bias;  // (c_dst), or null for none
    T* dst;
    int batch;
    int c_src;
    int c_dst;
    int w_src;  // weight stride of a source channel
    int w_dst;  // weight stride of an output channel
    int src_size[3];  // spatial sizes of the source map
    int dst_size[3];  // spatial sizes of the output map
    int kernel[3];  // full kernel size
    int rows[3];  // output positions enumerated per axis
    int src_mul[3];
    int src_add[3];
    int dst_mul[3];
    int dst_add[3];
    int taps[3];  // taps enumerated per axis
    int src_tap[3];
    int tap_mul[3];
    int tap_add[3];
};

// The weight gradient dW[cn, j] = sum_{(n, o) in slice z} narrow[n, cn, o] wide[n, cw, o*s + a - p] over rows
// j = (cw, a) (c_wide x prod(kernel)), columns cn (c_narrow), the reduction over (n, o) (batch x prod(narrow_size))
// cut into slices of slice_len (a multiple of CONV_BK); block z writes partial[z, cn, j]. Also taken by conv_tc.cu.
// Grid (ceil(c_wide * prod(kernel) / CONV_BM), ceil(c_narrow / CONV_BN), slices),
// CONV_THREADS threads; batch * prod(narrow_size) < 2^31. The maps are of storage type T, the partial sums float32.
template <typename T>
struct ConvWgradParams {
    const T* narrow;
    const T* wide;
    float* partial;
    int batch;
    int c_narrow;
    int c_wide;
    int narrow_size[3];
    int wide_size[3];
    int kernel[3];
    int stride[3];
    int pad[3];
    int slice_len;
};

// out[e] = sum_{z = 0 .. slices-1} partial[z * n + e] for e < n, in that order (the weight gradient's slices, of
// either math). Grid-stride: any grid.
struct SumSlicesParams {
    const float* partial;
    float* out;
    int64_t n;
    int slices;
};

// x is (rows, channels, len); block (b = r * chunks + q, c) writes out[c, b] = sum_{v in chunk q} x[r, c, v], chunk q
// being [q * chunk_len, min(len, (q + 1) * chunk_len)), in float32 from x of storage type T. Grid (rows * chunks,
// channels), blockDim a multiple of 32, at most 1024.
template <typename T>
struct ChannelSumsParams {
    const T* x;
    float* out;
    int channels;
    int64_t len;
    int64_t chunk_len;
    int chunks;
};

// The columns of a convolution's wide map over its narrow positions, per batch item n a (channels x taps) x positions
// matrix: col[n, c taps + a, o] = src[n, c, o stride + a - pad] (0 outside src_size), o over narrow_size (row-major),
// a over the kernel's taps (row-major), each row `row` elements long (prod(narrow_size) rounded up to a multiple of 8:
// whole 16-byte pieces; the positions past prod(narrow_size) written as 0). A thread writes one 16-byte piece (8
// positions) of a row: pieces = batch x channels x taps x row / 8. Grid-stride: any grid. The B operand of
// gemm_wgmma.cu's conv_wgrad_gemm_wgmma_bf16.
template <typename T>
struct ConvIm2colParams {
    const T* src;
    T* col;
    int src_size[3];
    int narrow_size[3];
    int kernel[3];
    int stride[3];
    int pad[3];
    int row;
    int64_t pieces;
};

// The explicit forward and input gradient of a stride-1 convolution (Pairing::explicit_product): the source map
// written out as one row per position, rows[n S + o, c taps + a] = src[n, c, o + a - pad] (0 outside the map; S =
// prod(size) positions o, row-major, the same for source and output at stride 1; a over the kernel's taps,
// row-major), K = channels x taps a multiple of 8: a thread writes one 16-byte piece (8 consecutive (c, a)) of a row,
// pieces = batch S K / 8. Grid-stride: any grid. The B operand of gemm_wgmma.cu's conv_fprop_gemm_wgmma_bf16 and
// conv_dgrad_gemm_wgmma_bf16.
template <typename T>
struct ConvIm2rowParams {
    const T* src;
    T* rows;
    int size[3];
    int kernel[3];
    int pad[3];
    int channels;
    int64_t pieces;
};

// The input gradient's weight as a forward product's: out[cw, cn taps + a] = w[cn, cw, taps - 1 - a] (the kernel
// flipped and its two channel axes swapped), len = c_narrow c_wide taps elements. Grid-stride: any grid.
template <typename T>
struct ConvWeightFlipParams {
    const T* w;
    T* out;
    int c_narrow;
    int c_wide;
    int taps;
    int64_t len;
};

// The explicit product's float32 result in the map's layout: dst[n, c, o] = sum_z c_rows[z, c, n positions + o] +
// bias[c] (the slices z < slices of the split reduction added in order, each of len elements; bias may be null),
// rounded once to T; len = batch channels positions elements. Grid-stride: any grid.
template <typename T>
struct ConvRowsStoreParams {
    const float* c_rows;
    const T* bias;
    T* dst;
    int channels;
    int positions;
    int batch;
    int64_t len;
    int slices;
};

// One name per role of the same product, so that a profile says which pass it is timing.

// The exact float32 SIMT kernels (the parity path, --math exact), one name per role:
// conv forward: narrow_from_wide(x)
extern "C" __global__ void conv_fprop_f32(const ConvGemmParams<float> p);
// conv input gradient: wide_from_narrow(g), one launch per stride phase
extern "C" __global__ void conv_dgrad_f32(const ConvGemmParams<float> p);
// transposed conv forward: wide_from_narrow(x), one launch per stride phase
extern "C" __global__ void conv_transpose_fprop_f32(const ConvGemmParams<float> p);
// transposed conv input gradient: narrow_from_wide(g)
extern "C" __global__ void conv_transpose_dgrad_f32(const ConvGemmParams<float> p);
// conv weight gradient: weight_grad(g, x), slices
extern "C" __global__ void conv_wgrad_f32(const ConvWgradParams<float> p);
// transposed conv weight gradient: weight_grad(x, g), slices
extern "C" __global__ void conv_transpose_wgrad_f32(const ConvWgradParams<float> p);
// the weight gradient's slices (of either math and type) added in order
extern "C" __global__ void sum_slices(const SumSlicesParams p);
// one level of the bias gradient's per-channel sums, from either storage type
extern "C" __global__ void channel_sums_f32(const ChannelSumsParams<float> p);
extern "C" __global__ void channel_sums_bf16(const ChannelSumsParams<__nv_bfloat16> p);
// the wide map's columns for the weight gradient as one explicit product (gemm_wgmma.cu)
extern "C" __global__ void conv_im2col_bf16(const ConvIm2colParams<__nv_bfloat16> p);
// the explicit forward and input gradient of stride-1 convs (gemm_wgmma.cu's products between): the source map's
// rows, the input gradient's weight, the float32 result stored into the map with the bias
extern "C" __global__ void conv_im2row_bf16(const ConvIm2rowParams<__nv_bfloat16> p);
extern "C" __global__ void conv_weight_flip_bf16(const ConvWeightFlipParams<__nv_bfloat16> p);
extern "C" __global__ void conv_rows_store_bf16(const ConvRowsStoreParams<__nv_bfloat16> p);
