// The fused Mamba v1 selective scan, forward and backward (math and CPU reference: src/ops/selective_scan.rs).
//
// Layout: u, delta, z, y (G, L, D) channels last, so token (g, t) of channel d is at (g L + t) D + d (with flip, at
// (g L + L - 1 - t) D + d: the sequences are scanned from their last token, the backward Mamba's, in place); B, C
// (G, L, N), one row of N per token shared by all channels, rows bc_ld elements apart (N when B and C are tensors of
// their own; Mamba's are columns of x_proj's output [dt | B | C], read where they lie, and dB, dC are written into the
// columns of its gradient); a_log (D, N); d_skip, delta_bias (D). Per sequence g and channel d,
// with A[n] = -exp(a_log[d, n]) and h_{-1} = 0:
//
//   dt_t = softplus(delta_t + delta_bias[d]),   dA_t[n] = exp(dt_t A[n]) = exp2(dt_t A[n] log2 e)
//   h_t[n] = dA_t[n] h_{t-1}[n] + dt_t B_t[n] u_t,   s_t = sum_n C_t[n] h_t[n] + D[d] u_t,   y_t = s_t SiLU(z_t)
//
// Parameters: ScanParams and the constants below, in scan.cuh.
//
// Storage (the precision policy: the scan keeps its state and its exp/softplus in float32, its inputs and outputs may
// be bf16).
// The kernels are templates over the storage type T of the token-shaped tensors u, delta, B, C, z, y, gy and the
// gradients du, ddelta, dz, dB, dC (float or __nv_bfloat16), in two instances NAME_f32 and NAME_bf16: each element is
// read with to_f32 and each output rounded once with from_f32<T>, and everything between is float32: the states
// and adjoints in registers, what is staged in shared memory, the chunk states, carries and sums of dt, the sums over
// channels of dB and dC, and the partial sums of the parameter gradients. a_log, d_skip and delta_bias and their
// gradients are float32 for both instances. The float32 instance is the float32 kernel it always was. (In this file
// the storage type parameter is E, as T is the chunk length.)
//
// Chunks. Sequences are cut into chunks of T = SCAN_CHUNK tokens (a multiple of the backward's sub-chunk SUB).
// The states at the start of every chunk, states (G, nc, D, N) with nc = ceil(L / T), are all the backward needs to
// recompute any part of the sequence; the full history (G, L, D, N) is never stored. A block processes a group of
// cpb consecutive chunks (cpb chosen by the host; groups = ceil(nc / cpb)).
//
// The recurrence h_t = a_t h_{t-1} + b_t composes associatively, (a1, b1) then (a2, b2) = (a2 a1, a2 b1 + b2), so a
// chunk is summarised by its total decay prod_t dA_t[n] = exp(A[n] sum_t dt_t) and its end state from h = 0. Forward:
//   enough sequences x channels to fill the GPU (PiM: 2 to 128 tokens, tens of thousands of sequences): one pass,
//     cpb = nc, each thread runs its whole sequence, recording the state at each chunk start (record = 1).
//   few (PaM: one or two sequences of up to ~27,000 tokens): three passes, each parallel over (g, chunk), cpb = 1:
//     1. scan_forward with summary = 1: per (g, chunk, d) the end state from h = 0 -> states, and sum_t dt_t ->
//        sum_dt (G, nc, D); no output;
//     2. scan_chunk_combine: per (g, d, n), in chunk order, in[c + 1] = exp(A sum_dt[c]) in[c] + end[c], written over
//        states, which then hold every chunk's true initial state;
//     3. scan_forward from those initial states (h_init = states), writing y.
//
// Forward threads: one thread per (g, d) and group, its N states in registers (NMAX = 16 or 32, unused states padded
// with A = 0, B = C = 0 so they stay 0). Consecutive threads take consecutive channels d, so the loads of u, delta, z
// and the store of y are coalesced; B and C rows are staged in shared memory 32 tokens at a time and read by every
// thread of the block (broadcast).
//
// Backward, given gy = dL/dy (derivation in selective_scan.rs):
//   q_t = gy_t SiLU(z_t),  dz_t = gy_t s_t SiLU'(z_t),  dh_t[n] = C_t[n] q_t + x_t[n]  with the adjoint carry
//   x_t[n] = dA_{t+1}[n] dh_{t+1}[n] (x = 0 after the last token),   e_t[n] = dh_t[n] dA_t[n] h_{t-1}[n],
//   du_t = q_t D + dt_t sum_n dh_t[n] B_t[n],   ddelta_t = (u_t sum_n dh_t[n] B_t[n] + sum_n e_t[n] A[n]) softplus'(.)
//   dB_t[n] = sum_d dh_t[n] dt_t u_t,   dC_t[n] = sum_d q_t h_t[n]                    (B, C shared by the channels)
//   da_log[d, n] = A[n] sum_{g,t} e_t[n] dt_t,   dD[d] = sum_{g,t} q_t u_t,   ddelta_bias[d] = sum_{g,t} ddelta_t
// The carry runs backwards with the same associative structure as the state, x_{t-1} = dA_t (x_t + C_t q_t). A block
// sweeps its group of chunks from the last to the first, carrying x. When a sequence is split into several groups
// (long sequences, cpb = 1), scan_backward_carry gives each chunk's carry-out from x = 0 (and its sum of dt), and
// scan_chunk_combine (reverse = 1) turns those into the carry entering each chunk from the right.
//
// Backward threads (scan_backward): one block of 128 threads per (g, group) and channel split, looping over its tiles
// of CH channels (one split covers them all when there are enough (g, group) blocks to fill the GPU; with few long
// sequences of many channels, PaM's, the tiles are split over grid y so that the GPU has work). In a
// tile, P = NP / 4 consecutive lanes share a channel and each holds R = 4 of its states, so states and adjoints stay
// in registers and sums over n take log2(P) shuffle steps. Per sub-chunk of SUB = 8 tokens the block first stages,
// once per (token, channel) rather than once per lane, what every lane reads: dt, u, q, gy SiLU'(z), softplus'(.)
// and the B, C rows, in shared memory with coalesced loads. h_{t-1} is needed in reverse time: a first pass runs each
// chunk forward from its saved initial state and keeps the state at every sub-chunk start (shared memory); then, for
// each sub-chunk from the last, its SUB states are recomputed into registers (fully unrolled) and its tokens swept
// backwards. The per-(token, channel) results (du, ddelta, dz) are written by one thread per (token, channel) after
// the sweep, so the stores are coalesced.
//
// Determinism, no atomics:
//   dB, dC (sum over d): per token, each warp adds its channels by a fixed reduce-scatter of shuffles (each lane ends
//   with one (B or C, n) sum), writes them to shared memory, and after each sub-chunk the block adds the warps' rows in
//   warp order into an accumulator over the group's tokens that collects the channel tiles in tile order; the block
//   then writes its rows of dB and dC, which no other block touches; when the channels are split, each split writes
//   its rows' sums (bc_part) and scan_sum_bc adds them in split order.
//   da_log, dD, ddelta_bias (sums over g and t): each block writes one partial row per (g, group) (a split, its
//   channels' columns of the row),
//   part[g groups + group] = [A[d, n] sum e dt  (D N) | sum q u  (D) | sum ddelta  (D)], summed over rows in a
//   fixed order by sum_rows_f32 (gemm.cu).
//
// Cost per element of u (one token of one channel), N states, D channels, in units of the storage size E (4 bytes
// float32, 2 bf16; bytes: least traffic; FLOPs: adds, multiplies, exponentials and logarithms count one each; see
// src/ops/mod.rs):
//   forward   at least E (4 + 2N/D) bytes (u, delta, z, y; a token's B and C rows serve all D channels) and about
//             7N + 11 FLOPs (7 per state), N + 3 of them exponentials or logarithms; plus N / T float32 chunk-start
//             states (4 bytes each, whatever E)
//   backward  at least E (7 + 4N/D) bytes (u, delta, z, gy, B, C read; du, ddelta, dz, dB, dC written) and about
//             21N + 25 FLOPs (the forward recomputed, then about twice its per-state work for the adjoint)
// At the PiM stage-0 shapes of the 3D reference (N = 16, D = 64) the forward does 123 FLOPs per 18 bytes in float32
// (7 per byte) or 9 in bf16 (14 per byte): bound by memory and by the exponentials.
#include "common.cuh"
#include "scan.cuh"

