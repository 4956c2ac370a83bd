//! `CpuBackend`: every op in f32 (or f64 for gradient checks: the math is written once,
//! generic over [`Real`]), parallel with rayon, matmuls through the `gemm` crate.

pub mod attention;
pub mod cross_entropy;
pub mod dense_linear;
pub mod embedding;
pub mod nf4_lora_linear;
pub mod rmsnorm;
pub mod rope;
#[cfg(target_arch = "x86_64")]
pub mod sgemm_avx512;
pub mod swiglu;
pub(crate) mod vec_f32;

use rayon::prelude::*;

/// The element type of the CPU ops: f32 for training, f64 for gradient checks.
pub trait Real:
    num_traits::Float
    + num_traits::FromPrimitive
    + Send
    + Sync
    + Default
    + std::fmt::Debug
    + std::iter::Sum
    + 'static
{
    fn of(x: f64) -> Self;
    fn f64(self) -> f64;
    /// `exp`, written so that loops over slices vectorize (f32: [`exp_f32`]; f64: libm).
    fn exp_v(self) -> Self;
}
impl Real for f32 {
    fn of(x: f64) -> Self {
        x as f32
    }
    fn f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn exp_v(self) -> Self {
        exp_f32(self)
    }
}
impl Real for f64 {
    fn of(x: f64) -> Self {
        x
    }
    fn f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn exp_v(self) -> Self {
        self.exp()
    }
}

/// Branch-free f32 `exp` that auto-vectorizes (libm's `expf` is a scalar call, and the softmax,
/// cross-entropy and SiLU loops are dominated by it). `exp(x) = 2ⁿ·exp(r)` with
/// `n = round(x·log2 e)` (the 1.5·2²³ rounding trick), `r = x − n·ln2` in two parts
/// (Cody–Waite), `exp(r)` by its degree-7 Taylor polynomial on |r| ≤ ln2/2 (truncation
/// ≤ 0.347⁸/8! ≈ 5e-9 relative), so the result is within ~2 ulp of the exact value.
/// Inputs below −87.3 give 0 (the true value is subnormal), above 88.7 give f32::MAX·…→ inf.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³
    let xc = x.clamp(-87.3, 88.7);
    let n = (xc * LOG2E + MAGIC) - MAGIC;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else if x > 88.7 {
        f32::INFINITY
    } else {
        p * scale
    }
}

/// Below this many multiply-adds a gemm runs on the calling thread (thread fan-out costs more).
const PAR_MIN_FLOPS: usize = 1 << 18;

/// Raw strided gemm: `dst (m, n) = [dst +] alpha · lhs (m, k) · rhs (k, n)`, every matrix given
/// by a pointer and (row stride, column stride) in elements.
///
/// # Safety
/// The pointers must address the full strided extents; `dst` must not alias `lhs`/`rhs`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: isize,
    acc: bool,
    lhs: *const T,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const T,
    rhs_rs: isize,
    rhs_cs: isize,
    alpha: T,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && m >= 12
        && n >= 32
        && k >= 16
        && m * n * k >= PAR_MIN_FLOPS
        && sgemm_avx512::available()
    {
        // SAFETY: T is f32 (checked above), so the casts are identities; the caller's extents.
        unsafe {
            sgemm_avx512::sgemm(
                m,
                n,
                k,
                dst as *mut f32,
                dst_rs as usize,
                acc,
                lhs as *const f32,
                lhs_rs,
                lhs_cs,
                rhs as *const f32,
                rhs_rs,
                rhs_cs,
                alpha.f64() as f32,
                parallel,
            );
        }
        return;
    }
    let par = if parallel && m * n * k >= PAR_MIN_FLOPS && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // gemm's convention: dst := a·dst + b·lhs·rhs (dst read only when read_dst).
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs,
        acc,
        lhs,
        lhs_cs,
        lhs_rs,
        rhs,
        rhs_cs,
        rhs_rs,
        T::one(),
        alpha,
        false,
        false,
        false,
        par,
    );
}

/// A frozen NF4 weight W `(rows, cols)` row-major as the f32 GEMM reads it, borrowed:
/// `packed ((rows·cols + 1) / 2,)` u8 with `byte[e / 2] = code[e] << 4 | code[e + 1]` (e
/// even), `scales (⌈rows·cols / bs⌉,)` f32, the per-block absmax with double quantization
/// undone.
#[derive(Clone, Copy, Debug)]
pub struct Nf4W<'a> {
    pub packed: &'a [u8],
    pub scales: &'a [f32],
    pub blocksize: usize,
    pub rows: usize,
    pub cols: usize,
}

