// Normalisation kernels: InstanceNorm over the spatial axes of each (n, c) plane, LayerNorm over the last axis.
// Parameters (InstanceNormParams, LayerNormParams, NormSumRowsParams) and the block sizes: norm.cuh.
//
// Storage. The kernels that touch x, g = dL/dy or the output (y or dx) are templates over its storage type T and come
// in two instances, NAME_f32 and NAME_bf16 (common.cuh's TYPED_KERNEL); both compute in float32, reading each element
// with to_f32 and rounding each output once with from_f32<T>. gamma, beta, the statistics (mean, rstd), every chunk,
// plane and partial sum, and dgamma, dbeta are float32 for both (the precision policy: normalisation statistics in
// float32); the kernels that see only those (instance_norm_combine, instance_norm_param_grads, the row sums) have one
// instance.
//
// Memory access. Each lane reads and writes spans of consecutive elements: VEC<T> (4 float32, 8 bf16) in the
// InstanceNorm chunks, LN_GROUP = 8 channels in the LayerNorm rows, with 16-byte vectors where every pointer of the
// chunk or row is 16-byte aligned (for every chunk when V is a multiple of VEC<T>, for every row when C is), else
// element by element (common.cuh's load_raw, load_span, store_span), every load of a batch issued before the first is
// used. Which elements a lane sums, and in which order, does not depend on that choice, so the vector and the element
// path give the same bits.
//
// InstanceNorm. x is (N, C, V) with V = D*H*W voxels per plane p = n*C + c. A plane is cut into chunks of IN_CHUNK
// voxels; chunk k holds voxels [k*IN_CHUNK, k*IN_CHUNK + n_k), n_k = min(IN_CHUNK, V - k*IN_CHUNK), and one warp works
// on one (plane, chunk), IN_WARPS per block: warp w of block b takes chunk b*IN_WARPS + w = p*chunks + k, counted
// from the last chunk in the sums kernels (so that each kernel starts on what is still in L2, in_chunk). Its lane l
// holds the spans j*32 + l, j < IN_CHUNK / (32 VEC<T>), of the chunk: voxels (j*32 + l)*VEC<T> + e, e < VEC<T> (a
// warp's access is 512 contiguous bytes), 64 voxels per lane.
//   instance_norm_chunk_moments:  m_k = (1/n_k) sum_{i in k} x_i,  M2_k = sum_{i in k} (x_i - m_k)^2
//                                 (two passes over the chunk held in registers; each sum per lane in the order j, e,
//                                 then over the lanes by shuffles, a fixed butterfly)
//   instance_norm_combine:        mu = (1/V) sum_k n_k m_k,  var = (1/V) sum_k (M2_k + n_k (m_k - mu)^2),
//                                 rstd = 1/sqrt(var + eps)
//     Every term of var is a sum of squares, so a large common offset of x cancels nothing away (the exact
//     two-pass variance, regrouped by chunk).
//   instance_norm_apply:          y_i = (x_i - mu_p) * rstd_p * gamma_c + beta_c,  out_i = act(y_i) (act >= 0) or y_i;
//                                 with a skip map s: out_i = act(y_i + s_i), y_i and y_i + s_i each rounded to T
//                                 first, as the unfused norm, add and activation store them (the same bits)
// Backward, g = dL/dy, xhat_i = (x_i - mu_p) rstd_p; with a fused activation g_i = dL/dout_i act'(y_i), y_i
// recomputed exactly as the apply kernel computed it (the same bits as an unfused norm then activation):
//   instance_norm_chunk_grad_sums: per chunk  sum g_i  and  sum g_i xhat_i (summed as the moments are);
//                                  instance_norm_sum_chunks then adds the chunks of each plane: Sg_p, Sgx_p
//   instance_norm_backward_dx:     dx_i = gamma_c rstd_p (g_i - Sg_p / V - xhat_i Sgx_p / V)
//   instance_norm_param_grads:     dgamma_c = sum_n Sgx_(n,c),  dbeta_c = sum_n Sg_(n,c)   (n in increasing order)
//
// LayerNorm. x is (R, C): R rows of C contiguous channels. A team of L = p.lanes lanes (a power of two, at most 32)
// works on a row, 32 / L rows per warp: lane s of its team holds the row's groups j*L + s, channels (j*L + s)*8 + e,
// e < 8, j < G (G = 1: rows of up to LN_NARROW_CHANNELS = 32*8 channels; the _wide instances G = LN_WIDE_GROUPS, up to
// LN_WIDE_CHANNELS). The host takes the smallest power of two L >= C / 8 (at most 32), so a warp's access is
// contiguous and a team's sums take log2(L) shuffles. Block b of teams = blockDim.x / L teams takes the rows
// [b rows_per_block, (b+1) rows_per_block), its team t the rows b rows_per_block + i teams + t, i = 0, 1, ... in that
// order; with G = 1 the next row's loads are issued before the current row is used.
//   layer_norm_forward:  mu_r = (1/C) sum_c x_rc,  var_r = (1/C) sum_c (x_rc - mu_r)^2 (second pass over the row held
//                        in registers), rstd_r = 1/sqrt(var_r + eps),  y_rc = (x_rc - mu_r) rstd_r gamma_c + beta_c
//   layer_norm_backward: h_rc = gamma_c g_rc,
//                        dx_rc = rstd_r (h_rc - (1/C) sum_c h_rc - xhat_rc (1/C) sum_c h_rc xhat_rc)
//                        and, from the same reads of x and g, the parameter gradients' partial sums of block b:
//                        Pgamma[c, b] = sum_r g_rc xhat_rc,  Pbeta[c, b] = sum_r g_rc  over the block's rows
//                        (each lane over its team's rows in order, for its channels; then the teams of a warp by
//                        shuffles, a fixed butterfly; then the warps in order w = 0, 1, ... through shared memory);
//                        layer_norm_sum_partials then gives dgamma_c = sum_b Pgamma[c, b], the same for beta.
//   Row sums: per lane in the order j, e, then over the team by shuffles (a fixed butterfly).
//
//   norm_sum_rows:       out_r = sum_j a[r, j] for a (rows, len) row-major: one block per row, block_sum (kernels
//                        instance_norm_sum_chunks and layer_norm_sum_partials).
//
// Every reduction has a fixed order (per-lane loops, then fixed shuffle and block_sum trees), so results are the same
// bits on every run.
//
// Cost per element, in units of the storage size E (4 bytes float32, 2 bf16; bytes: least traffic, then what these
// kernels move; the float32 statistics are per plane or row, negligible; FLOPs: adds, multiplies, divisions and
// square roots count one each; see src/ops/mod.rs):
//   InstanceNorm forward  at least 2E bytes, 3E as written (x is read by the moments and by the apply kernel: a plane
//                         does not fit in cache); about 8 FLOPs
//   InstanceNorm backward at least 3E bytes, 5E as written (x and g read by the chunk sums and by the dx kernel);
//                         about 12 FLOPs
//   LayerNorm forward     2E bytes (the row stays in registers across the passes); about 8 FLOPs
//   LayerNorm backward    3E bytes (dx and the parameter gradients' partial sums from one read of x and g); about
//                         15 FLOPs
// Instructions: one 16-byte load or store per VEC<T> elements on the vector path; a chunk's plane and channel, a
// row's statistics and a span's address are formed once per chunk, row or span (64-bit only for the chunk's or row's
// first element), so what remains per element is its conversion and the arithmetic above. The chunk kernels have no
// block barrier (a warp owns its chunk).
#include "common.cuh"

