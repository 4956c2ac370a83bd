//! RMSNorm as transformers' `LlamaRMSNorm`:
//! fwd `r = (mean(x²) + eps)^-½`, `y = w ⊙ (x·r)`; saved `x` (by the caller) and `r (N,)`.
//! bwd (w frozen): with `x̂ = x·r`, `g = w ⊙ dy`: `dx = r·(g − x̂·mean(g ⊙ x̂))`
//! (from `∂r/∂x_j = −r³·x_j/C`).

use rayon::prelude::*;

use super::{rows_per_task, Real};

/// `out (N, C)`, `rstd (N,)` saved; `x (N, C)`, `w (C,)`.
pub fn fwd<T: Real>(out: &mut [T], rstd: &mut [T], x: &[T], w: &[T], c: usize, eps: f64) {
    let n = x.len() / c;
    assert!(out.len() == n * c && rstd.len() >= n && w.len() == c);
    let rows = rows_per_task(n, c);
    out.par_chunks_mut(rows * c)
        .zip(rstd[..n].par_chunks_mut(rows))
        .zip(x.par_chunks(rows * c))
        .for_each(|((o, r), x)| {
            for ((o, r), x) in o.chunks_mut(c).zip(r.iter_mut()).zip(x.chunks(c)) {
                let ms = x.iter().map(|&v| v * v).sum::<T>() / T::of(c as f64);
                let rs = T::one() / (ms + T::of(eps)).sqrt();
                *r = rs;
                for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                    *o = w * (x * rs);
                }
            }
        });
}

/// `d_x (N, C)` overwritten; `d_out (N, C)`, saved `x (N, C)`, `rstd (N,)`; `w (C,)`.
pub fn bwd<T: Real>(d_x: &mut [T], d_out: &[T], x: &[T], rstd: &[T], w: &[T], c: usize) {
    let n = x.len() / c;
    assert!(d_x.len() == n * c && d_out.len() == n * c && rstd.len() >= n);
    let rows = rows_per_task(n, c);
    d_x.par_chunks_mut(rows * c)
        .zip(d_out.par_chunks(rows * c))
        .zip(x.par_chunks(rows * c))
        .zip(rstd[..n].par_chunks(rows))
        .for_each(|(((dx, dy), x), r)| {
            for (((dx, dy), x), &r) in dx.chunks_mut(c).zip(dy.chunks(c)).zip(x.chunks(c)).zip(r) {
                // mean(g ⊙ x̂) with g = w⊙dy, x̂ = x·r
                let dot = dy
                    .iter()
                    .zip(x)
                    .zip(w)
                    .map(|((&dy, &x), &w)| w * dy * x * r)
                    .sum::<T>()
                    / T::of(c as f64);
                for (((dx, &dy), &x), &w) in dx.iter_mut().zip(dy).zip(x).zip(w) {
                    *dx = r * (w * dy - x * r * dot);
                }
            }
        });
}
