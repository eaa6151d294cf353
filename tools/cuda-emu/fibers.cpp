// cuda-emu: a block's threads as fibers on one OS thread, its barriers and warp collectives, and the launch of a
// kernel over its grid. See emu.h for the model.
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <vector>

#include "internal.h"

// Switches stacks: saves the callee-saved registers, the SSE and x87 control words and the stack pointer into *from,
// then resumes the fiber whose stack pointer is `to`. A new fiber's stack is laid out as if it had switched away just
// before emu_fiber_start.
extern "C" void emu_switch(void** from, void* to);
extern "C" void emu_fiber_start();
asm(R"(
.text
.globl emu_switch
.type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size emu_switch, .-emu_switch
.globl emu_fiber_start
.type emu_fiber_start,@function
emu_fiber_start:
    andq $-16, %rsp
    call emu_fiber_main
    ud2
.size emu_fiber_start, .-emu_fiber_start
)");

namespace emu {
Thread* current = nullptr;
uint3 block_idx, block_dim, grid_dim;
const char* kernel_name = "";

namespace {
constexpr size_t STACK = 256 * 1024;
constexpr size_t ARENA = 256 * 1024;
// The shared window: the dynamic arena at its offset 2^31, static __shared__ variables of this library anywhere
// within 2 GB of it.
alignas(262144) unsigned char arena[ARENA];

enum State { RUNNABLE, WAITING, DONE };
struct Fiber {
    void* sp = nullptr;
    unsigned char* stack = nullptr;
    Thread t{};
    State state = RUNNABLE;
    int waits_on = 0;  // while WAITING: 0 the block barrier, 32 or 128 its warp's or warpgroup's collective
};
struct Group {
    int arrived = 0;
    int exited = 0;
    const char* op = nullptr;
    void (*complete)(void**, const bool*, int) = nullptr;
    void* ctx[128] = {};
    bool present[128] = {};
};
std::vector<Fiber> fibers;
int running = -1;
int threads = 0, done = 0, barrier_arrived = 0;
std::vector<Group> warps, warpgroups;
void* scheduler_sp = nullptr;
void (*entry)(void**) = nullptr;
void** entry_args = nullptr;

void yield() { emu_switch(&fibers[running].sp, scheduler_sp); }

void release_barrier() {
    barrier_arrived = 0;
    for (int i = 0; i < threads; ++i)
        if (fibers[i].state == WAITING && fibers[i].waits_on == 0) fibers[i].state = RUNNABLE;
}

void release_group(int size, int index) {
    for (int i = index * size; i < std::min(threads, (index + 1) * size); ++i)
        if (fibers[i].state == WAITING && fibers[i].waits_on == size) fibers[i].state = RUNNABLE;
}

std::vector<Group>& groups_of(int size) { return size == 32 ? warps : warpgroups; }

// Group `index` of `size` lanes once every lane has arrived or exited: its collective done, its lanes released.
void complete_group(Group& g, int size, int index) {
    g.complete(g.ctx, g.present, size);
    for (int i = 0; i < size; ++i) g.present[i] = false;
    g.arrived = 0;
    g.op = nullptr;
    release_group(size, index);
}
}  // namespace

unsigned char* dyn_smem = arena;
unsigned dyn_smem_bytes = 0;
unsigned char* shared_base = arena - (size_t(1) << 31);

[[noreturn]] void trap(const char* what) {
    if (current)
        fprintf(stderr, "cuda-emu: %s in kernel %s, block (%u, %u, %u), thread (%u, %u, %u)\n", what, kernel_name,
                block_idx.x, block_idx.y, block_idx.z, current->idx.x, current->idx.y, current->idx.z);
    else
        fprintf(stderr, "cuda-emu: %s\n", what);
    abort();
}

unsigned char* shared_at(uint32_t at, int bytes) {
    // The library's static __shared__ variables and the arena lie within 1 GB of the arena's offset 2^31.
    if (at < (1u << 30) || (uint64_t)at + (uint64_t)bytes > (3ull << 30)) trap("a shared address outside the shared window");
    return shared_base + at;
}

unsigned char* descriptor_at(uint64_t desc, int bytes) {
    const uint32_t off = (uint32_t)(desc & 0x3FFF) << 4;
    if (off + (uint32_t)bytes > ARENA) trap("a wgmma operand outside the dynamic shared memory");
    return arena + off;
}

void syncthreads() {
    fibers[running].state = WAITING;
    fibers[running].waits_on = 0;
    if (++barrier_arrived + done == threads) {
        release_barrier();
        return;
    }
    yield();
}

void spin(const char* what) {
    // A thread that waits on memory the others will write (an mbarrier phase) lets them run; a block whose threads
    // have waited 100 million times is taken to wait forever.
    static uint3 block = {~0u, ~0u, ~0u};
    static long spins = 0;
    if (block.x != block_idx.x || block.y != block_idx.y || block.z != block_idx.z) spins = 0;
    block = block_idx;
    if (++spins > 100000000) trap(what);
    yield();
}

void group(int size, const char* op, void* ctx, void (*complete)(void**, const bool*, int)) {
    const int lane = current->linear % size, index = current->linear / size;
    Group& g = groups_of(size)[index];
    if (g.op && g.op != op) {
        char msg[256];
        snprintf(msg, sizeof msg, "lanes of one %s at different collectives (%s and %s)",
                 size == 32 ? "warp" : "warpgroup", g.op, op);
        trap(msg);
    }
    g.op = op;
    g.complete = complete;
    g.ctx[lane] = ctx;
    g.present[lane] = true;
    ++g.arrived;
    if (g.arrived + g.exited == size) {
        complete_group(g, size, index);
        return;
    }
    fibers[running].state = WAITING;
    fibers[running].waits_on = size;
    yield();
}

namespace {
struct Shfl {
    uint32_t value;
    int src, width, mode;
    uint32_t result;
};
void complete_shfl(void** ctx, const bool* present, int size) {
    for (int i = 0; i < size; ++i) {
        if (!present[i]) continue;
        Shfl& s = *(Shfl*)ctx[i];
        const int seg = i & ~(s.width - 1);
        int j;
        switch (s.mode) {
            case 0: j = seg + (s.src & (s.width - 1)); break;
            case 1: j = i ^ s.src; break;
            case 2: j = (i - seg) + s.src < s.width ? i + s.src : i; break;
            default: j = i - seg >= s.src ? i - s.src : i; break;
        }
        s.result = (j >= 0 && j < size && present[j]) ? ((Shfl*)ctx[j])->value : s.value;
    }
}
struct Ballot {
    bool pred;
    uint32_t result;
};
void complete_ballot(void** ctx, const bool* present, int size) {
    uint32_t m = 0;
    for (int i = 0; i < size; ++i)
        if (present[i] && ((Ballot*)ctx[i])->pred) m |= 1u << i;
    for (int i = 0; i < size; ++i)
        if (present[i]) ((Ballot*)ctx[i])->result = m;
}
void complete_nothing(void**, const bool*, int) {}
}  // namespace

uint32_t shfl(uint32_t value, int src, int width, int mode) {
    Shfl s{value, src, width, mode, 0};
    group(32, "shfl", &s, complete_shfl);
    return s.result;
}
uint32_t ballot(bool pred) {
    Ballot b{pred, 0};
    group(32, "ballot", &b, complete_ballot);
    return b.result;
}
void syncwarp() { group(32, "syncwarp", nullptr, complete_nothing); }

// Runs kernel `fn` with `args` over the grid, one block after another.
// Threads run in order of their index from one barrier to the next, so a missing barrier shows where a thread reads
// what a later thread writes (it reads the NaN fill); CUDA_EMU_REVERSE=1 runs them from the last, for the other half.
void launch(const char* name, void (*fn)(void**), void** args, uint3 grid, uint3 block, unsigned smem) {
    static const bool reverse = getenv("CUDA_EMU_REVERSE") != nullptr;
    if (smem > ARENA) trap("more dynamic shared memory than the emulator's arena");
    kernel_name = name;
    dyn_smem_bytes = smem;
    grid_dim = grid;
    block_dim = block;
    threads = (int)(block.x * block.y * block.z);
    if ((int)fibers.size() < threads) fibers.resize(threads);
    for (int i = 0; i < threads; ++i)
        if (!fibers[i].stack) {
            void* m = mmap(nullptr, STACK + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                           -1, 0);
            if (m == MAP_FAILED) trap("no memory for a fiber stack");
            mprotect(m, 4096, PROT_NONE);  // a guard page below the stack
            fibers[i].stack = (unsigned char*)m + 4096;
        }
    entry = fn;
    entry_args = args;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                block_idx = make_uint3(bx, by, bz);
                memset(arena, 0xff, smem);  // shared memory starts as garbage: NaN in either float type
                warps.assign((threads + 31) / 32, Group{});
                warpgroups.assign((threads + 127) / 128, Group{});
                // Lanes of a last, partial warp or warpgroup that do not exist count as exited.
                for (int w = 0; w < (int)warps.size(); ++w) warps[w].exited = std::max(0, (w + 1) * 32 - threads);
                for (int w = 0; w < (int)warpgroups.size(); ++w)
                    warpgroups[w].exited = std::max(0, (w + 1) * 128 - threads);
                done = 0;
                barrier_arrived = 0;
                for (int i = 0; i < threads; ++i) {
                    Fiber& f = fibers[i];
                    f.t.linear = i;
                    f.t.idx = make_uint3(i % block.x, i / block.x % block.y, i / (block.x * block.y));
                    f.state = RUNNABLE;
                    // The initial frame emu_switch pops: control words, r15..rbp, then the return into the start.
                    uint64_t* top = (uint64_t*)(f.stack + STACK) - 2;
                    *--top = (uint64_t)&emu_fiber_start;
                    for (int r = 0; r < 6; ++r) *--top = 0;
                    *--top = 0x037F00001F80ull;  // mxcsr 0x1F80 (round to nearest, no FTZ), x87 control 0x037F
                    f.sp = top;
                }
                while (done < threads) {
                    bool ran = false;
                    for (int k = 0; k < threads; ++k) {
                        const int i = reverse ? threads - 1 - k : k;
                        if (fibers[i].state != RUNNABLE) continue;
                        running = i;
                        current = &fibers[i].t;
                        emu_switch(&scheduler_sp, fibers[i].sp);
                        ran = true;
                    }
                    if (!ran) {
                        current = nullptr;
                        char msg[200];
                        snprintf(msg, sizeof msg,
                                 "deadlock in kernel %s, block (%u, %u, %u): %d of %d threads wait at a barrier or "
                                 "warp collective that the others never reach",
                                 name, bx, by, bz, threads - done, threads);
                        trap(msg);
                    }
                }
            }
    current = nullptr;
    running = -1;
}
}  // namespace emu

using namespace emu;

extern "C" void emu_fiber_main() {
    entry(entry_args);
    Fiber& f = fibers[running];
    f.state = DONE;
    ++done;
    const int t = f.t.linear;
    // An exited thread counts as arrived at the block barrier and in its warp's and warpgroup's collectives.
    if (barrier_arrived > 0 && barrier_arrived + done == threads) release_barrier();
    for (int size : {32, 128}) {
        Group& g = groups_of(size)[t / size];
        ++g.exited;
        if (g.arrived > 0 && g.arrived + g.exited == size) complete_group(g, size, t / size);
    }
    emu_switch(&f.sp, scheduler_sp);
    __builtin_unreachable();
}
