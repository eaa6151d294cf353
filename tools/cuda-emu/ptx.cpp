// cuda-emu: the PTX instructions of the kernels' inline assembly (cuda/common.cuh, mma.cuh, wgmma.cuh,
// conv_wgmma.cu), interpreted from the instruction text that build.py hands over with the operands. The fragment
// layouts are the PTX ISA's, as cuda/mma.cuh and cuda/wgmma.cuh describe them; the products are summed in float64
// and added to the float32 accumulator (the tensor cores' order of summation is not specified).
#include <stdio.h>
#include <string.h>

#include <string>

#include "internal.h"

namespace emu {
namespace {

uint64_t in_bits(const Operand* ops, int i) { return ops[i].out ? 0 : ops[i].bits; }
uint32_t reg(const Operand* ops, int i) {
    if (ops[i].out) {
        uint32_t v = 0;
        memcpy(&v, ops[i].at, 4);
        return v;
    }
    return (uint32_t)ops[i].bits;
}
float freg(const Operand* ops, int i) {
    const uint32_t b = reg(ops, i);
    float f;
    memcpy(&f, &b, 4);
    return f;
}
void set(const Operand* ops, int i, uint32_t v) { memcpy(ops[i].at, &v, 4); }
void setf(const Operand* ops, int i, float v) { memcpy(ops[i].at, &v, 4); }

float bf16_lo(uint32_t r) { return __uint_as_float(r << 16); }
float bf16_hi(uint32_t r) { return __uint_as_float(r & 0xffff0000u); }
float tf32(uint32_t r) { return __uint_as_float(r & 0xffffe000u); }

// ldmatrix: lane i gives the address of row i % 8 of matrix i / 8.
struct Ldmatrix {
    uint32_t addr;
    int count;
    bool trans;
    uint32_t r[4];
};
void complete_ldmatrix(void** ctx, const bool* present, int) {
    Ldmatrix* lanes[32];
    for (int i = 0; i < 32; ++i) lanes[i] = present[i] ? (Ldmatrix*)ctx[i] : nullptr;
    const Ldmatrix* any = nullptr;
    for (int i = 0; i < 32 && !any; ++i) any = lanes[i];
    const int count = any->count;
    for (int m = 0; m < count; ++m) {
        uint16_t mat[8][8];
        for (int row = 0; row < 8; ++row) {
            const Ldmatrix* src = lanes[m * 8 + row];
            if (!src) trap("ldmatrix: a lane that gives a row address has exited");
            memcpy(mat[row], shared_at(src->addr, 16), 16);
        }
        for (int l = 0; l < 32; ++l) {
            if (!lanes[l]) continue;
            const int g = l / 4, t = l % 4;
            uint16_t lo, hi;
            if (lanes[l]->trans) {
                lo = mat[2 * t][g];
                hi = mat[2 * t + 1][g];
            } else {
                lo = mat[g][2 * t];
                hi = mat[g][2 * t + 1];
            }
            lanes[l]->r[m] = (uint32_t)lo | (uint32_t)hi << 16;
        }
    }
}

// mma.sync m16n8k16 (bf16) and m16n8k8 (tf32), row.col, float32 accumulators.
struct Mma {
    bool bf16;
    uint32_t a[4], b[2];
    float c[4];
};
void complete_mma(void** ctx, const bool* present, int) {
    for (int i = 0; i < 32; ++i)
        if (!present[i]) trap("mma.sync with exited lanes");
    const bool bf16 = ((Mma*)ctx[0])->bf16;
    const int K = bf16 ? 16 : 8;
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const Mma& m = *(Mma*)ctx[l];
        const int g = l / 4, t = l % 4;
        if (bf16) {
            for (int h = 0; h < 4; ++h) {
                const int row = g + 8 * (h & 1), col = 2 * t + 8 * (h >> 1);
                A[row][col] = bf16_lo(m.a[h]);
                A[row][col + 1] = bf16_hi(m.a[h]);
            }
            for (int h = 0; h < 2; ++h) {
                B[2 * t + 8 * h][g] = bf16_lo(m.b[h]);
                B[2 * t + 8 * h + 1][g] = bf16_hi(m.b[h]);
            }
        } else {
            for (int h = 0; h < 4; ++h) A[g + 8 * (h & 1)][t + 4 * (h >> 1)] = tf32(m.a[h]);
            for (int h = 0; h < 2; ++h) B[t + 4 * h][g] = tf32(m.b[h]);
        }
    }
    for (int l = 0; l < 32; ++l) {
        Mma& m = *(Mma*)ctx[l];
        const int g = l / 4, t = l % 4;
        for (int h = 0; h < 4; ++h) {
            const int row = g + 8 * (h >> 1), col = 2 * t + (h & 1);
            double s = 0.0;
            for (int k = 0; k < K; ++k) s += (double)A[row][k] * (double)B[k][col];
            m.c[h] = (float)((double)m.c[h] + s);
        }
    }
}

// wgmma.mma_async m64nNk16 bf16, float32 accumulators: A from a descriptor, K-major or M-major (trans_a), or (n16)
// from registers, B K-major or N-major (trans_b).
struct Wgmma {
    int n;
    bool a_regs, trans_a, trans_b, accumulate;
    uint64_t a_desc, b_desc;
    uint32_t a[4];
    float* d[128];  // N / 2 accumulators per thread, up to m64n256
};
float bf16_at(const unsigned char* p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return __uint_as_float((uint32_t)v << 16);
}
// Element (r, k) of an unswizzled operand (r along m or n, k < 16): core matrices of 8 rows x 16 bytes, sbo apart
// along r, lbo apart along k; K-major rows hold 8 k, MN-major ones (mn_major) 8 r.
// With the 128-byte swizzle (layout type 1, bits 62-63): rows of 128 bytes, K-major ones of 64 k in 8-row atoms sbo
// apart along r, MN-major ones of 64 r (one row per k) in 8-row atoms sbo apart along k and blocks of 64 r lbo apart;
// the 16-byte piece of each byte address XORed with its address bits 7-9 (the row within the atom: the atoms lie on
// 1024-byte boundaries, and a K-major start may step by 32 bytes per k-step within a row).
float operand_at(uint64_t desc, int r, int k, bool mn_major) {
    const uint32_t lbo = (uint32_t)(desc >> 16 & 0x3FFF) << 4, sbo = (uint32_t)(desc >> 32 & 0x3FFF) << 4;
    if ((desc >> 62) == 1) {
        const uint32_t start = (uint32_t)(desc & 0x3FFF) << 4;
        uint32_t addr = mn_major ? start + (r / 64) * lbo + (k / 8) * sbo + (k % 8) * 128 + (r % 64) * 2
                                 : start + (r / 8) * sbo + (r % 8) * 128 + k * 2;
        addr ^= ((addr >> 7) & 7) << 4;
        return bf16_at(descriptor_at(desc & ~0x3FFFull, (int)addr + 2) + addr);
    }
    if ((desc >> 62) != 0) trap("a wgmma operand of a swizzle the emulator does not know (64 or 32 bytes)");
    const uint32_t inner = mn_major ? (k % 8) * 16 + (r % 8) * 2 : (r % 8) * 16 + (k % 8) * 2;
    const uint32_t off = (r / 8) * sbo + (k / 8) * lbo + inner;
    return bf16_at(descriptor_at(desc, (int)off + 2) + off);
}
void complete_wgmma(void** ctx, const bool* present, int) {
    for (int i = 0; i < 128; ++i)
        if (!present[i]) trap("wgmma with exited lanes");
    const Wgmma& w0 = *(Wgmma*)ctx[0];
    const int N = w0.n;
    static float A[64][16], B[256][16];
    if (w0.a_regs) {
        for (int l = 0; l < 128; ++l) {
            const Wgmma& w = *(Wgmma*)ctx[l];
            const int g = l % 32 / 4, t = l % 4, base = l / 32 * 16;
            for (int h = 0; h < 4; ++h) {
                const int row = base + g + 8 * (h & 1), col = 2 * t + 8 * (h >> 1);
                A[row][col] = bf16_lo(w.a[h]);
                A[row][col + 1] = bf16_hi(w.a[h]);
            }
        }
    } else {
        for (int m = 0; m < 64; ++m)
            for (int k = 0; k < 16; ++k) A[m][k] = operand_at(w0.a_desc, m, k, w0.trans_a);
    }
    for (int n = 0; n < N; ++n)
        for (int k = 0; k < 16; ++k) B[n][k] = operand_at(w0.b_desc, n, k, w0.trans_b);
    for (int l = 0; l < 128; ++l) {
        const Wgmma& w = *(Wgmma*)ctx[l];
        const int warp = l / 32, g = l % 32 / 4, t = l % 4;
        for (int j = 0; j < N / 8; ++j)
            for (int h = 0; h < 2; ++h)
                for (int e = 0; e < 2; ++e) {
                    const int row = 16 * warp + g + 8 * h, col = 8 * j + 2 * t + e;
                    double s = 0.0;
                    for (int k = 0; k < 16; ++k) s += (double)A[row][k] * (double)B[col][k];
                    float* d = w.d[4 * j + 2 * h + e];
                    *d = (float)((w.accumulate ? (double)*d : 0.0) + s);
                }
    }
}

// An mbarrier as the emulator keeps it in its 8 bytes of shared memory: arrivals still expected this phase, the count
// each phase starts with, bytes still expected from copies, and the phase's parity.
struct Mbarrier {
    uint16_t pending, count;
    uint32_t tx : 31, phase : 1;
};
static_assert(sizeof(Mbarrier) == 8, "an mbarrier is 8 bytes");
Mbarrier* mbarrier_at(uint32_t at) {
    if (at % 8) trap("an mbarrier not 8-byte aligned");
    return (Mbarrier*)shared_at(at, 8);
}
// The phase completes when every arrival and every expected byte has come: the next begins.
void mbarrier_step(Mbarrier* b) {
    if (b->pending == 0 && b->tx == 0) {
        b->phase ^= 1;
        b->pending = b->count;
    }
}

// cp.async.bulk.tensor, tile mode: the box of the map at coordinates c into shared memory at dst (dense, innermost
// axis fastest, each 16-byte piece of a 128-byte row at piece ^ (row % 8) with the 128-byte swizzle), zeros where
// the box leaves the tensor; then its bytes complete on the mbarrier. Along axis i the box copies the ceil(box[i] /
// steps[i]) indices c[i], c[i] + steps[i], ... (the map's element strides; the driver API's cuTensorMapEncodeTiled).
void tensor_copy(uint32_t dst, const TensorMap* m, const int* c, int rank, uint32_t bar) {
    if (m->magic != TENSOR_MAP_MAGIC) trap("cp.async.bulk.tensor: not a tensor map made by cuTensorMapEncodeTiled");
    if ((int)m->rank != rank) trap("cp.async.bulk.tensor: the instruction's rank is not the map's");
    if (dst % (m->swizzle_bytes ? 1024 : 128)) trap("cp.async.bulk.tensor: shared destination misaligned");
    uint64_t count = 1, copied[5];
    for (int i = 0; i < rank; ++i) {
        copied[i] = (m->box[i] + m->steps[i] - 1) / m->steps[i];
        count *= copied[i];
    }
    const uint32_t bytes = (uint32_t)(count * m->elem);
    unsigned char* out = shared_at(dst, (int)bytes);
    for (uint64_t e = 0; e < count; ++e) {
        uint64_t rest = e, at = m->address;
        bool inside = true;
        for (int i = 0; i < rank; ++i) {
            const int64_t x = (int64_t)c[i] + (int64_t)(rest % copied[i]) * m->steps[i];
            rest /= copied[i];
            inside = inside && x >= 0 && (uint64_t)x < m->dims[i];
            at += (uint64_t)x * (i == 0 ? m->elem : m->strides[i - 1]);
        }
        uint32_t off = (uint32_t)(e * m->elem);
        if (m->swizzle_bytes) off ^= ((dst + off) >> 7 & 7) << 4;
        if (inside)
            memcpy(out + off, (const void*)at, m->elem);
        else
            memset(out + off, 0, m->elem);
    }
    Mbarrier* b = mbarrier_at(bar);
    if (b->tx < bytes) trap("cp.async.bulk.tensor: more bytes than the mbarrier expects");
    b->tx -= bytes;
    mbarrier_step(b);
}

bool has(const char* tmpl, const char* what) { return strstr(tmpl, what) != nullptr; }
int shape_n(const char* tmpl) {
    const char* p = strstr(tmpl, ".m64n");
    return p ? atoi(p + 5) : 0;
}
}  // namespace

