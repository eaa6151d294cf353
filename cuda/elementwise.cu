// Elementwise kernels, one thread per element (grid-stride), all taking EltwiseParams<T> (elementwise.cuh), each in a
// float32 and a bf16 instance that computes in float32:
//   add:        y = a + b   (also in place, y == a: tensor::add_assign, the tape's gradient accumulation)
//   mul:        y = a * b
//   scale:      y = s * a
//   {f}_forward: y = f(x),  {f}_backward: dx = g * f'(x)   for f = leaky_relu (slope 0.01), silu, softplus (common.cuh)
//
// Cost per element, in units of the storage size E (4 bytes float32, 2 bf16; FLOPs: adds, multiplies, divisions,
// comparisons, exponentials and logarithms count one each; see src/ops/mod.rs):
//   add, mul: 3E bytes, 1 FLOP        scale: 2E bytes, 1 FLOP
//   {f}_forward: 2E bytes and 2 (leaky_relu), 4 (silu) or 3 (softplus) FLOPs;   {f}_backward: 3E bytes and 2, 8 or
//   5 FLOPs
#include "common.cuh"
#include "elementwise.cuh"

namespace {

template <typename T>
__device__ void add(const EltwiseParams<T>& p) {
    FOR_EACH(i, p.n) p.y[i] = from_f32<T>(to_f32(p.a[i]) + to_f32(p.b[i]));
}

template <typename T>
__device__ void mul(const EltwiseParams<T>& p) {
    FOR_EACH(i, p.n) p.y[i] = from_f32<T>(to_f32(p.a[i]) * to_f32(p.b[i]));
}

template <typename T>
__device__ void scale(const EltwiseParams<T>& p) {
    FOR_EACH(i, p.n) p.y[i] = from_f32<T>(p.s * to_f32(p.a[i]));
}

// One forward and one backward kernel per activation, so a profile names the function (the switch folds away).
template <int ACT, typename T>
__device__ void activation_forward(const EltwiseParams<T>& p) {
    FOR_EACH(i, p.n) p.y[i] = from_f32<T>(activation_value(ACT, to_f32(p.a[i])));
}

template <int ACT, typename T>
__device__ void activation_backward(const EltwiseParams<T>& p) {
    FOR_EACH(i, p.n) p.y[i] = from_f32<T>(to_f32(p.b[i]) * activation_derivative(ACT, to_f32(p.a[i])));
}

template <typename T>
__device__ void leaky_relu_forward(const EltwiseParams<T>& p) { activation_forward<ACT_LEAKY_RELU>(p); }
template <typename T>
__device__ void leaky_relu_backward(const EltwiseParams<T>& p) { activation_backward<ACT_LEAKY_RELU>(p); }
template <typename T>
__device__ void silu_forward(const EltwiseParams<T>& p) { activation_forward<ACT_SILU>(p); }
template <typename T>
__device__ void silu_backward(const EltwiseParams<T>& p) { activation_backward<ACT_SILU>(p); }
template <typename T>
__device__ void softplus_forward(const EltwiseParams<T>& p) { activation_forward<ACT_SOFTPLUS>(p); }
template <typename T>
__device__ void softplus_backward(const EltwiseParams<T>& p) { activation_backward<ACT_SOFTPLUS>(p); }

}  // namespace

TYPED_KERNEL(add_f32, add_bf16, add, EltwiseParams)
TYPED_KERNEL(mul_f32, mul_bf16, mul, EltwiseParams)
TYPED_KERNEL(scale_f32, scale_bf16, scale, EltwiseParams)
TYPED_KERNEL(leaky_relu_forward_f32, leaky_relu_forward_bf16, leaky_relu_forward, EltwiseParams)
TYPED_KERNEL(leaky_relu_backward_f32, leaky_relu_backward_bf16, leaky_relu_backward, EltwiseParams)
TYPED_KERNEL(silu_forward_f32, silu_forward_bf16, silu_forward, EltwiseParams)
TYPED_KERNEL(silu_backward_f32, silu_backward_bf16, silu_backward, EltwiseParams)
TYPED_KERNEL(softplus_forward_f32, softplus_forward_bf16, softplus_forward, EltwiseParams)
TYPED_KERNEL(softplus_backward_f32, softplus_backward_bf16, softplus_backward, EltwiseParams)
