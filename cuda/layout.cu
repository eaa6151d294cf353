// Layout kernels: moves of elements, no arithmetic (src/ops/pim.rs, concat.rs, flip.rs, narrow.rs). Each is a
// template over the storage type T (float or __nv_bfloat16) with instances NAME_f32 and NAME_bf16 (common.cuh's
// TYPED_KERNEL). They move elements as T, without converting to float32 and back: a move is then bit-exact in
// either type (NaN payloads included), and the bf16 instance moves half the bytes.
//
// PiM partition / merge. A map x (N, C, D, H, W) and tokens t (G, L, C), channels last, hold the same elements:
//
//   t[r, c] = x[n, c, v]    with v = (d H + h) W + w the voxel and r the token row of (n, v):
//   r = n V + R_d(d) + R_h(h) + R_w(w),    V = D H W,
//   R_a(s) = (s / p_a) * mi_a + (s % p_a) * mj_a     (block index i = s / p_a, offset inside the block j = s % p_a)
//
// where the host (src/ops/pim.rs) sets the per-axis multipliers mi_a, mj_a (PimParams' outer, inner in layout.cuh)
// for the layout (Window: i picks the group, j the token; Strided: the other way round). pim_voxel_row is that map,
// used by both kernels; partition writes t from x and merge, the inverse permutation, writes x from t.
//
// Both are transposes between a C-major and a C-minor layout, done through a shared tile of PIM_TILE = 32 channels x
// PIM_VOXELS = PIM_SPAN * PIM_TILE = 128 voxels: the map side is read or written along consecutive voxels v
// (contiguous within a channel), the token side along consecutive channels c (contiguous within a row). Each tile
// row is padded by one 4-byte word (PIM_PAD<T> elements: 1 float, 2 bf16), so a row spans an odd number of words
// (129 float, 65 bf16): the column-wise pass hits 32 distinct banks, and the row-wise pass reads consecutive words
// (two bf16 threads share one word, which is no conflict). Block (PIM_TILE, PIM_ROWS) threads; grid
// (N * ceil(V / PIM_VOXELS), ceil(C / PIM_TILE)): block x covers voxels [v0, v0 + PIM_VOXELS) of sample n, block y
// channels [c0, c0 + PIM_TILE). A token row may be longer than C (PimParams' row): partition then also covers the
// row's zeros after the channels (grid y ceil(row / PIM_TILE)), merge skips them. A tile's voxels may span several lines of W; the token rows of its voxels are
// computed once per block (by its first PIM_SPAN warps, one voxel per thread) and shared by all its channels. Each
// thread moves 16 elements and issues its 16 loads together (partition: before computing the token rows, which
// then overlap the loads' latency), so a block keeps 16 elements per thread in flight where 32 x 32 tiles kept 4
// behind a serial row computation.
//
// Copies (parameters CopyRowsParams and FlipParams of layout.cuh):
//   copy_rows:   dst[r * dst_row + dst_off + k] = src[r * src_row + src_off + k],  r < rows, k < len
//                (concat forward: one launch per input places its (C_k * inner) block of each sample; concat
//                backward: the inverse split; narrow forward: a slice of each last-axis row)
//   narrow_backward: dx[r, j] = g[r, j - start] for start <= j < start + len, else 0   (dx: rows x K; writes all;
//                start = dst_off, K = dst_row)
//   narrow_add_backward: dx[r, start + k] += g[r, k] for k < len   (dx: the input's gradient so far, from another
//                use of the input; only the slice is read and written, element by element: x_proj's slices are 2 to
//                32 columns of short rows, so no 16-byte chunk would lie in one of them)
//   flip_seq:    y[g, l, c] = x[g, L - 1 - l, c]   (its own inverse, so also the backward)
//   depth_to_space:  y[n, c, d kd + a, h kh + b, w kw + e] = z[n, c K + (a kh + b) kw + e, d, h, w],  K = kd kh kw
//                    (a transposed conv's taps, computed as channels, moved to their voxels: conv_transpose.rs)
// Each thread takes chunks of VEC<T> consecutive elements (16 bytes: 4 float32, 8 bf16) of the index space it
// writes, grid-stride (the host launches grid_vec::<T>(elements) threads); the chunk's coordinates cost one or two
// 64-bit divisions (which run as 32-bit ones for sizes below 2^32), once per chunk, and the elements inside a chunk
// walk their coordinates by increments, without dividing.
//   copy_rows and narrow_backward are one walk, move_rows, over the rows x width columns [j_lo, j_lo + width) of dst
//   (copy_rows: the slice's len columns; narrow_backward: all K). A chunk is read with one 16-byte load where it lies
//   in one row inside the slice (or the source rows follow each other) and its source address is 16-byte aligned,
//   which holds for every chunk when rows, offsets and len are multiples of VEC<T> (concat of maps whose planes are
//   whole vectors, slices at multiples of VEC<T> columns); it is zero where it lies outside the slice; otherwise each
//   element is loaded on its own. It is written with one 16-byte store on the same conditions on the destination
//   (always for narrow_backward and narrow forward, whose destination is contiguous), else element by element.
//   flip_seq copies one aligned vector per chunk when C is a multiple of VEC<T> (each chunk then lies in one token
//   row); otherwise it loads the chunk's elements walking (row, l, c) and stores them as one vector.
//
// Cost, in units of the storage size E (4 bytes float32, 2 bf16; least traffic, see src/ops/mod.rs): every kernel
// here moves each element once, 2E bytes per element and no FLOPs; narrow_backward writes all K columns of dx and
// reads only the len columns of g, E (1 + len/K) bytes per element of dx. 16-byte accesses and per-chunk index math
// keep the copies memory-bound (one thread per element with 2 to 3 divisions each ran at 0.5 to 1.5 TB/s).
#include "common.cuh"
#include "layout.cuh"

