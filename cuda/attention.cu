// attention.cu: causal grouped-query attention, flash-style (online softmax; logsumexp saved).
// entries: qlr_attention_fwd_f32 qlr_attention_fwd_bf16 qlr_attention_bwd_delta_f32 qlr_attention_bwd_delta_bf16
// entries: qlr_attention_bwd_dq_f32 qlr_attention_bwd_dq_bf16 qlr_attention_bwd_dkv_f32 qlr_attention_bwd_dkv_bf16
// entries: qlr_attention_fwd_mma_bf16 qlr_attention_bwd_dq_mma_bf16 qlr_attention_bwd_dkv_mma_bf16
// fwd: s_ij = scale·q_i·k_j (j ≤ i), p = softmax_j(s), o_i = Σ_j p_ij v_j;  lse_i = log Σ_j exp(s_ij).
// bwd: delta_i = dO_i·o_i;  p_ij = exp(s_ij − lse_i);  dp_ij = dO_i·v_j;  ds_ij = p_ij (dp_ij − delta_i);
//      dq_i = scale Σ_j ds_ij k_j;  dk_j = scale Σ_{i, heads of the group} ds_ij q_i;  dv_j = Σ_i p_ij dO_i.
// Layouts: q, o, dO, dq (B, T, H, D) T; k, v, dk, dv (B, T, Hkv, D) T; lse, delta (B, H, T) f32.
// Query head h reads kv head h / (H / Hkv). scale = 1/√D. D ≤ 128 (any D: lane l owns dims
// l, l+32, …). Saved for bwd: o and lse. f32 math throughout; one rounding per store.
// Kernels: SIMT (any D ≤ 128, f32 and bf16) and tensor-core bf16 (*_mma_bf16, D ∈ 16·{1..8});
// see the notes below the include. Reference: CpuBackend attention.
#include "common.cuh"

// Work split: one warp per query row (fwd, dq) or key row (dkv); 32 keys (queries) per tile,
// lane ↔ key (query) for the scores, lane ↔ dims for the accumulators. dk/dv are written by the
// single warp that owns the key row: no atomics, deterministic. These are SIMT kernels.
// fwd_mma_bf16 (D a multiple of 16, ≤ 128) is the tensor-core forward (FlashAttention-2
// layout: 4 warps × 16 query rows, 64-key tiles, S = Q·Kᵀ and O += P·V on mma.sync m16n8k16
// with f32 accumulation, P rounded to bf16 for the second product, online softmax in the
// log2 domain); bwd_dq_mma / bwd_dkv_mma are the matching backward (dS and P rounded to bf16
// as mma operands; dq per query block over key tiles, dk/dv per key block over query tiles
// and the group's heads: no atomics, deterministic).

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

// ---------------------------------------------------------------- tensor-core forward (bf16)
#define FA_BR 64  // query rows per block (16 per warp)
#define FA_BC 64  // keys per tile
#define FA_LDK (ATT_DMAX + 8)  // Ks row stride (bf16): +16 bytes keeps fragment loads conflict-free
#define FA_LDV (FA_BC + 8)     // Vt row stride (bf16)

__device__ __forceinline__ unsigned fa_pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const unsigned*>(&h);
}

