//! Cross entropy per row over `logits (N, V)`: `lse = log Σ exp(x)`, `loss = lse − x[target]`
//! (rows with target −100 are ignored). bwd: `d = scale·(exp(x − lse) − onehot(target))`.
//! The mean over tokens is the caller's `scale` (= 1/count), so gradient accumulation can
//! normalise by the label tokens of the whole accumulated batch.

use rayon::prelude::*;

use super::{vec_f32, Real};

/// The label that contributes nothing (PyTorch `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

/// `lse (N,)` saved; returns (Σ loss in f64, number of non-ignored rows).
pub fn fwd<T: Real>(lse: &mut [T], logits: &[T], targets: &[i32], v: usize) -> (f64, usize) {
    let n = targets.len();
    assert!(logits.len() == n * v && lse.len() >= n);
    let losses: Vec<f64> = lse[..n]
        .par_iter_mut()
        .zip(logits.par_chunks(v))
        .zip(targets)
        .map(|((l, x), &t)| {
            let (m, s) = match vec_f32::as_f32(x) {
                Some(x) => {
                    let m = vec_f32::max(x);
                    (T::of(m as f64), T::of(vec_f32::sum_exp(x, m) as f64))
                }
                None => {
                    let m = x.iter().fold(T::neg_infinity(), |a, &b| a.max(b));
                    (m, sum_exp(x, m))
                }
            };
            *l = m + s.ln();
            if t == IGNORE_INDEX {
                0.0
            } else {
                (*l - x[t as usize]).f64()
            }
        })
        .collect();
    let count = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
    (losses.iter().sum(), count)
}

/// `logits_to_d (N, V)`: logits in, `d_logits` out (in place).
pub fn bwd<T: Real>(logits_to_d: &mut [T], lse: &[T], targets: &[i32], v: usize, scale: f64) {
    let sc = T::of(scale);
    logits_to_d
        .par_chunks_mut(v)
        .zip(&lse[..targets.len()])
        .zip(targets)
        .for_each(|((x, &l), &t)| {
            if t == IGNORE_INDEX {
                x.iter_mut().for_each(|e| *e = T::zero());
            } else {
                match vec_f32::as_f32_mut(x) {
                    Some(x) => vec_f32::scaled_exp_sub(x, l.f64() as f32, sc.f64() as f32),
                    None => x.iter_mut().for_each(|e| *e = sc * (*e - l).exp_v()),
                }
                x[t as usize] = x[t as usize] - sc;
            }
        });
}

/// `Σ exp(x_i − m)` with eight partial sums (a reduction order LLVM may vectorize; the
/// rounding differs from a serial sum by a few ulps of the total).
pub(crate) fn sum_exp<T: Real>(x: &[T], m: T) -> T {
    let mut acc = [T::zero(); 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..8 {
            acc[j] = acc[j] + (c[j] - m).exp_v();
        }
    }
    let mut s = acc.iter().fold(T::zero(), |a, &b| a + b);
    for &xi in rest {
        s = s + (xi - m).exp_v();
    }
    s
}
