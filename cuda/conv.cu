// Convolutions as implicit matrix products (no im2col buffer), float32: conv (2D/3D, any kernel per axis, any
// stride, zero padding) and the transposed conv whose kernel equals its stride. 2D maps are 3D maps of depth 1.
//
// Every pass pairs a "wide" map Xw (N, Cw, I0, I1, I2) with a "narrow" map Xn (N, Cn, O0, O1, O2) through a weight
// W (Cn, Cw, k0, k1, k2), a stride s and a padding p per axis: narrow position o meets wide position i = o*s + a - p
// at tap a. Three products cover every forward and backward pass (wide positions outside [0, I) read as 0):
//
//   narrow_from_wide:  Xn[n,cn,o] = b[cn] + sum_{cw,a} W[cn,cw,a] Xw[n,cw, o*s + a - p]
//   wide_from_narrow:  Xw[n,cw,i] = b[cw] + sum_{cn,a,o : o*s + a - p = i, 0 <= o < O} W[cn,cw,a] Xn[n,cn,o]
//   weight_grad:       dW[cn,cw,a] = sum_{n,o} Xn[n,cn,o] Xw[n,cw, o*s + a - p]
//
//   conv           (x wide, y narrow, p = k/2):               y = narrow_from_wide(x), dx = wide_from_narrow(g),
//                                                             dw = weight_grad(g, x)
//   conv_transpose (x narrow, y wide, s = k, p = 0, W is (Cin, Cout, k)):
//                                                             y = wide_from_narrow(x), dx = narrow_from_wide(g),
//                                                             dw = weight_grad(x, g)
//
// conv_gemm computes the first two as one matrix product per launch (kernels conv_fprop_f32, conv_dgrad_f32,
// conv_transpose_fprop_f32, conv_transpose_dgrad_f32: one name per role), out[m, col] = sum_k A[m, k] B[k, col]:
//   rows m = (n, r0, r1, r2) over N x rows[0] x rows[1] x rows[2] output positions, columns col = output channels,
//   reduction k = (c, q0, q1, q2) over the source channels x taps[0] x taps[1] x taps[2], and per axis d
//     source coordinate  src_mul[d]*r[d] + src_add[d] + src_tap[d]*q[d]   (A gathers 0 outside [0, src[d]))
//     output coordinate  dst_mul[d]*r[d] + dst_add[d]
//     kernel tap         a[d] = tap_mul[d]*q[d] + tap_add[d],   B[k, col] = w[col*w_dst + c*w_src + tap(a)]
//   narrow_from_wide is one launch: r = o, src coordinate o*s - p + q, a = q.
//   wide_from_narrow is one launch per phase rho (per axis rho in [0, s)): the wide positions i with i + p = s*J + rho,
//   J = J0 + r; only the taps a = s*q + rho reach them, from o = J - q. So a strided input gradient does no work on
//   taps that cannot contribute, and the transposed conv's forward (s = k) is a plain product over Cin per phase.
//
// conv_weight_grad (kernels conv_wgrad_f32, conv_transpose_wgrad_f32): dW[cn, j] with j = (cw, a), as rows j, columns cn,
// reduction over (n, o), split deterministically into fixed K slices that write partial[slice, cn, j]; sum_slices
// adds the slices in order. channel_sums reduces a map over (n, voxels) per channel (the bias gradient) in fixed
// chunks, then again over the chunks.
//
// The parameter structs (ConvGemmParams for conv_gemm, ConvWgradParams, SumSlicesParams, ChannelSumsParams), the tile
// sizes and the kernels are declared in conv.cuh; every kernel takes its struct by value.
//
// Tiling (all three products): a block computes a BM x BN tile of out from shared-memory stages of BK reduction
// indices; warp w owns columns 4w..4w+3 and lane l the rows l, l+32, l+64, l+96, so a warp's output writes and its
// gathers along W are consecutive addresses. The decoded reduction indices of a stage (channel, coordinates, weight
// offset) are computed once per block into a small table, double-buffered so one barrier pair per stage suffices.
//
// Cost (bytes: least traffic, 4 per float; FLOPs: adds and multiplies count one each; see src/ops/mod.rs): each of
// the three products does 2 Cn Cw k FLOPs per narrow position (k taps). Per element of a conv's y (Cin -> Cout,
// stride volume s) that is 2 Cin k FLOPs for at least 4 (1 + Cin / (Cout s)) bytes: at stage 0 of the 3D reference
// (32 -> 32 channels, 3x3x3) 1728 FLOPs per 8 bytes, 216 per byte, bound by arithmetic. sum_slices, channel_sums:
// 4 bytes and 1 FLOP per element summed.
#include "common.cuh"
#include "conv.cuh"

