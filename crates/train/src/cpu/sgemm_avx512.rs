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

use super::{Nf4W, SendPtr};

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
    // The C tile (MR rows × 128 bytes) is touched once, after the k loop: request its lines
    // now so the epilogue does not stall on 24 misses (C is megabytes, read once per k-block).
    for i in 0..MR {
        _mm_prefetch::<_MM_HINT_T0>(c.add(i * c_rs) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(c.add(i * c_rs + 16) as *const i8);
    }
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..kc {
        // A's micro-panel streams from L2 while the B panel holds L1: ask 16 k-steps ahead
        // (a hint past the panel's end is harmless: prefetches never fault).
        _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add((p + 16) * MR) as *const i8);
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

/// An NF4 weight as the B operand: `B[p][j] = W[k0 + p][j0 + j]`, or with `trans`
/// `B[p][j] = W[j0 + j][k0 + p]`; (k0, j0) is the origin of the current block.
#[derive(Clone, Copy)]
struct Nf4B {
    packed: *const u8,
    scales: *const f32,
    blocksize: usize,
    cols: usize,
    trans: bool,
    k0: usize,
    j0: usize,
}
unsafe impl Send for Nf4B {}
unsafe impl Sync for Nf4B {}

impl Nf4W<'_> {
    /// The weight as a B operand (`B = Wᵀ` when `trans`), its lengths checked: the kernels
    /// read codes and scales through raw pointers, 16 at a time inside one absmax block.
    fn operand(&self, trans: bool) -> Nf4B {
        let numel = self.rows * self.cols;
        assert!(
            self.packed.len() >= numel.div_ceil(2),
            "NF4 codes shorter than the weight"
        );
        assert!(
            self.blocksize.is_multiple_of(16)
                && self.scales.len() >= numel.div_ceil(self.blocksize),
            "NF4 absmax shorter than the weight's blocks (or a blocksize not a multiple of 16)"
        );
        Nf4B {
            packed: self.packed.as_ptr(),
            scales: self.scales.as_ptr(),
            blocksize: self.blocksize,
            cols: self.cols,
            trans,
            k0: 0,
            j0: 0,
        }
    }
}

impl Nf4B {
    /// W's flat element index of `B[p][j]` (block-relative p, j).
    fn flat(&self, p: usize, j: usize) -> usize {
        if self.trans {
            (self.j0 + j) * self.cols + self.k0 + p
        } else {
            (self.k0 + p) * self.cols + self.j0 + j
        }
    }
    /// `NF4[code(e)] · absmax[e / bs]`, one element.
    unsafe fn at_flat(&self, e: usize) -> f32 {
        let byte = *self.packed.add(e / 2);
        let code = if e.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0x0f
        };
        qlora_nf4::codebook::NF4[code as usize] * *self.scales.add(e / self.blocksize)
    }
}

/// The B operand of a product.
#[derive(Clone, Copy)]
enum BSrc {
    F32(Mat),
    Nf4(Nf4B),
}

impl BSrc {
    /// The same operand with its origin moved by `dk` rows (k) and `dj` columns (n).
    fn offset(self, dk: usize, dj: usize) -> BSrc {
        match self {
            // SAFETY: the offsets stay inside the operand's extents (callers iterate within).
            BSrc::F32(b) => BSrc::F32(Mat {
                p: unsafe { b.p.offset(dk as isize * b.rs + dj as isize * b.cs) },
                ..b
            }),
            BSrc::Nf4(b) => BSrc::Nf4(Nf4B {
                k0: b.k0 + dk,
                j0: b.j0 + dj,
                ..b
            }),
        }
    }
}

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
    let a = Mat {
        p: a,
        rs: a_rs,
        cs: a_cs,
    };
    let b = BSrc::F32(Mat {
        p: b,
        rs: b_rs,
        cs: b_cs,
    });
    drive(m, n, k, c, c_rs, acc, a, b, alpha, parallel)
}

/// `C (m×n, row stride c_rs) [+]= α·A·B` with B the NF4 weight `w`: `B = Wᵀ` when `trans`
/// (`x·Wᵀ`: k = w.cols, n = w.rows), else `B = W` (`d_y·W`: k = w.rows, n = w.cols).
///
/// # Safety
/// A's strided extent `(m, k)` and C's m rows valid, `c` not aliasing `a`, AVX-512F
/// present. `w`'s lengths are checked here.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_nf4(
    m: usize,
    c: *mut f32,
    c_rs: usize,
    acc: bool,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    w: Nf4W<'_>,
    trans: bool,
    alpha: f32,
    parallel: bool,
) {
    let b = BSrc::Nf4(w.operand(trans));
    let (k, n) = if trans {
        (w.cols, w.rows)
    } else {
        (w.rows, w.cols)
    };
    let a = Mat {
        p: a,
        rs: a_rs,
        cs: a_cs,
    };
    drive(m, n, k, c, c_rs, acc, a, b, alpha, parallel)
}

