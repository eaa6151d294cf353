// Optimiser kernels, one thread per element (grid-stride), on float32 parameters and gradients.
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

extern "C" __global__ void sgd_nesterov_step(float* p, const float* grad, float* buf, int64_t n, float lr, float mu,
                                             float wd, int first) {
    FOR_EACH(i, n) {
        float pi = p[i];
        float g = __fadd_rn(grad[i], __fmul_rn(wd, pi));
        float b = first ? g : __fadd_rn(__fmul_rn(mu, buf[i]), g);
        buf[i] = b;
        p[i] = __fsub_rn(pi, __fmul_rn(lr, __fadd_rn(g, __fmul_rn(mu, b))));
    }
}

extern "C" __global__ void optim_sum_squares_partial(const float* g, int64_t n, double* partial) {
    __shared__ double scratch[32];
    double acc = 0.0;
    FOR_EACH(i, n) {
        double x = g[i];
        acc += x * x;
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

extern "C" __global__ void optim_scale_in_place(float* x, float s, int64_t n) {
    FOR_EACH(i, n) x[i] *= s;
}