impl<'a> Nf4W<'a> {
    /// `t`'s codes with its f32 block scales (`t.state.absmax_f32()`, computed once by the
    /// owner); rows and cols from its `[rows, cols]` shape.
    pub fn of(t: &'a qlora_nf4::Nf4Tensor, scales: &'a [f32]) -> Nf4W<'a> {
        Nf4W {
            packed: &t.packed,
            scales,
            blocksize: t.state.blocksize,
            rows: t.shape()[0],
            cols: t.shape()[1..].iter().product(),
        }
    }
}

/// A frozen `(out, in)` weight as the CPU products read it: the matrix in `T`, and for an NF4
/// base its codes, which the f32 AVX-512 GEMM dequantizes while packing (the same values,
/// from an eighth of the bytes; [`reads_nf4_codes`]).
#[derive(Clone, Copy, Debug)]
pub struct FrozenRef<'a, T> {
    /// (out·in,) T; empty when `nf4` is given and [`reads_nf4_codes`] holds.
    pub w: &'a [T],
    pub nf4: Option<Nf4W<'a>>,
}

impl<'a, T> FrozenRef<'a, T> {
    /// A plain matrix, no codes.
    pub fn dense(w: &'a [T]) -> Self {
        FrozenRef { w, nf4: None }
    }
}

/// Does the f32 AVX-512 GEMM read NF4 codes of this blocksize for element type `T`? Then it
/// serves every product with a frozen NF4 weight (any m, decoding's m = 1 included) and the
/// backend keeps no `T` copy of the weight ([`CpuFrozen::w`] is empty).
pub fn reads_nf4_codes<T: Real>(blocksize: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
            && blocksize.is_multiple_of(16)
            && sgemm_avx512::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = blocksize;
        false
    }
}

/// The codes, when the NF4 GEMM takes this product (empty products go to `mm_*`, which
/// return at once).
#[cfg(target_arch = "x86_64")]
fn nf4_gemm<'a, T: Real>(w: &FrozenRef<'a, T>, m: usize, n: usize) -> Option<Nf4W<'a>> {
    let nw = w.nf4?;
    (m > 0 && n > 0 && reads_nf4_codes::<T>(nw.blocksize)).then_some(nw)
}

/// `c (m, out) [+]= alpha · a (m, in) · Wᵀ` for a frozen `W (out, in)`.
#[allow(clippy::too_many_arguments)]
pub fn mm_frozen_nt<T: Real>(
    c: &mut [T],
    a: &[T],
    w: FrozenRef<'_, T>,
    m: usize,
    out: usize,
    inp: usize,
    alpha: T,
    acc: bool,
) {
    mm_frozen(c, a, w, m, out, inp, alpha, acc, true)
}

/// `c (m, in) [+]= alpha · a (m, out) · W` for a frozen `W (out, in)`.
#[allow(clippy::too_many_arguments)]
pub fn mm_frozen_nn<T: Real>(
    c: &mut [T],
    a: &[T],
    w: FrozenRef<'_, T>,
    m: usize,
    out: usize,
    inp: usize,
    alpha: T,
    acc: bool,
) {
    mm_frozen(c, a, w, m, out, inp, alpha, acc, false)
}

/// `c (m, n) [+]= alpha · a (m, k) · op(W)`: `op(W) = Wᵀ` (k = in, n = out) when `trans`,
/// else `W` (k = out, n = in).
#[allow(clippy::too_many_arguments)]
fn mm_frozen<T: Real>(
    c: &mut [T],
    a: &[T],
    w: FrozenRef<'_, T>,
    m: usize,
    out: usize,
    inp: usize,
    alpha: T,
    acc: bool,
    trans: bool,
) {
    let (k, n) = if trans { (inp, out) } else { (out, inp) };
    #[cfg(target_arch = "x86_64")]
    if let Some(nw) = nf4_gemm(&w, m, n) {
        assert!(c.len() >= m * n && a.len() >= m * k && (nw.rows, nw.cols) == (out, inp));
        if trans && m <= sgemm_avx512::GEMV_MAX_ROWS && sgemm_avx512::can_gemv_nf4(&nw) {
            // SAFETY: as below.
            unsafe {
                sgemm_avx512::gemv_nf4(
                    m,
                    c.as_mut_ptr() as *mut f32,
                    n,
                    acc,
                    a.as_ptr() as *const f32,
                    k,
                    nw,
                    alpha.f64() as f32,
                )
            };
            return;
        }
        // SAFETY: T is f32 (nf4_gemm checked); extents asserted above, the codes' in sgemm_nf4.
        unsafe {
            sgemm_avx512::sgemm_nf4(
                m,
                c.as_mut_ptr() as *mut f32,
                n,
                acc,
                a.as_ptr() as *const f32,
                k as isize,
                1,
                nw,
                trans,
                alpha.f64() as f32,
                true,
            )
        };
        return;
    }
    assert!(
        !w.w.is_empty() || m * n == 0,
        "frozen weight without a compute copy"
    );
    if trans {
        mm_nt(c, a, w.w, m, out, inp, alpha, acc)
    } else {
        mm_nn(c, a, w.w, m, inp, out, alpha, acc)
    }
}