/// Rows of A up to which [`gemv_nf4`] serves `x·Wᵀ` (decoding: one row per sequence). The
/// packed GEMM computes MR rows per tile whatever m is and dequantizes the whole weight into
/// panels first; reading each code once straight into m dot products is 3–4× faster there.
pub const GEMV_MAX_ROWS: usize = 8;

/// `C (m×rows, row stride c_rs) [+]= α·A·Wᵀ` for small m (≤ [`GEMV_MAX_ROWS`]), W NF4
/// `(rows, cols)`: per output o, 16 codes at a time are dequantized (as `pack_b_nf4` does)
/// and multiplied into m running 16-lane sums, reduced at the end of the row. The order of
/// additions differs from the packed GEMM's (16 partial sums per output, then a tree), not
/// the values multiplied. Needs `cols` a multiple of 16 (`can_gemv_nf4`).
///
/// # Safety
/// A's rows `(m, cols)` at stride `a_rs` and C's rows valid, `c` not aliasing `a`, AVX-512F.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemv_nf4(
    m: usize,
    c: *mut f32,
    c_rs: usize,
    acc: bool,
    a: *const f32,
    a_rs: usize,
    w: Nf4W<'_>,
    alpha: f32,
) {
    assert!(m <= GEMV_MAX_ROWS && can_gemv_nf4(&w));
    let b = w.operand(true);
    let (cp, ap) = (SendPtr(c), SendPtr(a as *mut f32));
    // Output rows per task: enough work to amortise a task, several tasks per thread.
    let per = (1 << 16) / w.cols.max(1) + 1;
    (0..w.rows.div_ceil(per)).into_par_iter().for_each(|t| {
        let (o0, o1) = (t * per, ((t + 1) * per).min(w.rows));
        // SAFETY: this task writes C's columns o0..o1 only; extents as the caller's.
        unsafe { gemv_rows(m, cp.get(), c_rs, acc, ap.get(), a_rs, &b, alpha, o0, o1) };
    });
}

/// Does [`gemv_nf4`] take this weight? (Rows of 16-aligned codes: `cols % 16 == 0`; the
/// blocksize is checked with the lengths.)
pub fn can_gemv_nf4(w: &Nf4W<'_>) -> bool {
    w.cols.is_multiple_of(16)
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn gemv_rows(
    m: usize,
    c: *mut f32,
    c_rs: usize,
    acc: bool,
    a: *const f32,
    a_rs: usize,
    b: &Nf4B,
    alpha: f32,
    o0: usize,
    o1: usize,
) {
    let lut = _mm512_loadu_ps(qlora_nf4::codebook::NF4.as_ptr());
    for o in o0..o1 {
        let mut sums = [_mm512_setzero_ps(); GEMV_MAX_ROWS];
        let row = o * b.cols;
        for i in (0..b.cols).step_by(16) {
            let wv = dequant16(b, row + i, lut);
            for (r, s) in sums.iter_mut().enumerate().take(m) {
                *s = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(r * a_rs + i)), wv, *s);
            }
        }
        for (r, s) in sums.iter().enumerate().take(m) {
            let v = alpha * _mm512_reduce_add_ps(*s);
            let cv = c.add(r * c_rs + o);
            *cv = if acc { *cv + v } else { v };
        }
    }
}

/// Split the columns of C across rayon tasks and run `block` on each.
#[allow(clippy::too_many_arguments)]
unsafe fn drive(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    c_rs: usize,
    acc: bool,
    a: Mat,
    b: BSrc,
    alpha: f32,
    parallel: bool,
) {
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
        unsafe { block(m, nc, k, c.add(j0), c_rs, acc, a, b.offset(0, j0), alpha) };
    };
    if chunks.len() > 1 {
        chunks.par_iter().for_each(run);
    } else {
        chunks.iter().for_each(run);
    }
}