#include <type_traits>

#define SCAN_LOG2E 1.4426950408889634f
#define FULL_MASK 0xffffffffu

// dt = softplus(delta + delta_bias) of the forward, its backward recompute and the carry kernel, the same function in
// all three: fast_softplus for bf16 storage (common.cuh: within 3e-6, where delta itself is rounded to 2^-9), the
// exact softplusf for float32.
template <typename E>
__device__ __forceinline__ float scan_softplus(float x) {
    if constexpr (std::is_same_v<E, float>)
        return softplusf(x);
    else
        return fast_softplus(x);
}

// The memory row of token t of sequence g: g L + t, or with flip (a sequence scanned from its last token) g L + L - 1
// - t. Every token-shaped access goes through it; chunks, states and carries are in scan order.
__device__ __forceinline__ int64_t token_row(int64_t g, int64_t t, int64_t L, int flip) {
    return g * L + (flip ? L - 1 - t : t);
}
static_assert(SCAN_CHUNK % SCAN_BWD_SUB == 0, "a chunk is a whole number of backward sub-chunks");

// One (g, group) block, channels blockIdx.y * blockDim.x + threadIdx.x, chunks of T = SCAN_CHUNK tokens. SUMMARY
// (cpb = 1): from h = 0, leaves the chunk's end state and sum of dt. Otherwise: from h_init of the group's first chunk
// (or 0), writes y, and with record stores the state at the start of each chunk.
template <typename E, int NMAX, bool SUMMARY, bool FLIP>
__device__ __forceinline__ void scan_forward_pass(const ScanParams<E>& p) {
    const E* __restrict__ u = p.u;
    const E* __restrict__ delta = p.delta;
    const float* __restrict__ a_log = p.a_log;
    const E* __restrict__ bmat = p.b;
    const E* __restrict__ cmat = p.c;
    const float* __restrict__ d_skip = p.d_skip;
    const E* __restrict__ z = p.z;
    const float* __restrict__ delta_bias = p.delta_bias;
    const float* __restrict__ h_init = p.h_init;
    E* __restrict__ y = p.y;
    float* __restrict__ states = p.chunk_states;
    float* __restrict__ sum_dt = p.chunk_dt;
    const bool has_init = h_init != nullptr;
    const E zero = from_f32<E>(0.0f);
    const int record = p.record, N = p.N;
    const int64_t L = p.L, D = p.D, bc_ld = p.bc_ld, T = SCAN_CHUNK, cpb = p.cpb;
    __shared__ __align__(16) float sb[SCAN_STAGE][NMAX];
    __shared__ __align__(16) float sc[SCAN_STAGE][NMAX];
    const int64_t nc = (L + T - 1) / T, groups = (nc + cpb - 1) / cpb;
    const int64_t g = blockIdx.x / groups, c_begin = (blockIdx.x % groups) * cpb;
    const int64_t c_end = min(nc, c_begin + cpb);
    const int64_t d = (int64_t)blockIdx.y * blockDim.x + threadIdx.x;
    const bool active = d < D;

    float a2[NMAX], h[NMAX];
#pragma unroll
    for (int k = 0; k < NMAX; ++k) {
        const bool on = active && k < N;
        a2[k] = on ? -expf(a_log[d * N + k]) * SCAN_LOG2E : 0.0f;
        h[k] = (on && has_init) ? h_init[((g * nc + c_begin) * D + d) * N + k] : 0.0f;
    }
    const float bias = active ? delta_bias[d] : 0.0f;
    const float dsk = (active && !SUMMARY) ? d_skip[d] : 0.0f;
    float dt_sum = 0.0f;

    for (int64_t c = c_begin; c < c_end; ++c) {
        if (!SUMMARY && record && active) {
#pragma unroll
            for (int k = 0; k < NMAX; ++k)
                if (k < N) states[((g * nc + c) * D + d) * N + k] = h[k];
        }
        const int64_t t0 = c * T, len = min(T, L - t0);
        for (int64_t s0 = 0; s0 < len; s0 += SCAN_STAGE) {
            const int ns = (int)min((int64_t)SCAN_STAGE, len - s0);
            auto row = [&](int tt) { return token_row(g, t0 + s0 + tt, L, FLIP); };  // stage token tt's row
            __syncthreads();  // the previous stage has been read by everyone
            // BATCH elements of B and C per thread loaded before any is converted and stored, so that their loads
            // are in flight together rather than one after the other.
            constexpr int BATCH = 4;
            for (int e0 = threadIdx.x; e0 < SCAN_STAGE * NMAX; e0 += BATCH * blockDim.x) {
                E vb[BATCH], vc[BATCH];
#pragma unroll
                for (int q = 0; q < BATCH; ++q) {
                    const int e = e0 + q * blockDim.x, tt = e / NMAX, k = e % NMAX;
                    const bool on = e < SCAN_STAGE * NMAX && tt < ns && k < N;
                    vb[q] = on ? bmat[row(tt) * bc_ld + k] : zero;
                    vc[q] = on && !SUMMARY ? cmat[row(tt) * bc_ld + k] : zero;
                }
#pragma unroll
                for (int q = 0; q < BATCH; ++q) {
                    const int e = e0 + q * blockDim.x;
                    if (e >= SCAN_STAGE * NMAX) break;
                    sb[e / NMAX][e % NMAX] = to_f32(vb[q]);
                    if (!SUMMARY) sc[e / NMAX][e % NMAX] = to_f32(vc[q]);
                }
            }
            __syncthreads();
            if (!active) continue;
            // Token tt's u, delta and z, loaded a token ahead and kept as stored (converted where they are used): the
            // load of token tt + 1 is in flight while token tt's states are updated, instead of each token waiting
            // on its own loads.
            E next_u, next_delta, next_z = zero;
            auto fetch = [&](int tt) {
                const int64_t i = row(tt) * D + d;
                next_u = u[i];
                next_delta = delta[i];
                if (!SUMMARY) next_z = z[i];
            };
            fetch(0);
            for (int tt = 0; tt < ns; ++tt) {
                const int64_t i = row(tt) * D + d;
                const float ut = to_f32(next_u), delta_t = to_f32(next_delta), zt = to_f32(next_z);
                if (tt + 1 < ns) fetch(tt + 1);
                const float dt = scan_softplus<E>(delta_t + bias);
                const float du = dt * ut;
                dt_sum += dt;
                float acc = 0.0f;
#pragma unroll
                for (int k = 0; k < NMAX; ++k) {
                    // exp2f, not exp2_approx as in the backward: with it this loop ran 12% slower on the H200
                    // (PiM stage 0 of flare-3d, 3.04 -> 3.42 ms, 93 -> 99 registers), fewer instructions or not.
                    h[k] = exp2f(dt * a2[k]) * h[k] + du * sb[tt][k];
                    if (!SUMMARY) acc += sc[tt][k] * h[k];
                }
                if (!SUMMARY) y[i] = from_f32<E>((acc + dsk * ut) * (zt * fast_sigmoid(zt)));
            }
        }
    }
    if (SUMMARY && active) {
#pragma unroll
        for (int k = 0; k < NMAX; ++k)
            if (k < N) states[((g * nc + c_begin) * D + d) * N + k] = h[k];
        sum_dt[(g * nc + c_begin) * D + d] = dt_sum;
    }
}

