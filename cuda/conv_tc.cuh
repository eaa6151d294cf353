// Parameters of the tensor-core convolution products of conv_tc.cu.
#pragma once
#include <stdint.h>

// The block tile: CONV_TC_BM output positions (rows) x CONV_TC_BN or CONV_TC_BN_NARROW output channels (columns),
// CONV_TC_BK reduction indices per shared-memory stage, CONV_TC_STAGES stages in flight (cp.async pipeline),
// CONV_TC_THREADS threads (8 warps: 4 along the rows x 2 along the columns).
constexpr int CONV_TC_BM = 128;
constexpr int CONV_TC_BN = 64;
constexpr int CONV_TC_BN_NARROW = 32;
constexpr int CONV_TC_BK = 16;
constexpr int CONV_TC_STAGES = 3;
constexpr int CONV_TC_THREADS = 256;
// Taps per axis the row masks hold (bits TAP_BITS d + q of a 32-bit mask; bit 31 marks a padded reduction index).
constexpr int CONV_TC_MAX_TAPS = 10;

// One implicit product out[m, col] = b[col] + sum_k A[m, k] B[k, col] (the conv_gemm product of conv.cu: rows
// m = (n, r) over batch x rows, columns the output channels, reduction k = (c, q) over source channels x taps):
//   A[m, k] = src[n, c, src_mul*r + src_add + src_tap*q]   (0 outside the source map)
//   B[k, col] = w[col*w_dst + c*w_src + tap(a)],  a = tap_mul*q + tap_add
//   written at dst[n, col, dst_mul*r + dst_add].
// Grid (ceil(batch * prod(rows) / CONV_TC_BM), ceil(c_dst / BN)), CONV_TC_THREADS threads.
struct ConvTcParams {
    const float* src;
    const float* w;
    const float* bias;  // (c_dst), or null for none
    float* dst;
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
    int taps[3];  // taps enumerated per axis, each at most CONV_TC_MAX_TAPS
    int src_tap[3];
    int tap_mul[3];
    int tap_add[3];
};

// The weight gradient dW[cn, j] = sum_{(n, o) in slice z} narrow[n, cn, o] wide[n, cw, o*s + a - p] over rows
// j = (cw, a) (c_wide x prod(kernel)), columns cn (c_narrow), the reduction over (n, o) cut into slices of slice_len
// (a multiple of CONV_TC_BK); block z writes partial[z, cn, j]. Grid (ceil(rows / CONV_TC_BM), ceil(c_narrow / BN),
// slices), CONV_TC_THREADS threads; kernel sizes at most CONV_TC_MAX_TAPS.
struct ConvWgradTcParams {
    const float* narrow;
    const float* wide;
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

// One name per role, tf32 operands, float32 accumulation; _n32 instances use CONV_TC_BN_NARROW columns.
extern "C" __global__ void conv_fprop_tf32(const ConvTcParams p);
extern "C" __global__ void conv_fprop_tf32_n32(const ConvTcParams p);
extern "C" __global__ void conv_dgrad_tf32(const ConvTcParams p);
extern "C" __global__ void conv_dgrad_tf32_n32(const ConvTcParams p);
extern "C" __global__ void conv_transpose_fprop_tf32(const ConvTcParams p);
extern "C" __global__ void conv_transpose_fprop_tf32_n32(const ConvTcParams p);
extern "C" __global__ void conv_transpose_dgrad_tf32(const ConvTcParams p);
extern "C" __global__ void conv_transpose_dgrad_tf32_n32(const ConvTcParams p);
extern "C" __global__ void conv_wgrad_tf32(const ConvWgradTcParams p);
extern "C" __global__ void conv_wgrad_tf32_n32(const ConvWgradTcParams p);
extern "C" __global__ void conv_transpose_wgrad_tf32(const ConvWgradTcParams p);
extern "C" __global__ void conv_transpose_wgrad_tf32_n32(const ConvWgradTcParams p);