namespace {

// Rows and columns per block tile, reduction indices per shared-memory stage, threads (8 warps x 4 columns = BN;
// 32 lanes x 4 rows = BM).
constexpr int BM = CONV_BM, BN = CONV_BN, BK = CONV_BK, THREADS = CONV_THREADS;
constexpr int A_STRIDE = BM + 4;    // padding keeps the k-major stores of the weight-gradient tiles at 2-way conflicts
constexpr int B_STRIDE = BN + 4;    // a multiple of 4, so each row's 4 columns of a warp are one aligned float4

static_assert(THREADS == 32 * (BN / 4) && BM == 4 * 32, "thread layout: warp = 4 columns, lane = 4 rows");
static_assert(THREADS % BM == 0 && BK % (THREADS / BM) == 0, "A stage loads of conv_gemm");
static_assert(THREADS % BK == 0 && BN % (THREADS / BK) == 0 && BM % (THREADS / BK) == 0, "k-major stage loads");

// acc[i][j] += sum_kk As[kk][lane + 32 i] * Bs[kk][4 warp + j]
__device__ __forceinline__ void tile_product_simt(const float (*As)[A_STRIDE], const float (*Bs)[B_STRIDE],
                                             float (&acc)[4][4]) {
    const int lane = threadIdx.x & 31, col = (threadIdx.x >> 5) * 4;
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
        float a[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = As[kk][lane + 32 * i];
        const float4 b = *reinterpret_cast<const float4*>(&Bs[kk][col]);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            acc[i][0] = fmaf(a[i], b.x, acc[i][0]);
            acc[i][1] = fmaf(a[i], b.y, acc[i][1]);
            acc[i][2] = fmaf(a[i], b.z, acc[i][2]);
            acc[i][3] = fmaf(a[i], b.w, acc[i][3]);
        }
    }
}

// Where acc[i][j] of this thread lies in the BM x BN tile: row lane + 32 i, column 4 warp + j.
__device__ __forceinline__ void acc_position(int i, int j, int& row, int& col) {
    row = (threadIdx.x & 31) + 32 * i;
    col = 4 * (threadIdx.x >> 5) + j;
}

__device__ __forceinline__ bool in_box(const int c[3], const int size[3]) {
    return (unsigned)c[0] < (unsigned)size[0] && (unsigned)c[1] < (unsigned)size[1] &&
           (unsigned)c[2] < (unsigned)size[2];
}

