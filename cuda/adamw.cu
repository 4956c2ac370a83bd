// adamw.cu: AdamW over the whole LoRA adapter arena in ONE launch per step (plus one
// grad-norm reduction launch when clipping is on); f32 params/grads, f32 or blockwise 8-bit state.
// entries: qlr_adamw_step_f32 qlr_adamw_sumsq_f32
// step:  per chunk of the chunk table (qlora_optim::arena::Chunk): kind 0 = ≤2048 elements with
//        f32 m, v; kind 1 = one 256-block with u8 codes (m: signed, v: unsigned dynamic map) and
//        an f32 absmax per moment. g = grad·scale; torch: p·=wd_f; m = fma(w,g−m,m);
//        v = fma((1−β2)g, g, vβ2); p += (s·m)/(sqrt(v)/c2 + eps).  bnb: m = mβ1+(1−β1)g;
//        v = vβ2+(1−β2)(g·g) [8-bit: ((1−β2)g)g]; p += s·(m/(sqrt(v)+eps·c2)); p·=wd_f.
//        8-bit: dequantize code·absmax, update, absmax' = block max|·|, requantize by bnb's
//        quantize_2D (+ sign fix for m). A non-finite g leaves p, m, v unchanged (counted).
// sumsq: per chunk Σ g² (finite) in f64 → partials; the last block folds them per tensor
//        (n_i = f32(sqrt Σ)), total = f32(sqrt Σ n_i²), coef = min(1, f32(1/(total+1e-6))·max).
// Precision: every op is an explicit IEEE-rounded intrinsic (__fmul_rn, __fadd_rn, __fdiv_rn,
// __fsqrt_rn, __fmaf_rn where torch fuses) so the result is bit-identical to the CPU reference
// qlora_optim::adamw::{moments, param, update_f32} and blockwise8::update_block, whatever
// NVRTC's --fmad setting. Nothing saved; no aliasing between params, grads and state.
#include "common.cuh"

// Mirrors qlora_optim::adamw::StepScalars (repr(C), 48 bytes).
struct QlrAdamwScalars {
    unsigned variant, apply_wd;
    float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt, wd_factor;
    float grad_scale;
    unsigned lerp_small;
};
// Mirrors qlora_optim::arena::Chunk (repr(C), 32 bytes).
struct QlrAdamwChunk {
    unsigned long long param_offset, state_offset;
    unsigned len, kind, block, tensor;
};
// The sections of the state arena (qlora_optim::arena::StateLayout).
struct QlrAdamwState {
    float* m32;       // (n32,) f32
    float* v32;       // (n32,) f32
    float* absmax_m;  // (nblocks,) f32
    float* absmax_v;  // (nblocks,) f32
    u8* m8;           // (n8,) u8 codes, signed map
    u8* v8;           // (n8,) u8 codes, unsigned map
};

#define QLR_ADAMW_THREADS 256
#define QLR_ADAMW_PER_THREAD 8  // f32 chunk = 2048 elements

__device__ __forceinline__ void qlr_adamw_moments(const QlrAdamwScalars& s, float m, float v, float g,
                                                  bool bits8, float* mo, float* vo) {
    if (s.variant == 0) {
        const float d = __fsub_rn(g, m);
        *mo = s.lerp_small ? __fmaf_rn(s.beta1, d, m) : __fmaf_rn(s.one_minus_beta1, d, g);
        *vo = __fmaf_rn(__fmul_rn(s.one_minus_beta2, g), g, __fmul_rn(v, s.beta2));
    } else {
        *mo = __fadd_rn(__fmul_rn(m, s.beta1), __fmul_rn(s.one_minus_beta1, g));
        *vo = bits8 ? __fadd_rn(__fmul_rn(v, s.beta2), __fmul_rn(__fmul_rn(s.one_minus_beta2, g), g))
                    : __fadd_rn(__fmul_rn(v, s.beta2), __fmul_rn(s.one_minus_beta2, __fmul_rn(g, g)));
    }
}