thread_local! {
    /// Per-thread packing buffers (B panels, A panels), reused across calls: allocating and
    /// page-faulting megabytes per GEMM showed up in profiles.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Transpose a 16×16 f32 tile held in 16 registers (`r[i]` = row i) in place.
///
/// Four stages of in-lane and cross-lane shuffles; writing rows a…p and columns 0…15:
/// 1. `unpacklo/hi(r2i, r2i+1)` interleave row pairs: per 128-bit lane L, `a4L b4L a4L+1 b4L+1`.
/// 2. `shuffle_ps(.., 0x44 / 0xEE)` joins pairs into quads: `r4g+j` holds, in lane L, rows
///    4g…4g+3 at column 4L+j.
/// 3. `shuffle_f32x4(r, r+4, 0x88 / 0xDD)` gathers lanes {0,2} / {1,3} of two row groups.
/// 4. the same between groups 0–1 and 2–3: `r[c]` = column c, rows a…p in order.
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: &mut [__m512; 16]) {
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for g in 0..4 {
        let (lo, hi) = (t[4 * g], t[4 * g + 1]);
        let (lo2, hi2) = (t[4 * g + 2], t[4 * g + 3]);
        r[4 * g] = _mm512_shuffle_ps::<0x44>(lo, lo2);
        r[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(lo, lo2);
        r[4 * g + 2] = _mm512_shuffle_ps::<0x44>(hi, hi2);
        r[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(hi, hi2);
    }
    for h in 0..2 {
        for j in 0..4 {
            let (x, y) = (r[8 * h + j], r[8 * h + 4 + j]);
            t[8 * h + j] = _mm512_shuffle_f32x4::<0x88>(x, y);
            t[8 * h + 4 + j] = _mm512_shuffle_f32x4::<0xDD>(x, y);
        }
    }
    for j in 0..8 {
        r[j] = _mm512_shuffle_f32x4::<0x88>(t[j], t[8 + j]);
        r[8 + j] = _mm512_shuffle_f32x4::<0xDD>(t[j], t[8 + j]);
    }
}

/// Pack the (kc × n) block of B at `b` into NR-wide panels `dst[panel][p·NR + jj]`,
/// zero-padding the last panel. Three cases, all producing the same bytes:
/// - row-contiguous B (`cs == 1`, e.g. `dy·W` with W row-major): two zmm copies per row;
/// - column-contiguous B (`rs == 1`, e.g. `x·Wᵀ`): 16 columns × 16 k-steps are loaded as 16
///   contiguous rows and transposed in registers — the element-wise gather this replaces
///   was the largest cost outside the micro-kernel;
/// - anything else, and the ragged edges: element by element.
#[target_feature(enable = "avx512f")]
unsafe fn pack_b(dst: &mut [f32], b: Mat, kc: usize, n: usize) {
    for (panel, j0) in (0..n).step_by(NR).enumerate() {
        let out = &mut dst[panel * KC * NR..panel * KC * NR + kc * NR];
        let w = NR.min(n - j0);
        let base = b.p.offset(j0 as isize * b.cs);
        // k-steps [0, p_simd) of the 16-column halves below `w_simd` are done in registers.
        let (p_simd, w_simd) = if b.cs != 1 && b.rs == 1 {
            (kc / 16 * 16, w / 16 * 16)
        } else {
            (0, 0)
        };
        for h in (0..w_simd).step_by(16) {
            for p0 in (0..p_simd).step_by(16) {
                let mut r = [_mm512_setzero_ps(); 16];
                for (jj, v) in r.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(base.offset((h + jj) as isize * b.cs + p0 as isize));
                }
                transpose16(&mut r);
                for (pp, v) in r.iter().enumerate() {
                    _mm512_storeu_ps(out.as_mut_ptr().add((p0 + pp) * NR + h), *v);
                }
            }
        }
        for p in 0..kc {
            let row = &mut out[p * NR..p * NR + NR];
            let src = base.offset(p as isize * b.rs);
            if b.cs == 1 {
                if w == NR {
                    _mm512_storeu_ps(row.as_mut_ptr(), _mm512_loadu_ps(src));
                    _mm512_storeu_ps(row.as_mut_ptr().add(16), _mm512_loadu_ps(src.add(16)));
                    continue;
                }
                for (jj, o) in row[..w].iter_mut().enumerate() {
                    *o = *src.add(jj);
                }
            } else {
                let from = if p < p_simd { w_simd } else { 0 };
                for (jj, o) in row[..w].iter_mut().enumerate().skip(from) {
                    *o = *src.offset(jj as isize * b.cs);
                }
            }
            row[w..].iter_mut().for_each(|x| *x = 0.0);
        }
    }
}

/// 16 consecutive weights from flat index `e` (16-aligned, so inside one absmax block, every
/// blocksize being a multiple of 16): 8 code bytes split into high and low nibbles,
/// interleaved back into element order, looked up in the 16-entry codebook held in `lut`,
/// times the block's absmax.
#[target_feature(enable = "avx512f")]
unsafe fn dequant16(b: &Nf4B, e: usize, lut: __m512) -> __m512 {
    let bytes = _mm_loadl_epi64(b.packed.add(e / 2) as *const __m128i);
    let nibble = _mm_set1_epi8(0x0f);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(bytes), nibble);
    let lo = _mm_and_si128(bytes, nibble);
    let codes = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
    let vals = _mm512_permutexvar_ps(codes, lut);
    _mm512_mul_ps(vals, _mm512_set1_ps(*b.scales.add(e / b.blocksize)))
}

