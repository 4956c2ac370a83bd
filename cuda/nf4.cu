// nf4.cu: NF4 blockwise dequantize and quantize (specs/nf4.md §2–4).
// entries: qlr_nf4_dequant_fwd_f32 qlr_nf4_dequant_fwd_bf16 qlr_nf4_quantize_fwd_f32
// entries: qlr_nf4_quantize_fwd_bf16 qlr_nf4_double_quant_fwd_f32
// dequant:  w[e] = T(f32(NF4[code(e)] * scale[e / QB])), scale = f32(f32(map[q]·nested[b/256]) + offset)
//           with double quant: two f32 roundings (__fmul_rn/__fadd_rn, no FMA), then one rounding
//           to T. Bit-exact with qlora_nf4::Nf4Tensor::dequantize_{f32,bf16}.
// quantize: absmax[b] = max|x| over the block; x̂ = f32(x · f32(1/absmax)) (division in a partial
//           tail block or when 1/absmax overflows, as the CPU); code = #thresholds strictly below
//           x̂; packed byte = code[2k] << 4 | code[2k+1]; odd n pads with code 7; an all-zero
//           block stores absmax 0 and 0x77 bytes. Non-finite inputs are counted in *bad (the
//           launcher turns that into a typed error, like the CPU's Nf4Error::NonFinite).
// double quant: the launcher computes offset = qlora_nf4::quant::mean_f32(absmax) on the host
//           (f64 sum, one rounding), this kernel does the 256-blocks: nested = max|a − offset|,
//           code = exact nearest map entry (ties take the lower index) of f32((a−offset)·(1/nested)).
// Reference: qlora_nf4::quant::{quantize_blockwise, double_quantize}; nothing is saved; no aliasing.
#include "common.cuh"

// One thread: 8 packed bytes = 16 elements, all inside one QB block (QB is a multiple of 16).
template <typename T>
__device__ void nf4_dequant(T* __restrict__ out, QlrNf4 w, long long n) {
    __shared__ float lut[16];
    qlr_nf4_lut_to_smem(lut);
    __syncthreads();
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long e0 = t * 16;
    if (e0 >= n) return;
    const float scale = qlr_nf4_scale(w, e0 / w.blocksize);
    if (e0 + 16 <= n) {
        const uint2 raw = *reinterpret_cast<const uint2*>(w.packed + t * 8);
        float v[16];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const unsigned byte = ((i < 4 ? raw.x : raw.y) >> (8 * (i & 3))) & 0xffu;
            v[2 * i] = qlr_nf4_deq(lut, byte >> 4, scale);
            v[2 * i + 1] = qlr_nf4_deq(lut, byte & 15u, scale);
        }
        if constexpr (sizeof(T) == 2) {
            uint4 pk[2];
            unsigned* p = reinterpret_cast<unsigned*>(pk);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
                p[i] = *reinterpret_cast<unsigned*>(&h);
            }
            uint4* o = reinterpret_cast<uint4*>(out + e0);
            o[0] = pk[0];
            o[1] = pk[1];
        } else {
            float4* o = reinterpret_cast<float4*>(out + e0);
#pragma unroll
            for (int i = 0; i < 4; ++i) o[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
        }
    } else {
        for (long long e = e0; e < n; ++e) {
            const unsigned byte = w.packed[e >> 1];
            const unsigned code = (e & 1) ? (byte & 15u) : (byte >> 4);
            out[e] = qlr_from_f32<T>(qlr_nf4_deq(lut, code, scale));
        }
    }
}

// The 15 decision thresholds t_i = f32((v_i + v_{i+1}) / 2) (specs/nf4.md §1), as bits.
__constant__ unsigned qlr_nf4_thr_bits[15] = {
    0xbf591cd8u, 0xbf1c5270u, 0xbeeb8480u, 0xbeadea76u, 0xbe703cecu, 0xbe0d38bcu, 0xbd3a7871u,
    0x3d22faffu, 0x3df64862u, 0x3e5067e0u, 0x3e9582d4u, 0x3ec753f9u, 0x3f006d04u, 0x3f248dafu,
    0x3f5c89dau};

__device__ __forceinline__ unsigned nf4_code(const float* thr, float x) {
    unsigned c = 0;
#pragma unroll
    for (int i = 0; i < 15; ++i) c += (x > thr[i]) ? 1u : 0u;  // NaN compares false: code 0
    return c;
}

