// Convolutions on the tensor cores (tf32 operands, float32 accumulation): the conv_gemm product of conv.cu,
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
//   one: one barrier per stage.
// - Warp (wm, wn) of the 4 x 2 warps computes rows 32 wm .. 32 wm + 31 and BN / 2 columns with mma.sync.m16n8k8
//   (tf32 operands rounded to nearest with cvt.rna). Shared rows are padded by 8 floats, so the fragment loads
//   (lane g = l / 4, t = l % 4 reading [k0 + t][g]) hit 32 different banks.
// Each output is one thread's sum in a fixed order: results do not depend on scheduling.
//
// Cost: 2 c_src prod(taps) FLOPs per output element; bytes at least the source, weight and output once.
#include "common.cuh"
#include "conv_tc.cuh"

namespace {

constexpr int BM = CONV_TC_BM, BK = CONV_TC_BK, STAGES = CONV_TC_STAGES, THREADS = CONV_TC_THREADS;
constexpr int WARPS_M = 4, WARPS_N = 2;
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

__device__ __forceinline__ void split3(int i, const int e[3], int out[3]) {
    out[2] = i % e[2];
    i /= e[2];
    out[1] = i % e[1];
    out[0] = i / e[1];
}

__device__ __forceinline__ KEntry decode_k(const ConvTcParams& p, int k, int K, int src_vox) {
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

// dst <- 4 bytes at src when valid, else 0 (a zero-byte copy fills the destination with zeros).
__device__ __forceinline__ void cp_async4(float* dst, const float* src, bool valid) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ unsigned to_tf32(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ void mma_tf32(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int BN>
__device__ __forceinline__ void conv_tc(const ConvTcParams& p) {
    constexpr int WTN = BN / WARPS_N, MI = BM / WARPS_M / 16, NI = WTN / 8;
    constexpr int A_STRIDE = BM + 8, B_STRIDE = BN + 8;
    static_assert(THREADS % BK == 0 && BN % (THREADS / BK) == 0, "B stage loads");
    __shared__ __align__(16) float As[STAGES][BK][A_STRIDE];
    __shared__ __align__(16) float Bs[STAGES][BK][B_STRIDE];
    __shared__ KEntry ktab[STAGES][BK];

    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const int wm = warp % WARPS_M, wn = warp / WARPS_M, g = lane >> 2, tq = lane & 3;
    const int per_n = p.rows[0] * p.rows[1] * p.rows[2];
    const int M = p.batch * per_n;
    const int K = p.c_src * p.taps[0] * p.taps[1] * p.taps[2];
    const int src_vox = p.src_size[0] * p.src_size[1] * p.src_size[2];
    const int m0 = blockIdx.x * BM, col0 = blockIdx.y * BN;
    const int num_k = (K + BK - 1) / BK;

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
    const float* a_src = p.src + row_off;
    // B: reduction index t % BK, columns t / BK + (THREADS / BK) j.
    const int b_k = t % BK, b_col = t / BK;

    auto load_stage = [&](int stage, int slot) {
#pragma unroll
        for (int j = 0; j < BK / (THREADS / BM); ++j) {
            const int kk = a_k + j * (THREADS / BM);
            const KEntry e = ktab[slot][kk];
            const bool ok = (row_mask & e.bits) == e.bits;
            cp_async4(&As[slot][kk][a_row], ok ? a_src + e.src : p.src, ok);
        }
        const KEntry e = ktab[slot][b_k];
#pragma unroll
        for (int j = 0; j < BN / (THREADS / BK); ++j) {
            const int cc = b_col + j * (THREADS / BK), col = col0 + cc;
            const bool ok = e.bits != PADDED_K && col < p.c_dst;
            cp_async4(&Bs[slot][b_k][cc], ok ? p.w + (int64_t)col * p.w_dst + e.w : p.w, ok);
        }
        (void)stage;
    };

    if (t < BK) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) ktab[s][t] = decode_k(p, s * BK + t, K, src_vox);
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < num_k) load_stage(s, s);
        cp_async_commit();
    }

    float acc[MI][NI][4] = {};
    for (int kt = 0; kt < num_k; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int next = kt + STAGES - 1;
        if (next < num_k) load_stage(next, next % STAGES);
        cp_async_commit();
        // The table slot of stage kt + STAGES is free: its last reader, the load of stage kt, was issued before the
        // barrier above; the next iteration's barrier publishes it before the load of that stage.
        const int slot = kt % STAGES;
        if (t < BK) ktab[slot][t] = decode_k(p, (kt + STAGES) * BK + t, K, src_vox);
#pragma unroll
        for (int k0 = 0; k0 < BK; k0 += 8) {
            unsigned a[MI][4], b[NI][2];
#pragma unroll
            for (int i = 0; i < MI; ++i) {
                const int r = wm * (BM / WARPS_M) + 16 * i + g;
                a[i][0] = to_tf32(As[slot][k0 + tq][r]);
                a[i][1] = to_tf32(As[slot][k0 + tq][r + 8]);
                a[i][2] = to_tf32(As[slot][k0 + tq + 4][r]);
                a[i][3] = to_tf32(As[slot][k0 + tq + 4][r + 8]);
            }
#pragma unroll
            for (int j = 0; j < NI; ++j) {
                const int c = wn * WTN + 8 * j + g;
                b[j][0] = to_tf32(Bs[slot][k0 + tq][c]);
                b[j][1] = to_tf32(Bs[slot][k0 + tq + 4][c]);
            }
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NI; ++j) mma_tf32(acc[i][j], a[i], b[j][0], b[j][1]);
        }
    }
    cp_async_wait<0>();

