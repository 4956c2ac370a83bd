//! cuBLASLt: row-major GEMMs for the dequantize-to-scratch linear path and the plain-bf16
//! baseline. Compute type is always CUBLAS_COMPUTE_32F (f32 accumulation; no TF32 for f32
//! data, so the f32 build stays comparable with the CPU reference).

use crate::device::{Device, Elem, View, ViewMut};
use crate::error::{bad_arg, CudaError, Result};
use cudarc::cublaslt::{result as lt, sys};
use std::collections::HashMap;
use std::ffi::c_void;

/// Workspace cuBLASLt may use (Hopper kernels want up to 32 MiB for split-K).
pub const WORKSPACE_BYTES: usize = 32 << 20;

fn blas_err(op: &'static str) -> impl FnOnce(cudarc::cublaslt::result::CublasError) -> CudaError {
    move |e| CudaError::Blas {
        op: op.into(),
        msg: format!("{e:?}"),
    }
}

/// Row-major GEMM description: `C[m,n] = alpha·op(A)·op(B) + beta·C`, A stored `[m,k]`
/// (`[k,m]` when `a_trans`), B stored `[k,n]` (`[n,k]` when `b_trans`), all contiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a_trans: bool,
    pub b_trans: bool,
}

/// cuBLASLt is column-major; a row-major `C[m,n]` is the column-major Cᵀ (n×m), so we compute
/// Cᵀ = op(B)ᵀ·op(A)ᵀ by passing B as cuBLAS' "A" and A as its "B". Returns, for (cuBLAS A,
/// cuBLAS B, C): (transpose flag, rows, cols, leading dimension) of each stored matrix.
pub fn colmajor_layouts(s: &GemmShape) -> [(bool, u64, u64, i64); 3] {
    let (m, n, k) = (s.m as u64, s.n as u64, s.k as u64);
    let la = if s.b_trans {
        (true, k, n, k as i64)
    } else {
        (false, n, k, n as i64)
    };
    let lb = if s.a_trans {
        (true, m, k, m as i64)
    } else {
        (false, k, m, k as i64)
    };
    [la, lb, (false, n, m, n as i64)]
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
}

/// A cuBLASLt handle, its workspace and a per-shape plan cache.
pub struct BlasLt {
    handle: sys::cublasLtHandle_t,
    workspace: crate::device::Buf<u8>,
    plans: HashMap<(GemmShape, bool), Plan>,
}
// SAFETY: used behind the Device's mutex only.
unsafe impl Send for BlasLt {}

impl BlasLt {
    pub(crate) fn new(dev: &Device) -> Result<BlasLt> {
        dev.bind()?;
        let handle = lt::create_handle().map_err(blas_err("cublasLtCreate"))?;
        let workspace = dev.alloc::<u8>(WORKSPACE_BYTES, "cuBLASLt workspace")?;
        Ok(BlasLt {
            handle,
            workspace,
            plans: HashMap::new(),
        })
    }

