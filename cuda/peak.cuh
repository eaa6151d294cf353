// Parameters of the ceiling kernel of peak.cu.
#pragma once
#include <stdint.h>

// Threads per block of peak_mma_bf16 (its __launch_bounds__).
constexpr int PEAK_THREADS = 256;

struct PeakParams {
    float* out;  // one float per thread, written so that the products are kept
    int iters;   // rounds of 4 mma.sync per warp
};

extern "C" __global__ void peak_mma_bf16(const PeakParams p);
