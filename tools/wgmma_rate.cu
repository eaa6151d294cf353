// wgmma_rate: issue rate and throughput of Hopper's wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16, N in
// {16, 32, 64, 128, 256}, with A from registers ("RS", B N-major as conv_wgmma.cu's weight gradient issues it) or from
// shared memory ("SS", A and B K-major as gemm_wgmma.cu's), B always from shared memory.
//
// Why: the convolution weight-gradient kernel issues m64n16k16 RS wgmmas. A tensor core at its dense bf16 peak does
// 4096 FLOP per SM and clock, so an m64nNk16 (2 * 64 * N * 16 FLOP) should occupy an SM's tensor cores N / 2 clocks:
// 8 for n16, 128 for n256. If small N reaches a clearly lower fraction of peak than n128 / n256, a per-instruction
// cost (issue, operand fetch, a minimum latency) dominates and the kernel should use wider wgmmas.
//
// Each block (one per SM: its 120 KB of dynamic shared memory admits no second) runs 1 or 2 warpgroups; each
// warpgroup repeats `iters` batches of 8 wgmmas spread over SETS independent accumulator sets (fence, 8 wgmmas,
// commit, wait<1>: one batch in flight while the next is issued), A from 4 tiles, B from 2.
//   FLOP    = blocks * warpgroups * iters * 8 * 2 * 64 * N * 16
//   peak    = SMs * clock * 4096 FLOP      (clock: cudaDevAttrClockRate, or argv[1] in MHz; H100 SXM's spec sheet
//                                           989 TFLOP/s is 132 SMs at 1830 MHz, while the attribute gives 1980)
//   rate    = wgmmas issued per SM and microsecond (each warpgroup's count, summed over the SM's warpgroups)
//   clk MHz = SM clock measured during the run (clock64 against %globaltimer, block 0).
//
// Build and run, from the repository root:
//   .toolchain/cuda/bin/nvcc -gencode arch=compute_90a,code=sm_90a -O3 -std=c++17 -I cuda -L .toolchain/cuda/lib -cudart static -o wgmma_rate tools/wgmma_rate.cu
//   (with -Xptxas -v: no C7512 / C7514 serialisation notes, 0 bytes spill, 58-170 registers)
//   ./wgmma_rate [clock MHz for the peak]
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "wgmma.cuh"

#define CK(x)                                                                                                  \
    do {                                                                                                       \
        cudaError_t e_ = (x);                                                                                  \
        if (e_ != cudaSuccess) {                                                                               \
            fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, __LINE__, #x);   \
            exit(1);                                                                                           \
        }                                                                                                      \
    } while (0)

constexpr int A_TILES = 4, B_TILES = 2, A_BYTES = 64 * 16 * 2, B_BYTES = 256 * 16 * 2, PER_BATCH = 8;
constexpr int SMEM = 120 * 1024;  // > half of the 228 KB an SM has: one block per SM

// Accumulator lists "%0, .., %(N/2 - 1)" and their "+f" operands; inline assembly takes no arrays.
#define L8 "%0, %1, %2, %3, %4, %5, %6, %7"
#define L16 L8 ", %8, %9, %10, %11, %12, %13, %14, %15"
#define L32 L16 ", %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define L64                                                                                                        \
    L32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, " \
        "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define L128                                                                                                       \
    L64 ", %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, " \
        "%85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, "    \
        "%105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, " \
        "%123, %124, %125, %126, %127"
#define F4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define F8(i) F4(i), F4(i + 4)
#define F16(i) F8(i), F8(i + 8)
#define F32(i) F16(i), F16(i + 16)
#define F64(i) F32(i), F32(i + 32)
#define F128(i) F64(i), F64(i + 64)
// Inputs follow the N / 2 accumulators: b descriptor %B, scale-d %P, then A (4 registers, or its descriptor %A0).
#define WG(SHAPE, LIST, B, P, A0, A1, A2, A3, ...)                                                                \
    if constexpr (RS)                                                                                           \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" P ", 0;\nwgmma.mma_async.sync.aligned." SHAPE         \
                     ".f32.bf16.bf16 {" LIST "}, {%" A0 ", %" A1 ", %" A2 ", %" A3 "}, %" B ", p, 1, 1, 1;\n}\n" \
                     : __VA_ARGS__                                                                              \
                     : "l"(b), "r"(1), "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]));                             \
    else                                                                                                        \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" P ", 0;\nwgmma.mma_async.sync.aligned." SHAPE         \
                     ".f32.bf16.bf16 {" LIST "}, %" A0 ", %" B ", p, 1, 1, 0, 0;\n}\n"                           \
                     : __VA_ARGS__                                                                              \
                     : "l"(b), "r"(1), "l"(ad))

