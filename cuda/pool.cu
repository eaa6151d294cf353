// Average pooling (kernel = stride = k, ceil mode, in-bounds counts) and nearest upsampling by integer factors f, on
// maps of P = N*C planes, input spatial sizes (D, H, W), output spatial sizes (OD, OH, OW), row-major.
//
// avg_pool: OD = ceil(D / kd) etc.; window of output o: [o*k, min((o+1)*k, S)) per axis, count
//   |W(o)| = cnt_d(od) cnt_h(oh) cnt_w(ow),  cnt_a(o) = min(k_a, S_a - o*k_a).
//   forward  (one thread per output element y[p, od, oh, ow]):  y = (1 / |W(o)|) sum_{i in W(o)} x[p, i]
//   backward (one thread per input element dx[p, zd, zh, zw]):  dx = g[p, zd/kd, zh/kh, zw/kw] / |W(that o)|
//
// upsample_nearest: OD = fd * D etc.
//   forward  (one thread per output element):  y[p, zd, zh, zw] = x[p, zd/fd, zh/fh, zw/fw]
//   backward (one thread per input element):   dx[p, jd, jh, jw] = sum_{a<fd, b<fh, e<fw}
//                                                   g[p, jd*fd + a, jh*fh + b, jw*fw + e]   (in that loop order)
//
// All four take PoolParams<T> (pool.cuh), T the storage type (float or __nv_bfloat16), in instances NAME_f32 and
// NAME_bf16 (common.cuh's TYPED_KERNEL). The averaging and summing kernels compute in float32 and round the result
// once; upsample_nearest_forward moves elements as T (a copy, bit-exact in either type). Every thread writes its own
// element from a gather, so there are no atomics and no races; consecutive threads take consecutive elements of the
// written tensor.
//
// Cost, in units of the storage size E (4 bytes float32, 2 bf16; least traffic; FLOPs: adds and divisions count one
// each; see src/ops/mod.rs), with k = kd kh kw and f = fd fh fw:
//   avg_pool_forward            E (1 + 1/k) bytes and 1 + 1/k FLOPs per input voxel
//   avg_pool_backward           E (1 + 1/k) bytes and 1 FLOP per input voxel
//   upsample_nearest_forward    E (1 + 1/f) bytes and no FLOPs per output voxel
//   upsample_nearest_backward   E (1 + 1/f) bytes and 1 FLOP per output-gradient voxel
#include "common.cuh"
#include "pool.cuh"

namespace {

__device__ __forceinline__ int64_t pool_min(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T>
__device__ void avg_pool_forward(const PoolParams<T>& p) {
    const T* x = p.src;
    T* y = p.dst;
    const int64_t d = p.in_size[0], h = p.in_size[1], w = p.in_size[2];
    const int64_t od = p.out_size[0], oh = p.out_size[1], ow = p.out_size[2];
    const int64_t kd = p.factor[0], kh = p.factor[1], kw = p.factor[2];
    FOR_EACH(i, p.total) {
        int64_t q = i;
        const int64_t zw = q % ow; q /= ow;
        const int64_t zh = q % oh; q /= oh;
        const int64_t zd = q % od;
        const int64_t pl = q / od;
        const int64_t d0 = zd * kd, d1 = pool_min(d0 + kd, d);
        const int64_t h0 = zh * kh, h1 = pool_min(h0 + kh, h);
        const int64_t w0 = zw * kw, w1 = pool_min(w0 + kw, w);
        const T* xp = x + pl * d * h * w;
        float s = 0.0f;
        for (int64_t a = d0; a < d1; a++)
            for (int64_t b = h0; b < h1; b++) {
                const T* xrow = xp + (a * h + b) * w;
                for (int64_t e = w0; e < w1; e++) s += to_f32(xrow[e]);
            }
        y[i] = from_f32<T>(s / (float)((d1 - d0) * (h1 - h0) * (w1 - w0)));
    }
}

template <typename T>
__device__ void avg_pool_backward(const PoolParams<T>& p) {
    const T* g = p.src;
    T* dx = p.dst;
    const int64_t d = p.in_size[0], h = p.in_size[1], w = p.in_size[2];
    const int64_t od = p.out_size[0], oh = p.out_size[1], ow = p.out_size[2];
    const int64_t kd = p.factor[0], kh = p.factor[1], kw = p.factor[2];
    FOR_EACH(i, p.total) {
        int64_t q = i;
        const int64_t zw = q % w; q /= w;
        const int64_t zh = q % h; q /= h;
        const int64_t zd = q % d;
        const int64_t pl = q / d;
        const int64_t jd = zd / kd, jh = zh / kh, jw = zw / kw;
        const int64_t cnt = pool_min(kd, d - jd * kd) * pool_min(kh, h - jh * kh) * pool_min(kw, w - jw * kw);
        dx[i] = from_f32<T>(to_f32(g[((pl * od + jd) * oh + jh) * ow + jw]) / (float)cnt);
    }
}

template <typename T>
__device__ void upsample_nearest_forward(const PoolParams<T>& p) {
    const T* x = p.src;
    T* y = p.dst;
    const int64_t d = p.in_size[0], h = p.in_size[1], w = p.in_size[2];
    const int64_t od = p.out_size[0], oh = p.out_size[1], ow = p.out_size[2];
    const int64_t fd = p.factor[0], fh = p.factor[1], fw = p.factor[2];
    FOR_EACH(i, p.total) {
        int64_t q = i;
        const int64_t zw = q % ow; q /= ow;
        const int64_t zh = q % oh; q /= oh;
        const int64_t zd = q % od;
        const int64_t pl = q / od;
        y[i] = x[((pl * d + zd / fd) * h + zh / fh) * w + zw / fw];
    }
}

template <typename T>
__device__ void upsample_nearest_backward(const PoolParams<T>& p) {
    const T* g = p.src;
    T* dx = p.dst;
    const int64_t d = p.in_size[0], h = p.in_size[1], w = p.in_size[2];
    const int64_t od = p.out_size[0], oh = p.out_size[1], ow = p.out_size[2];
    const int64_t fd = p.factor[0], fh = p.factor[1], fw = p.factor[2];
    FOR_EACH(i, p.total) {
        int64_t q = i;
        const int64_t jw = q % w; q /= w;
        const int64_t jh = q % h; q /= h;
        const int64_t jd = q % d;
        const int64_t pl = q / d;
        float s = 0.0f;
        for (int64_t a = 0; a < fd; a++)
            for (int64_t b = 0; b < fh; b++) {
                const T* grow = g + ((pl * od + jd * fd + a) * oh + jh * fh + b) * ow + jw * fw;
                for (int64_t e = 0; e < fw; e++) s += to_f32(grow[e]);
            }
        dx[i] = from_f32<T>(s);
    }
}

}  // namespace

TYPED_KERNEL(avg_pool_forward_f32, avg_pool_forward_bf16, avg_pool_forward, PoolParams)
TYPED_KERNEL(avg_pool_backward_f32, avg_pool_backward_bf16, avg_pool_backward, PoolParams)
TYPED_KERNEL(upsample_nearest_forward_f32, upsample_nearest_forward_bf16, upsample_nearest_forward, PoolParams)
TYPED_KERNEL(upsample_nearest_backward_f32, upsample_nearest_backward_bf16, upsample_nearest_backward, PoolParams)
