// Elementwise kernels, one thread per element (grid-stride), all taking EltwiseParams (elementwise.cuh):
//   add:        y = a + b
//   mul:        y = a * b
//   scale:      y = s * a
//   {f}_forward: y = f(x),  {f}_backward: dx = g * f'(x)   for f = leaky_relu (slope 0.01), silu, softplus (common.cuh)
//
// Cost per element (bytes: least traffic, 4 per float; FLOPs: adds, multiplies, divisions, comparisons, exponentials
// and logarithms count one each; see src/ops/mod.rs):
//   add_f32, mul_f32: 12 bytes, 1 FLOP        scale_f32: 8 bytes, 1 FLOP
//   {f}_forward: 8 bytes and 2 (leaky_relu), 4 (silu) or 3 (softplus) FLOPs;   {f}_backward: 12 bytes and 2, 8 or
//   5 FLOPs
#include "common.cuh"
#include "elementwise.cuh"

extern "C" __global__ void add_f32(const EltwiseParams p) {
    FOR_EACH(i, p.n) p.y[i] = p.a[i] + p.b[i];
}

extern "C" __global__ void mul_f32(const EltwiseParams p) {
    FOR_EACH(i, p.n) p.y[i] = p.a[i] * p.b[i];
}

extern "C" __global__ void scale_f32(const EltwiseParams p) {
    FOR_EACH(i, p.n) p.y[i] = p.s * p.a[i];
}

// One forward and one backward kernel per activation, so a profile names the function (the switch folds away).
#define ACTIVATION_KERNEL(FORWARD, BACKWARD, ACT)                                                                   \
    extern "C" __global__ void FORWARD(const EltwiseParams p) {                                                    \
        FOR_EACH(i, p.n) p.y[i] = activation_value(ACT, p.a[i]);                                                   \
    }                                                                                                              \
    extern "C" __global__ void BACKWARD(const EltwiseParams p) {                                                   \
        FOR_EACH(i, p.n) p.y[i] = p.b[i] * activation_derivative(ACT, p.a[i]);                                     \
    }
ACTIVATION_KERNEL(leaky_relu_forward, leaky_relu_backward, ACT_LEAKY_RELU)
ACTIVATION_KERNEL(silu_forward, silu_backward, ACT_SILU)
ACTIVATION_KERNEL(softplus_forward, softplus_backward, ACT_SOFTPLUS)
