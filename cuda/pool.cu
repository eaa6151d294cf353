// Average pooling (kernel = stride = k, ceil mode, in-bounds counts) and nearest upsampling by integer factors f, on
// maps of P = N*C planes, input spatial sizes (D, H, W), output spatial sizes (OD, OH, OW), row-major.
//
// avg_pool: OD = ceil(D / kd) etc.; window of output o: [o*k, min((o+1)*k, S)) per axis, count
//   |W(o)| = cnt_d(od) cnt_h(oh) cnt_w(ow),  cnt_a(o) = min(k_a, S_a - o*k_a).
//   forward  (writes each output element y[p, od, oh, ow]):    y = (1 / |W(o)|) sum_{i in W(o)} x[p, i]
//   backward (writes each input element dx[p, zd, zh, zw]):     dx = g[p, zd/kd, zh/kh, zw/kw] / |W(that o)|
//
// upsample_nearest: OD = fd * D etc.
//   forward  (writes each output element):  y[p, zd, zh, zw] = x[p, zd/fd, zh/fh, zw/fw]
//   backward (writes each input element):   dx[p, jd, jh, jw] = sum_{a<fd, b<fh, e<fw}
//                                                   g[p, jd*fd + a, jh*fh + b, jw*fw + e]   (in that loop order)
//
// All four take PoolParams<T> (pool.cuh), T the storage type (float or __nv_bfloat16), in instances NAME_f32 and
// NAME_bf16 (common.cuh's TYPED_KERNEL). The averaging and summing kernels compute in float32 and round the result
// once; upsample_nearest_forward moves elements as T (a copy, bit-exact in either type). Every thread writes its own
// elements from a gather, so there are no atomics and no races.
//
// Threads: each takes chunks of VEC<T> consecutive elements (16 bytes) of the written tensor, grid-stride (the host
// launches grid_vec::<T>(elements)); a chunk's coordinates cost 3 divisions (and 3 more for the source row of the
// expanding kernels), once per chunk.
//   Expanding (avg_pool_backward, upsample_nearest_forward: expand): a chunk inside one row of the written map walks
//   along w, loading a new source element (and, for the average, dividing by its window's count) every k_w or f_w
//   elements, and is stored as one vector; a chunk across two rows (W not a multiple of VEC<T>) or the short last one
//   computes each element on its own.
//   Reducing (avg_pool_forward, upsample_nearest_backward: reduce): where k_w (f_w) is 1, 2 or 4 and the source rows
//   are whole vectors, a chunk of VEC<T> outputs reads each of its window rows as k_w 16-byte vectors and adds every
//   element to its output in the order above (so the same float32 sums as one output at a time); other chunks
//   compute each output on its own.
//
// Cost, in units of the storage size E (4 bytes float32, 2 bf16; least traffic; FLOPs: adds and divisions count one
// each; see src/ops/mod.rs), with k = kd kh kw and f = fd fh fw:
//   avg_pool_forward            E (1 + 1/k) bytes and 1 + 1/k FLOPs per input voxel
//   avg_pool_backward           E (1 + 1/k) bytes and 1 FLOP per input voxel (a division per k_w elements in fact)
//   upsample_nearest_forward    E (1 + 1/f) bytes and no FLOPs per output voxel
//   upsample_nearest_backward   E (1 + 1/f) bytes and 1 FLOP per output-gradient voxel
// The index math per chunk, not per element, and 16-byte stores keep all four memory-bound (one thread per element
// with 6 to 10 divisions each ran the expanding kernels at 0.2 TB/s).
#include "common.cuh"
#include "pool.cuh"

