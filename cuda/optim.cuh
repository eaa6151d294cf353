// Parameters of the optimiser kernels of optim.cu. Each launch covers many tensors (every parameter of a model): a
// table in device memory describes them, each worked on by its own run of blocks of the grid, so a step is one launch
// instead of one per parameter.
#pragma once
#include <stdint.h>

// Threads per block of every optimiser kernel.
constexpr int OPTIM_THREADS = 256;
// The tensor table: OPTIM_WORDS int64 words per tensor (device addresses as integers), at these positions, tensors in
// increasing first block; tensor i's blocks are [block0, block0 + blocks), and its block b visits the elements
// (b - block0) * OPTIM_THREADS + thread + k * blocks * OPTIM_THREADS, k = 0, 1, ...
constexpr int OPTIM_WORDS = 8;
constexpr int OPTIM_PARAM = 0;    // float*: sgd_nesterov_step: the parameters, updated in place;
                                  // optim_scale_in_place: the values scaled
constexpr int OPTIM_GRAD = 1;     // const float*: the gradient (sgd_nesterov_step, optim_sum_squares_partial)
constexpr int OPTIM_BUF = 2;      // float*: sgd_nesterov_step: the momentum buffer, updated in place
constexpr int OPTIM_PARTIAL = 3;  // double*: optim_sum_squares_partial: one sum per block of the tensor
constexpr int OPTIM_N = 4;        // elements
constexpr int OPTIM_BLOCK0 = 5;   // the tensor's first block
constexpr int OPTIM_BLOCKS = 6;   // its blocks
constexpr int OPTIM_FIRST = 7;    // sgd_nesterov_step: 1 on the tensor's first step (its buffer is not read)

// The operands of an optimiser launch; each kernel below says which it uses.
struct OptimParams {
    const int64_t* table;  // OPTIM_WORDS words per tensor
    int count;             // tensors in the table
    float lr;              // sgd_nesterov_step: learning rate
    float mu;              // sgd_nesterov_step: momentum
    float wd;              // sgd_nesterov_step: weight decay
    float scale;           // optim_scale_in_place: the factor
};

extern "C" __global__ void sgd_nesterov_step(const OptimParams p);          // param, grad, buf, first; lr, mu, wd
extern "C" __global__ void optim_sum_squares_partial(const OptimParams p);  // grad -> partial
extern "C" __global__ void optim_scale_in_place(const OptimParams p);       // param *= scale
