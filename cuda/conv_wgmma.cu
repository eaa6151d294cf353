// Convolution products on Hopper's warpgroup matrix products (wgmma, sm_90a) from a halo tile, bf16 operands with
// float32 accumulation:
//
//   out[n, col, dst_base + dst_step . r] = b[col] + sum_{c, q} src[n, c, r + lo + q] Wp[c, q, col]
//
// (src channels first, or channels last as src[n, r + lo + q, c]: conv_wgmma.cuh),
// the stride-1 products of conv_halo.cu (a stride-1 conv's forward; the input gradient's stride phases of any conv,
// written at every stride-th position) computed by the tensor cores straight from shared memory: conv_halo.cu's
// mma.sync kernels load every operand fragment into registers first, one 32-bit word per lane and tap, and measured
// 10% of the tensor pipe on the 3x3x3 convolutions (ncu, flare-3d stage 1).
// - A block owns a box of box_z slices x 8 (4 / box_z) rows x 8 columns of output positions of one batch item (four
//   tiles of 64 positions: 8 whole rows of 8) and BN output channels. Per stage of CONV_WGMMA_CHUNK = 16 source
//   channels it stages the halo, the box grown by taps - 1 along each axis, as two planes of 16-byte voxels
//   (channels 0-7 and 8-15 of the chunk, bf16): halo[plane][voxel] with voxel = (z h_y + y) h_x + x.
// - Tap q of a tile is then one wgmma m64nBNk16 whose A is the halo shifted by q: row m = 8 i + j of the tile (its
//   row i, column j) is voxel ((z + qz) h_y + y0 + i + qy) h_x + j + qx, so the 8 rows of core matrix i are 8
//   consecutive voxels (128 contiguous bytes: no bank conflict), core matrices 16 h_x bytes apart along m and a
//   plane apart along k: an unswizzled K-major operand whose descriptor is the tile's plus the tap's shift.
// - The weights are packed once per launch by conv_halo.cu's conv_pack_bf16 in two parts, [chunk][tap][half][col][8
//   channels], and a stage's [tap][half][BN] rows of 16 bytes are copied as they are by cp.async (consecutive threads,
//   consecutive 16 bytes on both sides): per tap an unswizzled K-major B of BN rows, core matrices 128 bytes apart
//   along n and 16 BN bytes along k.
// - Two stages, and the pipeline runs on across boxes: a block takes its boxes in turn, and while the tensor cores
//   run the taps of one chunk (asynchronously, one commit per chunk), the next chunk's weights (the next box's first
//   at a box's end) are in flight through cp.async, and its halo too: from a channels-first source (the plain names)
//   through registers (element loads, or in the wide tile of a fixed geometry one 8-byte load per 4 voxels of a
//   channel; stored as 16-byte voxels), from a channels-last copy (the _cl names; layout.cu's pim_partition makes it)
//   as two 16-byte cp.async pieces per voxel. Both are published to the tensor cores by
//   fence.proxy.async before the barrier. A box's outputs are written after its last chunk's products, while the
//   loads of the next one are in flight.
// - Warpgroup g of the two computes tiles 2 g and 2 g + 1 (the accumulators of both: BN floats per thread); the
//   narrow tile (BN 32) fits 128 registers and runs two blocks per SM.
// - ncu of the persistent version before the packing in halves (flare-3d stage 1, 3x3x3 64 -> 64, benches/RESULTS.md):
//   tensor pipe 24%, issue-limited by the halo's element loads (long_scoreboard the top stall; 9.4 of each 32-byte
//   sector used: from NCDHW maps a voxel's 16 channels are 16 loads; four voxels per 8-byte load in the fixed
//   geometries, 2026-12-04, were slightly faster: flare-3d input gradients 22.77 -> 21.99 ms per step). The
//   channels-last copy makes them 16-byte copies without registers (3x3x3 wide tile 252 -> 187 registers) at the
//   price of one more read and write of the source: it pays where each source voxel meets many products (taps x
//   output channels, conv.rs `wgmma_channels_last`; H100, 2026-12-06: flare-3d 128 -> 128 at 20x56x48 forward
//   0.309 -> 0.274 ms), not on the full-resolution maps of few channels (32 -> 32 1x3x3 at 40x224x192 0.571 -> 0.915).
// - The 3x3x3 and 1x3x3 kernels are also compiled for their own geometry (KZ, BOX_Z: the _k333_z4 names): every
//   shared-memory offset is then a constant and a wgmma's descriptor one uniform add from its stage's; computed at run
//   time, about 18 instructions per tap pair sat between the wgmmas in the SASS.
// - The weight gradient (conv_wgrad_wgmma, below) turns the product around: positions are the reduction.
// Each output is one sum in a fixed order (chunks, taps, and the tensor core's own within a k-step): results do not
// depend on scheduling.
//
// Cost: 2 c_src prod(taps) FLOPs per output element; bytes about the source once per column tile (plus the halo's
// rim), the packed weight once per block, the output once.
#include "common.cuh"
#include "conv_halo.cuh"
#include "conv_wgmma.cuh"
#include "mma.cuh"
#include "wgmma.cuh"

