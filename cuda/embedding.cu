// embedding.cu: token embedding lookup and its scatter-add gradient (modules_to_save).
// entries: qlr_embedding_fwd_f32 qlr_embedding_fwd_bf16 qlr_embedding_bwd_acc_f32 qlr_embedding_bwd_acc_bf16
// fwd: out[row, :] = table[ids[row], :]; ids (rows,) i32; table (V, C) T; out (rows, C) T.
//      An id outside [0, V) writes zeros and increments *bad (the launcher reports it as a typed error).
// bwd_acc: d_table[ids[row], :] += d_out[row, :], d_table (V, C) f32, f32 atomics (a token
//      repeated in the batch sums in an unspecified order: not bitwise deterministic). Ids
//      outside [0, V) are skipped. Nothing saved but the ids. Reference: CpuBackend embedding.
#include "common.cuh"

template <typename T>
__device__ void emb_fwd(T* out, int* bad, const int* ids, const T* table, int V, int C) {
    const long long row = blockIdx.x;
    const int id = ids[row];
    const bool ok = id >= 0 && id < V;
    if (!ok && threadIdx.x == 0) atomicAdd(bad, 1);
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        out[row * C + c] = ok ? table[(long long)id * C + c] : qlr_from_f32<T>(0.f);
}
template <typename T>
__device__ void emb_bwd(float* d_table, const int* ids, const T* d_out, int V, int C) {
    const long long row = blockIdx.x;
    const int id = ids[row];
    if (id < 0 || id >= V) return;
    for (int c = threadIdx.x; c < C; c += blockDim.x) atomicAdd(d_table + (long long)id * C + c, qlr_to_f32(d_out[row * C + c]));
}
extern "C" __global__ void __launch_bounds__(256) qlr_embedding_fwd_f32(float* out, int* bad, const int* ids, const float* t, int V, int C) { emb_fwd<float>(out, bad, ids, t, V, C); }
extern "C" __global__ void __launch_bounds__(256) qlr_embedding_fwd_bf16(bf16* out, int* bad, const int* ids, const bf16* t, int V, int C) { emb_fwd<bf16>(out, bad, ids, t, V, C); }
extern "C" __global__ void __launch_bounds__(256) qlr_embedding_bwd_acc_f32(float* dt, const int* ids, const float* d, int V, int C) { emb_bwd<float>(dt, ids, d, V, C); }
extern "C" __global__ void __launch_bounds__(256) qlr_embedding_bwd_acc_bf16(float* dt, const int* ids, const bf16* d, int V, int C) { emb_bwd<bf16>(dt, ids, d, V, C); }
