// Normalisation kernels: InstanceNorm over the spatial axes of each (n, c) plane, LayerNorm over the last axis.
// Parameters (InstanceNormParams, LayerNormParams, NormSumRowsParams) and the block sizes: norm.cuh.
//
// Storage. The kernels that touch x, g = dL/dy or the output (y or dx) are templates over its storage type T and come
// in two instances, NAME_f32 and NAME_bf16 (common.cuh's TYPED_KERNEL); both compute in float32, reading each element
// with to_f32 and rounding each output once with from_f32<T>, so the float32 instance is the float32 kernel it always
// was. gamma, beta, the statistics (mean, rstd), every chunk, plane and partial sum, and dgamma, dbeta are float32 for
// both (the precision policy: normalisation statistics in float32); the kernels that see only those
// (instance_norm_combine, instance_norm_param_grads, the row sums) have one instance.
//
// InstanceNorm. x is (N, C, V) with V = D*H*W voxels per plane p = n*C + c. A plane is cut into chunks of
// IN_CHUNK = IN_THREADS * IN_ITEMS voxels; chunk k holds voxels [k*IN_CHUNK, k*IN_CHUNK + n_k), n_k = min(IN_CHUNK,
// V - k*IN_CHUNK), and one block of IN_THREADS threads works on one (plane, chunk): blockIdx.x = p*chunks + k, its
// thread t touching voxels k*IN_CHUNK + j*IN_THREADS + t, j < IN_ITEMS (coalesced).
//   instance_norm_chunk_moments:  m_k = (1/n_k) sum_{i in k} x_i,  M2_k = sum_{i in k} (x_i - m_k)^2
//                                 (two passes over the chunk held in registers)
//   instance_norm_combine:        mu = (1/V) sum_k n_k m_k,  var = (1/V) sum_k (M2_k + n_k (m_k - mu)^2),
//                                 rstd = 1/sqrt(var + eps)
//     Every term of var is a sum of squares, so a large common offset of x cancels nothing away (the exact
//     two-pass variance, regrouped by chunk).
//   instance_norm_apply:          y_i = (x_i - mu_p) * rstd_p * gamma_c + beta_c,  out_i = act(y_i) (act >= 0) or y_i
// Backward, g = dL/dy, xhat_i = (x_i - mu_p) rstd_p; with a fused activation g_i = dL/dout_i act'(y_i), y_i
// recomputed exactly as the apply kernel computed it (the same bits as an unfused norm then activation):
//   instance_norm_chunk_grad_sums: per chunk  sum g_i  and  sum g_i xhat_i;  norm_sum_rows then adds the chunks of
//                                  each plane: Sg_p, Sgx_p
//   instance_norm_backward_dx:     dx_i = gamma_c rstd_p (g_i - Sg_p / V - xhat_i Sgx_p / V)
//   instance_norm_param_grads:     dgamma_c = sum_n Sgx_(n,c),  dbeta_c = sum_n Sg_(n,c)   (n in increasing order)
//
// LayerNorm. x is (R, C): R rows of C contiguous channels; one warp per row (lane l takes channels l, l+32, ...),
// LN_ROWS_PER_BLOCK = blockDim.x / 32 rows per block.
//   layer_norm_forward:  mu_r = (1/C) sum_c x_rc,  var_r = (1/C) sum_c (x_rc - mu_r)^2 (second pass),
//                        rstd_r = 1/sqrt(var_r + eps),  y_rc = (x_rc - mu_r) rstd_r gamma_c + beta_c
//   layer_norm_backward_dx: h_rc = gamma_c g_rc,  dx_rc = rstd_r (h_rc - (1/C) sum_c h_rc - xhat_rc (1/C) sum_c h_rc xhat_rc)
//   layer_norm_param_partials: block (bx, by) of 32 x LN_PARAM_SUBROWS threads sums rows
//                        [bx*rows_per_block, (bx+1)*rows_per_block) for channels by*32 + threadIdx.x:
//                        Pgamma[c, bx] = sum_r g_rc xhat_rc,  Pbeta[c, bx] = sum_r g_rc
//                        (thread row ty takes rows ty, ty + LN_PARAM_SUBROWS, ...; the sub-rows are then added in
//                        order ty = 0, 1, ...); norm_sum_rows then gives dgamma_c = sum_bx Pgamma[c, bx], same for beta.
//
//   norm_sum_rows:       out_r = sum_j a[r, j] for a (rows, len) row-major: one block per row, block_sum (kernels
//                        instance_norm_sum_chunks and layer_norm_sum_partials).
//
// Every reduction has a fixed order (per-thread loops, then block_sum's fixed tree), so results are reproducible.
//
// Cost per element, in units of the storage size E (4 bytes float32, 2 bf16; bytes: least traffic, then what these
// kernels move; the float32 statistics are per plane or row, negligible; FLOPs: adds, multiplies, divisions and
// square roots count one each; see src/ops/mod.rs):
//   InstanceNorm forward  at least 2E bytes, 3E as written (x is read by the moments and by the apply kernel: a plane
//                         does not fit in cache); about 8 FLOPs
//   InstanceNorm backward at least 3E bytes, 5E as written (x and g read by the chunk sums and by the dx kernel);
//                         about 12 FLOPs
//   LayerNorm forward     2E bytes (a row stays in cache across the passes); about 8 FLOPs
//   LayerNorm backward    at least 3E bytes, 5E as written (layer_norm_param_partials reads x and g again); about
//                         15 FLOPs
#include "common.cuh"