// Ks (FA_BC·FA_LDK) and Vt (ATT_DMAX·FA_LDV) are declared once in the kernel: shared arrays
// declared in each template instance would add up across the instances of the switch.
template <int D>
__device__ void attn_fwd_mma(bf16* o, float* lse, const bf16* q, const bf16* k, const bf16* v, QlrAttn a, bf16* Ks,
                             bf16* Vt) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / a.H, h = bh % a.H, hk = h / (a.H / a.Hkv);
    const int q0 = blockIdx.x * FA_BR;
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;  // the two query rows this thread holds
    const long long qstride = (long long)a.H * D, kstride = (long long)a.Hkv * D;
    const bf16* qb = q + ((long long)b * a.T * a.H + h) * D;
    const bf16* kb = k + ((long long)b * a.T * a.Hkv + hk) * D;
    const bf16* vb = v + ((long long)b * a.T * a.Hkv + hk) * D;
    // Q fragments for the warp's 16 rows, straight from global memory (read once).
    unsigned qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const int c = kk * 16 + 2 * t;
        qa[kk][0] = r0 < a.T ? *reinterpret_cast<const unsigned*>(qb + r0 * qstride + c) : 0u;
        qa[kk][1] = r1 < a.T ? *reinterpret_cast<const unsigned*>(qb + r1 * qstride + c) : 0u;
        qa[kk][2] = r0 < a.T ? *reinterpret_cast<const unsigned*>(qb + r0 * qstride + c + 8) : 0u;
        qa[kk][3] = r1 < a.T ? *reinterpret_cast<const unsigned*>(qb + r1 * qstride + c + 8) : 0u;
    }
    float oacc[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) oacc[i][0] = oacc[i][1] = oacc[i][2] = oacc[i][3] = 0.f;
    const float sl2 = a.scale * 1.4426950408889634f;  // scale·log2(e): softmax in the exp2 domain
    float m0 = neg_inf(), m1 = neg_inf(), l0 = 0.f, l1 = 0.f;
    const int last = min(a.T - 1, q0 + FA_BR - 1);
    for (int j0 = 0; j0 <= last; j0 += FA_BC) {
        __syncthreads();  // the previous tile's readers are done
        // K tile as rows of 16-byte segments; V transposed into Vt[d][key].
        for (int e = threadIdx.x; e < FA_BC * (D / 8); e += blockDim.x) {
            const int r = e / (D / 8), c = (e % (D / 8)) * 8, j = j0 + r;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (j < a.T) {
                kv = *reinterpret_cast<const uint4*>(kb + j * kstride + c);
                vv = *reinterpret_cast<const uint4*>(vb + j * kstride + c);
            }
            *reinterpret_cast<uint4*>(Ks + r * FA_LDK + c) = kv;
            const bf16* ve = reinterpret_cast<const bf16*>(&vv);
#pragma unroll
            for (int q8 = 0; q8 < 8; ++q8) Vt[(c + q8) * FA_LDV + r] = ve[q8];
        }
        __syncthreads();
        // S = Q·Kᵀ for 16 rows × 64 keys: 8 n-tiles of 8 keys.
        float s[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const bf16* p = Ks + (nt * 8 + g) * FA_LDK + kk * 16 + 2 * t;
                unsigned bfr[2] = {*reinterpret_cast<const unsigned*>(p), *reinterpret_cast<const unsigned*>(p + 8)};
                mma_bf16_16816(s[nt], qa[kk], bfr);
            }
        }
        // Mask (causal and past-the-end keys), scale to log2 units, row max.
        float mx0 = neg_inf(), mx1 = neg_inf();
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = j0 + nt * 8 + 2 * t + (e & 1);
                const int row = e < 2 ? r0 : r1;
                float x = s[nt][e] * sl2;
                if (key > row || key >= a.T) x = neg_inf();
                s[nt][e] = x;
                if (e < 2) mx0 = fmaxf(mx0, x); else mx1 = fmaxf(mx1, x);
            }
        // The 4 threads of a group (t = 0..3) share rows g and g+8.
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);  // finite: key 0 is in tile 0
        const float c0 = exp2f(m0 - mn0), c1 = exp2f(m1 - mn1);
        m0 = mn0;
        m1 = mn1;
        float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            s[nt][0] = exp2f(s[nt][0] - mn0);
            s[nt][1] = exp2f(s[nt][1] - mn0);
            s[nt][2] = exp2f(s[nt][2] - mn1);
            s[nt][3] = exp2f(s[nt][3] - mn1);
            ps0 += s[nt][0] + s[nt][1];
            ps1 += s[nt][2] + s[nt][3];
        }
        l0 = l0 * c0 + ps0;  // per-thread partial row sums; reduced over the group at the end
        l1 = l1 * c1 + ps1;
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
            oacc[i][0] *= c0;
            oacc[i][1] *= c0;
            oacc[i][2] *= c1;
            oacc[i][3] *= c1;
        }
        // O += P·V: the S accumulator layout of two adjacent n-tiles is the A layout of one k16 step.
