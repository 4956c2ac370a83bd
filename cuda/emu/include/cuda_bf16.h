// cuda_bf16.h for the CPU emulator (cuda/emu/README.md): the subset of CUDA's bf16 types and
// intrinsics that cuda/*.cu use, with the same bit-level semantics (round to nearest even on
// every float → bf16 conversion, bf16 → float exact). Only the emulator build sees this file;
// NVRTC compiles against the real header from the pinned wheel.
#pragma once
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
    uint16_t __x;
    __nv_bfloat16() = default;
    // CUDA's header converts implicitly in both directions (round to nearest even in, exact
    // out); kept so that any implicit use in a kernel behaves as it does on the device.
    __nv_bfloat16(float f);
    operator float() const {
        uint32_t u = uint32_t(__x) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};

inline uint16_t qlr_emu_f32_to_bf16_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    // NaN stays a quiet NaN with its sign (what __float2bfloat16_rn returns for NaN inputs).
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);
    // Round to nearest, ties to even: add 0x7fff plus the lowest kept bit, then truncate.
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}
inline __nv_bfloat16::__nv_bfloat16(float f) : __x(qlr_emu_f32_to_bf16_bits(f)) {}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    __nv_bfloat16 h;
    h.__x = qlr_emu_f32_to_bf16_bits(f);
    return h;
}
inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
    return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 lo, __nv_bfloat16 hi) { return __nv_bfloat162{lo, hi}; }
inline float __low2float(__nv_bfloat162 h) { return float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return float(h.y); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
    __nv_bfloat16 h;
    h.__x = u;
    return h;
}