// d += A B, 64 x N, k 16: the header's wrappers where it has the form (SS N >= 32, RS n16 and n32), else the tool's.
template <int N, bool RS>
__device__ __forceinline__ void mma(float (&d)[N / 2], const unsigned (&a)[4], uint64_t ad, uint64_t b) {
    if constexpr (!RS && N >= 32) wgmma::mma_async<N>(d, ad, b, true);
    else if constexpr (RS && N <= 32) wgmma::mma_async_regs<N>(d, a, b);
    else if constexpr (N == 16) { WG("m64n16k16", L8, "8", "9", "10", "11", "12", "13", F8(0)); }
    else if constexpr (N == 32) { WG("m64n32k16", L16, "16", "17", "18", "19", "20", "21", F16(0)); }
    else if constexpr (N == 64) { WG("m64n64k16", L32, "32", "33", "34", "35", "36", "37", F32(0)); }
    else if constexpr (N == 128) { WG("m64n128k16", L64, "64", "65", "66", "67", "68", "69", F64(0)); }
    else { WG("m64n256k16", L128, "128", "129", "130", "131", "132", "133", F128(0)); }
}

// SETS accumulator sets of N / 2 floats: 4 x 8..32, 2 x 64, 1 x 128 registers (n256's second set would not fit 255).
template <int N>
constexpr int SETS = N <= 64 ? 4 : N == 128 ? 2 : 1;

template <int N, bool RS>
__global__ void __launch_bounds__(256, 1) rate(float* out, long long* clk, int iters) {
    extern __shared__ __align__(128) unsigned char smem[];
    // Small positive bf16 values (1..15) / 256, varied so the tensor cores' data toggle as in real work: every
    // product is positive, so the sums are nonzero, and below 15^2 / 2^16 * 16 * 8 * iters: finite.
    unsigned short* h = reinterpret_cast<unsigned short*>(smem);
    for (int i = threadIdx.x; i < (A_TILES * A_BYTES + B_TILES * B_BYTES) / 2; i += blockDim.x) {
        const float v = (float)(1 + (i * 37 + i / 97) % 15) / 256.0f;
        h[i] = (unsigned short)(__float_as_uint(v) >> 16);  // exact: v has at most 4 significant bits
    }
    wgmma::fence_proxy_async();
    __syncthreads();

    const uint32_t base = (uint32_t)__cvta_generic_to_shared(smem), t = threadIdx.x % 128;
    // Unswizzled tiles of 8 x 8 core matrices (128 contiguous bytes): k-halves 128 bytes apart (lbo), groups of 8 rows
    // along m or n 256 bytes apart (sbo), so a 64 x 16 A tile is 2 KB and an N x 16 B tile N * 32 bytes, read either
    // K-major or N-major. A's fragments (RS) come from the tiles by shared loads, which ptxas cannot fold to constants.
    unsigned a[A_TILES][4];
    uint64_t ad[A_TILES], bd[B_TILES];
#pragma unroll
    for (int j = 0; j < A_TILES; ++j) {
        const uint4 v = *reinterpret_cast<const uint4*>(smem + j * A_BYTES + 16 * t);
        a[j][0] = v.x, a[j][1] = v.y, a[j][2] = v.z, a[j][3] = v.w;
        ad[j] = wgmma::descriptor(base + j * A_BYTES, 128, 256);
    }
#pragma unroll
    for (int j = 0; j < B_TILES; ++j) bd[j] = wgmma::descriptor(base + A_TILES * A_BYTES + j * B_BYTES, 128, 256);

    constexpr int S = SETS<N>;
    float acc[S][N / 2] = {};
    long long c0 = clock64(), g0;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g0));
#pragma unroll 1
    for (int it = 0; it < iters; ++it) {
        wgmma::fence();
#pragma unroll
        for (int r = 0; r < PER_BATCH / S; ++r)
#pragma unroll
            for (int s = 0; s < S; ++s)
                mma<N, RS>(acc[s], a[(s + r) % A_TILES], ad[(s + r) % A_TILES], bd[s % B_TILES]);
        wgmma::commit();
        wgmma::wait<1>();
    }
    wgmma::wait<0>();
    // Ties the accumulators to the wait: else the sum's adds, mere register reads, may be hoisted above it (C7514).
#pragma unroll
    for (int s = 0; s < S; ++s)
#pragma unroll
        for (int i = 0; i < N / 2; ++i) asm volatile("" : "+f"(acc[s][i])::"memory");
    long long c1 = clock64(), g1;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g1));
    float sum = 0.0f;
#pragma unroll
    for (int s = 0; s < S; ++s)