namespace {

constexpr int THREADS = CONV_WGMMA_THREADS, TILES = CONV_WGMMA_TILES, TILE_X = CONV_WGMMA_TILE_X;
constexpr int TILES_PER_GROUP = TILES / (THREADS / 128);
static_assert(THREADS == 256 && TILES == 4 && TILE_X == 8 && CONV_WGMMA_CHUNK == 16,
              "two warpgroups of two 64-position tiles, one k-step of 16 bf16 channels per tap");
constexpr int HALO_VOX = (CONV_WGMMA_MAX_HALO + THREADS - 1) / THREADS;

using bf16 = __nv_bfloat16;

// The boxes of box_z x box_y x TILE_X positions over a map of `rows` per batch item, numbered x fastest, then y, z and
// the batch item: box b's batch item n and first position (z0, y0, x0).
struct BoxGrid {
    int x_tiles, y_tiles, z_tiles, box_y, box_z;
    __device__ __forceinline__ BoxGrid(const int (&rows)[3], int box_z, int box_y)
        : x_tiles((rows[2] + TILE_X - 1) / TILE_X),
          y_tiles((rows[1] + box_y - 1) / box_y),
          z_tiles((rows[0] + box_z - 1) / box_z),
          box_y(box_y),
          box_z(box_z) {}
    __device__ __forceinline__ void origin(int b, int& n, int& z0, int& y0, int& x0) const {
        x0 = b % x_tiles * TILE_X;
        b /= x_tiles;
        y0 = b % y_tiles * box_y;
        b /= y_tiles;
        z0 = b % z_tiles * box_z;
        n = b / z_tiles;
    }
};

// Queues the cp.async of halo voxel v's two 16-byte pieces (channels c0 .. c0 + 7 and c0 + 8 .. c0 + 15 of a
// channels-last source of c_pad channels per voxel, src_voxel its first channel, or null outside the map) into planes
// 0 and 1 of the halo; a piece outside the map or past c_pad is zero-filled.
__device__ __forceinline__ void stage_voxel(uint4* halo, int halo_vox, int v, const bf16* src_voxel, int c0,
                                            int c_pad, const bf16* any) {
#pragma unroll
    for (int plane = 0; plane < 2; ++plane) {
        const int c = c0 + 8 * plane;
        const bool ok = src_voxel != nullptr && c < c_pad;
        mma::cp_async16(reinterpret_cast<bf16*>(halo + plane * halo_vox + v), ok ? src_voxel + c : any, ok ? 8 : 0);
    }
}

// Voxel k (0-3) of a quad load of 8 channels (q[e]: 4 consecutive voxels of channel e) as one 16-byte unit: channel
// pairs (2 j, 2 j + 1) as operand words, the even channel in the low half.
__device__ __forceinline__ uint4 quad_voxel(const uint2 (&q)[8], int k) {
    unsigned w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const unsigned lo = k < 2 ? q[2 * j].x : q[2 * j].y, hi = k < 2 ? q[2 * j + 1].x : q[2 * j + 1].y;
        w[j] = __byte_perm(lo, hi, k % 2 ? 0x7632 : 0x5410);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// Stores this thread's quad items into the halo's two planes of halo_vox 16-byte voxels (rows of hx = 10 voxels,
// from x0 - 1): item it = t + THREADS i is (plane it / (4 rows), halo row it / 4 % rows, quad it % 4), 4 voxels from
// x0 - 4 + 4 quad, of which those in columns 0 .. hx - 1 are kept.
template <int N>
__device__ __forceinline__ void store_quads(uint4* halo, const uint2 (&quads)[N][8], int rows, int halo_vox, int hx) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const int it = threadIdx.x + THREADS * i, quad = it % 4, row = it / 4 % rows, plane = it / (4 * rows);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int column = 4 * quad - 3 + k;
            if (it >= 8 * rows || column < 0 || column >= hx) continue;
            halo[plane * halo_vox + row * hx + column] = quad_voxel(quads[i], k);
        }
    }
}

// The weight gradient of a KZ x 3 x 3 kernel: its wide channels per block (the n of its wgmmas) and the taps per
// warpgroup, the two warpgroups' sets overlapping by one tap (3x3x3: 14 + 14 for 27; 1x3x3: 5 + 5 for 9) rather than
// leave one warpgroup a tap short.
template <int KZ>
constexpr int WGRAD_COLS = KZ == 3 ? CONV_WGMMA_WG_COLS_K3 : CONV_WGMMA_WG_COLS_K1;
template <int KZ>
constexpr int WGRAD_TAPS_PER_GROUP = (KZ * 9 + 1) / 2;

// An int as a type, to pass a warpgroup's first tap to the products as a constant.
template <int V>
struct Int {
    static constexpr int value = V;
};

