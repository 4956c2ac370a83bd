// attention.cu: causal grouped-query attention, flash-style (online softmax; logsumexp saved).
// entries: qlr_attention_fwd_f32 qlr_attention_fwd_bf16 qlr_attention_bwd_delta_f32 qlr_attention_bwd_delta_bf16
// entries: qlr_attention_bwd_dq_f32 qlr_attention_bwd_dq_bf16 qlr_attention_bwd_dkv_f32 qlr_attention_bwd_dkv_bf16
// fwd: s_ij = scale·q_i·k_j (j ≤ i), p = softmax_j(s), o_i = Σ_j p_ij v_j;  lse_i = log Σ_j exp(s_ij).
// bwd: delta_i = dO_i·o_i;  p_ij = exp(s_ij − lse_i);  dp_ij = dO_i·v_j;  ds_ij = p_ij (dp_ij − delta_i);
//      dq_i = scale Σ_j ds_ij k_j;  dk_j = scale Σ_{i, heads of the group} ds_ij q_i;  dv_j = Σ_i p_ij dO_i.
// Layouts: q, o, dO, dq (B, T, H, D) T; k, v, dk, dv (B, T, Hkv, D) T; lse, delta (B, H, T) f32.
// Query head h reads kv head h / (H / Hkv). scale = 1/√D. D ≤ 128 (any D: lane l owns dims
// l, l+32, …). Saved for bwd: o and lse. f32 math throughout; one rounding per store.
// Work split: one warp per query row (fwd, dq) or key row (dkv); 32 keys (queries) per tile,
// lane ↔ key (query) for the scores, lane ↔ dims for the accumulators. dk/dv are written by the
// single warp that owns the key row: no atomics, deterministic. This is the SIMT version
// (correct first; the tensor-core version is the follow-up). Reference: CpuBackend attention.
#include "common.cuh"

#define ATT_DMAX 128
#define ATT_WARPS 8
#define ATT_TILE 32
#define ATT_PER (ATT_DMAX / 32)

struct QlrAttn {
    int B, T, H, Hkv, D;
    float scale;
};

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

template <typename T>
__device__ void attn_fwd(T* o, float* lse, const T* q, const T* k, const T* v, QlrAttn a) {
    __shared__ float Ks[ATT_TILE][ATT_DMAX + 1];
    __shared__ float Vs[ATT_TILE][ATT_DMAX + 1];
    __shared__ float Qs[ATT_WARPS][ATT_DMAX];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int bh = blockIdx.y, b = bh / a.H, h = bh % a.H, hk = h / (a.H / a.Hkv);
    const int i0 = blockIdx.x * ATT_WARPS, i = i0 + warp;
    const bool active = i < a.T;
    const long long qrow = (((long long)b * a.T + i) * a.H + h) * a.D;
    for (int d = lane; d < a.D; d += 32) Qs[warp][d] = active ? qlr_to_f32(q[qrow + d]) * a.scale : 0.f;
    float acc[ATT_PER];
#pragma unroll
    for (int u = 0; u < ATT_PER; ++u) acc[u] = 0.f;
    float m = neg_inf(), l = 0.f;
    const int last = min(a.T - 1, i0 + ATT_WARPS - 1);  // causal: no key beyond the block's last row
    for (int j0 = 0; j0 <= last; j0 += ATT_TILE) {
        __syncthreads();
        for (int e = threadIdx.x; e < ATT_TILE * a.D; e += blockDim.x) {
            const int jj = e / a.D, d = e % a.D, j = j0 + jj;
            const long long kr = (((long long)b * a.T + j) * a.Hkv + hk) * a.D + d;
            Ks[jj][d] = j < a.T ? qlr_to_f32(k[kr]) : 0.f;
            Vs[jj][d] = j < a.T ? qlr_to_f32(v[kr]) : 0.f;
        }
        __syncthreads();
        if (!active) continue;
        float s = 0.f;
        for (int d = 0; d < a.D; ++d) s = fmaf(Qs[warp][d], Ks[lane][d], s);
        if (j0 + lane > i) s = neg_inf();
        const float mn = fmaxf(m, qlr_warp_max(s));
        const float p = expf(s - mn);  // exp(-inf) = 0 for masked keys
        const float corr = expf(m - mn);
        l = l * corr + qlr_warp_sum(p);
#pragma unroll
        for (int u = 0; u < ATT_PER; ++u) acc[u] *= corr;
        for (int jj = 0; jj < ATT_TILE; ++jj) {
            const float pj = __shfl_sync(0xffffffffu, p, jj);
#pragma unroll
            for (int u = 0; u < ATT_PER; ++u) {
                const int d = lane + 32 * u;
                if (d < a.D) acc[u] = fmaf(pj, Vs[jj][d], acc[u]);
            }
        }
        m = mn;
    }
    if (!active) return;
#pragma unroll
    for (int u = 0; u < ATT_PER; ++u) {
        const int d = lane + 32 * u;
        if (d < a.D) o[qrow + d] = qlr_from_f32<T>(acc[u] / l);
    }
    if (lane == 0) lse[((long long)b * a.H + h) * a.T + i] = m + logf(l);
}

