// Convolution products on the tensor cores from a halo tile (bf16 operands from bf16 storage, or tf32 operands from
// float32 storage; float32 accumulation):
//
//   out[n, col, dst_base + dst_step . r] = b[col] + sum_{c, q} src[n, c, s r + lo + q] Wp[c, q, col],
//
// the conv forward (lo = -pad, s the stride, the output rows in order) and the input gradient of any convolution (the
// same sum over the output gradient with the kernel flipped and its channel axes swapped: conv.rs's
// wide_from_narrow, one product per stride phase, s = 1, written at every stride-th position).
// conv_tc.cu gathers each A element once per tap that reads it (27 times for a 3x3x3 kernel), one element at a time;
// here a block reads the source box its 128 outputs need once per channel chunk:
// - A block owns a box of 1 x tile_y x tile_x output positions (tile_x * tile_y = 128) of one batch item and BN
//   output channels. Per stage of a chunk of source channels (CONV_HALO_WORDS = 8 words: 16 bf16 channels as pairs,
//   the even channel in the low half, the order of the mma operand; or 8 float32 channels rounded to tf32) it stages
//   the halo, the box grown by taps - 1 along each axis (at most 3 x 6 x 34 voxels): halo[word][voxel]. The product
//   of tap q is then a 128 x chunk x BN mma (one m16n8k16 bf16 or m16n8k8 tf32 step) whose A rows are the halo voxels
//   shifted by q: the fragment of row m reads word (voxel(m) + offset(q)), 8 consecutive rows 8 consecutive words,
//   and the word rows are CONV_HALO_PAIR_STRIDE = 8 (mod 32) words apart, so a warp's 32 loads hit 32 banks.
// - The weights are packed once per launch (conv_pack_*, a few MB at most) into [chunk][tap][col][chunk channels]
//   and copied with 16-byte cp.async: a stage's [tap][BN][8 words] slice. Each (tap, col) row is two 16-byte
//   halves, swapped when bit 2 of col is set, so the B fragment loads of a warp (8 columns x 4 words) hit 32 banks.
// - Two stages in flight: while the tensor cores work through the taps of chunk i, the weights of chunk i + 1 are in
//   flight through cp.async and its halo through registers (element loads, stored as operand words after the
//   products).
// - Warp (wm, wn) of the 4 x 2 warps (the narrow tile: 8 x 1) computes positions 32 wm .. 32 wm + 31 and BN / 2
//   columns (16 wm .. 16 wm + 15 and all 32) with mma.sync
//   (PTX ISA, "Matrix Fragments": with g = lane / 4, t = lane % 4, m16n8k16 bf16 takes in A the pairs (g, 2t..2t+1),
//   (g + 8, 2t..), (g, 2t+8..), (g + 8, 2t+8..) and in B the pairs (2t..2t+1, g), (2t+8..2t+9, g); m16n8k8 tf32 the
//   single elements (g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4) and (t, g), (t + 4, g): in both, the words
//   t and t + 4 of rows g and g + 8, so one addressing serves both).
// The weight gradient of a stride-1 conv (conv_wgrad_halo, after the products) reduces over positions instead: a
// block stages the wide map's halo and the narrow map's box for each box of 128 positions and runs one small product
// per tap on the halo shifted by it.
// Each output is one thread's sum in a fixed order: results do not depend on scheduling.
//
// Cost: 2 c_src prod(taps) FLOPs per output element; bytes about the source once per column tile (plus the halo's
// rim), the packed weight once per block, the output once.
#include "common.cuh"
#include "conv_halo.cuh"
#include "mma.cuh"