void ptx(const char* tmpl, std::initializer_list<Operand> list) {
    const Operand* ops = list.begin();
    const int count = (int)list.size();
    if (has(tmpl, "ex2.approx.ftz.f32")) {
        float y = exp2f(freg(ops, 1));
        if (fabsf(y) < 1.17549435e-38f) y = 0.0f;  // .ftz: a subnormal result is flushed to zero
        setf(ops, 0, y);
    } else if (has(tmpl, "%%dynamic_smem_size")) {
        set(ops, 0, dyn_smem_bytes);
    } else if (has(tmpl, "cvt.rna.tf32.f32")) {
        uint32_t b = reg(ops, 1);
        if ((b & 0x7f800000u) != 0x7f800000u) b = (b + 0x1000u) & 0xffffe000u;  // nearest, ties away from zero
        set(ops, 0, b);
    } else if (has(tmpl, "cp.async.ca.shared.global") || has(tmpl, "cp.async.cg.shared.global")) {
        const int size = has(tmpl, ", 16,") ? 16 : 4;
        const int bytes = (int)reg(ops, 2);
        unsigned char* dst = shared_at(reg(ops, 0), size);
        const unsigned char* src = (const unsigned char*)in_bits(ops, 1);
        if (bytes < 0 || bytes > size) trap("cp.async: source size beyond the copy size");
        if (bytes) memcpy(dst, src, bytes);
        memset(dst + bytes, 0, size - bytes);
    } else if (has(tmpl, "cp.async.commit_group") || has(tmpl, "cp.async.wait_group") ||
               has(tmpl, "wgmma.fence") || has(tmpl, "wgmma.commit_group") || has(tmpl, "wgmma.wait_group") ||
               has(tmpl, "fence.proxy.async")) {
        // Every copy and product was done when issued.
    } else if (has(tmpl, "bar.sync")) {
        // A named barrier of some of the block's threads (conv_tma.cu's consumers_sync, once the producer warp has
        // left): the block's barrier, which counts threads that have left as arrived. A named barrier that threads
        // still running never reach would wait forever here.
        syncthreads();
    } else if (has(tmpl, "mbarrier.arrive.shared")) {
        Mbarrier* b = mbarrier_at(reg(ops, 0));
        if (b->pending == 0) trap("mbarrier.arrive: more arrivals than the barrier counts");
        --b->pending;
        mbarrier_step(b);
    } else if (has(tmpl, "mbarrier.init.shared")) {
        Mbarrier* b = mbarrier_at(reg(ops, 0));
        const uint32_t n = reg(ops, 1);
        if (n == 0 || n > 0xffff) trap("mbarrier.init: an arrival count the emulator does not keep");
        *b = Mbarrier{(uint16_t)n, (uint16_t)n, 0, 0};
    } else if (has(tmpl, "fence.mbarrier_init")) {
        // The barriers were written when initialised.
    } else if (has(tmpl, "mbarrier.arrive.expect_tx.shared")) {
        Mbarrier* b = mbarrier_at(reg(ops, 0));
        if (b->pending == 0) trap("mbarrier.arrive: more arrivals than the barrier counts");
        b->tx += reg(ops, 1);
        --b->pending;
        mbarrier_step(b);
    } else if (has(tmpl, "mbarrier.try_wait.parity.shared")) {
        const uint32_t bar = reg(ops, 1), parity = reg(ops, 2) & 1;
        const bool ready = mbarrier_at(bar)->phase != parity;
        set(ops, 0, ready ? 1 : 0);
        if (!ready) spin("an mbarrier phase that never completes (a copy never issued, or bytes never expected)");
    } else if (has(tmpl, "cp.async.bulk.tensor.") && has(tmpl, ".tile.mbarrier::complete_tx::bytes")) {
        const int rank = atoi(strstr(tmpl, "cp.async.bulk.tensor.") + 21);
        if (count != rank + 3) trap("cp.async.bulk.tensor: unexpected operand count");
        int c[5];
        for (int i = 0; i < rank; ++i) c[i] = (int)reg(ops, 2 + i);
        tensor_copy(reg(ops, 0), (const TensorMap*)in_bits(ops, 1), c, rank, reg(ops, 2 + rank));
    } else if (has(tmpl, "ldmatrix.sync.aligned.m8n8")) {
        Ldmatrix l{};
        l.count = has(tmpl, ".x4") ? 4 : has(tmpl, ".x2") ? 2 : 1;
        l.trans = has(tmpl, ".trans");
        l.addr = reg(ops, l.count);
        group(32, "ldmatrix", &l, complete_ldmatrix);
        for (int i = 0; i < l.count; ++i) set(ops, i, l.r[i]);
    } else if (has(tmpl, "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") ||
               has(tmpl, "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32")) {
        Mma m{};
        m.bf16 = has(tmpl, "bf16");
        for (int i = 0; i < 4; ++i) m.c[i] = freg(ops, i);
        for (int i = 0; i < 4; ++i) m.a[i] = reg(ops, 4 + i);
        for (int i = 0; i < 2; ++i) m.b[i] = reg(ops, 8 + i);
        group(32, "mma.sync", &m, complete_mma);
        for (int i = 0; i < 4; ++i) setf(ops, i, m.c[i]);
    } else if (has(tmpl, "wgmma.mma_async.sync.aligned") && has(tmpl, ".f32.bf16.bf16")) {
        Wgmma w{};
        w.n = shape_n(tmpl);
        const int nd = w.n / 2;
        if (nd > 128) trap("wgmma: wider than m64n256");
        // Operands: d[0 .. N/2), then A (a descriptor, or four registers), the B descriptor, the scale-d predicate and,
        // with A's descriptor, the transpose immediates of A and B (wgmma.cuh's mma_async).
        w.a_regs = count == nd + 6;
        if (!w.a_regs && count != nd + 5) trap("wgmma: unexpected operand count");
        for (int i = 0; i < nd; ++i) w.d[i] = (float*)ops[i].at;
        if (w.a_regs) {
            for (int i = 0; i < 4; ++i) w.a[i] = reg(ops, nd + i);
            w.b_desc = in_bits(ops, nd + 4);
            w.accumulate = reg(ops, nd + 5) != 0;
            w.trans_b = true;  // the kernels' only register-A form: "p, 1, 1, 1" (B N-major)
        } else {
            w.a_desc = in_bits(ops, nd);
            w.b_desc = in_bits(ops, nd + 1);
            w.accumulate = reg(ops, nd + 2) != 0;
            w.trans_a = reg(ops, nd + 3) != 0;
            w.trans_b = reg(ops, nd + 4) != 0;
        }
        group(128, "wgmma", &w, complete_wgmma);
    } else {
        std::string msg = "inline PTX the emulator does not know: ";
        msg += tmpl;
        trap(msg.c_str());
    }
}
}  // namespace emu
