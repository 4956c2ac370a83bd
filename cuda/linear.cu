// linear.cu: the fused NF4 + LoRA linear (design.md §1, specs/peft.md), S = alpha/r (or alpha/√r).
// entries: qlr_linear_fwd_f32 qlr_linear_fwd_bf16 qlr_linear_bwd_f32 qlr_linear_bwd_bf16
// entries: qlr_linear_fwd_skinny_bf16 qlr_linear_bwd_skinny_bf16 qlr_linear_bwd_acc_skinny_bf16
// entries: qlr_linear_bwd_acc_f32 qlr_linear_bwd_acc_bf16
// entries: qlr_linear_lora_proj_fwd_f32 qlr_linear_lora_proj_fwd_bf16
// entries: qlr_linear_lora_grad_bwd_acc_f32 qlr_linear_lora_grad_bwd_acc_bf16
// fwd:  us = S·(x·Aᵀ) (M,R) [lora_proj], saved for bwd;  y = x·deq(W)ᵀ + us·Bᵀ (M,N) [linear_fwd]
// bwd:  vs = S·(dy·B) (M,R) [lora_proj];  dx (=|+=) dy·deq(W) + vs·A (M,K) [linear_bwd(_acc)]
//       dA += vsᵀ·x (R,K) f32, dB += dyᵀ·us (N,R) f32 [lora_grad_bwd_acc]. W never gets a gradient.
// Layouts: row-major; x (M,K), W NF4 over the flat (N,K) order, A (R,K), B (N,R), all T.
// Both GEMM terms accumulate in one f32 register tile and y/dx is written once (the plain
// formula `y = x·deq(W)ᵀ; y += S·(x·Aᵀ)·Bᵀ` is what this replaces). The NF4 tile loader
// dequantizes exactly as nf4.cu (f32 product, one rounding to bf16 for the mma path), so the
// fused result equals dequantize + GEMM up to summation order.
// Precision: bf16 uses mma.sync m16n8k16 (bf16 in, f32 accumulate); f32 uses f32 FMA (SIMT).
// us/vs are stored in T. Aliasing: out must not alias any input. Reference: tests/gpu.rs run_linear.
#include "common.cuh"

// lora_grad uses split-K with f32 atomics: dA/dB are not bitwise deterministic across runs
// (the order of the partial sums varies).

struct QlrLinear {
    void* out;        // T (m, n_out)
    const void* a1;   // T (m, k1) row-major: x (fwd) or dy (bwd)
    const void* a2;   // T (m, k2) row-major: us (fwd) or vs (bwd); unused when k2 == 0
    const void* b2;   // T dense operand of the LoRA term: element (c, j) at c*b2_sc + j*b2_sj
    QlrNf4 w;         // NF4 operand: element (c, j) at flat index c*w_sc + j*w_sj
    long long w_sc, w_sj, b2_sc, b2_sj;
    int m, n_out, k1, k2;
    int accumulate;   // out += result instead of out = result
    int pad_;
};
static_assert(sizeof(QlrNf4) == 48, "QlrNf4 layout is mirrored in ops/linear.rs");
static_assert(sizeof(QlrLinear) == 136, "QlrLinear layout is mirrored in ops/linear.rs");

// ---- tile loaders: fill sm[ROWS][LDS] with rows r0.., reduction index k0.. (zero outside) ----

// Dense operand (row r, k) at p[r*sr + k*sk]. Consecutive threads walk the contiguous index.
template <typename T, typename S, int ROWS, int BK, int LDS, int NT>
__device__ __forceinline__ void load_dense(S* sm, const T* __restrict__ p, long long sr, long long sk, int r0,
                                           int k0, int nrows, int nk) {
    if (sk == 1) {
        if constexpr (sizeof(T) == 2 && sizeof(S) == 2) {
            // 8 bf16 per thread as one 16-byte load when the whole row segment is in range and aligned.
            for (int i = threadIdx.x; i < ROWS * BK / 8; i += NT) {
                const int r = i / (BK / 8), k = (i % (BK / 8)) * 8;
                const int gr = r0 + r, gk = k0 + k;
                const long long off = (long long)gr * sr + gk;
                uint4 v = make_uint4(0, 0, 0, 0);
                if (gr < nrows && gk + 8 <= nk && (reinterpret_cast<unsigned long long>(p + off) & 15) == 0) {
                    v = *reinterpret_cast<const uint4*>(p + off);
                } else if (gr < nrows) {
                    bf16* e = reinterpret_cast<bf16*>(&v);
                    for (int q = 0; q < 8; ++q) e[q] = gk + q < nk ? p[off + q] : qlr_from_f32<bf16>(0.f);
                }
                *reinterpret_cast<uint4*>(sm + r * LDS + k) = v;
            }
        } else {
            for (int i = threadIdx.x; i < ROWS * BK; i += NT) {
                const int r = i / BK, k = i % BK;
                const int gr = r0 + r, gk = k0 + k;
                const float v = (gr < nrows && gk < nk) ? qlr_to_f32(p[(long long)gr * sr + gk]) : 0.f;
                sm[r * LDS + k] = qlr_from_f32<S>(v);
            }
        }
    } else {
        for (int i = threadIdx.x; i < ROWS * BK; i += NT) {
            const int k = i / ROWS, r = i % ROWS;
            const int gr = r0 + r, gk = k0 + k;
            const float v = (gr < nrows && gk < nk) ? qlr_to_f32(p[(long long)gr * sr + (long long)gk * sk]) : 0.f;
            sm[r * LDS + k] = qlr_from_f32<S>(v);
        }
    }
}

