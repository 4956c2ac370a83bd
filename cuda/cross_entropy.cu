// cross_entropy.cu: row-wise softmax cross entropy on one chunk of lm_head logits; the launcher
// (ops::cross_entropy::fused) runs lm_head on token chunks so T×V logits never exist at once.
// entries: qlr_cross_entropy_fwd_f32 qlr_cross_entropy_fwd_bf16 qlr_cross_entropy_bwd_f32 qlr_cross_entropy_bwd_bf16
// fwd: lse = log Σ_v exp(z_v) (f32, max-shifted);  loss_row = lse − z_label, 0 when label < 0
//      (ignore index −100).  Saved: lse (rows,) f32.
// bwd: dz_v = grad_scale · (exp(z_v − lse) − [v == label]) written IN PLACE over the logits
//      (0 for an ignored row); grad_scale = dloss/n_valid for a mean loss.
// Layouts: logits (rows, V) T, labels (rows,) i32, loss/lse (rows,) f32. One 256-thread block per row.
// Aliasing: bwd overwrites the logits chunk (documented contract: the caller no longer needs it).
// Reference: CpuBackend cross_entropy.
#include "common.cuh"

template <typename T>
__device__ void ce_fwd(float* loss, float* lse_out, const T* logits, const int* labels, int V) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const T* z = logits + row * V;
    float m = -__int_as_float(0x7f800000);
    for (int v = threadIdx.x; v < V; v += blockDim.x) m = fmaxf(m, qlr_to_f32(z[v]));
    m = qlr_block_max(m, scratch);
    float s = 0.f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) s += expf(qlr_to_f32(z[v]) - m);
    s = qlr_block_sum(s, scratch);
    if (threadIdx.x == 0) {
        const float lse = m + logf(s);
        const int lab = labels[row];
        lse_out[row] = lse;
        loss[row] = (lab >= 0 && lab < V) ? lse - qlr_to_f32(z[lab]) : 0.f;
    }
}
template <typename T>
__device__ void ce_bwd(T* logits, const float* lse_in, const int* labels, int V, float grad_scale) {
    const long long row = blockIdx.x;
    const int lab = labels[row];
    const bool valid = lab >= 0 && lab < V;
    const float lse = lse_in[row];
    T* z = logits + row * V;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        const float p = expf(qlr_to_f32(z[v]) - lse);
        z[v] = qlr_from_f32<T>(valid ? grad_scale * (p - (v == lab ? 1.f : 0.f)) : 0.f);
    }
}
extern "C" __global__ void __launch_bounds__(256) qlr_cross_entropy_fwd_f32(float* loss, float* lse, const float* z, const int* labels, int V) { ce_fwd<float>(loss, lse, z, labels, V); }
extern "C" __global__ void __launch_bounds__(256) qlr_cross_entropy_fwd_bf16(float* loss, float* lse, const bf16* z, const int* labels, int V) { ce_fwd<bf16>(loss, lse, z, labels, V); }
extern "C" __global__ void __launch_bounds__(256) qlr_cross_entropy_bwd_f32(float* z, const float* lse, const int* labels, int V, float s) { ce_bwd<float>(z, lse, labels, V, s); }
extern "C" __global__ void __launch_bounds__(256) qlr_cross_entropy_bwd_bf16(bf16* z, const float* lse, const int* labels, int V, float s) { ce_bwd<bf16>(z, lse, labels, V, s); }
