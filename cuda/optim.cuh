// Parameters of the optimiser kernels of optim.cu (one thread per element, grid-stride, so any grid).
#pragma once
#include <stdint.h>

// The operands of an optimiser kernel; each kernel below says which it uses.
struct OptimParams {
    float* param;       // sgd_nesterov_step: the parameters, updated in place; optim_scale_in_place: the values scaled
    const float* grad;  // the gradient (sgd_nesterov_step, optim_sum_squares_partial)
    float* buf;         // sgd_nesterov_step: the momentum buffer, updated in place
    double* partial;    // optim_sum_squares_partial: one sum per block
    int64_t n;          // elements
    float lr;           // sgd_nesterov_step: learning rate
    float mu;           // sgd_nesterov_step: momentum
    float wd;           // sgd_nesterov_step: weight decay
    int first;          // sgd_nesterov_step: 1 on the first step (the buffer is not read)
    float scale;        // optim_scale_in_place: the factor
};

extern "C" __global__ void sgd_nesterov_step(const OptimParams p);          // param, grad, buf, n, lr, mu, wd, first
extern "C" __global__ void optim_sum_squares_partial(const OptimParams p);  // grad, n -> partial; blocks of 32k threads
extern "C" __global__ void optim_scale_in_place(const OptimParams p);       // param *= scale, n