namespace {

constexpr int BM = CONV_HALO_BM, WORDS = CONV_HALO_WORDS, THREADS = CONV_HALO_THREADS;
constexpr int WARPS = THREADS / 32;
static_assert(WARPS == 8 && WORDS == 8, "warp layout, one mma k-step per tap");
// Warps along the output channels of a tile of BN columns (the rest along the positions): two for the wide tile, one
// for the narrow, whose 8 warps then each take 16 positions x 32 columns (4 A-fragment loads per tap for 4 mma; as
// 4 x 2 warps of 32 x 16 it took 8 for 4).
template <int BN>
constexpr int WARPS_N = BN == CONV_HALO_BN_NARROW ? 1 : 2;
template <int BN>
constexpr int WARPS_M = WARPS / WARPS_N<BN>;

// The forward / input-gradient box of POSITIONS positions: its most halo voxels (over the tile_x it takes, 3 taps
// per axis, its source stride), the pair stride of its staged halo and the halo voxels a thread stages per chunk
// (each for every word). Along y and x a source walked at stride s is staged split by phase (conv_halo below):
// extent s (tile + (taps - 1) / s) per axis; along z a box is one slice, its halo taps[0] slices at any stride.
constexpr int halo_extent(int tile, int stride) { return stride * (tile + (CONV_HALO_MAX_TAPS - 1) / stride); }
constexpr int halo_voxels(int positions, int tile_x, int stride) {
    return CONV_HALO_MAX_TAPS * halo_extent(positions / tile_x, stride) * halo_extent(tile_x, stride);
}
constexpr int max2(int a, int b) { return a > b ? a : b; }
template <int POSITIONS>
struct Box {
    // Boxes of CONV_HALO_BM_STRIDED positions take sources at stride 2, tile_x 8 or 16 (conv.rs's halo_tile_x).
    static constexpr bool STRIDED = POSITIONS == CONV_HALO_BM_STRIDED;
    static constexpr int MAX_VOXELS =
        STRIDED ? max2(halo_voxels(POSITIONS, 8, 2), halo_voxels(POSITIONS, 16, 2))
                : max2(max2(halo_voxels(POSITIONS, 8, 1), halo_voxels(POSITIONS, 16, 1)),
                       halo_voxels(POSITIONS, 32, 1));
    static constexpr int PS = POSITIONS == CONV_HALO_BM ? CONV_HALO_PAIR_STRIDE : CONV_HALO_PAIR_STRIDE_LARGE;
    static constexpr int HALO_VOX = (MAX_VOXELS + THREADS - 1) / THREADS;
    static_assert((POSITIONS == CONV_HALO_BM || POSITIONS == CONV_HALO_BM_LARGE || STRIDED) && PS >= MAX_VOXELS &&
                      PS % 32 == 8,
                  "pair rows hold the halo, 8 banks apart");
};

// Channels per 32-bit word and per chunk of T storage (bf16: pairs, 16 channels; float: 8 channels).
template <typename T>
constexpr int PER_WORD = 4 / sizeof(T);
template <typename T>
constexpr int CHUNK = WORDS * PER_WORD<T>;

// The operand word of channels c (and c + 1 for bf16) at src (each valid or 0): bf16 pairs, the even channel in the
// low half; float32 rounded to tf32.
__device__ __forceinline__ unsigned operand_word(const __nv_bfloat16* at, int64_t step, bool lo_ok, bool hi_ok) {
    const __nv_bfloat16 zero = __ushort_as_bfloat16(0);
    return (unsigned)__bfloat16_as_ushort(lo_ok ? at[0] : zero) |
           ((unsigned)__bfloat16_as_ushort(hi_ok ? at[step] : zero) << 16);
}
__device__ __forceinline__ unsigned operand_word(const float* at, int64_t, bool ok, bool) {
    return mma::to_tf32(ok ? *at : 0.0f);
}
// A packed weight element: float32 rounded to tf32 (the products' operand), bf16 as it is.
__device__ __forceinline__ __nv_bfloat16 pack_value(__nv_bfloat16 w) { return w; }
__device__ __forceinline__ float pack_value(float w) { return __uint_as_float(mma::to_tf32(w)); }

template <typename T>
__device__ __forceinline__ void conv_pack(const ConvPackParams<T>& p) {
    constexpr int CK = CHUNK<T>;
    const int taps = p.taps[0] * p.taps[1] * p.taps[2], part_len = CK / p.parts;
    FOR_EACH(e, p.len) {
        const int k_in = (int)(e % part_len);
        int64_t rest = e / part_len;
        const int col = (int)(rest % p.c_dst_pad);
        rest /= p.c_dst_pad;
        const int part = (int)(rest % p.parts);
        rest /= p.parts;
        const int q = (int)(rest % taps);
        const int c = (int)(rest / taps) * CK + part * part_len + k_in;
        T v = from_f32<T>(0.0f);
        if (c < p.c_src && col < p.c_dst) {
            int qd[3];
            split3(q, p.taps, qd);
            int tap = 0;
#pragma unroll
            for (int d = 0; d < 3; ++d) {
                const int walked = p.flip[d] ? p.taps[d] - 1 - qd[d] : qd[d];
                tap = tap * p.kernel[d] + p.tap_mul[d] * walked + p.tap_add[d];
            }
            v = pack_value(p.w[(int64_t)col * p.w_dst + (int64_t)c * p.w_src + tap]);
        }
        p.packed[e] = v;
    }
}

template <int POSITIONS, int BN, typename T, int SZ = 1>
__device__ __forceinline__ void conv_halo(const ConvHaloParams<T>& p) {
    using B = Box<POSITIONS>;
    constexpr int WM = WARPS_M<BN>, WTM = POSITIONS / WM, MI = WTM / 16, PS = B::PS, HALO_VOX = B::HALO_VOX;
    constexpr int WTN = BN / WARPS_N<BN>, NI = WTN / 8, CK = CHUNK<T>, PER = PER_WORD<T>;
    static_assert(WTM % 16 == 0, "whole fragments");
    extern __shared__ __align__(16) unsigned smem[];
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5, g = lane >> 2, tq = lane & 3;
    const int wm = warp % WM, wn = warp / WM;

    const int taps = p.taps[0] * p.taps[1] * p.taps[2];
    const int tile_x = p.tile_x, tile_y = POSITIONS / tile_x;
    // The halo, split by phase along y and x: line ly = phase * len_y + j holds source row S (y0 + j) + phase + lo
    // (S the stride along y and x: 2 in the strided boxes, else 1, and then j = ly), and likewise columns; tap q then
    // reads line (q % S) len + q / S past the output row's. Its slices along z are the taps[0] source slices
    // SZ z + lo[0] + qz. The strides are constants of the kernel, so that the stride-1 kernels keep their code.
    constexpr int S = B::STRIDED ? 2 : 1;
    const int len_y = tile_y + (p.taps[1] - 1) / S, len_x = tile_x + (p.taps[2] - 1) / S;
    const int hz = p.taps[0], hy = S * len_y, hx = S * len_x;
    const int halo_vox = hz * hy * hx;
    const int weight_words = taps * BN * WORDS;
    // Stage b: its halo at smem + b * stage_words, its weights after the halo.
    const int stage_words = WORDS * PS + weight_words;
    auto halo_of = [&](int b) { return smem + b * stage_words; };
    auto weights_of = [&](int b) { return smem + b * stage_words + WORDS * PS; };

    // This block's box: batch item n, output slice z, rows y0 .., columns x0 .., output channels col0 ..
    const int x_tiles = (p.rows[2] + tile_x - 1) / tile_x, y_tiles = (p.rows[1] + tile_y - 1) / tile_y;
    int b = blockIdx.x;
    const int x0 = b % x_tiles * tile_x;
    b /= x_tiles;
    const int y0 = b % y_tiles * tile_y;
    b /= y_tiles;
    const int z = b % p.rows[0], n = b / p.rows[0];
    const int col0 = blockIdx.y * BN;
    const int src_vox = p.src_size[0] * p.src_size[1] * p.src_size[2];
    const T* src_n = p.src + (int64_t)n * p.c_src * src_vox;

    // The halo voxels this thread stages: v = t + THREADS i, each for all WORDS words of the chunk (shared word
    // w * PS + v); off is the voxel's source offset within a channel, -1 outside the map or past the halo.
    int off[HALO_VOX];
#pragma unroll
    for (int i = 0; i < HALO_VOX; ++i) {
        const int v = t + i * THREADS;
        const int vz = v / (hy * hx), vy = v / hx % hy, vx = v % hx;
        // Along y and x the phase-split lines (with S = 1 simply y0 + lo + vy, written so, as the compiler cannot
        // see that vy < len_y there).
        const int sz = SZ * z + p.lo[0] + vz;
        int sy = y0 + p.lo[1] + vy, sx = x0 + p.lo[2] + vx;
        if constexpr (B::STRIDED) {
            sy = S * (y0 + vy % len_y) + vy / len_y + p.lo[1];
            sx = S * (x0 + vx % len_x) + vx / len_x + p.lo[2];
        }
        const bool inside = (unsigned)sz < (unsigned)p.src_size[0] && (unsigned)sy < (unsigned)p.src_size[1] &&
                            (unsigned)sx < (unsigned)p.src_size[2];
        off[i] = v < halo_vox && inside ? (sz * p.src_size[1] + sy) * p.src_size[2] + sx : -1;
    }
    unsigned staged[HALO_VOX][WORDS];
    auto load_halo = [&](int chunk) {
#pragma unroll
        for (int i = 0; i < HALO_VOX; ++i)
#pragma unroll
            for (int w = 0; w < WORDS; ++w) {
                const int c = chunk * CK + PER * w;
                const T* at = src_n + (int64_t)c * src_vox + off[i];
                staged[i][w] = operand_word(at, src_vox, off[i] >= 0 && c < p.c_src, off[i] >= 0 && c + 1 < p.c_src);
            }
    };
    auto store_halo = [&](unsigned* halo) {
#pragma unroll
        for (int i = 0; i < HALO_VOX; ++i)
            if (t + i * THREADS < halo_vox)
#pragma unroll
                for (int w = 0; w < WORDS; ++w) halo[w * PS + t + i * THREADS] = staged[i][w];
    };
    // The weights of a chunk: taps * BN rows of two 16-byte halves, half h stored at h ^ (bit 2 of the column).
    auto load_weights = [&](int chunk, int buf) {
        const T* from = p.packed + ((int64_t)chunk * taps * p.c_dst_pad + col0) * CK;
        for (int h = t; h < 2 * taps * BN; h += THREADS) {
            const int row = h >> 1, half = h & 1, q = row / BN, col = row - q * BN;
            unsigned* to = weights_of(buf) + row * WORDS + 4 * (half ^ ((col >> 2) & 1));
            mma::cp_async16(reinterpret_cast<T*>(to), from + ((int64_t)q * p.c_dst_pad + col) * CK + CK / 2 * half,
                            CK / 2);
        }
        mma::cp_async_commit();
    };

    // This thread's A rows: box position m = 32 wm + 16 i + g (+ 8) at halo voxel (y * hx + x) of slice 0.
    int row_vox[MI][2];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int m = WTM * wm + 16 * i + g + 8 * h;
            row_vox[i][h] = m / tile_x * hx + m % tile_x;
        }
    float acc[MI][NI][4] = {};
    // The B fragments of column tiles j and j + 1 in one ldmatrix.x4 (the words t and t + 4 of column g of each: with
    // 32-bit words as pairs of 16-bit elements, row g's word t of each 8 x 8 matrix): lane l addresses row l % 8 of
    // matrix l / 8, that is column 8 (l / 16) + l % 8 of the pair and its half (l / 8) % 2, swapped as stored.
    static_assert(NI % 2 == 0, "column tiles in pairs");
    const int b_lane =
        (wn * WTN + 8 * (lane >> 4) + (lane & 7)) * WORDS + 4 * (((lane >> 3) & 1) ^ ((lane >> 2) & 1));

