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
constexpr int OPTIM_WORDS = 9;
constexpr int OPTIM_PARAM = 0;    // float*: sgd_nesterov_step: the parameters, updated in place;
                                  // optim_scale_in_place: the values scaled
constexpr int OPTIM_GRAD = 1;     // const float*: the gradient (sgd_nesterov_step, optim_sum_squares_partial)
constexpr int OPTIM_BUF = 2;      // float*: sgd_nesterov_step: the momentum buffer, updated in place
constexpr int OPTIM_PARTIAL = 3;  // double*: optim_sum_squares_partial: one sum per block of the tensor
constexpr int OPTIM_N = 4;        // elements
constexpr int OPTIM_BLOCK0 = 5;   // the tensor's first block
constexpr int OPTIM_BLOCKS = 6;   // its blocks
constexpr int OPTIM_FIRST = 7;    // sgd_nesterov_step: 1 on the tensor's first step (its buffer is not read)
constexpr int OPTIM_COPY = 8;     // __nv_bfloat16*: sgd_nesterov_step: the parameter's bf16 copy, rewritten from the
                                  // updated parameter (0: the parameter has none)

// The clipping status that optim_clip_status writes (float64 words) and optim_scale_in_place and sgd_nesterov_step
// read, so that the decision to clip or to skip a step needs no copy to the host in the middle of a step.
constexpr int OPTIM_STATUS_NORM = 0;   // the global L2 norm of the gradients
constexpr int OPTIM_STATUS_RATIO = 1;  // max_norm / (norm + eps); the gradients are scaled by it when it is < 1
constexpr int OPTIM_STATUS_OK = 2;     // 1 when the loss (if given) and the norm are finite; else 0: nothing is
                                       // scaled and the step changes no parameter and no momentum
constexpr int OPTIM_STATUS_LOSS = 3;   // the loss (0 when none was given)
constexpr int OPTIM_STATUS_SUMS = 4;   // from here, one word per tensor: its sum of squares
// optim_clip_status's threads (one block).
constexpr int OPTIM_STATUS_THREADS = 256;

// The operands of an optimiser launch; each kernel below says which it uses.
struct OptimParams {
    const int64_t* table;  // OPTIM_WORDS words per tensor
    int count;             // tensors in the table
    float lr;              // sgd_nesterov_step: learning rate
    float mu;              // sgd_nesterov_step: momentum
    float wd;              // sgd_nesterov_step: weight decay
    double max_norm;       // optim_clip_status: the bound on the norm
    double eps;            // optim_clip_status: added to the norm in the ratio
    const float* loss;     // optim_clip_status: the step's loss, one value (nullptr: none)
    double* status;        // optim_clip_status writes it, optim_scale_in_place reads it; sgd_nesterov_step steps
                           // only where it says OK (nullptr: always)
};

extern "C" __global__ void sgd_nesterov_step(const OptimParams p);          // param, grad, buf, first, copy; lr, mu, wd
extern "C" __global__ void optim_sum_squares_partial(const OptimParams p);  // grad -> partial
extern "C" __global__ void optim_clip_status(const OptimParams p);          // partial, loss -> status
extern "C" __global__ void optim_scale_in_place(const OptimParams p);       // param *= ratio of status