// NF4 operand (row c, k) at flat f = c*sc + k*sk. Fast paths: 16 codes (8 bytes) per thread
// along the contiguous index, which then share one QB block (QB % 16 == 0, f0 % 16 == 0).
template <typename S, int ROWS, int BK, int LDS, int NT>
__device__ __forceinline__ void load_nf4(S* sm, const QlrNf4& w, const float* lut, long long sc, long long sk,
                                         int c0, int k0, int nrows, int nk) {
    const bool k_contig = sk == 1 && (sc % 16) == 0;
    const bool c_contig = sc == 1 && (sk % 16) == 0;
    if (k_contig && BK % 16 == 0) {
        for (int i = threadIdx.x; i < ROWS * BK / 16; i += NT) {
            const int r = i / (BK / 16), k = (i % (BK / 16)) * 16;
            const int gr = c0 + r, gk = k0 + k;
            S* dst = sm + r * LDS + k;
            if (gr < nrows && gk + 16 <= nk) {
                const long long f = (long long)gr * sc + gk;
                const uint2 raw = *reinterpret_cast<const uint2*>(w.packed + (f >> 1));
                const float s = qlr_nf4_scale(w, f / w.blocksize);
#pragma unroll
                for (int q = 0; q < 8; ++q) {
                    const unsigned byte = ((q < 4 ? raw.x : raw.y) >> (8 * (q & 3))) & 0xffu;
                    dst[2 * q] = qlr_from_f32<S>(qlr_nf4_deq(lut, byte >> 4, s));
                    dst[2 * q + 1] = qlr_from_f32<S>(qlr_nf4_deq(lut, byte & 15u, s));
                }
            } else {
                for (int q = 0; q < 16; ++q) {
                    float v = 0.f;
                    if (gr < nrows && gk + q < nk) {
                        const long long f = (long long)gr * sc + gk + q;
                        const unsigned byte = w.packed[f >> 1];
                        v = qlr_nf4_deq(lut, (f & 1) ? (byte & 15u) : (byte >> 4), qlr_nf4_scale(w, f / w.blocksize));
                    }
                    dst[q] = qlr_from_f32<S>(v);
                }
            }
        }
    } else if (c_contig && ROWS % 16 == 0) {
        for (int i = threadIdx.x; i < ROWS * BK / 16; i += NT) {
            const int k = i / (ROWS / 16), r = (i % (ROWS / 16)) * 16;
            const int gr = c0 + r, gk = k0 + k;
            if (gr + 16 <= nrows && gk < nk) {
                const long long f = gr + (long long)gk * sk;
                const uint2 raw = *reinterpret_cast<const uint2*>(w.packed + (f >> 1));
                const float s = qlr_nf4_scale(w, f / w.blocksize);
#pragma unroll
                for (int q = 0; q < 8; ++q) {
                    const unsigned byte = ((q < 4 ? raw.x : raw.y) >> (8 * (q & 3))) & 0xffu;
                    sm[(r + 2 * q) * LDS + k] = qlr_from_f32<S>(qlr_nf4_deq(lut, byte >> 4, s));
                    sm[(r + 2 * q + 1) * LDS + k] = qlr_from_f32<S>(qlr_nf4_deq(lut, byte & 15u, s));
                }
            } else {
                for (int q = 0; q < 16; ++q) {
                    float v = 0.f;
                    if (gr + q < nrows && gk < nk) {
                        const long long f = gr + q + (long long)gk * sk;
                        const unsigned byte = w.packed[f >> 1];
                        v = qlr_nf4_deq(lut, (f & 1) ? (byte & 15u) : (byte >> 4), qlr_nf4_scale(w, f / w.blocksize));
                    }
                    sm[(r + q) * LDS + k] = qlr_from_f32<S>(v);
                }
            }
        }
    } else {
        for (int i = threadIdx.x; i < ROWS * BK; i += NT) {
            const int r = i / BK, k = i % BK;
            const int gr = c0 + r, gk = k0 + k;
            float v = 0.f;
            if (gr < nrows && gk < nk) {
                const long long f = (long long)gr * sc + (long long)gk * sk;
                const unsigned byte = w.packed[f >> 1];
                v = qlr_nf4_deq(lut, (f & 1) ? (byte & 15u) : (byte >> 4), qlr_nf4_scale(w, f / w.blocksize));
            }
            sm[r * LDS + k] = qlr_from_f32<S>(v);
        }
    }
}

// ---- bf16 tensor-core kernel: 128x128 block tile, BK 32, 8 warps as 2 (m) x 4 (n), warp tile 64x32 ----
#define MMA_BM 128
#define MMA_BN 128
#define MMA_BK 32
#define MMA_LDS (MMA_BK + 8)  // +16 bytes per row: fragment loads hit 32 distinct banks

__device__ __forceinline__ void mma_tile_step(float (&acc)[4][4][4], const bf16* As, const bf16* Bs, int wm, int wn,
                                              int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int kk = 0; kk < MMA_BK; kk += 16) {
        unsigned a[4][4], b[4][2];
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
            const bf16* p = As + (wm + mi * 16 + g) * MMA_LDS + kk + 2 * t;
            a[mi][0] = *reinterpret_cast<const unsigned*>(p);
            a[mi][1] = *reinterpret_cast<const unsigned*>(p + 8 * MMA_LDS);
            a[mi][2] = *reinterpret_cast<const unsigned*>(p + 8);
            a[mi][3] = *reinterpret_cast<const unsigned*>(p + 8 * MMA_LDS + 8);
        }
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
            const bf16* p = Bs + (wn + ni * 8 + g) * MMA_LDS + kk + 2 * t;
            b[ni][0] = *reinterpret_cast<const unsigned*>(p);
            b[ni][1] = *reinterpret_cast<const unsigned*>(p + 8);
        }
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) mma_bf16_16816(acc[mi][ni], a[mi], b[ni]);
    }
}

