// Optimiser kernels on float32 parameters and gradients, each launch over a table of tensors (optim.cuh): a block
// finds its tensor by a binary search of the table's first blocks and strides over that tensor's elements. The
// arithmetic per element does not depend on how the tensors are grouped into launches.
//
//   sgd_nesterov_step:  g = grad + wd p;   b = first ? g : mu b + g;   p = p - lr (g + mu b);   copy = bf16(p)
//     PyTorch's SGD(nesterov=True, dampening=0); the first step sets the buffer to g (PyTorch's copy) without reading
//     it (the host zeroes a fresh buffer anyway, for a first step that a status skips). Every operation is rounded
//     separately (__fmul_rn/__fadd_rn: no fused multiply-add), in the order of the CPU path, so both give the same
//     float32 bits. Where the parameter has a bf16 copy (what a bf16 step's convolutions and linear layers read), the
//     copy is rewritten from the new value (round to nearest even, as the cast kernel does) in the same pass, so that
//     no step casts its weights.
//   optim_sum_squares_partial:  partial[b] = sum of g_i^2 over the elements block b of the tensor visits, in float64
//     (fixed tree order; the blocks per tensor depend on its size only).
//   optim_clip_status (one block):  sq_t = sum_b partial_t[b] (in order),  total = sum_t sq_t (in order),
//     norm = sqrt(total),  ratio = max_norm / (norm + eps),  ok = finite(norm) and finite(loss)
//     float64 additions in the order of the host's sums, so the norm is the same bits on either side.
//   optim_scale_in_place:  x = ratio x,  only where ok and ratio < 1
//   sgd_nesterov_step changes nothing where a status says not ok (a non-finite loss or gradient norm).
//
// Cost per parameter element (bytes: least traffic, 4 per float; FLOPs: adds and multiplies count one each; see
// src/ops/mod.rs): sgd_nesterov_step 20 bytes (read p, grad, buf; write p, buf; 16 on the first step, which does not
// read buf; 2 more with a bf16 copy) and 8 FLOPs; optim_sum_squares_partial 4 bytes and 2 FLOPs;
// optim_scale_in_place 8 bytes and 1 FLOP.
#include "common.cuh"
#include "optim.cuh"

namespace {

// The table entry of the tensor that this block works on, and the block's index within that tensor's blocks.
struct Mine {
    const int64_t* t;
    int64_t block;
};
__device__ __forceinline__ Mine my_tensor(const OptimParams& q) {
    int lo = 0, hi = q.count - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (q.table[(int64_t)mid * OPTIM_WORDS + OPTIM_BLOCK0] <= (int64_t)blockIdx.x) lo = mid;
        else hi = mid - 1;
    }
    const int64_t* t = q.table + (int64_t)lo * OPTIM_WORDS;
    return {t, (int64_t)blockIdx.x - t[OPTIM_BLOCK0]};
}

template <typename P>
__device__ __forceinline__ P* at(const int64_t* t, int word) {
    return reinterpret_cast<P*>(t[word]);
}

}  // namespace

// The elements of this block's tensor, i = block * OPTIM_THREADS + thread + k * blocks * OPTIM_THREADS.
#define FOR_MY_ELEMENTS(i, m)                                                                     \
    for (int64_t i = (m).block * blockDim.x + threadIdx.x, n_ = (m).t[OPTIM_N],                  \
                 step_ = (m).t[OPTIM_BLOCKS] * blockDim.x;                                        \
         i < n_; i += step_)

extern "C" __global__ void __launch_bounds__(OPTIM_THREADS) sgd_nesterov_step(const OptimParams q) {
    if (q.status != nullptr && q.status[OPTIM_STATUS_OK] == 0.0) return;
    const float lr = q.lr, mu = q.mu, wd = q.wd;
    const Mine m = my_tensor(q);
    float* param = at<float>(m.t, OPTIM_PARAM);
    const float* grad = at<const float>(m.t, OPTIM_GRAD);
    float* buf = at<float>(m.t, OPTIM_BUF);
    __nv_bfloat16* copy = at<__nv_bfloat16>(m.t, OPTIM_COPY);
    const bool first = m.t[OPTIM_FIRST] != 0;
    FOR_MY_ELEMENTS(i, m) {
        float pi = param[i];
        float g = __fadd_rn(grad[i], __fmul_rn(wd, pi));
        float b = first ? g : __fadd_rn(__fmul_rn(mu, buf[i]), g);
        buf[i] = b;
        pi = __fsub_rn(pi, __fmul_rn(lr, __fadd_rn(g, __fmul_rn(mu, b))));
        param[i] = pi;
        if (copy != nullptr) copy[i] = __float2bfloat16_rn(pi);
    }
}

extern "C" __global__ void __launch_bounds__(OPTIM_THREADS) optim_sum_squares_partial(const OptimParams q) {
    __shared__ double scratch[32];
    const Mine m = my_tensor(q);
    const float* grad = at<const float>(m.t, OPTIM_GRAD);
    double acc = 0.0;
    FOR_MY_ELEMENTS(i, m) {
        double x = grad[i];
        acc += x * x;
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) at<double>(m.t, OPTIM_PARTIAL)[m.block] = acc;
}

extern "C" __global__ void __launch_bounds__(OPTIM_STATUS_THREADS) optim_clip_status(const OptimParams q) {
    double* status = q.status;
    for (int t = threadIdx.x; t < q.count; t += blockDim.x) {
        const int64_t* e = q.table + (int64_t)t * OPTIM_WORDS;
        const double* partial = at<const double>(e, OPTIM_PARTIAL);
        double s = 0.0;
        for (int64_t b = 0; b < e[OPTIM_BLOCKS]; ++b) s += partial[b];
        status[OPTIM_STATUS_SUMS + t] = s;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    double total = 0.0;
    for (int t = 0; t < q.count; ++t) total += status[OPTIM_STATUS_SUMS + t];
    const double norm = sqrt(total);
    const double loss = q.loss != nullptr ? (double)*q.loss : 0.0;
    status[OPTIM_STATUS_NORM] = norm;
    status[OPTIM_STATUS_RATIO] = __ddiv_rn(q.max_norm, __dadd_rn(norm, q.eps));
    status[OPTIM_STATUS_OK] = isfinite(norm) && isfinite(loss) ? 1.0 : 0.0;
    status[OPTIM_STATUS_LOSS] = loss;
}

extern "C" __global__ void __launch_bounds__(OPTIM_THREADS) optim_scale_in_place(const OptimParams q) {
    const double ratio = q.status[OPTIM_STATUS_RATIO];
    if (q.status[OPTIM_STATUS_OK] == 0.0 || !(ratio < 1.0)) return;
    const float scale = (float)ratio;
    const Mine m = my_tensor(q);
    float* x = at<float>(m.t, OPTIM_PARAM);
    FOR_MY_ELEMENTS(i, m) x[i] *= scale;
}