// One warp per QB block; lane l handles byte pairs (2k, 2k+1) for k = l, l+32, ...
template <typename T>
__device__ void nf4_quantize(u8* __restrict__ packed, float* __restrict__ absmax, int* __restrict__ bad,
                             const T* __restrict__ x, long long n, int qb) {
    __shared__ float thr[15];
    if (threadIdx.x < 15) thr[threadIdx.x] = __uint_as_float(qlr_nf4_thr_bits[threadIdx.x]);
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const long long block = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const long long start = block * qb;
    if (start >= n) return;
    const long long len = min((long long)qb, n - start);
    float m = 0.f;
    int nonfinite = 0;
    for (long long i = lane; i < len; i += 32) {
        const float v = qlr_to_f32(x[start + i]);
        nonfinite |= !isfinite(v);
        m = fmaxf(m, fabsf(v));
    }
    m = qlr_warp_max(m);
    if (__any_sync(0xffffffffu, nonfinite) && lane == 0) atomicAdd(bad, 1);
    if (lane == 0) absmax[block] = m;
    const long long nbytes = (len + 1) / 2;
    u8* out = packed + start / 2;
    if (m == 0.f) {
        for (long long k = lane; k < nbytes; k += 32) out[k] = 0x77;
        return;
    }
    const float recip = __frcp_rn(m);
    const bool divide = len < qb || isinf(recip);
    for (long long k = lane; k < nbytes; k += 32) {
        const float a = qlr_to_f32(x[start + 2 * k]);
        const float an = divide ? __fdiv_rn(a, m) : __fmul_rn(a, recip);
        unsigned lo = 7;  // padding of an odd length: the code of 0.0
        if (2 * k + 1 < len) {
            const float b = qlr_to_f32(x[start + 2 * k + 1]);
            lo = nf4_code(thr, divide ? __fdiv_rn(b, m) : __fmul_rn(b, recip));
        }
        out[k] = (u8)(nf4_code(thr, an) << 4 | lo);
    }
}

extern "C" __global__ void __launch_bounds__(256) qlr_nf4_dequant_fwd_f32(float* out, QlrNf4 w, long long n) {
    nf4_dequant<float>(out, w, n);
}
extern "C" __global__ void __launch_bounds__(256) qlr_nf4_dequant_fwd_bf16(bf16* out, QlrNf4 w, long long n) {
    nf4_dequant<bf16>(out, w, n);
}
extern "C" __global__ void __launch_bounds__(256) qlr_nf4_quantize_fwd_f32(u8* packed, float* absmax, int* bad,
                                                                         const float* x, long long n, int qb) {
    nf4_quantize<float>(packed, absmax, bad, x, n, qb);
}
extern "C" __global__ void __launch_bounds__(256) qlr_nf4_quantize_fwd_bf16(u8* packed, float* absmax, int* bad,
                                                                          const bf16* x, long long n, int qb) {
    nf4_quantize<bf16>(packed, absmax, bad, x, n, qb);
}

// One block of 256 threads per nested block of 256 absmax values.
extern "C" __global__ void __launch_bounds__(256) qlr_nf4_double_quant_fwd_f32(
    u8* codes, float* nested, const float* absmax, const float* dyn_map, float offset, long long n_blocks) {
    __shared__ float map[256];
    __shared__ float scratch[32];
    map[threadIdx.x] = dyn_map[threadIdx.x];
    const long long b0 = (long long)blockIdx.x * 256;
    const long long i = b0 + threadIdx.x;
    const int len = (int)min(256LL, n_blocks - b0);
    const float c = i < n_blocks ? __fsub_rn(absmax[i], offset) : 0.f;
    const float m = qlr_block_max(fabsf(c), scratch);  // also orders the map stores
    if (threadIdx.x == 0) nested[blockIdx.x] = m;
    if (i >= n_blocks) return;
    if (m == 0.f) {  // every value equals the mean: code 0, as the CPU (bitsandbytes' 0/0 = NaN)
        codes[i] = 0;
        return;
    }
    const float recip = __frcp_rn(m);
    const float v = (len < 256 || isinf(recip)) ? __fdiv_rn(c, m) : __fmul_rn(c, recip);
    // First index whose value is >= v (partition point), then the nearer of it and its left
    // neighbour; a tie takes the lower index.
    int lo = 0, hi = 256;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (map[mid] < v) lo = mid + 1; else hi = mid;
    }
    int code;
    if (hi == 0) code = 0;
    else if (hi == 256) code = 255;
    else code = (__fsub_rn(v, map[hi - 1]) <= __fsub_rn(map[hi], v)) ? hi - 1 : hi;
    codes[i] = (u8)code;
}