    const int chunks = (p.c_src + CK - 1) / CK;
    load_weights(0, 0);
    load_halo(0);
    store_halo(halo_of(0));
    mma::cp_async_wait<0>();
    __syncthreads();
    for (int chunk = 0; chunk < chunks; ++chunk) {
        const int buf = chunk & 1;
        const bool more = chunk + 1 < chunks;
        if (more) {
            load_weights(chunk + 1, buf ^ 1);
            load_halo(chunk + 1);
        }
        const unsigned* a_s = halo_of(buf);
        const unsigned* b_s = weights_of(buf);
        // The taps q = (qz, qy, qx) in order, two fragment sets in registers: tap q + 1's are loaded while tap q's
        // mma run (the tap counts are runtime values, so the compiler cannot overlap them by unrolling).
        unsigned a[2][MI][4], bf[2][NI / 2][4];
        int qz = 0, qy = 0, qx = 0;  // the next tap to load
        auto load = [&](int set, int q) {
            const int shift = (qz * hy + qy % S * len_y + qy / S) * hx + qx % S * len_x + qx / S;
#pragma unroll
            for (int i = 0; i < MI; ++i) {
                a[set][i][0] = a_s[tq * PS + row_vox[i][0] + shift];
                a[set][i][1] = a_s[tq * PS + row_vox[i][1] + shift];
                a[set][i][2] = a_s[(tq + 4) * PS + row_vox[i][0] + shift];
                a[set][i][3] = a_s[(tq + 4) * PS + row_vox[i][1] + shift];
            }
#pragma unroll
            for (int j = 0; j < NI / 2; ++j)
                mma::ldmatrix_x4<false>(bf[set][j], b_s + q * BN * WORDS + b_lane + 16 * WORDS * j);
            if (++qx == p.taps[2]) {
                qx = 0;
                if (++qy == p.taps[1]) {
                    qy = 0;
                    ++qz;
                }
            }
        };
        auto product = [&](int set) {
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NI; ++j)
                    mma::mma_k<T>(acc[i][j], a[set][i], bf[set][j / 2][j % 2 * 2], bf[set][j / 2][j % 2 * 2 + 1]);
        };
        load(0, 0);
        for (int q = 0; q < taps; q += 2) {
            if (q + 1 < taps) load(1, q + 1);
            product(0);
            if (q + 2 < taps) load(0, q + 2);
            if (q + 1 < taps) product(1);
        }
        if (more) store_halo(halo_of(buf ^ 1));
        mma::cp_async_wait<0>();
        __syncthreads();
    }

    const int dst_vox = p.dst_size[0] * p.dst_size[1] * p.dst_size[2];
    // Output row (z, y, x) at dst_base + z dst_step[0] + y dst_step[1] + x dst_step[2].
    const int64_t dst_zn = (int64_t)n * p.c_dst * dst_vox + p.dst_base + (int64_t)z * p.dst_step[0];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int m = WTM * wm + 16 * i + g + 8 * h, y = y0 + m / tile_x, x = x0 + m % tile_x;
            if (y >= p.rows[1] || x >= p.rows[2]) continue;
            const int64_t out = dst_zn + y * p.dst_step[1] + x * p.dst_step[2];