// KZ 0: any taps (at most 3 per axis) and box depth, read from p; KZ 1 or 3: a KZ x 3 x 3 kernel in boxes of BOX_Z
// slices, the kernel's own geometry (p.taps and p.box_z ignored), so that every shared-memory offset of the products
// is a constant and a wgmma's descriptors one uniform add from its stage's (computed at run time they took about 18
// instructions per tap pair). CL: the source is channels last (c_pad channels per voxel), its halo staged by cp.async.
template <bool CL, int BN, int KZ, int BOX_Z>
__device__ __forceinline__ void conv_wgmma(const ConvWgmmaParams<bf16>& p) {
    extern __shared__ __align__(16) uint4 smem[];  // 16-byte units
    const int t = threadIdx.x, group = t >> 7, warp = (t >> 5) & 3, g = (t & 31) >> 2, tq = t & 3;

    static_assert(KZ == 0 || ((KZ == 1 || KZ == 3) && (BOX_Z == 1 || BOX_Z == 2 || BOX_Z == 4)), "a geometry");
    const int kz = KZ ? KZ : p.taps[0], ky = KZ ? 3 : p.taps[1], kx = KZ ? 3 : p.taps[2];
    const int taps = kz * ky * kx;
    const int box_z = KZ ? BOX_Z : p.box_z, box_y = 8 * (TILES / box_z);
    const int hz = box_z + kz - 1, hy = box_y + ky - 1, hx = TILE_X + kx - 1;
    const int halo_vox = hz * hy * hx;
    // Stage b (16-byte units): halo planes [2][halo_vox], then the weights [taps][2][BN].
    const int stage_units = 2 * halo_vox + 2 * taps * BN;
    const int col0 = blockIdx.y * BN;
    const int src_vox = p.src_size[0] * p.src_size[1] * p.src_size[2];

    const BoxGrid grid(p.rows, box_z, box_y);
    // This block's work: items (box, chunk) in order, box blockIdx.x + i gridDim.x.
    const int chunks = (p.c_src + CONV_WGMMA_CHUNK - 1) / CONV_WGMMA_CHUNK;
    const int items = (p.boxes - blockIdx.x + gridDim.x - 1) / gridDim.x * chunks;
    auto box_of = [&](int item) { return blockIdx.x + item / chunks * gridDim.x; };

    // The halo voxels this thread stages for the box being loaded, v = t + THREADS i: their source offsets, -1
    // outside the map or past the halo. The wide tile of a fixed geometry stages quads instead (QUADS): item (plane,
    // row, quad) of the halo, 4 consecutive voxels x0 - 4 + 4 quad .. of 8 channels by one 8-byte load per channel
    // (the source's rows whole 8-byte words, lo = -1 along y and x: checked by the launch), kept where the halo holds
    // them (columns x0 - 1 .. x0 + 8). The narrow tile keeps the element loads: at its 128 registers the quads spilled.
    constexpr bool QUADS = !CL && KZ != 0 && BN == CONV_WGMMA_BN;
    constexpr int Q_ROWS = QUADS ? (BOX_Z + KZ - 1) * (8 * (TILES / (QUADS ? BOX_Z : 1)) + 2) : 1;
    constexpr int Q_ITEMS = 2 * Q_ROWS * 4, QI = QUADS ? (Q_ITEMS + THREADS - 1) / THREADS : 1;
    const int c_pad = CL ? (p.c_src + 7) & ~7 : p.c_src;  // channels per voxel (CL) or per map
    const bf16* src_n = p.src;
    int off[QUADS ? QI : HALO_VOX];
    auto start_box = [&](int b) {
        int n, z0, y0, x0;
        grid.origin(b, n, z0, y0, x0);
        src_n = p.src + (int64_t)n * c_pad * src_vox;
        if constexpr (QUADS) {
#pragma unroll
            for (int i = 0; i < QI; ++i) {
                const int it = t + THREADS * i, quad = it % 4, row = it / 4 % Q_ROWS;
                const int sz = z0 + p.lo[0] + row / hy, sy = y0 - 1 + row % hy, sx = x0 - 4 + 4 * quad;
                // sx and the map's width are multiples of 4: a quad is inside or outside as a whole.
                const bool inside = (unsigned)sz < (unsigned)p.src_size[0] &&
                                    (unsigned)sy < (unsigned)p.src_size[1] && (unsigned)sx < (unsigned)p.src_size[2];
                off[i] = it < Q_ITEMS && inside ? (sz * p.src_size[1] + sy) * p.src_size[2] + sx : -1;
            }
            return;
        }
#pragma unroll
        for (int i = 0; i < HALO_VOX; ++i) {
            const int v = t + i * THREADS;
            const int sz = z0 + p.lo[0] + v / (hy * hx), sy = y0 + p.lo[1] + v / hx % hy, sx = x0 + p.lo[2] + v % hx;
            const bool inside = (unsigned)sz < (unsigned)p.src_size[0] && (unsigned)sy < (unsigned)p.src_size[1] &&
                                (unsigned)sx < (unsigned)p.src_size[2];
            off[i] = v < halo_vox && inside ? ((sz * p.src_size[1] + sy) * p.src_size[2] + sx) * (CL ? c_pad : 1) : -1;
        }
    };
    // Channel pairs (c, c + 1) as operand words, the even channel in the low half: words 0-3 are plane 0's voxel.
    unsigned staged[QUADS || CL ? 1 : HALO_VOX][8];
    uint2 quads[QI][QUADS ? 8 : 1];
    auto store_halo = [&](int buf) {
        uint4* halo = smem + buf * stage_units;
        if constexpr (CL) return;  // staged by cp.async in `load`
        if constexpr (QUADS) {
            store_quads(halo, quads, Q_ROWS, halo_vox, hx);
            return;
        }
#pragma unroll
        for (int i = 0; i < HALO_VOX; ++i) {
            const int v = t + i * THREADS;
            if (v < halo_vox) {
                halo[v] = make_uint4(staged[i][0], staged[i][1], staged[i][2], staged[i][3]);
                halo[halo_vox + v] = make_uint4(staged[i][4], staged[i][5], staged[i][6], staged[i][7]);
            }
        }
    };
    // Item `item` into stage buf: its weights by cp.async, its halo by cp.async too (CL, one commit) or into `staged`
    // (stored by store_halo).
    auto load = [&](int item, int buf) {
        const int chunk = item % chunks;
        if (chunk == 0) start_box(box_of(item));
        // Row (q, half, col) of 8 channels: packed in that order (conv_pack's two parts), staged so.
        uint4* weights = smem + buf * stage_units + 2 * halo_vox;
        const bf16* from = p.packed + ((int64_t)chunk * taps * 2 * p.c_dst_pad + col0) * 8;
        for (int u = t; u < 2 * taps * BN; u += THREADS) {
            const int row = u / BN, col = u - row * BN;
            mma::cp_async16(reinterpret_cast<bf16*>(weights + u), from + ((int64_t)row * p.c_dst_pad + col) * 8, 8);
        }
        const int c0 = chunk * CONV_WGMMA_CHUNK;
        if constexpr (CL) {
#pragma unroll
            for (int i = 0; i < HALO_VOX; ++i) {
                const int v = t + i * THREADS;
                if (v < halo_vox)
                    stage_voxel(smem + buf * stage_units, halo_vox, v, off[i] >= 0 ? src_n + off[i] : nullptr, c0,
                                c_pad, p.src);
            }
        }
        mma::cp_async_commit();
        if constexpr (CL) return;
        // Element indices within the batch item fit 32 bits (c_src * src_vox: checked by the launch).
        const unsigned short* src_c = reinterpret_cast<const unsigned short*>(src_n) + c0 * src_vox;
        if constexpr (QUADS) {
#pragma unroll
            for (int i = 0; i < QI; ++i) {
                const int plane = (t + THREADS * i) / (4 * Q_ROWS);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const int c = 8 * plane + e;
                    quads[i][e] = off[i] >= 0 && c0 + c < p.c_src
                                      ? *reinterpret_cast<const uint2*>(src_c + c * src_vox + off[i])
                                      : make_uint2(0u, 0u);
                }
            }
            return;
        }
#pragma unroll
        for (int i = 0; i < HALO_VOX; ++i)
#pragma unroll
            for (int w = 0; w < 8; ++w) {
                const bool ok = off[i] >= 0;
                const unsigned lo = ok && c0 + 2 * w < p.c_src ? src_c[2 * w * src_vox + off[i]] : 0u;
                const unsigned hi = ok && c0 + 2 * w + 1 < p.c_src ? src_c[(2 * w + 1) * src_vox + off[i]] : 0u;
                staged[i][w] = lo | hi << 16;
            }
    };

    // The descriptors of stage 0: this warpgroup's tiles at tap 0 (tile j: slice j / tiles_per_slice, rows 8 (j %
    // tiles_per_slice) ..) and the weights of tap 0; stage 1's are one stage further, a tap's a shift further.
    const uint32_t base = (uint32_t)__cvta_generic_to_shared(smem);
    const int tiles_per_slice = TILES / box_z;
    uint64_t a_desc[TILES_PER_GROUP];
