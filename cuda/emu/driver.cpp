// driver.cpp: libcuda.so for the CPU emulator (cuda/emu/README.md) — the CUDA driver API
// entries qlora-cuda (through cudarc) calls, over host memory. "Device" pointers are host
// addresses; every stream is synchronous (work runs when enqueued, so stream order holds
// trivially); modules are the NVRTC cubins qlora-cuda compiled, kept to check that each entry
// asked for is in its cubin, while the code that runs is the same kernel source compiled for
// the host (kernels_*.cpp).
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "runtime.h"

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUstream;
typedef void* CUmodule;
typedef void* CUevent;
typedef const qlr_emu::Kernel* CUfunction;
struct CUmemLocation {
    int type;
    int id;
};

enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_LAUNCH_FAILED = 719,
};

namespace {
// What the emulator reports as its device: an H100's numbers where a caller sizes work by
// them; memory is QLR_EMU_MEM_MIB (default 16 GiB) of host memory.
constexpr int kSmCount = 132;
constexpr int kSmemOptin = 232448;
constexpr int kSmemDefault = 48 << 10;

size_t total_mem() {
    const char* e = std::getenv("QLR_EMU_MEM_MIB");
    return (e ? size_t(std::atoll(e)) : size_t(16384)) << 20;
}

// Managed allocations start on the host (first touch is the host's in every use here) and
// count as device memory only while prefetched there, so cuMemGetInfo shows what paging frees.
struct Alloc {
    size_t bytes;
    bool managed;
    bool on_device;
    unsigned char* map;  // the mapping it lies in (see alloc)
    size_t map_len;
};
// Every allocation ends where an inaccessible page begins (rounded up to 256 bytes, as the
// driver aligns), and has canary bytes before it (kGuard) and in the rest of its last 256-byte
// granule. A kernel that reads or writes past the page faults, and the launch's SIGSEGV handler
// names the kernel and the allocation; a write into the canaries (a tile row past M, a store
// before the start) fails the launch after it returns. On the GPU the first would corrupt a
// neighbour silently or, past the 2 MiB page, fault with an illegal address; the second corrupts
// silently. Reads inside the last granule or before the start are not caught
// (compute-sanitizer on the GPU machine is the check for those).
constexpr size_t kGuard = 256;
constexpr unsigned char kCanary = 0xc3;
std::mutex mem_mutex;
std::map<uintptr_t, Alloc> allocs;
size_t used = 0;

// The allocation [p, p + n) lies in, or nullptr if it crosses or misses every allocation.
const Alloc* find(uintptr_t p, size_t n, uintptr_t* base = nullptr) {
    auto it = allocs.upper_bound(p);
    if (it == allocs.begin()) return nullptr;
    --it;
    if (p + n > it->first + it->second.bytes) return nullptr;
    if (base) *base = it->first;
    return &it->second;
}

bool trace() {
    static const bool on = std::getenv("QLR_EMU_TRACE") != nullptr;
    return on;
}
void log(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::fputs("qlora-emu: ", stderr);
    std::vfprintf(stderr, fmt, ap);
    std::fputc('\n', stderr);
    va_end(ap);
}

CUresult alloc(CUdeviceptr* out, size_t bytes, bool managed) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> g(mem_mutex);
    if (bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    if (!managed && used + bytes > total_mem()) return CUDA_ERROR_OUT_OF_MEMORY;
    const size_t rounded = (bytes + 255) / 256 * 256;
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    const size_t data = (kGuard + rounded + page - 1) / page * page;
    void* m = mmap(nullptr, data + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    auto* map = static_cast<unsigned char*>(m);
    if (mprotect(map + data, page, PROT_NONE) != 0) {
        munmap(m, data + page);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    unsigned char* p = map + data - rounded;
    std::memset(p - kGuard, kCanary, kGuard);
    // cuMemAlloc returns uninitialised memory: NaN bytes make reliance on zeros visible.
    std::memset(p, 0xff, bytes);
    std::memset(p + bytes, kCanary, rounded - bytes);
    allocs[uintptr_t(p)] = Alloc{bytes, managed, !managed, map, data + page};
    if (!managed) used += bytes;
    *out = CUdeviceptr(uintptr_t(p));
    return CUDA_SUCCESS;
}

// The first allocation whose guard zones a launch of `kernel` changed, logged; false if none.
// Restores the canaries so that one overrun is reported once.
bool guards_broken(const char* kernel) {
    std::lock_guard<std::mutex> g(mem_mutex);
    bool broken = false;
    for (const auto& [addr, a] : allocs) {
        auto* p = reinterpret_cast<unsigned char*>(addr);
        const size_t tail = (a.bytes + 255) / 256 * 256 - a.bytes;
        long long first = 0;
        bool hit = false;
        for (size_t i = 0; i < kGuard && !hit; ++i)
            if (p[-ptrdiff_t(kGuard) + ptrdiff_t(i)] != kCanary) hit = true, first = -(long long)(kGuard - i);
        for (size_t i = 0; i < tail && !hit; ++i)
            if (p[a.bytes + i] != kCanary) hit = true, first = (long long)(a.bytes + i);
        if (!hit) continue;
        log("launch %s wrote outside the allocation [%#llx, +%zu): byte %+lld", kernel, (unsigned long long)addr,
            a.bytes, first);
        std::memset(p - kGuard, kCanary, kGuard);
        std::memset(p + a.bytes, kCanary, tail);
        broken = true;
        break;
    }
    return broken;
}

// The kernel of the launch in progress, for the SIGSEGV handler.
const char* launching = nullptr;

// A fault inside a launch: name the kernel and the allocation whose guard page it hit, then
// abort (the fiber cannot be resumed). Best effort, like any crash report: it reads `allocs`
// without the lock (launches run with no allocation in progress on their thread).
void on_fault(int, siginfo_t* info, void*) {
    const auto addr = reinterpret_cast<uintptr_t>(info->si_addr);
    char msg[320];
    int n = std::snprintf(msg, sizeof msg,
                          "qlora-emu: launch %s faulted at %#llx: not next to any allocation (a wild pointer, or a "
                          "kernel thread's stack overflowed: raise QLR_EMU_STACK_KIB)\n",
                          launching ? launching : "?", (unsigned long long)addr);
    for (const auto& [base, a] : allocs) {
        const uintptr_t guard = reinterpret_cast<uintptr_t>(a.map) + a.map_len - size_t(sysconf(_SC_PAGESIZE));
        if (addr >= guard && addr < reinterpret_cast<uintptr_t>(a.map) + a.map_len) {
            n = std::snprintf(msg, sizeof msg,
                              "qlora-emu: launch %s read or wrote past the end of the allocation [%#llx, +%zu): byte "
                              "+%llu\n",
                              launching ? launching : "?", (unsigned long long)base, a.bytes,
                              (unsigned long long)(addr - base));
            break;
        }
    }
    if (n > 0) (void)!write(2, msg, std::min(size_t(n), sizeof msg - 1));
    std::abort();
}

// Runs `launch` with on_fault as the SIGSEGV handler (the process's own handler otherwise:
// Rust's stack-overflow detection).
std::string run_guarded(const qlr_emu::Launch& l) {
    struct sigaction sa = {}, old = {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    launching = l.kernel->name;
    sigaction(SIGSEGV, &sa, &old);
    std::string err = qlr_emu::run(l);
    sigaction(SIGSEGV, &old, nullptr);
    launching = nullptr;
    return err;
}

CUresult check_range(CUdeviceptr p, size_t n, const char* op) {
    if (n == 0) return CUDA_SUCCESS;
    std::lock_guard<std::mutex> g(mem_mutex);
    if (!find(uintptr_t(p), n)) {
        log("%s: [%#llx, +%zu) is not inside one device allocation", op, p, n);
        return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

struct Module {
    std::vector<unsigned char> image;
};
struct Func {
    const qlr_emu::Kernel* kernel;
    int max_dyn_smem;
};
std::mutex func_mutex;
std::map<std::string, Func*> funcs;

struct Event {
    std::chrono::steady_clock::time_point t;
    bool recorded = false;
};
int ctx_token, stream_token;
thread_local CUcontext current_ctx = nullptr;
}  // namespace

extern "C" {
// For the emulator's cuBLASLt (cublaslt.cpp), which checks its matrices' extents.
__attribute__((visibility("default"))) int qlr_emu_inside_allocation(const void* p, size_t n) {
    std::lock_guard<std::mutex> g(mem_mutex);
    return find(reinterpret_cast<uintptr_t>(p), n) != nullptr;
}
CUresult cuInit(unsigned) { return CUDA_SUCCESS; }
CUresult cuDriverGetVersion(int* v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = 13000;
    return CUDA_SUCCESS;
}
CUresult cuGetErrorName(CUresult e, const char** s) {
    static std::map<int, std::string> names;
    static std::mutex m;
    std::lock_guard<std::mutex> g(m);
    auto& n = names[e];
    if (n.empty()) n = "CUDA_EMU_ERROR_" + std::to_string(e);
    *s = n.c_str();
    return CUDA_SUCCESS;
}
CUresult cuGetErrorString(CUresult e, const char** s) { return cuGetErrorName(e, s); }

CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return CUDA_ERROR_INVALID_VALUE;
    *d = 0;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    std::snprintf(name, size_t(len), "qlora CPU emulator (sm_90 semantics, no GPU)");
    return CUDA_SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t* b, CUdevice) {
    *b = total_mem();
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
    switch (attr) {
        case 1: *v = 1024; break;                 // MAX_THREADS_PER_BLOCK
        case 2: case 3: *v = 1024; break;          // MAX_BLOCK_DIM_X/Y
        case 4: *v = 64; break;                    // MAX_BLOCK_DIM_Z
        case 5: *v = 2147483647; break;            // MAX_GRID_DIM_X
        case 6: case 7: *v = 65535; break;         // MAX_GRID_DIM_Y/Z
        case 8: *v = kSmemDefault; break;          // MAX_SHARED_MEMORY_PER_BLOCK
        case 10: *v = 32; break;                   // WARP_SIZE
        case 16: *v = kSmCount; break;             // MULTIPROCESSOR_COUNT
        case 75: *v = 9; break;                    // COMPUTE_CAPABILITY_MAJOR
        case 76: *v = 0; break;                    // COMPUTE_CAPABILITY_MINOR
        case 83: case 89: *v = 1; break;           // MANAGED_MEMORY, CONCURRENT_MANAGED_ACCESS
        case 97: *v = kSmemOptin; break;           // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        default: *v = 0; break;
    }
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetUuid(void* u, CUdevice) {
    std::memset(u, 0, 16);
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetUuid_v2(void* u, CUdevice d) { return cuDeviceGetUuid(u, d); }

CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice) {
    *c = &ctx_token;
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(CUcontext c) {
    current_ctx = c;
    return CUDA_SUCCESS;
}
CUresult cuCtxGetCurrent(CUcontext* c) {
    *c = current_ctx;
    return CUDA_SUCCESS;
}
CUresult cuCtxSynchronize() { return CUDA_SUCCESS; }
CUresult cuCtxSetFlags(unsigned) { return CUDA_SUCCESS; }
CUresult cuCtxGetStreamPriorityRange(int* lo, int* hi) {
    if (lo) *lo = 0;
    if (hi) *hi = 0;
    return CUDA_SUCCESS;
}

CUresult cuStreamCreate(CUstream* s, unsigned) {
    *s = &stream_token;
    return CUDA_SUCCESS;
}
CUresult cuStreamCreateWithPriority(CUstream* s, unsigned f, int) { return cuStreamCreate(s, f); }
CUresult cuStreamDestroy_v2(CUstream) { return CUDA_SUCCESS; }
CUresult cuStreamSynchronize(CUstream) { return CUDA_SUCCESS; }
CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return CUDA_SUCCESS; }

CUresult cuEventCreate(CUevent* e, unsigned) {
    *e = new Event();
    return CUDA_SUCCESS;
}
CUresult cuEventDestroy_v2(CUevent e) {
    delete static_cast<Event*>(e);
    return CUDA_SUCCESS;
}
CUresult cuEventRecord(CUevent e, CUstream) {
    auto* ev = static_cast<Event*>(e);
    ev->t = std::chrono::steady_clock::now();
    ev->recorded = true;
    return CUDA_SUCCESS;
}
CUresult cuEventSynchronize(CUevent) { return CUDA_SUCCESS; }
CUresult cuEventQuery(CUevent) { return CUDA_SUCCESS; }
CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) {
    auto *ea = static_cast<Event*>(a), *eb = static_cast<Event*>(b);
    if (!ea->recorded || !eb->recorded) return CUDA_ERROR_INVALID_HANDLE;
    *ms = std::chrono::duration<float, std::milli>(eb->t - ea->t).count();
    return CUDA_SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) { return cuEventElapsedTime(ms, a, b); }

CUresult cuMemGetInfo_v2(size_t* free, size_t* total) {
    std::lock_guard<std::mutex> g(mem_mutex);
    *total = total_mem();
    *free = total_mem() - used;
    return CUDA_SUCCESS;
}
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) { return alloc(p, n, false); }
CUresult cuMemAllocManaged(CUdeviceptr* p, size_t n, unsigned) { return alloc(p, n, true); }
CUresult cuMemFree_v2(CUdeviceptr p) {
    std::lock_guard<std::mutex> g(mem_mutex);
    auto it = allocs.find(uintptr_t(p));
    if (it == allocs.end()) {
        log("cuMemFree: %#llx is not the start of an allocation", p);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (it->second.on_device) used -= it->second.bytes;
    munmap(it->second.map, it->second.map_len);
    allocs.erase(it);
    return CUDA_SUCCESS;
}
CUresult cuMemPrefetchAsync_v2(CUdeviceptr p, size_t n, CUmemLocation loc, unsigned, CUstream) {
    std::lock_guard<std::mutex> g(mem_mutex);
    uintptr_t base = 0;
    const Alloc* found = find(uintptr_t(p), n, &base);
    // The driver refuses to prefetch memory that is not managed.
    if (!found || !found->managed) {
        log("cuMemPrefetchAsync: [%#llx, +%zu) is not managed memory", p, n);
        return CUDA_ERROR_INVALID_VALUE;
    }
    Alloc& a = allocs[base];
    // Residency is tracked per allocation: qlora prefetches whole arenas.
    if (uintptr_t(p) != base || n != a.bytes) {
        log("cuMemPrefetchAsync: [%#llx, +%zu) is part of an allocation (the emulator tracks whole ones)", p, n);
        return CUDA_ERROR_INVALID_VALUE;
    }
    const bool to_device = loc.type == 1;  // CU_MEM_LOCATION_TYPE_DEVICE (HOST is 2)
    if (to_device && !a.on_device) {
        // Oversubscribing device memory with managed pages can hang a real GPU; qlora must never
        // ask for it (design.md §5), so the emulator refuses.
        if (used + a.bytes > total_mem()) {
            log("cuMemPrefetchAsync: %zu bytes to the device with %zu of %zu in use: oversubscription", a.bytes,
                used, total_mem());
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
        used += a.bytes;
    } else if (!to_device && a.on_device) {
        used -= a.bytes;
    }
    a.on_device = to_device;
    return CUDA_SUCCESS;
}
CUresult cuMemAdvise_v2(CUdeviceptr, size_t, int, CUmemLocation) { return CUDA_SUCCESS; }
CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, CUstream) {
    if (CUresult r = check_range(p, n, "cuMemsetD8Async")) return r;
    std::memset(reinterpret_cast<void*>(p), v, n);
    return CUDA_SUCCESS;
}
CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char v, size_t n) { return cuMemsetD8Async(p, v, n, nullptr); }
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* h, size_t n) {
    if (CUresult r = check_range(d, n, "cuMemcpyHtoD")) return r;
    std::memcpy(reinterpret_cast<void*>(d), h, n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* h, size_t n, CUstream) { return cuMemcpyHtoD_v2(d, h, n); }
CUresult cuMemcpyDtoH_v2(void* h, CUdeviceptr d, size_t n) {
    if (CUresult r = check_range(d, n, "cuMemcpyDtoH")) return r;
    std::memcpy(h, reinterpret_cast<const void*>(d), n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoHAsync_v2(void* h, CUdeviceptr d, size_t n, CUstream) { return cuMemcpyDtoH_v2(h, d, n); }
CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) {
    if (CUresult r = check_range(d, n, "cuMemcpyDtoD (dst)")) return r;
    if (CUresult r = check_range(s, n, "cuMemcpyDtoD (src)")) return r;
    std::memmove(reinterpret_cast<void*>(d), reinterpret_cast<const void*>(s), n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, CUstream) { return cuMemcpyDtoD_v2(d, s, n); }

// A cubin is an ELF64 image; its size is where the section header table ends.
CUresult cuModuleLoadData(CUmodule* m, const void* image) {
    const auto* p = static_cast<const unsigned char*>(image);
    if (!p || std::memcmp(p, "\x7f" "ELF", 4) != 0 || p[4] != 2) return CUDA_ERROR_INVALID_IMAGE;
    uint64_t shoff;
    uint16_t shentsize, shnum;
    std::memcpy(&shoff, p + 0x28, 8);
    std::memcpy(&shentsize, p + 0x3a, 2);
    std::memcpy(&shnum, p + 0x3c, 2);
    const size_t size = size_t(shoff) + size_t(shentsize) * shnum;
    auto* mod = new Module();
    mod->image.assign(p, p + size);
    *m = mod;
    return CUDA_SUCCESS;
}
CUresult cuModuleUnload(CUmodule m) {
    delete static_cast<Module*>(m);
    return CUDA_SUCCESS;
}
CUresult cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
    const auto* mod = static_cast<const Module*>(m);
    // The entry must be in the cubin NVRTC built (its symbol table holds the name) and in the
    // emulator's host build of the same source.
    const size_t n = std::strlen(name) + 1;
    bool in_cubin = false;
    for (size_t i = 0; !in_cubin && i + n <= mod->image.size(); ++i)
        in_cubin = std::memcmp(mod->image.data() + i, name, n) == 0;
    const qlr_emu::Kernel* k = qlr_emu::find_kernel(name);
    if (!in_cubin || !k) {
        if (trace()) log("cuModuleGetFunction(%s): in cubin %d, in host build %d", name, in_cubin, k != nullptr);
        return CUDA_ERROR_NOT_FOUND;
    }
    std::lock_guard<std::mutex> g(func_mutex);
    Func*& fn = funcs[name];
    if (!fn) fn = new Func{k, kSmemDefault};
    *f = reinterpret_cast<CUfunction>(fn);
    return CUDA_SUCCESS;
}
CUresult cuFuncSetAttribute(CUfunction f, int attr, int v) {
    auto* fn = reinterpret_cast<Func*>(const_cast<qlr_emu::Kernel*>(f));
    if (attr == 8) {  // MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (v < 0 || v > kSmemOptin) return CUDA_ERROR_INVALID_VALUE;
        fn->max_dyn_smem = v;
    }
    return CUDA_SUCCESS;
}
CUresult cuFuncGetAttribute(int* v, int, CUfunction) {
    *v = 0;
    return CUDA_SUCCESS;
}
CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned smem, CUstream, void** params, void** extra) {
    auto* fn = reinterpret_cast<Func*>(const_cast<qlr_emu::Kernel*>(f));
    if (!fn || extra) return CUDA_ERROR_INVALID_VALUE;
    // The launch checks the GPU makes: block size, grid limits, dynamic shared memory above
    // 48 KiB only after cuFuncSetAttribute raised the function's limit.
    if (size_t(bx) * by * bz > 1024 || bz > 64 || gy > 65535 || gz > 65535 || gx == 0 || gy == 0 || gz == 0 ||
        bx == 0 || by == 0 || bz == 0) {
        log("launch %s: grid (%u,%u,%u) block (%u,%u,%u) out of the device's limits", fn->kernel->name, gx, gy, gz,
            bx, by, bz);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (int(smem) > fn->max_dyn_smem) {
        log("launch %s: %u bytes of dynamic shared memory, function limit %d", fn->kernel->name, smem,
            fn->max_dyn_smem);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (trace())
        log("launch %s grid (%u,%u,%u) block (%u,%u,%u) smem %u", fn->kernel->name, gx, gy, gz, bx, by, bz, smem);
    const qlr_emu::Launch l{fn->kernel, {gx, gy, gz}, {bx, by, bz}, smem, params};
    const std::string err = run_guarded(l);
    if (!err.empty()) {
        log("launch %s failed: %s", fn->kernel->name, err.c_str());
        return CUDA_ERROR_LAUNCH_FAILED;
    }
    if (guards_broken(fn->kernel->name)) return CUDA_ERROR_ILLEGAL_ADDRESS;
    return CUDA_SUCCESS;
}
}
