// Convolutions on the tensor cores (tf32 operands from float32 storage, or bf16 operands from bf16 storage; float32
// accumulation): the conv_gemm product of conv.cu,
//
//   out[m, col] = b[col] + sum_k A[m, k] B[k, col],   A[m, k] = src[n, c, src_mul*r + src_add + src_tap*q],
//                                                      B[k, col] = w[col*w_dst + c*w_src + tap(a)],
//
// rows m = (n, r), reduction k = (c, q) (conv.cu derives every forward and input-gradient pass from it), laid out so
// that the gathers cost little:
// - The source address is linear in the row and in the reduction index: src + off(m) + off(k), with
//   off(m) = (n*c_src*V + flat(src_mul*r + src_add)) and off(k) = c*V + flat(src_tap*q) (V the source voxels). Whether
//   the coordinate is inside the map is, per axis d, a property of (r_d, q_d) alone: each row keeps a mask with bit
//   10 d + q_d set when src_mul*r_d + src_add + src_tap*q_d lies in [0, src_d), each reduction index the three bits
//   of its taps, and A[m, k] is non-zero only if mask(m) & bits(k) == bits(k). A gather is two loads of a decoded
//   table entry, an and, a compare and an add.
// - The tiles arrive through cp.async (4-byte copies; a zero-fill copy of 0 bytes where A or B is 0) in a
//   CONV_TC_STAGES-deep pipeline, so the gathers of the next stages are in flight while the tensor cores work on this
//   one: one barrier per stage. bf16 elements (2 bytes, below cp.async's smallest copy) go through registers
//   (mma::Stager): loaded when their stage is issued, stored to shared memory after that iteration's products, so
//   they too are in flight while the tensor cores work.
// - Warp (wm, wn) of the 4 x 2 warps computes rows 32 wm .. 32 wm + 31 and BN / 2 columns with mma.sync.m16n8k8
//   (tf32 operands rounded to nearest with cvt.rna). Shared rows are padded by 8 floats, so the fragment loads
//   (lane g = l / 4, t = l % 4 reading [k0 + t][g]) hit 32 different banks.
// The weight gradient (conv.cu's weight_grad product, dW[cn, j] over rows j = (cw, a), reduction k = (n, o)) is laid
// out the same way with the roles turned: wide[n, cw, o*s + a - p] = wide + off(j) + off(k) with off(j) =
// cw*V + flat(a - p) and off(k) = n*c_wide*V + flat(o*s); each reduction index keeps the mask of taps a that land
// inside the map at its o, each row the bits of its a. Its tiles are stored k-contiguous (both operands run along
// the positions in memory), the products' tiles row-contiguous (A runs along the rows); the pipeline and the warp
// products are shared.
// Each output is one thread's sum in a fixed order (split reductions are summed in order by conv.cu's sum_slices):
// results do not depend on scheduling.
//
// Cost: 2 c_src prod(taps) FLOPs per output element of a product, 2 N prod(narrow) Cn Cw prod(kernel) for the
// weight gradient; bytes at least each operand and the output once.
#include "common.cuh"
#include "conv_tc.cuh"
#include "mma.cuh"