#pragma unroll
        for (int kt = 0; kt < 4; ++kt) {
            unsigned pa[4] = {fa_pack(s[2 * kt][0], s[2 * kt][1]), fa_pack(s[2 * kt][2], s[2 * kt][3]),
                              fa_pack(s[2 * kt + 1][0], s[2 * kt + 1][1]), fa_pack(s[2 * kt + 1][2], s[2 * kt + 1][3])};
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn) {
                const bf16* p = Vt + (dn * 8 + g) * FA_LDV + kt * 16 + 2 * t;
                unsigned bfr[2] = {*reinterpret_cast<const unsigned*>(p), *reinterpret_cast<const unsigned*>(p + 8)};
                mma_bf16_16816(oacc[dn], pa, bfr);
            }
        }
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = 1.f / l0, inv1 = 1.f / l1;
    bf16* ob = o + ((long long)b * a.T * a.H + h) * D;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
        const int c = dn * 8 + 2 * t;
        if (r0 < a.T) *reinterpret_cast<__nv_bfloat162*>(ob + r0 * qstride + c) = __floats2bfloat162_rn(oacc[dn][0] * inv0, oacc[dn][1] * inv0);
        if (r1 < a.T) *reinterpret_cast<__nv_bfloat162*>(ob + r1 * qstride + c) = __floats2bfloat162_rn(oacc[dn][2] * inv1, oacc[dn][3] * inv1);
    }
    if (t == 0) {
        // Natural-log logsumexp of the scaled scores: (m + log2 l)·ln 2.
        float* lb = lse + ((long long)b * a.H + h) * a.T;
        if (r0 < a.T) lb[r0] = (m0 + log2f(l0)) * 0.6931471805599453f;
        if (r1 < a.T) lb[r1] = (m1 + log2f(l1)) * 0.6931471805599453f;
    }
}

extern "C" __global__ void __launch_bounds__(128) qlr_attention_fwd_mma_bf16(bf16* o, float* lse, const bf16* q, const bf16* k,
                                                                           const bf16* v, QlrAttn a) {
    __shared__ __align__(16) bf16 Ks[FA_BC * FA_LDK];
    __shared__ __align__(16) bf16 Vt[ATT_DMAX * FA_LDV];
    switch (a.D) {
        case 16: attn_fwd_mma<16>(o, lse, q, k, v, a, Ks, Vt); break;
        case 32: attn_fwd_mma<32>(o, lse, q, k, v, a, Ks, Vt); break;
        case 48: attn_fwd_mma<48>(o, lse, q, k, v, a, Ks, Vt); break;
        case 64: attn_fwd_mma<64>(o, lse, q, k, v, a, Ks, Vt); break;
        case 80: attn_fwd_mma<80>(o, lse, q, k, v, a, Ks, Vt); break;
        case 96: attn_fwd_mma<96>(o, lse, q, k, v, a, Ks, Vt); break;
        case 112: attn_fwd_mma<112>(o, lse, q, k, v, a, Ks, Vt); break;
        case 128: attn_fwd_mma<128>(o, lse, q, k, v, a, Ks, Vt); break;
        default: break;  // the launcher only picks this kernel for D ∈ 16·{1..8}
    }
}