// (c[0]*size[1] + c[1])*size[2] + c[2]
__device__ __forceinline__ int64_t flat3(const int c[3], const int size[3]) {
    return ((int64_t)c[0] * size[1] + c[1]) * size[2] + c[2];
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// conv_gemm: narrow_from_wide and (one phase of) wide_from_narrow, on the fields of ConvGemmParams (conv.cuh).

namespace {

// A decoded reduction index k = (c, q) of conv_gemm: source channel, the tap's source-coordinate offset per axis,
// and the weight offset c*w_src + tap(a).
struct GemmK {
    int c, w, off[3], ok;
};

__device__ __forceinline__ GemmK decode_gemm_k(const ConvGemmParams<float>& g, int k, int K) {
    GemmK e;
    e.ok = k < K;
    if (!e.ok) k = 0;  // any valid index; the entry is masked by ok
    const int taps = g.taps[0] * g.taps[1] * g.taps[2];
    e.c = k / taps;
    int q[3];
    split3(k - e.c * taps, g.taps, q);
    int tap = 0;
#pragma unroll
    for (int d = 0; d < 3; ++d) {
        tap = tap * g.kernel[d] + g.tap_mul[d] * q[d] + g.tap_add[d];
        e.off[d] = g.src_tap[d] * q[d];
    }
    e.w = e.c * g.w_src + tap;
    return e;
}

}  // namespace

// Grid (ceil(M / BM), ceil(c_dst / BN)), THREADS threads; M = batch * prod(rows) < 2^31.
__device__ __forceinline__ void conv_gemm(const ConvGemmParams<float>& g) {
    const float* __restrict__ src = g.src;
    const float* __restrict__ w = g.w;
    const float* __restrict__ bias = g.bias;
    float* __restrict__ dst = g.dst;
    __shared__ __align__(16) float As[BK][A_STRIDE];
    __shared__ __align__(16) float Bs[BK][B_STRIDE];
    __shared__ GemmK ktab[2][BK];

    const int t = threadIdx.x;
    const int M = g.batch * g.rows[0] * g.rows[1] * g.rows[2];
    const int K = g.c_src * g.taps[0] * g.taps[1] * g.taps[2];
    const int m0 = blockIdx.x * BM, col0 = blockIdx.y * BN;
    const int64_t src_vox = (int64_t)g.src_size[0] * g.src_size[1] * g.src_size[2];

    // A stage: thread t gathers row m0 + t % BM at the reduction indices t / BM + (THREADS / BM) j.
    const int a_row = t % BM, a_k = t / BM;
    const bool row_ok = m0 + a_row < M;
    int base[3];
    int64_t src_n;
    {
        int r[3];
        const int m = row_ok ? m0 + a_row : 0;
        const int per_n = g.rows[0] * g.rows[1] * g.rows[2];
        split3(m % per_n, g.rows, r);
#pragma unroll
        for (int d = 0; d < 3; ++d) base[d] = g.src_mul[d] * r[d] + g.src_add[d];
        src_n = (int64_t)(m / per_n) * g.c_src * src_vox;
    }
    // B stage: thread t loads reduction index t % BK for the columns t / BK + (THREADS / BK) j.
    const int b_k = t % BK, b_col = t / BK;

    float acc[4][4] = {};
    const int num_stages = (K + BK - 1) / BK;
    if (num_stages > 0 && t < BK) ktab[0][t] = decode_gemm_k(g, t, K);
    __syncthreads();
    for (int stage = 0; stage < num_stages; ++stage) {
        const GemmK* kt = ktab[stage & 1];
#pragma unroll
        for (int j = 0; j < BK / (THREADS / BM); ++j) {
            const int kk = a_k + j * (THREADS / BM);
            const GemmK e = kt[kk];
            float v = 0.0f;
            if (row_ok && e.ok) {
                const int c[3] = {base[0] + e.off[0], base[1] + e.off[1], base[2] + e.off[2]};
                if (in_box(c, g.src_size)) v = src[src_n + e.c * src_vox + flat3(c, g.src_size)];
            }
            As[kk][a_row] = v;
        }
        {
            const GemmK e = kt[b_k];
#pragma unroll
            for (int j = 0; j < BN / (THREADS / BK); ++j) {
                const int cc = b_col + j * (THREADS / BK), col = col0 + cc;
                Bs[b_k][cc] = (e.ok && col < g.c_dst) ? w[(int64_t)col * g.w_dst + e.w] : 0.0f;
            }
        }
        if (stage + 1 < num_stages && t < BK) ktab[(stage + 1) & 1][t] = decode_gemm_k(g, (stage + 1) * BK + t, K);
        __syncthreads();
        tile_product_simt(As, Bs, acc);
        __syncthreads();
    }

    const int64_t dst_vox = (int64_t)g.dst_size[0] * g.dst_size[1] * g.dst_size[2];
    const int per_n = g.rows[0] * g.rows[1] * g.rows[2];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int row, col;
            acc_position(i, j, row, col);
            const int m = m0 + row;
            col += col0;
            if (m >= M || col >= g.c_dst) continue;
            int r[3], c[3];
            split3(m % per_n, g.rows, r);
#pragma unroll
            for (int d = 0; d < 3; ++d) c[d] = g.dst_mul[d] * r[d] + g.dst_add[d];
            const int64_t out = (int64_t)(m / per_n) * g.c_dst * dst_vox + flat3(c, g.dst_size);
            dst[out + col * dst_vox] = acc[i][j] + (bias ? bias[col] : 0.0f);
        }
    }
}

// One kernel name per role (the same product), so that a profile says which pass it is timing. These are the exact
// float32 SIMT products (parity checks); the tf32 tensor-core products of training are in conv_tc.cu.
#define CONV_GEMM_KERNEL(NAME) \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(const ConvGemmParams<float> p) { conv_gemm(p); }
CONV_GEMM_KERNEL(conv_fprop_f32)        // conv forward: narrow_from_wide(x)
CONV_GEMM_KERNEL(conv_dgrad_f32)        // conv input gradient: wide_from_narrow(g), one launch per phase
CONV_GEMM_KERNEL(conv_transpose_fprop_f32)  // transposed conv forward: wide_from_narrow(x)
CONV_GEMM_KERNEL(conv_transpose_dgrad_f32)  // its input gradient: narrow_from_wide(g)

