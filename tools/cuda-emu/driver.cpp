// cuda-emu: the CUDA driver API as the engine (through cudarc) calls it, over host memory, with kernels run by
// fibers.cpp. One device ("cuda-emu (CPU emulation of sm_90a)"), everything synchronous: a stream operation is done
// when its call returns. Device allocations are separate mappings that end at an inaccessible page (an access past
// the end faults, and the handler names the kernel), and start filled with 0xff bytes (NaN in float32 and bf16), as
// device memory starts with garbage.
#include <cuda.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <map>
#include <mutex>
#include <string>

#include "internal.h"

namespace emu {
void launch(const char* name, void (*fn)(void**), void** args, uint3 grid, uint3 block, unsigned smem);

/// The kernels compiled into this library, registered by the code build.py appends to each kernel file.
struct Kernel {
    const char* name;
    void (*fn)(void**);
    int max_dynamic_smem = 48 * 1024;
};
std::map<std::string, Kernel>& registry() {
    static std::map<std::string, Kernel> r;
    return r;
}
}  // namespace emu

// Called by the code build.py generates.
extern "C" void emu_register(const char* name, void (*fn)(void**)) { emu::registry()[name] = emu::Kernel{name, fn}; }

namespace {
std::recursive_mutex lock;
struct Mapping {
    void* base;
    size_t length, bytes;
};
std::map<uintptr_t, Mapping> allocations;
size_t used = 0, used_high = 0;
const size_t page = 4096;
int dummy_context, dummy_pool, dummy_module;

void on_fault(int sig, siginfo_t* info, void*) {
    char msg[256];
    const int n = snprintf(msg, sizeof msg, "cuda-emu: %s at address %p in kernel %s (block %u %u %u)\n",
                           sig == SIGSEGV ? "segmentation fault" : "bus error", info->si_addr, emu::kernel_name,
                           emu::block_idx.x, emu::block_idx.y, emu::block_idx.z);
    if (write(2, msg, n) < 0) {
    }
    signal(sig, SIG_DFL);
    raise(sig);
}

void install_fault_handler() {
    static bool done = false;
    if (done) return;
    done = true;
    static char altstack[64 * 1024];
    stack_t ss{};
    ss.ss_sp = altstack;
    ss.ss_size = sizeof altstack;
    sigaltstack(&ss, nullptr);
    struct sigaction sa{};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);
}

CUresult allocate(CUdeviceptr* out, size_t bytes) {
    std::lock_guard<std::recursive_mutex> g(lock);
    const size_t body = (bytes + page - 1) / page * page;
    const size_t length = body + page;
    void* base = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    mprotect((char*)base + body, page, PROT_NONE);
    // The end of the buffer, rounded up to 256 bytes (the driver's alignment), touches the guard page.
    const size_t rounded = (bytes + 255) / 256 * 256;
    char* p = (char*)base + body - rounded;
    memset(p, 0xff, rounded);
    allocations[(uintptr_t)p] = Mapping{base, length, bytes};
    used += bytes;
    used_high = std::max(used_high, used);
    *out = (CUdeviceptr)p;
    return CUDA_SUCCESS;
}

CUresult release(CUdeviceptr p) {
    std::lock_guard<std::recursive_mutex> g(lock);
    auto it = allocations.find((uintptr_t)p);
    if (it == allocations.end()) return p == 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
    used -= it->second.bytes;
    munmap(it->second.base, it->second.length);
    allocations.erase(it);
    return CUDA_SUCCESS;
}

double now_ms() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}
struct Event {
    double ms = 0;
};
}  // namespace

#define API extern "C" CUresult CUDAAPI