namespace {

__device__ __forceinline__ int64_t pool_min(int64_t a, int64_t b) { return a < b ? a : b; }

// Element i of a map of planes of spatial size s = (D, H, W), row-major: i = ((pl D + z[0]) H + z[1]) W + z[2].
struct Voxel {
    int64_t pl;
    int64_t z[3];
};
__device__ __forceinline__ Voxel voxel_of(int64_t i, const int64_t (&s)[3]) {
    Voxel v;
    const int64_t row = i / s[2], slab = row / s[1];
    v.z[2] = i - row * s[2];
    v.z[1] = row - slab * s[1];
    v.pl = slab / s[0];
    v.z[0] = slab - v.pl * s[0];
    return v;
}

// The voxels of window j of an axis of size S cut into windows of k (the last one may be short).
__device__ __forceinline__ int64_t window_count(int64_t k, int64_t S, int64_t j) { return pool_min(k, S - j * k); }

// dst (spatial size Sd) from the coarser src (size Ss = ceil(Sd / k)): dst[pl, z] = src[pl, z / k] per axis, divided
// by the voxel count prod_a min(k_a, Sd_a - j_a k_a) of the window j = z / k when AVG (avg_pool_backward), moved as T
// otherwise (upsample_nearest_forward). One chunk of VEC<T> elements of dst per thread; a chunk inside one row walks
// along w (a new source element every k_w) and is stored as one vector; a chunk that crosses rows (W not a multiple
// of VEC<T>) or the short last one goes element by element.
template <typename T, bool AVG>
__device__ void expand(const T* __restrict__ src, T* __restrict__ dst, int64_t total, const int64_t (&Sd)[3],
                       const int64_t (&Ss)[3], const int64_t (&k)[3]) {
    // A row (pl, z_d, z_h) of dst: its src row and the d and h factors of the window counts.
    struct Row {
        const T* src;
        int64_t cdh;
    };
    auto row_of = [&](const Voxel& v) {
        const int64_t jd = v.z[0] / k[0], jh = v.z[1] / k[1];
        const int64_t cdh = window_count(k[0], Sd[0], jd) * window_count(k[1], Sd[1], jh);
        return Row{src + ((v.pl * Ss[0] + jd) * Ss[1] + jh) * Ss[2], cdh};
    };
    auto value = [&](const Row& r, int64_t jw) -> T {
        if constexpr (AVG) {
            return from_f32<T>(to_f32(r.src[jw]) / (float)(r.cdh * window_count(k[2], Sd[2], jw)));
        } else {
            return r.src[jw];
        }
    };
    FOR_EACH(c, vec_chunks<T>(total)) {
        const int64_t i0 = c * VEC<T>;
        const int n = chunk_len<T>(i0, total);
        const Voxel v = voxel_of(i0, Sd);
        if (v.z[2] + n <= Sd[2]) {
            const Row r = row_of(v);
            int64_t jw = v.z[2] / k[2], at = v.z[2] - jw * k[2];  // z_w = jw k_w + at
            T cur = value(r, jw);
            store_chunk(dst + i0, n, [&](int e) {
                if (e > 0 && at == 0) cur = value(r, jw);
                if (++at == k[2]) at = 0, ++jw;
                return cur;
            });
        } else {
#pragma unroll 1
            for (int e = 0; e < n; ++e) {
                const Voxel u = voxel_of(i0 + e, Sd);
                dst[i0 + e] = value(row_of(u), u.z[2] / k[2]);
            }
        }
    }
}

// dst (spatial size Sd) from the finer src (size Ss): dst[pl, o] = sum of src[pl, i] over the window
// i_a in [o_a k_a, min(o_a k_a + k_a, Ss_a)), added in the order d, h, w (w fastest) from 0 in float32, divided by the
// window's voxel count when AVG (avg_pool_forward; upsample_nearest_backward's windows are whole), rounded once.
// One chunk of VEC<T> elements of dst per thread. Where k_w = KW (1, 2 or 4; 0: none) and the chunk's window rows
// are whole 16-byte vectors (src rows of a multiple of VEC<T>, the chunk inside one dst row, no short window along
// w), each window row is read as KW vectors and summed into the VEC<T> outputs in the same order; other chunks go
// element by element.
template <typename T, bool AVG, int KW>
__device__ void reduce(const T* __restrict__ src, T* __restrict__ dst, int64_t total, const int64_t (&Sd)[3],
                       const int64_t (&Ss)[3], const int64_t (&k)[3]) {
    constexpr int V = VEC<T>;
    auto one = [&](int64_t i) -> T {
        const Voxel v = voxel_of(i, Sd);
        const int64_t d0 = v.z[0] * k[0], d1 = pool_min(d0 + k[0], Ss[0]);
        const int64_t h0 = v.z[1] * k[1], h1 = pool_min(h0 + k[1], Ss[1]);
        const int64_t w0 = v.z[2] * k[2], w1 = pool_min(w0 + k[2], Ss[2]);
        float s = 0.0f;
        for (int64_t a = d0; a < d1; a++)
            for (int64_t b = h0; b < h1; b++) {
                const T* row = src + ((v.pl * Ss[0] + a) * Ss[1] + b) * Ss[2];
                for (int64_t e = w0; e < w1; e++) s += to_f32(row[e]);
            }
        if constexpr (AVG) s = s / (float)((d1 - d0) * (h1 - h0) * (w1 - w0));
        return from_f32<T>(s);
    };
    const bool vec = KW > 0 && k[2] == KW && Ss[2] % V == 0 && aligned16(src) && aligned16(dst);
    FOR_EACH(c, vec_chunks<T>(total)) {
        const int64_t i0 = c * V;
        const int n = chunk_len<T>(i0, total);
        const Voxel v = voxel_of(i0, Sd);
        if constexpr (KW > 0) {
            if (vec && n == V && v.z[2] + V <= Sd[2] && (v.z[2] + V) * KW <= Ss[2] && (v.z[2] * KW) % V == 0) {
                const int64_t d0 = v.z[0] * k[0], d1 = pool_min(d0 + k[0], Ss[0]);
                const int64_t h0 = v.z[1] * k[1], h1 = pool_min(h0 + k[1], Ss[1]);
                float s[V];
#pragma unroll
                for (int o = 0; o < V; ++o) s[o] = 0.0f;
                for (int64_t a = d0; a < d1; a++)
                    for (int64_t b = h0; b < h1; b++) {
                        const T* seg = src + ((v.pl * Ss[0] + a) * Ss[1] + b) * Ss[2] + v.z[2] * KW;
#pragma unroll
                        for (int u = 0; u < KW; ++u) {
                            float x[V];
                            load_vec(seg + u * V, x);
#pragma unroll
                            for (int e = 0; e < V; ++e) s[(u * V + e) / KW] += x[e];  // output o takes o KW + w
                        }
                    }
                if constexpr (AVG) {
                    const int64_t count = (d1 - d0) * (h1 - h0) * KW;
#pragma unroll
                    for (int o = 0; o < V; ++o) s[o] = s[o] / (float)count;
                }
                store_vec(dst + i0, s);
                continue;
            }
        }
#pragma unroll 1
        for (int e = 0; e < n; ++e) dst[i0 + e] = one(i0 + e);
    }
}

// reduce with the window width k_w as a constant where it has a vector path.
template <typename T, bool AVG>
__device__ void reduce_any(const T* src, T* dst, int64_t total, const int64_t (&Sd)[3], const int64_t (&Ss)[3],
                           const int64_t (&k)[3]) {
    switch (k[2]) {
        case 1: reduce<T, AVG, 1>(src, dst, total, Sd, Ss, k); break;
        case 2: reduce<T, AVG, 2>(src, dst, total, Sd, Ss, k); break;
        case 4: reduce<T, AVG, 4>(src, dst, total, Sd, Ss, k); break;
        default: reduce<T, AVG, 0>(src, dst, total, Sd, Ss, k);
    }
}

template <typename T>
__device__ void avg_pool_forward(const PoolParams<T>& p) {
    reduce_any<T, true>(p.src, p.dst, p.total, p.out_size, p.in_size, p.factor);
}

template <typename T>
__device__ void avg_pool_backward(const PoolParams<T>& p) {
    expand<T, true>(p.src, p.dst, p.total, p.in_size, p.out_size, p.factor);
}

template <typename T>
__device__ void upsample_nearest_forward(const PoolParams<T>& p) {
    expand<T, false>(p.src, p.dst, p.total, p.out_size, p.in_size, p.factor);
}

template <typename T>
__device__ void upsample_nearest_backward(const PoolParams<T>& p) {
    reduce_any<T, false>(p.src, p.dst, p.total, p.in_size, p.out_size, p.factor);
}

}  // namespace

TYPED_KERNEL(avg_pool_forward_f32, avg_pool_forward_bf16, avg_pool_forward, PoolParams)
TYPED_KERNEL(avg_pool_backward_f32, avg_pool_backward_bf16, avg_pool_backward, PoolParams)
TYPED_KERNEL(upsample_nearest_forward_f32, upsample_nearest_forward_bf16, upsample_nearest_forward, PoolParams)
TYPED_KERNEL(upsample_nearest_backward_f32, upsample_nearest_backward_bf16, upsample_nearest_backward, PoolParams)