// delta = rowsum(dO ∘ O): one warp per (b, t, h) row.
template <typename T>
__device__ void attn_delta(float* delta, const T* dout, const T* out, QlrAttn a) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * ATT_WARPS + (threadIdx.x >> 5);  // over B·T·H
    if (row >= (long long)a.B * a.T * a.H) return;
    float s = 0.f;
    for (int d = lane; d < a.D; d += 32) s = fmaf(qlr_to_f32(dout[row * a.D + d]), qlr_to_f32(out[row * a.D + d]), s);
    s = qlr_warp_sum(s);
    const int h = (int)(row % a.H);
    const long long bt = row / a.H;
    const int t = (int)(bt % a.T), b = (int)(bt / a.T);
    if (lane == 0) delta[((long long)b * a.H + h) * a.T + t] = s;
}

template <typename T>
__device__ void attn_dq(T* dq, const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta, QlrAttn a) {
    __shared__ float Ks[ATT_TILE][ATT_DMAX + 1];
    __shared__ float Vs[ATT_TILE][ATT_DMAX + 1];
    __shared__ float Qs[ATT_WARPS][ATT_DMAX];
    __shared__ float dOs[ATT_WARPS][ATT_DMAX];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int bh = blockIdx.y, b = bh / a.H, h = bh % a.H, hk = h / (a.H / a.Hkv);
    const int i0 = blockIdx.x * ATT_WARPS, i = i0 + warp;
    const bool active = i < a.T;
    const long long qrow = (((long long)b * a.T + i) * a.H + h) * a.D;
    for (int d = lane; d < a.D; d += 32) {
        Qs[warp][d] = active ? qlr_to_f32(q[qrow + d]) * a.scale : 0.f;
        dOs[warp][d] = active ? qlr_to_f32(dout[qrow + d]) : 0.f;
    }
    const long long li = ((long long)b * a.H + h) * a.T + i;
    const float lse_i = active ? lse[li] : 0.f, delta_i = active ? delta[li] : 0.f;
    float acc[ATT_PER];
#pragma unroll
    for (int u = 0; u < ATT_PER; ++u) acc[u] = 0.f;
    const int last = min(a.T - 1, i0 + ATT_WARPS - 1);
    for (int j0 = 0; j0 <= last; j0 += ATT_TILE) {
        __syncthreads();
        for (int e = threadIdx.x; e < ATT_TILE * a.D; e += blockDim.x) {
            const int jj = e / a.D, d = e % a.D, j = j0 + jj;
            const long long kr = (((long long)b * a.T + j) * a.Hkv + hk) * a.D + d;
            Ks[jj][d] = j < a.T ? qlr_to_f32(k[kr]) : 0.f;
            Vs[jj][d] = j < a.T ? qlr_to_f32(v[kr]) : 0.f;
        }
        __syncthreads();
        if (!active) continue;
        float s = 0.f, dp = 0.f;
        for (int d = 0; d < a.D; ++d) {
            s = fmaf(Qs[warp][d], Ks[lane][d], s);
            dp = fmaf(dOs[warp][d], Vs[lane][d], dp);
        }
        const float p = (j0 + lane <= i) ? expf(s - lse_i) : 0.f;
        const float ds = p * (dp - delta_i);
        for (int jj = 0; jj < ATT_TILE; ++jj) {
            const float dsj = __shfl_sync(0xffffffffu, ds, jj);
#pragma unroll
            for (int u = 0; u < ATT_PER; ++u) {
                const int d = lane + 32 * u;
                if (d < a.D) acc[u] = fmaf(dsj, Ks[jj][d], acc[u]);
            }
        }
    }
    if (!active) return;
#pragma unroll
    for (int u = 0; u < ATT_PER; ++u) {
        const int d = lane + 32 * u;
        if (d < a.D) dq[qrow + d] = qlr_from_f32<T>(acc[u] * a.scale);
    }
}