// ---- register-staged tile loads for the common case (used by linear_mma's pipelined loop) ----
// Conditions (block-uniform): k1 a multiple of MMA_BK, a1 16-byte aligned with k1 % 8 == 0, and
// the NF4 operand either k-contiguous (fwd: w_sj == 1, w_sc % 16 == 0) or column-contiguous
// with whole 16-column groups (bwd: w_sc == 1, w_sj % 16 == 0, n_out % 16 == 0). Each thread
// stages 2×8 bf16 of a1 and 16 NF4 codes (8 bytes) with their block scale.
struct MmaStage {
    uint4 a[2];
    uint2 w;
    float ws;
    bool wv;
};

__device__ __forceinline__ bool mma_fast_path(const QlrLinear& L) {
    const bool a_ok = L.k1 % MMA_BK == 0 && (reinterpret_cast<unsigned long long>(L.a1) & 15) == 0;
    const bool k_contig = L.w_sj == 1 && L.w_sc % 16 == 0;
    const bool c_contig = L.w_sc == 1 && L.w_sj % 16 == 0 && L.n_out % 16 == 0;
    return a_ok && (k_contig || c_contig);
}

__device__ __forceinline__ void mma_stage_load(MmaStage& st, const QlrLinear& L, int m0, int n0, int k0) {
    const bf16* a1 = static_cast<const bf16*>(L.a1);
#pragma unroll
    for (int q = 0; q < 2; ++q) {
        const int i = threadIdx.x + 256 * q;  // 128 rows × 4 segments of 8
        const int r = i >> 2, kk = (i & 3) * 8;
        const int gr = m0 + r;
        st.a[q] = gr < L.m ? __ldg(reinterpret_cast<const uint4*>(a1 + (long long)gr * L.k1 + k0 + kk))
                           : make_uint4(0, 0, 0, 0);
    }
    long long f;
    if (L.w_sj == 1) {  // k-contiguous: 128 rows × 2 groups of 16 codes
        const int r = threadIdx.x >> 1, kk = (threadIdx.x & 1) * 16;
        st.wv = n0 + r < L.n_out;
        f = (long long)(n0 + r) * L.w_sc + k0 + kk;
    } else {  // column-contiguous: 32 reduction rows × 8 groups of 16 columns
        const int k = threadIdx.x >> 3, rr = (threadIdx.x & 7) * 16;
        st.wv = n0 + rr < L.n_out;  // n_out % 16 == 0: a group is all in or all out
        f = (long long)(n0 + rr) + (long long)(k0 + k) * L.w_sj;
    }
    if (st.wv) {
        st.w = __ldg(reinterpret_cast<const uint2*>(L.w.packed + (f >> 1)));
        st.ws = qlr_nf4_scale(L.w, f / L.w.blocksize);
    } else {
        st.w = make_uint2(0, 0);
        st.ws = 0.f;
    }
}

__device__ __forceinline__ void mma_stage_store(const MmaStage& st, const QlrLinear& L, const float* lut, bf16* As,
                                                bf16* Bs) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
        const int i = threadIdx.x + 256 * q;
        const int r = i >> 2, kk = (i & 3) * 8;
        *reinterpret_cast<uint4*>(As + r * MMA_LDS + kk) = st.a[q];
    }
    // p[q] packs elements 2q (low half) and 2q+1 (high half) as bf16, in memory order.
    unsigned p[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) {
        const unsigned byte = ((q < 4 ? st.w.x : st.w.y) >> (8 * (q & 3))) & 0xffu;
        const float lo = st.wv ? qlr_nf4_deq(lut, byte >> 4, st.ws) : 0.f;  // out-of-range rows: zeros
        const float hi = st.wv ? qlr_nf4_deq(lut, byte & 15u, st.ws) : 0.f;
        const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        p[q] = *reinterpret_cast<const unsigned*>(&h);
    }
    if (L.w_sj == 1) {
        const int r = threadIdx.x >> 1, kk = (threadIdx.x & 1) * 16;
        uint4* dst = reinterpret_cast<uint4*>(Bs + r * MMA_LDS + kk);
        dst[0] = make_uint4(p[0], p[1], p[2], p[3]);
        dst[1] = make_uint4(p[4], p[5], p[6], p[7]);
    } else {
        const int k = threadIdx.x >> 3, rr = (threadIdx.x & 7) * 16;
#pragma unroll
        for (int q = 0; q < 16; ++q)
            Bs[(rr + q) * MMA_LDS + k] = __ushort_as_bfloat16((unsigned short)(p[q >> 1] >> (16 * (q & 1))));
    }
}

