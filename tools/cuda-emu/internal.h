// cuda-emu internals shared by driver.cpp (fibers, memory, the driver API) and ptx.cpp (the PTX instructions).
#pragma once
#include "emu.h"

namespace emu {

/// A collective of `size` consecutive lanes (a warp: 32, a warpgroup: 128) starting at a multiple of size: every
/// present lane calls it with its own context (on its stack, valid while it waits); the last to arrive calls
/// complete(ctx, present, size) for all of them, then all go on. `op` names the operation, so that lanes of one group
/// at different collectives are reported instead of mixed.
void group(int size, const char* op, void* ctx, void (*complete)(void** ctx, const bool* present, int size));

/// Lets the other threads of the block run before this one goes on: the step of a wait for memory that they write
/// (`what` is the message should the wait never end).
void spin(const char* what);

/// The address of shared address `at` (32 bits), checked to lie in the running block's shared window.
unsigned char* shared_at(uint32_t at, int bytes);

/// The arena address of a wgmma descriptor's start address field (14 bits of address / 16; the arena starts at a
/// 256 KB boundary of the shared window).
unsigned char* descriptor_at(uint64_t desc, int bytes);

/// A tensor map as cuTensorMapEncodeTiled writes it here (into the 128 opaque bytes of a CUtensorMap) and the TMA
/// copies read it: axes innermost first, strides[0] the element size.
struct TensorMap {
    uint64_t magic;
    uint64_t address;
    uint32_t rank, swizzle_bytes;  // swizzle_bytes: 0 (none) or 128
    uint64_t dims[5];
    uint64_t strides[4];  // bytes between indices of axes 1..4
    uint16_t box[5];   // boxDim: the box spans box[i] indices of axis i ...
    uint8_t steps[5];  // ... of which it copies every steps[i]-th (elementStrides): ceil(box / steps) of them
    uint32_t elem;
};
constexpr uint64_t TENSOR_MAP_MAGIC = 0x70616d726f736e65ull;
static_assert(sizeof(TensorMap) <= 128, "fits a CUtensorMap");

/// The name of the kernel now running, for messages.
extern const char* kernel_name;
/// The running launch's dynamic shared memory in bytes (PTX's %dynamic_smem_size).
extern unsigned dyn_smem_bytes;
}  // namespace emu
