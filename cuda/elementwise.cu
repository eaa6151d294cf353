// Elementwise kernels, all taking EltwiseParams<T> (elementwise.cuh), each in a float32 and a bf16 instance that
// computes in float32 and rounds each result once:
//   add:        y = a + b   (also in place, y == a: tensor::add_assign, the tape's gradient accumulation)
//   mul:        y = a * b
//   scale:      y = s * a
//   {f}_forward: y = f(x),  {f}_backward: dx = g * f'(x)   for f = leaky_relu (slope 0.01), silu, softplus (common.cuh)
//
// Threads. One thread per group of VEC<T> consecutive elements (4 float32, 8 bf16; grid-stride over the
// ceil(n / VEC<T>) groups, so any grid): one 16-byte load per operand and one 16-byte store when every pointer is
// 16-byte aligned (the host's buffers are), element access otherwise and for the last group when n is not a multiple
// of VEC<T>. The value of each element does not depend on the path. In place (y == a) each thread reads its whole
// group before writing it, and no two threads share a group.
//
// Cost per element, in units of the storage size E (4 bytes float32, 2 bf16; FLOPs: adds, multiplies, divisions,
// comparisons, exponentials and logarithms count one each; see src/ops/mod.rs):
//   add, mul: 3E bytes, 1 FLOP        scale: 2E bytes, 1 FLOP
//   {f}_forward: 2E bytes and 2 (leaky_relu), 4 (silu) or 3 (softplus) FLOPs;   {f}_backward: 3E bytes and 2, 8 or
//   5 FLOPs
// Instructions: per group one 16-byte load per operand, one store, and the group's index arithmetic (64-bit, once
// per VEC<T> elements); the rest is the conversions and the function itself, so the kernels are bound by memory
// bandwidth except silu and softplus (expf and an IEEE division per element).
#include "common.cuh"
#include "elementwise.cuh"

namespace {

// y[i] = f(a[i], b[i]) for every i < n (b read only when READS_B; f gets 0 for it otherwise), by groups of VEC<T>.
template <bool READS_B, typename T, typename F>
__device__ __forceinline__ void for_each_group(const EltwiseParams<T>& p, F f) {
    const bool vec = aligned16(p.a) && (!READS_B || aligned16(p.b)) && aligned16(p.y);
    FOR_EACH(q, vec_chunks<T>(p.n)) {
        const int64_t at = q * VEC<T>;
        const int count = chunk_len<T>(at, p.n);
        // Both operands' loads issued before either is converted (common.cuh's load_raw).
        const uint4 ra = load_raw(p.a + at, count, vec);
        const uint4 rb = READS_B ? load_raw(p.b + at, count, vec) : make_uint4(0u, 0u, 0u, 0u);
        float a[VEC<T>], b[VEC<T>], y[VEC<T>];
        unpack_vec<T>(ra, a);
        unpack_vec<T>(rb, b);
#pragma unroll
        for (int k = 0; k < VEC<T>; k++) y[k] = f(a[k], b[k]);
        store_span(p.y + at, count, vec, y);
    }
}

template <typename T>
__device__ void add(const EltwiseParams<T>& p) {
    for_each_group<true>(p, [](float a, float b) { return a + b; });
}

template <typename T>
__device__ void mul(const EltwiseParams<T>& p) {
    for_each_group<true>(p, [](float a, float b) { return a * b; });
}

template <typename T>
__device__ void scale(const EltwiseParams<T>& p) {
    const float s = p.s;
    for_each_group<false>(p, [s](float a, float) { return s * a; });
}

// One forward and one backward kernel per activation, so a profile names the function (the switch folds away).
template <int ACT, typename T>
__device__ void activation_forward(const EltwiseParams<T>& p) {
    for_each_group<false>(p, [](float x, float) { return activation_value(ACT, x); });
}

template <int ACT, typename T>
__device__ void activation_backward(const EltwiseParams<T>& p) {
    for_each_group<true>(p, [](float x, float g) { return g * activation_derivative(ACT, x); });
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
