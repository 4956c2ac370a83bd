// rope.cu: rotary position embedding, HF "rotate_half" convention, on (rows = B·T, heads, D).
// entries: qlr_rope_fwd_f32 qlr_rope_fwd_bf16 qlr_rope_bwd_f32 qlr_rope_bwd_bf16
// fwd: for i < D/2, θ = f32(pos[row] · inv_freq[i]):
//      y[i] = x[i]·cos θ − x[i+D/2]·sin θ;  y[i+D/2] = x[i+D/2]·cos θ + x[i]·sin θ.
// bwd: the inverse rotation (θ → −θ) applied to dy gives dx. Nothing saved.
// inv_freq (D/2,) f32 is precomputed on the host with llama3 scaling when configured
// (qlora_cuda::ops::rope::inv_freq); pos (rows,) i32 allows packed sequences. f32 math with
// precise sincosf (HF rounds cos/sin to the model dtype first; the bf16 tolerance covers it).
// Aliasing: y may alias x (each pair is read, then written, by one thread). Reference: CpuBackend rope.
#include "common.cuh"

template <typename T>
__device__ void rope(T* y, const T* x, const int* pos, const float* inv_freq, long long rows, int heads, int D, float sign) {
    const int half = D / 2;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // over rows·heads·half
    if (idx >= rows * heads * half) return;
    const int i = (int)(idx % half);
    const long long rh = idx / half;  // row·heads + head
    const long long row = rh / heads;
    const float theta = __fmul_rn((float)pos[row], inv_freq[i]);
    float s, c;
    sincosf(theta, &s, &c);
    s *= sign;
    const long long base = rh * D;
    const float a = qlr_to_f32(x[base + i]), b = qlr_to_f32(x[base + i + half]);
    y[base + i] = qlr_from_f32<T>(a * c - b * s);
    y[base + i + half] = qlr_from_f32<T>(b * c + a * s);
}

extern "C" __global__ void __launch_bounds__(256) qlr_rope_fwd_f32(float* y, const float* x, const int* pos, const float* f, long long rows, int heads, int D) { rope<float>(y, x, pos, f, rows, heads, D, 1.f); }
extern "C" __global__ void __launch_bounds__(256) qlr_rope_fwd_bf16(bf16* y, const bf16* x, const int* pos, const float* f, long long rows, int heads, int D) { rope<bf16>(y, x, pos, f, rows, heads, D, 1.f); }
extern "C" __global__ void __launch_bounds__(256) qlr_rope_bwd_f32(float* dx, const float* dy, const int* pos, const float* f, long long rows, int heads, int D) { rope<float>(dx, dy, pos, f, rows, heads, D, -1.f); }
extern "C" __global__ void __launch_bounds__(256) qlr_rope_bwd_bf16(bf16* dx, const bf16* dy, const int* pos, const float* f, long long rows, int heads, int D) { rope<bf16>(dx, dy, pos, f, rows, heads, D, -1.f); }
