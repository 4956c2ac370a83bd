// elementwise.cu: the small glue ops the CUDA training backend (qlora_train::CudaBackend) needs
// between the big kernels: dtype casts, LoRA dropout and the bias add.
// entries: qlr_elementwise_cast_fwd_f32 qlr_elementwise_cast_fwd_bf16
// entries: qlr_elementwise_dropout_fwd_f32 qlr_elementwise_dropout_fwd_bf16
// entries: qlr_elementwise_dropout_bwd_acc_f32 qlr_elementwise_dropout_bwd_acc_bf16
// entries: qlr_elementwise_bias_fwd_f32 qlr_elementwise_bias_fwd_bf16
// entries: qlr_elementwise_nonfinite_count_f32
// cast_fwd_<D>: y (n,) D = x (n,) of the other float type (bf16 → f32 exact; f32 → bf16 round
//      to nearest even, once). Used for the f32 LoRA master weights → bf16 compute copies and
//      the f32 modules_to_save embedding rows → bf16 activations.
// dropout_fwd:     y[i] = x[i] · m(i);   dropout_bwd_acc: y[i] += t[i] · m(i)   (n,) T, where
//      m(i) = 0 when u(i) < p, else 1/(1−p) rounded to f32, with
//      u(i) = (splitmix64(seed ^ splitmix64(i)) >> 11) · 2⁻⁵³  (the CPU backend's
//      `cpu::dropout_scale`, bit for bit: the mask is a pure function of (seed, flat index) so
//      backward and recompute regenerate it, and CPU and GPU drop the same elements).
// bias_fwd: y (rows, n) T += b (n,) T broadcast over rows.
// nonfinite_count: count (1,) i32 += number of NaN/Inf in x (n,) f32 (the trainer's gradient
//      check reads one word instead of the whole arena; zero `count` first).
// f32 math, one rounding per store. Aliasing: y may alias x (each element is read, then
// written, by the same thread); t must not alias y. Grid-stride loops over the flat index.
#include "common.cuh"

__device__ __forceinline__ unsigned long long qlr_splitmix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
// The keep-scale of element i: 0 or (float)(1/(1−p)) (`keep` is that f32, computed on the host
// in f64 exactly as the CPU's `T::of(1.0 / (1.0 - p))`).
__device__ __forceinline__ float qlr_elementwise_dropout_scale(unsigned long long seed, long long i, double p, float keep) {
    const unsigned long long h = qlr_splitmix64(seed ^ qlr_splitmix64((unsigned long long)i));
    const double u = (double)(h >> 11) * (1.0 / 9007199254740992.0);  // 2^53
    return u < p ? 0.f : keep;
}

template <typename D, typename S>
__device__ void cast(D* y, const S* x, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = qlr_from_f32<D>(qlr_to_f32(x[i]));
}
template <typename T>
__device__ void dropout_fwd(T* y, const T* x, long long n, unsigned long long seed, double p, float keep) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = qlr_from_f32<T>(qlr_to_f32(x[i]) * qlr_elementwise_dropout_scale(seed, i, p, keep));
}
template <typename T>
__device__ void dropout_bwd_acc(T* y, const T* t, long long n, unsigned long long seed, double p, float keep) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = qlr_from_f32<T>(qlr_to_f32(y[i]) + qlr_to_f32(t[i]) * qlr_elementwise_dropout_scale(seed, i, p, keep));
}
template <typename T>
__device__ void bias_fwd(T* y, const T* b, long long rows, int n) {
    const long long total = rows * n;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x)
        y[i] = qlr_from_f32<T>(qlr_to_f32(y[i]) + qlr_to_f32(b[i % n]));
}

__device__ void nonfinite_count(int* count, const float* x, long long n) {
    int c = 0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        c += isfinite(x[i]) ? 0 : 1;
    // Warp-reduce, one atomic per warp.
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffffu, c, o);
    if ((threadIdx.x & 31) == 0 && c != 0) atomicAdd(count, c);
}

extern "C" __global__ void __launch_bounds__(256) qlr_elementwise_cast_fwd_f32(float* y, const bf16* x, long long n) { cast<float, bf16>(y, x, n); }
extern "C" __global__ void __launch_bounds__(256) qlr_elementwise_cast_fwd_bf16(bf16* y, const float* x, long long n) { cast<bf16, float>(y, x, n); }
extern "C" __global__ void __launch_bounds__(256) qlr_elementwise_dropout_fwd_f32(float* y, const float* x, long long n, unsigned long long seed, double p, float keep) { dropout_fwd<float>(y, x, n, seed, p, keep); }
extern "C" __global__ void __launch_bounds__(256) qlr_elementwise_dropout_fwd_bf16(bf16* y, const bf16* x, long long n, unsigned long long seed, double p, float keep) { dropout_fwd<bf16>(y, x, n, seed, p, keep); }
extern "C" __global__ void __launch_bounds__(256) qlr_elementwise_dropout_bwd_acc_f32(float* y, const float* t, long long n, unsigned long long seed, double p, float keep) { dropout_bwd_acc<float>(y, t, n, seed, p, keep); }
extern "C" __global__ void __launch_bounds__(256) qlr_elementwise_dropout_bwd_acc_bf16(bf16* y, const bf16* t, long long n, unsigned long long seed, double p, float keep) { dropout_bwd_acc<bf16>(y, t, n, seed, p, keep); }
extern "C" __global__ void __launch_bounds__(256) qlr_elementwise_bias_fwd_f32(float* y, const float* b, long long rows, int n) { bias_fwd<float>(y, b, rows, n); }
extern "C" __global__ void __launch_bounds__(256) qlr_elementwise_bias_fwd_bf16(bf16* y, const bf16* b, long long rows, int n) { bias_fwd<bf16>(y, b, rows, n); }
extern "C" __global__ void __launch_bounds__(256) qlr_elementwise_nonfinite_count_f32(int* count, const float* x, long long n) { nonfinite_count(count, x, n); }