template <bool ACC>
__device__ void linear_mma(const QlrLinear& L) {
    __shared__ __align__(16) bf16 As[MMA_BM * MMA_LDS];
    __shared__ __align__(16) bf16 Bs[MMA_BN * MMA_LDS];
    __shared__ float lut[16];
    qlr_nf4_lut_to_smem(lut);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
    const int m0 = blockIdx.y * MMA_BM, n0 = blockIdx.x * MMA_BN;
    float acc[4][4][4] = {};
    __syncthreads();
    // Term 1: a1 · NF4 operand over k1.
    const bf16* a1 = static_cast<const bf16*>(L.a1);
    if (mma_fast_path(L)) {
        // Software pipeline through registers: the global loads of tile k+1 are in flight while
        // the tensor cores work on tile k (the plain loop below waits for each load).
        MmaStage st;
        mma_stage_load(st, L, m0, n0, 0);
        for (int k0 = 0; k0 < L.k1; k0 += MMA_BK) {
            mma_stage_store(st, L, lut, As, Bs);
            __syncthreads();
            if (k0 + MMA_BK < L.k1) mma_stage_load(st, L, m0, n0, k0 + MMA_BK);
            mma_tile_step(acc, As, Bs, wm, wn, lane);
            __syncthreads();
        }
    } else {
        for (int k0 = 0; k0 < L.k1; k0 += MMA_BK) {
            load_dense<bf16, bf16, MMA_BM, MMA_BK, MMA_LDS, 256>(As, a1, L.k1, 1, m0, k0, L.m, L.k1);
            load_nf4<bf16, MMA_BN, MMA_BK, MMA_LDS, 256>(Bs, L.w, lut, L.w_sc, L.w_sj, n0, k0, L.n_out, L.k1);
            __syncthreads();
            mma_tile_step(acc, As, Bs, wm, wn, lane);
            __syncthreads();
        }
    }
    // Term 2 (LoRA): a2 · dense operand over k2 = R, into the same accumulators.
    const bf16* a2 = static_cast<const bf16*>(L.a2);
    const bf16* b2 = static_cast<const bf16*>(L.b2);
    for (int k0 = 0; k0 < L.k2; k0 += MMA_BK) {
        load_dense<bf16, bf16, MMA_BM, MMA_BK, MMA_LDS, 256>(As, a2, L.k2, 1, m0, k0, L.m, L.k2);
        load_dense<bf16, bf16, MMA_BN, MMA_BK, MMA_LDS, 256>(Bs, b2, L.b2_sc, L.b2_sj, n0, k0, L.n_out, L.k2);
        __syncthreads();
        mma_tile_step(acc, As, Bs, wm, wn, lane);
        __syncthreads();
    }
    // The single write of the output tile.
    bf16* out = static_cast<bf16*>(L.out);
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = m0 + wm + mi * 16 + g + 8 * h;
                const int c = n0 + wn + ni * 8 + 2 * t;
                if (r >= L.m) continue;
                bf16* o = out + (long long)r * L.n_out + c;
                float v0 = acc[mi][ni][2 * h], v1 = acc[mi][ni][2 * h + 1];
                if (c + 1 < L.n_out && (reinterpret_cast<unsigned long long>(o) & 3) == 0) {
                    if (ACC) {
                        const __nv_bfloat162 old = *reinterpret_cast<const __nv_bfloat162*>(o);
                        v0 += __low2float(old);
                        v1 += __high2float(old);
                    }
                    *reinterpret_cast<__nv_bfloat162*>(o) = __floats2bfloat162_rn(v0, v1);
                } else {
                    if (c < L.n_out) o[0] = __float2bfloat16_rn(ACC ? v0 + __bfloat162float(o[0]) : v0);
                    if (c + 1 < L.n_out) o[1] = __float2bfloat16_rn(ACC ? v1 + __bfloat162float(o[1]) : v1);
                }
            }
}

// ---- f32 SIMT kernel: 64x64 block tile, BK 16, 256 threads, 4x4 outputs per thread ----
#define SIMT_BM 64
#define SIMT_BN 64
#define SIMT_BK 16
#define SIMT_LDS (SIMT_BK + 1)

template <bool ACC>
__device__ void linear_simt(const QlrLinear& L) {
    __shared__ float As[SIMT_BM * SIMT_LDS];
    __shared__ float Bs[SIMT_BN * SIMT_LDS];
    __shared__ float lut[16];
    qlr_nf4_lut_to_smem(lut);
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    const int m0 = blockIdx.y * SIMT_BM, n0 = blockIdx.x * SIMT_BN;
    float acc[4][4] = {};
    __syncthreads();
    const float* a1 = static_cast<const float*>(L.a1);
    for (int k0 = 0; k0 < L.k1; k0 += SIMT_BK) {
        load_dense<float, float, SIMT_BM, SIMT_BK, SIMT_LDS, 256>(As, a1, L.k1, 1, m0, k0, L.m, L.k1);
        load_nf4<float, SIMT_BN, SIMT_BK, SIMT_LDS, 256>(Bs, L.w, lut, L.w_sc, L.w_sj, n0, k0, L.n_out, L.k1);
        __syncthreads();
#pragma unroll
        for (int k = 0; k < SIMT_BK; ++k)
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    acc[i][j] = fmaf(As[(ty + 16 * i) * SIMT_LDS + k], Bs[(tx + 16 * j) * SIMT_LDS + k], acc[i][j]);
        __syncthreads();
    }
    const float* a2 = static_cast<const float*>(L.a2);
    const float* b2 = static_cast<const float*>(L.b2);
    for (int k0 = 0; k0 < L.k2; k0 += SIMT_BK) {
        load_dense<float, float, SIMT_BM, SIMT_BK, SIMT_LDS, 256>(As, a2, L.k2, 1, m0, k0, L.m, L.k2);
        load_dense<float, float, SIMT_BN, SIMT_BK, SIMT_LDS, 256>(Bs, b2, L.b2_sc, L.b2_sj, n0, k0, L.n_out, L.k2);
        __syncthreads();
#pragma unroll
        for (int k = 0; k < SIMT_BK; ++k)
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    acc[i][j] = fmaf(As[(ty + 16 * i) * SIMT_LDS + k], Bs[(tx + 16 * j) * SIMT_LDS + k], acc[i][j]);
        __syncthreads();
    }
    float* out = static_cast<float*>(L.out);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int r = m0 + ty + 16 * i, c = n0 + tx + 16 * j;
            if (r < L.m && c < L.n_out) {
                float* o = out + (long long)r * L.n_out + c;
                *o = ACC ? *o + acc[i][j] : acc[i][j];
            }
        }
}

extern "C" __global__ void __launch_bounds__(256) qlr_linear_fwd_bf16(QlrLinear L) { linear_mma<false>(L); }
extern "C" __global__ void __launch_bounds__(256) qlr_linear_bwd_bf16(QlrLinear L) { linear_mma<false>(L); }
extern "C" __global__ void __launch_bounds__(256) qlr_linear_bwd_acc_bf16(QlrLinear L) { linear_mma<true>(L); }
extern "C" __global__ void __launch_bounds__(256) qlr_linear_fwd_f32(QlrLinear L) { linear_simt<false>(L); }
extern "C" __global__ void __launch_bounds__(256) qlr_linear_bwd_f32(QlrLinear L) { linear_simt<false>(L); }
extern "C" __global__ void __launch_bounds__(256) qlr_linear_bwd_acc_f32(QlrLinear L) { linear_simt<true>(L); }