#pragma unroll
            for (int j = 0; j < NI; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = col0 + wn * WTN + 8 * j + 2 * tq + e;
                    if (col < p.c_dst)
                        p.dst[out + (int64_t)col * dst_vox] =
                            from_f32<T>(acc[i][j][2 * h + e] + (p.bias ? to_f32(p.bias[col]) : 0.0f));
                }
        }
}


// The weight gradient's staged maps, per pipeline stage, in 32-bit words of storage (one float or two bf16):
// - the wide halo (the box grown by kernel - 1 along each axis): WG_ROWS channel rows of XS words, each the hz x hy
//   halo lines of RW words, the aligned storage words that cover the line's voxels from x0 - pad - e on (e = pad %
//   PER: with W even a bf16 map's words start at even x, so the line is whole words that cp.async copies as they are);
// - the narrow box: WG_COLS channel rows of GS words, its 128 positions in order, PER per word.
// Row strides are 4 mod 32 words: a fragment load (8 rows x 4 consecutive words) hits 32 banks. The largest halo
// (3 taps per axis, e = PER - 1) takes 3 (128 / tile_x + 2) ceil((tile_x + 2 + e) / PER) words: 612 float words
// (tile_x 32), 324 bf16 words (tile_x 32 or 8).
template <typename T>
struct WgradLayout;
template <>
struct WgradLayout<float> {
    static constexpr int XS = 612, GS = 132;
};
template <>
struct WgradLayout<__nv_bfloat16> {
    static constexpr int XS = 324, GS = 68;
};
constexpr int WG_ROWS = CONV_HALO_WG_ROWS, WG_COLS = CONV_HALO_WG_COLS, WG_STAGES = CONV_HALO_WG_STAGES;
constexpr int WG_TAPS_PER_WARP = (CONV_HALO_MAX_TAPS * CONV_HALO_MAX_TAPS * CONV_HALO_MAX_TAPS + 7) / 8;
// Halo words a thread stages per box: items of (halo word, 8 channel rows).
constexpr int WG_GROUP = 8;
template <typename T>
constexpr int WG_ITEMS = (WgradLayout<T>::XS * (WG_ROWS / WG_GROUP) + THREADS - 1) / THREADS;
template <typename T>
constexpr int wgrad_halo_words(int tile_x) {
    return CONV_HALO_MAX_TAPS * (BM / tile_x + CONV_HALO_MAX_TAPS - 1) *
           ((tile_x + CONV_HALO_MAX_TAPS - 1 + 2 * (PER_WORD<T> - 1)) / PER_WORD<T>);
}
template <typename T>
constexpr bool wgrad_fits() {
    using L = WgradLayout<T>;
    return wgrad_halo_words<T>(32) <= L::XS && wgrad_halo_words<T>(16) <= L::XS && wgrad_halo_words<T>(8) <= L::XS &&
           BM / PER_WORD<T> <= L::GS && (WG_ROWS - WG_GROUP + 1) * L::XS <= 8192 && L::XS % 32 == 4 &&
           L::GS % 32 == 4 &&
           WG_STAGES * (WG_ROWS * L::XS + WG_COLS * L::GS) <= CONV_HALO_WG_SHARED_WORDS;
}
static_assert(wgrad_fits<float>() && wgrad_fits<__nv_bfloat16>(), "the staged maps fit their rows, banks and memory");
static_assert(BM / 8 + CONV_HALO_MAX_TAPS - 1 < 32 && 32 + CONV_HALO_MAX_TAPS < 64 && CONV_HALO_MAX_TAPS < 4,
              "a halo item's offsets fit their bits (dz: 2, dy: 5, x word: 6)");
