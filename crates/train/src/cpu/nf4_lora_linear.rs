//! The NF4+LoRA linear on the CPU: the f32 AVX-512 GEMM reads the frozen base as NF4 codes and
//! dequantizes while packing; elsewhere (f64, no AVX-512F) the base is the NF4 weight
//! dequantized once to the compute dtype (`CpuFrozen::w`). Same values either way.
//! fwd `y = x·Wᵀ + bias + S·u·Bᵀ`, `u = x_d·Aᵀ` saved, `x_d = dropout(x)`;
//! bwd `g = d_y·B`, `dB += S·d_yᵀ·u`, `dA += S·gᵀ·x_d`, `d_x (+)= d_y·W + S·(g·A) ⊙ mask`.
//! W never gets a gradient.

use rayon::prelude::*;

use super::{dropout_scale, mm_frozen_nn, mm_frozen_nt, mm_nn, mm_nt, mm_tn, FrozenRef, Real};
use crate::backend::{Dropout, LinearDims};
use crate::lora::LoraSlot;

/// `x_d = x ⊙ mask/(1-p)`, the mask a pure function of (seed, flat index).
fn dropped<T: Real>(x: &[T], dr: Dropout) -> Vec<T> {
    let mut out = x.to_vec();
    out.par_chunks_mut(8192).enumerate().for_each(|(c, o)| {
        for (j, v) in o.iter_mut().enumerate() {
            *v = *v * dropout_scale::<T>(dr.seed, c * 8192 + j, dr.p);
        }
    });
    out
}

/// `y (N, out)`; `u (N, R)` saved when given; `x (N, in)`; `w (out, in)`; `bias (out,)`;
/// LoRA: `params` arena holding A `(R, in)` and B `(out, R)` at the slot's offsets.
#[allow(clippy::too_many_arguments)]
pub fn fwd<T: Real>(
    y: &mut [T],
    u: Option<&mut [T]>,
    x: &[T],
    w: FrozenRef<'_, T>,
    bias: Option<&[T]>,
    lora: Option<(&[T], &LoraSlot, Option<Dropout>)>,
    dims: LinearDims,
) {
    let LinearDims {
        n,
        in_features: i,
        out_features: o,
    } = dims;
    assert!(y.len() == n * o && x.len() == n * i && (w.w.len() == o * i || w.nf4.is_some()));
    mm_frozen_nt(y, x, w, n, o, i, T::one(), false);
    if let Some(bias) = bias {
        y.par_chunks_mut(o)
            .for_each(|r| r.iter_mut().zip(bias).for_each(|(y, &b)| *y = *y + b));
    }
    if let Some((params, s, dr)) = lora {
        let r = s.r;
        let a = &params[s.a_range()];
        let bm = &params[s.b_range()];
        let mut own;
        let u: &mut [T] = match u {
            Some(u) => u,
            None => {
                own = vec![T::zero(); n * r];
                &mut own
            }
        };
        match dr {
            Some(dr) if dr.p > 0.0 => mm_nt(u, &dropped(x, dr), a, n, r, i, T::one(), false),
            _ => mm_nt(u, x, a, n, r, i, T::one(), false),
        }
        mm_nt(y, u, bm, n, o, r, T::of(s.scale), true);
    }
}

/// `d_x (N, in)` overwritten, or accumulated when `acc_dx`; `grads` arena (A, B grads added
/// at the slot's offsets); `d_y (N, out)`; saved `x (N, in)` and `u (N, R)`; `w (out, in)`.
#[allow(clippy::too_many_arguments)]
pub fn bwd<T: Real>(
    d_x: Option<&mut [T]>,
    acc_dx: bool,
    grads: Option<&mut [T]>,
    d_y: &[T],
    x: &[T],
    u: Option<&[T]>,
    w: FrozenRef<'_, T>,
    lora: Option<(&[T], &LoraSlot, Option<Dropout>)>,
    dims: LinearDims,
) {
    let LinearDims {
        n,
        in_features: i,
        out_features: o,
    } = dims;
    assert!(d_y.len() == n * o && x.len() == n * i && (w.w.len() == o * i || w.nf4.is_some()));
    let mut g = Vec::new();
    let mut xd = None;
    if let Some((params, s, dr)) = lora {
        let r = s.r;
        let bm = &params[s.b_range()];
        let u = u.expect("nf4_lora_linear bwd with LoRA needs the saved u");
        g = vec![T::zero(); n * r];
        mm_nn(&mut g, d_y, bm, n, r, o, T::one(), false);
        if let Some(dr) = dr.filter(|d| d.p > 0.0) {
            xd = Some((dropped(x, dr), dr));
        }
        if let Some(grads) = grads {
            let sc = T::of(s.scale);
            // A precedes B in the arena (LoraSlot layout), so one split gives both.
            let (lo, hi) = grads.split_at_mut(s.b_offset);
            let da = &mut lo[s.a_offset..s.a_offset + r * i];
            let db = &mut hi[..o * r];
            mm_tn(db, d_y, u, o, r, n, sc, true);
            let xin = xd.as_ref().map(|(v, _)| v.as_slice()).unwrap_or(x);
            mm_tn(da, &g, xin, r, i, n, sc, true);
        }
    }
    if let Some(d_x) = d_x {
        assert_eq!(d_x.len(), n * i);
        mm_frozen_nn(d_x, d_y, w, n, o, i, T::one(), acc_dx);
        if let Some((params, s, _)) = lora {
            let a = &params[s.a_range()];
            let sc = T::of(s.scale);
            match &xd {
                None => mm_nn(d_x, &g, a, n, i, s.r, sc, true),
                Some((_, dr)) => {
                    let mut t = vec![T::zero(); n * i];
                    mm_nn(&mut t, &g, a, n, i, s.r, sc, false);
                    let dr = *dr;
                    d_x.par_chunks_mut(8192)
                        .zip(t.par_chunks(8192))
                        .enumerate()
                        .for_each(|(c, (dx, t))| {
                            for (j, (dx, &t)) in dx.iter_mut().zip(t).enumerate() {
                                *dx = *dx + t * dropout_scale::<T>(dr.seed, c * 8192 + j, dr.p);
                            }
                        });
                }
            }
        }
    }
}
