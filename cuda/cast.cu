// Conversions between the GPU storage types (parameters: cast.cuh):
//
//   cast_f32_to_bf16:  y_i = bf16(x_i), rounded to the nearest bf16, ties to even (NaN stays NaN, values beyond the
//                      largest bf16 become infinite), as the `half` crate's bf16::from_f32 rounds on the host
//   cast_bf16_to_f32:  y_i = x_i, exact (every bf16 is a float32 with the low 16 significand bits zero)
//
// One chunk of VEC<bf16> = 8 elements per thread, grid-stride: 32 bytes of float32 (two 16-byte vectors) and 16 of
// bf16 (one), where the buffers are 16-byte aligned (the host's always are) and the chunk whole; the short last chunk
// element by element (common.cuh's load_span / store_span). The host launches vec_chunks<bf16>(n) threads (device::cuda::grid_vec::<bf16>). The rounding
// is the same __float2bfloat16_rn per element as one thread per element did (store_vec's from_f32).
//
// Cost per element: 6 bytes, no FLOPs; memory-bound.
#include "cast.cuh"
#include "common.cuh"

namespace {

// out_i = in_i converted (S, D: float and __nv_bfloat16, one each way), i < n.
template <typename S, typename D>
__device__ void cast_chunks(const S* __restrict__ in, D* __restrict__ out, int64_t n) {
    constexpr int N = VEC<__nv_bfloat16>;  // = 2 VEC<float>
    const bool vec = aligned16(in) && aligned16(out);
    FOR_EACH(c, vec_chunks<__nv_bfloat16>(n)) {
        const int64_t i0 = c * N;
        const int len = chunk_len<__nv_bfloat16>(i0, n);
        float v[N];
        load_span(in + i0, len, vec, v);
        store_span(out + i0, len, vec, v);
    }
}

}  // namespace

extern "C" __global__ void cast_f32_to_bf16(const CastParams p) { cast_chunks(p.f32_in, p.bf16_out, p.n); }

extern "C" __global__ void cast_bf16_to_f32(const CastParams p) { cast_chunks(p.bf16_in, p.f32_out, p.n); }