// ---- skinny forward (bf16, M <= 64): y = x·deq(W)ᵀ + us·Bᵀ streamed at memory bandwidth ----
// The 128×128-tile kernel above is compute-shaped: at M <= 64 it runs N/128 blocks (32 for a
// 4096-wide output on 132 SMs), each with one 2 KiB NF4 stage in flight, far from HBM
// bandwidth. Here a block owns 32 output columns (4 n8 tiles) and all M <= 64 rows (up to 4
// m16 tiles); its 8 warps split K into interleaved 128-wide chunks, and each lane loads 16
// bytes (32 codes) of one W row per n tile and chunk straight into registers, the next chunk's
// loads in flight while the current one computes: no shared-memory staging of W, and 16 KiB of
// NF4 in flight per block.
//
// Fragments without a shuffle: the reduction order inside an mma is free, so logical k is
// mapped to physical k per lane. Lane (g, t) holds codes [32t, 32t+32) of chunk row n0 + g;
// in mma step s (0..7) its B fragment is codes 32t+4s+{0,1} (logical k 2t, 2t+1) and
// 32t+4s+{2,3} (logical k 2t+8, 2t+9), and the A fragment takes x at the same physical k: one
// 8-byte load per row (rows g and g+8 of the m16 tile). Over s and t every physical k of the
// chunk is used exactly once, in A and B alike.
//
// Conditions (checked by the launcher, which otherwise runs the tiled kernel): W row-major
// (N, K) with K % 128 == 0 and QB % 32 == 0 (a lane's 32 codes share one scale), x 8-byte
// aligned, M <= 64. The warps' partial sums are added in a fixed tree (deterministic), the
// LoRA term goes into warp 0's partial sum first, and y is written once.
#define SKINNY_BN 32
#define SKINNY_CHUNK 128
#define SKINNY_WARPS 8

// Adds the LoRA term a2 (M, k2) · b2ᵀ to acc (one warp, MT m16 tiles × NT n8 tiles), where b2
// element (c, j) is at b2[c·b2_sc + j·b2_sj] and `col(i)` is this lane's output column (its
// logical n, g) in n tile i. Standard fragments (k2 = R is small), zeros past M, n_out and k2.
template <int MT, int NT, typename Col>
__device__ __forceinline__ void skinny_lora_term(float (&acc)[MT][NT][4], const QlrLinear& L, int g, int t, Col col) {
    const bf16* a2 = static_cast<const bf16*>(L.a2);
    const bf16* b2 = static_cast<const bf16*>(L.b2);
    const bf16 zero = __float2bfloat16_rn(0.f);
    auto av = [&](int row, int j) { return row < L.m && j < L.k2 ? a2[(long long)row * L.k2 + j] : zero; };
    auto bv = [&](int c, int j) {
        return c < L.n_out && j < L.k2 ? b2[(long long)c * L.b2_sc + (long long)j * L.b2_sj] : zero;
    };
    auto pack = [](bf16 lo, bf16 hi) {
        const __nv_bfloat162 h = __halves2bfloat162(lo, hi);
        return *reinterpret_cast<const unsigned*>(&h);
    };
    for (int k0 = 0; k0 < L.k2; k0 += 16) {
        const int j0 = k0 + 2 * t;
#pragma unroll
        for (int i = 0; i < NT; ++i) {
            const int c = col(i);
            const unsigned b[2] = {pack(bv(c, j0), bv(c, j0 + 1)), pack(bv(c, j0 + 8), bv(c, j0 + 9))};
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const int r0 = 16 * mt + g;
                const unsigned a[4] = {pack(av(r0, j0), av(r0, j0 + 1)), pack(av(r0 + 8, j0), av(r0 + 8, j0 + 1)),
                                       pack(av(r0, j0 + 8), av(r0, j0 + 9)),
                                       pack(av(r0 + 8, j0 + 8), av(r0 + 8, j0 + 9))};
                mma_bf16_16816(acc[mt][i], a, b);
            }
        }
    }
}

// Sums the WARPS warps' acc into warp 0's in a fixed tree (warp w += warp w + half, for half =
// WARPS/2 .. 1): deterministic. part: (WARPS/2) · MT·NT·4 · 32 floats of shared memory. Every
// thread of the block must call it (it has barriers).
template <int WARPS, int MT, int NT>
__device__ __forceinline__ void skinny_tree_sum(float (&acc)[MT][NT][4], float* part, int warp, int lane) {
    constexpr int PER = MT * NT * 4;
#pragma unroll
    for (int half = WARPS / 2; half >= 1; half >>= 1) {
        if (warp >= half && warp < 2 * half) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int i = 0; i < NT; ++i)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        part[((warp - half) * PER + (mt * NT + i) * 4 + e) * 32 + lane] = acc[mt][i][e];
        }
        __syncthreads();
        if (warp < half) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int i = 0; i < NT; ++i)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[mt][i][e] += part[(warp * PER + (mt * NT + i) * 4 + e) * 32 + lane];
        }
        __syncthreads();
    }
}

// x[row][k..k+3] as two bf16 pairs (zeros for rows past M).
__device__ __forceinline__ uint2 skinny_x4(const bf16* x, int m, int k1, int row, int k) {
    return row < m ? __ldg(reinterpret_cast<const uint2*>(x + (long long)row * k1 + k)) : make_uint2(0, 0);
}