// ---------------------------------------------------------------- tensor-core backward (bf16)
// A fragment (16 rows × 16 k) from row-major shared memory; p = base + (row0 + g)·ld + k0 + 2t.
__device__ __forceinline__ void fa_ld_a(unsigned* a, const bf16* p, int ld) {
    a[0] = *reinterpret_cast<const unsigned*>(p);
    a[1] = *reinterpret_cast<const unsigned*>(p + 8 * ld);
    a[2] = *reinterpret_cast<const unsigned*>(p + 8);
    a[3] = *reinterpret_cast<const unsigned*>(p + 8 * ld + 8);
}
// B fragment (16 k × 8 n) from shared memory stored [n][k]; p = base + (n0 + g)·ld + k0 + 2t.
__device__ __forceinline__ void fa_ld_b(unsigned* b, const bf16* p) {
    b[0] = *reinterpret_cast<const unsigned*>(p);
    b[1] = *reinterpret_cast<const unsigned*>(p + 8);
}
// Copy `rows` rows of D bf16 (global row stride `gstride`, rows ≥ nvalid are zeros) into
// sm[r][d] (stride ld) and, when smt != nullptr, transposed into smt[d][r] (stride ldt).
template <int D>
__device__ __forceinline__ void fa_tile(bf16* sm, int ld, bf16* smt, int ldt, const bf16* g0, long long gstride, int rows,
                                        int nvalid) {
    for (int e = threadIdx.x; e < rows * (D / 8); e += blockDim.x) {
        const int r = e / (D / 8), c = (e % (D / 8)) * 8;
        uint4 x = make_uint4(0, 0, 0, 0);
        if (r < nvalid) x = *reinterpret_cast<const uint4*>(g0 + r * gstride + c);
        *reinterpret_cast<uint4*>(sm + r * ld + c) = x;
        if (smt != nullptr) {
            const bf16* xe = reinterpret_cast<const bf16*>(&x);
#pragma unroll
            for (int q8 = 0; q8 < 8; ++q8) smt[(c + q8) * ldt + r] = xe[q8];
        }
    }
}

#define FB_BK 32                 // keys per tile (dq) / queries per tile (dkv)
#define FB_LD (ATT_DMAX + 8)     // row stride of [row][d] tiles
#define FB_LDT (FB_BK + 8)       // row stride of transposed [d][row] tiles

// dq for 16 query rows per warp (64 per block): dQ = scale · Σ_j dS_ij k_j over key tiles of 32.
template <int D>
__device__ void attn_dq_mma(bf16* dq, const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,
                            const float* delta, QlrAttn a, bf16* Ks, bf16* Vs, bf16* Kt) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / a.H, h = bh % a.H, hk = h / (a.H / a.Hkv);
    const int q0 = blockIdx.x * 64;
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
    const long long qstride = (long long)a.H * D, kstride = (long long)a.Hkv * D;
    const bf16* qb = q + ((long long)b * a.T * a.H + h) * D;
    const bf16* ob = dout + ((long long)b * a.T * a.H + h) * D;
    const bf16* kb = k + ((long long)b * a.T * a.Hkv + hk) * D;
    const bf16* vb = v + ((long long)b * a.T * a.Hkv + hk) * D;
    unsigned qa[D / 16][4], oa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const int c = kk * 16 + 2 * t;
        qa[kk][0] = r0 < a.T ? *reinterpret_cast<const unsigned*>(qb + r0 * qstride + c) : 0u;
        qa[kk][1] = r1 < a.T ? *reinterpret_cast<const unsigned*>(qb + r1 * qstride + c) : 0u;
        qa[kk][2] = r0 < a.T ? *reinterpret_cast<const unsigned*>(qb + r0 * qstride + c + 8) : 0u;
        qa[kk][3] = r1 < a.T ? *reinterpret_cast<const unsigned*>(qb + r1 * qstride + c + 8) : 0u;
        oa[kk][0] = r0 < a.T ? *reinterpret_cast<const unsigned*>(ob + r0 * qstride + c) : 0u;
        oa[kk][1] = r1 < a.T ? *reinterpret_cast<const unsigned*>(ob + r1 * qstride + c) : 0u;
        oa[kk][2] = r0 < a.T ? *reinterpret_cast<const unsigned*>(ob + r0 * qstride + c + 8) : 0u;
        oa[kk][3] = r1 < a.T ? *reinterpret_cast<const unsigned*>(ob + r1 * qstride + c + 8) : 0u;
    }
    const float L2E = 1.4426950408889634f, sl2 = a.scale * L2E;
    const long long lrow = ((long long)b * a.H + h) * a.T;
    const float l20 = r0 < a.T ? lse[lrow + r0] * L2E : 0.f, l21 = r1 < a.T ? lse[lrow + r1] * L2E : 0.f;
    const float dl0 = r0 < a.T ? delta[lrow + r0] : 0.f, dl1 = r1 < a.T ? delta[lrow + r1] : 0.f;
    float acc[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    const int last = min(a.T - 1, q0 + 63);
    for (int j0 = 0; j0 <= last; j0 += FB_BK) {
        __syncthreads();
        fa_tile<D>(Ks, FB_LD, Kt, FB_LDT, kb + j0 * kstride, kstride, FB_BK, a.T - j0);
        fa_tile<D>(Vs, FB_LD, nullptr, 0, vb + j0 * kstride, kstride, FB_BK, a.T - j0);
        __syncthreads();
        float sc[4][4], dp[4][4];
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
            dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                unsigned bk[2], bv[2];
                fa_ld_b(bk, Ks + (nt * 8 + g) * FB_LD + kk * 16 + 2 * t);
                fa_ld_b(bv, Vs + (nt * 8 + g) * FB_LD + kk * 16 + 2 * t);
                mma_bf16_16816(sc[nt], qa[kk], bk);
                mma_bf16_16816(dp[nt], oa[kk], bv);
            }
        }
        // ds = p·(dp − delta), p = exp(s·scale − lse); masked (key > row, key ≥ T) → 0.
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = j0 + nt * 8 + 2 * t + (e & 1);
                const int row = e < 2 ? r0 : r1;
                const float p = (key <= row && key < a.T) ? exp2f(sc[nt][e] * sl2 - (e < 2 ? l20 : l21)) : 0.f;
                sc[nt][e] = p * (dp[nt][e] - (e < 2 ? dl0 : dl1));
            }