#pragma unroll
    for (int j = 0; j < TILES_PER_GROUP; ++j) {
        const int tile = TILES_PER_GROUP * group + j;
        const int voxel = (tile / tiles_per_slice * hy + 8 * (tile % tiles_per_slice)) * hx;
        a_desc[j] = wgmma::descriptor(base + 16 * voxel, 16 * halo_vox, 16 * hx);
    }
    const uint64_t b_desc = wgmma::descriptor(base + 16 * 2 * halo_vox, 16 * BN, 128);
    const uint64_t stage_step = (uint64_t)stage_units;  // in the descriptors' 16-byte units
    const uint64_t tap_b_step = 2 * BN;

    float acc[TILES_PER_GROUP][BN / 2] = {};
    // Writes box b's outputs: thread (warp w, lane 4 g + tq) holds rows 16 w + g + 8 h of each tile, that is row
    // 2 w + h of the tile's 8 and column g.
    const int dst_vox = p.dst_size[0] * p.dst_size[1] * p.dst_size[2];
    auto write = [&](int b) {
        int n, z0, y0, x0;
        grid.origin(b, n, z0, y0, x0);
        const int64_t dst_n = (int64_t)n * p.c_dst * dst_vox + p.dst_base;
#pragma unroll
        for (int j = 0; j < TILES_PER_GROUP; ++j) {
            const int tile = TILES_PER_GROUP * group + j;
            const int z = z0 + tile / tiles_per_slice, x = x0 + g;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int y = y0 + 8 * (tile % tiles_per_slice) + 2 * warp + h;
                if (z >= p.rows[0] || y >= p.rows[1] || x >= p.rows[2]) continue;
                const int64_t out =
                    dst_n + (int64_t)z * p.dst_step[0] + (int64_t)y * p.dst_step[1] + x * p.dst_step[2];
#pragma unroll
                for (int k = 0; k < BN / 8; ++k)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int col = col0 + 8 * k + 2 * tq + e;
                        if (col < p.c_dst)
                            p.dst[out + (int64_t)col * dst_vox] = __float2bfloat16(
                                acc[j][4 * k + 2 * h + e] + (p.bias ? __bfloat162float(p.bias[col]) : 0.0f));
                    }
            }
        }
    };

    load(0, 0);
    store_halo(0);
    mma::cp_async_wait<0>();
    wgmma::fence_proxy_async();
    __syncthreads();
    const int my_boxes = items / chunks;
    for (int i = 0; i < my_boxes; ++i) {
        for (int chunk = 0; chunk < chunks; ++chunk) {
            const int item = i * chunks + chunk, buf = item & 1;
            wgmma::fence();
            if constexpr (KZ != 0) {
#pragma unroll
                for (int q = 0; q < KZ * 9; ++q) {
                    const uint64_t shift = buf * stage_step + (uint64_t)((q / 9 * hy + q / 3 % 3) * hx + q % 3);
                    const uint64_t b = b_desc + buf * stage_step + q * tap_b_step;
#pragma unroll
                    for (int j = 0; j < TILES_PER_GROUP; ++j)
                        wgmma::mma_async<BN>(acc[j], a_desc[j] + shift, b, true);
                }
            } else {
                int qz = 0, qy = 0, qx = 0;
                for (int q = 0; q < taps; ++q) {
                    const uint64_t shift = buf * stage_step + (uint64_t)((qz * hy + qy) * hx + qx);
                    const uint64_t b = b_desc + buf * stage_step + q * tap_b_step;
#pragma unroll
                    for (int j = 0; j < TILES_PER_GROUP; ++j)
                        wgmma::mma_async<BN>(acc[j], a_desc[j] + shift, b, true);
                    if (++qx == kx) {
                        qx = 0;
                        if (++qy == ky) {
                            qy = 0;
                            ++qz;
                        }
                    }
                }
            }
            wgmma::commit();
            if (item + 1 < items) {
                load(item + 1, buf ^ 1);
                store_halo(buf ^ 1);
            }
            wgmma::wait<0>();
            mma::cp_async_wait<0>();
            wgmma::fence_proxy_async();
            __syncthreads();
        }
        write(box_of(i * chunks));
#pragma unroll
        for (int j = 0; j < TILES_PER_GROUP; ++j)
#pragma unroll
            for (int k = 0; k < BN / 2; ++k) acc[j][k] = 0.0f;
    }
}