// ---------------------------------------------------------------------------------------------------------------
// conv_weight_grad: dW[cn, j] over rows j = (cw, a) in [0, Cw * taps), columns cn, reduction k = (n, o) over
// [0, N * prod(narrow)) cut into slices of slice_len (a multiple of BK); block z writes
// partial[z, cn, j] = sum over slice z. Its fields: ConvWgradParams (conv.cuh).

namespace {

// Row j = (cw, a) of dW: wide channel and a - p per axis.
struct WideTap {
    int c, off[3], ok;
};

// Reduction index k = (n, o): batch, narrow voxel, o*s per axis.
struct NarrowPos {
    int n, v, base[3], ok;
};

__device__ __forceinline__ WideTap decode_wide_tap(const ConvWgradParams<float>& g, int j, int M) {
    WideTap e;
    e.ok = j < M;
    if (!e.ok) j = 0;
    const int taps = g.kernel[0] * g.kernel[1] * g.kernel[2];
    e.c = j / taps;
    int a[3];
    split3(j - e.c * taps, g.kernel, a);
#pragma unroll
    for (int d = 0; d < 3; ++d) e.off[d] = a[d] - g.pad[d];
    return e;
}

__device__ __forceinline__ NarrowPos decode_narrow_pos(const ConvWgradParams<float>& g, int k, int k_end) {
    NarrowPos p;
    p.ok = k < k_end;
    if (!p.ok) k = 0;
    const int vox = g.narrow_size[0] * g.narrow_size[1] * g.narrow_size[2];
    p.n = k / vox;
    p.v = k - p.n * vox;
    int o[3];
    split3(p.v, g.narrow_size, o);
#pragma unroll
    for (int d = 0; d < 3; ++d) p.base[d] = o[d] * g.stride[d];
    return p;
}

}  // namespace

// Grid (ceil(Cw * taps / BM), ceil(Cn / BN), slices), THREADS threads; N * prod(narrow) < 2^31.
__device__ __forceinline__ void conv_weight_grad(const ConvWgradParams<float>& g) {
    const float* __restrict__ narrow = g.narrow;
    const float* __restrict__ wide = g.wide;
    float* __restrict__ partial = g.partial;
    __shared__ __align__(16) float As[BK][A_STRIDE];
    __shared__ __align__(16) float Bs[BK][B_STRIDE];
    __shared__ WideTap jtab[BM];
    __shared__ NarrowPos ktab[2][BK];

    const int t = threadIdx.x;
    const int M = g.c_wide * g.kernel[0] * g.kernel[1] * g.kernel[2];
    const int narrow_vox = g.narrow_size[0] * g.narrow_size[1] * g.narrow_size[2];
    const int64_t wide_vox = (int64_t)g.wide_size[0] * g.wide_size[1] * g.wide_size[2];
    const int K = g.batch * narrow_vox;
    const int m0 = blockIdx.x * BM, col0 = blockIdx.y * BN;
    const int k_begin = blockIdx.z * g.slice_len, k_end = min(K, k_begin + g.slice_len);

    if (t < BM) jtab[t] = decode_wide_tap(g, m0 + t, M);
    const int num_stages = (k_end - k_begin + BK - 1) / BK;
    if (num_stages > 0 && t < BK) ktab[0][t] = decode_narrow_pos(g, k_begin + t, k_end);
    __syncthreads();

    // Both stages are loaded k-major: thread t takes reduction index t % BK (consecutive narrow voxels across a
    // half-warp) for the rows / columns t / BK + (THREADS / BK) j.
    const int l_k = t % BK, l_row = t / BK;
    float acc[4][4] = {};
    for (int stage = 0; stage < num_stages; ++stage) {
        const NarrowPos p = ktab[stage & 1][l_k];
#pragma unroll
        for (int j = 0; j < BM / (THREADS / BK); ++j) {
            const int jj = l_row + j * (THREADS / BK);
            const WideTap e = jtab[jj];
            float v = 0.0f;
            if (p.ok && e.ok) {
                const int c[3] = {p.base[0] + e.off[0], p.base[1] + e.off[1], p.base[2] + e.off[2]};
                if (in_box(c, g.wide_size)) v = wide[((int64_t)p.n * g.c_wide + e.c) * wide_vox + flat3(c, g.wide_size)];
            }
            As[l_k][jj] = v;
        }
#pragma unroll
        for (int j = 0; j < BN / (THREADS / BK); ++j) {
            const int cc = l_row + j * (THREADS / BK), cn = col0 + cc;
            Bs[l_k][cc] = (p.ok && cn < g.c_narrow)
                              ? narrow[((int64_t)p.n * g.c_narrow + cn) * narrow_vox + p.v]
                              : 0.0f;
        }
        if (stage + 1 < num_stages && t < BK)
            ktab[(stage + 1) & 1][t] = decode_narrow_pos(g, k_begin + (stage + 1) * BK + t, k_end);
        __syncthreads();
        tile_product_simt(As, Bs, acc);
        __syncthreads();
    }

    float* out = partial + (int64_t)blockIdx.z * g.c_narrow * M;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
            int row, col;
            acc_position(i, jj, row, col);
            const int j = m0 + row, cn = col0 + col;
            if (j < M && cn < g.c_narrow) out[(int64_t)cn * M + j] = acc[i][jj];
        }
    }
}