/// `pack_b` for an NF4 operand: the same panel layout, the values dequantized on the way.
/// With `trans` (`x·Wᵀ`), 16 weight rows × 16 codes are dequantized into registers and
/// transposed as in `pack_b`; without, each k-step is a row segment of W, two dequantized
/// vectors per panel row. Elements whose flat index is not 16-aligned in that pattern
/// (a row length not a multiple of 16, ragged edges) go one by one. (The loop mirrors
/// `pack_b`'s; one generic packer over load closures measured 4 % slower per training step.)
#[target_feature(enable = "avx512f")]
unsafe fn pack_b_nf4(dst: &mut [f32], b: Nf4B, kc: usize, n: usize) {
    let lut = _mm512_loadu_ps(qlora_nf4::codebook::NF4.as_ptr());
    let aligned = b.cols.is_multiple_of(16);
    for (panel, j0) in (0..n).step_by(NR).enumerate() {
        let out = &mut dst[panel * KC * NR..panel * KC * NR + kc * NR];
        let w = NR.min(n - j0);
        let bp = Nf4B { j0: b.j0 + j0, ..b };
        if b.trans {
            let (p_simd, w_simd) = if aligned && bp.k0.is_multiple_of(16) {
                (kc / 16 * 16, w / 16 * 16)
            } else {
                (0, 0)
            };
            for h in (0..w_simd).step_by(16) {
                for p0 in (0..p_simd).step_by(16) {
                    let mut r = [_mm512_setzero_ps(); 16];
                    for (jj, v) in r.iter_mut().enumerate() {
                        *v = dequant16(&bp, bp.flat(p0, h + jj), lut);
                    }
                    transpose16(&mut r);
                    for (pp, v) in r.iter().enumerate() {
                        _mm512_storeu_ps(out.as_mut_ptr().add((p0 + pp) * NR + h), *v);
                    }
                }
            }
            for p in 0..kc {
                let row = &mut out[p * NR..p * NR + NR];
                let from = if p < p_simd { w_simd } else { 0 };
                for (jj, o) in row[..w].iter_mut().enumerate().skip(from) {
                    *o = bp.at_flat(bp.flat(p, jj));
                }
                row[w..].iter_mut().for_each(|x| *x = 0.0);
            }
        } else {
            let w_simd = if aligned && bp.j0.is_multiple_of(16) {
                w / 16 * 16
            } else {
                0
            };
            for p in 0..kc {
                let row = &mut out[p * NR..p * NR + NR];
                let e0 = bp.flat(p, 0);
                for h in (0..w_simd).step_by(16) {
                    _mm512_storeu_ps(row.as_mut_ptr().add(h), dequant16(&bp, e0 + h, lut));
                }
                for (jj, o) in row[..w].iter_mut().enumerate().skip(w_simd) {
                    *o = bp.at_flat(e0 + jj);
                }
                row[w..].iter_mut().for_each(|x| *x = 0.0);
            }
        }
    }
}