// lut: 16 floats; part: 4 × MT·16 × 32 floats, the partial sums of warps 4..7, then 2..3, then 1
// (shared memory of the entry, so the three instantiations do not each reserve their own).
template <int MT>
__device__ void linear_fwd_skinny(const QlrLinear& L, float* lut, float* part) {
    qlr_nf4_lut_to_smem(lut);
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * SKINNY_BN;
    const bf16* x = static_cast<const bf16*>(L.a1);
    float acc[MT][4][4] = {};
    const int chunks = L.k1 / SKINNY_CHUNK;
    // One chunk's W: 4 n tiles × 16 bytes per lane, with their scales.
    struct Stage {
        uint4 w[4];
        float s[4];
    };
    auto load = [&](Stage& st, int c) {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const int n = n0 + 8 * nt + g;
            if (c < chunks && n < L.n_out) {
                const long long f = (long long)n * L.w_sc + (long long)c * SKINNY_CHUNK + 32 * t;
                st.w[nt] = __ldg(reinterpret_cast<const uint4*>(L.w.packed + (f >> 1)));
                st.s[nt] = qlr_nf4_scale(L.w, f / L.w.blocksize);
            } else {
                st.w[nt] = make_uint4(0, 0, 0, 0);
                st.s[nt] = 0.f;  // lut[0] · 0 = -0: rows past N and chunks past K add nothing
            }
        }
    };
    Stage cur, next;
    load(cur, warp);
    for (int c = warp; c < chunks; c += SKINNY_WARPS) {
        load(next, c + SKINNY_WARPS);
        const int kb = c * SKINNY_CHUNK + 32 * t;
#pragma unroll
        for (int s = 0; s < 8; ++s) {
            unsigned a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const uint2 lo = skinny_x4(x, L.m, L.k1, 16 * mt + g, kb + 4 * s);
                const uint2 hi = skinny_x4(x, L.m, L.k1, 16 * mt + g + 8, kb + 4 * s);
                a[mt][0] = lo.x;
                a[mt][1] = hi.x;
                a[mt][2] = lo.y;
                a[mt][3] = hi.y;
            }
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                // Codes 4s..4s+3 of this lane's 32: bytes 2s and 2s+1, high nibble first.
                const unsigned word = (&cur.w[nt].x)[s >> 1] >> (16 * (s & 1));
                const unsigned b0 = word & 0xffu, b1 = (word >> 8) & 0xffu;
                const float sc = cur.s[nt];
                const __nv_bfloat162 p0 = __floats2bfloat162_rn(qlr_nf4_deq(lut, b0 >> 4, sc), qlr_nf4_deq(lut, b0 & 15u, sc));
                const __nv_bfloat162 p1 = __floats2bfloat162_rn(qlr_nf4_deq(lut, b1 >> 4, sc), qlr_nf4_deq(lut, b1 & 15u, sc));
                const unsigned b[2] = {*reinterpret_cast<const unsigned*>(&p0), *reinterpret_cast<const unsigned*>(&p1)};
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) mma_bf16_16816(acc[mt][nt], a[mt], b);
            }
        }
        cur = next;
    }
    // LoRA term into warp 0's partial sum: us (M, R) · Bᵀ, B element (n, j) at b2[n·b2_sc + j·b2_sj].
    if (warp == 0) skinny_lora_term<MT, 4>(acc, L, g, t, [&](int nt) { return n0 + 8 * nt + g; });
    skinny_tree_sum<SKINNY_WARPS, MT, 4>(acc, part, warp, lane);
    if (warp != 0) return;
    bf16* out = static_cast<bf16*>(L.out);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = 16 * mt + g + 8 * h;
                const int c = n0 + 8 * nt + 2 * t;
                if (r >= L.m) continue;
                bf16* o = out + (long long)r * L.n_out + c;
                const float v0 = acc[mt][nt][2 * h], v1 = acc[mt][nt][2 * h + 1];
                if (c + 1 < L.n_out && (reinterpret_cast<unsigned long long>(o) & 3) == 0) {
                    *reinterpret_cast<__nv_bfloat162*>(o) = __floats2bfloat162_rn(v0, v1);
                } else {
                    if (c < L.n_out) o[0] = __float2bfloat16_rn(v0);
                    if (c + 1 < L.n_out) o[1] = __float2bfloat16_rn(v1);
                }
            }
}

extern "C" __global__ void __launch_bounds__(256) qlr_linear_fwd_skinny_bf16(QlrLinear L) {
    __shared__ float lut[16];
    __shared__ float part[4 * 64 * 32];
    // M <= 64 rows in 1, 2 or 4 m16 tiles (3 rounds up to 4).
    if (L.m <= 16)
        linear_fwd_skinny<1>(L, lut, part);
    else if (L.m <= 32)
        linear_fwd_skinny<2>(L, lut, part);
    else
        linear_fwd_skinny<4>(L, lut, part);
}

// ---- skinny backward (bf16, M <= 16): dx (=|+=) dy·deq(W) + vs·A, W streamed like the forward ----
// Here W's contiguous axis is the output axis (dx column c = W column), so a contiguous load
// cannot form B fragments (pairs along the reduction j). Instead lane (g, t) loads four rows
// j0 + {2t, 2t+1, 2t+8, 2t+9} of a 16-row chunk at columns cb + 8g .. cb + 8g + 7 (4 bytes each;
// the 8 lanes of a t cover 32 contiguous bytes of a row): for each of its 8 columns q that is
// exactly one B fragment, so n-tile q maps logical n g to column cb + 8g + q. The reduction
// order is the natural one, and the A fragments are plain 4-byte loads of dy.
// A block owns 64 output columns and all M <= 16 rows; its 16 warps split the reduction into
// interleaved 16-row chunks, each warp keeping SKB_DEPTH chunks in flight (16 warps × 4 chunks ×
// 512 bytes = 32 KiB per block: at K 4096 only 64 blocks run, so depth stands in for blocks).
// Conditions (the launcher checks): M <= 16, W's row length (n_out here) % 8 == 0 and QB % 8 == 0
// (a lane's 8 codes share a scale), the reduction length (k1) even and dy 4-byte aligned.
// Partial sums: a fixed tree through shared memory (8 warps' 32 accumulators × 32 lanes).
#define SKB_COLS 64
#define SKB_WARPS 16
#define SKB_DEPTH 4