// Grid (G * groups, ceil(D / blockDim.x)), blockDim.x <= SCAN_FWD_THREADS. summary = 1: pass 1 (y, C, z, d_skip,
// h_init unused; writes chunk_states and chunk_dt); summary = 0: y from h_init (when not null) or from 0, chunk-start
// states stored in chunk_states when record (chunk_dt unused).
// The direction (flip) is a template argument: computed per token at run time it cost the forward 8 registers (95 ->
// 103, n16 bf16: four blocks of 128 threads per SM instead of five) and 30% of its time (flare-3d's PiM stage 0, H100).
// Each of the four passes has its own stage buffers (static shared memory, 12 KB per block for n16).
template <typename E, int NMAX>
__device__ __forceinline__ void scan_forward(const ScanParams<E>& p) {
    if (p.summary)
        p.flip ? scan_forward_pass<E, NMAX, true, true>(p) : scan_forward_pass<E, NMAX, true, false>(p);
    else
        p.flip ? scan_forward_pass<E, NMAX, false, true>(p) : scan_forward_pass<E, NMAX, false, false>(p);
}

// The float32 and bf16 instances of the scan kernel BODY<E, NSTATES> (NSTATES padded states), with its launch bounds;
// SCAN_FORWARD_KERNEL and SCAN_BACKWARD_KERNEL name the instances (build.rs reads their first two arguments).
#define SCAN_INSTANCES(NAME_F32, NAME_BF16, BODY, NSTATES, THREADS, MIN_BLOCKS)                                       \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) NAME_F32(const ScanParams<float> p) {           \
        BODY<float, NSTATES>(p);                                                                                      \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) NAME_BF16(const ScanParams<__nv_bfloat16> p) {  \
        BODY<__nv_bfloat16, NSTATES>(p);                                                                              \
    }
