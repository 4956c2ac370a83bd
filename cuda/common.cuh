// common.cuh: helpers shared by every cuda/*.cu (pasted in front of each file by the loader,
// see qlora_cuda::kernels::source; NVRTC gets one translation unit per file).
// Precision policy: storage T is float or __nv_bfloat16; all arithmetic is f32; conversions
// to bf16 round to nearest even (__float2bfloat16_rn), once, at the store.
#pragma once
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;
typedef unsigned char u8;

__device__ __forceinline__ float qlr_to_f32(float x) { return x; }
__device__ __forceinline__ float qlr_to_f32(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T qlr_from_f32(float x);
template <> __device__ __forceinline__ float qlr_from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 qlr_from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float qlr_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float qlr_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Block-wide sum for blockDim.x a multiple of 32 (<= 1024); every thread gets the result.
// `scratch` holds 32 floats of shared memory; the trailing barrier makes it reusable.
__device__ __forceinline__ float qlr_block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = qlr_warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nw ? scratch[lane] : 0.f;
    t = qlr_warp_sum(t);
    __syncthreads();
    return t;
}
__device__ __forceinline__ float qlr_block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = qlr_warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nw ? scratch[lane] : -__int_as_float(0x7f800000);
    t = qlr_warp_max(t);
    __syncthreads();
    return t;
}

// The NF4 code book (specs/nf4.md §1), as exact f32 bit patterns. Indexing a __constant__
// array with per-lane codes serializes; hot loops copy it to shared memory first
// (qlr_nf4_lut_to_smem) and index that.
__constant__ unsigned qlr_nf4_bits[16] = {
    0xbf800000u, 0xbf3239b1u, 0xbf066b30u, 0xbeca32a0u, 0xbe91a24du, 0xbe3d353fu,
    0xbdba7871u, 0x00000000u, 0x3da2faffu, 0x3e24cae3u, 0x3e7c04ddu, 0x3ead033au,
    0x3ee1a4b8u, 0x3f1007abu, 0x3f3913b3u, 0x3f800000u};
__device__ __forceinline__ void qlr_nf4_lut_to_smem(float* lut) {
    if (threadIdx.x < 16) lut[threadIdx.x] = __uint_as_float(qlr_nf4_bits[threadIdx.x]);
}

// Per-block scale of an NF4 tensor (specs/nf4.md §4). With double quantization
// (`codes != nullptr`): f32(f32(map[code] * nested[b / 256]) + offset), two roundings, no FMA
// (the CPU reference rounds twice); otherwise the stored f32 absmax.
struct QlrNf4 {
    const u8* packed;          // ((n + 1) / 2,) u8, first element in the high nibble
    const float* absmax;       // (n_blocks,) f32, or nullptr with double quant
    const u8* codes;           // (n_blocks,) u8 codes into `dyn_map` (double quant)
    const float* nested;       // (ceil(n_blocks / 256),) f32 (double quant)
    const float* dyn_map;      // (256,) f32 signed dynamic map (double quant)
    float offset;              // mean of the original absmax (double quant)
    int blocksize;             // QB
};
__device__ __forceinline__ float qlr_nf4_scale(const QlrNf4& w, long long block) {
    if (w.codes == nullptr) return w.absmax[block];
    return __fadd_rn(__fmul_rn(w.dyn_map[w.codes[block]], w.nested[block >> 8]), w.offset);
}
// Dequantized element as the exact f32 product NF4[c] * scale (one rounding, like the CPU).
__device__ __forceinline__ float qlr_nf4_deq(const float* lut, unsigned code, float scale) {
    return __fmul_rn(lut[code & 15u], scale);
}

// mma.sync m16n8k16, bf16 inputs, f32 accumulate: d = a·b + d for the whole warp (fragment
// layout: PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"). The CPU
// emulator (cuda/emu) defines QLR_EMU and computes the same product from the same fragments.
__device__ __forceinline__ void mma_bf16_16816(float* d, const unsigned* a, const unsigned* b) {
#ifdef QLR_EMU
    qlr_emu::mma_m16n8k16_bf16(d, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Dynamic shared memory `name` of element type T (16-byte aligned). Under the emulator it is
// the per-block buffer the launch sized, since host C++ has no `extern __shared__`.
#ifdef QLR_EMU
#define QLR_DYN_SMEM(T, name) T* name = reinterpret_cast<T*>(qlr_emu::dyn_smem)
#else
#define QLR_DYN_SMEM(T, name) extern __shared__ __align__(16) T name[]
#endif
