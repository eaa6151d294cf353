// Conversions between the GPU storage types (parameters: cast.cuh):
//
//   cast_f32_to_bf16:  y_i = bf16(x_i), rounded to the nearest bf16, ties to even (NaN stays NaN, values beyond the
//                      largest bf16 become infinite), as the `half` crate's bf16::from_f32 rounds on the host
//   cast_bf16_to_f32:  y_i = x_i, exact (every bf16 is a float32 with the low 16 significand bits zero)
//
// One thread per element, grid-stride. Cost per element: 6 bytes, no FLOPs; memory-bound.
#include "cast.cuh"
#include "common.cuh"

extern "C" __global__ void cast_f32_to_bf16(const CastParams p) {
    FOR_EACH(i, p.n) p.bf16_out[i] = __float2bfloat16_rn(p.f32_in[i]);
}

extern "C" __global__ void cast_bf16_to_f32(const CastParams p) {
    FOR_EACH(i, p.n) p.f32_out[i] = __bfloat162float(p.bf16_in[i]);
}
