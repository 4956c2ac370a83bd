// swiglu.cu: the Llama MLP gate, h = silu(e) · g with silu(e) = e·σ(e); rows = B·T, width I.
// entries: qlr_swiglu_fwd_f32 qlr_swiglu_fwd_bf16 qlr_swiglu_bwd_f32 qlr_swiglu_bwd_bf16
// fwd: h = e·σ(e)·g.   Saved: nothing new (bwd recomputes σ from the saved e, g).
// bwd: de = dh·g·σ(e)·(1 + e·(1 − σ(e)));  dg = dh·e·σ(e).
// Layouts: e, g, h, dh, de, dg (n = rows·I,) T, flat. f32 math, one rounding per store.
// Aliasing: h may alias e or g; de may alias e and dg may alias g (Unsloth's in-place
// backward): each element is read, then written, by the same thread. Reference: CpuBackend swiglu.
#include "common.cuh"

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }

template <typename T>
__device__ void swiglu_fwd(T* h, const T* e, const T* g, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float ev = qlr_to_f32(e[i]);
        h[i] = qlr_from_f32<T>(ev * sigmoidf_(ev) * qlr_to_f32(g[i]));
    }
}
template <typename T>
__device__ void swiglu_bwd(T* de, T* dg, const T* dh, const T* e, const T* g, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float ev = qlr_to_f32(e[i]), gv = qlr_to_f32(g[i]), d = qlr_to_f32(dh[i]);
        const float s = sigmoidf_(ev);
        de[i] = qlr_from_f32<T>(d * gv * s * (1.f + ev * (1.f - s)));
        dg[i] = qlr_from_f32<T>(d * ev * s);
    }
}

extern "C" __global__ void __launch_bounds__(256) qlr_swiglu_fwd_f32(float* h, const float* e, const float* g, long long n) { swiglu_fwd<float>(h, e, g, n); }
extern "C" __global__ void __launch_bounds__(256) qlr_swiglu_fwd_bf16(bf16* h, const bf16* e, const bf16* g, long long n) { swiglu_fwd<bf16>(h, e, g, n); }
extern "C" __global__ void __launch_bounds__(256) qlr_swiglu_bwd_f32(float* de, float* dg, const float* dh, const float* e, const float* g, long long n) { swiglu_bwd<float>(de, dg, dh, e, g, n); }
extern "C" __global__ void __launch_bounds__(256) qlr_swiglu_bwd_bf16(bf16* de, bf16* dg, const bf16* dh, const bf16* e, const bf16* g, long long n) { swiglu_bwd<bf16>(de, dg, dh, e, g, n); }
