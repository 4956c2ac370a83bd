//! An f32 GEMM with an AVX-512 micro-kernel, used by the CPU backend when the CPU has
//! AVX-512F. Why not only the `gemm` crate: on stable Rust `gemm` 0.18 compiles only its AVX2
//! kernels (its AVX-512 ones need its `nightly` feature), half the FMA width of the CPUs this
//! project targets. The `gemm` crate stays the path for f64, small products and CPUs without
//! AVX-512; tests compare the two.
//!
//! Structure (Goto/BLIS): `C (m×n) [+]= α·A (m×k)·B (k×n)`; B is packed per (KC × NC) block
//! into NR-wide column panels, α·A per (MC × KC) block into MR-tall row panels (zero-padded),
//! and an MR×NR = 12×32 register tile (24 zmm accumulators) is updated with one broadcast of A
//! and two loads of B per k. The column range is split across rayon tasks (each packs its own
//! blocks; they write disjoint columns of C).

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::SendPtr;

const MR: usize = 12;
const NR: usize = 32;
const KC: usize = 256;
const MC: usize = 516;
const NC: usize = 8192;

/// Does this CPU run the AVX-512 kernel? (`QLORA_NO_AVX512=1` forces the `gemm` crate, to
/// compare the two.)
pub fn available() -> bool {
    static AVAIL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAIL.get_or_init(|| {
        is_x86_feature_detected!("avx512f") && std::env::var_os("QLORA_NO_AVX512").is_none()
    })
}

/// Register tile: `c (MR rows, stride c_rs) (+)= Σ_p a[p·MR + i] · b[p·NR + j]`; `add`
/// false overwrites (the first k-block of a non-accumulating product, so C is never zeroed).
#[target_feature(enable = "avx512f")]
unsafe fn kernel(kc: usize, a: *const f32, b: *const f32, c: *mut f32, c_rs: usize, add: bool) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..kc {
        let b0 = _mm512_loadu_ps(b.add(p * NR));
        let b1 = _mm512_loadu_ps(b.add(p * NR + 16));
        let ap = a.add(p * MR);
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = _mm512_set1_ps(*ap.add(i));
            row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
        }
    }
    for (i, row) in acc.iter().enumerate() {
        let cp = c.add(i * c_rs);
        if add {
            _mm512_storeu_ps(cp, _mm512_add_ps(_mm512_loadu_ps(cp), row[0]));
            _mm512_storeu_ps(
                cp.add(16),
                _mm512_add_ps(_mm512_loadu_ps(cp.add(16)), row[1]),
            );
        } else {
            _mm512_storeu_ps(cp, row[0]);
            _mm512_storeu_ps(cp.add(16), row[1]);
        }
    }
}

/// Strided operands as in `gemm_raw` (row stride, column stride in elements).
#[derive(Clone, Copy)]
struct Mat {
    p: *const f32,
    rs: isize,
    cs: isize,
}
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

/// `C (m×n, row stride c_rs, unit column stride) [+]= α·A·B`.
///
/// # Safety
/// As `gemm_raw`: all strided extents valid, `c` not aliasing `a`/`b`, AVX-512F present.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    c_rs: usize,
    acc: bool,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    b: *const f32,
    b_rs: isize,
    b_cs: isize,
    alpha: f32,
    parallel: bool,
) {
    let (am, bm) = (
        Mat {
            p: a,
            rs: a_rs,
            cs: a_cs,
        },
        Mat {
            p: b,
            rs: b_rs,
            cs: b_cs,
        },
    );
    let cp = SendPtr(c);
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    // Column chunks: multiples of NR, at most one per thread (or per NC block).
    let per = n.div_ceil(threads).div_ceil(NR) * NR;
    let per = per.clamp(NR, NC);
    let chunks: Vec<(usize, usize)> = (0..n).step_by(per).map(|j| (j, per.min(n - j))).collect();
    let run = |&(j0, nc): &(usize, usize)| {
        let c = cp.get();
        // SAFETY: each chunk touches columns j0..j0+nc of C only.
        unsafe {
            block(
                m,
                nc,
                k,
                c.add(j0),
                c_rs,
                acc,
                am,
                offset_cols(bm, j0),
                alpha,
            )
        };
    };
    if chunks.len() > 1 {
        chunks.par_iter().for_each(run);
    } else {
        chunks.iter().for_each(run);
    }
}

fn offset_cols(b: Mat, j0: usize) -> Mat {
    Mat {
        // SAFETY: j0 < n, within the operand's column extent.
        p: unsafe { b.p.offset(j0 as isize * b.cs) },
        ..b
    }
}