#pragma unroll
        for (int kt = 0; kt < FB_BK / 16; ++kt) {
            unsigned da[4] = {fa_pack(sc[2 * kt][0], sc[2 * kt][1]), fa_pack(sc[2 * kt][2], sc[2 * kt][3]),
                              fa_pack(sc[2 * kt + 1][0], sc[2 * kt + 1][1]), fa_pack(sc[2 * kt + 1][2], sc[2 * kt + 1][3])};
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn) {
                unsigned bk[2];
                fa_ld_b(bk, Kt + (dn * 8 + g) * FB_LDT + kt * 16 + 2 * t);
                mma_bf16_16816(acc[dn], da, bk);
            }
        }
    }
    bf16* db = dq + ((long long)b * a.T * a.H + h) * D;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
        const int c = dn * 8 + 2 * t;
        if (r0 < a.T) *reinterpret_cast<__nv_bfloat162*>(db + r0 * qstride + c) = __floats2bfloat162_rn(acc[dn][0] * a.scale, acc[dn][1] * a.scale);
        if (r1 < a.T) *reinterpret_cast<__nv_bfloat162*>(db + r1 * qstride + c) = __floats2bfloat162_rn(acc[dn][2] * a.scale, acc[dn][3] * a.scale);
    }
}

// dk, dv for 16 key rows per warp (64 per block), over the group's heads and query tiles of 32.
// Dynamic shared memory: Kb, Vb [64][FB_LD]; Qs, Os [32][FB_LD]; Qt, Ot [D][FB_LDT]; Ls, Dl [32] f32.
template <int D>
__device__ void attn_dkv_mma(bf16* dk, bf16* dv, const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                             const float* lse, const float* delta, QlrAttn a, unsigned char* smem) {
    bf16* Kb = reinterpret_cast<bf16*>(smem);
    bf16* Vb = Kb + 64 * FB_LD;
    bf16* Qs = Vb + 64 * FB_LD;
    bf16* Os = Qs + FB_BK * FB_LD;
    bf16* Qt = Os + FB_BK * FB_LD;
    bf16* Ot = Qt + ATT_DMAX * FB_LDT;
    float* Ls = reinterpret_cast<float*>(Ot + ATT_DMAX * FB_LDT);
    float* Dl = Ls + FB_BK;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / a.Hkv, hk = bh % a.Hkv, group = a.H / a.Hkv;
    const int j0 = blockIdx.x * 64;
    const int kr0 = j0 + warp * 16 + g, kr1 = kr0 + 8;  // the two key rows this thread holds
    const long long qstride = (long long)a.H * D, kstride = (long long)a.Hkv * D;
    const bf16* kb = k + ((long long)b * a.T * a.Hkv + hk) * D;
    const bf16* vb = v + ((long long)b * a.T * a.Hkv + hk) * D;
    fa_tile<D>(Kb, FB_LD, nullptr, 0, kb + j0 * kstride, kstride, 64, a.T - j0);
    fa_tile<D>(Vb, FB_LD, nullptr, 0, vb + j0 * kstride, kstride, 64, a.T - j0);
    const float L2E = 1.4426950408889634f, sl2 = a.scale * L2E;
    float ak[D / 8][4], av[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) ak[i][0] = ak[i][1] = ak[i][2] = ak[i][3] = av[i][0] = av[i][1] = av[i][2] = av[i][3] = 0.f;
    for (int gh = 0; gh < group; ++gh) {
        const int h = hk * group + gh;
        const bf16* qb = q + ((long long)b * a.T * a.H + h) * D;
        const bf16* ob = dout + ((long long)b * a.T * a.H + h) * D;
        const long long lrow = ((long long)b * a.H + h) * a.T;
        for (int i0 = (j0 / FB_BK) * FB_BK; i0 < a.T; i0 += FB_BK) {
            __syncthreads();
            fa_tile<D>(Qs, FB_LD, Qt, FB_LDT, qb + i0 * qstride, qstride, FB_BK, a.T - i0);
            fa_tile<D>(Os, FB_LD, Ot, FB_LDT, ob + i0 * qstride, qstride, FB_BK, a.T - i0);
            if (threadIdx.x < FB_BK) {
                const int i = i0 + threadIdx.x;
                Ls[threadIdx.x] = i < a.T ? lse[lrow + i] * L2E : 0.f;
                Dl[threadIdx.x] = i < a.T ? delta[lrow + i] : 0.f;
            }
            __syncthreads();
            // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for 16 keys × 32 queries.
            float st[4][4], dp[4][4];
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                st[nt][0] = st[nt][1] = st[nt][2] = st[nt][3] = 0.f;
                dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.f;
            }
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                unsigned ka[4], va[4];
                fa_ld_a(ka, Kb + (warp * 16 + g) * FB_LD + kk * 16 + 2 * t, FB_LD);
                fa_ld_a(va, Vb + (warp * 16 + g) * FB_LD + kk * 16 + 2 * t, FB_LD);
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) {
                    unsigned bq[2], bo[2];
                    fa_ld_b(bq, Qs + (nt * 8 + g) * FB_LD + kk * 16 + 2 * t);
                    fa_ld_b(bo, Os + (nt * 8 + g) * FB_LD + kk * 16 + 2 * t);
                    mma_bf16_16816(st[nt], ka, bq);
                    mma_bf16_16816(dp[nt], va, bo);
                }
            }
            // Pᵀ (in st) and dSᵀ (in dp): query ≥ key and query < T, else 0.
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qc = nt * 8 + 2 * t + (e & 1), qi = i0 + qc;
                    const int key = e < 2 ? kr0 : kr1;
                    const float p = (qi >= key && qi < a.T) ? exp2f(st[nt][e] * sl2 - Ls[qc]) : 0.f;
                    st[nt][e] = p;
                    dp[nt][e] = p * (dp[nt][e] - Dl[qc]);
                }
            // dV += Pᵀ·dO and dK += dSᵀ·Q (k = the 32 queries: two k16 steps).