template <int MT, bool ACC>
__device__ void linear_bwd_skinny(const QlrLinear& L, float* lut, float* part) {
    qlr_nf4_lut_to_smem(lut);
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int cb = blockIdx.x * SKB_COLS;
    const int col = cb + 8 * g;                           // this lane's 8 columns: col .. col + 7
    const bool col_ok = col < L.n_out;                    // n_out % 8 == 0: all 8 in or all out
    const bf16* dy = static_cast<const bf16*>(L.a1);      // (m, k1) row-major
    float acc[MT][8][4] = {};
    const int chunks = (L.k1 + 15) / 16;
    // Row j0 + {2t, 2t+1, 2t+8, 2t+9}: 8 codes (4 bytes) each, and the scales.
    unsigned w[SKB_DEPTH][4];
    float sc[SKB_DEPTH][4];
    auto load = [&](int d, int c) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int j = 16 * c + 2 * t + (i & 1) + 8 * (i >> 1);
            if (c < chunks && j < L.k1 && col_ok) {
                const long long f = (long long)col + (long long)j * L.w_sj;
                w[d][i] = __ldg(reinterpret_cast<const unsigned*>(L.w.packed + (f >> 1)));
                sc[d][i] = qlr_nf4_scale(L.w, f / L.w.blocksize);
            } else {
                w[d][i] = 0u;
                sc[d][i] = 0.f;  // rows past the reduction and columns past the output add nothing
            }
        }
    };
    // A fragment of dy rows r, r + 8 at reduction index j, j + 1 (zeros past M and k1).
    auto dy2 = [&](int r, int j) {
        return r < L.m && j < L.k1 ? __ldg(reinterpret_cast<const unsigned*>(dy + (long long)r * L.k1 + j)) : 0u;
    };
#pragma unroll
    for (int d = 0; d < SKB_DEPTH; ++d) load(d, warp + SKB_WARPS * d);
    for (int base = warp; base < chunks; base += SKB_WARPS * SKB_DEPTH) {
#pragma unroll
        for (int d = 0; d < SKB_DEPTH; ++d) {
            const int c = base + SKB_WARPS * d;
            if (c < chunks) {  // warp-uniform
                const int j0 = 16 * c + 2 * t;
                unsigned a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const int r = 16 * mt + g;
                    a[mt][0] = dy2(r, j0);
                    a[mt][1] = dy2(r + 8, j0);
                    a[mt][2] = dy2(r, j0 + 8);
                    a[mt][3] = dy2(r + 8, j0 + 8);
                }
#pragma unroll
                for (int q = 0; q < 8; ++q) {
                    // Code of column col + q in a 4-byte word: byte q/2, high nibble first.
                    const int sh = 8 * (q >> 1) + ((q & 1) ? 0 : 4);
                    float v[4];
#pragma unroll
                    for (int i = 0; i < 4; ++i) v[i] = qlr_nf4_deq(lut, (w[d][i] >> sh) & 15u, sc[d][i]);
                    const __nv_bfloat162 p0 = __floats2bfloat162_rn(v[0], v[1]);  // rows 2t, 2t+1
                    const __nv_bfloat162 p1 = __floats2bfloat162_rn(v[2], v[3]);  // rows 2t+8, 2t+9
                    const unsigned b[2] = {*reinterpret_cast<const unsigned*>(&p0),
                                           *reinterpret_cast<const unsigned*>(&p1)};
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) mma_bf16_16816(acc[mt][q], a[mt], b);
                }
            }
            load(d, c + SKB_WARPS * SKB_DEPTH);
        }
    }
    // LoRA term into warp 0's partial sum: vs (M, R) · A, A element (c, r) at b2[c·b2_sc + r·b2_sj].
    if (warp == 0) skinny_lora_term<MT, 8>(acc, L, g, t, [&](int q) { return col + q; });
    skinny_tree_sum<SKB_WARPS, MT, 8>(acc, part, warp, lane);
    if (warp != 0) return;
    // d[0..1] of n-tile q are logical n 2t, 2t+1: columns cb + 16t + q and cb + 16t + 8 + q.
    bf16* out = static_cast<bf16*>(L.out);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = 16 * mt + g + 8 * h;
            if (r >= L.m) continue;
#pragma unroll
            for (int q = 0; q < 8; q += 2)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = cb + 16 * t + 8 * e + q;  // even: the pair (c, c + 1) is 4-byte aligned
                    if (c >= L.n_out) continue;             // n_out % 8 == 0: c + 1 is in range too
                    bf16* o = out + (long long)r * L.n_out + c;
                    float v0 = acc[mt][q][2 * h + e], v1 = acc[mt][q + 1][2 * h + e];
                    if (ACC) {
                        const __nv_bfloat162 old = *reinterpret_cast<const __nv_bfloat162*>(o);
                        v0 += __low2float(old);
                        v1 += __high2float(old);
                    }
                    *reinterpret_cast<__nv_bfloat162*>(o) = __floats2bfloat162_rn(v0, v1);
                }
        }
}

// One m16 tile (M <= 16): with two, the 512 threads' 128 registers spilled (ptxas, sm_90).
template <bool ACC>
__device__ void linear_bwd_skinny_entry(const QlrLinear& L) {
    __shared__ float lut[16];
    __shared__ float part[8 * 32 * 32];
    linear_bwd_skinny<1, ACC>(L, lut, part);
}
extern "C" __global__ void __launch_bounds__(512) qlr_linear_bwd_skinny_bf16(QlrLinear L) {
    linear_bwd_skinny_entry<false>(L);
}
extern "C" __global__ void __launch_bounds__(512) qlr_linear_bwd_acc_skinny_bf16(QlrLinear L) {
    linear_bwd_skinny_entry<true>(L);
}