static_assert(WG_ROWS == 16 && WG_ROWS % WG_GROUP == 0 && THREADS % BM == 0 && WG_COLS % (THREADS / BM) == 0,
              "one 16-row fragment per warp");

// The storage word of the PER elements at `at`, element i read only where ok(i) (0 elsewhere): one cp.async where
// the word is aligned (a float always; bf16 halves then valid or not together, with W even), else two element loads
// and a store.
template <typename T, class Ok>
__device__ __forceinline__ void stage_word(unsigned* dst, const T* at, bool aligned, Ok ok) {
    if (PER_WORD<T> == 1 || aligned) {
        mma::cp_async4(dst, at, ok(0) ? 4 : 0);
    } else {
        *dst = operand_word(at, 1, ok(0), ok(1));
    }
}
// A staged word as an mma operand: bf16 pairs as they are, float32 rounded to tf32.
__device__ __forceinline__ unsigned operand_of(unsigned w, __nv_bfloat16) { return w; }
__device__ __forceinline__ unsigned operand_of(unsigned w, float) { return mma::to_tf32(__uint_as_float(w)); }

// dW[cn, cw, a] = sum_{n, o} narrow[n, cn, o] wide[n, cw, o + a - pad] over the block's boxes (formula in
// conv_halo.cuh). Per box of 128 positions the wide halo (WG_ROWS channels) and the narrow box (WG_COLS channels)
// are staged (WgradLayout), WG_STAGES boxes in flight through cp.async: while the tensor cores work on box i, box i +
// 1's words are copied. Warp w computes taps w, w + 8, .. (at most 4): per tap a WG_ROWS x WG_COLS product over the
// 128 positions, A = the halo shifted by the tap (m = cw, k = position), B = the box (k = position, n = cn), in mma
// k-steps of 16 (bf16) or 8 (tf32) positions. A bf16 pair of positions (o, o + 1) shifted by a tap whose x offset
// plus e is odd straddles two staged words: its operand is the high half of one and the low half of the next.
template <typename T>
__device__ __forceinline__ void conv_wgrad_halo(const ConvWgradHaloParams<T>& p) {
    using L = WgradLayout<T>;
    constexpr int PER = PER_WORD<T>, KSTEP = 8 * PER, NI = WG_COLS / 8, STAGE = WG_ROWS * L::XS + WG_COLS * L::GS;
    extern __shared__ __align__(16) unsigned smem[];
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5, g = lane >> 2, tq = lane & 3;
    const int taps = p.kernel[0] * p.kernel[1] * p.kernel[2];
    const int tile_x = p.tile_x, tile_y = BM / tile_x, tx_shift = __ffs(tile_x) - 1;
    const int hz = p.kernel[0], hy = tile_y + p.kernel[1] - 1, hx = tile_x + p.kernel[2] - 1;
    const int e = p.pad[2] % PER, rw = (hx + e + PER - 1) / PER, halo_words = hz * hy * rw;
    const int cw0 = blockIdx.x * WG_ROWS, cn0 = blockIdx.y * WG_COLS;
    const int narrow_vox = p.narrow_size[0] * p.narrow_size[1] * p.narrow_size[2];
    const int wide_vox = p.wide_size[0] * p.wide_size[1] * p.wide_size[2];
    const int x_tiles = (p.narrow_size[2] + tile_x - 1) / tile_x, y_tiles = (p.narrow_size[1] + tile_y - 1) / tile_y;
    const int box_begin = blockIdx.z * p.boxes_per_slice, box_end = min(p.boxes, box_begin + p.boxes_per_slice);
    // Rows start at whole storage words (bf16: W even and the maps 4-byte aligned; float: always): every staged word is
    // an aligned word of the map.
    const bool aligned = p.wide_size[2] % PER == 0 && p.narrow_size[2] % PER == 0 && (uintptr_t)p.wide % 4 == 0 &&
                         (uintptr_t)p.narrow % 4 == 0;

    // This thread's halo items (word s of the 8 channel rows of group h), packed in one int: its first staged word
    // (13 bits), its offset (dz, dy, x word) in the halo (2, 5 and 6 bits); -1 past the last.
    int items[WG_ITEMS<T>];
#pragma unroll
    for (int i = 0; i < WG_ITEMS<T>; ++i) {
        const int item = t + THREADS * i, s = item % halo_words, h = item / halo_words;
        items[i] = h < WG_ROWS / WG_GROUP
                       ? (h * WG_GROUP * L::XS + s) | s / (hy * rw) << 13 | s / rw % hy << 15 | s % rw << 20
                       : -1;
    }
    // This thread's narrow word: position o, rows t / (BM / PER) + (THREADS PER / BM) c.
    const int g_word = t % (BM / PER), g_o = PER * g_word, g_y = g_o >> tx_shift, g_x = g_o & (tile_x - 1);
    constexpr int G_ROW_STEP = THREADS * PER / BM;

    // Copies box `box`'s words into stage `slot` (cp.async, or element loads where the rows are not word-aligned).
    auto stage = [&](int box, int slot) {
        unsigned* xs = smem + slot * STAGE;
        unsigned* gs = xs + WG_ROWS * L::XS;
        int b = box;
        const int x0 = b % x_tiles * tile_x;
        b /= x_tiles;
        const int y0 = b % y_tiles * tile_y;
        b /= y_tiles;
        const int z = b % p.narrow_size[0], n = b / p.narrow_size[0];
        const int bz = z - p.pad[0], by = y0 - p.pad[1], bx = x0 - p.pad[2] - e;
#pragma unroll
        for (int i = 0; i < WG_ITEMS<T>; ++i) {
            if (items[i] < 0) break;
            const int word = items[i] & 8191;
            const int sz = bz + (items[i] >> 13 & 3), sy = by + (items[i] >> 15 & 31), sx = bx + PER * (items[i] >> 20);
            const bool in_zy = (unsigned)sz < (unsigned)p.wide_size[0] && (unsigned)sy < (unsigned)p.wide_size[1];
            const int c = cw0 + word / L::XS;
            const T* at =
                p.wide + ((int64_t)n * p.c_wide + c) * wide_vox + (sz * p.wide_size[1] + sy) * p.wide_size[2] + sx;
#pragma unroll
            for (int r = 0; r < WG_GROUP; ++r) {
                const bool row_ok = in_zy && c + r < p.c_wide;
                stage_word(xs + word + r * L::XS, row_ok ? at + (int64_t)r * wide_vox : p.wide, aligned,
                           [&](int k) { return row_ok && (unsigned)(sx + k) < (unsigned)p.wide_size[2]; });
            }
        }
        const int y = y0 + g_y, x = x0 + g_x;
        const bool in_y = y < p.narrow_size[1];
        const T* at = p.narrow + ((int64_t)n * p.c_narrow + cn0) * narrow_vox +
                      (z * p.narrow_size[1] + y) * p.narrow_size[2] + x;
#pragma unroll
        for (int c = t / (BM / PER); c < WG_COLS; c += G_ROW_STEP) {
            const bool row_ok = in_y && cn0 + c < p.c_narrow;
            stage_word(gs + c * L::GS + g_word, row_ok ? at + (int64_t)c * narrow_vox : p.narrow, aligned,
                       [&](int k) { return row_ok && x + k < p.narrow_size[2]; });
        }
    };

    // This warp's taps a = warp + 8 j: the staged word of position 0 shifted by each, and whether the pair straddles.
    int shift[WG_TAPS_PER_WARP];
    bool straddles[WG_TAPS_PER_WARP];
#pragma unroll
    for (int j = 0; j < WG_TAPS_PER_WARP; ++j) {
        const int a = min(warp + 8 * j, taps - 1);
        int q[3];
        split3(a, p.kernel, q);
        shift[j] = (q[0] * hy + q[1]) * rw + (q[2] + e) / PER;
        straddles[j] = (q[2] + e) % PER != 0;
    }
    // The staged word of box position o (o % tile_x a multiple of PER).
    auto word_of = [&](int o) { return (o >> tx_shift) * rw + (o & (tile_x - 1)) / PER; };
    float acc[WG_TAPS_PER_WARP][NI][4] = {};
    // The B fragments of column tiles j and j + 1 in one ldmatrix.x4 (words t and t + 4 of the k-step in row g of
    // each): lane l addresses row l % 8 of matrix l / 8, column 8 (l / 16) + l % 8 of the pair, words 4 ((l / 8) % 2)
    // on.
    static_assert(NI % 2 == 0 && L::GS % 4 == 0, "column tiles in pairs, rows of whole 16 bytes");
    const int g_lane = (8 * (lane >> 4) + (lane & 7)) * L::GS + 4 * ((lane >> 3) & 1);

    if (box_begin < box_end) stage(box_begin, 0);
    mma::cp_async_commit();
    for (int box = box_begin, slot = 0; box < box_end; ++box, slot ^= 1) {
        static_assert(WG_STAGES == 2, "one box in flight while another is computed");
        if (box + 1 < box_end) stage(box + 1, slot ^ 1);
        mma::cp_async_commit();
        mma::cp_async_wait<1>();
        __syncthreads();
        const unsigned* xs = smem + slot * STAGE;
        const unsigned* gs = xs + WG_ROWS * L::XS;
#pragma unroll 2
        for (int k0 = 0; k0 < BM; k0 += KSTEP) {
            unsigned bf[NI / 2][4];
#pragma unroll
            for (int j = 0; j < NI / 2; ++j) {
                mma::ldmatrix_x4<false>(bf[j], gs + g_lane + 16 * L::GS * j + k0 / PER);
#pragma unroll
                for (int h = 0; h < 4; ++h) bf[j][h] = operand_of(bf[j][h], T{});
            }
            const int w_lo = word_of(k0 + PER * tq), w_hi = word_of(k0 + PER * (tq + 4));
#pragma unroll
            for (int j = 0; j < WG_TAPS_PER_WARP; ++j) {
                if (warp + 8 * j >= taps) break;
                const int at[4] = {g * L::XS + w_lo + shift[j], (g + 8) * L::XS + w_lo + shift[j],
                                   g * L::XS + w_hi + shift[j], (g + 8) * L::XS + w_hi + shift[j]};
                unsigned a[4];
#pragma unroll
                for (int h = 0; h < 4; ++h)
                    a[h] = operand_of(straddles[j] ? __byte_perm(xs[at[h]], xs[at[h] + 1], 0x5432) : xs[at[h]], T{});
#pragma unroll
                for (int i = 0; i < NI; ++i)
                    mma::mma_k<T>(acc[j][i], a, bf[i / 2][i % 2 * 2], bf[i / 2][i % 2 * 2 + 1]);
            }
        }
        __syncthreads();
    }

    const int rows = p.c_wide * taps;
    float* out = p.partial + (int64_t)blockIdx.z * p.c_narrow * rows;
#pragma unroll
    for (int j = 0; j < WG_TAPS_PER_WARP; ++j) {
        const int a = warp + 8 * j;
        if (a >= taps) break;
#pragma unroll
        for (int i = 0; i < NI; ++i)
#pragma unroll
            for (int h = 0; h < 4; ++h) {
                const int cw = cw0 + g + 8 * (h >> 1), cn = cn0 + 8 * i + 2 * tq + (h & 1);
                if (cw < p.c_wide && cn < p.c_narrow) out[(int64_t)cn * rows + cw * taps + a] = acc[j][i][h];
            }
    }
}

}  // namespace

