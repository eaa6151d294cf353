// The tensor-core tile machinery shared by the implicit-GEMM convolutions (conv_tc.cu) and the linear layers'
// products (gemm.cu): shared-memory tiles filled through a cp.async pipeline, and warp products with
// mma.sync.m16n8k8 on tf32 operands accumulating in float32.
//
//   acc[m, n] += sum_k A[m, k] B[k, n]   over BK reduction indices per pipeline stage,
//
// a block tile of S::BM rows x S::BN columns, S::WARPS_M x S::WARPS_N warps each owning a (BM / WARPS_M) x
// (BN / WARPS_N) sub-tile. What differs between the users is how a stage's tiles are gathered (their load callbacks)
// and how the accumulators are written out; the pieces here do not depend on it.
// Not a parameter header (no mma.cu beside it): no kernel is declared here.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

#include <type_traits>

namespace mma {

// The block tile: BM rows x BN columns, BK reduction indices per stage, STAGES stages in flight, warps laid out
// WARPS_M along the rows x WARPS_N along the columns.
template <int BM_, int BN_, int BK_, int STAGES_, int WARPS_M_, int WARPS_N_>
struct Shape {
    static constexpr int BM = BM_, BN = BN_, BK = BK_, STAGES = STAGES_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
    static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
    static_assert(BM % (16 * WARPS_M) == 0 && BN % (8 * WARPS_N) == 0 && BK % 8 == 0, "whole mma fragments");
};

// The 4 bytes at dst <- the first `bytes` (0, 2 or 4) bytes at src, the rest 0 (a zero-byte copy fills the
// destination with zeros); both 4-byte aligned.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, int bytes) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(src), "r"(bytes));
}
// The 16 bytes at dst <- the first `count` elements at src (0 to 16 / sizeof(T)), the rest 0. dst and src 16-byte
// aligned.
template <typename T>
__device__ __forceinline__ void cp_async16(T* dst, const T* src, int count) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"((int)sizeof(T) * count));
}
// The gathers of one stage, up to N elements per thread: put(i, dst, src, valid) sets dst <- *src when valid, else 0.
// float: a 4-byte cp.async, in flight until the pipeline waits for it. bf16: 2 bytes are below cp.async's smallest
// copy, so the element is loaded into a register at put and stored to shared memory at flush, which the pipeline
// calls after the products of the iteration that issued the stage: the loads are in flight during those products.
template <typename T, int N>
struct Stager;
template <int N>
struct Stager<float, N> {
    __device__ __forceinline__ void put(int, float* dst, const float* src, bool valid) { cp_async4(dst, src, valid ? 4 : 0); }
    __device__ __forceinline__ void flush() {}
};
template <int N>
struct Stager<__nv_bfloat16, N> {
    __nv_bfloat16 v[N];
    __nv_bfloat16* dst[N];
    __device__ __forceinline__ void put(int i, __nv_bfloat16* d, const __nv_bfloat16* src, bool valid) {
        v[i] = valid ? *src : __ushort_as_bfloat16(0);
        dst[i] = d;
    }
    __device__ __forceinline__ void flush() {
#pragma unroll
        for (int i = 0; i < N; ++i) *dst[i] = v[i];
    }
};
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

// The shared-memory tiles of the pipeline's stages, of T elements (float: tf32 products; __nv_bfloat16: bf16
// products). Each operand is stored k-major ([k][m], [k][n]: the layout when it runs along the rows or columns in
// memory) or k-contiguous ([m][k], [n][k]: when it runs along k). Rows are padded so that the fragment loads of a
// warp spread over the banks, and stay 16-byte aligned for cp_async16 and ldmatrix: float k-major rows by 32 bytes
// (the scalar loads of lanes (t, g) at [k0 + t][g]); bf16 rows, read by ldmatrix as 8 rows of 16 bytes, by 16 bytes,
// which makes every row length an odd multiple of 16 bytes modulo 128 (BM, BN and BK are multiples of 64 bytes
// here): the 8 rows land in 8 different 16-byte bank groups.
template <class S, bool A_K_MAJOR, bool B_K_MAJOR, typename T = float>
struct Tiles {
    static constexpr int VEC = 16 / sizeof(T);  // elements per 16 bytes
    static constexpr int MAJOR_PAD = sizeof(T) == 2 ? VEC : 2 * VEC;
    static constexpr int A_LD = A_K_MAJOR ? S::BM + MAJOR_PAD : S::BK + VEC;
    static constexpr int B_LD = B_K_MAJOR ? S::BN + MAJOR_PAD : S::BK + VEC;
    static constexpr int A_SIZE = (A_K_MAJOR ? S::BK : S::BM) * A_LD;
    static constexpr int B_SIZE = (B_K_MAJOR ? S::BK : S::BN) * B_LD;
    static_assert(A_LD % VEC == 0 && B_LD % VEC == 0 && A_SIZE % VEC == 0, "16-byte aligned rows");
    T a[S::STAGES][A_SIZE];
    T b[S::STAGES][B_SIZE];
    __device__ __forceinline__ T* a_at(int slot, int m, int k) {
        return A_K_MAJOR ? &a[slot][k * A_LD + m] : &a[slot][m * A_LD + k];
    }
    __device__ __forceinline__ T* b_at(int slot, int n, int k) {
        return B_K_MAJOR ? &b[slot][k * B_LD + n] : &b[slot][n * B_LD + k];
    }
};

