// Losses over a feature map of logits x (N, K, V) with V = D*H*W voxels per channel (parameters: LossParams of
// loss.cuh), flat index
// x[(n*K + k)*V + v], and a label map t (N, 1, V) holding class indices as floats, flat index t[n*V + v].
// Consecutive threads take consecutive voxels v, so every read of a class row is coalesced. Per voxel, with
// m = max_k x_k and s = sum_k e^(x_k - m), the softmax is p_k = e^(x_k - m) / s.
//
//   cross-entropy   loss_v = m + ln s - x_(t_v)        L = (1/(N V)) sum_(n,v) loss_v
//                   dL/dx_kv = g (p_kv - [k == t_v]) / (N V)                      (g = dL/dL, read on the device)
//   soft Dice       for each sample n (or the whole batch) and foreground class k >= 1 (group j, M groups):
//                   I_j = sum_v p_kv [t_v == k]   P_j = sum_v p_kv   G_j = sum_v [t_v == k]
//                   D_j = max(P_j + G_j + smooth, floor)   dc_j = (2 I_j + smooth) / D_j   L = -(1/M) sum_j dc_j
//                   with a_kv = dL/dp_kv = (g/M) (dc_j - 2 [t_v == k]) / D_j for k >= 1 and a_0v = 0:
//                   dL/dx_cv = p_cv (a_cv - sum_k p_kv a_kv)
//   argmax          y_nv = the first k with x_nkv = max_j x_njv (strict > scan, so ties keep the lowest index)
//
// Labels: a label that is not an integer in [0, K) is never used as an index. It turns that voxel's loss term and
// every gradient element of that voxel into NaN (the in-band error flag described in src/ops/cross_entropy.rs).
//
// Reductions are deterministic: per-block partial sums in a fixed tree order (block_sum), then one block that adds
// the partials in a fixed order. The grid size depends only on the shapes, so equal inputs give equal bits.
//
// Cost per voxel with K classes (bytes: least traffic, 4 per float; FLOPs: adds, multiplies, divisions, comparisons,
// exponentials and logarithms count one each; see src/ops/mod.rs):
//   cross_entropy_partial  4 (K + 1) bytes, about 4K FLOPs      cross_entropy_backward  4 (2K + 1) bytes, about 6K
//   dice_partial_sums      4 (K + 1) bytes, about 8K FLOPs      dice_backward           4 (2K + 1) bytes, about 12K
//   argmax_classes         4 (K + 1) bytes, K - 1 comparisons   (loss_sum_partials, dice_finish: one block, tiny)
#include "common.cuh"
#include "loss.cuh"

__device__ __forceinline__ float nan_flag() { return __int_as_float(0x7fc00000); }

// The class of label t, or -1 when t is not an integer in [0, K) (NaN included: its comparisons are false).
__device__ __forceinline__ int label_class(float t, int K) {
    return (t >= 0.0f && t < (float)K && t == floorf(t)) ? (int)t : -1;
}

// m = max_k x[k*V] and s = sum_k e^(x[k*V] - m) for one voxel; x points at its class-0 logit.
__device__ __forceinline__ void softmax_stats(const float* x, int64_t V, int K, float* m, float* s) {
    float mx = x[0];
    for (int k = 1; k < K; k++) mx = fmaxf(mx, x[k * V]);
    float sum = 0.0f;
    for (int k = 0; k < K; k++) sum += expf(x[k * V] - mx);
    *m = mx;
    *s = sum;
}

// out[0] = scale * sum_i partial[i], by one block of threads: thread j adds partial[j], partial[j + blockDim], ...
// in order, then block_sum adds the threads' sums in a fixed tree.
extern "C" __global__ void loss_sum_partials(const LossParams args) {
    const float* partial = args.partial;
    const int64_t count = args.blocks;
    const float scale = args.scale;
    float* out = args.out;
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (int64_t i = threadIdx.x; i < count; i += blockDim.x) acc += partial[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) out[0] = scale * acc;
}