// The exact float32 SIMT weight gradients (parity checks); the tf32 tensor-core ones are in conv_tc.cu.
#define CONV_WGRAD_KERNEL(NAME) \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(const ConvWgradParams<float> p) { conv_weight_grad(p); }
CONV_WGRAD_KERNEL(conv_wgrad_f32)        // conv: weight_grad(g, x)
CONV_WGRAD_KERNEL(conv_transpose_wgrad_f32)  // transposed conv: weight_grad(x, g)

// out[e] = sum_{z = 0 .. slices-1} partial[z * n + e], in that order.
extern "C" __global__ void sum_slices(const SumSlicesParams p) {
    const float* __restrict__ partial = p.partial;
    float* __restrict__ out = p.out;
    const int64_t n = p.n;
    FOR_EACH(e, n) {
        float s = 0.0f;
        for (int z = 0; z < p.slices; ++z) s += partial[z * n + e];
        out[e] = s;
    }
}

// x is (rows, channels, len); block (b = r * chunks + q, c) writes out[c, b] = sum_{v in chunk q} x[r, c, v], chunk q
// being [q * chunk_len, min(len, (q + 1) * chunk_len)), summed in float32. Grid (rows * chunks, channels), blockDim a
// multiple of 32.
namespace {
template <typename T>
__device__ void channel_sums(const ChannelSumsParams<T>& p) {
    __shared__ float scratch[32];
    const int c = blockIdx.y, r = blockIdx.x / p.chunks, q = blockIdx.x % p.chunks;
    const T* row = p.x + ((int64_t)r * p.channels + c) * p.len;
    const int64_t begin = q * p.chunk_len, end = min(p.len, begin + p.chunk_len);
    float s = 0.0f;
    for (int64_t v = begin + threadIdx.x; v < end; v += blockDim.x) s += to_f32(row[v]);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) p.out[(int64_t)c * gridDim.x + blockIdx.x] = s;
}
}  // namespace
TYPED_KERNEL(channel_sums_f32, channel_sums_bf16, channel_sums, ChannelSumsParams)

// col[n, c taps + a, o] = src[n, c, o stride + a - pad], 0 outside the map: a thread writes 8 consecutive positions o
// of one row as a 16-byte piece, walking the coordinates from the first one's (no division per position).
extern "C" __global__ void conv_im2col_bf16(const ConvIm2colParams<__nv_bfloat16> p) {
    const int positions = p.narrow_size[0] * p.narrow_size[1] * p.narrow_size[2];
    const int taps = p.kernel[0] * p.kernel[1] * p.kernel[2], pieces_per_row = p.row / 8;
    const int64_t src_voxels = (int64_t)p.src_size[0] * p.src_size[1] * p.src_size[2];
    FOR_EACH(piece, p.pieces) {
        const int64_t row = piece / pieces_per_row;  // (n channels + c) taps + a
        const int a_flat = (int)(row % taps);
        int a[3], o[3];
        split3(a_flat, p.kernel, a);
        const int o0 = (int)(piece % pieces_per_row) * 8;
        split3(min(o0, positions - 1), p.narrow_size, o);
        const __nv_bfloat16* src = p.src + row / taps * src_voxels;
        unsigned w[4] = {0, 0, 0, 0};
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const int z = o[0] * p.stride[0] + a[0] - p.pad[0], y = o[1] * p.stride[1] + a[1] - p.pad[1],
                      x = o[2] * p.stride[2] + a[2] - p.pad[2];
            const bool inside = o0 + e < positions && z >= 0 && z < p.src_size[0] && y >= 0 && y < p.src_size[1] &&
                                x >= 0 && x < p.src_size[2];
            if (inside)
                w[e / 2] |= (unsigned)__bfloat16_as_ushort(src[((int64_t)z * p.src_size[1] + y) * p.src_size[2] + x])
                            << 16 * (e % 2);
            if (++o[2] == p.narrow_size[2]) {
                o[2] = 0;
                if (++o[1] == p.narrow_size[1]) {
                    o[1] = 0;
                    ++o[0];
                }
            }
        }
        *reinterpret_cast<uint4*>(p.col + piece * 8) = make_uint4(w[0], w[1], w[2], w[3]);
    }
}