namespace {

constexpr int BM = CONV_TC_BM, BK = CONV_TC_BK, STAGES = CONV_TC_STAGES, THREADS = CONV_TC_THREADS;
constexpr int WARPS_M = 4, WARPS_N = 2;
template <int BN>
using Shape = mma::Shape<BM, BN, BK, STAGES, WARPS_M, WARPS_N>;
using mma::Acc;
constexpr unsigned PADDED_K = 1u << 31;  // the bits of a reduction index past K: never in a row mask
static_assert(WARPS_M * WARPS_N * 32 == THREADS && BM % (16 * WARPS_M) == 0, "warp layout");
static_assert(THREADS % BM == 0 && BK % (THREADS / BM) == 0 && BK % 8 == 0, "A stage loads: one row per thread");
static_assert(3 * CONV_TC_MAX_TAPS <= 31, "row masks hold 10 taps per axis below bit 31");

// A decoded reduction index k = (c, q): source offset c*V + flat(src_tap*q), weight offset c*w_src + tap(a), and
// its tap bits (PADDED_K past K).
struct KEntry {
    int src, w;
    unsigned bits;
    int unused;
};

template <typename T>
__device__ __forceinline__ KEntry decode_k(const ConvGemmParams<T>& p, int k, int K, int src_vox) {
    KEntry e{0, 0, PADDED_K, 0};
    if (k >= K) return e;
    const int taps = p.taps[0] * p.taps[1] * p.taps[2];
    const int c = k / taps;
    int q[3];
    split3(k - c * taps, p.taps, q);
    int tap = 0;
    e.bits = 0;
#pragma unroll
    for (int d = 0; d < 3; ++d) {
        tap = tap * p.kernel[d] + p.tap_mul[d] * q[d] + p.tap_add[d];
        e.bits |= 1u << (CONV_TC_MAX_TAPS * d + q[d]);
    }
    const int off = (p.src_tap[0] * q[0] * p.src_size[1] + p.src_tap[1] * q[1]) * p.src_size[2] + p.src_tap[2] * q[2];
    e.src = c * src_vox + off;
    e.w = c * p.w_src + tap;
    return e;
}

template <int BN, typename T>
__device__ __forceinline__ void conv_tc(const ConvGemmParams<T>& p) {
    using S = Shape<BN>;
    __shared__ __align__(16) mma::Tiles<S, true, true, T> tiles;
    __shared__ KEntry ktab[STAGES][BK];

    const int t = threadIdx.x;
    const int per_n = p.rows[0] * p.rows[1] * p.rows[2];
    const int M = p.batch * per_n;
    const int K = p.c_src * p.taps[0] * p.taps[1] * p.taps[2];
    const int src_vox = p.src_size[0] * p.src_size[1] * p.src_size[2];
    const int m0 = blockIdx.x * BM, col0 = blockIdx.y * BN;

    // This thread's A row: its source offset and tap mask (0: no tap is inside, also for rows past M).
    const int a_row = t % BM, a_k = t / BM;
    int64_t row_off = 0;
    unsigned row_mask = 0;
    if (m0 + a_row < M) {
        const int m = m0 + a_row, n = m / per_n;
        int r[3], base[3];
        split3(m - n * per_n, p.rows, r);
#pragma unroll
        for (int d = 0; d < 3; ++d) {
            base[d] = p.src_mul[d] * r[d] + p.src_add[d];
            for (int q = 0; q < p.taps[d]; ++q) {
                const unsigned c = (unsigned)(base[d] + p.src_tap[d] * q);
                if (c < (unsigned)p.src_size[d]) row_mask |= 1u << (CONV_TC_MAX_TAPS * d + q);
            }
        }
        row_off = (int64_t)n * p.c_src * src_vox + ((int64_t)base[0] * p.src_size[1] + base[1]) * p.src_size[2] + base[2];
    }
    const T* a_src = p.src + row_off;
    // B: reduction index t % BK, columns t / BK + (THREADS / BK) j.
    const int b_k = t % BK, b_col = t / BK;
    static_assert(THREADS % BK == 0 && BN % (THREADS / BK) == 0, "B stage loads");

    auto decode = [&](int stage, int slot) { ktab[slot][t] = decode_k(p, stage * BK + t, K, src_vox); };
    constexpr int A_PER = BK / (THREADS / BM), B_PER = BN / (THREADS / BK);
    mma::Stager<T, A_PER + B_PER> stager;
    auto load = [&](int, int slot) {
#pragma unroll
        for (int j = 0; j < A_PER; ++j) {
            const int kk = a_k + j * (THREADS / BM);
            const KEntry e = ktab[slot][kk];
            const bool ok = (row_mask & e.bits) == e.bits;
            stager.put(j, tiles.a_at(slot, a_row, kk), ok ? a_src + e.src : p.src, ok);
        }
        const KEntry e = ktab[slot][b_k];
#pragma unroll
        for (int j = 0; j < B_PER; ++j) {
            const int cc = b_col + j * (THREADS / BK), col = col0 + cc;
            const bool ok = e.bits != PADDED_K && col < p.c_dst;
            stager.put(A_PER + j, tiles.b_at(slot, cc, b_k), ok ? p.w + (int64_t)col * p.w_dst + e.w : p.w, ok);
        }
    };
    Acc<S> acc;
    mma::pipeline(tiles, (K + BK - 1) / BK, decode, load, [&] { stager.flush(); }, acc);

    const int dst_vox = p.dst_size[0] * p.dst_size[1] * p.dst_size[2];
#pragma unroll
    for (int i = 0; i < Acc<S>::MI; ++i) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int m = m0 + Acc<S>::row(i, 2 * half);
            if (m >= M) continue;
            const int n = m / per_n;
            int r[3];
            split3(m - n * per_n, p.rows, r);
            const int64_t out = (int64_t)n * p.c_dst * dst_vox +
                                ((int64_t)(p.dst_mul[0] * r[0] + p.dst_add[0]) * p.dst_size[1] +
                                 (p.dst_mul[1] * r[1] + p.dst_add[1])) * p.dst_size[2] +
                                p.dst_mul[2] * r[2] + p.dst_add[2];
#pragma unroll
            for (int j = 0; j < Acc<S>::NI; ++j) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int col = col0 + Acc<S>::col(j, h);
                    if (col < p.c_dst)
                        p.dst[out + (int64_t)col * dst_vox] =
                            from_f32<T>(acc.v[i][j][2 * half + h] + (p.bias ? to_f32(p.bias[col]) : 0.0f));
                }
            }
        }
    }
}