API cuInit(unsigned) {
    install_fault_handler();
    return CUDA_SUCCESS;
}
API cuDriverGetVersion(int* v) {
    *v = 13000;
    return CUDA_SUCCESS;
}
API cuDeviceGetCount(int* n) {
    *n = 1;
    return CUDA_SUCCESS;
}
API cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *d = 0;
    return CUDA_SUCCESS;
}
API cuDeviceGetName(char* name, int len, CUdevice) {
    snprintf(name, len, "cuda-emu (CPU emulation of sm_90a)");
    return CUDA_SUCCESS;
}
API cuDeviceTotalMem(size_t* bytes, CUdevice) {
    *bytes = size_t(141) << 30;
    return CUDA_SUCCESS;
}
API cuDeviceGetUuid_v2(CUuuid* u, CUdevice) {
    memset(u, 0, sizeof *u);
    return CUDA_SUCCESS;
}
// The SMs of an H200, or CUDA_EMU_SMS: with few, the kernels that walk several tiles per block (persistent grids
// sized by the SM count) do so on the tests' small maps.
static int multiprocessors() {
    const char* sms = getenv("CUDA_EMU_SMS");
    return sms && atoi(sms) > 0 ? atoi(sms) : 132;
}
// An H200's figures, as far as the engine reads them.
API cuDeviceGetAttribute(int* v, CUdevice_attribute a, CUdevice) {
    switch (a) {
        case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *v = multiprocessors(); break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *v = 9; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *v = 0; break;
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *v = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR: *v = 2048; break;
        case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *v = 32; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: *v = 48 * 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *v = 227 * 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: *v = 228 * 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: *v = 65536; break;
        case CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE: *v = 60 << 20; break;
        case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED: *v = 1; break;
        case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: *v = 1980000; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X: *v = 0x7fffffff; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y: *v = 65535; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z: *v = 65535; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X: *v = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y: *v = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z: *v = 64; break;
        default: *v = 0;
    }
    return CUDA_SUCCESS;
}
API cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice) {
    *c = (CUcontext)&dummy_context;
    return CUDA_SUCCESS;
}
API cuDevicePrimaryCtxRelease(CUdevice) { return CUDA_SUCCESS; }
API cuCtxSetCurrent(CUcontext) { return CUDA_SUCCESS; }
API cuCtxGetCurrent(CUcontext* c) {
    *c = (CUcontext)&dummy_context;
    return CUDA_SUCCESS;
}
API cuCtxPushCurrent(CUcontext) { return CUDA_SUCCESS; }
API cuCtxPopCurrent(CUcontext* c) {
    if (c) *c = (CUcontext)&dummy_context;
    return CUDA_SUCCESS;
}
API cuCtxGetDevice(CUdevice* d) {
    *d = 0;
    return CUDA_SUCCESS;
}
API cuCtxSynchronize() { return CUDA_SUCCESS; }
API cuCtxSetFlags(unsigned) { return CUDA_SUCCESS; }
API cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    if (least) *least = 0;
    if (greatest) *greatest = 0;
    return CUDA_SUCCESS;
}
API cuStreamCreate(CUstream* s, unsigned) {
    *s = (CUstream)new int(0);
    return CUDA_SUCCESS;
}
API cuStreamCreateWithPriority(CUstream* s, unsigned, int) {
    *s = (CUstream)new int(0);
    return CUDA_SUCCESS;
}
API cuStreamDestroy(CUstream s) {
    delete (int*)s;
    return CUDA_SUCCESS;
}
API cuStreamSynchronize(CUstream) { return CUDA_SUCCESS; }
API cuStreamQuery(CUstream) { return CUDA_SUCCESS; }
API cuStreamWaitEvent(CUstream, CUevent, unsigned) { return CUDA_SUCCESS; }
API cuEventCreate(CUevent* e, unsigned) {
    *e = (CUevent) new Event();
    return CUDA_SUCCESS;
}
API cuEventDestroy(CUevent e) {
    delete (Event*)e;
    return CUDA_SUCCESS;
}
API cuEventRecord(CUevent e, CUstream) {
    ((Event*)e)->ms = now_ms();
    return CUDA_SUCCESS;
}
API cuEventSynchronize(CUevent) { return CUDA_SUCCESS; }
API cuEventQuery(CUevent) { return CUDA_SUCCESS; }
API cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) {
    *ms = (float)(((Event*)b)->ms - ((Event*)a)->ms);
    return CUDA_SUCCESS;
}

API cuMemAlloc(CUdeviceptr* p, size_t bytes) { return allocate(p, bytes); }
API cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream) { return allocate(p, bytes); }
API cuMemAllocFromPoolAsync(CUdeviceptr* p, size_t bytes, CUmemoryPool, CUstream) { return allocate(p, bytes); }
API cuMemFree(CUdeviceptr p) { return release(p); }
API cuMemFreeAsync(CUdeviceptr p, CUstream) { return release(p); }
API cuMemGetInfo(size_t* free_bytes, size_t* total) {
    *total = size_t(141) << 30;
    *free_bytes = *total - used;
    return CUDA_SUCCESS;
}
API cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    *p = malloc(bytes ? bytes : 1);
    return *p ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}
