// Parameters of the elementwise kernels of elementwise.cu (one thread per group of 16 bytes, grid-stride, so any grid).
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

// The operands of an elementwise kernel, of storage type T (float or __nv_bfloat16); each kernel below says which it
// uses.
template <typename T>
struct EltwiseParams {
    const T* a;  // first operand; the input x of an activation
    const T* b;  // second operand (add, mul); the incoming gradient g of an activation's backward
    T* y;        // the result: y, or dx for a backward
    float s;     // scale: the factor
    int64_t n;   // elements
};

// Each in a float32 and a bf16 instance (computing in float32, rounding the result once).
extern "C" __global__ void add_f32(const EltwiseParams<float> p);  // y = a + b
extern "C" __global__ void add_bf16(const EltwiseParams<__nv_bfloat16> p);
extern "C" __global__ void mul_f32(const EltwiseParams<float> p);  // y = a * b
extern "C" __global__ void mul_bf16(const EltwiseParams<__nv_bfloat16> p);
extern "C" __global__ void scale_f32(const EltwiseParams<float> p);  // y = s a
extern "C" __global__ void scale_bf16(const EltwiseParams<__nv_bfloat16> p);
extern "C" __global__ void leaky_relu_forward_f32(const EltwiseParams<float> p);  // y = f(a)
extern "C" __global__ void leaky_relu_forward_bf16(const EltwiseParams<__nv_bfloat16> p);
extern "C" __global__ void leaky_relu_backward_f32(const EltwiseParams<float> p);  // y = b f'(a)
extern "C" __global__ void leaky_relu_backward_bf16(const EltwiseParams<__nv_bfloat16> p);
extern "C" __global__ void silu_forward_f32(const EltwiseParams<float> p);
extern "C" __global__ void silu_forward_bf16(const EltwiseParams<__nv_bfloat16> p);
extern "C" __global__ void silu_backward_f32(const EltwiseParams<float> p);
extern "C" __global__ void silu_backward_bf16(const EltwiseParams<__nv_bfloat16> p);
extern "C" __global__ void softplus_forward_f32(const EltwiseParams<float> p);
extern "C" __global__ void softplus_forward_bf16(const EltwiseParams<__nv_bfloat16> p);
extern "C" __global__ void softplus_backward_f32(const EltwiseParams<float> p);
extern "C" __global__ void softplus_backward_bf16(const EltwiseParams<__nv_bfloat16> p);