// One warp per key row j of kv head hk; loops over the group's query heads and query tiles i ≥ j.
template <typename T>
__device__ void attn_dkv(T* dk, T* dv, const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta, QlrAttn a) {
    __shared__ float Qs[ATT_TILE][ATT_DMAX + 1];
    __shared__ float dOs[ATT_TILE][ATT_DMAX + 1];
    __shared__ float Kr[ATT_WARPS][ATT_DMAX];
    __shared__ float Vr[ATT_WARPS][ATT_DMAX];
    __shared__ float Ls[ATT_TILE], Ds[ATT_TILE];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int bh = blockIdx.y, b = bh / a.Hkv, hk = bh % a.Hkv;
    const int group = a.H / a.Hkv;
    const int j0 = blockIdx.x * ATT_WARPS, j = j0 + warp;
    const bool active = j < a.T;
    const long long krow = (((long long)b * a.T + j) * a.Hkv + hk) * a.D;
    for (int d = lane; d < a.D; d += 32) {
        Kr[warp][d] = active ? qlr_to_f32(k[krow + d]) * a.scale : 0.f;
        Vr[warp][d] = active ? qlr_to_f32(v[krow + d]) : 0.f;
    }
    float ak[ATT_PER], av[ATT_PER];
#pragma unroll
    for (int u = 0; u < ATT_PER; ++u) ak[u] = av[u] = 0.f;
    for (int g = 0; g < group; ++g) {
        const int h = hk * group + g;
        for (int t0 = (j0 / ATT_TILE) * ATT_TILE; t0 < a.T; t0 += ATT_TILE) {
            __syncthreads();
            for (int e = threadIdx.x; e < ATT_TILE * a.D; e += blockDim.x) {
                const int ii = e / a.D, d = e % a.D, i = t0 + ii;
                const long long qr = (((long long)b * a.T + i) * a.H + h) * a.D + d;
                Qs[ii][d] = i < a.T ? qlr_to_f32(q[qr]) : 0.f;
                dOs[ii][d] = i < a.T ? qlr_to_f32(dout[qr]) : 0.f;
            }
            if (threadIdx.x < ATT_TILE) {
                const int i = t0 + threadIdx.x;
                const long long li = ((long long)b * a.H + h) * a.T + i;
                Ls[threadIdx.x] = i < a.T ? lse[li] : 0.f;
                Ds[threadIdx.x] = i < a.T ? delta[li] : 0.f;
            }
            __syncthreads();
            if (!active) continue;
            const int i = t0 + lane;
            float s = 0.f, dp = 0.f;
            for (int d = 0; d < a.D; ++d) {
                s = fmaf(Qs[lane][d], Kr[warp][d], s);
                dp = fmaf(dOs[lane][d], Vr[warp][d], dp);
            }
            const float p = (i < a.T && i >= j) ? expf(s - Ls[lane]) : 0.f;
            const float ds = p * (dp - Ds[lane]);
            for (int ii = 0; ii < ATT_TILE; ++ii) {
                const float pi = __shfl_sync(0xffffffffu, p, ii);
                const float dsi = __shfl_sync(0xffffffffu, ds, ii);
#pragma unroll
                for (int u = 0; u < ATT_PER; ++u) {
                    const int d = lane + 32 * u;
                    if (d < a.D) {
                        av[u] = fmaf(pi, dOs[ii][d], av[u]);
                        ak[u] = fmaf(dsi, Qs[ii][d], ak[u]);
                    }
                }
            }
        }
    }
    if (!active) return;
#pragma unroll
    for (int u = 0; u < ATT_PER; ++u) {
        const int d = lane + 32 * u;
        if (d < a.D) {
            dk[krow + d] = qlr_from_f32<T>(ak[u] * a.scale);
            dv[krow + d] = qlr_from_f32<T>(av[u]);
        }
    }
}

#define ATT_ENTRIES(T, S)                                                                                                \
    extern "C" __global__ void __launch_bounds__(256) qlr_attention_fwd_##S(T* o, float* lse, const T* q, const T* k,  \
                                                                           const T* v, QlrAttn a) {                    \
        attn_fwd<T>(o, lse, q, k, v, a);                                                                                \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) qlr_attention_bwd_delta_##S(float* delta, const T* dout,         \
                                                                                 const T* out, QlrAttn a) {           \
        attn_delta<T>(delta, dout, out, a);                                                                             \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) qlr_attention_bwd_dq_##S(                                        \
        T* dq, const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta, QlrAttn a) {   \
        attn_dq<T>(dq, q, k, v, dout, lse, delta, a);                                                                   \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) qlr_attention_bwd_dkv_##S(T* dk, T* dv, const T* q, const T* k,  \
                                                                               const T* v, const T* dout,              \
                                                                               const float* lse, const float* delta,   \
                                                                               QlrAttn a) {                            \
        attn_dkv<T>(dk, dv, q, k, v, dout, lse, delta, a);                                                              \
    }
ATT_ENTRIES(float, f32)
ATT_ENTRIES(bf16, bf16)