#pragma unroll
        for (int i = 0; i < N / 2; ++i) sum += acc[s][i];
    out[blockIdx.x * blockDim.x + threadIdx.x] = sum;
    if (blockIdx.x == 0 && threadIdx.x == 0) clk[0] = c1 - c0, clk[1] = g1 - g0;
}

struct Row {
    const char* form;
    int n, wg;
    double ms, tflops, per_us, frac, mhz;
};

struct Ctx {
    int sms;
    double clock_mhz;
    float* out;
    long long* clk;
    std::vector<Row> rows;
};

template <int N, bool RS>
void measure(Ctx& c, int wg) {
    auto k = rate<N, RS>;
    CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM));
    const int threads = 128 * wg, iters = 2048 * 256 / N, launches = 10;
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    for (int i = 0; i < 2; ++i) k<<<c.sms, threads, SMEM>>>(c.out, c.clk, iters);  // warm-up (and clocks up)
    CK(cudaGetLastError());
    CK(cudaEventRecord(e0));
    for (int i = 0; i < launches; ++i) k<<<c.sms, threads, SMEM>>>(c.out, c.clk, iters);
    CK(cudaGetLastError());
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));

    std::vector<float> host(c.sms * threads);
    long long clk[2];
    CK(cudaMemcpy(host.data(), c.out, host.size() * sizeof(float), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(clk, c.clk, sizeof clk, cudaMemcpyDeviceToHost));
    double total = 0.0;
    for (float v : host) total += v;
    if (!std::isfinite(total) || total <= 0.0) {
        fprintf(stderr, "%s n%d x%d: bad accumulator sum %g\n", RS ? "RS" : "SS", N, wg, total);
        exit(1);
    }
    const double wgmmas = (double)launches * c.sms * wg * iters * PER_BATCH, s = ms * 1e-3;
    const double flops = wgmmas * 2.0 * 64 * N * 16, peak = c.sms * c.clock_mhz * 1e6 * 4096.0;
    Row r{RS ? "RS" : "SS", N, wg, ms / launches, flops / s * 1e-12, wgmmas / c.sms / (s * 1e6), flops / s / peak,
          clk[1] > 0 ? clk[0] * 1e3 / clk[1] : 0.0};
    printf("%s n%-3d %d WG: %.3f ms/launch  %.1f TFLOP/s  %.2f wgmma/SM/us  %.1f%% of peak  %.0f MHz\n", r.form, N, wg,
           r.ms, r.tflops, r.per_us, 100 * r.frac, r.mhz);
    c.rows.push_back(r);
}

template <bool RS>
void sweep(Ctx& c, int wg) {
    measure<16, RS>(c, wg), measure<32, RS>(c, wg), measure<64, RS>(c, wg);
    measure<128, RS>(c, wg), measure<256, RS>(c, wg);
}

int main(int argc, char** argv) {
    int dev, clock_khz;
    Ctx c{};
    CK(cudaGetDevice(&dev));
    CK(cudaDeviceGetAttribute(&c.sms, cudaDevAttrMultiProcessorCount, dev));
    CK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, dev));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, dev));
    if (prop.major != 9) {
        fprintf(stderr, "%s is sm_%d%d: wgmma needs sm_90a\n", prop.name, prop.major, prop.minor);
        return 1;
    }
    c.clock_mhz = argc > 1 ? atof(argv[1]) : clock_khz / 1e3;
    printf("%s: %d SMs, clock %.0f MHz (%s), peak %.1f dense bf16 TFLOP/s\n", prop.name, c.sms, c.clock_mhz,
           argc > 1 ? "argv[1]" : "cudaDevAttrClockRate", c.sms * c.clock_mhz * 1e6 * 4096 * 1e-12);
    CK(cudaMalloc(&c.out, 256 * c.sms * sizeof(float)));
    CK(cudaMalloc(&c.clk, 2 * sizeof(long long)));
    for (int wg = 1; wg <= 2; ++wg) sweep<true>(c, wg), sweep<false>(c, wg);
    CK(cudaFree(c.out));
    CK(cudaFree(c.clk));

    printf("\n| form | N | WG/SM | ms/launch | TFLOP/s | wgmma/SM/us | tensor clk/wgmma | %% of peak | clk MHz |\n");
    printf("|---|---|---|---|---|---|---|---|---|\n");
    // tensor clk/wgmma: SM clocks (measured) per wgmma, against N / 2 at peak.
    for (const Row& r : c.rows)
        printf("| %s | %d | %d | %.3f | %.1f | %.2f | %.2f (ideal %d) | %.1f | %.0f |\n", r.form, r.n, r.wg, r.ms,
               r.tflops, r.per_us, r.mhz / r.per_us, r.n / 2, 100 * r.frac, r.mhz);
    return 0;
}