/// Pack α·(mc × kc) of A at `a` into MR-tall panels `dst[panel][p·MR + i]`, zero-padded.
/// Row-major A (`cs == 1`, the activations of every forward and backward product): the MR
/// rows × 16 k-steps are transposed in registers (rows MR…15 zero) and each k-step's MR
/// values stored with one masked store; otherwise, and on ragged edges, element by element.
#[target_feature(enable = "avx512f")]
unsafe fn pack_a(dst: &mut [f32], a: Mat, mc: usize, kc: usize, alpha: f32) {
    const MR_MASK: __mmask16 = (1 << MR) - 1;
    let va = _mm512_set1_ps(alpha);
    for (panel, i0) in (0..mc).step_by(MR).enumerate() {
        let out = &mut dst[panel * KC * MR..panel * KC * MR + kc * MR];
        let h = MR.min(mc - i0);
        let base = a.p.offset(i0 as isize * a.rs);
        let p_simd = if a.cs == 1 && h == MR {
            kc / 16 * 16
        } else {
            0
        };
        for p0 in (0..p_simd).step_by(16) {
            let mut r = [_mm512_setzero_ps(); 16];
            for (i, v) in r.iter_mut().take(MR).enumerate() {
                *v = _mm512_loadu_ps(base.offset(i as isize * a.rs + p0 as isize));
            }
            transpose16(&mut r);
            for (pp, v) in r.iter().enumerate() {
                let o = out.as_mut_ptr().add((p0 + pp) * MR);
                _mm512_mask_storeu_ps(o, MR_MASK, _mm512_mul_ps(va, *v));
            }
        }
        for p in p_simd..kc {
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
    b: BSrc,
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
            match b.offset(pc, 0) {
                BSrc::F32(b) => pack_b(bpack, b, kc, n),
                BSrc::Nf4(b) => pack_b_nf4(bpack, b, kc, n),
            }
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

    /// `n` values uniform in [−0.5, 0.5) from a splitmix64 stream.
    fn uniform(seed: &mut u64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = crate::cpu::splitmix64(*seed);
                (*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// `w (rows, cols)` quantized to NF4 (double quant) and its f32 block scales.
    fn nf4_weight(
        w: &[f32],
        rows: usize,
        cols: usize,
        bs: usize,
    ) -> (qlora_nf4::Nf4Tensor, Vec<f32>) {
        let t =
            qlora_nf4::Nf4Tensor::quantize("w", w, &[rows, cols], bs, true, qlora_nf4::Dtype::F32)
                .unwrap();
        let scales = t.state.absmax_f32();
        (t, scales)
    }

    /// The register-transposing packers are pure data movement (and one α multiply): they
    /// must produce exactly the bytes of the element-by-element definition, for contiguous
    /// rows, contiguous columns and general strides, full and ragged panels.
    #[test]
    fn packing_is_the_plain_layout_bit_for_bit() {
        if !available() {
            eprintln!("packing_is_the_plain_layout_bit_for_bit: skipped, no AVX-512F");
            return;
        }
        let vals: Vec<f32> = (0..40_000).map(|i| (i as f32 * 0.37).sin()).collect();
        for &(rows, cols) in &[(16, 32), (37, 70), (256, 64), (40, 12), (5, 3)] {
            for &(rs, cs) in &[
                (cols, 1),
                (1, rows),
                (cols + 3, 1),
                (1, rows + 5),
                (2 * cols, 2),
            ] {
                let m = Mat {
                    p: vals.as_ptr(),
                    rs: rs as isize,
                    cs: cs as isize,
                };
                let at = |i: usize, j: usize| vals[i * rs + j * cs];
                // B: kc = rows (≤ KC), n = cols.
                let (kc, n) = (rows.min(KC), cols);
                let mut got = vec![f32::NAN; KC * n.div_ceil(NR) * NR];
                unsafe { pack_b(&mut got, m, kc, n) };
                for (panel, j0) in (0..n).step_by(NR).enumerate() {
                    for p in 0..kc {
                        for jj in 0..NR {
                            let want = if j0 + jj < n { at(p, j0 + jj) } else { 0.0 };
                            let g = got[panel * KC * NR + p * NR + jj];
                            assert_eq!(
                                g.to_bits(),
                                want.to_bits(),
                                "B {rows}x{cols} rs{rs} cs{cs} p{p} j{}",
                                j0 + jj
                            );
                        }
                    }
                }
                // A: mc = rows, kc = cols (≤ KC), α = 0.75.
                let (mc, kc) = (rows, cols.min(KC));
                let mut got = vec![f32::NAN; KC * MC.div_ceil(MR) * MR];
                unsafe { pack_a(&mut got, m, mc, kc, 0.75) };
                for (panel, i0) in (0..mc).step_by(MR).enumerate() {
                    for p in 0..kc {
                        for i in 0..MR {
                            let want = if i0 + i < mc {
                                0.75 * at(i0 + i, p)
                            } else {
                                0.0
                            };
                            let g = got[panel * KC * MR + p * MR + i];
                            assert_eq!(
                                g.to_bits(),
                                want.to_bits(),
                                "A {rows}x{cols} rs{rs} cs{cs} i{} p{p}",
                                i0 + i
                            );
                        }
                    }
                }
            }
        }
    }

    /// An NF4 B operand gives exactly the product of its f32 dequantization through the
    /// plain path (same packed values, same kernel, same order): bit for bit, both
    /// orientations, rows that are and are not multiples of 16 (the one-by-one packing),
    /// blocks of 32 and 64, k crossing KC, overwrite and accumulate, α ≠ 1, parallel.
    #[test]
    fn sgemm_nf4_is_sgemm_of_the_dequantized_weight() {
        if !available() {
            eprintln!("sgemm_nf4_is_sgemm_of_the_dequantized_weight: skipped, no AVX-512F");
            return;
        }
        let mut seed = 7u64;
        let mut rnd = |n: usize| uniform(&mut seed, n);
        for &(rows, cols, bs) in &[(64, 320, 64), (70, 48, 32), (33, 70, 64), (512, 288, 64)] {
            let (t, scales) = nf4_weight(&rnd(rows * cols), rows, cols, bs);
            let wd = t.dequantize_f32();
            let nw = Nf4W::of(&t, &scales);
            for &m in &[12usize, 29] {
                for &trans in &[true, false] {
                    let (k, n) = if trans { (cols, rows) } else { (rows, cols) };
                    let a = rnd(m * k);
                    for &(acc, par) in &[(false, false), (true, true)] {
                        let c0 = rnd(m * n);
                        let (mut want, mut got) = (c0.clone(), c0);
                        // B = Wᵀ: element (p, j) at wd[j·cols + p]; B = W: at wd[p·cols + j].
                        let (b_rs, b_cs) = if trans {
                            (1, cols as isize)
                        } else {
                            (cols as isize, 1)
                        };
                        unsafe {
                            sgemm(
                                m,
                                n,
                                k,
                                want.as_mut_ptr(),
                                n,
                                acc,
                                a.as_ptr(),
                                k as isize,
                                1,
                                wd.as_ptr(),
                                b_rs,
                                b_cs,
                                0.5,
                                par,
                            );
                            sgemm_nf4(
                                m,
                                got.as_mut_ptr(),
                                n,
                                acc,
                                a.as_ptr(),
                                k as isize,
                                1,
                                nw,
                                trans,
                                0.5,
                                par,
                            );
                        }
                        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                            assert_eq!(
                                w.to_bits(),
                                g.to_bits(),
                                "W {rows}x{cols} bs{bs} m{m} trans{trans} acc{acc}: C[{i}]"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The small-m NF4 product against an f64 product of the dequantized weight: every m up
    /// to GEMV_MAX_ROWS, overwrite and accumulate, α ≠ 1, blocks of 32 and 64.
    #[test]
    fn gemv_nf4_matches_the_dequantized_product() {
        if !available() {
            eprintln!("gemv_nf4_matches_the_dequantized_product: skipped, no AVX-512F");
            return;
        }
        let mut seed = 11u64;
        let mut rnd = |n: usize| uniform(&mut seed, n);
        for &(rows, cols, bs) in &[(70, 48, 32), (300, 320, 64)] {
            let (t, scales) = nf4_weight(&rnd(rows * cols), rows, cols, bs);
            let wd = t.dequantize_f32();
            let nw = Nf4W::of(&t, &scales);
            for m in 1..=GEMV_MAX_ROWS {
                let a = rnd(m * cols);
                for acc in [false, true] {
                    let c0 = rnd(m * rows);
                    let mut got = c0.clone();
                    unsafe { gemv_nf4(m, got.as_mut_ptr(), rows, acc, a.as_ptr(), cols, nw, 0.5) };
                    for r in 0..m {
                        for o in 0..rows {
                            let dot: f64 = (0..cols)
                                .map(|i| a[r * cols + i] as f64 * wd[o * cols + i] as f64)
                                .sum();
                            let want = 0.5 * dot + if acc { c0[r * rows + o] as f64 } else { 0.0 };
                            let g = got[r * rows + o] as f64;
                            assert!(
                                (g - want).abs() < 1e-5,
                                "W {rows}x{cols} m{m} acc{acc} C[{r}][{o}]: {g} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

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
        let mut rnd = |n: usize| uniform(&mut seed, n);
        for &(m, n, k) in &[
            (12, 32, 16),
            (13, 70, 300),
            (100, 33, 513),
            (97, 2100, 40),
            (5, 40, 20),
            (24, 64, 48),
            (36, 96, 272),
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
