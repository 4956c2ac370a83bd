// cublaslt.cpp: libcublasLt.so for the CPU emulator (cuda/emu/README.md) — the part of the
// cuBLASLt API qlora-cuda's blas.rs uses: column-major D = alpha·op(A)·op(B) + beta·C with
// f32 or bf16 matrices, f32 compute and scale. Accumulates in f32 in k order; bf16 results are
// rounded to nearest even once, at the store; C is not read when beta is 0 (as cuBLAS).
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstring>

#include "include/cuda_bf16.h"

typedef int cublasStatus_t;
enum : int {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum : int { CUDA_R_32F = 0, CUDA_R_16BF = 14 };
enum : int { CUBLAS_COMPUTE_32F = 68 };

namespace {
struct Desc {
    int compute, scale;
    int trans_a = 0, trans_b = 0;
};
struct Layout {
    int type;
    uint64_t rows, cols;
    int64_t ld;
};
struct Algo {
    uint64_t data[8];
};
struct Heuristic {
    Algo algo;
    size_t workspace;
    int state;
    float waves;
    int reserved[4];
};
int handle_token, pref_token;

// Whether matrix `l` at `p` lies inside one device allocation, asked of the emulator's driver
// (driver.cpp, qlr_emu_inside_allocation): a layout that reaches past its buffer is a caller bug
// that the real cuBLASLt would turn into a silent overwrite or an illegal-address fault.
bool inside_allocation(const void* p, const Layout* l, const char* what) {
    using Fn = int (*)(const void*, size_t);
    static const Fn fn = [] {
        void* h = dlopen("libcuda.so", RTLD_NOW | RTLD_NOLOAD);
        const Fn f = h ? reinterpret_cast<Fn>(dlsym(h, "qlr_emu_inside_allocation")) : nullptr;
        if (!f) std::fprintf(stderr, "qlora-emu: cublasLt: the emulator's libcuda.so is not loaded; extents unchecked\n");
        return f;
    }();
    if (!fn || l->rows == 0 || l->cols == 0) return true;
    const size_t elem = l->type == CUDA_R_32F ? 4 : 2;
    const size_t bytes = (size_t(l->cols - 1) * size_t(l->ld) + l->rows) * elem;
    if (fn(p, bytes)) return true;
    std::fprintf(stderr, "qlora-emu: cublasLtMatmul: %s (%llu x %llu, ld %lld) at %p is not inside one allocation\n",
                 what, (unsigned long long)l->rows, (unsigned long long)l->cols, (long long)l->ld, p);
    return false;
}

float load(const void* p, int type, uint64_t i) {
    return type == CUDA_R_32F ? static_cast<const float*>(p)[i]
                              : float(static_cast<const __nv_bfloat16*>(p)[i]);
}
}  // namespace

extern "C" {
cublasStatus_t cublasLtCreate(void** h) {
    *h = &handle_token;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtDestroy(void*) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulDescCreate(Desc** d, int compute, int scale) {
    if (compute != CUBLAS_COMPUTE_32F || scale != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
    *d = new Desc{compute, scale};
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescDestroy(Desc* d) {
    delete d;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescSetAttribute(Desc* d, int attr, const void* buf, size_t size) {
    if (size != 4) return CUBLAS_STATUS_INVALID_VALUE;
    int v;
    std::memcpy(&v, buf, 4);
    if (v != 0 && v != 1) return CUBLAS_STATUS_NOT_SUPPORTED;  // CUBLAS_OP_N / CUBLAS_OP_T
    if (attr == 3)
        d->trans_a = v;
    else if (attr == 4)
        d->trans_b = v;
    else
        return CUBLAS_STATUS_NOT_SUPPORTED;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutCreate(Layout** l, int type, uint64_t rows, uint64_t cols, int64_t ld) {
    if (type != CUDA_R_32F && type != CUDA_R_16BF) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (ld < int64_t(rows)) return CUBLAS_STATUS_INVALID_VALUE;
    *l = new Layout{type, rows, cols, ld};
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutDestroy(Layout* l) {
    delete l;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutSetAttribute(Layout*, int, const void*, size_t) {
    return CUBLAS_STATUS_NOT_SUPPORTED;
}
cublasStatus_t cublasLtMatmulPreferenceCreate(void** p) {
    *p = &pref_token;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceDestroy(void*) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(void*, int, const void*, size_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(void*, Desc*, Layout*, Layout*, Layout*, Layout*, void*, int requested,
                                              Heuristic* out, int* count) {
    if (requested < 1) return CUBLAS_STATUS_INVALID_VALUE;
    std::memset(out, 0, sizeof(Heuristic));
    out->waves = 1.f;
    *count = 1;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmul(void*, const Desc* d, const void* alpha, const void* A, const Layout* la, const void* B,
                              const Layout* lb, const void* beta, const void* C, const Layout* lc, void* D,
                              const Layout* ld, const void*, void*, size_t, void*) {
    // op(A) is m×k, op(B) k×n, C and D m×n (column-major, element (r, c) at r + c·ld).
    const uint64_t m = d->trans_a ? la->cols : la->rows, k = d->trans_a ? la->rows : la->cols;
    const uint64_t kb = d->trans_b ? lb->cols : lb->rows, n = d->trans_b ? lb->rows : lb->cols;
    if (k != kb || lc->rows != m || lc->cols != n || ld->rows != m || ld->cols != n || la->type != lb->type ||
        lc->type != ld->type) {
        std::fprintf(stderr, "qlora-emu: cublasLtMatmul: inconsistent layouts\n");
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    float al, be;
    std::memcpy(&al, alpha, 4);
    std::memcpy(&be, beta, 4);
    if (!inside_allocation(A, la, "A") || !inside_allocation(B, lb, "B") ||
        (be != 0.f && !inside_allocation(C, lc, "C")) || !inside_allocation(D, ld, "D"))
        return CUBLAS_STATUS_INVALID_VALUE;
    for (uint64_t c = 0; c < n; ++c) {
        for (uint64_t r = 0; r < m; ++r) {
            float s = 0.f;
            for (uint64_t i = 0; i < k; ++i) {
                const uint64_t ia = d->trans_a ? i + r * la->ld : r + i * la->ld;
                const uint64_t ib = d->trans_b ? c + i * lb->ld : i + c * lb->ld;
                s += load(A, la->type, ia) * load(B, lb->type, ib);
            }
            float v = al * s;
            if (be != 0.f) v += be * load(C, lc->type, r + c * lc->ld);
            const uint64_t o = r + c * ld->ld;
            if (ld->type == CUDA_R_32F)
                static_cast<float*>(D)[o] = v;
            else
                static_cast<__nv_bfloat16*>(D)[o] = __float2bfloat16_rn(v);
        }
    }
    return CUBLAS_STATUS_SUCCESS;
}
}
