// Parameters of the elementwise kernels of elementwise.cu (one thread per element, grid-stride, so any grid).
#pragma once
#include <stdint.h>

// The operands of an elementwise kernel; each kernel below says which it uses.
struct EltwiseParams {
    const float* a;  // first operand; the input x of an activation
    const float* b;  // second operand (add, mul); the incoming gradient g of an activation's backward
    float* y;        // the result: y, or dx for a backward
    float s;         // scale_f32: the factor
    int64_t n;       // elements
};

extern "C" __global__ void add_f32(const EltwiseParams p);              // y = a + b
extern "C" __global__ void mul_f32(const EltwiseParams p);              // y = a * b
extern "C" __global__ void scale_f32(const EltwiseParams p);            // y = s a
extern "C" __global__ void leaky_relu_forward(const EltwiseParams p);   // y = f(a)
extern "C" __global__ void leaky_relu_backward(const EltwiseParams p);  // y = b f'(a)
extern "C" __global__ void silu_forward(const EltwiseParams p);
extern "C" __global__ void silu_backward(const EltwiseParams p);
extern "C" __global__ void softplus_forward(const EltwiseParams p);
extern "C" __global__ void softplus_backward(const EltwiseParams p);