// dW[cn, cw, a] = sum_{n, o} narrow[n, cn, o] wide[n, cw, o + a - pad] over the block's boxes (formula in
// conv_wgmma.cuh): per box of 256 narrow positions, 16 k-steps of 16 positions (two rows of 8), and per k-step and
// tap one wgmma m64nCOLSk16: A = the narrow box (m = cn, k = position) in registers, loaded once per k-step by
// ldmatrix from its staged rows and used by every tap of the warpgroup; B = the wide map's halo shifted by the tap (n =
// cw, k = position), staged as in the products (COLS / 8 planes of 16-byte voxels of 8 channels, loaded 4 voxels of a
// channel per 8-byte load, 16 channels at a time) and read N-major: the 8 k-rows of a core matrix are 8 consecutive
// voxels, core matrices 16 h_x bytes apart along k (the next row) and a plane apart along n. While the tensor cores
// work on box i's first k-steps, box i + 1's narrow rows are put in flight through cp.async and its halo loaded and
// stored. Each output is one sum in a fixed order (boxes, k-steps, the tensor core's own within a k-step).
// COLS: 32 for the 1x3x3 kernel (m64n32k16, 80 accumulators per thread), 16 for the 3x3x3 one (m64n16k16, 14 x 8).
// An m64n16k16 from registers takes 13 of the tensor cores' clocks where its multiply-adds need 8, an m64n32k16 16
// (tools/wgmma_rate.cu, H100, 2026-12-07), so the wider tile issues half the wgmmas and ldmatrix for the same work;
// for 3x3x3 it needs two blocks per column tile (7 taps per warpgroup, the halo loaded twice), and that measured
// slower where the maps are large (H100, 2026-12-07: 64 -> 64 at 40x112x96 0.832 -> 0.884 ms, 128 -> 64 1.363 ->
// 1.445; 256 -> 256 at 10x28x24 0.439 -> 0.409), while the 1x3x3 and 2D 3x3 gradients gained (flare-3d 64 -> 32
// at 40x224x192 1.451 -> 1.197, amos-2d 256 -> 256 at 40x40 0.292 -> 0.261, 256 -> 128 at 80x80 0.455 -> 0.316;
// lost only at 64 channels on 160x160, 0.229 -> 0.249).
// Measured before (m64n16, H200, 2026-12-04, flare-3d stage 1's 64 -> 64 at 40x112x96): 0.809 ms, 235 TFLOP/s (cuDNN
// 0.630 in the same run); ncu of the version with 2-byte halo loads: long_scoreboard, wait and lg_throttle (the load
// queue) the top stalls; on stage 3 (256 -> 256 at 10x28x24) lg_throttle alone 34%.
template <int KZ, int BOX_Z>
__device__ __forceinline__ void conv_wgrad_wgmma(const ConvWgradWgmmaParams<bf16>& p) {
    constexpr int ROWS = CONV_WGMMA_WG_ROWS, COLS = WGRAD_COLS<KZ>, PITCH = CONV_WGMMA_WG_PITCH;
    constexpr int PLANES = COLS / 8, PASSES = COLS / 16;
    constexpr int BOX = TILES * 64, KSTEPS = BOX / 16, BOX_ROWS = BOX / TILE_X;
    static_assert(ROWS == 64 && (COLS == 16 || COLS == 32) && PITCH >= BOX_ROWS && PITCH % 8 == 1,
                  "one m64nCOLS wgmma per tap and k-step; staged rows in 8 bank groups");
    // The geometry is the kernel's own (KZ x 3 x 3 taps, boxes of BOX_Z slices): every shared-memory offset of the
    // products below is a constant, so a wgmma's descriptor is one uniform add from its stage's (computed at run time
    // they took about 25 instructions per wgmma, and the tensor cores waited on them).
    constexpr int TAPS_ALL = KZ * 9, TAPS = WGRAD_TAPS_PER_GROUP<KZ>;
    static_assert((KZ == 1 || KZ == 3) && TAPS <= TAPS_ALL && TAPS_ALL <= 2 * TAPS, "two warpgroups cover the taps");
    constexpr int box_z = BOX_Z, box_y = BOX_ROWS / box_z;
    constexpr int hz = box_z + KZ - 1, hy = box_y + 2, hx = TILE_X + 2;
    constexpr int halo_vox = hz * hy * hx;
    static_assert(halo_vox <= CONV_WGMMA_MAX_HALO && box_y % 2 == 0,
                  "the halo fits; a k-step's two rows share a slice");
    // Stage b (16-byte units): halo planes [PLANES][halo_vox], then the narrow rows [ROWS][PITCH].
    constexpr int stage_units = PLANES * halo_vox + ROWS * PITCH;
    extern __shared__ __align__(16) uint4 smem[];
    const int t = threadIdx.x, group = t >> 7, lane = t & 31, warp = (t >> 5) & 3, g = lane >> 2, tq = lane & 3;
    const int taps = TAPS_ALL;
    const int cn0 = blockIdx.x * ROWS, cw0 = blockIdx.y * COLS;
    const int narrow_vox = p.narrow_size[0] * p.narrow_size[1] * p.narrow_size[2];
    const int wide_vox = p.wide_size[0] * p.wide_size[1] * p.wide_size[2];
    const BoxGrid grid(p.narrow_size, box_z, box_y);
    const int box_begin = blockIdx.z * p.boxes_per_slice, box_end = min(p.boxes, box_begin + p.boxes_per_slice);
    // Narrow rows of 8 positions start at 16-byte boundaries where the rows are whole multiples of 8 positions.
    const bool aligned = p.narrow_size[2] % TILE_X == 0 && (uintptr_t)p.narrow % 16 == 0;

    // Box b into stage buf: the narrow rows (u = (cn, box row), 8 positions each) by cp.async or element loads, zero
    // outside the map or past c_narrow; the halo, 0 outside the wide map.
    constexpr int hz_hy = hz * hy, halo_items = 2 * hz_hy * 4, HALO_ITEMS = (halo_items + THREADS - 1) / THREADS;
    auto load = [&](int b, int buf) {
        int n, z0, y0, x0;
        grid.origin(b, n, z0, y0, x0);
        uint4* rows = smem + buf * stage_units + PLANES * halo_vox;
        const unsigned short* narrow_n = reinterpret_cast<const unsigned short*>(p.narrow) +
                                         ((int64_t)n * p.c_narrow + cn0) * narrow_vox;
        for (int u = t; u < ROWS * BOX_ROWS; u += THREADS) {
            const int cn = u / BOX_ROWS, r = u % BOX_ROWS, z = z0 + r / box_y, y = y0 + r % box_y;
            const bool ok = cn0 + cn < p.c_narrow && z < p.narrow_size[0] && y < p.narrow_size[1];
            const int at = cn * narrow_vox + (z * p.narrow_size[1] + y) * p.narrow_size[2] + x0;
            if (aligned) {
                mma::cp_async16(reinterpret_cast<unsigned short*>(rows + cn * PITCH + r), narrow_n + (ok ? at : 0),
                                ok ? 8 : 0);
            } else {
                unsigned w[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const bool lo = ok && x0 + 2 * e < p.narrow_size[2], hi = ok && x0 + 2 * e + 1 < p.narrow_size[2];
                    w[e] = (lo ? narrow_n[at + 2 * e] : 0u) | (hi ? narrow_n[at + 2 * e + 1] : 0u) << 16;
                }
                rows[cn * PITCH + r] = make_uint4(w[0], w[1], w[2], w[3]);
            }
        }
        mma::cp_async_commit();
        // The halo, 16 channels (two planes) per pass: item (plane, row, quad) loads 4 consecutive voxels x0 - 4 +
        // 4 quad .. of 8 channels with one 8-byte load per channel (a 2-byte load per voxel and channel kept the load
        // queue full: ncu, lg_throttle the top stall), then stores the voxels the halo holds (columns x0 - 1 .. x0 +
        // 8) as 16-byte units.
        const unsigned short* wide_c = reinterpret_cast<const unsigned short*>(p.wide) +
                                       ((int64_t)n * p.c_wide + cw0) * wide_vox;
#pragma unroll
        for (int pass = 0; pass < PASSES; ++pass) {
            uint2 quads[HALO_ITEMS][8];
#pragma unroll
            for (int i = 0; i < HALO_ITEMS; ++i) {
                const int it = t + THREADS * i, quad = it % 4, row = it / 4 % hz_hy, plane = it / (4 * hz_hy);
                const int sz = z0 - p.pad[0] + row / hy, sy = y0 - 1 + row % hy, sx = x0 - 4 + 4 * quad;
                // sx and the map's width are multiples of 4: a quad is inside or outside as a whole.
                const bool inside = it < halo_items && (unsigned)sz < (unsigned)p.wide_size[0] &&
                                    (unsigned)sy < (unsigned)p.wide_size[1] && (unsigned)sx < (unsigned)p.wide_size[2];
                const int off = (sz * p.wide_size[1] + sy) * p.wide_size[2] + sx;
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const int c = 16 * pass + 8 * plane + e;
                    quads[i][e] = inside && cw0 + c < p.c_wide
                                      ? *reinterpret_cast<const uint2*>(wide_c + (int64_t)c * wide_vox + off)
                                      : make_uint2(0u, 0u);
                }
            }
            store_quads(smem + buf * stage_units + 2 * pass * halo_vox, quads, hz_hy, halo_vox, hx);
        }
    };

    const uint32_t base = (uint32_t)__cvta_generic_to_shared(smem);
    // B of stage 0 at tap (0, 0, 0) and k-step 0; a stage, a row and a tap shift it by whole 16-byte units.
    const uint64_t b_desc = wgmma::descriptor(base, 16 * hx, 16 * halo_vox);
    // The ldmatrix row of this lane at k-step 0: row l % 8 of matrix l / 8, matrices (cn 0-7, k 0-7), (cn 8-15, k
    // 0-7), (cn 0-7, k 8-15), (cn 8-15, k 8-15) of the warp's 16 channels, the fragment's order.
    const uint32_t a_row = base + 16 * (PLANES * halo_vox + (16 * warp + (lane & 7) + 8 * ((lane >> 3) & 1)) * PITCH +
                                        (lane >> 4));
    // The products of one staged box for taps T0 .. T0 + TAPS - 1, in batches of CH k-steps (k-step ks: box rows
    // 2 ks, 2 ks + 1): a batch's A fragments by ldmatrix into the registers the batch before last read, one fence,
    // then per k-step one wgmma per tap. `between` runs while the first batch is in flight: the next box's loads, its
    // halo stored before the second batch's fence (a fence waits for every register write in flight, the loads' too).
    // CH is 4: two batches' fragments beside 80 or 112 accumulators (at 8, 3x3x3's wgmmas were serialised by ptxas
    // for want of registers).
    float acc[TAPS][COLS / 2] = {};
    auto products = [&](int buf, auto first_tap, auto between) {
        constexpr int T0 = decltype(first_tap)::value, CH = 4;
        static_assert(KSTEPS % CH == 0, "whole batches");
        unsigned a[2][CH][4];
        const uint32_t a_stage = a_row + 16 * buf * stage_units;
        const uint64_t b_stage = b_desc + buf * stage_units;
#pragma unroll
        for (int c = 0; c < KSTEPS / CH; ++c) {
#pragma unroll
            for (int i = 0; i < CH; ++i)
                asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                             : "=r"(a[c & 1][i][0]), "=r"(a[c & 1][i][1]), "=r"(a[c & 1][i][2]), "=r"(a[c & 1][i][3])
                             : "r"(a_stage + 16 * 2 * (CH * c + i)));
            wgmma::fence();
#pragma unroll
            for (int i = 0; i < CH; ++i) {
                const int r = 2 * (CH * c + i);
#pragma unroll
                for (int j = 0; j < TAPS; ++j) {
                    const int q = T0 + j, qz = q / 9, qy = q / 3 % 3, qx = q % 3;
                    const int shift = ((r / box_y + qz) * hy + r % box_y + qy) * hx + qx;
                    wgmma::mma_async_regs<COLS>(acc[j], a[c & 1][i], b_stage + (uint64_t)shift);
                }
            }
            wgmma::commit();
            if (c == 0) between();
            // The batch before this one has completed: its A registers may be loaded again.
            wgmma::wait<1>();
        }
    };

    if (box_begin < box_end) load(box_begin, 0);
    mma::cp_async_wait<0>();
    wgmma::fence_proxy_async();
    __syncthreads();
    for (int b = box_begin, buf = 0; b < box_end; ++b, buf ^= 1) {
        const bool more = b + 1 < box_end;
        auto next = [&] {
            if (more) load(b + 1, buf ^ 1);
        };
        if (group == 0)
            products(buf, Int<0>{}, next);
        else
            products(buf, Int<TAPS_ALL - TAPS>{}, next);
        wgmma::wait<0>();
        mma::cp_async_wait<0>();
        wgmma::fence_proxy_async();
        __syncthreads();
    }

    // Thread (warp w, lane 4 g + tq) holds D[cn 16 w + g + 8 h][cw 8 k + 2 tq + e] of each of its taps.
    const int rows_out = p.c_wide * taps;
    float* out = p.partial + (int64_t)blockIdx.z * p.c_narrow * rows_out;