// One name per role and math; _n32 for outputs of at most 32 channels, _m256 for the boxes of 256 positions (wide
// tiles only: the narrow tile's 128-position kernel, 120 registers, runs two blocks per SM and measured faster).
extern "C" __global__ void conv_fprop_pack_tf32(const ConvPackParams<float> p) { conv_pack(p); }
extern "C" __global__ void conv_dgrad_pack_tf32(const ConvPackParams<float> p) { conv_pack(p); }
extern "C" __global__ void conv_fprop_pack_bf16(const ConvPackParams<__nv_bfloat16> p) { conv_pack(p); }
extern "C" __global__ void conv_dgrad_pack_bf16(const ConvPackParams<__nv_bfloat16> p) { conv_pack(p); }

// Boxes of 128 and 64 positions ask for two blocks per SM (at most 127 registers, no spills; shared memory lets two in
// where the kernel has at most 9 taps: 76 KB each for the wide tile of 128), boxes of 256 for one (210 registers).
#define CONV_HALO_KERNEL(NAME, POSITIONS, BN, T, ...)                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS, POSITIONS == CONV_HALO_BM_LARGE ? 1 : 2)            \
        NAME(const ConvHaloParams<T> p) {                                                                        \
        conv_halo<POSITIONS, BN, T __VA_OPT__(, ) __VA_ARGS__>(p);                                             \
    }
