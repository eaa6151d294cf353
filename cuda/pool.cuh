// Parameters of the average pooling and nearest upsampling kernels of pool.cu (one chunk of VEC<T> written elements per
// thread, grid-stride, so any grid; the host launches grid_vec), generic over the storage type T (float or
// __nv_bfloat16); every kernel comes in a float32 and a bf16 instance, NAME_f32 and NAME_bf16.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

// One resampling of P = N*C planes between the fine grid (D, H, W) and the coarse one; per axis, factor k (pooling
// window = stride) or f (upsampling repeat). The source and destination are the kernel's: x -> y forward, g -> dx
// backward.
template <typename T>
struct PoolParams {
    const T* src;        // x, or the gradient g of the kernel's output
    T* dst;              // y, or dx
    int64_t total;       // elements of dst
    int64_t in_size[3];  // the op's input spatial size (D, H, W)
    int64_t out_size[3]; // the op's output spatial size (OD, OH, OW)
    int64_t factor[3];   // pooling: kernel = stride (kd, kh, kw); upsampling: repeat (fd, fh, fw)
};

extern "C" __global__ void avg_pool_forward_f32(const PoolParams<float> p);
extern "C" __global__ void avg_pool_forward_bf16(const PoolParams<__nv_bfloat16> p);
extern "C" __global__ void avg_pool_backward_f32(const PoolParams<float> p);
extern "C" __global__ void avg_pool_backward_bf16(const PoolParams<__nv_bfloat16> p);
extern "C" __global__ void upsample_nearest_forward_f32(const PoolParams<float> p);
extern "C" __global__ void upsample_nearest_forward_bf16(const PoolParams<__nv_bfloat16> p);
extern "C" __global__ void upsample_nearest_backward_f32(const PoolParams<float> p);
extern "C" __global__ void upsample_nearest_backward_bf16(const PoolParams<__nv_bfloat16> p);