namespace {

// The padding of a PiM tile row: one 4-byte word (see the header).
template <typename T>
constexpr int PIM_PAD = 4 / sizeof(T);

// The token row of voxel v of sample n, minus n V (see the header).
template <typename T>
__device__ __forceinline__ int64_t pim_voxel_row(const PimParams<T>& p, int64_t v) {
    const int64_t H = p.size[1], W = p.size[2];
    const int64_t w = v % W, h = (v / W) % H, d = v / (W * H);
    const int64_t pd = p.window[0], ph = p.window[1], pw = p.window[2];
    return (d / pd) * p.outer[0] + (d % pd) * p.inner[0] + (h / ph) * p.outer[1] + (h % ph) * p.inner[1] +
           (w / pw) * p.outer[2] + (w % pw) * p.inner[2];
}

// The voxels of one PiM block, and the elements each thread moves on either side of its tile.
constexpr int PIM_VOXELS = PIM_TILE * PIM_SPAN;
constexpr int PIM_MAP_ELEMS = PIM_TILE / PIM_ROWS * PIM_SPAN;  // channel rows ty + PIM_ROWS m, sub-tiles s
constexpr int PIM_TOKEN_ELEMS = PIM_VOXELS / PIM_ROWS;         // token rows (voxels) ty + PIM_ROWS m

// One PiM block's tile: PIM_TILE channels from c0 by PIM_VOXELS voxels from v0 of sample n, rows[k] the token row of
// voxel v0 + k. Launch: block (PIM_TILE, PIM_ROWS), grid (N * ceil(V / PIM_VOXELS), ceil(row / PIM_TILE))
// for partition, (..., ceil(C / PIM_TILE)) for merge.
template <typename T>
struct PimTile {
    int64_t C, row, V, n, v0, c0;
    __device__ explicit PimTile(const PimParams<T>& p) : C(p.C), row(p.row), V(p.size[0] * p.size[1] * p.size[2]) {
        const int64_t tiles = (V + PIM_VOXELS - 1) / PIM_VOXELS;
        n = blockIdx.x / tiles;
        v0 = (blockIdx.x % tiles) * PIM_VOXELS;
        c0 = (int64_t)blockIdx.y * PIM_TILE;
    }
    // Map element m of this thread (channel row cy = ty + PIM_ROWS (m / PIM_SPAN), voxel column vx = PIM_TILE
    // (m % PIM_SPAN) + tx): a warp takes PIM_TILE consecutive voxels of one channel.
    __device__ int cy(int m) const { return threadIdx.y + PIM_ROWS * (m / PIM_SPAN); }
    __device__ int vx(int m) const { return PIM_TILE * (m % PIM_SPAN) + threadIdx.x; }
    __device__ bool on_map(int m) const { return c0 + cy(m) < C && v0 + vx(m) < V; }
    __device__ int64_t map_at(int m) const { return (n * C + c0 + cy(m)) * V + v0 + vx(m); }
    // Token element m of this thread (voxel vy = ty + PIM_ROWS m, channel c0 + tx, below `channels`: C, or the row
    // with its zeros): a warp takes PIM_TILE consecutive channels of one token row.
    __device__ int vy(int m) const { return threadIdx.y + PIM_ROWS * m; }
    __device__ bool on_tokens(int m, int64_t channels) const { return c0 + threadIdx.x < channels && v0 + vy(m) < V; }
    __device__ int64_t token_at(const int64_t* rows, int m) const { return rows[vy(m)] * row + c0 + threadIdx.x; }
    // The token rows of the tile's voxels, computed by the first PIM_SPAN thread rows, one voxel each; the caller
    // syncs before reading them.
    __device__ void token_rows(const PimParams<T>& p, int64_t* rows) const {
        const int k = threadIdx.y * PIM_TILE + threadIdx.x;
        if (threadIdx.y < PIM_SPAN && v0 + k < V) rows[k] = n * V + pim_voxel_row(p, v0 + k);
    }
};

// t (G, L, row) from x (N, C, D, H, W), zeros in channels C .. row - 1. The map loads are issued first and the token
// rows computed while they are in flight.
template <typename T>
__device__ void pim_partition(const PimParams<T>& p) {
    const T* __restrict__ x = p.src;
    T* __restrict__ t = p.dst;
    __shared__ T tile[PIM_TILE][PIM_VOXELS + PIM_PAD<T>];  // [channel - c0][voxel - v0]
    __shared__ int64_t rows[PIM_VOXELS];
    const PimTile<T> b(p);
    T in[PIM_MAP_ELEMS];
#pragma unroll
    for (int m = 0; m < PIM_MAP_ELEMS; ++m)
        if (b.on_map(m)) in[m] = x[b.map_at(m)];
    b.token_rows(p, rows);
#pragma unroll
    for (int m = 0; m < PIM_MAP_ELEMS; ++m)
        if (b.on_map(m)) tile[b.cy(m)][b.vx(m)] = in[m];
    __syncthreads();
#pragma unroll
    for (int m = 0; m < PIM_TOKEN_ELEMS; ++m)
        if (b.on_tokens(m, b.row))
            t[b.token_at(rows, m)] = b.c0 + threadIdx.x < b.C ? tile[threadIdx.x][b.vy(m)] : from_f32<T>(0.0f);
}

// x (N, C, D, H, W) from t (G, L, C): the inverse of pim_partition, same launch. The token rows come first (the
// loads need them), then all loads of the thread together.
template <typename T>
__device__ void pim_merge(const PimParams<T>& p) {
    const T* __restrict__ t = p.src;
    T* __restrict__ x = p.dst;
    __shared__ T tile[PIM_TILE][PIM_VOXELS + PIM_PAD<T>];  // [channel - c0][voxel - v0]
    __shared__ int64_t rows[PIM_VOXELS];
    const PimTile<T> b(p);
    b.token_rows(p, rows);
    __syncthreads();
    T in[PIM_TOKEN_ELEMS];
#pragma unroll
    for (int m = 0; m < PIM_TOKEN_ELEMS; ++m)
        if (b.on_tokens(m, b.C)) in[m] = t[b.token_at(rows, m)];
#pragma unroll
    for (int m = 0; m < PIM_TOKEN_ELEMS; ++m)
        if (b.on_tokens(m, b.C)) tile[threadIdx.x][b.vy(m)] = in[m];
    __syncthreads();
#pragma unroll
    for (int m = 0; m < PIM_MAP_ELEMS; ++m)
        if (b.on_map(m)) x[b.map_at(m)] = tile[b.cy(m)][b.vx(m)];
}

// Columns [j_lo, j_lo + width) of every row of dst (rows x dst_row), with the slice [s_lo, s_hi) = [dst_off,
// dst_off + len) of them taken from src: dst[r, j] = src[r src_row + src_off + j - s_lo] for s_lo <= j < s_hi, else
// 0. copy_rows covers exactly the slice (j_lo = s_lo, width = len), narrow_backward whole rows (j_lo = 0, width =
// dst_row), zeros around the slice. See the header for the chunks and their vector cases.
template <typename T>
__device__ void move_rows(const CopyRowsParams<T>& p, const int64_t j_lo, const int64_t width) {
    constexpr int V = VEC<T>;
    const T* __restrict__ src = p.src;
    T* __restrict__ dst = p.dst;
    const int64_t s_lo = p.dst_off, s_hi = p.dst_off + p.len, j_hi = j_lo + width;
    const int64_t total = p.rows * width;
    // Rows that follow each other in memory on one side: a chunk crossing rows is still one run there.
    const bool src_flat = s_lo <= j_lo && j_hi <= s_hi && p.src_row == width;
    const bool dst_flat = p.dst_row == width;
    auto src_at = [&](int64_t r, int64_t j) { return src + r * p.src_row + p.src_off + (j - s_lo); };
    FOR_EACH(c, vec_chunks<T>(total)) {
        const int64_t i0 = c * V;
        const int n = chunk_len<T>(i0, total);
        const int64_t r0 = i0 / width, j0 = j_lo + (i0 - r0 * width);
        const bool whole = n == V, one_row = whole && j0 + V <= j_hi;
        uint4 raw;
        T* v = reinterpret_cast<T*>(&raw);
        if (whole && (one_row ? s_lo <= j0 && j0 + V <= s_hi : src_flat) && aligned16(src_at(r0, j0))) {
            raw = *reinterpret_cast<const uint4*>(src_at(r0, j0));
        } else if (one_row && (j0 + V <= s_lo || s_hi <= j0)) {
            raw = make_uint4(0u, 0u, 0u, 0u);  // +0 in either type, as from_f32<T>(0.0f)
        } else {
            int64_t r = r0, j = j0;
#pragma unroll
            for (int e = 0; e < V; ++e) {
                if (e < n) v[e] = s_lo <= j && j < s_hi ? *src_at(r, j) : from_f32<T>(0.0f);
                if (++j == j_hi) j = j_lo, ++r;
            }
        }
        T* d0 = dst + r0 * p.dst_row + j0;
        if ((one_row || (whole && dst_flat)) && aligned16(d0)) {
            *reinterpret_cast<uint4*>(d0) = raw;
        } else {
            int64_t r = r0, j = j0;
#pragma unroll
            for (int e = 0; e < V; ++e) {
                if (e < n) dst[r * p.dst_row + j] = v[e];
                if (++j == j_hi) j = j_lo, ++r;
            }
        }
    }
}

template <typename T>
__device__ void copy_rows(const CopyRowsParams<T>& p) {
    move_rows(p, p.dst_off, p.len);
}

// dx = dst (rows x K, K = dst_row), g = src (rows x len, src_row = len, src_off = 0), start = dst_off.
template <typename T>
__device__ void narrow_backward(const CopyRowsParams<T>& p) {
    move_rows(p, 0, p.dst_row);
}

// dx = dst (rows x K, K = dst_row), g = src (rows x len, src_row = len, src_off = 0), start = dst_off; the sum is
// rounded once, as the tape's elementwise add would round it.
template <typename T>
__device__ void narrow_add_backward(const CopyRowsParams<T>& p) {
    FOR_EACH(i, p.rows * p.len) {
        const int64_t r = i / p.len, k = i - r * p.len;
        T* d = p.dst + r * p.dst_row + p.dst_off + k;
        *d = from_f32<T>(to_f32(*d) + to_f32(p.src[r * p.src_row + p.src_off + k]));
    }
}

template <typename T>
__device__ void flip_seq(const FlipParams<T>& p) {
    constexpr int V = VEC<T>;
    const T* __restrict__ x = p.x;
    T* __restrict__ y = p.y;
    const int64_t L = p.L, C = p.C, total = p.G * L * C;
    const bool rows_of_vectors = C % V == 0 && aligned16(x) && aligned16(y);
    FOR_EACH(c, vec_chunks<T>(total)) {
        const int64_t i0 = c * V;
        // Element i0 is channel k of y's token row `row` = g L + l, whose source is x's row g L + L - 1 - l.
        int64_t row = i0 / C, k = i0 - row * C, l = row % L;
        if (rows_of_vectors) {
            copy_vec(y + i0, x + (row + L - 1 - 2 * l) * C + k);
        } else {
            store_chunk(y + i0, chunk_len<T>(i0, total), [&](int) {
                const T v = x[(row + L - 1 - 2 * l) * C + k];
                if (++k == C) {
                    k = 0, ++row;
                    if (++l == L) l = 0;
                }
                return v;
            });
        }
    }
}

// Walks a chunk of y along its row (the innermost axis): within a row the source index moves along one of the kw
// interleaved planes of z; a row's first source is found once per row.
template <typename T>
__device__ void depth_to_space(const DepthToSpaceParams<T>& p) {
    const int64_t kd = p.k[0], kh = p.k[1], kw = p.k[2], D = p.size[0], H = p.size[1], W = p.size[2];
    const int64_t Do = D * kd, Ho = H * kh, Wo = W * kw, K = kd * kh * kw, plane = D * H * W;
    const int64_t total = p.N * p.C * Do * Ho * Wo;
    const T* __restrict__ z = p.src;
    T* __restrict__ y = p.dst;
    FOR_EACH(chunk, vec_chunks<T>(total)) {
        const int64_t i0 = chunk * VEC<T>;
        // y's row (nc, od, oh) and column ow; z's index of that row's w = 0 for the taps (a, b, 0), its column w = ow
        // / kw and tap e = ow % kw (z's channel stride apart).
        int64_t row = i0 / Wo, ow = i0 - row * Wo, base = 0;
        auto start_row = [&]() {
            const int64_t oh = row % Ho, r = row / Ho, od = r % Do, nc = r / Do;
            base = ((nc * K + (od % kd * kh + oh % kh) * kw) * D + od / kd) * H * W + oh / kh * W;
        };
        start_row();
        int64_t w = ow / kw, e = ow % kw;
        store_chunk(y + i0, chunk_len<T>(i0, total), [&](int) {
            const T v = z[base + e * plane + w];
            if (++e == kw) {
                e = 0;
                ++w;
            }
            if (++ow == Wo) {
                ow = w = e = 0;
                ++row;
                start_row();
            }
            return v;
        });
    }
}

}  // namespace

TYPED_KERNEL(pim_partition_f32, pim_partition_bf16, pim_partition, PimParams)
TYPED_KERNEL(pim_merge_f32, pim_merge_bf16, pim_merge, PimParams)
TYPED_KERNEL(copy_rows_f32, copy_rows_bf16, copy_rows, CopyRowsParams)
TYPED_KERNEL(narrow_backward_f32, narrow_backward_bf16, narrow_backward, CopyRowsParams)
TYPED_KERNEL(narrow_add_backward_f32, narrow_add_backward_bf16, narrow_add_backward, CopyRowsParams)
TYPED_KERNEL(flip_seq_f32, flip_seq_bf16, flip_seq, FlipParams)
TYPED_KERNEL(depth_to_space_f32, depth_to_space_bf16, depth_to_space, DepthToSpaceParams)
