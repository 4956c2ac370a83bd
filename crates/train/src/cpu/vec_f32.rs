//! The row reductions and exponentials of softmax-shaped loops (cross entropy, attention)
//! and SwiGLU in AVX-512, for the f32 CPU backend. Why: the workspace is compiled for baseline
//! x86-64 (SSE2), and these loops ran scalar — cross entropy over a 32 000-word vocabulary
//! alone took 8 % of a training step. Each function here computes what the generic loop it
//! replaces computes: `exp` is [`super::exp_f32`] operation for operation (mul, add, no FMA
//! contraction, the same constants), so exponentials are bit-identical to the scalar path;
//! `sum_exp` keeps the generic loop's order of additions too (the loss is the same bits);
//! `sum` uses 16 partial sums and a fixed tree.
//!
//! Callers go through [`as_f32`]/[`as_f32_mut`], which answer `None` unless the element type
//! is f32 and the CPU has AVX-512F; the generic loop then runs (f64 gradient checks, older
//! CPUs, `QLORA_NO_AVX512=1`).

use std::any::TypeId;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::Real;

/// Is the AVX-512 path on? Shared with the GEMM (`QLORA_NO_AVX512=1` turns both off).
fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::sgemm_avx512::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The functions below are safe to call: each checks the CPU first (a cached flag), so a
/// caller that skipped [`as_f32`] gets a panic, not an illegal instruction.
#[inline]
fn guard() {
    assert!(
        available(),
        "vec_f32 called without AVX-512F (use as_f32 first)"
    );
}

/// `x` as `&[f32]` when `T` is f32 and the AVX-512 functions below may run.
pub(crate) fn as_f32<T: Real>(x: &[T]) -> Option<&[f32]> {
    if TypeId::of::<T>() == TypeId::of::<f32>() && available() {
        // SAFETY: T is f32 (same type, same layout).
        Some(unsafe { std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len()) })
    } else {
        None
    }
}

/// `x` as `&mut [f32]` under the same condition as [`as_f32`].
pub(crate) fn as_f32_mut<T: Real>(x: &mut [T]) -> Option<&mut [f32]> {
    if TypeId::of::<T>() == TypeId::of::<f32>() && available() {
        // SAFETY: as as_f32; the borrow is carried over.
        Some(unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut f32, x.len()) })
    } else {
        None
    }
}

/// `max_i x_i`, NaN entries ignored as `f32::max` ignores them (−∞ for an empty row).
pub(crate) fn max(x: &[f32]) -> f32 {
    guard();
    // SAFETY: guard() checked AVX-512F.
    unsafe { avx512::max(x) }
}

/// `Σ_i exp(x_i − m)`.
pub(crate) fn sum_exp(x: &[f32], m: f32) -> f32 {
    guard();
    // SAFETY: guard() checked AVX-512F.
    unsafe { avx512::sum_exp(x, m) }
}

/// `Σ_i x_i`.
pub(crate) fn sum(x: &[f32]) -> f32 {
    guard();
    // SAFETY: guard() checked AVX-512F.
    unsafe { avx512::sum(x) }
}

/// `x_i ← s · exp(x_i − m)` in place.
pub(crate) fn scaled_exp_sub(x: &mut [f32], m: f32, s: f32) {
    guard();
    // SAFETY: guard() checked AVX-512F.
    unsafe { avx512::scaled_exp_sub(x, m, s) }
}

/// `x_i ← exp(x_i − m)` in place (no scale: bit-identical to `(x − m).exp_v()`, which a
/// multiply by 1.0 also is, but this saves the multiply).
pub(crate) fn exp_sub(x: &mut [f32], m: f32) {
    guard();
    // SAFETY: guard() checked AVX-512F.
    unsafe { avx512::exp_sub(x, m) }
}

/// `x_i ← x_i · s`.
pub(crate) fn scale(x: &mut [f32], s: f32) {
    guard();
    // SAFETY: guard() checked AVX-512F.
    unsafe { avx512::scale(x, s) }
}

/// `out_i = e_i·σ(e_i)·g_i` (SwiGLU forward, `swiglu::fwd`'s expression in its order).
pub(crate) fn swiglu_fwd(out: &mut [f32], e: &[f32], g: &[f32]) {
    assert!(out.len() == e.len() && e.len() == g.len());
    guard();
    // SAFETY: guard() checked AVX-512F; lengths asserted.
    unsafe { avx512::swiglu_fwd(out, e, g) }
}

