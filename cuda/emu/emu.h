// emu.h: what a cuda/*.cu kernel needs from CUDA to compile as host C++ under the CPU
// emulator (cuda/emu/README.md). Each emulated kernel file is one translation unit:
//     #include "emu.h"
//     namespace qlr_emu_<file> {
//     #include "<file>.cu"
//     }
// so helpers with the same name in two kernel files stay distinct (NVRTC compiles each file
// alone too). Semantics follow the CUDA programming guide / PTX ISA: a block's threads share
// `__shared__` memory and meet at __syncthreads; a warp's 32 lanes meet at every *_sync
// collective; mma.sync m16n8k16 computes the documented fragment layout. What the emulator does
// NOT model: timing, memory-ordering races inside a block (threads run one at a time between
// barriers), and device-specific rounding of expf/rsqrtf (host libm is used).
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cuda_bf16.h"

namespace qlr_emu {
struct Dim {
    unsigned x, y, z;
};
// One CUDA thread of the block being run (a fiber; see runtime.cpp).
struct Thread {
    Dim tid;
    int linear;  // x + y·bx + z·bx·by
};
extern thread_local Thread* cur;
extern thread_local Dim block_idx, block_dim, grid_dim;
extern thread_local unsigned char* dyn_smem;

void syncthreads();
// Every live lane of the calling warp passes `v` and receives lane `src`'s value.
uint64_t warp_exchange(uint64_t v, int src);
// OR over the live lanes' predicates.
bool warp_any(bool p);
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 d = a·b + d for the calling warp.
void mma_m16n8k16_bf16(float* d, const unsigned* a, const unsigned* b);
int lane_id();
}  // namespace qlr_emu

#define threadIdx (qlr_emu::cur->tid)
#define blockIdx (qlr_emu::block_idx)
#define blockDim (qlr_emu::block_dim)
#define gridDim (qlr_emu::grid_dim)

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __constant__ static
// One copy for the process: blocks run one at a time, all fibers of a block on one OS thread
// (runtime.cpp), which also makes every atomic's order, and so every result, reproducible.
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define QLR_EMU 1

struct __attribute__((aligned(16))) uint4 {
    unsigned x, y, z, w;
};
struct __attribute__((aligned(8))) uint2 {
    unsigned x, y;
};
struct __attribute__((aligned(16))) float4 {
    float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

inline void __syncthreads() { qlr_emu::syncthreads(); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
template <typename T> inline T __ldg(const T* p) { return *p; }
// Another block's writes, read without a stale cache line (a plain atomic load here).
template <typename T> inline T __ldcg(const T* p) {
    T v;
    __atomic_load(p, &v, __ATOMIC_RELAXED);
    return v;
}

// IEEE single operations with one rounding (the build uses -ffp-contract=off, so no
// expression below is fused behind our back).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
template <typename To, typename From> inline To qlr_emu_bit_cast(From v) {
    static_assert(sizeof(To) == sizeof(From), "bit cast between sizes");
    To out;
    std::memcpy(&out, &v, sizeof(To));
    return out;
}
inline float __int_as_float(int i) { return qlr_emu_bit_cast<float>(i); }
inline float __uint_as_float(unsigned u) { return qlr_emu_bit_cast<float>(u); }
inline int __float_as_int(float f) { return qlr_emu_bit_cast<int>(f); }
inline unsigned __float_as_uint(float f) { return qlr_emu_bit_cast<unsigned>(f); }
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;

// CUDA's integer min/max overloads (device functions in the global namespace).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

// Warp collectives: every live lane of the warp must take part (the kernels only use the
// full mask), which is what the emulator checks by making them wait for each other.
template <typename T> inline T qlr_emu_shfl(T v, int src) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 64 bits");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    bits = qlr_emu::warp_exchange(bits, src & 31);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int mask) {
    return qlr_emu_shfl(v, qlr_emu::lane_id() ^ mask);
}
template <typename T> inline T __shfl_sync(unsigned, T v, int src) { return qlr_emu_shfl(v, src); }
inline bool __any_sync(unsigned, bool p) { return qlr_emu::warp_any(p); }

// Atomics: blocks run one at a time, but a kernel's atomics stay atomics (no assumption of
// that in the kernels' code).
// Floating-point add as a compare-and-swap loop (what the GPU does in one instruction).
template <typename T> inline T qlr_emu_atomic_add_fp(T* p, T v) {
    T old, upd;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    do {
        upd = old + v;
    } while (!__atomic_compare_exchange(p, &old, &upd, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
    return old;
}
inline float atomicAdd(float* p, float v) { return qlr_emu_atomic_add_fp(p, v); }
inline double atomicAdd(double* p, double v) { return qlr_emu_atomic_add_fp(p, v); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