__device__ __forceinline__ float qlr_adamw_param(const QlrAdamwScalars& s, float p, float m, float v) {
    if (s.variant == 0) {
        if (s.apply_wd) p = __fmul_rn(p, s.wd_factor);
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), s.bc2_sqrt), s.eps);
        return __fadd_rn(p, __fdiv_rn(__fmul_rn(s.step_size, m), denom));
    }
    p = __fadd_rn(p, __fmul_rn(s.step_size, __fdiv_rn(m, __fadd_rn(__fsqrt_rn(v), s.eps))));
    return s.apply_wd ? __fmul_rn(p, s.wd_factor) : p;
}

// bitsandbytes' quantize_2D<SIGNED> (csrc/kernels.cu); port of qlora_optim::dynamic_map::quantize_2d.
__device__ __forceinline__ unsigned qlr_adamw_quantize(const float* code, bool sgn, float x) {
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = sgn ? -1.0f : 0.0f, upper = 1.0f;
    float val = code[127];
    for (int i = 64; i > 0; i >>= 1) {
        if (x > val) { lower_pivot = pivot; lower = val; pivot += i; }
        else { upper_pivot = pivot; upper = val; pivot -= i; }
        val = code[pivot];
    }
    if (x > val) {
        const float mid = __fmul_rn(__fadd_rn(upper, val), 0.5f);
        return x > mid ? upper_pivot : pivot;
    }
    const float mid = __fmul_rn(__fadd_rn(lower, val), 0.5f);
    return x < mid ? lower_pivot : pivot;
}

extern "C" __global__ void __launch_bounds__(QLR_ADAMW_THREADS) qlr_adamw_step_f32(float* __restrict__ params, QlrAdamwState st, unsigned long long* __restrict__ nonfinite,
                   const float* __restrict__ grads, const QlrAdamwChunk* __restrict__ chunks,
                   const float* __restrict__ maps,  // (512,) f32: signed map, then unsigned map
                   const float* __restrict__ clip,  // (2,) f32 {coef, norm} from sumsq, or nullptr
                   QlrAdamwScalars s, int n_chunks) {
    __shared__ float code_s[256], code_u[256], red[2][32];
    code_s[threadIdx.x] = maps[threadIdx.x];
    code_u[threadIdx.x] = maps[256 + threadIdx.x];
    if (clip != nullptr) s.grad_scale = clip[0];
    __syncthreads();
    const int x = threadIdx.x, lane = x & 31, warp = x >> 5;
    unsigned bad = 0;
    for (int c = blockIdx.x; c < n_chunks; c += gridDim.x) {
        const QlrAdamwChunk ch = chunks[c];
        float* p = params + ch.param_offset;
        const float* g = grads + ch.param_offset;
        if (ch.kind == 0) {
            float* m = st.m32 + ch.state_offset;
            float* v = st.v32 + ch.state_offset;
#pragma unroll
            for (int k = 0; k < QLR_ADAMW_PER_THREAD; ++k) {
                const unsigned e = k * QLR_ADAMW_THREADS + x;
                if (e >= ch.len) break;
                const float gr = g[e];
                if (!isfinite(gr)) { ++bad; continue; }
                float mo, vo;
                qlr_adamw_moments(s, m[e], v[e], __fmul_rn(gr, s.grad_scale), false, &mo, &vo);
                p[e] = qlr_adamw_param(s, p[e], mo, vo);
                m[e] = mo;
                v[e] = vo;
            }
        } else {
            // One 256-block; thread x owns element x. ch.kind is uniform over the block, so the
            // barriers below are reached by every thread.
            const bool valid = (unsigned)x < ch.len;
            u8* c1 = st.m8 + ch.state_offset;
            u8* c2 = st.v8 + ch.state_offset;
            const float am = st.absmax_m[ch.block], av = st.absmax_v[ch.block];
            float mo = 0.f, vo = 0.f, gr = 0.f;
            bool fin = false;
            if (valid) {
                gr = g[x];
                const float m0 = __fmul_rn(code_s[c1[x]], am);
                const float v0 = __fmul_rn(code_u[c2[x]], av);
                fin = isfinite(gr);
                if (fin) qlr_adamw_moments(s, m0, v0, __fmul_rn(gr, s.grad_scale), true, &mo, &vo);
                else { mo = __fadd_rn(m0, 0.0f); vo = v0; ++bad; }  // unchanged; −0 → +0 (see blockwise8.rs)
            }
            // Block max of |m|, |v| (exact in any order). −FLT_MAX for padding threads, as bnb.
            float bm = valid ? fabsf(mo) : -3.402823466e38f, bv = valid ? fabsf(vo) : -3.402823466e38f;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                bm = fmaxf(bm, __shfl_xor_sync(0xffffffffu, bm, o));
                bv = fmaxf(bv, __shfl_xor_sync(0xffffffffu, bv, o));
            }
            if (lane == 0) { red[0][warp] = bm; red[1][warp] = bv; }
            __syncthreads();
            bm = red[0][0];
            bv = red[1][0];
#pragma unroll
            for (int w = 1; w < QLR_ADAMW_THREADS / 32; ++w) { bm = fmaxf(bm, red[0][w]); bv = fmaxf(bv, red[1][w]); }
            __syncthreads();  // red is reused by the next chunk
            if (valid) {
                if (fin) p[x] = qlr_adamw_param(s, p[x], mo, vo);
                unsigned q1 = qlr_adamw_quantize(code_s, true, __fdiv_rn(mo, bm));
                if ((signbit(code_s[q1]) != 0) != (signbit(mo) != 0)) q1 = (mo > 0.0f ? q1 + 1u : q1 - 1u) & 255u;
                c1[x] = (u8)q1;
                c2[x] = (u8)qlr_adamw_quantize(code_u, false, __fdiv_rn(vo, bv));
            }
            if (x == 0) { st.absmax_m[ch.block] = bm; st.absmax_v[ch.block] = bv; }
        }
    }
    // One atomic per warp for the non-finite count.
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) bad += __shfl_xor_sync(0xffffffffu, bad, o);
    if (lane == 0 && bad) atomicAdd(nonfinite, (unsigned long long)bad);
}