    fn plan(&mut self, s: GemmShape, bf16: bool) -> Result<&Plan> {
        if !self.plans.contains_key(&(s, bf16)) {
            let dt = if bf16 {
                sys::cudaDataType::CUDA_R_16BF
            } else {
                sys::cudaDataType::CUDA_R_32F
            };
            let desc = lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType::CUDA_R_32F,
            )
            .map_err(blas_err("cublasLtMatmulDescCreate"))?;
            let ls = colmajor_layouts(&s);
            let mut layouts = [std::ptr::null_mut(); 3];
            for (i, (t, r, c, ld)) in ls.iter().enumerate() {
                layouts[i] = lt::create_matrix_layout(dt, *r, *c, *ld)
                    .map_err(blas_err("cublasLtMatrixLayoutCreate"))?;
                if i < 2 {
                    let attr = if i == 0 {
                        sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA
                    } else {
                        sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB
                    };
                    let op: i32 = *t as i32; // CUBLAS_OP_N = 0, CUBLAS_OP_T = 1
                                             // SAFETY: attribute value is an i32 cublasOperation_t.
                    unsafe {
                        lt::set_matmul_desc_attribute(
                            desc,
                            attr,
                            &op as *const i32 as *const c_void,
                            4,
                        )
                    }
                    .map_err(blas_err("cublasLtMatmulDescSetAttribute"))?;
                }
            }
            let pref =
                lt::create_matmul_pref().map_err(blas_err("cublasLtMatmulPreferenceCreate"))?;
            let ws = WORKSPACE_BYTES;
            // SAFETY: attribute value is a usize (uint64_t) byte count; handles are live.
            let heur = unsafe {
                lt::set_matmul_pref_attribute(
                    pref,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const usize as *const c_void,
                    8,
                )
                .map_err(blas_err("cublasLtMatmulPreferenceSetAttribute"))?;
                let h = lt::get_matmul_algo_heuristic(
                    self.handle,
                    desc,
                    layouts[0],
                    layouts[1],
                    layouts[2],
                    layouts[2],
                    pref,
                );
                let _ = lt::destroy_matmul_pref(pref);
                h.map_err(blas_err("cublasLtMatmulAlgoGetHeuristic"))?
            };
            self.plans.insert(
                (s, bf16),
                Plan {
                    desc,
                    layouts,
                    algo: heur.algo,
                },
            );
        }
        Ok(&self.plans[&(s, bf16)])
    }

    /// Row-major `C = alpha·op(A)·op(B) + beta·C` on `dev`'s main stream.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm<T: Elem>(
        &mut self,
        dev: &Device,
        c: &mut ViewMut<'_, T>,
        a: &View<'_, T>,
        b: &View<'_, T>,
        s: GemmShape,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let bf16 = match T::SUFFIX {
            "bf16" => true,
            "f32" => false,
            other => {
                return Err(bad_arg(
                    "blas::gemm",
                    "T",
                    format!("unsupported dtype {other}"),
                ))
            }
        };
        for (name, have, want) in [
            ("a", a.len(), s.m * s.k),
            ("b", b.len(), s.k * s.n),
            ("c", c.len(), s.m * s.n),
        ] {
            if have != want {
                return Err(bad_arg(
                    "blas::gemm",
                    name,
                    format!("{have} elements, shape needs {want}"),
                ));
            }
        }
        dev.bind()?;
        let ws = self.workspace.view_mut().device_ptr();
        let stream = dev.stream().raw() as sys::cudaStream_t;
        let handle = self.handle;
        let p = self.plan(s, bf16)?;
        // SAFETY: layouts match the checked sizes; pointers are live device memory; alpha/beta
        // are f32 host scalars (scale type R_32F).
        unsafe {
            lt::matmul(
                handle,
                p.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                b.device_ptr() as *const c_void,
                p.layouts[0],
                a.device_ptr() as *const c_void,
                p.layouts[1],
                c.device_ptr() as *const c_void,
                p.layouts[2],
                c.device_ptr() as *mut c_void,
                p.layouts[2],
                &p.algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                stream,
            )
        }
        .map_err(blas_err("cublasLtMatmul"))
    }
}

impl Drop for BlasLt {
    fn drop(&mut self) {
        // SAFETY: the owning Device synchronized its stream before dropping us.
        unsafe {
            for (_, p) in self.plans.drain() {
                for l in p.layouts {
                    let _ = lt::destroy_matrix_layout(l);
                }
                let _ = lt::destroy_matmul_desc(p.desc);
            }
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_major_linear_maps_to_transposed_colmajor() {
        // y[M,N] = x[M,K]·W[N,K]ᵀ: cuBLAS A = W (stored col-major K×N, op T), B = x (K×M, op N).
        let s = GemmShape {
            m: 5,
            n: 7,
            k: 3,
            a_trans: false,
            b_trans: true,
        };
        let [la, lb, lc] = colmajor_layouts(&s);
        assert_eq!(la, (true, 3, 7, 3));
        assert_eq!(lb, (false, 3, 5, 3));
        assert_eq!(lc, (false, 7, 5, 7));
        // dx[M,K] = dy[M,N]·W[N,K]: B not transposed: W is col-major K×N, ld K, op N.
        let s = GemmShape {
            m: 5,
            n: 3,
            k: 7,
            a_trans: false,
            b_trans: false,
        };
        let [la, lb, _] = colmajor_layouts(&s);
        assert_eq!(la, (false, 3, 7, 3));
        assert_eq!(lb, (false, 7, 5, 7));
    }
}
