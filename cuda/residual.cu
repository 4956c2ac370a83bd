// residual.cu: residual add y = a + b (flat, n elements), and its accumulating form.
// entries: qlr_residual_fwd_f32 qlr_residual_fwd_bf16 qlr_residual_bwd_acc_f32 qlr_residual_bwd_acc_bf16
// fwd: y = a + b.  bwd: the gradient passes unchanged to both inputs; the one kernel the
// schedule needs is the accumulation of a branch gradient into the residual stream:
// bwd_acc: d_h += d_branch.  f32 math, one rounding per store. Nothing saved.
// Aliasing: y may alias a or b (in-place h += x). Reference: CpuBackend residual_add.
#include "common.cuh"

template <typename T>
__device__ void add(T* y, const T* a, const T* b, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = qlr_from_f32<T>(qlr_to_f32(a[i]) + qlr_to_f32(b[i]));
}
extern "C" __global__ void __launch_bounds__(256) qlr_residual_fwd_f32(float* y, const float* a, const float* b, long long n) { add<float>(y, a, b, n); }
extern "C" __global__ void __launch_bounds__(256) qlr_residual_fwd_bf16(bf16* y, const bf16* a, const bf16* b, long long n) { add<bf16>(y, a, b, n); }
extern "C" __global__ void __launch_bounds__(256) qlr_residual_bwd_acc_f32(float* dh, const float* d, long long n) { add<float>(dh, dh, d, n); }
extern "C" __global__ void __launch_bounds__(256) qlr_residual_bwd_acc_bf16(bf16* dh, const bf16* d, long long n) { add<bf16>(dh, dh, d, n); }