thread_local! {
    /// Per-thread packing buffers (B panels, A panels), reused across calls: allocating and
    /// page-faulting megabytes per GEMM showed up in profiles.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Pack the (kc × n) block of B at `b` into NR-wide panels `dst[panel][p·NR + jj]`,
/// zero-padding the last panel. Loops run over p outermost so writes are contiguous and the
/// reads of a transposed operand walk NR rows in step.
unsafe fn pack_b(dst: &mut [f32], b: Mat, kc: usize, n: usize) {
    for (panel, j0) in (0..n).step_by(NR).enumerate() {
        let out = &mut dst[panel * KC * NR..panel * KC * NR + kc * NR];
        let w = NR.min(n - j0);
        let base = b.p.offset(j0 as isize * b.cs);
        for p in 0..kc {
            let row = &mut out[p * NR..p * NR + NR];
            let src = base.offset(p as isize * b.rs);
            if b.cs == 1 {
                // an inline loop, not copy_from_slice: a 32-float memmove call per row
                // showed up in profiles
                for (jj, o) in row[..w].iter_mut().enumerate() {
                    *o = *src.add(jj);
                }
            } else {
                for (jj, o) in row[..w].iter_mut().enumerate() {
                    *o = *src.offset(jj as isize * b.cs);
                }
            }
            row[w..].iter_mut().for_each(|x| *x = 0.0);
        }
    }
}

/// Pack α·(mc × kc) of A at `a` into MR-tall panels `dst[panel][p·MR + i]`, zero-padded.
unsafe fn pack_a(dst: &mut [f32], a: Mat, mc: usize, kc: usize, alpha: f32) {
    for (panel, i0) in (0..mc).step_by(MR).enumerate() {
        let out = &mut dst[panel * KC * MR..panel * KC * MR + kc * MR];
        let h = MR.min(mc - i0);
        let base = a.p.offset(i0 as isize * a.rs);
        for p in 0..kc {
            let col = &mut out[p * MR..p * MR + MR];
            let src = base.offset(p as isize * a.cs);
            for (i, o) in col[..h].iter_mut().enumerate() {
                *o = alpha * *src.offset(i as isize * a.rs);
            }
            col[h..].iter_mut().for_each(|x| *x = 0.0);
        }
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn block(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    c_rs: usize,
    acc: bool,
    a: Mat,
    b: Mat,
    alpha: f32,
) {
    if !acc && k == 0 {
        for i in 0..m {
            std::ptr::write_bytes(c.add(i * c_rs), 0, n);
        }
    }
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let (bpack, apack) = &mut *s;
        let (nb, na) = (KC * n.div_ceil(NR) * NR, KC * MC.div_ceil(MR) * MR);
        if bpack.len() < nb {
            bpack.resize(nb, 0.0);
        }
        if apack.len() < na {
            apack.resize(na, 0.0);
        }
        let mut tile = [0f32; MR * NR];
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            // The first k-block of an overwriting product stores instead of adding.
            let add = acc || pc > 0;
            pack_b(
                bpack,
                Mat {
                    p: b.p.offset(pc as isize * b.rs),
                    ..b
                },
                kc,
                n,
            );
            for ic in (0..m).step_by(MC) {
                let mc = MC.min(m - ic);
                pack_a(
                    apack,
                    Mat {
                        p: a.p.offset(ic as isize * a.rs + pc as isize * a.cs),
                        ..a
                    },
                    mc,
                    kc,
                    alpha,
                );
                for (bpanel, j0) in (0..n).step_by(NR).enumerate() {
                    let w = NR.min(n - j0);
                    let bp = bpack.as_ptr().add(bpanel * KC * NR);
                    for (apanel, i0) in (0..mc).step_by(MR).enumerate() {
                        let h = MR.min(mc - i0);
                        let ap = apack.as_ptr().add(apanel * KC * MR);
                        let cij = c.add((ic + i0) * c_rs + j0);
                        if h == MR && w == NR {
                            kernel(kc, ap, bp, cij, c_rs, add);
                        } else {
                            // Edge tile: compute into a local tile, store/add the valid part.
                            kernel(kc, ap, bp, tile.as_mut_ptr(), NR, false);
                            for i in 0..h {
                                for j in 0..w {
                                    let cv = cij.add(i * c_rs + j);
                                    *cv = if add {
                                        *cv + tile[i * NR + j]
                                    } else {
                                        tile[i * NR + j]
                                    };
                                }
                            }
                        }
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 path against the `gemm` crate on shapes that cross every block edge
    /// (MR, NR, KC, MC, the per-thread column split), transposed and plain operands,
    /// overwrite and accumulate, α ≠ 1.
    #[test]
    fn sgemm_matches_gemm_crate() {
        if !available() {
            eprintln!("sgemm_matches_gemm_crate: skipped, this CPU has no AVX-512F");
            return;
        }
        let mut seed = 1u64;
        let mut rnd = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = crate::cpu::splitmix64(seed);
                    (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect()
        };
        for &(m, n, k) in &[
            (12, 32, 16),
            (13, 70, 300),
            (100, 33, 513),
            (97, 2100, 40),
            (5, 40, 20),
        ] {
            for &(ta, tb) in &[(false, false), (false, true), (true, false)] {
                for &(acc, par) in &[(false, false), (true, true)] {
                    let a = rnd(m * k);
                    let b = rnd(k * n);
                    let c0 = rnd(m * n);
                    let (a_rs, a_cs) = if ta { (1, m as isize) } else { (k as isize, 1) };
                    let (b_rs, b_cs) = if tb { (1, k as isize) } else { (n as isize, 1) };
                    let mut want = c0.clone();
                    let mut got = c0.clone();
                    unsafe {
                        gemm::gemm(
                            m,
                            n,
                            k,
                            want.as_mut_ptr(),
                            1,
                            n as isize,
                            acc,
                            a.as_ptr(),
                            a_cs,
                            a_rs,
                            b.as_ptr(),
                            b_cs,
                            b_rs,
                            1.0f32,
                            0.5f32,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                        sgemm(
                            m,
                            n,
                            k,
                            got.as_mut_ptr(),
                            n,
                            acc,
                            a.as_ptr(),
                            a_rs,
                            a_cs,
                            b.as_ptr(),
                            b_rs,
                            b_cs,
                            0.5,
                            par,
                        );
                    }
                    let err = want
                        .iter()
                        .zip(&got)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0f32, f32::max);
                    // Both sum k products of |x| ≤ 0.25 in different orders: a few ulps of ~k/16.
                    assert!(
                        err <= 1e-5 * k as f32,
                        "m{m} n{n} k{k} ta{ta} tb{tb} acc{acc}: {err}"
                    );
                }
            }
        }
    }
}
