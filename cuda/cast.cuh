// Parameters of the storage-type conversions of cast.cu.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

// One conversion of n elements; each kernel reads one input pointer and writes one output pointer.
struct CastParams {
    const float* f32_in;            // cast_f32_to_bf16: the float32 input
    const __nv_bfloat16* bf16_in;   // cast_bf16_to_f32: the bf16 input
    float* f32_out;                 // cast_bf16_to_f32: the float32 output
    __nv_bfloat16* bf16_out;        // cast_f32_to_bf16: the bf16 output
    int64_t n;
};

extern "C" __global__ void cast_f32_to_bf16(const CastParams p);  // round to nearest, ties to even
extern "C" __global__ void cast_bf16_to_f32(const CastParams p);  // exact