#pragma unroll
    for (int j = 0; j < TAPS; ++j) {
        const int q = (group == 0 ? 0 : TAPS_ALL - TAPS) + j;
        if (group == 1 && q < TAPS) continue;  // warpgroup 0's
#pragma unroll
        for (int k = 0; k < COLS / 8; ++k)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int cn = cn0 + 16 * warp + g + 8 * h, cw = cw0 + 8 * k + 2 * tq + e;
                    if (cn < p.c_narrow && cw < p.c_wide)
                        out[(int64_t)cn * rows_out + cw * taps + q] = acc[j][4 * k + 2 * h + e];
                }
    }
}

}  // namespace

// The narrow tile asks for two blocks per SM (at most 128 registers), the wide one gets one. Per role and tile the
// generic kernel and the fixed geometries (_k333_z4: a 3x3x3 kernel in boxes of 4 slices, ...), each from a
// channels-first source and (_cl) from a channels-last copy.
#define CONV_WGMMA_KERNEL(NAME, CL, BN, KZ, BOX_Z)                                                                \
    extern "C" __global__ void __launch_bounds__(THREADS, BN == CONV_WGMMA_BN_NARROW ? 2 : 1)                    \
        NAME(const ConvWgmmaParams<bf16> p) {                                                                     \
        conv_wgmma<CL, BN, KZ, BOX_Z>(p);                                                                         \
    }