// rows[n S + o, c taps + a] = src[n, c, o + a - pad], 0 outside the map: a thread writes 8 consecutive (c, a) of one
// position's row as a 16-byte piece, walking the taps and channels from the first one's (no division per element).
// The pieces are numbered position fastest (piece i: row i % rows, piece i / rows of it), so that a warp's 32 lanes
// gather each (c, a) at 32 consecutive positions (contiguous bytes of the source) and write 32 rows' pieces; numbered
// along the row instead, each lane's gathers fell in other channels and the source's sectors were read ~16 times over
// (H100: 512 x 20x20, batch 12, forward 0.24 ms against cuDNN's 0.09).
extern "C" __global__ void conv_im2row_bf16(const ConvIm2rowParams<__nv_bfloat16> p) {
    const int positions = p.size[0] * p.size[1] * p.size[2];
    const int taps = p.kernel[0] * p.kernel[1] * p.kernel[2], pieces_per_row = p.channels * taps / 8;
    const int64_t rows = p.pieces / pieces_per_row;
    const unsigned short* src = reinterpret_cast<const unsigned short*>(p.src);
    FOR_EACH(i, p.pieces) {
        const int64_t row = i % rows;  // n S + o
        const int k0 = (int)(i / rows) * 8, n = (int)(row / positions);
        int o[3], a[3];
        split3((int)(row % positions), p.size, o);
        int c = k0 / taps;
        split3(k0 % taps, p.kernel, a);
        unsigned w[4] = {0, 0, 0, 0};
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const int z = o[0] + a[0] - p.pad[0], y = o[1] + a[1] - p.pad[1], x = o[2] + a[2] - p.pad[2];
            if (z >= 0 && z < p.size[0] && y >= 0 && y < p.size[1] && x >= 0 && x < p.size[2])
                w[e / 2] |= (unsigned)src[((int64_t)n * p.channels + c) * positions +
                                          (z * p.size[1] + y) * p.size[2] + x]
                            << 16 * (e % 2);
            if (++a[2] == p.kernel[2]) {
                a[2] = 0;
                if (++a[1] == p.kernel[1]) {
                    a[1] = 0;
                    if (++a[0] == p.kernel[0]) {
                        a[0] = 0;
                        ++c;
                    }
                }
            }
        }
        *reinterpret_cast<uint4*>(p.rows + row * pieces_per_row * 8 + k0) = make_uint4(w[0], w[1], w[2], w[3]);
    }
}

// out[cw, cn taps + a] = w[cn, cw, taps - 1 - a].
extern "C" __global__ void conv_weight_flip_bf16(const ConvWeightFlipParams<__nv_bfloat16> p) {
    FOR_EACH(e, p.len) {
        const int a = (int)(e % p.taps), cn = (int)(e / p.taps % p.c_narrow);
        const int cw = (int)(e / ((int64_t)p.taps * p.c_narrow));
        p.out[e] = p.w[((int64_t)cn * p.c_wide + cw) * p.taps + p.taps - 1 - a];
    }
}

// dst[n, c, o] = sum_z c_rows[z, c, n positions + o] + bias[c], the slices in order, rounded once.
extern "C" __global__ void conv_rows_store_bf16(const ConvRowsStoreParams<__nv_bfloat16> p) {
    FOR_EACH(e, p.len) {
        const int o = (int)(e % p.positions), c = (int)(e / p.positions % p.channels);
        const int n = (int)(e / ((int64_t)p.positions * p.channels));
        const float* sums = p.c_rows + ((int64_t)c * p.batch + n) * p.positions + o;
        float v = 0.0f;
        for (int z = 0; z < p.slices; ++z) v += sums[z * p.len];
        p.dst[e] = __float2bfloat16(v + (p.bias != nullptr ? __bfloat162float(p.bias[c]) : 0.0f));
    }
}