API cuMemAllocHost(void** p, size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }
API cuMemFreeHost(void* p) {
    free(p);
    return CUDA_SUCCESS;
}
API cuMemHostRegister(void*, size_t, unsigned) { return CUDA_SUCCESS; }
API cuMemHostUnregister(void*) { return CUDA_SUCCESS; }
API cuMemcpyHtoD(CUdeviceptr d, const void* s, size_t n) {
    memcpy((void*)d, s, n);
    return CUDA_SUCCESS;
}
API cuMemcpyHtoDAsync(CUdeviceptr d, const void* s, size_t n, CUstream) { return cuMemcpyHtoD(d, s, n); }
API cuMemcpyDtoH(void* d, CUdeviceptr s, size_t n) {
    memcpy(d, (const void*)s, n);
    return CUDA_SUCCESS;
}
API cuMemcpyDtoHAsync(void* d, CUdeviceptr s, size_t n, CUstream) { return cuMemcpyDtoH(d, s, n); }
API cuMemcpyDtoD(CUdeviceptr d, CUdeviceptr s, size_t n) {
    memmove((void*)d, (const void*)s, n);
    return CUDA_SUCCESS;
}
API cuMemcpyDtoDAsync(CUdeviceptr d, CUdeviceptr s, size_t n, CUstream) { return cuMemcpyDtoD(d, s, n); }
API cuMemsetD8(CUdeviceptr d, unsigned char v, size_t n) {
    memset((void*)d, v, n);
    return CUDA_SUCCESS;
}
API cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, CUstream) { return cuMemsetD8(d, v, n); }
API cuMemsetD16(CUdeviceptr d, unsigned short v, size_t n) {
    for (size_t i = 0; i < n; ++i) ((unsigned short*)d)[i] = v;
    return CUDA_SUCCESS;
}
API cuMemsetD16Async(CUdeviceptr d, unsigned short v, size_t n, CUstream) { return cuMemsetD16(d, v, n); }
API cuMemsetD32(CUdeviceptr d, unsigned v, size_t n) {
    for (size_t i = 0; i < n; ++i) ((unsigned*)d)[i] = v;
    return CUDA_SUCCESS;
}
API cuMemsetD32Async(CUdeviceptr d, unsigned v, size_t n, CUstream) { return cuMemsetD32(d, v, n); }

API cuDeviceGetDefaultMemPool(CUmemoryPool* p, CUdevice) {
    *p = (CUmemoryPool)&dummy_pool;
    return CUDA_SUCCESS;
}
API cuDeviceGetMemPool(CUmemoryPool* p, CUdevice) { return cuDeviceGetDefaultMemPool(p, 0); }
API cuMemPoolSetAttribute(CUmemoryPool, CUmemPool_attribute a, void* v) {
    std::lock_guard<std::recursive_mutex> g(lock);
    if (a == CU_MEMPOOL_ATTR_USED_MEM_HIGH) used_high = used;  // the driver only takes 0: reset to now
    (void)v;
    return CUDA_SUCCESS;
}
API cuMemPoolGetAttribute(CUmemoryPool, CUmemPool_attribute a, void* v) {
    std::lock_guard<std::recursive_mutex> g(lock);
    switch (a) {
        case CU_MEMPOOL_ATTR_USED_MEM_HIGH:
        case CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH: *(cuuint64_t*)v = used_high; break;
        case CU_MEMPOOL_ATTR_USED_MEM_CURRENT:
        case CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT: *(cuuint64_t*)v = used; break;
        default: *(cuuint64_t*)v = 0;
    }
    return CUDA_SUCCESS;
}
API cuMemPoolTrimTo(CUmemoryPool, size_t) { return CUDA_SUCCESS; }

