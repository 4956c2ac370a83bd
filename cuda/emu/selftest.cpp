// selftest.cpp: the emulator's own checks, run by `scripts/cuda_emu.sh build` before any GPU
// test uses it: barriers order shared memory, shuffles and __any_sync see every lane, a
// `__syncthreads` that only some threads reach is reported as a deadlock instead of hanging,
// a shuffle reading a returned lane is an error, a missing barrier reads stale shared memory in
// one of the two schedules, and a kernel writing past its allocation fails its launch.
// Build and run: scripts/cuda_emu.sh build (linked with driver.cpp and runtime.cpp).
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstring>
#include <string>

#include "runtime.h"

// The driver entries the guard-zone check goes through (driver.cpp).
extern "C" {
int cuMemAlloc_v2(unsigned long long* p, size_t n);
int cuMemFree_v2(unsigned long long p);
int cuModuleLoadData(void** m, const void* image);
int cuModuleGetFunction(const qlr_emu::Kernel** f, void* m, const char* name);
int cuLaunchKernel(const qlr_emu::Kernel* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                   unsigned bz, unsigned smem, void* stream, void** params, void** extra);
}

namespace {
int failures = 0;
void expect(bool ok, const char* what) {
    if (!ok) {
        std::fprintf(stderr, "cuda-emu selftest FAILED: %s\n", what);
        failures++;
    }
}

// out[b] = Σ threadIdx.x over the block, through shared memory, a barrier and warp shuffles.
__global__ void block_sum(int* out) {
    __shared__ int part[32];
    int v = int(threadIdx.x);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        int s = 0;
        for (unsigned w = 0; w < blockDim.x / 32; ++w) s += part[w];
        out[blockIdx.x] = s;
    }
}
// Each thread reads its right neighbour's value after the barrier (a missing barrier would
// read the previous block's values: all fibers run one at a time).
__global__ void rotate(int* out) {
    __shared__ int v[256];
    v[threadIdx.x] = int(blockIdx.x * 1000 + threadIdx.x);
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = v[(threadIdx.x + 1) % blockDim.x];
}
__global__ void any_lane(int* out) {
    const bool p = threadIdx.x == 37;
    out[threadIdx.x] = __any_sync(0xffffffffu, p);
}
// Half a warp waits at __syncthreads, the other half in a shuffle: on a GPU this hangs.
__global__ void divergent_barrier(int* out) {
    if ((threadIdx.x & 31) < 16)
        __syncthreads();
    else
        out[threadIdx.x & 31] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
}
__global__ void shuffle_from_returned_lane(int* out) {
    if (threadIdx.x == 5) return;
    out[threadIdx.x] = __shfl_sync(0xffffffffu, int(threadIdx.x), 5);
}

// Reads its right neighbour's slot with no barrier between the write and the read (a race):
// out[t] = 1 when the neighbour had already written this launch's tag (out[64]).
__global__ void neighbour_without_barrier(int* out) {
    __shared__ int v[64];
    const int tag = out[64];
    v[threadIdx.x] = tag;
    out[threadIdx.x] = v[(threadIdx.x + 1) % 64] == tag;
}
// Thread t writes p[n + t]: thread 0 writes the first int past an n-int allocation.
__global__ void write_past_end(int* p, int n) { p[n + threadIdx.x] = 1; }
// Reads p[n], n ints in: past the end when the allocation holds fewer.
__global__ void read_at(int* p, int n) { p[0] = p[n]; }

std::string launch(void (*k)(int*), const char* name, unsigned grid, unsigned block, int* arg) {
    static qlr_emu::Registrar* reg = nullptr;
    reg = new qlr_emu::Registrar("selftest", name, k);
    void* params[] = {&arg};
    return qlr_emu::run(qlr_emu::Launch{&reg->k, {grid, 1, 1}, {block, 1, 1}, 0, params});
}
}  // namespace