// The accumulators of this thread: warp (wm, wn) of WARPS_M x WARPS_N owns rows BM / WARPS_M wm + 16 i + g (+ 8) and
// columns BN / WARPS_N wn + 8 j + 2 t (+ 1); v[i][j][h] is row + 8 (h / 2), column + h % 2.
template <class S>
struct Acc {
    static constexpr int WTM = S::BM / S::WARPS_M, WTN = S::BN / S::WARPS_N, MI = WTM / 16, NI = WTN / 8;
    float v[MI][NI][4] = {};
    __device__ __forceinline__ static int row(int i, int h) {
        return (threadIdx.x >> 5) % S::WARPS_M * WTM + 16 * i + ((threadIdx.x & 31) >> 2) + 8 * (h >> 1);
    }
    __device__ __forceinline__ static int col(int j, int h) {
        return (threadIdx.x >> 5) / S::WARPS_M * WTN + 8 * j + 2 * (threadIdx.x & 3) + (h & 1);
    }
};

// ldmatrix: four (x4) or two (x2) 8 x 8 matrices of 16-bit elements from shared memory, lanes 8j .. 8j + 7 giving
// the addresses of matrix j's 8 rows (16 bytes each); register j of lane l then holds row l / 4, elements
// 2 (l % 4) and 2 (l % 4) + 1 of matrix j (low half first), or with .trans of matrix j transposed: elements
// (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4) (PTX ISA, "ldmatrix").
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* row) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    if constexpr (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
}
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x2(unsigned (&r)[2], const void* row) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    if constexpr (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One k-step of the storage type T: m16n8k16 bf16 for __nv_bfloat16 (two values per operand word), m16n8k8 tf32 for
// float (one).
template <typename T>
__device__ __forceinline__ void mma_k(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    if constexpr (sizeof(T) == 2) {
        mma_bf16(c, a, b0, b1);
    } else {
        mma_tf32(c, a, b0, b1);
    }
}

// acc += A B over the BK reduction indices of stage slot, per warp MI x NI mma.sync per step. With g = lane / 4,
// t = lane % 4 the fragments are (PTX ISA, "Matrix Fragments for mma.m16n8k8" / "mma.m16n8k16"):
//   tf32, m16n8k8 per 8 indices:  A (m x k): (g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4);  B (k x n): (t, g),
//                                 (t + 4, g)
//   bf16, m16n8k16 per 16 indices: A: the pairs (g, 2t..2t+1), (g + 8, 2t..), (g, 2t+8..), (g + 8, 2t+8..);
//                                 B: the pairs (2t..2t+1, g), (2t+8..2t+9, g)
template <class S, bool A_K_MAJOR, bool B_K_MAJOR, typename T>
__device__ __forceinline__ void stage_product(Tiles<S, A_K_MAJOR, B_K_MAJOR, T>& s, int slot, Acc<S>& acc) {
    using A = Acc<S>;
    const int lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    if constexpr (std::is_same<T, float>::value) {
#pragma unroll
        for (int k0 = 0; k0 < S::BK; k0 += 8) {
            unsigned a[A::MI][4], b[A::NI][2];
#pragma unroll
            for (int i = 0; i < A::MI; ++i) {
                const int r = A::row(i, 0);
                a[i][0] = to_tf32(*s.a_at(slot, r, k0 + tq));
                a[i][1] = to_tf32(*s.a_at(slot, r + 8, k0 + tq));
                a[i][2] = to_tf32(*s.a_at(slot, r, k0 + tq + 4));
                a[i][3] = to_tf32(*s.a_at(slot, r + 8, k0 + tq + 4));
            }
#pragma unroll
            for (int j = 0; j < A::NI; ++j) {
                const int c = (threadIdx.x >> 5) / S::WARPS_M * A::WTN + 8 * j + g;
                b[j][0] = to_tf32(*s.b_at(slot, c, k0 + tq));
                b[j][1] = to_tf32(*s.b_at(slot, c, k0 + tq + 4));
            }
#pragma unroll
            for (int i = 0; i < A::MI; ++i)
#pragma unroll
                for (int j = 0; j < A::NI; ++j) mma_tf32(acc.v[i][j], a[i], b[j][0], b[j][1]);
        }
    } else {
        static_assert(std::is_same<T, __nv_bfloat16>::value && S::BK % 16 == 0, "bf16 steps of 16 indices");
        // Each fragment in one ldmatrix; lane l addresses row l % 8 of matrix l / 8 (x2 reads lanes 0-15 only).
        // A (x4): matrix j holds rows wm + 16 i + 8 (j % 2) .. + 7 and reduction indices k0 + 8 (j / 2) .. + 7, which
        // gives a[0..3] in the order above; its 8 stored rows are 8 rows m when A is k-contiguous (no transpose), 8
        // reduction indices when k-major (transposed on load, so a lane still gets two consecutive k of one row).
        // B (x2): matrix j holds reduction indices k0 + 8 j .. + 7 of columns wn + 8 jn .. + 7, giving b[jn][j].
        const int r = lane & 7, mat = lane >> 3;
        const int wm = (threadIdx.x >> 5) % S::WARPS_M * A::WTM, wn = (threadIdx.x >> 5) / S::WARPS_M * A::WTN;
#pragma unroll
        for (int k0 = 0; k0 < S::BK; k0 += 16) {
            unsigned a[A::MI][4], b[A::NI][2];
#pragma unroll
            for (int i = 0; i < A::MI; ++i) {
                const int m = wm + 16 * i + 8 * (mat & 1), k = k0 + 8 * (mat >> 1);
                if constexpr (A_K_MAJOR)
                    ldmatrix_x4<true>(a[i], s.a_at(slot, m, k + r));
                else
                    ldmatrix_x4<false>(a[i], s.a_at(slot, m + r, k));
            }
#pragma unroll
            for (int jn = 0; jn < A::NI; ++jn) {
                const int n = wn + 8 * jn, k = k0 + 8 * (mat & 1);
                if constexpr (B_K_MAJOR)
                    ldmatrix_x2<true>(b[jn], s.b_at(slot, n, k + r));
                else
                    ldmatrix_x2<false>(b[jn], s.b_at(slot, n + r, k));
            }
#pragma unroll
            for (int i = 0; i < A::MI; ++i)
#pragma unroll
                for (int jn = 0; jn < A::NI; ++jn) mma_bf16(acc.v[i][jn], a[i], b[jn][0], b[jn][1]);
        }
    }
}

// The pipeline over num_k stages of BK reduction indices. decode(stage, slot) fills the slot's table of decoded
// reduction indices (threads t < BK; users whose loads need no table pass a lambda that does nothing), load(stage,
// slot) issues the stage's copies, flush() completes the copies a Stager holds in registers (bf16 gathers; a no-op
// for cp.async users). Tables are decoded STAGES ahead: slot kt % STAGES is free once the barrier of iteration kt has
// passed (its last reader, the load of stage kt, came before it), and the next iteration's barrier publishes it
// before its load. A stage loaded in iteration kt is flushed after that iteration's products (which read slot
// kt % STAGES, not its slot) and published by the next iteration's barrier.
template <class S, bool A_K_MAJOR, bool B_K_MAJOR, typename T, typename Decode, typename Load, typename Flush>
__device__ __forceinline__ void pipeline(Tiles<S, A_K_MAJOR, B_K_MAJOR, T>& s, int num_k, Decode decode, Load load,
                                         Flush flush, Acc<S>& acc) {
    constexpr int STAGES = S::STAGES;
    if (threadIdx.x < S::BK) {
#pragma unroll
        for (int st = 0; st < STAGES; ++st) decode(st, st);
    }
    __syncthreads();
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
        if (st < num_k) {
            load(st, st);
            flush();
        }
        cp_async_commit();
    }
    for (int kt = 0; kt < num_k; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int next = kt + STAGES - 1;
        if (next < num_k) load(next, next % STAGES);
        cp_async_commit();
        const int slot = kt % STAGES;
        if (threadIdx.x < S::BK) decode(kt + STAGES, slot);
        stage_product(s, slot, acc);
        if (next < num_k) flush();
    }
    cp_async_wait<0>();
}

// The pipeline of users whose loads are all cp.async (nothing to flush).
template <class S, bool A_K_MAJOR, bool B_K_MAJOR, typename T, typename Decode, typename Load>
__device__ __forceinline__ void pipeline(Tiles<S, A_K_MAJOR, B_K_MAJOR, T>& s, int num_k, Decode decode, Load load,
                                         Acc<S>& acc) {
    pipeline(s, num_k, decode, load, [] {}, acc);
}

}  // namespace mma