// ---- lora_proj: out (m, r) T = scale · a (m, k) · Bop, Bop element (k, j) at b[k*sbk + j*sbj] ----
// Block: 32 rows of `a`, k in chunks of 64 staged in shared memory; each thread owns
// (32·r)/256 outputs. `a` is read once from global memory; Bop (r·k, small) is re-read per block.
#define PROJ_MT 32
#define PROJ_KC 64
#define PROJ_RMAX 128
template <typename T>
__device__ void lora_proj(T* __restrict__ out, const T* __restrict__ a, const T* __restrict__ b, long long sbk,
                          long long sbj, int m, int k, int r, float scale) {
    __shared__ float As[PROJ_MT][PROJ_KC + 1];
    __shared__ float Bs[PROJ_RMAX][PROJ_KC + 1];
    const int m0 = blockIdx.x * PROJ_MT;
    const int per = (PROJ_MT * r + 255) / 256;  // outputs per thread, <= 16 for r <= 128
    float acc[16];
#pragma unroll
    for (int q = 0; q < 16; ++q) acc[q] = 0.f;
    for (int k0 = 0; k0 < k; k0 += PROJ_KC) {
        for (int i = threadIdx.x; i < PROJ_MT * PROJ_KC; i += 256) {
            const int rr = i / PROJ_KC, kk = i % PROJ_KC;
            As[rr][kk] = (m0 + rr < m && k0 + kk < k) ? qlr_to_f32(a[(long long)(m0 + rr) * k + k0 + kk]) : 0.f;
        }
        if (sbk == 1) {
            for (int i = threadIdx.x; i < r * PROJ_KC; i += 256) {
                const int j = i / PROJ_KC, kk = i % PROJ_KC;
                Bs[j][kk] = k0 + kk < k ? qlr_to_f32(b[(long long)(k0 + kk) + (long long)j * sbj]) : 0.f;
            }
        } else {
            for (int i = threadIdx.x; i < r * PROJ_KC; i += 256) {
                const int kk = i / r, j = i % r;
                Bs[j][kk] = k0 + kk < k ? qlr_to_f32(b[(long long)(k0 + kk) * sbk + (long long)j * sbj]) : 0.f;
            }
        }
        __syncthreads();
#pragma unroll
        for (int q = 0; q < 16; ++q) {
            if (q < per) {
                const int o = threadIdx.x + 256 * q;  // output index rr * r + j
                if (o < PROJ_MT * r) {
                    const int rr = o / r, j = o % r;
                    float s = acc[q];
#pragma unroll 8
                    for (int kk = 0; kk < PROJ_KC; ++kk) s = fmaf(As[rr][kk], Bs[j][kk], s);
                    acc[q] = s;
                }
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int q = 0; q < 16; ++q) {
        if (q < per) {
            const int o = threadIdx.x + 256 * q;
            if (o < PROJ_MT * r) {
                const int rr = o / r, j = o % r;
                if (m0 + rr < m) out[(long long)(m0 + rr) * r + j] = qlr_from_f32<T>(scale * acc[q]);
            }
        }
    }
}
extern "C" __global__ void __launch_bounds__(256) qlr_linear_lora_proj_fwd_f32(float* out, const float* a, const float* b,
                                                                             long long sbk, long long sbj, int m, int k,
                                                                             int r, float scale) {
    lora_proj<float>(out, a, b, sbk, sbj, m, k, r, scale);
}
extern "C" __global__ void __launch_bounds__(256) qlr_linear_lora_proj_fwd_bf16(bf16* out, const bf16* a, const bf16* b,
                                                                              long long sbk, long long sbj, int m, int k,
                                                                              int r, float scale) {
    lora_proj<bf16>(out, a, b, sbk, sbj, m, k, r, scale);
}

// ---- lora_grad: c (p, q) f32 += Σ_m l[m, p] · rr[m, q]; l (m, p) and rr (m, q) row-major T ----
// 64x64 output tiles, the m reduction split over gridDim.z slices of `m_per` rows, combined with
// f32 atomics (the `_acc` contract: c must hold the running gradient, e.g. zeros).
template <typename T>
__device__ void lora_grad(float* __restrict__ c, const T* __restrict__ l, const T* __restrict__ rr, int m, int p,
                          int q, int m_per) {
    __shared__ float Ls[16][64];
    __shared__ float Rs[16][64];
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    const int p0 = blockIdx.y * 64, q0 = blockIdx.x * 64;
    const int mb = blockIdx.z * m_per, me = min(m, mb + m_per);
    float acc[4][4] = {};
    for (int k0 = mb; k0 < me; k0 += 16) {
        for (int i = threadIdx.x; i < 16 * 64; i += 256) {
            const int kk = i / 64, j = i % 64;
            const int gm = k0 + kk;
            Ls[kk][j] = (gm < me && p0 + j < p) ? qlr_to_f32(l[(long long)gm * p + p0 + j]) : 0.f;
            Rs[kk][j] = (gm < me && q0 + j < q) ? qlr_to_f32(rr[(long long)gm * q + q0 + j]) : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < 16; ++kk)
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(Ls[kk][ty + 16 * i], Rs[kk][tx + 16 * j], acc[i][j]);
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int pi = p0 + ty + 16 * i, qj = q0 + tx + 16 * j;
            if (pi < p && qj < q) atomicAdd(c + (long long)pi * q + qj, acc[i][j]);
        }
}
extern "C" __global__ void __launch_bounds__(256) qlr_linear_lora_grad_bwd_acc_f32(float* c, const float* l,
                                                                                 const float* rr, int m, int p, int q,
                                                                                 int m_per) {
    lora_grad<float>(c, l, rr, m, p, q, m_per);
}
extern "C" __global__ void __launch_bounds__(256) qlr_linear_lora_grad_bwd_acc_bf16(float* c, const bf16* l,
                                                                                  const bf16* rr, int m, int p, int q,
                                                                                  int m_per) {
    lora_grad<bf16>(c, l, rr, m, p, q, m_per);
}
