// selftest.cpp: the emulator's own checks, run by `scripts/cuda_emu.sh build` before any GPU
// test uses it: barriers order shared memory, shuffles and __any_sync see every lane, a
// `__syncthreads` that only some threads reach is reported as a deadlock instead of hanging,
// and a shuffle reading a returned lane is an error.
// Build and run: scripts/cuda_emu.sh build.
#include <cstdio>
#include <string>

#include "runtime.h"

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

    if (failures == 0) std::printf("cuda-emu selftest: ok\n");
    return failures == 0 ? 0 : 1;
}
