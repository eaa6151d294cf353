// Parameters of the selective scan kernels of scan.cu (the math and the passes: scan.cu's header comment).
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

// Tokens per chunk: the backward recomputes states from the state saved at each chunk start. A multiple of
// SCAN_BWD_SUB.
constexpr int SCAN_CHUNK = 64;
// Forward: most threads per block (its __launch_bounds__), and tokens of B and C staged in shared memory at a time.
constexpr int SCAN_FWD_THREADS = 128;
constexpr int SCAN_STAGE = 32;
// Backward: threads per block, tokens per sub-chunk (states recomputed into registers, per-token values staged), and
// states per lane.
constexpr int SCAN_BWD_THREADS = 128;
constexpr int SCAN_BWD_SUB = 8;
constexpr int SCAN_BWD_R = 4;

// One selective scan: u, delta, z, y (G, L, D) channels last; B, C (G, L, N), rows bc_ld apart; a_log (D, N); d_skip,
// delta_bias (D);
// per-chunk tensors (G, nc, D, N) and (G, nc, D) with nc = ceil(L / SCAN_CHUNK). Each kernel's comment in scan.cu
// says which fields it uses; the others may be null. The token-shaped tensors (u, delta, B, C, z, y, dL/dy and
// their gradients) are of the storage type T (float or __nv_bfloat16); the parameters a_log, d_skip, delta_bias, the
// states, carries and partial sums are float32.
template <typename T>
struct ScanParams {
    const T* u;
    const T* delta;
    const float* a_log;
    const T* b;               // B
    const T* c;               // C
    const float* d_skip;      // D
    const T* z;
    const float* delta_bias;
    const T* gy;              // backward: dL/dy
    const float* h_init;      // the state entering each chunk, or null: every chunk starts from 0
    const float* carry_in;    // backward: the adjoint carry entering each chunk from the right, or null: none
    T* y;                     // forward output
    float* chunk_states;      // per chunk (G, nc, D, N): forward record: start states; summary: end states from 0;
                              // backward_carry: carry-out from 0; combine: rewritten in place to what enters
    float* chunk_dt;          // per chunk (G, nc, D): sum of dt (forward summary, backward_carry; combine reads)
    T* du;                    // backward outputs: du, ddelta, dz (G, L, D); dB, dC (G, L, N)
    T* ddelta;
    T* dz;
    T* db;
    T* dc;
    float* part;              // backward: one row per (g, group): [A sum e dt (D N) | sum q u (D) | sum ddelta (D)]
    float* bc_part;           // backward split over channels (grid y > 1): per split (splits, G L, 2 N) its sums of
                              // the dB | dC terms; scan_sum_bc adds them in split order
    int splits;               // scan_sum_bc: the backward's channel splits (its grid y)
    int64_t G;                // sequences
    int64_t L;                // tokens per sequence
    int64_t D;                // channels
    int N;                    // states
    int64_t bc_ld;            // elements between consecutive token rows of B and C, and of dB and dC: N for tensors
                              // of their own, the row width when they are columns of a wider tensor
    int64_t cpb;              // chunks per block (a group)
    int record;               // forward: store the state at each chunk start
    int summary;              // forward pass 1 of the chunked scan: end states and sums of dt only
    int reverse;              // combine: backwards over the chunks (adjoint carries)
    int flip;                 // the sequences run backwards through memory: token t of sequence g is row
                              // g L + L - 1 - t of every token-shaped tensor (the backward Mamba's, read in place)
    int acc_rows;             // backward: rows of the dB | dC accumulator in shared memory
};

// Each in a float32 and a bf16 instance (computing in float32), for N <= 16 or N <= 32 states.
extern "C" __global__ void scan_forward_n16_f32(const ScanParams<float> p);
extern "C" __global__ void scan_forward_n16_bf16(const ScanParams<__nv_bfloat16> p);
extern "C" __global__ void scan_forward_n32_f32(const ScanParams<float> p);
extern "C" __global__ void scan_forward_n32_bf16(const ScanParams<__nv_bfloat16> p);
extern "C" __global__ void scan_backward_carry_f32(const ScanParams<float> p);
extern "C" __global__ void scan_backward_carry_bf16(const ScanParams<__nv_bfloat16> p);
extern "C" __global__ void scan_backward_n16_f32(const ScanParams<float> p);
extern "C" __global__ void scan_backward_n16_bf16(const ScanParams<__nv_bfloat16> p);
extern "C" __global__ void scan_backward_n32_f32(const ScanParams<float> p);
extern "C" __global__ void scan_backward_n32_bf16(const ScanParams<__nv_bfloat16> p);
// dB, dC (G, L, N) from the backward's per-split partial sums bc_part, added in split order.
extern "C" __global__ void scan_sum_bc_f32(const ScanParams<float> p);
extern "C" __global__ void scan_sum_bc_bf16(const ScanParams<__nv_bfloat16> p);
// Reads only float32 fields (a_log, chunk_states, chunk_dt): one instance serves both storage types.
extern "C" __global__ void scan_chunk_combine(const ScanParams<float> p);