    // Epilogue: acc[i][j][h] is row 16 i + g + 8 (h / 2) of the warp, column 8 j + 2 t + h % 2.
    const int dst_vox = p.dst_size[0] * p.dst_size[1] * p.dst_size[2];
#pragma unroll
    for (int i = 0; i < MI; ++i) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int m = m0 + wm * (BM / WARPS_M) + 16 * i + g + 8 * half;
            if (m >= M) continue;
            const int n = m / per_n;
            int r[3];
            split3(m - n * per_n, p.rows, r);
            const int64_t out = (int64_t)n * p.c_dst * dst_vox +
                                ((int64_t)(p.dst_mul[0] * r[0] + p.dst_add[0]) * p.dst_size[1] +
                                 (p.dst_mul[1] * r[1] + p.dst_add[1])) * p.dst_size[2] +
                                p.dst_mul[2] * r[2] + p.dst_add[2];
#pragma unroll
            for (int j = 0; j < NI; ++j) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int col = col0 + wn * WTN + 8 * j + 2 * tq + h;
                    if (col < p.c_dst)
                        p.dst[out + (int64_t)col * dst_vox] = acc[i][j][2 * half + h] + (p.bias ? p.bias[col] : 0.0f);
                }
            }
        }
    }
}

}  // namespace

// One name per role (the same product), so that a profile says which pass it times; _n32 for outputs of at most 32
// channels, where a 64-column tile would leave half of the tensor-core work idle.
#define CONV_TC_KERNEL(NAME, BN) \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(const ConvTcParams p) { conv_tc<BN>(p); }
CONV_TC_KERNEL(conv_fprop_tf32, CONV_TC_BN)                     // conv forward
CONV_TC_KERNEL(conv_fprop_tf32_n32, CONV_TC_BN_NARROW)
CONV_TC_KERNEL(conv_dgrad_tf32, CONV_TC_BN)                     // conv input gradient, one launch per phase
CONV_TC_KERNEL(conv_dgrad_tf32_n32, CONV_TC_BN_NARROW)
CONV_TC_KERNEL(conv_transpose_fprop_tf32, CONV_TC_BN)           // transposed conv forward
CONV_TC_KERNEL(conv_transpose_fprop_tf32_n32, CONV_TC_BN_NARROW)
CONV_TC_KERNEL(conv_transpose_dgrad_tf32, CONV_TC_BN)           // its input gradient
CONV_TC_KERNEL(conv_transpose_dgrad_tf32_n32, CONV_TC_BN_NARROW)