__device__ __forceinline__ double qlr_adamw_block_sum_f64(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double t = 0.0;
    if (threadIdx.x == 0)
        for (int w = 0; w < QLR_ADAMW_THREADS / 32; ++w) t += scratch[w];
    __syncthreads();
    return t;  // valid in thread 0
}

extern "C" __global__ void __launch_bounds__(QLR_ADAMW_THREADS) qlr_adamw_sumsq_f32(double* __restrict__ partials,   // (n_chunks,) f64 scratch
                    float* __restrict__ clip,        // (2,) f32 out: {coef, total norm}
                    unsigned* __restrict__ done,     // (1,) u32 block counter, 0 on entry, 0 on exit
                    const float* __restrict__ grads, const QlrAdamwChunk* __restrict__ chunks,
                    const unsigned* __restrict__ tensor_first_chunk,  // (n_tensors + 1,) u32
                    float max_norm, int n_chunks, int n_tensors) {
    __shared__ double scratch[32];
    __shared__ bool last;
    const int x = threadIdx.x;
    for (int c = blockIdx.x; c < n_chunks; c += gridDim.x) {
        const QlrAdamwChunk ch = chunks[c];
        const float* g = grads + ch.param_offset;
        double acc = 0.0;
        for (unsigned e = x; e < ch.len; e += QLR_ADAMW_THREADS) {
            const float v = g[e];
            if (isfinite(v)) acc += (double)v * (double)v;
        }
        acc = qlr_adamw_block_sum_f64(acc, scratch);
        if (x == 0) partials[c] = acc;
    }
    // Last block to finish folds the partials (classic threadfence reduction).
    __threadfence();
    __syncthreads();
    if (x == 0) last = atomicAdd(done, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    double sq = 0.0;
    for (int t = x; t < n_tensors; t += QLR_ADAMW_THREADS) {
        double s = 0.0;
        // __ldcg: other blocks wrote these; read through L2, never a stale L1 line.
        for (unsigned c = tensor_first_chunk[t]; c < tensor_first_chunk[t + 1]; ++c) s += __ldcg(&partials[c]);
        const double n = (double)(float)sqrt(s);
        sq += n * n;
    }
    sq = qlr_adamw_block_sum_f64(sq, scratch);
    if (x == 0) {
        const float total = (float)sqrt(sq);
        const float r = __fdiv_rn(1.0f, __fadd_rn(total, 1e-6f));
        clip[0] = fminf(__fmul_rn(r, max_norm), 1.0f);
        clip[1] = total;
        *done = 0u;
    }
}