// partial[block] = sum of loss_v over the voxels this block visits (grid-stride over all N*V voxels).
extern "C" __global__ void cross_entropy_partial(const LossParams args) {
    const float* x = args.x;
    const float* t = args.t;
    float* partial = args.partial;
    const int64_t NV = args.NV, V = args.V;
    const int K = args.K;
    __shared__ float scratch[32];
    float acc = 0.0f;
    FOR_EACH(i, NV) {
        int64_t n = i / V, v = i - n * V;
        const float* xv = x + n * K * V + v;
        int label = label_class(t[i], K);
        float m, s;
        softmax_stats(xv, V, K, &m, &s);
        acc += label < 0 ? nan_flag() : m + logf(s) - xv[(int64_t)label * V];
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// dx_kv = g[0] * inv_count * (p_kv - [k == t_v]), one thread per voxel writing all K classes.
extern "C" __global__ void cross_entropy_backward(const LossParams args) {
    const float* x = args.x;
    const float* t = args.t;
    const float* g = args.g;
    float* dx = args.out;
    const int64_t NV = args.NV, V = args.V;
    const int K = args.K;
    const float inv_count = args.scale;
    float scale = g[0] * inv_count;
    FOR_EACH(i, NV) {
        int64_t n = i / V, v = i - n * V;
        int64_t base = n * K * V + v;
        int label = label_class(t[i], K);
        float m, s;
        softmax_stats(x + base, V, K, &m, &s);
        for (int k = 0; k < K; k++) {
            float p = expf(x[base + k * V] - m) / s;
            dx[base + k * V] = label < 0 ? nan_flag() : (p - (k == label ? 1.0f : 0.0f)) * scale;
        }
    }
}

// Per-block partial sums of (I, P, G) for every foreground class of one sample. Grid (blocks per sample, N), block
// of B threads (a multiple of 32). Each thread accumulates its own column of the dynamic shared array
// acc[r*B + thread], r = 3 (k - 1) + q with q = 0 (I), 1 (P), 2 (G), so 3 (K - 1) B floats of shared memory; then
// every row r is reduced with block_sum into
//   partial[((n * gridDim.x + blockIdx.x) * (K - 1) + k - 1) * 3 + q].
// A bad label adds NaN to I of class 1 of its sample.
extern "C" __global__ void dice_partial_sums(const LossParams args) {
    const float* x = args.x;
    const float* t = args.t;
    float* partial = args.partial;
    const int64_t V = args.V;
    const int K = args.K;
    extern __shared__ float acc[];
    __shared__ float scratch[32];
    const int B = blockDim.x, tid = threadIdx.x, rows = 3 * (K - 1);
    const int64_t n = blockIdx.y;
    const float* xs = x + n * K * V;
    const float* ts = t + n * V;
    for (int r = 0; r < rows; r++) acc[r * B + tid] = 0.0f;
    for (int64_t v = (int64_t)blockIdx.x * B + tid; v < V; v += (int64_t)gridDim.x * B) {
        int label = label_class(ts[v], K);
        float m, s;
        softmax_stats(xs + v, V, K, &m, &s);
        for (int k = 1; k < K; k++) {
            float p = expf(xs[k * V + v] - m) / s;
            int r = 3 * (k - 1);
            acc[(r + 1) * B + tid] += p;
            if (k == label) {
                acc[r * B + tid] += p;
                acc[(r + 2) * B + tid] += 1.0f;
            }
        }
        // The flag goes into I, not P: D_j = fmaxf(P + G + smooth, floor) would drop a NaN P, dc_j keeps a NaN I.
        if (label < 0) acc[0 * B + tid] += nan_flag();
    }
    // Each thread has only touched its own column so far; block_sum synchronises before it shares anything.
    float* out = partial + (n * gridDim.x + blockIdx.x) * rows;
    for (int r = 0; r < rows; r++) {
        float total = block_sum(acc[r * B + tid], scratch);
        if (tid == 0) out[r] = total;
    }
}

// One block: for every group j (batch_dice: j = k - 1 over all samples; else j = n (K - 1) + k - 1) adds the
// partials of its samples in order (sample-major, then block), forms D_j and dc_j into stats[2j], stats[2j + 1],
// and writes loss[0] = -(1/M) sum_j dc_j, summed by thread 0 in group order. F = K - 1; nb = blocks per sample.
extern "C" __global__ void dice_finish(const LossParams args) {
    const float* partial = args.partial;
    float* stats = args.stats_out;
    float* loss = args.out;
    const int N = args.N, F = args.K - 1, nb = (int)args.blocks, batch_dice = args.batch_dice;
    const float smooth = args.smooth, floor_ = args.floor_;
    __shared__ float scratch[32];
    const int M = batch_dice ? F : N * F;
    float dc_sum = 0.0f;
    for (int j = 0; j < M; j++) {
        int c = j % F, s0 = batch_dice ? 0 : j / F, ns = batch_dice ? N : 1;
        int64_t entries = (int64_t)ns * nb;
        float sums[3] = {0.0f, 0.0f, 0.0f};
        for (int64_t e = threadIdx.x; e < entries; e += blockDim.x) {
            int64_t blk = (int64_t)s0 * nb + e;  // sample s0 + e / nb, block e % nb
            const float* p = partial + (blk * F + c) * 3;
            sums[0] += p[0];
            sums[1] += p[1];
            sums[2] += p[2];
        }
        float I = block_sum(sums[0], scratch);
        float P = block_sum(sums[1], scratch);
        float G = block_sum(sums[2], scratch);
        if (threadIdx.x == 0) {
            float D = fmaxf(P + G + smooth, floor_);
            float dc = (2.0f * I + smooth) / D;
            stats[2 * j] = dc;
            stats[2 * j + 1] = D;
            dc_sum += dc;
        }
    }
    if (threadIdx.x == 0) loss[0] = -dc_sum / (float)M;
}

// dx_cv = p_cv (a_cv - sum_k p_kv a_kv), one thread per voxel; stats holds (dc_j, D_j) per group as written by
// dice_finish and inv_groups = 1/M.
extern "C" __global__ void dice_backward(const LossParams args) {
    const float* x = args.x;
    const float* t = args.t;
    const float* stats = args.stats;
    const float* g = args.g;
    float* dx = args.out;
    const int64_t NV = args.NV, V = args.V;
    const int K = args.K, batch_dice = args.batch_dice;
    const float inv_groups = args.scale;
    const float gs = g[0] * inv_groups;
    FOR_EACH(i, NV) {
        int64_t n = i / V, v = i - n * V;
        int64_t base = n * K * V + v;
        const float* st = stats + (batch_dice ? 0 : 2 * n * (K - 1));  // group of class k: st[2(k-1)], st[2(k-1)+1]
        int label = label_class(t[i], K);
        float m, s;
        softmax_stats(x + base, V, K, &m, &s);
        float dot = 0.0f;
        for (int k = 1; k < K; k++) {
            float p = expf(x[base + k * V] - m) / s;
            float dc = st[2 * (k - 1)], D = st[2 * (k - 1) + 1];
            float a = gs * (dc - (k == label ? 2.0f : 0.0f)) / D;
            dot += p * a;
        }
        for (int k = 0; k < K; k++) {
            float p = expf(x[base + k * V] - m) / s;
            float a = 0.0f;
            if (k > 0) {
                float dc = st[2 * (k - 1)], D = st[2 * (k - 1) + 1];
                a = gs * (dc - (k == label ? 2.0f : 0.0f)) / D;
            }
            dx[base + k * V] = label < 0 ? nan_flag() : p * (a - dot);
        }
    }
}

// y[n*V + v] = argmax over k of x[(n*K + k)*V + v] as a float, ties and NaN handled as the CPU scan does.
extern "C" __global__ void argmax_classes(const LossParams args) {
    const float* x = args.x;
    float* y = args.out;
    const int64_t NV = args.NV, V = args.V;
    const int K = args.K;
    FOR_EACH(i, NV) {
        int64_t n = i / V, v = i - n * V;
        const float* xv = x + n * K * V + v;
        float best = xv[0];
        int arg = 0;
        for (int k = 1; k < K; k++) {
            float xi = xv[k * V];
            if (xi > best) {
                best = xi;
                arg = k;
            }
        }
        y[i] = (float)arg;
    }
}
