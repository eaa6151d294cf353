// Ceilings for `lkm-engine profile`, measured on the card it runs on:
//
//   peak_mma_bf16 (PeakParams, peak.cuh): every warp issues `iters` rounds of 4 independent bf16 tensor-core products
//                  (mma.sync m16n8k16, float32 accumulation) on register operands, so nothing but the tensor pipe
//                  limits it. FLOPs = blocks * warps per block * iters * 4 * (2 * 16 * 8 * 16). One float per thread
//                  is written so that the products are not optimised away.
//
// mma.sync is the tensor-core instruction our kernels can issue on every architecture since Ampere; Hopper's wgmma
// reaches a higher rate, so this is the ceiling of mma.sync kernels, and the table says so.
//
// Cost per thread: iters * 4 * 4096 FLOPs and 4 bytes (the float written); nothing is read from memory.
#include "common.cuh"
#include "peak.cuh"

extern "C" __global__ void __launch_bounds__(PEAK_THREADS) peak_mma_bf16(const PeakParams p) {
    // Arbitrary operand bits that depend on the thread, so the compiler cannot fold the products.
    const unsigned seed = 0x3f803f80u ^ (threadIdx.x * 0x00010001u);
    const unsigned a0 = seed, a1 = seed ^ 1u, a2 = seed ^ 2u, a3 = seed ^ 3u, b0 = seed ^ 4u, b1 = seed ^ 5u;
    float acc[4][4] = {};
    for (int i = 0; i < p.iters; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            asm volatile(
                "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                "{%0, %1, %2, %3};\n"
                : "+f"(acc[j][0]), "+f"(acc[j][1]), "+f"(acc[j][2]), "+f"(acc[j][3])
                : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
        }
    }
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) s += acc[j][0] + acc[j][1] + acc[j][2] + acc[j][3];
    p.out[(int64_t)blockIdx.x * blockDim.x + threadIdx.x] = s;
}
