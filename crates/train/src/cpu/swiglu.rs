//! SwiGLU of the Llama MLP: `a = silu(e) ⊙ g` with `silu(e) = e·σ(e)`.
//! bwd: `d_g = d_a ⊙ silu(e)`, `d_e = d_a ⊙ g ⊙ σ(e)·(1 + e·(1 − σ(e)))`.
//! Saved: `e` and `g` (the gate and up projections).

use rayon::prelude::*;

use super::{vec_f32, Real};

const CHUNK: usize = 8192;

#[inline]
pub(crate) fn sigmoid<T: Real>(x: T) -> T {
    T::one() / (T::one() + (-x).exp_v())
}

/// `out (N, I) = silu(gate) ⊙ up`.
pub fn fwd<T: Real>(out: &mut [T], gate: &[T], up: &[T]) {
    assert!(out.len() == gate.len() && gate.len() == up.len());
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .for_each(|((o, e), g)| {
            if let (Some(o), Some(e), Some(g)) = (
                vec_f32::as_f32_mut(o),
                vec_f32::as_f32(e),
                vec_f32::as_f32(g),
            ) {
                return vec_f32::swiglu_fwd(o, e, g);
            }
            for ((o, &e), &g) in o.iter_mut().zip(e).zip(g) {
                *o = e * sigmoid(e) * g;
            }
        });
}

/// `d_gate`, `d_up (N, I)` overwritten from `d_out` and the saved `gate`, `up`.
pub fn bwd<T: Real>(d_gate: &mut [T], d_up: &mut [T], d_out: &[T], gate: &[T], up: &[T]) {
    let n = gate.len();
    assert!(d_gate.len() == n && d_up.len() == n && d_out.len() == n && up.len() == n);
    d_gate
        .par_chunks_mut(CHUNK)
        .zip(d_up.par_chunks_mut(CHUNK))
        .zip(d_out.par_chunks(CHUNK))
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(((de, dg), da), (e, g))| {
            if let (Some(de), Some(dg), Some(da), Some(e), Some(g)) = (
                vec_f32::as_f32_mut(de),
                vec_f32::as_f32_mut(dg),
                vec_f32::as_f32(da),
                vec_f32::as_f32(e),
                vec_f32::as_f32(g),
            ) {
                return vec_f32::swiglu_bwd(de, dg, da, e, g);
            }
            for i in 0..de.len() {
                let s = sigmoid(e[i]);
                dg[i] = da[i] * e[i] * s;
                de[i] = da[i] * g[i] * s * (T::one() + e[i] * (T::one() - s));
            }
        });
}