// n16 is held to five blocks of 128 threads per SM (at most 102 registers): with both directions in one kernel ptxas
// gave it 105 (four blocks); held, 93-94 and no spills, as the stored direction alone had (95). n32 is left alone (held
// to five it spills).
#define SCAN_FORWARD_KERNEL(NAME_F32, NAME_BF16, NMAX) \
    SCAN_INSTANCES(NAME_F32, NAME_BF16, scan_forward, NMAX, SCAN_FWD_THREADS, NMAX == 16 ? 5 : 1)
// scan_forward_n16 (N <= 16) and scan_forward_n32 (N <= 32), each in both instances; the host picks one with
// kernel::scan_forward_n16::<T>().
SCAN_FORWARD_KERNEL(scan_forward_n16_f32, scan_forward_n16_bf16, 16)
SCAN_FORWARD_KERNEL(scan_forward_n32_f32, scan_forward_n32_bf16, 32)

// Per (g, d, n), over the chunks in order (reverse = 0) or backwards (reverse = 1): on entry states[c]
// (chunk_states) holds the chunk's own contribution (end state from 0, or carry-out from 0); on exit it holds what
// enters the chunk,
//   in[first] = 0,   in[next] = exp(A[n] sum_dt[c]) in[c] + own[c]        (sum_dt: chunk_dt).
extern "C" __global__ void scan_chunk_combine(const ScanParams<float> p) {
    float* __restrict__ states = p.chunk_states;
    const float* __restrict__ sum_dt = p.chunk_dt;
    const float* __restrict__ a_log = p.a_log;
    const int64_t G = p.G, nc = (p.L + SCAN_CHUNK - 1) / SCAN_CHUNK, D = p.D;
    const int N = p.N, reverse = p.reverse;
    FOR_EACH(i, G * D * N) {
        const int64_t n = i % N, d = (i / N) % D, g = i / (N * D);
        const float a = -expf(a_log[d * N + n]);
        float carry = 0.0f;
        for (int64_t s = 0; s < nc; ++s) {
            const int64_t c = reverse ? nc - 1 - s : s;
            const int64_t at = ((g * nc + c) * D + d) * N + n;
            const float own = states[at];
            states[at] = carry;
            carry = expf(a * sum_dt[(g * nc + c) * D + d]) * carry + own;
        }
    }
}

// Per (g, chunk, d, n): the adjoint carry leaving the chunk at its first token when none enters at its end,
// x <- dA_t (x + C_t[n] q_t) for t from the chunk's last token down to its first, into carry (G, nc, D, N)
// (chunk_states); and the chunk's sum of dt into sum_dt (G, nc, D) (chunk_dt, written by the n = 0 thread).
template <typename E>
__device__ void scan_backward_carry(const ScanParams<E>& p) {
    const E* __restrict__ delta = p.delta;
    const float* __restrict__ a_log = p.a_log;
    const E* __restrict__ cmat = p.c;
    const E* __restrict__ z = p.z;
    const float* __restrict__ delta_bias = p.delta_bias;
    const E* __restrict__ gy = p.gy;
    float* __restrict__ carry = p.chunk_states;
    float* __restrict__ sum_dt = p.chunk_dt;
    const int64_t G = p.G, L = p.L, D = p.D, T = SCAN_CHUNK;
    const int N = p.N;
    const int64_t nc = (L + T - 1) / T;
    FOR_EACH(i, G * nc * D * N) {
        const int64_t n = i % N, d = (i / N) % D, gc = i / (N * D), g = gc / nc, c = gc % nc;
        const float a2 = -expf(a_log[d * N + n]) * SCAN_LOG2E, bias = delta_bias[d];
        const int64_t t0 = c * T, len = min(T, L - t0);
        float x = 0.0f, dt_sum = 0.0f;
        for (int64_t t = len - 1; t >= 0; --t) {
            const int64_t row = token_row(g, t0 + t, L, p.flip), at = row * D + d;
            const float zt = to_f32(z[at]);
            const float q = to_f32(gy[at]) * zt * fast_sigmoid(zt);
            const float dt = scan_softplus<E>(to_f32(delta[at]) + bias);
            dt_sum += dt;
            x = exp2_approx(dt * a2) * (x + to_f32(cmat[row * p.bc_ld + n]) * q);
        }
        carry[i] = x;
        if (n == 0) sum_dt[gc * D + d] = dt_sum;
    }
}
TYPED_KERNEL(scan_backward_carry_f32, scan_backward_carry_bf16, scan_backward_carry, ScanParams)