CONV_HALO_KERNEL(conv_fprop_halo_tf32, CONV_HALO_BM, CONV_HALO_BN, float)  // conv forward
CONV_HALO_KERNEL(conv_fprop_halo_tf32_n32, CONV_HALO_BM, CONV_HALO_BN_NARROW, float)
CONV_HALO_KERNEL(conv_fprop_halo_tf32_m256, CONV_HALO_BM_LARGE, CONV_HALO_BN, float)
CONV_HALO_KERNEL(conv_fprop_halo_tf32_s64, CONV_HALO_BM_STRIDED, CONV_HALO_BN, float)  // source at stride 1, 2, 2
CONV_HALO_KERNEL(conv_fprop_halo_tf32_s64z2, CONV_HALO_BM_STRIDED, CONV_HALO_BN, float, 2)  // 2, 2, 2
CONV_HALO_KERNEL(conv_dgrad_halo_tf32, CONV_HALO_BM, CONV_HALO_BN, float)  // conv input gradient
CONV_HALO_KERNEL(conv_dgrad_halo_tf32_n32, CONV_HALO_BM, CONV_HALO_BN_NARROW, float)
CONV_HALO_KERNEL(conv_dgrad_halo_tf32_m256, CONV_HALO_BM_LARGE, CONV_HALO_BN, float)
CONV_HALO_KERNEL(conv_fprop_halo_bf16, CONV_HALO_BM, CONV_HALO_BN, __nv_bfloat16)  // the same in bf16
CONV_HALO_KERNEL(conv_fprop_halo_bf16_n32, CONV_HALO_BM, CONV_HALO_BN_NARROW, __nv_bfloat16)
CONV_HALO_KERNEL(conv_fprop_halo_bf16_m256, CONV_HALO_BM_LARGE, CONV_HALO_BN, __nv_bfloat16)
CONV_HALO_KERNEL(conv_fprop_halo_bf16_s64, CONV_HALO_BM_STRIDED, CONV_HALO_BN, __nv_bfloat16)
CONV_HALO_KERNEL(conv_fprop_halo_bf16_s64z2, CONV_HALO_BM_STRIDED, CONV_HALO_BN, __nv_bfloat16, 2)
CONV_HALO_KERNEL(conv_dgrad_halo_bf16, CONV_HALO_BM, CONV_HALO_BN, __nv_bfloat16)
CONV_HALO_KERNEL(conv_dgrad_halo_bf16_n32, CONV_HALO_BM, CONV_HALO_BN_NARROW, __nv_bfloat16)
CONV_HALO_KERNEL(conv_dgrad_halo_bf16_m256, CONV_HALO_BM_LARGE, CONV_HALO_BN, __nv_bfloat16)

// The weight gradient of a stride-1 conv (conv.rs's weight_grad of a stride-1 pairing).
extern "C" __global__ void __launch_bounds__(THREADS, 2)
    conv_wgrad_halo_tf32(const ConvWgradHaloParams<float> p) {
    conv_wgrad_halo(p);
}
extern "C" __global__ void __launch_bounds__(THREADS, 2)
    conv_wgrad_halo_bf16(const ConvWgradHaloParams<__nv_bfloat16> p) {
    conv_wgrad_halo(p);
}