API cuModuleLoadData(CUmodule* m, const void*) {
    *m = (CUmodule)&dummy_module;
    return CUDA_SUCCESS;
}
API cuModuleUnload(CUmodule) { return CUDA_SUCCESS; }
API cuModuleGetFunction(CUfunction* f, CUmodule, const char* name) {
    auto it = emu::registry().find(name);
    if (it == emu::registry().end()) return CUDA_ERROR_NOT_FOUND;
    *f = (CUfunction)&it->second;
    return CUDA_SUCCESS;
}
API cuFuncSetAttribute(CUfunction f, CUfunction_attribute a, int v) {
    if (a == CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) ((emu::Kernel*)f)->max_dynamic_smem = v;
    return CUDA_SUCCESS;
}
API cuFuncGetAttribute(int* v, CUfunction_attribute a, CUfunction f) {
    switch (a) {
        case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *v = 1024; break;
        case CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: *v = ((emu::Kernel*)f)->max_dynamic_smem; break;
        case CU_FUNC_ATTRIBUTE_NUM_REGS: *v = 64; break;
        default: *v = 0;
    }
    return CUDA_SUCCESS;
}
API cuFuncSetCacheConfig(CUfunction, CUfunc_cache) { return CUDA_SUCCESS; }
// Blocks per multiprocessor: as many as 2048 threads and 228 KB of shared memory allow, at most 32.
API cuOccupancyMaxActiveBlocksPerMultiprocessor(int* n, CUfunction, int threads, size_t smem) {
    int by_threads = 2048 / std::max(threads, 1), by_smem = (int)((228 * 1024) / (smem + 1024));
    *n = std::max(1, std::min({by_threads, by_smem, 32}));
    return CUDA_SUCCESS;
}
API cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* n, CUfunction f, int threads, size_t smem, unsigned) {
    return cuOccupancyMaxActiveBlocksPerMultiprocessor(n, f, threads, smem);
}
API cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned smem, CUstream, void** params, void** extra) {
    std::lock_guard<std::recursive_mutex> g(lock);
    emu::Kernel* k = (emu::Kernel*)f;
    if (extra) return CUDA_ERROR_NOT_SUPPORTED;
    if ((int)smem > std::max(k->max_dynamic_smem, 48 * 1024)) {
        fprintf(stderr, "cuda-emu: %s launched with %u bytes of dynamic shared memory above its allowance %d\n",
                k->name, smem, k->max_dynamic_smem);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if ((uint64_t)bx * by * bz > 1024 || bx * by * bz == 0 || gx == 0 || gy == 0 || gz == 0)
        return CUDA_ERROR_INVALID_VALUE;
    static const bool trace = getenv("CUDA_EMU_TRACE") != nullptr;
    if (trace) fprintf(stderr, "cuda-emu: %s grid (%u, %u, %u) block (%u, %u, %u) smem %u\n", k->name, gx, gy, gz, bx, by, bz, smem);
    emu::launch(k->name, k->fn, params, make_uint3(gx, gy, gz), make_uint3(bx, by, bz), smem);
    return CUDA_SUCCESS;
}
// Checks what the driver checks (PTX ISA and the driver API's requirements for tiled maps) for the maps the kernels
// make: no interleave, element strides of 1 to 8 (the innermost axis' ignored, as without interleave the hardware
// ignores it), the 128-byte swizzle or none.
API cuTensorMapEncodeTiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank, void* address,
                           const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box,
                           const cuuint32_t* element_strides, CUtensorMapInterleave interleave,
                           CUtensorMapSwizzle swizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill fill) {
    int elem = 0;
    switch (type) {
        case CU_TENSOR_MAP_DATA_TYPE_BFLOAT16:
        case CU_TENSOR_MAP_DATA_TYPE_FLOAT16:
        case CU_TENSOR_MAP_DATA_TYPE_UINT16: elem = 2; break;
        case CU_TENSOR_MAP_DATA_TYPE_FLOAT32: elem = 4; break;
        default: return CUDA_ERROR_NOT_SUPPORTED;
    }
    if ((uintptr_t)map % 64 || rank < 1 || rank > 5 || (uintptr_t)address % 16 || interleave != CU_TENSOR_MAP_INTERLEAVE_NONE ||
        (swizzle != CU_TENSOR_MAP_SWIZZLE_NONE && swizzle != CU_TENSOR_MAP_SWIZZLE_128B) ||
        fill != CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
        return CUDA_ERROR_INVALID_VALUE;
    emu::TensorMap m{};
    m.magic = emu::TENSOR_MAP_MAGIC;
    m.address = (uint64_t)address;
    m.rank = rank;
    m.swizzle_bytes = swizzle == CU_TENSOR_MAP_SWIZZLE_128B ? 128 : 0;
    m.elem = elem;
    for (cuuint32_t i = 0; i < rank; ++i) {
        if (dims[i] == 0 || dims[i] > (1ull << 32) || box[i] == 0 || box[i] > 256 || element_strides[i] == 0 ||
            element_strides[i] > 8)
            return CUDA_ERROR_INVALID_VALUE;
        m.dims[i] = dims[i];
        m.box[i] = box[i];
        m.steps[i] = i == 0 ? 1 : element_strides[i];
        if (i > 0) {
            if (strides[i - 1] % 16 || strides[i - 1] >= (1ull << 40)) return CUDA_ERROR_INVALID_VALUE;
            m.strides[i - 1] = strides[i - 1];
        }
    }
    const uint64_t row = (uint64_t)box[0] * elem;
    if (row % 16 || (m.swizzle_bytes && row > m.swizzle_bytes)) return CUDA_ERROR_INVALID_VALUE;
    memset(map, 0, sizeof *map);
    memcpy(map, &m, sizeof m);
    return CUDA_SUCCESS;
}
API cuLaunchHostFunc(CUstream, CUhostFn fn, void* data) {
    fn(data);
    return CUDA_SUCCESS;
}
API cuGetErrorString(CUresult e, const char** s) {
    static std::map<int, std::string> names;
    std::lock_guard<std::recursive_mutex> g(lock);
    auto& n = names[(int)e];
    if (n.empty()) n = "cuda-emu error " + std::to_string((int)e);
    *s = n.c_str();
    return CUDA_SUCCESS;
}
API cuGetErrorName(CUresult e, const char** s) { return cuGetErrorString(e, s); }

// The unversioned names, which cuda.h maps to the _v2 ones above.
#undef cuDeviceGetUuid
#undef cuEventElapsedTime
API cuDeviceGetUuid(CUuuid* u, CUdevice d) { return cuDeviceGetUuid_v2(u, d); }
API cuEventElapsedTime(float* ms, CUevent a, CUevent b) { return cuEventElapsedTime_v2(ms, a, b); }