// Shared memory of scan_backward in floats (the host computes the same, selective_scan.rs): staged dt, u, q,
// gy SiLU'(z), softplus' [SUB][CH] each; B, C rows [SUB][NP] each; sums over n [SUB][CH][3]; per-warp dB | dC sums
// [SUB][WARPS][2 NP]; accumulator [acc_rows][2 NP]; sub-chunk start states [T / SUB][R][THREADS]; [2][THREADS] for the
// per-channel sums.
// Grid (G * groups, channel splits), SCAN_BWD_THREADS threads, dynamic shared memory as above. h_init (when not
// null) holds the saved chunk-start states (else every chunk starts from 0, valid for a single chunk); carry_in (when
// not null) holds the carry entering each chunk from the right (needed when a sequence spans several groups).
template <typename E, int NP>
__device__ __forceinline__ void scan_backward(const ScanParams<E>& prm) {
    const E* __restrict__ u = prm.u;
    const E* __restrict__ delta = prm.delta;
    const float* __restrict__ a_log = prm.a_log;
    const E* __restrict__ bmat = prm.b;
    const E* __restrict__ cmat = prm.c;
    const float* __restrict__ d_skip = prm.d_skip;
    const E* __restrict__ z = prm.z;
    const float* __restrict__ delta_bias = prm.delta_bias;
    const E* __restrict__ gy = prm.gy;
    const float* __restrict__ h_init = prm.h_init;
    const float* __restrict__ carry_in = prm.carry_in;
    const bool has_init = h_init != nullptr, has_carry = carry_in != nullptr;
    E* __restrict__ du = prm.du;
    E* __restrict__ ddelta = prm.ddelta;
    E* __restrict__ dz = prm.dz;
    float* __restrict__ part = prm.part;
    const int64_t L = prm.L, D = prm.D, T = SCAN_CHUNK, cpb = prm.cpb, bc_ld = prm.bc_ld;
    const int N = prm.N, acc_rows = prm.acc_rows, flip = prm.flip;
    constexpr int THREADS = SCAN_BWD_THREADS, S = SCAN_BWD_SUB, R = SCAN_BWD_R;
    constexpr int P = NP / R;             // lanes per channel
    constexpr int CH = THREADS / P;       // channels per tile
    constexpr int WARPS = THREADS / 32;
    constexpr int V = 2 * NP;             // per token: dB sums for n < NP, then dC sums
    extern __shared__ __align__(16) float smem[];
    float* st_dt = smem;                  // [S][CH]
    float* st_u = st_dt + S * CH;         // [S][CH]
    float* st_q = st_u + S * CH;          // [S][CH]  gy SiLU(z)
    float* st_gz = st_q + S * CH;         // [S][CH]  gy SiLU'(z)
    float* st_sp = st_gz + S * CH;        // [S][CH]  softplus'(delta + bias)
    float* st_b = st_sp + S * CH;         // [S][NP]
    float* st_c = st_b + S * NP;          // [S][NP]
    float* sums = st_c + S * NP;          // [S][CH][3]: sum_n C h_t, sum_n dh B, sum_n e A
    float* red = sums + S * CH * 3;       // [S][WARPS][V]
    float* acc = red + S * WARPS * V;     // [acc_rows][V]
    float* ckpt = acc + acc_rows * V;     // [T / S][R][THREADS]
    float* chsum = ckpt + (T / S) * R * THREADS;  // [2][THREADS]

    const int64_t nc = (L + T - 1) / T, groups = (nc + cpb - 1) / cpb;
    const int64_t g = blockIdx.x / groups, grp = blockIdx.x % groups;
    const int64_t c_begin = grp * cpb, c_end = min(nc, c_begin + cpb);
    const int64_t tok_begin = c_begin * T;
    const int rows = (int)(min(L, c_end * T) - tok_begin);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int p = tid % P, slot = tid / P;  // this lane's state group and channel within the tile
    const int ech = tid % CH;               // the channel this thread stages and finishes (CH divides THREADS)
    const int64_t part_row = (g * groups + grp) * (D * N + 2 * D);
    // After the sweep's reduce-scatter over a warp's channels each lane holds RED_PER_LANE of the warp's 2 NP sums,
    // entries base + k of [dB terms | dC terms], base fixed by the lane: their places in a warp's row of red.
    constexpr int RED_PER_LANE = 2 * R * P / 32;
    int red_at[RED_PER_LANE];
    {
        int base = 0;
        for (int off = 16, cnt = 2 * R; off >= P; off >>= 1) {
            cnt /= 2;
            if (lane & off) base += cnt;
        }
#pragma unroll
        for (int k = 0; k < RED_PER_LANE; ++k) red_at[k] = (base + k) / R * NP + p * R + (base + k) % R;
    }

    for (int e = tid; e < rows * V; e += THREADS) acc[e] = 0.0f;

    // Staging, in two halves so that a sub-chunk's global loads are in flight while the previous one is computed:
    // fetch reads S tokens from t_first (count of them real, the rest zero) of the tile's channels into registers:
    // delta and u, and with full also z, gy and C, and the B rows, as stored (E: converted to float32 by put, so
    // that no instruction waits on a load before put's barrier; converted in fetch, those waits were 13% of the
    // warps' stall samples, ncu on the H100); put (between barriers) writes what every lane reads into shared memory:
    // dt, u, and with full q, gy SiLU'(z), softplus'(.) and C. Zero-padded tokens leave states and carries unchanged.
    constexpr int TOK_PER_THREAD = (S * CH + THREADS - 1) / THREADS, ROW_PER_THREAD = (S * NP + THREADS - 1) / THREADS;
    constexpr int ACC_PER_THREAD = (S * V + THREADS - 1) / THREADS;
    struct Fetched {
        E delta[TOK_PER_THREAD], u[TOK_PER_THREAD], z[TOK_PER_THREAD], gy[TOK_PER_THREAD];
        E b[ROW_PER_THREAD], c[ROW_PER_THREAD];
    } f;
    const E zero = from_f32<E>(0.0f);
    auto fetch = [&](int64_t d0, int64_t t_first, int count, bool full) {
#pragma unroll
        for (int j = 0; j < TOK_PER_THREAD; ++j) {
            const int e = tid + j * THREADS, i = e / CH;
            const int64_t dd = d0 + ech, at = token_row(g, t_first + i, L, flip) * D + dd;
            const bool on = e < S * CH && i < count && dd < D;
            f.delta[j] = on ? delta[at] : zero;
            f.u[j] = on ? u[at] : zero;
            f.z[j] = on && full ? z[at] : zero;
            f.gy[j] = on && full ? gy[at] : zero;
        }
#pragma unroll
        for (int j = 0; j < ROW_PER_THREAD; ++j) {
            const int e = tid + j * THREADS, i = e / NP, k = e % NP;
            const bool on = e < S * NP && i < count && k < N;
            const int64_t at = token_row(g, t_first + i, L, flip) * bc_ld + k;
            f.b[j] = on ? bmat[at] : zero;
            f.c[j] = on && full ? cmat[at] : zero;
        }
    };
    auto put = [&](bool e_on, float e_bias, int count, bool full) {
        __syncthreads();  // the previous contents have been read
#pragma unroll
        for (int j = 0; j < TOK_PER_THREAD; ++j) {
            const int e = tid + j * THREADS, i = e / CH;
            if (e >= S * CH) break;
            float dt = 0.0f, q = 0.0f, gzc = 0.0f, sp = 0.0f;
            if (i < count && e_on) {
                const float pre = to_f32(f.delta[j]) + e_bias, zt = to_f32(f.z[j]), gyt = to_f32(f.gy[j]);
                dt = scan_softplus<E>(pre);
                if (full) {
                    // SiLU(z) = z s(z), SiLU'(z) = s(z) (1 + z (1 - s(z))), softplus'(x) = s(x) (1 above 20, where
                    // softplus is linear): one sigmoid each, by fast_sigmoid (common.cuh says why).
                    const float sz = fast_sigmoid(zt);
                    q = gyt * zt * sz;
                    gzc = gyt * (sz * (1.0f + zt * (1.0f - sz)));
                    sp = pre > 20.0f ? 1.0f : fast_sigmoid(pre);
                }
            }
            st_dt[e] = dt;
            st_u[e] = to_f32(f.u[j]);
            if (full) {
                st_q[e] = q;
                st_gz[e] = gzc;
                st_sp[e] = sp;
            }
        }
#pragma unroll
        for (int j = 0; j < ROW_PER_THREAD; ++j) {
            const int e = tid + j * THREADS;
            if (e >= S * NP) break;
            st_b[e] = to_f32(f.b[j]);
            if (full) st_c[e] = to_f32(f.c[j]);
        }
        __syncthreads();
    };

    // This block's channel tiles: split blockIdx.y of gridDim.y, equal runs of whole tiles.
    const int64_t tiles = (D + CH - 1) / CH, per_split = (tiles + gridDim.y - 1) / gridDim.y;
    const int64_t d_end = min(D, (blockIdx.y + 1) * per_split * CH);
    for (int64_t d0 = blockIdx.y * per_split * CH; d0 < d_end; d0 += CH) {
        const int64_t d = d0 + slot;
        const bool on_ch = d < D;
        float a[R], a2[R], x[R], ga[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int n = p * R + r;
            const bool on = on_ch && n < N;
            a[r] = on ? -expf(a_log[d * N + n]) : 0.0f;
            a2[r] = a[r] * SCAN_LOG2E;
            x[r] = (on && has_carry) ? carry_in[((g * nc + c_end - 1) * D + d) * N + n] : 0.0f;
            ga[r] = 0.0f;
        }
        const bool e_on = d0 + ech < D;
        const float e_dsk = e_on ? d_skip[d0 + ech] : 0.0f, e_bias = e_on ? delta_bias[d0 + ech] : 0.0f;
        float gd = 0.0f, gbias = 0.0f;  // channel ech: sum q u, sum ddelta

        for (int64_t c = c_end - 1; c >= c_begin; --c) {
            const int64_t t0 = c * T;
            const int len = (int)min(T, L - t0);
            const int nsub = (len + S - 1) / S;
            float h[R];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const int n = p * R + r;
                h[r] = (on_ch && n < N && has_init) ? h_init[((g * nc + c) * D + d) * N + n] : 0.0f;
            }
            // The state at the start of every sub-chunk (sub-chunk j + 1's loads in flight during j's steps).
            if (nsub > 1) fetch(d0, t0, S, false);
            for (int j = 0; j < nsub; ++j) {
#pragma unroll
                for (int r = 0; r < R; ++r) ckpt[(j * R + r) * THREADS + tid] = h[r];
                if (j + 1 == nsub) break;
                put(e_on, e_bias, S, false);
                if (j + 2 < nsub) fetch(d0, t0 + (j + 1) * S, S, false);
#pragma unroll
                for (int i = 0; i < S; ++i) {
                    const float dt = st_dt[i * CH + slot], dtu = dt * st_u[i * CH + slot];
                    const float4 b4 = *reinterpret_cast<const float4*>(st_b + i * NP + p * R);
                    const float bv[R] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
                    for (int r = 0; r < R; ++r) h[r] = exp2_approx(dt * a2[r]) * h[r] + dtu * bv[r];
                }
            }

            // The sweep, from the last sub-chunk (sub-chunk j - 1's loads in flight during j's).
            fetch(d0, t0 + (nsub - 1) * S, len - (nsub - 1) * S, true);
            for (int j = nsub - 1; j >= 0; --j) {
                const int sublen = min(S, len - j * S);  // the same for the whole block
                put(e_on, e_bias, sublen, true);
                if (j > 0) fetch(d0, t0 + (j - 1) * S, S, true);
                // The states of the sub-chunk: hist[i] = h_{t-1} and hist[i + 1] = h_t of its token i.
                float hist[S + 1][R];
#pragma unroll
                for (int r = 0; r < R; ++r) hist[0][r] = ckpt[(j * R + r) * THREADS + tid];
#pragma unroll
                for (int i = 0; i < S; ++i) {
                    const float dt = st_dt[i * CH + slot], dtu = dt * st_u[i * CH + slot];
                    const float4 b4 = *reinterpret_cast<const float4*>(st_b + i * NP + p * R);
                    const float bv[R] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
                    for (int r = 0; r < R; ++r) hist[i + 1][r] = exp2_approx(dt * a2[r]) * hist[i][r] + dtu * bv[r];
                }
                // Every token of the sub-chunk, also those past the sequence (sublen < S, the last sub-chunk only):
                // their staged dt, u, q, B and C are 0, so dA = 1, x passes unchanged and they add 0 to every sum
                // that is kept. (A branch around them kept ptxas from overlapping one token's reductions with the
                // next one's exponentials.)
#pragma unroll
                for (int i = S - 1; i >= 0; --i) {
                    const float dt = st_dt[i * CH + slot], dtu = dt * st_u[i * CH + slot];
                    const float q = st_q[i * CH + slot];
                    const float4 b4 = *reinterpret_cast<const float4*>(st_b + i * NP + p * R);
                    const float4 c4 = *reinterpret_cast<const float4*>(st_c + i * NP + p * R);
                    const float bv[R] = {b4.x, b4.y, b4.z, b4.w}, cv[R] = {c4.x, c4.y, c4.z, c4.w};
                    float rs = 0.0f, rb = 0.0f, ra = 0.0f;
                    float vals[2 * R];  // this channel's dB (first R) and dC (last R) terms
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        const float da = exp2_approx(dt * a2[r]), hp = hist[i][r], hc = hist[i + 1][r];
                        const float dh = x[r] + cv[r] * q;
                        const float e = dh * da * hp;
                        rs += cv[r] * hc;
                        rb += dh * bv[r];
                        ra += e * a[r];
                        ga[r] += e * dt;
                        vals[r] = dh * dtu;
                        vals[R + r] = q * hc;
                        x[r] = da * dh;
                    }
#pragma unroll
                    for (int o = P / 2; o > 0; o >>= 1) {
                        rs += __shfl_xor_sync(FULL_MASK, rs, o);
                        rb += __shfl_xor_sync(FULL_MASK, rb, o);
                        ra += __shfl_xor_sync(FULL_MASK, ra, o);
                    }
                    if (p == 0) {
                        float* s = sums + (i * CH + slot) * 3;
                        s[0] = rs;
                        s[1] = rb;
                        s[2] = ra;
                    }
                    // Sum the warp's channels (lanes that differ in the bits >= P): at each step a lane keeps
                    // half of its values, adds the partner's copy of that half, and hands over the other half.
#pragma unroll
                    for (int off = 16, cnt = 2 * R; off >= P; off >>= 1) {
                        const int half = cnt / 2;
                        const bool upper = (lane & off) != 0;
#pragma unroll
                        for (int k = 0; k < half; ++k) {
                            const float send = upper ? vals[k] : vals[k + half];
                            const float keep = upper ? vals[k + half] : vals[k];
                            vals[k] = keep + __shfl_xor_sync(FULL_MASK, send, off);
                        }
                        cnt = half;
                    }
                    float* w = red + (i * WARPS + warp) * V;
#pragma unroll
                    for (int k = 0; k < RED_PER_LANE; ++k) w[red_at[k]] = vals[k];
                }
                __syncthreads();
                // This thread's (token, channel) elements of the sub-chunk, then its elements of the block's dB | dC
                // rows, in loops of fixed length (as runtime loops over sublen they took 10% of the kernel's
                // instructions, ncu on the H100), the tokens past sublen skipped.
#pragma unroll
                for (int k = 0; k < TOK_PER_THREAD; ++k) {
                    const int e = tid + k * THREADS, i = e / CH;
                    if (e >= S * CH || i >= sublen || !e_on) continue;
                    const float* s = sums + e * 3;
                    const float dt = st_dt[e], ut = st_u[e], q = st_q[e];
                    const float gdl = (ut * s[1] + s[2]) * st_sp[e];
                    const int64_t at = token_row(g, t0 + j * S + i, L, flip) * D + d0 + ech;
                    du[at] = from_f32<E>(q * e_dsk + dt * s[1]);
                    ddelta[at] = from_f32<E>(gdl);
                    dz[at] = from_f32<E>(st_gz[e] * (s[0] + e_dsk * ut));
                    gd += q * ut;
                    gbias += gdl;
                }
                const int acc0 = (int)(t0 + j * S - tok_begin);
#pragma unroll
                for (int k = 0; k < ACC_PER_THREAD; ++k) {
                    const int e = tid + k * THREADS, i = e / V, v = e % V;
                    if (e >= S * V || i >= sublen) continue;
                    float s = 0.0f;
#pragma unroll
                    for (int w = 0; w < WARPS; ++w) s += red[(i * WARPS + w) * V + v];
                    acc[(acc0 + i) * V + v] += s;
                }
            }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int n = p * R + r;
            if (on_ch && n < N) part[part_row + d * N + n] = a[r] * ga[r];
        }
        chsum[tid] = gd;
        chsum[THREADS + tid] = gbias;
        __syncthreads();
        if (tid < CH && d0 + tid < D) {
            float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
            for (int k = 0; k < THREADS / CH; ++k) {
                s1 += chsum[k * CH + tid];
                s2 += chsum[THREADS + k * CH + tid];
            }
            part[part_row + D * N + d0 + tid] = s1;
            part[part_row + D * N + D + d0 + tid] = s2;
        }
    }
    __syncthreads();
    // dB, dC of the group's tokens: final when one block covers every channel, else this split's partial sums.
    for (int e = tid; e < rows * N; e += THREADS) {
        const int t = e / N, k = e % N;
        const int64_t row = token_row(g, tok_begin + t, L, flip);
        if (gridDim.y == 1) {
            prm.db[row * bc_ld + k] = from_f32<E>(acc[t * V + k]);
            prm.dc[row * bc_ld + k] = from_f32<E>(acc[t * V + NP + k]);
        } else {
            float* out = prm.bc_part + (blockIdx.y * prm.G * L + row) * 2 * N;
            out[k] = acc[t * V + k];
            out[N + k] = acc[t * V + NP + k];
        }
    }
}

