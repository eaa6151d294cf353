// Convolution products on Hopper's warpgroup matrix products (wgmma, sm_90a) from a halo tile, bf16 operands with
// float32 accumulation:
//
//   out[n, col, dst_base + dst_step . r] = b[col] + sum_{c, q} src[n, c, r + lo + q] Wp[c, q, col],
//
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
//   at a box's end) are in flight through cp.async and its halo through registers (element loads, stored as 16-byte
//   voxels), published to the tensor cores by fence.proxy.async before the barrier. A box's outputs are written
//   after its last chunk's products, while the loads of the next one are in flight.
// - Warpgroup g of the two computes tiles 2 g and 2 g + 1 (the accumulators of both: BN floats per thread); the
//   narrow tile (BN 32) fits 128 registers and runs two blocks per SM.
// - ncu of the persistent version before the packing in halves (flare-3d stage 1, 3x3x3 64 -> 64, benches/RESULTS.md):
//   tensor pipe 24%, issue-limited by the halo's element loads (long_scoreboard the top stall; 9.4 of each 32-byte
//   sector used: the maps are NCDHW, so a voxel's 16 channels are 16 loads); channels-last storage would make them
//   16-byte copies (loading two voxels per 4-byte word measured slower: branch halo-pairs).
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

template <int BN>
__device__ __forceinline__ void conv_wgmma(const ConvWgmmaParams<bf16>& p) {
    extern __shared__ __align__(16) uint4 smem[];  // 16-byte units
    const int t = threadIdx.x, group = t >> 7, warp = (t >> 5) & 3, g = (t & 31) >> 2, tq = t & 3;

    const int taps = p.taps[0] * p.taps[1] * p.taps[2];
    const int box_z = p.box_z, box_y = 8 * (TILES / box_z);
    const int hz = box_z + p.taps[0] - 1, hy = box_y + p.taps[1] - 1, hx = TILE_X + p.taps[2] - 1;
    const int halo_vox = hz * hy * hx;
    // Stage b (16-byte units): halo planes [2][halo_vox], then the weights [taps][2][BN].
    const int stage_units = 2 * halo_vox + 2 * taps * BN;
    const int col0 = blockIdx.y * BN;
    const int src_vox = p.src_size[0] * p.src_size[1] * p.src_size[2];

    // Box b: batch item n, output slices z0 .., rows y0 .., columns x0 ...
    const int x_tiles = (p.rows[2] + TILE_X - 1) / TILE_X, y_tiles = (p.rows[1] + box_y - 1) / box_y;
    const int z_tiles = (p.rows[0] + box_z - 1) / box_z;
    auto origin = [&](int b, int& n, int& z0, int& y0, int& x0) {
        x0 = b % x_tiles * TILE_X;
        b /= x_tiles;
        y0 = b % y_tiles * box_y;
        b /= y_tiles;
        z0 = b % z_tiles * box_z;
        n = b / z_tiles;
    };
    // This block's work: items (box, chunk) in order, box blockIdx.x + i gridDim.x.
    const int chunks = (p.c_src + CONV_WGMMA_CHUNK - 1) / CONV_WGMMA_CHUNK;
    const int items = (p.boxes - blockIdx.x + gridDim.x - 1) / gridDim.x * chunks;
    auto box_of = [&](int item) { return blockIdx.x + item / chunks * gridDim.x; };

    // The halo voxels this thread stages for the box being loaded, v = t + THREADS i: their source offsets, -1
    // outside the map or past the halo.
    const bf16* src_n = p.src;
    int off[HALO_VOX];
    auto start_box = [&](int b) {
        int n, z0, y0, x0;
        origin(b, n, z0, y0, x0);
        src_n = p.src + (int64_t)n * p.c_src * src_vox;
#pragma unroll
        for (int i = 0; i < HALO_VOX; ++i) {
            const int v = t + i * THREADS;
            const int sz = z0 + p.lo[0] + v / (hy * hx), sy = y0 + p.lo[1] + v / hx % hy, sx = x0 + p.lo[2] + v % hx;
            const bool inside = (unsigned)sz < (unsigned)p.src_size[0] && (unsigned)sy < (unsigned)p.src_size[1] &&
                                (unsigned)sx < (unsigned)p.src_size[2];
            off[i] = v < halo_vox && inside ? (sz * p.src_size[1] + sy) * p.src_size[2] + sx : -1;
        }
    };
    // Channel pairs (c, c + 1) as operand words, the even channel in the low half: words 0-3 are plane 0's voxel.
    unsigned staged[HALO_VOX][8];
    auto store_halo = [&](int buf) {
        uint4* halo = smem + buf * stage_units;
#pragma unroll
        for (int i = 0; i < HALO_VOX; ++i) {
            const int v = t + i * THREADS;
            if (v < halo_vox) {
                halo[v] = make_uint4(staged[i][0], staged[i][1], staged[i][2], staged[i][3]);
                halo[halo_vox + v] = make_uint4(staged[i][4], staged[i][5], staged[i][6], staged[i][7]);
            }
        }
    };
    // Item `item` into stage buf: its weights by cp.async, its halo into `staged` (stored by store_halo).
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
        mma::cp_async_commit();
        // Element indices within the batch item fit 32 bits (c_src * src_vox: checked by the launch).
        const int c0 = chunk * CONV_WGMMA_CHUNK;
        const unsigned short* src_c = reinterpret_cast<const unsigned short*>(src_n) + c0 * src_vox;
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
        origin(b, n, z0, y0, x0);
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
            int qz = 0, qy = 0, qx = 0;
            for (int q = 0; q < taps; ++q) {
                const uint64_t shift = buf * stage_step + (uint64_t)((qz * hy + qy) * hx + qx);
                const uint64_t b = b_desc + buf * stage_step + q * tap_b_step;
#pragma unroll
                for (int j = 0; j < TILES_PER_GROUP; ++j) wgmma::mma_async<BN>(acc[j], a_desc[j] + shift, b, true);
                if (++qx == p.taps[2]) {
                    qx = 0;
                    if (++qy == p.taps[1]) {
                        qy = 0;
                        ++qz;
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

}  // namespace

// The narrow tile asks for two blocks per SM (at most 128 registers), the wide one gets one.
#define CONV_WGMMA_KERNEL(NAME, BN)                                                                               \
    extern "C" __global__ void __launch_bounds__(THREADS, BN == CONV_WGMMA_BN_NARROW ? 2 : 1)                    \
        NAME(const ConvWgmmaParams<bf16> p) {                                                                     \
        conv_wgmma<BN>(p);                                                                                        \
    }
CONV_WGMMA_KERNEL(conv_fprop_wgmma_bf16, CONV_WGMMA_BN)  // conv forward
CONV_WGMMA_KERNEL(conv_fprop_wgmma_bf16_n32, CONV_WGMMA_BN_NARROW)
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_bf16, CONV_WGMMA_BN)  // conv input gradient
CONV_WGMMA_KERNEL(conv_dgrad_wgmma_bf16_n32, CONV_WGMMA_BN_NARROW)