#include "norm.cuh"

// Sum over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float norm_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The number of voxels of chunk k of a plane of v voxels (0 only for an empty plane).
__device__ __forceinline__ int64_t in_chunk_count(int64_t v, int64_t k) {
    int64_t rest = v - k * IN_CHUNK;
    return rest < 0 ? 0 : (rest < IN_CHUNK ? rest : IN_CHUNK);
}

// The gradient reaching y = affine(x): g itself, or with a fused activation (act >= 0) g act'(y), y formed as in
// instance_norm_apply (scale = rstd_p gamma_c, shift = beta_c).
__device__ __forceinline__ float grad_at_affine(int act, float gv, float xv, float mu, float scale, float shift) {
    return act < 0 ? gv : gv * activation_derivative(act, (xv - mu) * scale + shift);
}

namespace {

// ---------------------------------------------------------------------------------------------------------------
// InstanceNorm. Launch the chunk kernels with IN_THREADS threads and planes * chunks blocks.

template <typename T>
__device__ void instance_norm_chunk_moments(const InstanceNormParams<T>& args) {
    const T* x = args.x;
    float* chunk_mean = args.chunk_mean;
    float* chunk_m2 = args.chunk_m2;
    const int64_t v = args.V, chunks = args.chunks;
    __shared__ float scratch[32];
    const int64_t b = blockIdx.x, p = b / chunks, k = b % chunks;
    const int64_t n = in_chunk_count(v, k);
    const T* xc = x + p * v + k * IN_CHUNK;
    float vals[IN_ITEMS];
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < IN_ITEMS; j++) {
        int64_t i = (int64_t)j * IN_THREADS + threadIdx.x;
        vals[j] = i < n ? to_f32(xc[i]) : 0.0f;
        s += vals[j];
    }
    s = block_sum(s, scratch);
    const float m = n > 0 ? s / (float)n : 0.0f;
    float q = 0.0f;
#pragma unroll
    for (int j = 0; j < IN_ITEMS; j++) {
        int64_t i = (int64_t)j * IN_THREADS + threadIdx.x;
        float d = vals[j] - m;
        if (i < n) q += d * d;
    }
    q = block_sum(q, scratch);
    if (threadIdx.x == 0) {
        chunk_mean[b] = m;
        chunk_m2[b] = q;
    }
}