// A decoded reduction index k = (n, o) of the weight gradient: offsets of wide[n, 0, o*s] and narrow[n, 0, o], and
// the mask of taps a (bit 10 d + a_d) with o_d s_d + a_d - p_d inside the wide map (0 past the slice).
struct WgradK {
    int64_t wide, narrow;
    unsigned mask;
    int ok;  // k < k_end
};

template <typename T>
__device__ __forceinline__ WgradK decode_wgrad_k(const ConvWgradParams<T>& p, int k, int k_end, int narrow_vox,
                                                 int64_t wide_vox) {
    WgradK e{0, 0, 0u, k < k_end};
    if (!e.ok) return e;
    const int n = k / narrow_vox, v = k - n * narrow_vox;
    int o[3];
    split3(v, p.narrow_size, o);
    int64_t flat = 0;
#pragma unroll
    for (int d = 0; d < 3; ++d) {
        const int base = o[d] * p.stride[d];
        flat = flat * p.wide_size[d] + base;
        for (int a = 0; a < p.kernel[d]; ++a) {
            if ((unsigned)(base + a - p.pad[d]) < (unsigned)p.wide_size[d]) e.mask |= 1u << (CONV_TC_MAX_TAPS * d + a);
        }
    }
    e.wide = (int64_t)n * p.c_wide * wide_vox + flat;
    e.narrow = (int64_t)n * p.c_narrow * narrow_vox + v;
    return e;
}

template <int BN, typename T>
__device__ __forceinline__ void conv_wgrad_tc(const ConvWgradParams<T>& p) {
    using S = Shape<BN>;
    __shared__ __align__(16) mma::Tiles<S, false, false, T> tiles;
    __shared__ WgradK ktab[STAGES][BK];
    constexpr int ROWS_PER_THREAD = BM / (THREADS / BK), COLS_PER_THREAD = BN / (THREADS / BK);
    static_assert(THREADS % BK == 0 && BM % (THREADS / BK) == 0 && BN % (THREADS / BK) == 0, "k-major loads");

    const int t = threadIdx.x;
    const int taps = p.kernel[0] * p.kernel[1] * p.kernel[2];
    const int M = p.c_wide * taps;
    const int narrow_vox = p.narrow_size[0] * p.narrow_size[1] * p.narrow_size[2];
    const int64_t wide_vox = (int64_t)p.wide_size[0] * p.wide_size[1] * p.wide_size[2];
    const int K = p.batch * narrow_vox;
    const int m0 = blockIdx.x * BM, col0 = blockIdx.y * BN;
    const int k_begin = blockIdx.z * p.slice_len, k_end = min(K, k_begin + p.slice_len);

    // This thread loads reduction index t % BK of rows / columns t / BK + (THREADS / BK) i; its rows' offsets
    // cw*V + flat(a - p) and tap bits (PADDED_K past the rows) stay in registers for the whole slice.
    const int l_k = t % BK, l_row = t / BK;
    int64_t row_off[ROWS_PER_THREAD];
    unsigned row_bits[ROWS_PER_THREAD];
#pragma unroll
    for (int i = 0; i < ROWS_PER_THREAD; ++i) {
        const int j = m0 + l_row + i * (THREADS / BK);
        row_off[i] = 0;
        row_bits[i] = PADDED_K;
        if (j < M) {
            const int cw = j / taps;
            int a[3];
            split3(j - cw * taps, p.kernel, a);
            row_off[i] = cw * wide_vox +
                         ((int64_t)(a[0] - p.pad[0]) * p.wide_size[1] + (a[1] - p.pad[1])) * p.wide_size[2] + a[2] - p.pad[2];
            row_bits[i] = 1u << a[0] | 1u << (CONV_TC_MAX_TAPS + a[1]) | 1u << (2 * CONV_TC_MAX_TAPS + a[2]);
        }
    }

    auto decode = [&](int stage, int slot) {
        ktab[slot][t] = decode_wgrad_k(p, k_begin + stage * BK + t, k_end, narrow_vox, wide_vox);
    };
    mma::Stager<T, ROWS_PER_THREAD + COLS_PER_THREAD> stager;
    auto load = [&](int, int slot) {
        const WgradK e = ktab[slot][l_k];
#pragma unroll
        for (int i = 0; i < ROWS_PER_THREAD; ++i) {
            const bool ok = (e.mask & row_bits[i]) == row_bits[i];
            stager.put(i, tiles.a_at(slot, l_row + i * (THREADS / BK), l_k), ok ? p.wide + e.wide + row_off[i] : p.wide, ok);
        }
#pragma unroll
        for (int i = 0; i < COLS_PER_THREAD; ++i) {
            const int cc = l_row + i * (THREADS / BK), cn = col0 + cc;
            const bool ok = e.ok && cn < p.c_narrow;
            stager.put(ROWS_PER_THREAD + i, tiles.b_at(slot, cc, l_k),
                       ok ? p.narrow + e.narrow + (int64_t)cn * narrow_vox : p.narrow, ok);
        }
    };
    Acc<S> acc;
    mma::pipeline(tiles, (k_end - k_begin + BK - 1) / BK, decode, load, [&] { stager.flush(); }, acc);

    float* out = p.partial + (int64_t)blockIdx.z * p.c_narrow * M;
#pragma unroll
    for (int i = 0; i < Acc<S>::MI; ++i)
#pragma unroll
        for (int j = 0; j < Acc<S>::NI; ++j)
#pragma unroll
            for (int h = 0; h < 4; ++h) {
                const int row = m0 + Acc<S>::row(i, h), cn = col0 + Acc<S>::col(j, h);
                if (row < M && cn < p.c_narrow) out[(int64_t)cn * M + row] = acc.v[i][j][h];
            }
}

}  // namespace