#include "norm.cuh"

// Sum over the `lanes` lanes of an aligned team (a power of two, at most 32: 32 is the warp) by a fixed butterfly;
// every lane of the team gets the result. Every lane of the warp must call it (the shuffles name the whole warp).
__device__ __forceinline__ float team_sum(float v, int lanes) {
    for (int o = lanes >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The number of voxels of chunk k of a plane of v voxels (0 only for an empty plane).
__device__ __forceinline__ int in_chunk_count(int64_t v, int64_t k) {
    int64_t rest = v - k * IN_CHUNK;
    return rest < 0 ? 0 : (rest < IN_CHUNK ? (int)rest : IN_CHUNK);
}

// An activation code (common.cuh's ActivationCode, or -1 for none) as a type: a chunk body instantiated for it has no
// per-element switch.
template <int A>
struct ActCode {
    static constexpr int value = A;
};

// Calls f(ActCode<act>()): one instance of f's body per fused activation, chosen once per warp.
template <typename F>
__device__ __forceinline__ void with_act(int act, F&& f) {
    switch (act) {
        case ACT_LEAKY_RELU: f(ActCode<ACT_LEAKY_RELU>()); break;
        case ACT_SILU: f(ActCode<ACT_SILU>()); break;
        case ACT_SOFTPLUS: f(ActCode<ACT_SOFTPLUS>()); break;
        default: f(ActCode<-1>()); break;
    }
}

// The gradient reaching y = affine(x): g itself, or with a fused activation (ACT >= 0) g act'(y), y formed as in
// instance_norm_apply (scale = rstd_p gamma_c, shift = beta_c). The product is rounded on its own (__fmul_rn, which
// the compiler never contracts into a following add): the unfused activation's backward stores it rounded, and the
// fused kernels must give the same bits (the dx kernel's g act'(y) - mean_g became one FMA otherwise, 9e-10 apart on
// the H200).
template <int ACT>
__device__ __forceinline__ float grad_at_affine(float gv, float xv, float mu, float scale, float shift) {
    return ACT < 0 ? gv : __fmul_rn(gv, activation_derivative(ACT, (xv - mu) * scale + shift));
}

namespace {

// ---------------------------------------------------------------------------------------------------------------
// InstanceNorm. Launch the chunk kernels with IN_THREADS threads and ceil(planes * chunks / IN_WARPS) blocks.

// Spans of VEC<T> voxels per lane of a chunk; spans per batch of the streaming kernels (apply, grad sums, dx), whose
// loads are issued together before any of them is used.
template <typename T>
constexpr int IN_SPANS = IN_CHUNK / (32 * VEC<T>);
constexpr int IN_BATCH = 4;
static_assert(IN_CHUNK % (32 * 8 * IN_BATCH) == 0, "a chunk is whole batches for both storage types");

// The chunk of the calling warp: its index p * chunks + k, plane p, the offset of its first voxel in the map, and
// its voxel count; valid is false for a warp past the last chunk. The sums kernels take the chunks from the last
// (InWalk).
struct InChunk {
    bool valid;
    int n;
    int64_t id, plane, start;
};

// The chunk sums (moments, grad sums) walk the map from its last chunk and the streaming kernels (apply, dx) from its
// first, so each starts where the kernel before it ended: the sums on the map's end, which its producer (a conv,
// walking its positions forwards) wrote last, and the streaming kernel on the map's start, which the sums read last;
// both still in L2 (50 MB on the H100 and H200) for a map too large to stay there whole.
enum class InWalk { from_first, from_last };

template <typename T>
__device__ __forceinline__ InChunk in_chunk(const InstanceNormParams<T>& a, InWalk walk) {
    InChunk ck;
    const int64_t total = a.N * a.C * a.chunks, warp = (int64_t)blockIdx.x * IN_WARPS + (threadIdx.x >> 5);
    ck.id = walk == InWalk::from_last ? total - 1 - warp : warp;
    ck.valid = warp < total;
    ck.plane = ck.id / a.chunks;
    const int64_t k = ck.id - ck.plane * a.chunks;
    ck.start = ck.plane * a.V + k * IN_CHUNK;
    ck.n = in_chunk_count(a.V, k);
    return ck;
}

// The first voxel, within the chunk, of span j of the calling lane.
template <typename T>
__device__ __forceinline__ int in_span(int j) {
    return (j * 32 + (int)(threadIdx.x & 31)) * VEC<T>;
}

// Spans j0 .. j0 + S - 1 of the calling lane in a chunk of n voxels of `a`, raw (load_raw: 16-byte loads where `vec`
// and the span is whole): every load issued before any is unpacked.
template <int S, typename T>
__device__ __forceinline__ void in_load(const T* a, int n, bool vec, int j0, uint4 (&raw)[S]) {
#pragma unroll
    for (int s = 0; s < S; s++) raw[s] = load_raw(a + in_span<T>(j0 + s), n - in_span<T>(j0 + s), vec);
}

template <typename T>
__device__ void instance_norm_chunk_moments(const InstanceNormParams<T>& args) {
    const InChunk ck = in_chunk(args, InWalk::from_last);
    if (!ck.valid) return;  // the whole warp, and nothing below involves another warp
    const T* x = args.x + ck.start;
    const bool vec = aligned16(x);
    uint4 raw[IN_SPANS<T>];
    in_load(x, ck.n, vec, 0, raw);
    float v[IN_SPANS<T>][VEC<T>];
#pragma unroll
    for (int j = 0; j < IN_SPANS<T>; j++) unpack_vec<T>(raw[j], v[j]);
    float s = 0.0f;  // the zeros past n_k add nothing
#pragma unroll
    for (int j = 0; j < IN_SPANS<T>; j++)
#pragma unroll
        for (int e = 0; e < VEC<T>; e++) s += v[j][e];
    s = team_sum(s, 32);
    const float m = ck.n > 0 ? s / (float)ck.n : 0.0f;
    float q = 0.0f;
#pragma unroll
    for (int j = 0; j < IN_SPANS<T>; j++)
#pragma unroll
        for (int e = 0; e < VEC<T>; e++) {
            const float d = v[j][e] - m;
            if (in_span<T>(j) + e < ck.n) q += d * d;
        }
    q = team_sum(q, 32);
    if ((threadIdx.x & 31) == 0) {
        args.chunk_mean[ck.id] = m;
        args.chunk_m2[ck.id] = q;
    }
}

template <typename T>
__device__ void instance_norm_apply(const InstanceNormParams<T>& args) {
    const InChunk ck = in_chunk(args, InWalk::from_first);
    if (!ck.valid) return;
    const T* x = args.x + ck.start;
    T* y = args.out + ck.start;
    const T* skip = args.skip != nullptr ? args.skip + ck.start : nullptr;
    const bool vec = aligned16(x) && aligned16(y) && (skip == nullptr || aligned16(skip));
    const int64_t c = ck.plane % args.C;
    const float mu = args.mean[ck.plane], scale = args.rstd[ck.plane] * args.gamma[c], shift = args.beta[c];
    // T's rounding of a float32 value, as a store and a load of T make it.
    const auto stored = [](float f) { return to_f32(from_f32<T>(f)); };
    with_act(args.act, [&](auto act) {
        constexpr int ACT = decltype(act)::value;
#pragma unroll
        for (int j0 = 0; j0 < IN_SPANS<T>; j0 += IN_BATCH) {
            uint4 xr[IN_BATCH], sr[IN_BATCH];
            in_load(x, ck.n, vec, j0, xr);
            if (skip != nullptr) in_load(skip, ck.n, vec, j0, sr);
#pragma unroll
            for (int b = 0; b < IN_BATCH; b++) {
                float v[VEC<T>], s[VEC<T>];
                unpack_vec<T>(xr[b], v);
                if (skip != nullptr) unpack_vec<T>(sr[b], s);
#pragma unroll
                for (int e = 0; e < VEC<T>; e++) {
                    float yv = (v[e] - mu) * scale + shift;
                    if (skip != nullptr) yv = stored(stored(yv) + s[e]);
                    v[e] = ACT < 0 ? yv : activation_value(ACT, yv);
                }
                store_span(y + in_span<T>(j0 + b), ck.n - in_span<T>(j0 + b), vec, v);
            }
        }
    });
}

// The spans j0 .. j0 + IN_BATCH - 1 of this lane in a chunk of n voxels, of x and of g, all loads issued before any
// is used (the backward's two chunk kernels).
template <typename T>
__device__ __forceinline__ void load_batch(const T* x, const T* g, int n, bool vec, int j0,
                                           float (&xv)[IN_BATCH][VEC<T>], float (&gv)[IN_BATCH][VEC<T>]) {
    uint4 xr[IN_BATCH], gr[IN_BATCH];
    in_load(x, n, vec, j0, xr);
    in_load(g, n, vec, j0, gr);
#pragma unroll
    for (int b = 0; b < IN_BATCH; b++) {
        unpack_vec<T>(xr[b], xv[b]);
        unpack_vec<T>(gr[b], gv[b]);
    }
}

template <typename T>
__device__ void instance_norm_chunk_grad_sums(const InstanceNormParams<T>& args) {
    const InChunk ck = in_chunk(args, InWalk::from_last);
    if (!ck.valid) return;
    const T* x = args.x + ck.start;
    const T* g = args.g + ck.start;
    const bool vec = aligned16(x) && aligned16(g);
    const float mu = args.mean[ck.plane], r = args.rstd[ck.plane];
    // Read only with a fused activation (gamma and beta are null otherwise).
    const int64_t c = ck.plane % args.C;
    const float scale = args.act < 0 ? 0.0f : r * args.gamma[c], shift = args.act < 0 ? 0.0f : args.beta[c];
    float sg = 0.0f, sgx = 0.0f;
    with_act(args.act, [&](auto act) {
        constexpr int ACT = decltype(act)::value;
#pragma unroll
        for (int j0 = 0; j0 < IN_SPANS<T>; j0 += IN_BATCH) {
            float xv[IN_BATCH][VEC<T>], gv[IN_BATCH][VEC<T>];
            load_batch(x, g, ck.n, vec, j0, xv, gv);
#pragma unroll
            for (int b = 0; b < IN_BATCH; b++)
#pragma unroll
                for (int e = 0; e < VEC<T>; e++)
                    if (in_span<T>(j0 + b) + e < ck.n) {
                        const float gy = grad_at_affine<ACT>(gv[b][e], xv[b][e], mu, scale, shift);
                        sg += gy;
                        sgx += gy * ((xv[b][e] - mu) * r);
                    }
        }
    });
    sg = team_sum(sg, 32);
    sgx = team_sum(sgx, 32);
    if ((threadIdx.x & 31) == 0) {
        args.chunk_g[ck.id] = sg;
        args.chunk_gx[ck.id] = sgx;
    }
}

template <typename T>
__device__ void instance_norm_backward_dx(const InstanceNormParams<T>& args) {
    const InChunk ck = in_chunk(args, InWalk::from_first);
    if (!ck.valid) return;
    const T* x = args.x + ck.start;
    const T* g = args.g + ck.start;
    T* dx = args.out + ck.start;
    const bool vec = aligned16(x) && aligned16(g) && aligned16(dx);
    const int64_t v = args.V, c = ck.plane % args.C;
    const float inv_v = 1.0f / (float)(v > 0 ? v : 1);
    const float mu = args.mean[ck.plane], r = args.rstd[ck.plane], scale = args.gamma[c] * r;
    // The apply kernel's scale and shift (rstd gamma, in that order), for a fused activation's derivative.
    const float y_scale = r * args.gamma[c], y_shift = args.act < 0 ? 0.0f : args.beta[c];
    const float mean_g = args.sum_g[ck.plane] * inv_v, mean_gx = args.sum_gx[ck.plane] * inv_v;
    with_act(args.act, [&](auto act) {
        constexpr int ACT = decltype(act)::value;
#pragma unroll
        for (int j0 = 0; j0 < IN_SPANS<T>; j0 += IN_BATCH) {
            float xv[IN_BATCH][VEC<T>], gv[IN_BATCH][VEC<T>];
            load_batch(x, g, ck.n, vec, j0, xv, gv);
#pragma unroll
            for (int b = 0; b < IN_BATCH; b++) {
#pragma unroll
                for (int e = 0; e < VEC<T>; e++) {
                    const float xhat = (xv[b][e] - mu) * r;
                    const float gy = grad_at_affine<ACT>(gv[b][e], xv[b][e], mu, y_scale, y_shift);
                    xv[b][e] = scale * (gy - mean_g - xhat * mean_gx);
                }
                const int at = in_span<T>(j0 + b);
                store_span(dx + at, ck.n - at, vec, xv[b]);
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------------------------
// LayerNorm. The row kernels take blockDim.x a multiple of 32 and of p.lanes, and grid ceil(rows / rows_per_block)
// (at least one block); G groups per lane (1, or LN_WIDE_GROUPS for the _wide instances). A row past the last one is
// read and written as an empty row (no channels), so that its team still takes part in the shuffles.

// The calling lane's place: lane s of team `team`, of `teams` teams of `lanes` lanes per block.
struct LnTeam {
    int lanes, s, team, teams;
};

__device__ __forceinline__ LnTeam ln_team(int lanes) {
    const int shift = __ffs(lanes) - 1;
    return LnTeam{lanes, (int)(threadIdx.x & (lanes - 1)), (int)(threadIdx.x >> shift), (int)(blockDim.x >> shift)};
}

// The first channel of the calling lane's group j.
__device__ __forceinline__ int ln_group(const LnTeam& t, int j) { return (j * t.lanes + t.s) * LN_GROUP; }

// The channels of a row that exist: C, or 0 past the last row.
template <typename T>
__device__ __forceinline__ int ln_width(const LayerNormParams<T>& p, int64_t row) {
    return row < p.rows ? (int)p.C : 0;
}

// A lane's G groups of a row as loaded, LN_GROUP / VEC<T> raw 16-byte vectors each (common.cuh's load_raw): the
// next row's loads stay in flight until ln_unpack uses them.
template <int G, typename T>
struct LnRaw {
    uint4 v[G][LN_GROUP / VEC<T>];
};

// The calling lane's groups of `row` of a (rows, C) tensor `a`, raw, 0 where the row has no channel.
template <int G, typename T>
__device__ __forceinline__ LnRaw<G, T> ln_load(const T* a, const LayerNormParams<T>& p, const LnTeam& t,
                                               int64_t row) {
    const int c = ln_width(p, row);
    const T* r = a + (c > 0 ? row * p.C : 0);
    const bool vec = aligned16(r);
    LnRaw<G, T> raw;
#pragma unroll
    for (int j = 0; j < G; j++)
#pragma unroll
        for (int h = 0; h < LN_GROUP / VEC<T>; h++) {
            const int at = ln_group(t, j) + h * VEC<T>;
            raw.v[j][h] = load_raw(r + at, c - at, vec);
        }
    return raw;
}

// The groups of ln_load as float32.
template <int G, typename T>
__device__ __forceinline__ void ln_unpack(const LnRaw<G, T>& raw, float (&v)[G][LN_GROUP]) {
#pragma unroll
    for (int j = 0; j < G; j++)
#pragma unroll
        for (int h = 0; h < LN_GROUP / VEC<T>; h++)
            unpack_vec<T>(raw.v[j][h], *reinterpret_cast<float(*)[VEC<T>]>(&v[j][h * VEC<T>]));
}

// Stores the calling lane's groups of `row` of `a` (nothing past the last row).
template <int G, typename T>
__device__ __forceinline__ void ln_store(T* a, const LayerNormParams<T>& p, const LnTeam& t, int64_t row,
                                         const float (&v)[G][LN_GROUP]) {
    const int c = ln_width(p, row);
    T* r = a + (c > 0 ? row * p.C : 0);
    const bool vec = aligned16(r);
#pragma unroll
    for (int j = 0; j < G; j++) store_span(r + ln_group(t, j), c - ln_group(t, j), vec, v[j]);
}

// With one group per lane a team's next row is loaded before the current one is used (two rows of loads in flight
// per lane: the loads of one row are too few to hide the memory's latency); the wide kernels have G groups in flight.
template <int G>
constexpr bool LN_PREFETCH = G == 1;

template <int G, typename T>
__device__ void layer_norm_forward_rows(const LayerNormParams<T>& p) {
    const LnTeam t = ln_team(p.lanes);
    const int64_t first = (int64_t)blockIdx.x * p.rows_per_block + t.team;
    const int rows_per_team = (int)(p.rows_per_block / t.teams);
    const float inv_c = 1.0f / (float)p.C;
    // gamma and beta of the lane's channels, the same in all its rows.
    float gm[G][LN_GROUP], bt[G][LN_GROUP];
    const bool pvec = aligned16(p.gamma) && aligned16(p.beta);
#pragma unroll
    for (int j = 0; j < G; j++) {
        load_span(p.gamma + ln_group(t, j), (int)p.C - ln_group(t, j), pvec, gm[j]);
        load_span(p.beta + ln_group(t, j), (int)p.C - ln_group(t, j), pvec, bt[j]);
    }
    LnRaw<G, T> cur = ln_load<G>(p.x, p, t, first), next;
    for (int i = 0; i < rows_per_team; i++) {
        const int64_t row = first + (int64_t)i * t.teams;
        const bool more = LN_PREFETCH<G> && i + 1 < rows_per_team;
        if (more) next = ln_load<G>(p.x, p, t, row + t.teams);
        float v[G][LN_GROUP];
        ln_unpack(cur, v);
        const int c = ln_width(p, row);
        float s = 0.0f;  // the zeros past C add nothing
#pragma unroll
        for (int j = 0; j < G; j++)
#pragma unroll
            for (int e = 0; e < LN_GROUP; e++) s += v[j][e];
        const float mu = team_sum(s, t.lanes) * inv_c;
        float q = 0.0f;
#pragma unroll
        for (int j = 0; j < G; j++)
#pragma unroll
            for (int e = 0; e < LN_GROUP; e++) {
                const float d = v[j][e] - mu;
                if (ln_group(t, j) + e < c) q += d * d;
            }
        const float r = 1.0f / sqrtf(team_sum(q, t.lanes) * inv_c + p.eps);
#pragma unroll
        for (int j = 0; j < G; j++)
#pragma unroll
            for (int e = 0; e < LN_GROUP; e++) v[j][e] = (v[j][e] - mu) * r * gm[j][e] + bt[j][e];
        ln_store(p.out, p, t, row, v);
        if (c > 0 && t.s == 0) {
            p.mean_out[row] = mu;
            p.rstd_out[row] = r;
        }
        if (more) cur = next;
        else if (i + 1 < rows_per_team) cur = ln_load<G>(p.x, p, t, row + t.teams);
    }
}

template <int G, typename T>
__device__ void layer_norm_backward_rows(const LayerNormParams<T>& p) {
    extern __shared__ float ln_warp_sums[];  // (warps, C), with parameter gradients
    const LnTeam t = ln_team(p.lanes);
    const int cols = (int)p.C;
    const int64_t first = (int64_t)blockIdx.x * p.rows_per_block + t.team;
    const int rows_per_team = (int)(p.rows_per_block / t.teams);
    const float inv_c = 1.0f / (float)p.C;
    const bool want_dx = p.out != nullptr, want_params = p.pgamma != nullptr;
    // gamma of the lane's channels, the same in all its rows.
    float gm[G][LN_GROUP];
    const bool gvec = aligned16(p.gamma);
#pragma unroll
    for (int j = 0; j < G; j++) load_span(p.gamma + ln_group(t, j), cols - ln_group(t, j), gvec, gm[j]);
    float acc_g[G][LN_GROUP] = {}, acc_gx[G][LN_GROUP] = {};
    LnRaw<G, T> xr = ln_load<G>(p.x, p, t, first), gr = ln_load<G>(p.g, p, t, first), xn, gn;
    for (int i = 0; i < rows_per_team; i++) {
        const int64_t row = first + (int64_t)i * t.teams;
        const bool more = LN_PREFETCH<G> && i + 1 < rows_per_team;
        if (more) {
            xn = ln_load<G>(p.x, p, t, row + t.teams);
            gn = ln_load<G>(p.g, p, t, row + t.teams);
        }
        float xv[G][LN_GROUP], gv[G][LN_GROUP];
        ln_unpack(xr, xv);
        ln_unpack(gr, gv);
        const int c = ln_width(p, row);
        const float mu = c > 0 ? p.mean[row] : 0.0f, r = c > 0 ? p.rstd[row] : 0.0f;
        float sh = 0.0f, shx = 0.0f;
#pragma unroll
        for (int j = 0; j < G; j++)
#pragma unroll
            for (int e = 0; e < LN_GROUP; e++)
                if (ln_group(t, j) + e < c) {
                    const float xhat = (xv[j][e] - mu) * r;
                    const float h = gm[j][e] * gv[j][e];
                    sh += h;
                    shx += h * xhat;
                    acc_g[j][e] += gv[j][e];
                    acc_gx[j][e] += gv[j][e] * xhat;
                    xv[j][e] = xhat;
                }
        const float mean_h = team_sum(sh, t.lanes) * inv_c, mean_hx = team_sum(shx, t.lanes) * inv_c;
        if (want_dx) {
#pragma unroll
            for (int j = 0; j < G; j++)
#pragma unroll
                for (int e = 0; e < LN_GROUP; e++)
                    xv[j][e] = r * (gm[j][e] * gv[j][e] - mean_h - xv[j][e] * mean_hx);
            ln_store(p.out, p, t, row, xv);
        }
        if (more) {
            xr = xn;
            gr = gn;
        } else if (i + 1 < rows_per_team) {
            xr = ln_load<G>(p.x, p, t, row + t.teams);
            gr = ln_load<G>(p.g, p, t, row + t.teams);
        }
    }
    if (!want_params) return;  // the same for the whole block: no barrier is skipped by part of it
    // The teams of a warp hold the same channels: add them (lane offsets lanes, 2 lanes, ..., 16).
#pragma unroll
    for (int j = 0; j < G; j++)
#pragma unroll
        for (int e = 0; e < LN_GROUP; e++)
            for (int o = t.lanes; o < 32; o <<= 1) {
                acc_g[j][e] += __shfl_xor_sync(0xffffffffu, acc_g[j][e], o);
                acc_gx[j][e] += __shfl_xor_sync(0xffffffffu, acc_gx[j][e], o);
            }
    // Then the warps, in order, through shared memory: first the sums of g xhat (into pgamma), then those of g.
    const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
    for (int round = 0; round < 2; round++) {
        if ((int)(threadIdx.x & 31) < t.lanes) {  // team 0 of the warp
#pragma unroll
            for (int j = 0; j < G; j++)
#pragma unroll
                for (int e = 0; e < LN_GROUP; e++) {
                    const int ch = ln_group(t, j) + e;
                    if (ch < cols) ln_warp_sums[warp * cols + ch] = round == 0 ? acc_gx[j][e] : acc_g[j][e];
                }
        }
        __syncthreads();
        float* out = round == 0 ? p.pgamma : p.pbeta;
        for (int ch = threadIdx.x; ch < cols; ch += blockDim.x) {
            float sum = 0.0f;
            for (int w = 0; w < warps; w++) sum += ln_warp_sums[w * cols + ch];
            out[(int64_t)ch * gridDim.x + blockIdx.x] = sum;
        }
        __syncthreads();
    }
}

template <typename T>
__device__ void layer_norm_forward(const LayerNormParams<T>& p) { layer_norm_forward_rows<1>(p); }
template <typename T>
__device__ void layer_norm_forward_wide(const LayerNormParams<T>& p) { layer_norm_forward_rows<LN_WIDE_GROUPS>(p); }
template <typename T>
__device__ void layer_norm_backward(const LayerNormParams<T>& p) { layer_norm_backward_rows<1>(p); }
template <typename T>
__device__ void layer_norm_backward_wide(const LayerNormParams<T>& p) { layer_norm_backward_rows<LN_WIDE_GROUPS>(p); }

}  // namespace

TYPED_KERNEL(instance_norm_chunk_moments_f32, instance_norm_chunk_moments_bf16, instance_norm_chunk_moments,
             InstanceNormParams)
TYPED_KERNEL(instance_norm_apply_f32, instance_norm_apply_bf16, instance_norm_apply, InstanceNormParams)
TYPED_KERNEL(instance_norm_chunk_grad_sums_f32, instance_norm_chunk_grad_sums_bf16, instance_norm_chunk_grad_sums,
             InstanceNormParams)
TYPED_KERNEL(instance_norm_backward_dx_f32, instance_norm_backward_dx_bf16, instance_norm_backward_dx,
             InstanceNormParams)
TYPED_KERNEL(layer_norm_forward_f32, layer_norm_forward_bf16, layer_norm_forward, LayerNormParams)
TYPED_KERNEL(layer_norm_forward_wide_f32, layer_norm_forward_wide_bf16, layer_norm_forward_wide, LayerNormParams)
TYPED_KERNEL(layer_norm_backward_f32, layer_norm_backward_bf16, layer_norm_backward, LayerNormParams)
TYPED_KERNEL(layer_norm_backward_wide_f32, layer_norm_backward_wide_bf16, layer_norm_backward_wide, LayerNormParams)

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