int main() {
    int sums[3] = {0, 0, 0};
    expect(launch(block_sum, "block_sum", 3, 256, sums).empty(), "block_sum launch");
    expect(sums[0] == 255 * 256 / 2 && sums[2] == sums[0], "block_sum value");

    static int rot[2 * 256];
    expect(launch(rotate, "rotate", 2, 256, rot).empty(), "rotate launch");
    expect(rot[0] == 1 && rot[255] == 0 && rot[256 + 255] == 1000, "barrier orders shared memory");

    int any[64] = {};
    expect(launch(any_lane, "any_lane", 1, 64, any).empty(), "any launch");
    expect(any[0] == 0 && any[32] == 1 && any[63] == 1, "__any_sync is per warp");

    int dummy[32];
    const std::string e1 = launch(divergent_barrier, "divergent_barrier", 1, 64, dummy);
    expect(e1.find("deadlock") != std::string::npos, "divergent __syncthreads is a deadlock error");
    const std::string e2 = launch(shuffle_from_returned_lane, "shuffle_from_returned_lane", 1, 32, dummy);
    expect(e2.find("not active") != std::string::npos, "shuffle from a returned lane is an error");

    // Forward: thread 63 alone sees its neighbour's (thread 0's) write; reverse: all but 63 do.
    static int race[65];
    race[64] = 1;
    expect(launch(neighbour_without_barrier, "neighbour_without_barrier", 1, 64, race).empty(), "race launch");
    expect(race[0] == 0 && race[62] == 0 && race[63] == 1, "forward schedule: threads run first to last");
    qlr_emu::set_schedule(qlr_emu::Schedule::Reverse);
    race[64] = 2;
    expect(launch(neighbour_without_barrier, "neighbour_without_barrier", 1, 64, race).empty(), "race launch");
    expect(race[0] == 1 && race[62] == 1 && race[63] == 0, "reverse schedule: threads run last to first");
    qlr_emu::set_schedule(qlr_emu::Schedule::Forward);

    std::printf("cuda-emu selftest: the next two 'wrote outside the allocation' lines are expected\n");
    std::fflush(stdout);
    // Guard zones: a launch that writes one int past its 40-byte allocation fails, and a later
    // in-bounds launch on the same allocation succeeds (the canaries were restored).
    static qlr_emu::Registrar overrun("selftest", "qlr_selftest_write_past_end", write_past_end);
    // cuModuleGetFunction looks for the entry's name inside the image: an ELF header whose
    // section table (0 entries) starts after the name is the smallest image it accepts.
    unsigned char image[256] = {0x7f, 'E', 'L', 'F', 2};
    const unsigned long long shoff = 192;
    std::memcpy(image + 0x28, &shoff, 8);
    std::strcpy(reinterpret_cast<char*>(image) + 64, "qlr_selftest_write_past_end");
    void* module = nullptr;
    const qlr_emu::Kernel* fn = nullptr;
    unsigned long long buf = 0;
    expect(cuModuleLoadData(&module, image) == 0 && cuModuleGetFunction(&fn, module, "qlr_selftest_write_past_end") == 0,
           "selftest module");
    expect(cuMemAlloc_v2(&buf, 10 * sizeof(int)) == 0, "cuMemAlloc");
    int* p = reinterpret_cast<int*>(buf);
    int n = 10;
    void* args[] = {&p, &n};
    expect(cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, nullptr, args, nullptr) == 700, "a write past the end fails");
    n = 0;
    expect(cuLaunchKernel(fn, 1, 1, 1, 10, 1, 1, 0, nullptr, args, nullptr) == 0, "in-bounds writes pass");
    p = reinterpret_cast<int*>(buf) - 1;
    expect(cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, nullptr, args, nullptr) == 700, "a write before the start fails");
    expect(cuMemFree_v2(buf) == 0, "cuMemFree");

    // A read 64 ints (256 bytes, one granule) past the end of a 40-byte allocation hits the
    // inaccessible page after it: the launch aborts the process with a message (in a child).
    static qlr_emu::Registrar reader("selftest", "qlr_selftest_read_at", read_at);
    std::strcpy(reinterpret_cast<char*>(image) + 64, "qlr_selftest_read_at");
    expect(cuModuleLoadData(&module, image) == 0 && cuModuleGetFunction(&fn, module, "qlr_selftest_read_at") == 0,
           "selftest module");
    expect(cuMemAlloc_v2(&buf, 10 * sizeof(int)) == 0, "cuMemAlloc");
    p = reinterpret_cast<int*>(buf);
    n = 9;
    expect(cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, nullptr, args, nullptr) == 0, "an in-bounds read passes");
    std::printf("cuda-emu selftest: the next 'read or wrote past the end' line is expected\n");
    std::fflush(stdout);
    const pid_t child = fork();
    if (child == 0) {
        n = 64;
        cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, nullptr, args, nullptr);
        _exit(0);  // not reached when the guard page works
    }
    int status = 0;
    waitpid(child, &status, 0);
    expect(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT, "a read past the guard page aborts the launch");
    expect(cuMemFree_v2(buf) == 0, "cuMemFree");

    if (failures == 0) std::printf("cuda-emu selftest: ok\n");
    return failures == 0 ? 0 : 1;
}