#pragma unroll
            for (int kt = 0; kt < FB_BK / 16; ++kt) {
                unsigned pa[4] = {fa_pack(st[2 * kt][0], st[2 * kt][1]), fa_pack(st[2 * kt][2], st[2 * kt][3]),
                                  fa_pack(st[2 * kt + 1][0], st[2 * kt + 1][1]), fa_pack(st[2 * kt + 1][2], st[2 * kt + 1][3])};
                unsigned sa[4] = {fa_pack(dp[2 * kt][0], dp[2 * kt][1]), fa_pack(dp[2 * kt][2], dp[2 * kt][3]),
                                  fa_pack(dp[2 * kt + 1][0], dp[2 * kt + 1][1]), fa_pack(dp[2 * kt + 1][2], dp[2 * kt + 1][3])};
#pragma unroll
                for (int dn = 0; dn < D / 8; ++dn) {
                    unsigned bo[2], bq[2];
                    fa_ld_b(bo, Ot + (dn * 8 + g) * FB_LDT + kt * 16 + 2 * t);
                    fa_ld_b(bq, Qt + (dn * 8 + g) * FB_LDT + kt * 16 + 2 * t);
                    mma_bf16_16816(av[dn], pa, bo);
                    mma_bf16_16816(ak[dn], sa, bq);
                }
            }
        }
    }
    bf16* dkb = dk + ((long long)b * a.T * a.Hkv + hk) * D;
    bf16* dvb = dv + ((long long)b * a.T * a.Hkv + hk) * D;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
        const int c = dn * 8 + 2 * t;
        if (kr0 < a.T) {
            *reinterpret_cast<__nv_bfloat162*>(dkb + kr0 * kstride + c) = __floats2bfloat162_rn(ak[dn][0] * a.scale, ak[dn][1] * a.scale);
            *reinterpret_cast<__nv_bfloat162*>(dvb + kr0 * kstride + c) = __floats2bfloat162_rn(av[dn][0], av[dn][1]);
        }
        if (kr1 < a.T) {
            *reinterpret_cast<__nv_bfloat162*>(dkb + kr1 * kstride + c) = __floats2bfloat162_rn(ak[dn][2] * a.scale, ak[dn][3] * a.scale);
            *reinterpret_cast<__nv_bfloat162*>(dvb + kr1 * kstride + c) = __floats2bfloat162_rn(av[dn][2], av[dn][3]);
        }
    }
}