// One name per role and type (the same product), so that a profile says which pass it times; _n32 for outputs of at
// most 32 channels, where a 64-column tile would leave half of the tensor-core work idle.
#define CONV_TC_KERNEL(NAME, BN, T) \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(const ConvGemmParams<T> p) { conv_tc<BN>(p); }
CONV_TC_KERNEL(conv_fprop_tf32, CONV_TC_BN, float)                     // conv forward
CONV_TC_KERNEL(conv_fprop_tf32_n32, CONV_TC_BN_NARROW, float)
CONV_TC_KERNEL(conv_dgrad_tf32, CONV_TC_BN, float)                     // conv input gradient, one launch per phase
CONV_TC_KERNEL(conv_dgrad_tf32_n32, CONV_TC_BN_NARROW, float)
CONV_TC_KERNEL(conv_transpose_fprop_tf32, CONV_TC_BN, float)           // transposed conv forward
CONV_TC_KERNEL(conv_transpose_fprop_tf32_n32, CONV_TC_BN_NARROW, float)
CONV_TC_KERNEL(conv_transpose_dgrad_tf32, CONV_TC_BN, float)           // its input gradient
CONV_TC_KERNEL(conv_transpose_dgrad_tf32_n32, CONV_TC_BN_NARROW, float)
CONV_TC_KERNEL(conv_fprop_bf16, CONV_TC_BN, __nv_bfloat16)             // the same in bf16
CONV_TC_KERNEL(conv_fprop_bf16_n32, CONV_TC_BN_NARROW, __nv_bfloat16)
CONV_TC_KERNEL(conv_dgrad_bf16, CONV_TC_BN, __nv_bfloat16)
CONV_TC_KERNEL(conv_dgrad_bf16_n32, CONV_TC_BN_NARROW, __nv_bfloat16)
CONV_TC_KERNEL(conv_transpose_fprop_bf16, CONV_TC_BN, __nv_bfloat16)
CONV_TC_KERNEL(conv_transpose_fprop_bf16_n32, CONV_TC_BN_NARROW, __nv_bfloat16)
CONV_TC_KERNEL(conv_transpose_dgrad_bf16, CONV_TC_BN, __nv_bfloat16)
CONV_TC_KERNEL(conv_transpose_dgrad_bf16_n32, CONV_TC_BN_NARROW, __nv_bfloat16)

#define CONV_WGRAD_TC_KERNEL(NAME, BN, T) \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(const ConvWgradParams<T> p) { conv_wgrad_tc<BN>(p); }
CONV_WGRAD_TC_KERNEL(conv_wgrad_tf32, CONV_TC_BN, float)                     // conv weight gradient
CONV_WGRAD_TC_KERNEL(conv_wgrad_tf32_n32, CONV_TC_BN_NARROW, float)
CONV_WGRAD_TC_KERNEL(conv_transpose_wgrad_tf32, CONV_TC_BN, float)           // transposed conv weight gradient
CONV_WGRAD_TC_KERNEL(conv_transpose_wgrad_tf32_n32, CONV_TC_BN_NARROW, float)
CONV_WGRAD_TC_KERNEL(conv_wgrad_bf16, CONV_TC_BN, __nv_bfloat16)             // the same in bf16
CONV_WGRAD_TC_KERNEL(conv_wgrad_bf16_n32, CONV_TC_BN_NARROW, __nv_bfloat16)
CONV_WGRAD_TC_KERNEL(conv_transpose_wgrad_bf16, CONV_TC_BN, __nv_bfloat16)
CONV_WGRAD_TC_KERNEL(conv_transpose_wgrad_bf16_n32, CONV_TC_BN_NARROW, __nv_bfloat16)
