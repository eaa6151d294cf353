// Optimiser kernels, one thread per element (grid-stride), on float32 parameters and gradients; all take
// OptimParams (optim.cuh).
//
//   sgd_nesterov_step:  g = grad + wd p;   b = first ? g : mu b + g;   p = p - lr (g + mu b)
//     PyTorch's SGD(nesterov=True, dampening=0); the first step sets the buffer to g (PyTorch's copy), so a fresh
//     buffer need not be zeroed. Every operation is rounded separately (__fmul_rn/__fadd_rn: no fused multiply-add),
//     in the order of the CPU path, so both give the same float32 bits.
//   optim_sum_squares_partial:  partial[block] = sum of g_i^2 over the elements the block visits, in float64
//     (fixed tree order; the host adds the partials in order, see src/optim.rs).
//   optim_scale_in_place:  x = s x
//
// Cost per parameter element (bytes: least traffic, 4 per float; FLOPs: adds and multiplies count one each; see
// src/ops/mod.rs): sgd_nesterov_step 20 bytes (read p, grad, buf; write p, buf; 16 on the first step, which does not
// read buf) and 8 FLOPs; optim_sum_squares_partial 4 bytes and 2 FLOPs; optim_scale_in_place 8 bytes and 1 FLOP.
#include "common.cuh"
#include "optim.cuh"

extern "C" __global__ void sgd_nesterov_step(const OptimParams q) {
    const float lr = q.lr, mu = q.mu, wd = q.wd;
    FOR_EACH(i, q.n) {
        float pi = q.param[i];
        float g = __fadd_rn(q.grad[i], __fmul_rn(wd, pi));
        float b = q.first ? g : __fadd_rn(__fmul_rn(mu, q.buf[i]), g);
        q.buf[i] = b;
        q.param[i] = __fsub_rn(pi, __fmul_rn(lr, __fadd_rn(g, __fmul_rn(mu, b))));
    }
}

extern "C" __global__ void optim_sum_squares_partial(const OptimParams q) {
    __shared__ double scratch[32];
    double acc = 0.0;
    FOR_EACH(i, q.n) {
        double x = q.grad[i];
        acc += x * x;
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) q.partial[blockIdx.x] = acc;
}

extern "C" __global__ void optim_scale_in_place(const OptimParams q) {
    FOR_EACH(i, q.n) q.param[i] *= q.scale;
}