CONV_WGMMA_KERNEL(conv_fprop_wgmma_bf16, false, CONV_WGMMA_BN, 0, 0)  // conv forward
CONV_WGMMA_KERNEL(conv_fprop_wgmma_bf16_k333_z4, false, CONV_WGMMA_BN, 3, 4)
CONV_WGMMA_KERNEL(conv_fprop_wgmma_bf16_k333_z2, false, CONV_WGMMA_BN, 3, 2)
CONV_WGMMA_KERNEL(conv_fprop_wgmma_bf16_k133_z4, false, CONV_WGMMA_BN, 1, 4)
CONV_WGMMA_KERNEL(conv_fprop_wgmma_bf16_k133_z2, false, CONV_WGMMA_BN, 1, 2)
CONV_WGMMA_KERNEL(conv_fprop_wgmma_bf16_k133_z1, false, CONV_WGMMA_BN, 1, 1)
CONV_WGMMA_KERNEL(conv_fprop_wgmma_bf16_n32, false, CONV_WGMMA_BN_NARROW, 0, 0)
CONV_WGMMA_KERNEL(conv_fprop_wgmma_bf16_n32_k333_z4, false, CONV_WGMMA_BN_NARROW, 3, 4)
CONV_WGMMA_KERNEL(conv_fprop_wgmma_bf16_n32_k333_z2, false, CONV_WGMMA_BN_NARROW, 3, 2)
CONV_WGMMA_KERNEL(conv_fprop_wgmma_bf16_n32_k133_z4, false, CONV_WGMMA_BN_NARROW, 1, 4)
CONV_WGMMA_KERNEL(conv_fprop_wgmma_bf16_n32_k133_z2, false, CONV_WGMMA_BN_NARROW, 1, 2)
CONV_WGMMA_KERNEL(conv_fprop_wgmma_bf16_n32_k133_z1, false, CONV_WGMMA_BN_NARROW, 1, 1)
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_bf16, false, CONV_WGMMA_BN, 0, 0)  // conv input gradient
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_bf16_k333_z4, false, CONV_WGMMA_BN, 3, 4)
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_bf16_k333_z2, false, CONV_WGMMA_BN, 3, 2)
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_bf16_k133_z4, false, CONV_WGMMA_BN, 1, 4)
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_bf16_k133_z2, false, CONV_WGMMA_BN, 1, 2)
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_bf16_k133_z1, false, CONV_WGMMA_BN, 1, 1)
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_bf16_n32, false, CONV_WGMMA_BN_NARROW, 0, 0)
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_bf16_n32_k333_z4, false, CONV_WGMMA_BN_NARROW, 3, 4)
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_bf16_n32_k333_z2, false, CONV_WGMMA_BN_NARROW, 3, 2)
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_bf16_n32_k133_z4, false, CONV_WGMMA_BN_NARROW, 1, 4)
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_bf16_n32_k133_z2, false, CONV_WGMMA_BN_NARROW, 1, 2)
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_bf16_n32_k133_z1, false, CONV_WGMMA_BN_NARROW, 1, 1)
CONV_WGMMA_KERNEL(conv_fprop_wgmma_cl_bf16, true, CONV_WGMMA_BN, 0, 0)  // conv forward
CONV_WGMMA_KERNEL(conv_fprop_wgmma_cl_bf16_k333_z4, true, CONV_WGMMA_BN, 3, 4)
CONV_WGMMA_KERNEL(conv_fprop_wgmma_cl_bf16_k333_z2, true, CONV_WGMMA_BN, 3, 2)
CONV_WGMMA_KERNEL(conv_fprop_wgmma_cl_bf16_k133_z4, true, CONV_WGMMA_BN, 1, 4)
CONV_WGMMA_KERNEL(conv_fprop_wgmma_cl_bf16_k133_z2, true, CONV_WGMMA_BN, 1, 2)
CONV_WGMMA_KERNEL(conv_fprop_wgmma_cl_bf16_k133_z1, true, CONV_WGMMA_BN, 1, 1)
CONV_WGMMA_KERNEL(conv_fprop_wgmma_cl_bf16_n32, true, CONV_WGMMA_BN_NARROW, 0, 0)
CONV_WGMMA_KERNEL(conv_fprop_wgmma_cl_bf16_n32_k333_z4, true, CONV_WGMMA_BN_NARROW, 3, 4)
CONV_WGMMA_KERNEL(conv_fprop_wgmma_cl_bf16_n32_k333_z2, true, CONV_WGMMA_BN_NARROW, 3, 2)
CONV_WGMMA_KERNEL(conv_fprop_wgmma_cl_bf16_n32_k133_z4, true, CONV_WGMMA_BN_NARROW, 1, 4)
CONV_WGMMA_KERNEL(conv_fprop_wgmma_cl_bf16_n32_k133_z2, true, CONV_WGMMA_BN_NARROW, 1, 2)
CONV_WGMMA_KERNEL(conv_fprop_wgmma_cl_bf16_n32_k133_z1, true, CONV_WGMMA_BN_NARROW, 1, 1)
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_cl_bf16, true, CONV_WGMMA_BN, 0, 0)  // conv input gradient
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_cl_bf16_k333_z4, true, CONV_WGMMA_BN, 3, 4)
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_cl_bf16_k333_z2, true, CONV_WGMMA_BN, 3, 2)
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_cl_bf16_k133_z4, true, CONV_WGMMA_BN, 1, 4)
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_cl_bf16_k133_z2, true, CONV_WGMMA_BN, 1, 2)
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_cl_bf16_k133_z1, true, CONV_WGMMA_BN, 1, 1)
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_cl_bf16_n32, true, CONV_WGMMA_BN_NARROW, 0, 0)
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_cl_bf16_n32_k333_z4, true, CONV_WGMMA_BN_NARROW, 3, 4)
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_cl_bf16_n32_k333_z2, true, CONV_WGMMA_BN_NARROW, 3, 2)
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_cl_bf16_n32_k133_z4, true, CONV_WGMMA_BN_NARROW, 1, 4)
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_cl_bf16_n32_k133_z2, true, CONV_WGMMA_BN_NARROW, 1, 2)
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_cl_bf16_n32_k133_z1, true, CONV_WGMMA_BN_NARROW, 1, 1)

// The weight gradient: one block per SM (its accumulators, 14 x 8 floats per thread for 3x3x3, 5 x 16 for 1x3x3, and
// two stages of up to 57 KB).
#define CONV_WGRAD_WGMMA_KERNEL(NAME, KZ, BOX_Z)                                                                 \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) NAME(const ConvWgradWgmmaParams<bf16> p) {        \
        conv_wgrad_wgmma<KZ, BOX_Z>(p);                                                                          \
    }
CONV_WGRAD_WGMMA_KERNEL(conv_wgrad_wgmma_bf16_k333_z4, 3, 4)
CONV_WGRAD_WGMMA_KERNEL(conv_wgrad_wgmma_bf16_k333_z2, 3, 2)
CONV_WGRAD_WGMMA_KERNEL(conv_wgrad_wgmma_bf16_k133_z4, 1, 4)
CONV_WGRAD_WGMMA_KERNEL(conv_wgrad_wgmma_bf16_k133_z2, 1, 2)
CONV_WGRAD_WGMMA_KERNEL(conv_wgrad_wgmma_bf16_k133_z1, 1, 1)