template <typename T>
__device__ void instance_norm_apply(const InstanceNormParams<T>& args) {
    const T* x = args.x;
    const float* mean = args.mean;
    const float* rstd = args.rstd;
    const float* gamma = args.gamma;
    const float* beta = args.beta;
    T* y = args.out;
    const int64_t v = args.V, c = args.C, chunks = args.chunks;
    const int64_t b = blockIdx.x, p = b / chunks, k = b % chunks;
    const int64_t n = in_chunk_count(v, k);
    const int64_t base = p * v + k * IN_CHUNK;
    const float mu = mean[p], scale = rstd[p] * gamma[p % c], shift = beta[p % c];
#pragma unroll
    for (int j = 0; j < IN_ITEMS; j++) {
        int64_t i = (int64_t)j * IN_THREADS + threadIdx.x;
        if (i < n) {
            const float yv = (to_f32(x[base + i]) - mu) * scale + shift;
            y[base + i] = from_f32<T>(args.act < 0 ? yv : activation_value(args.act, yv));
        }
    }
}

template <typename T>
__device__ void instance_norm_chunk_grad_sums(const InstanceNormParams<T>& args) {
    const T* x = args.x;
    const T* g = args.g;
    const float* mean = args.mean;
    const float* rstd = args.rstd;
    float* chunk_g = args.chunk_g;
    float* chunk_gx = args.chunk_gx;
    const int64_t v = args.V, chunks = args.chunks;
    __shared__ float scratch[32];
    const int64_t b = blockIdx.x, p = b / chunks, k = b % chunks;
    const int64_t n = in_chunk_count(v, k);
    const int64_t base = p * v + k * IN_CHUNK;
    const float mu = mean[p], r = rstd[p];
    // Read only with a fused activation (gamma and beta are null otherwise).
    const int64_t c = p % args.C;
    const float scale = args.act < 0 ? 0.0f : r * args.gamma[c], shift = args.act < 0 ? 0.0f : args.beta[c];
    float sg = 0.0f, sgx = 0.0f;
#pragma unroll
    for (int j = 0; j < IN_ITEMS; j++) {
        int64_t i = (int64_t)j * IN_THREADS + threadIdx.x;
        if (i < n) {
            float gv = grad_at_affine(args.act, to_f32(g[base + i]), to_f32(x[base + i]), mu, scale, shift);
            sg += gv;
            sgx += gv * ((to_f32(x[base + i]) - mu) * r);
        }
    }
    sg = block_sum(sg, scratch);
    sgx = block_sum(sgx, scratch);
    if (threadIdx.x == 0) {
        chunk_g[b] = sg;
        chunk_gx[b] = sgx;
    }
}