/// `c (m, n) [+]= alpha · a (m, k) · b (n, k)ᵀ` — all row-major contiguous.
#[allow(clippy::too_many_arguments)]
pub fn mm_nt<T: Real>(
    c: &mut [T],
    a: &[T],
    b: &[T],
    m: usize,
    n: usize,
    k: usize,
    alpha: T,
    acc: bool,
) {
    assert!(c.len() >= m * n && a.len() >= m * k && b.len() >= n * k);
    // SAFETY: extents checked above; slices do not alias (one is &mut).
    unsafe {
        gemm_raw(
            m,
            n,
            k,
            c.as_mut_ptr(),
            n as isize,
            acc,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            1,
            k as isize,
            alpha,
            true,
        )
    }
}

/// `c (m, n) [+]= alpha · a (m, k) · b (k, n)`.
#[allow(clippy::too_many_arguments)]
pub fn mm_nn<T: Real>(
    c: &mut [T],
    a: &[T],
    b: &[T],
    m: usize,
    n: usize,
    k: usize,
    alpha: T,
    acc: bool,
) {
    assert!(c.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
    // SAFETY: as mm_nt.
    unsafe {
        gemm_raw(
            m,
            n,
            k,
            c.as_mut_ptr(),
            n as isize,
            acc,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            n as isize,
            1,
            alpha,
            true,
        )
    }
}

/// `c (m, n) [+]= alpha · a (k, m)ᵀ · b (k, n)`.
#[allow(clippy::too_many_arguments)]
pub fn mm_tn<T: Real>(
    c: &mut [T],
    a: &[T],
    b: &[T],
    m: usize,
    n: usize,
    k: usize,
    alpha: T,
    acc: bool,
) {
    assert!(c.len() >= m * n && a.len() >= k * m && b.len() >= k * n);
    // SAFETY: as mm_nt.
    unsafe {
        gemm_raw(
            m,
            n,
            k,
            c.as_mut_ptr(),
            n as isize,
            acc,
            a.as_ptr(),
            1,
            m as isize,
            b.as_ptr(),
            n as isize,
            1,
            alpha,
            true,
        )
    }
}

/// A raw pointer that may cross rayon tasks; each task writes a disjoint region (stated at use).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);
// SAFETY: only used where every task touches a disjoint set of elements.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the whole `SendPtr`, not its field).
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// Row-chunk size for elementwise rayon loops over `rows` rows of `c` elements.
pub(crate) fn rows_per_task(rows: usize, c: usize) -> usize {
    let per = (16384 / c.max(1)).max(1);
    per.min(rows.max(1))
}

/// `dst += src`, parallel.
pub fn add_acc<T: Real>(dst: &mut [T], src: &[T]) {
    assert_eq!(dst.len(), src.len());
    dst.par_chunks_mut(16384)
        .zip(src.par_chunks(16384))
        .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, s)| *d = *d + *s));
}

/// splitmix64: the dropout mask hash (a pure function of seed and element index).
#[inline]
pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Dropout multiplier of element `i`: 0 with probability p, else 1/(1-p). The reference of
/// `cuda/elementwise.cu`'s mask (the GPU drops the same elements).
#[inline]
pub fn dropout_scale<T: Real>(seed: u64, i: usize, p: f64) -> T {
    let u = (splitmix64(seed ^ splitmix64(i as u64)) >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    if u < p {
        T::zero()
    } else {
        T::of(1.0 / (1.0 - p))
    }
}

mod backend_impl;
pub use backend_impl::{CpuBackend, CpuFrozen};

#[cfg(test)]
mod tests {
    /// exp_f32 against f64 exp over the range softmax and SiLU use, and the edges.
    #[test]
    fn exp_f32_is_within_3_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = super::exp_f32(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(
            worst < 3.0 * f32::EPSILON as f64,
            "max relative error {worst:e}"
        );
        assert_eq!(super::exp_f32(0.0), 1.0);
        assert_eq!(super::exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp_f32(-100.0), 0.0);
        assert_eq!(super::exp_f32(100.0), f32::INFINITY);
    }
}
