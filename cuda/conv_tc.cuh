// Parameters of the tensor-core convolution products of conv_tc.cu.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

#include "conv.cuh"

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

// The products take conv.cuh's ConvGemmParams<T> (the same product as the exact kernels: one description serves both
// maths; here taps are at most CONV_TC_MAX_TAPS per axis) and the weight gradients its ConvWgradParams (slice_len a
// multiple of CONV_TC_BK). Grids: (ceil(batch * prod(rows) / CONV_TC_BM), ceil(c_dst / BN)) and
// (ceil(c_wide * prod(kernel) / CONV_TC_BM), ceil(c_narrow / BN), slices), CONV_TC_THREADS threads.

// One name per role and type, float32 accumulation: tf32 operands from float32 storage, bf16 from bf16 storage;
// _n32 instances use CONV_TC_BN_NARROW columns.
extern "C" __global__ void conv_fprop_tf32(const ConvGemmParams<float> p);
extern "C" __global__ void conv_fprop_tf32_n32(const ConvGemmParams<float> p);
extern "C" __global__ void conv_dgrad_tf32(const ConvGemmParams<float> p);
extern "C" __global__ void conv_dgrad_tf32_n32(const ConvGemmParams<float> p);
extern "C" __global__ void conv_transpose_fprop_tf32(const ConvGemmParams<float> p);
extern "C" __global__ void conv_transpose_fprop_tf32_n32(const ConvGemmParams<float> p);
extern "C" __global__ void conv_transpose_dgrad_tf32(const ConvGemmParams<float> p);
extern "C" __global__ void conv_transpose_dgrad_tf32_n32(const ConvGemmParams<float> p);
extern "C" __global__ void conv_wgrad_tf32(const ConvWgradParams<float> p);
extern "C" __global__ void conv_wgrad_tf32_n32(const ConvWgradParams<float> p);
extern "C" __global__ void conv_transpose_wgrad_tf32(const ConvWgradParams<float> p);
extern "C" __global__ void conv_transpose_wgrad_tf32_n32(const ConvWgradParams<float> p);
extern "C" __global__ void conv_fprop_bf16(const ConvGemmParams<__nv_bfloat16> p);
extern "C" __global__ void conv_fprop_bf16_n32(const ConvGemmParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_bf16(const ConvGemmParams<__nv_bfloat16> p);
extern "C" __global__ void conv_dgrad_bf16_n32(const ConvGemmParams<__nv_bfloat16> p);
extern "C" __global__ void conv_transpose_fprop_bf16(const ConvGemmParams<__nv_bfloat16> p);
extern "C" __global__ void conv_transpose_fprop_bf16_n32(const ConvGemmParams<__nv_bfloat16> p);
extern "C" __global__ void conv_transpose_dgrad_bf16(const ConvGemmParams<__nv_bfloat16> p);
extern "C" __global__ void conv_transpose_dgrad_bf16_n32(const ConvGemmParams<__nv_bfloat16> p);
extern "C" __global__ void conv_wgrad_bf16(const ConvWgradParams<__nv_bfloat16> p);
extern "C" __global__ void conv_wgrad_bf16_n32(const ConvWgradParams<__nv_bfloat16> p);
extern "C" __global__ void conv_transpose_wgrad_bf16(const ConvWgradParams<__nv_bfloat16> p);
extern "C" __global__ void conv_transpose_wgrad_bf16_n32(const ConvWgradParams<__nv_bfloat16> p);