// Left to itself ptxas gave the backward 158 registers, 3 blocks per SM; held to 4 blocks (128 registers) it ran the
// bf16 steps 1.5% (flare-3d b2) and 2% (amos-2d b12) faster on the H200 (2026-12-03, same call). With the register
// prefetch of the next sub-chunk n16 fits without spilling, n32 spills 16-36 bytes.
// Shared memory allows 4 at acc_rows = 128, not 5.
constexpr int SCAN_BWD_MIN_BLOCKS = 4;
#define SCAN_BACKWARD_KERNEL(NAME_F32, NAME_BF16, NP) \
    SCAN_INSTANCES(NAME_F32, NAME_BF16, scan_backward, NP, SCAN_BWD_THREADS, SCAN_BWD_MIN_BLOCKS)
// scan_backward_n16 (N <= 16) and scan_backward_n32 (N <= 32), each in both instances.
SCAN_BACKWARD_KERNEL(scan_backward_n16_f32, scan_backward_n16_bf16, 16)
SCAN_BACKWARD_KERNEL(scan_backward_n32_f32, scan_backward_n32_bf16, 32)

// dB[g, t, n] = sum over splits s of bc_part[s, g L + t, n], dC the same from column N + n; s in order.
template <typename E>
__device__ void scan_sum_bc(const ScanParams<E>& p) {
    const int64_t rows = p.G * p.L;
    FOR_EACH(i, rows * p.N) {
        const int64_t row = i / p.N, n = i % p.N;
        float sb = 0.0f, sc = 0.0f;
        for (int s = 0; s < p.splits; ++s) {
            const float* at = p.bc_part + (s * rows + row) * 2 * p.N;
            sb += at[n];
            sc += at[p.N + n];
        }
        p.db[row * p.bc_ld + n] = from_f32<E>(sb);
        p.dc[row * p.bc_ld + n] = from_f32<E>(sc);
    }
}
TYPED_KERNEL(scan_sum_bc_f32, scan_sum_bc_bf16, scan_sum_bc, ScanParams)
