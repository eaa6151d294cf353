// Parameters of the loss kernels of loss.cu (cross-entropy, soft Dice, argmax) over logits x (N, K, V) and labels
// t (N, 1, V).
#pragma once
#include <stdint.h>

// Each kernel's comment in loss.cu says which fields it uses.
struct LossParams {
    const float* x;      // logits (N, K, V)
    const float* t;      // labels (N, 1, V), class indices as floats
    const float* g;      // backward: dL/dL, one float on the device
    const float* stats;  // dice_backward: (dc_j, D_j) per group, as dice_finish wrote them
    float* partial;      // per-block partial sums (written by the partial kernels, read by the finishing ones)
    float* stats_out;    // dice_finish: (dc_j, D_j) per group
    float* out;          // the loss (one float), the gradient dx (N, K, V), or the classes (N, 1, V)
    int64_t NV;          // voxels of the batch, N V
    int64_t V;           // voxels per sample
    int K;               // classes
    int N;               // samples (dice_finish)
    int64_t blocks;      // partial sums: loss_sum_partials' count, dice_finish's blocks per sample
    int batch_dice;      // Dice over the whole batch (1) or per sample (0)
    float scale;         // loss_sum_partials: the factor; backward kernels: 1 / (N V) or 1 / M
    float smooth;        // dice_finish
    float floor_;        // dice_finish: the least denominator
};

extern "C" __global__ void loss_sum_partials(const LossParams p);       // out[0] = scale sum of partial[0 .. blocks)
extern "C" __global__ void cross_entropy_partial(const LossParams p);   // x, t -> partial (one per block)
extern "C" __global__ void cross_entropy_backward(const LossParams p);  // x, t, g, scale -> out = dx
extern "C" __global__ void dice_partial_sums(const LossParams p);       // x, t -> partial; grid (blocks, N)
extern "C" __global__ void dice_finish(const LossParams p);             // partial -> stats_out, out = loss; one block
extern "C" __global__ void dice_backward(const LossParams p);           // x, t, stats, g, scale -> out = dx
extern "C" __global__ void argmax_classes(const LossParams p);          // x -> out = classes
