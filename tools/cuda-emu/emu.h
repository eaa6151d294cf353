// cuda-emu: what a kernel file of cuda/ needs to compile as host C++ (g++ -include emu.h) and run on the CPU under
// the fake driver of driver.cpp. A test aid only: nothing of the engine links it; `tools/cuda-emu/build.py` builds a
// stand-in libcuda.so from cuda/*.cu with it, so that the GPU tests run here, slowly, without a GPU.
//
// Execution model: one block at a time on one OS thread; each CUDA thread of the block is a fiber (its own stack) that
// runs until it reaches a barrier (__syncthreads) or a warp-collective operation (shuffles, ldmatrix, mma.sync,
// wgmma), where it yields; the last thread to arrive completes the collective and releases the others. Shared memory
// is `static` storage (one block at a time) plus one dynamic arena; every operation is done at once (cp.async copies
// on issue, wgmma multiplies on issue), which is what a correct kernel cannot tell apart. Inline PTX is rewritten by
// build.py into calls of emu::ptx, which interprets the few instructions the kernels use (ptx.cpp).
#pragma once
#include <cuda_bf16.h>
#include <vector_types.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <algorithm>
#include <type_traits>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#undef __align__
#undef __restrict__
#ifndef EMU_SCAN
#define EMU_GLOBAL
#endif
#define __global__ EMU_GLOBAL
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
#define __shared__ static

namespace emu {

/// The fiber (CUDA thread) now running: its index in the block and lane.
struct Thread {
    uint3 idx;
    int linear;
};
extern Thread* current;
extern uint3 block_idx, block_dim, grid_dim;
/// The dynamic shared memory of the running block (256 KB-aligned, inside the shared window).
extern unsigned char* dyn_smem;
/// Shared addresses: 32-bit offsets from shared_base (the arena sits at offset 2^31, so that static __shared__
/// variables of this library, within 2 GB of it, have addresses too).
extern unsigned char* shared_base;

void syncthreads();
/// Warp-collective exchange: every lane of the warp gives `value`; returns lane `src`'s (src computed per lane).
uint32_t shfl(uint32_t value, int src_lane, int width, int mode);
uint32_t ballot(bool pred);
void syncwarp();

/// An operand of inline PTX: its address and size (outputs) or bits (inputs).
struct Operand {
    void* at;
    uint64_t bits;
    int size;
    bool out;
};
template <typename T>
inline Operand out(T& x) {
    return Operand{(void*)&x, 0, (int)sizeof(T), true};
}
template <typename T>
inline Operand in(const T& x) {
    Operand o{nullptr, 0, (int)sizeof(T), false};
    memcpy(&o.bits, &x, sizeof(T));
    return o;
}
/// Runs the PTX text `tmpl` with operands %0.. (outputs first); in-out operands ("+f") appear once, as outputs.
void ptx(const char* tmpl, std::initializer_list<Operand> ops);

[[noreturn]] void trap(const char* what);
}  // namespace emu

#define threadIdx (emu::current->idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define warpSize 32

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::syncwarp(); }
template <typename T>
inline T emu_shfl(unsigned, T v, int src, int width, int mode) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffles of 4 or 8 bytes");
    if constexpr (sizeof(T) == 4) {
        uint32_t b;
        memcpy(&b, &v, 4);
        b = emu::shfl(b, src, width, mode);
        T r;
        memcpy(&r, &b, 4);
        return r;
    } else {
        uint32_t b[2];
        memcpy(b, &v, 8);
        b[0] = emu::shfl(b[0], src, width, mode);
        b[1] = emu::shfl(b[1], src, width, mode);
        T r;
        memcpy(&r, b, 8);
        return r;
    }
}
template <typename T>
inline T __shfl_sync(unsigned m, T v, int src, int width = 32) { return emu_shfl(m, v, src, width, 0); }
template <typename T>
inline T __shfl_xor_sync(unsigned m, T v, int mask, int width = 32) { return emu_shfl(m, v, mask, width, 1); }
template <typename T>
inline T __shfl_down_sync(unsigned m, T v, unsigned d, int width = 32) { return emu_shfl(m, v, (int)d, width, 2); }
template <typename T>
inline T __shfl_up_sync(unsigned m, T v, unsigned d, int width = 32) { return emu_shfl(m, v, (int)d, width, 3); }
inline unsigned __ballot_sync(unsigned, int p) { return emu::ballot(p != 0); }
inline int __any_sync(unsigned, int p) { return emu::ballot(p != 0) != 0; }
inline int __all_sync(unsigned, int p) { return emu::ballot(p != 0) == emu::ballot(true); }

inline uint32_t __cvta_generic_to_shared(const void* p) {
    const int64_t off = (const unsigned char*)p - emu::shared_base;
    if (off < 0 || off > 0xffffffffll) emu::trap("__cvta_generic_to_shared of an address outside shared memory");
    return (uint32_t)off;
}

// Integer and bit intrinsics.
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
// __byte_perm(x, y, s): byte i of the result is byte (s >> 4 i) & 7 of the 8 bytes y:x.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const uint64_t b = (uint64_t)y << 32 | x;
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= (unsigned)((b >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }

// Float bit casts and correctly rounded arithmetic (the host computes float32 in SSE: round to nearest, no fusion:
// build.py compiles with -ffp-contract=off).
inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float f) { int x; memcpy(&x, &f, 4); return x; }
inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned x; memcpy(&x, &f, 4); return x; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __expf(float a) { return expf(a); }
inline float __logf(float a) { return logf(a); }
inline float __saturatef(float a) { return a < 0.0f ? 0.0f : (a > 1.0f ? 1.0f : a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }
template <typename T>
inline T __ldg(const T* p) { return *p; }

// CUDA's min and max overloads (device functions of the same name for each arithmetic type).
#define EMU_MINMAX(T)                                   \
    inline T min(T a, T b) { return a < b ? a : b; }    \
    inline T max(T a, T b) { return a < b ? b : a; }
EMU_MINMAX(int)
EMU_MINMAX(unsigned)
EMU_MINMAX(long)
EMU_MINMAX(unsigned long)
EMU_MINMAX(long long)
EMU_MINMAX(unsigned long long)
#undef EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

inline void __trap() { emu::trap("__trap()"); }