template <typename T>
__device__ void instance_norm_backward_dx(const InstanceNormParams<T>& args) {
    const T* x = args.x;
    const T* g = args.g;
    const float* mean = args.mean;
    const float* rstd = args.rstd;
    const float* gamma = args.gamma;
    const float* sum_g = args.sum_g;
    const float* sum_gx = args.sum_gx;
    T* dx = args.out;
    const int64_t v = args.V, c = args.C, chunks = args.chunks;
    const int64_t b = blockIdx.x, p = b / chunks, k = b % chunks;
    const int64_t n = in_chunk_count(v, k);
    const int64_t base = p * v + k * IN_CHUNK;
    const float inv_v = 1.0f / (float)(v > 0 ? v : 1);
    const float mu = mean[p], r = rstd[p], scale = gamma[p % c] * r;
    // The apply kernel's scale and shift (rstd gamma, in that order), for a fused activation's derivative.
    const float y_scale = r * gamma[p % c], y_shift = args.act < 0 ? 0.0f : args.beta[p % c];
    const float mean_g = sum_g[p] * inv_v, mean_gx = sum_gx[p] * inv_v;
#pragma unroll
    for (int j = 0; j < IN_ITEMS; j++) {
        int64_t i = (int64_t)j * IN_THREADS + threadIdx.x;
        if (i < n) {
            const float xv = to_f32(x[base + i]);
            float xhat = (xv - mu) * r;
            const float gv = grad_at_affine(args.act, to_f32(g[base + i]), xv, mu, y_scale, y_shift);
            dx[base + i] = from_f32<T>(scale * (gv - mean_g - xhat * mean_gx));
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// LayerNorm. The row kernels take blockDim.x a multiple of 32; a warp past the last row exits as a whole.

template <typename T>
__device__ void layer_norm_forward(const LayerNormParams<T>& p) {
    const T* x = p.x;
    const float* gamma = p.gamma;
    const float* beta = p.beta;
    T* y = p.out;
    float* mean = p.mean_out;
    float* rstd = p.rstd_out;
    const int64_t rows = p.rows, c = p.C;
    const float eps = p.eps;
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* xr = x + row * c;
    T* yr = y + row * c;
    const float inv_c = 1.0f / (float)c;
    float s = 0.0f;
    for (int64_t j = lane; j < c; j += 32) s += to_f32(xr[j]);
    const float mu = norm_warp_sum(s) * inv_c;
    float q = 0.0f;
    for (int64_t j = lane; j < c; j += 32) {
        float d = to_f32(xr[j]) - mu;
        q += d * d;
    }
    const float r = 1.0f / sqrtf(norm_warp_sum(q) * inv_c + eps);
    for (int64_t j = lane; j < c; j += 32) yr[j] = from_f32<T>((to_f32(xr[j]) - mu) * r * gamma[j] + beta[j]);
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = r;
    }
}

template <typename T>
__device__ void layer_norm_backward_dx(const LayerNormParams<T>& p) {
    const T* x = p.x;
    const T* g = p.g;
    const float* mean = p.mean;
    const float* rstd = p.rstd;
    const float* gamma = p.gamma;
    T* dx = p.out;
    const int64_t rows = p.rows, c = p.C;
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* xr = x + row * c;
    const T* gr = g + row * c;
    T* dxr = dx + row * c;
    const float mu = mean[row], r = rstd[row], inv_c = 1.0f / (float)c;
    float sh = 0.0f, shx = 0.0f;
    for (int64_t j = lane; j < c; j += 32) {
        float h = gamma[j] * to_f32(gr[j]);
        sh += h;
        shx += h * ((to_f32(xr[j]) - mu) * r);
    }
    const float mean_h = norm_warp_sum(sh) * inv_c, mean_hx = norm_warp_sum(shx) * inv_c;
    for (int64_t j = lane; j < c; j += 32) {
        float xhat = (to_f32(xr[j]) - mu) * r;
        dxr[j] = from_f32<T>(r * (gamma[j] * to_f32(gr[j]) - mean_h - xhat * mean_hx));
    }
}

// Block (32, LN_PARAM_SUBROWS); grid (row blocks, ceil(c / 32)). Writes Pgamma, Pbeta as (c, row blocks).
template <typename T>
__device__ void layer_norm_param_partials(const LayerNormParams<T>& p) {
    const T* x = p.x;
    const T* g = p.g;
    const float* mean = p.mean;
    const float* rstd = p.rstd;
    float* pgamma = p.pgamma;
    float* pbeta = p.pbeta;
    const int64_t rows = p.rows, c = p.C, rows_per_block = p.rows_per_block;
    __shared__ float sh_gx[LN_PARAM_SUBROWS][32];
    __shared__ float sh_g[LN_PARAM_SUBROWS][32];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int64_t ch = (int64_t)blockIdx.y * 32 + tx;
    const int64_t row0 = (int64_t)blockIdx.x * rows_per_block;
    const int64_t row1 = row0 + rows_per_block < rows ? row0 + rows_per_block : rows;
    float sgx = 0.0f, sg = 0.0f;
    if (ch < c) {
        for (int64_t r = row0 + ty; r < row1; r += LN_PARAM_SUBROWS) {
            float gv = to_f32(g[r * c + ch]);
            sg += gv;
            sgx += gv * ((to_f32(x[r * c + ch]) - mean[r]) * rstd[r]);
        }
    }
    sh_gx[ty][tx] = sgx;
    sh_g[ty][tx] = sg;
    __syncthreads();
    if (ty == 0 && ch < c) {
        float a = 0.0f, s = 0.0f;
        for (int i = 0; i < LN_PARAM_SUBROWS; i++) {
            a += sh_gx[i][tx];
            s += sh_g[i][tx];
        }
        pgamma[ch * gridDim.x + blockIdx.x] = a;
        pbeta[ch * gridDim.x + blockIdx.x] = s;
    }
}

}  // namespace

TYPED_KERNEL(instance_norm_chunk_moments_f32, instance_norm_chunk_moments_bf16, instance_norm_chunk_moments,
             InstanceNormParams)
TYPED_KERNEL(instance_norm_apply_f32, instance_norm_apply_bf16, instance_norm_apply, InstanceNormParams)
TYPED_KERNEL(instance_norm_chunk_grad_sums_f32, instance_norm_chunk_grad_sums_bf16, instance_norm_chunk_grad_sums,
             InstanceNormParams)
TYPED_KERNEL(instance_norm_backward_dx_f32, instance_norm_backward_dx_bf16, instance_norm_backward_dx,
             InstanceNormParams)
TYPED_KERNEL(layer_norm_forward_f32, layer_norm_forward_bf16, layer_norm_forward, LayerNormParams)
TYPED_KERNEL(layer_norm_backward_dx_f32, layer_norm_backward_dx_bf16, layer_norm_backward_dx, LayerNormParams)
TYPED_KERNEL(layer_norm_param_partials_f32, layer_norm_param_partials_bf16, layer_norm_param_partials,
             LayerNormParams)

// ---------------------------------------------------------------------------------------------------------------
// The float32-only kernels (statistics and sums; one instance for both storage types).

// One block (any multiple of 32 threads) per plane.
extern "C" __global__ void instance_norm_combine(const InstanceNormParams<float> args) {
    const float* chunk_mean = args.chunk_mean;
    const float* chunk_m2 = args.chunk_m2;
    float* mean = args.mean_out;
    float* rstd = args.rstd_out;
    const int64_t v = args.V, chunks = args.chunks;
    const float eps = args.eps;
    __shared__ float scratch[32];
    const int64_t p = blockIdx.x;
    const float* cm = chunk_mean + p * chunks;
    const float* c2 = chunk_m2 + p * chunks;
    const float inv_v = 1.0f / (float)(v > 0 ? v : 1);
    float s = 0.0f;
    for (int64_t k = threadIdx.x; k < chunks; k += blockDim.x) s += (float)in_chunk_count(v, k) * cm[k];
    const float mu = block_sum(s, scratch) * inv_v;
    float q = 0.0f;
    for (int64_t k = threadIdx.x; k < chunks; k += blockDim.x) {
        float d = cm[k] - mu;
        q += c2[k] + (float)in_chunk_count(v, k) * d * d;
    }
    const float var = block_sum(q, scratch) * inv_v;
    if (threadIdx.x == 0) {
        mean[p] = mu;
        rstd[p] = 1.0f / sqrtf(var + eps);
    }
}

// One thread per channel (grid-stride); sum_g and sum_gx are (N, C).
extern "C" __global__ void instance_norm_param_grads(const InstanceNormParams<float> args) {
    const float* sum_g = args.sum_g;
    const float* sum_gx = args.sum_gx;
    float* dgamma = args.dgamma;
    float* dbeta = args.dbeta;
    const int64_t n = args.N, c = args.C;
    FOR_EACH(ch, c) {
        float a = 0.0f, s = 0.0f;
        for (int64_t i = 0; i < n; i++) {
            a += sum_gx[i * c + ch];
            s += sum_g[i * c + ch];
        }
        dgamma[ch] = a;
        dbeta[ch] = s;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Fixed-order row sums of a (gridDim.x, len) matrix, one block (a multiple of 32 threads) per row.

// One kernel name per use: the instance norm's per-plane chunk sums and the layer norm's per-channel partials.
#define NORM_SUM_ROWS_KERNEL(NAME)                                                                                 \
    extern "C" __global__ void NAME(const NormSumRowsParams p) {                                                   \
        __shared__ float scratch[32];                                                                              \
        const float* row = p.a + (int64_t)blockIdx.x * p.len;                                                      \
        float s = 0.0f;                                                                                            \
        for (int64_t j = threadIdx.x; j < p.len; j += blockDim.x) s += row[j];                                     \
        s = block_sum(s, scratch);                                                                                 \
        if (threadIdx.x == 0) p.out[blockIdx.x] = s;                                                               \
    }
NORM_SUM_ROWS_KERNEL(instance_norm_sum_chunks)
NORM_SUM_ROWS_KERNEL(layer_norm_sum_partials)