/// SwiGLU backward, `swiglu::bwd`'s expressions in their order:
/// `d_g = d_a·e·σ`, `d_e = d_a·g·σ·(1 + e·(1 − σ))`.
pub(crate) fn swiglu_bwd(d_e: &mut [f32], d_g: &mut [f32], d_a: &[f32], e: &[f32], g: &[f32]) {
    let n = e.len();
    assert!(d_e.len() == n && d_g.len() == n && d_a.len() == n && g.len() == n);
    guard();
    // SAFETY: guard() checked AVX-512F; lengths asserted.
    unsafe { avx512::swiglu_bwd(d_e, d_g, d_a, e, g) }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;

    /// [`crate::cpu::exp_f32`] on 16 lanes, the same operations in the same order.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp16(x: __m512) -> __m512 {
        let (mul, add, sub, set) = (_mm512_mul_ps, _mm512_add_ps, _mm512_sub_ps, _mm512_set1_ps);
        // clamp: max(lo, x) and min(hi, ·) return their second operand when either is NaN,
        // so NaN flows through as in f32::clamp.
        let xc = _mm512_min_ps(set(88.7), _mm512_max_ps(set(-87.3), x));
        let magic = set(12_582_912.0);
        let n = sub(add(mul(xc, set(std::f32::consts::LOG2_E)), magic), magic);
        let r = sub(
            sub(xc, mul(n, set(0.693_145_75))),
            mul(n, set(1.428_606_8e-6)),
        );
        let c = |v: f32| set(v);
        let p = add(
            c(1.0),
            mul(
                r,
                add(
                    c(1.0),
                    mul(
                        r,
                        add(
                            c(0.5),
                            mul(
                                r,
                                add(
                                    c(1.0 / 6.0),
                                    mul(
                                        r,
                                        add(
                                            c(1.0 / 24.0),
                                            mul(
                                                r,
                                                add(
                                                    c(1.0 / 120.0),
                                                    mul(
                                                        r,
                                                        add(
                                                            c(1.0 / 720.0),
                                                            mul(r, c(1.0 / 5040.0)),
                                                        ),
                                                    ),
                                                ),
                                            ),
                                        ),
                                    ),
                                ),
                            ),
                        ),
                    ),
                ),
            ),
        );
        // n is integral, so round-to-nearest conversion equals the scalar `as i32`.
        let ni = _mm512_cvtps_epi32(n);
        let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
            ni,
            _mm512_set1_epi32(127),
        )));
        let y = mul(p, scale);
        // Ordered compares (false for NaN), as the scalar branches.
        let lo = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, set(-87.3));
        let hi = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, set(88.7));
        let y = _mm512_mask_mov_ps(y, lo, _mm512_setzero_ps());
        _mm512_mask_mov_ps(y, hi, set(f32::INFINITY))
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn max(x: &[f32]) -> f32 {
        let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
        let chunks = x.chunks_exact(16);
        let rest = chunks.remainder();
        for c in chunks {
            // A NaN lane of x leaves acc (the second operand) unchanged.
            acc = _mm512_max_ps(_mm512_loadu_ps(c.as_ptr()), acc);
        }
        let mut lanes = [0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
        lanes
            .iter()
            .chain(rest)
            .fold(f32::NEG_INFINITY, |a, &b| a.max(b))
    }

    /// 16 partial sums of `f(x_i)` over the 16-aligned part, then the lanes, then the tail.
    #[target_feature(enable = "avx512f")]
    unsafe fn sum_map(x: &[f32], f: impl Fn(__m512) -> __m512, g: impl Fn(f32) -> f32) -> f32 {
        let mut acc = _mm512_setzero_ps();
        let chunks = x.chunks_exact(16);
        let rest = chunks.remainder();
        for c in chunks {
            acc = _mm512_add_ps(acc, f(_mm512_loadu_ps(c.as_ptr())));
        }
        let mut s = _mm512_reduce_add_ps(acc);
        for &v in rest {
            s += g(v);
        }
        s
    }

    /// Eight running sums over chunks of 8, folded left to right, then the tail — the order
    /// of the generic `cross_entropy::sum_exp`, so the loss is the same bits on both paths.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sum_exp(x: &[f32], m: f32) -> f32 {
        let vm = _mm512_set1_ps(m);
        let mut acc = _mm256_setzero_ps();
        let chunks = x.chunks_exact(16);
        let rest = chunks.remainder();
        for c in chunks {
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), vm));
            acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
            acc = _mm256_add_ps(
                acc,
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e))),
            );
        }
        let eights = rest.len() / 8 * 8;
        if eights == 8 {
            let v = _mm512_maskz_loadu_ps(0x00ff, rest.as_ptr());
            let e = exp16(_mm512_sub_ps(v, vm));
            acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let mut s = lanes.iter().fold(0f32, |a, &b| a + b);
        for &v in &rest[eights..] {
            s += crate::cpu::exp_f32(v - m);
        }
        s
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sum(x: &[f32]) -> f32 {
        sum_map(x, |v| v, |v| v)
    }

    /// `x_i ← f(x_i)` on 16 lanes, `g` on the tail.
    #[target_feature(enable = "avx512f")]
    unsafe fn map(x: &mut [f32], f: impl Fn(__m512) -> __m512, g: impl Fn(f32) -> f32) {
        let mut chunks = x.chunks_exact_mut(16);
        for c in &mut chunks {
            _mm512_storeu_ps(c.as_mut_ptr(), f(_mm512_loadu_ps(c.as_ptr())));
        }
        for v in chunks.into_remainder() {
            *v = g(*v);
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scaled_exp_sub(x: &mut [f32], m: f32, s: f32) {
        let (vm, vs) = (_mm512_set1_ps(m), _mm512_set1_ps(s));
        map(
            x,
            |v| unsafe { _mm512_mul_ps(vs, exp16(_mm512_sub_ps(v, vm))) },
            |v| s * crate::cpu::exp_f32(v - m),
        )
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_sub(x: &mut [f32], m: f32) {
        let vm = _mm512_set1_ps(m);
        map(
            x,
            |v| unsafe { exp16(_mm512_sub_ps(v, vm)) },
            |v| crate::cpu::exp_f32(v - m),
        )
    }

    /// `σ(x) = 1 / (1 + exp(−x))` as `swiglu::sigmoid` (negation and division are exact /
    /// correctly rounded in both).
    #[target_feature(enable = "avx512f")]
    unsafe fn sigmoid16(x: __m512) -> __m512 {
        let one = _mm512_set1_ps(1.0);
        let neg = _mm512_sub_ps(_mm512_setzero_ps(), x);
        _mm512_div_ps(one, _mm512_add_ps(one, exp16(neg)))
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn swiglu_fwd(out: &mut [f32], e: &[f32], g: &[f32]) {
        let n16 = e.len() / 16 * 16;
        for i in (0..n16).step_by(16) {
            let ev = _mm512_loadu_ps(e.as_ptr().add(i));
            let gv = _mm512_loadu_ps(g.as_ptr().add(i));
            let o = _mm512_mul_ps(_mm512_mul_ps(ev, sigmoid16(ev)), gv);
            _mm512_storeu_ps(out.as_mut_ptr().add(i), o);
        }
        for i in n16..e.len() {
            out[i] = e[i] * crate::cpu::swiglu::sigmoid(e[i]) * g[i];
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn swiglu_bwd(
        d_e: &mut [f32],
        d_g: &mut [f32],
        d_a: &[f32],
        e: &[f32],
        g: &[f32],
    ) {
        let one = _mm512_set1_ps(1.0);
        let n16 = e.len() / 16 * 16;
        for i in (0..n16).step_by(16) {
            let ev = _mm512_loadu_ps(e.as_ptr().add(i));
            let gv = _mm512_loadu_ps(g.as_ptr().add(i));
            let da = _mm512_loadu_ps(d_a.as_ptr().add(i));
            let s = sigmoid16(ev);
            let dg = _mm512_mul_ps(_mm512_mul_ps(da, ev), s);
            let t = _mm512_add_ps(one, _mm512_mul_ps(ev, _mm512_sub_ps(one, s)));
            let de = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(da, gv), s), t);
            _mm512_storeu_ps(d_g.as_mut_ptr().add(i), dg);
            _mm512_storeu_ps(d_e.as_mut_ptr().add(i), de);
        }
        for i in n16..e.len() {
            let s = crate::cpu::swiglu::sigmoid(e[i]);
            d_g[i] = d_a[i] * e[i] * s;
            d_e[i] = d_a[i] * g[i] * s * (1.0 + e[i] * (1.0 - s));
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scale(x: &mut [f32], s: f32) {
        let vs = _mm512_set1_ps(s);
        map(x, |v| _mm512_mul_ps(v, vs), |v| v * s)
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx512 {
    //! Never called: `available()` is false off x86-64.
    pub(super) unsafe fn max(_: &[f32]) -> f32 {
        unreachable!()
    }
    pub(super) unsafe fn sum_exp(_: &[f32], _: f32) -> f32 {
        unreachable!()
    }
    pub(super) unsafe fn sum(_: &[f32]) -> f32 {
        unreachable!()
    }
    pub(super) unsafe fn scaled_exp_sub(_: &mut [f32], _: f32, _: f32) {
        unreachable!()
    }
    pub(super) unsafe fn exp_sub(_: &mut [f32], _: f32) {
        unreachable!()
    }
    pub(super) unsafe fn scale(_: &mut [f32], _: f32) {
        unreachable!()
    }
    pub(super) unsafe fn swiglu_fwd(_: &mut [f32], _: &[f32], _: &[f32]) {
        unreachable!()
    }
    pub(super) unsafe fn swiglu_bwd(_: &mut [f32], _: &mut [f32], _: &[f32], _: &[f32], _: &[f32]) {
        unreachable!()
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// The vector exp is the scalar exp bit for bit, edges and NaN included.
    #[test]
    fn exp16_is_exp_f32_bit_for_bit() {
        if !available() {
            eprintln!("exp16_is_exp_f32_bit_for_bit: skipped, no AVX-512F");
            return;
        }
        let mut xs: Vec<f32> = (0..200_000).map(|i| -100.0 + i as f32 * 0.00097).collect();
        xs.extend([
            -87.3,
            -87.29,
            -87.31,
            88.7,
            88.69,
            88.71,
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e-30,
            -1e-30,
        ]);
        while !xs.len().is_multiple_of(16) {
            xs.push(1.5);
        }
        let mut got = xs.clone();
        exp_sub(&mut got, 0.0);
        for (x, g) in xs.iter().zip(&got) {
            let want = crate::cpu::exp_f32(*x);
            assert!(
                g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                "exp({x}): vector {g:e}, scalar {want:e}"
            );
        }
    }

    /// SwiGLU forward and backward equal the generic loops bit for bit (ragged length, the
    /// saturated tails of σ, a NaN).
    #[test]
    fn swiglu_matches_the_generic_loops_bit_for_bit() {
        if !available() {
            eprintln!("swiglu_matches_the_generic_loops_bit_for_bit: skipped, no AVX-512F");
            return;
        }
        let n = 1000 + 7;
        let mut e: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.61).sin() * 30.0).collect();
        e[5] = f32::NAN;
        e[6] = -100.0;
        e[7] = 100.0;
        let g: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.23).cos()).collect();
        let da: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.41).sin() * 1e-3).collect();
        let (mut want, mut got) = (vec![0f32; n], vec![0f32; n]);
        let generic = |out: &mut [f32]| {
            for i in 0..n {
                out[i] = e[i] * crate::cpu::swiglu::sigmoid(e[i]) * g[i];
            }
        };
        generic(&mut want);
        swiglu_fwd(&mut got, &e, &g);
        let same = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
        };
        assert!(same(&want, &got), "fwd");
        let (mut de, mut dg) = (vec![0f32; n], vec![0f32; n]);
        swiglu_bwd(&mut de, &mut dg, &da, &e, &g);
        for i in 0..n {
            let s = crate::cpu::swiglu::sigmoid(e[i]);
            want[i] = da[i] * e[i] * s;
            got[i] = da[i] * g[i] * s * (1.0 + e[i] * (1.0 - s));
        }
        assert!(same(&want, &dg) && same(&got, &de), "bwd");
    }

    /// The reductions against their plain definitions, ragged lengths, NaN ignored by max;
    /// `sum_exp` bit for bit against the generic loop; `sum` within the worst-case bound of
    /// recursive summation, (terms per lane + lanes) · ε · Σ|x| (its order differs).
    #[test]
    fn reductions_match_the_plain_loops() {
        if !available() {
            eprintln!("reductions_match_the_plain_loops: skipped, no AVX-512F");
            return;
        }
        for n in [0usize, 1, 7, 8, 15, 16, 17, 24, 31, 100, 32000] {
            let x: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.77).sin() * 9.0).collect();
            let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            assert_eq!(max(&x).to_bits(), m.to_bits(), "max, n {n}");
            let bound = (n / 16 + 16) as f64 * f32::EPSILON as f64;
            let want = crate::cpu::cross_entropy::sum_exp(&x, m);
            assert_eq!(sum_exp(&x, m).to_bits(), want.to_bits(), "sum_exp n {n}");
            let want: f64 = x.iter().map(|&v| v as f64).sum();
            let total: f64 = x.iter().map(|&v| v.abs() as f64).sum();
            assert!((sum(&x) as f64 - want).abs() <= bound * total, "sum n {n}");
            let mut y = x.clone();
            scaled_exp_sub(&mut y, m, 0.25);
            for (a, b) in x.iter().zip(&y) {
                assert_eq!(b.to_bits(), (0.25 * crate::cpu::exp_f32(a - m)).to_bits());
            }
            let mut y = x.clone();
            scale(&mut y, 3.0);
            for (a, b) in x.iter().zip(&y) {
                assert_eq!(b.to_bits(), (a * 3.0).to_bits());
            }
        }
        let mut x = vec![1.0f32; 40];
        x[3] = f32::NAN;
        x[33] = f32::NAN;
        x[20] = 7.0;
        assert_eq!(max(&x), 7.0);
    }
}
