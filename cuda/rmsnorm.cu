// rmsnorm.cu: RMSNorm over the last dim C (Llama): rows = B·T.
// entries: qlr_rmsnorm_fwd_f32 qlr_rmsnorm_fwd_bf16 qlr_rmsnorm_bwd_f32 qlr_rmsnorm_bwd_bf16
// fwd: rstd = 1/sqrt(mean_c(x²) + eps);  y = x · rstd · g.        Saved: rstd (rows,) f32.
// bwd: x̂ = x·rstd;  dx = rstd · (dy·g − x̂ · mean_c(dy·g·x̂)).       No dg: norm weights are frozen.
// Layouts: x, y, dy, dx (rows, C) T; g (C,) T. One 256-thread block per row; f32 math, one
// rounding at the store (HF rounds x̂ to the input dtype before ·g; the bf16 tolerance covers it).
// Aliasing: y may alias x and dx may alias dy (each element is read before it is written, by
// the same thread, after the row reduction). Reference: CpuBackend rmsnorm::{fwd,bwd}.
#include "common.cuh"

template <typename T>
__device__ void rmsnorm_fwd(T* y, float* rstd_out, const T* x, const T* g, int C, float eps) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const T* xr = x + row * C;
    float ss = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const float v = qlr_to_f32(xr[c]);
        ss = fmaf(v, v, ss);
    }
    ss = qlr_block_sum(ss, scratch);
    const float rstd = rsqrtf(ss / (float)C + eps);
    if (threadIdx.x == 0) rstd_out[row] = rstd;
    T* yr = y + row * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) yr[c] = qlr_from_f32<T>(qlr_to_f32(xr[c]) * rstd * qlr_to_f32(g[c]));
}

template <typename T>
__device__ void rmsnorm_bwd(T* dx, const T* dy, const T* x, const float* rstd_in, const T* g, int C) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const float rstd = rstd_in[row];
    const T* xr = x + row * C;
    const T* dyr = dy + row * C;
    float dot = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        dot = fmaf(qlr_to_f32(dyr[c]) * qlr_to_f32(g[c]), qlr_to_f32(xr[c]) * rstd, dot);
    const float mean = qlr_block_sum(dot, scratch) / (float)C;
    T* dxr = dx + row * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const float xh = qlr_to_f32(xr[c]) * rstd;
        dxr[c] = qlr_from_f32<T>(rstd * (qlr_to_f32(dyr[c]) * qlr_to_f32(g[c]) - xh * mean));
    }
}

extern "C" __global__ void __launch_bounds__(256) qlr_rmsnorm_fwd_f32(float* y, float* rstd, const float* x, const float* g, int C, float eps) { rmsnorm_fwd<float>(y, rstd, x, g, C, eps); }
extern "C" __global__ void __launch_bounds__(256) qlr_rmsnorm_fwd_bf16(bf16* y, float* rstd, const bf16* x, const bf16* g, int C, float eps) { rmsnorm_fwd<bf16>(y, rstd, x, g, C, eps); }
extern "C" __global__ void __launch_bounds__(256) qlr_rmsnorm_bwd_f32(float* dx, const float* dy, const float* x, const float* rstd, const float* g, int C) { rmsnorm_bwd<float>(dx, dy, x, rstd, g, C); }
extern "C" __global__ void __launch_bounds__(256) qlr_rmsnorm_bwd_bf16(bf16* dx, const bf16* dy, const bf16* x, const float* rstd, const bf16* g, int C) { rmsnorm_bwd<bf16>(dx, dy, x, rstd, g, C); }