#define FA_DISPATCH(CALL)          \
    switch (a.D) {                 \
        case 16: CALL(16); break;  \
        case 32: CALL(32); break;  \
        case 48: CALL(48); break;  \
        case 64: CALL(64); break;  \
        case 80: CALL(80); break;  \
        case 96: CALL(96); break;  \
        case 112: CALL(112); break; \
        case 128: CALL(128); break; \
        default: break;            \
    }

extern "C" __global__ void __launch_bounds__(128) qlr_attention_bwd_dq_mma_bf16(bf16* dq, const bf16* q, const bf16* k,
                                                                              const bf16* v, const bf16* dout,
                                                                              const float* lse, const float* delta,
                                                                              QlrAttn a) {
    __shared__ __align__(16) bf16 Ks[FB_BK * FB_LD];
    __shared__ __align__(16) bf16 Vs[FB_BK * FB_LD];
    __shared__ __align__(16) bf16 Kt[ATT_DMAX * FB_LDT];
#define DQ_CALL(DD) attn_dq_mma<DD>(dq, q, k, v, dout, lse, delta, a, Ks, Vs, Kt)
    FA_DISPATCH(DQ_CALL)
#undef DQ_CALL
}

extern "C" __global__ void __launch_bounds__(128) qlr_attention_bwd_dkv_mma_bf16(bf16* dk, bf16* dv, const bf16* q,
                                                                               const bf16* k, const bf16* v,
                                                                               const bf16* dout, const float* lse,
                                                                               const float* delta, QlrAttn a) {
    QLR_DYN_SMEM(unsigned char, fa_dyn_smem);
#define DKV_CALL(DD) attn_dkv_mma<DD>(dk, dv, q, k, v, dout, lse, delta, a, fa_dyn_smem)
    FA_DISPATCH(DKV_CALL)
#undef DKV_CALL
}
