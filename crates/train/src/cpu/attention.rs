//! Causal grouped-query attention, one (batch, head) at a time through gemm.
//! fwd: `S = σ·Q_h·K_gᵀ` (σ = D^-½, g = h / (H/Hkv)), causal mask `j ≤ i + (Tk − Tq)`,
//! `P = softmax(S)` (saved, `(B, H, Tq, Tk)`), `O_h = P·V_g`.
//! bwd: `dP = dO_h·V_gᵀ`, `dS = P ⊙ (dP − rowsum(P ⊙ dP))`, `dQ_h = σ·dS·K_g`,
//! `dK_g += σ·dSᵀ·Q_h`, `dV_g += Pᵀ·dO_h` summed over the H/Hkv heads sharing group g.

use rayon::prelude::*;

use super::{gemm_raw, vec_f32, Real, SendPtr};
use crate::backend::AttnDims;

/// Saved elements: the probabilities `(B, H, Tq, Tk)`.
pub fn saved_len(d: AttnDims) -> usize {
    d.b * d.h * d.tq * d.tk
}

/// `out (B·Tq, H·D)`, `saved` = P `(B, H, Tq, Tk)`; `q (B·Tq, H·D)`, `k`, `v (B·kv_rows, Hkv·D)`.
pub fn fwd<T: Real>(out: &mut [T], saved: &mut [T], q: &[T], k: &[T], v: &[T], dims: AttnDims) {
    let AttnDims {
        b,
        tq,
        tk,
        kv_rows,
        h,
        hkv,
        d,
    } = dims;
    assert!(tk >= tq && kv_rows >= tk && h % hkv == 0);
    assert!(out.len() == b * tq * h * d && q.len() == out.len());
    assert!(k.len() >= b * kv_rows * hkv * d && v.len() >= b * kv_rows * hkv * d);
    assert!(saved.len() >= saved_len(dims));
    let group = h / hkv;
    let off = tk - tq;
    let scale = T::of(1.0 / (d as f64).sqrt());
    let (qs, ks) = ((h * d) as isize, (hkv * d) as isize);
    let outp = SendPtr(out.as_mut_ptr());
    saved[..saved_len(dims)]
        .par_chunks_mut(tq * tk)
        .enumerate()
        .for_each(|(bh, p)| {
            let (bi, hi) = (bh / h, bh % h);
            let g = hi / group;
            let qp = q[bi * tq * h * d + hi * d..].as_ptr();
            let kp = k[bi * kv_rows * hkv * d + g * d..].as_ptr();
            let vp = v[bi * kv_rows * hkv * d + g * d..].as_ptr();
            // SAFETY: strided extents lie inside q/k/v (asserted above); p is this task's own.
            unsafe {
                gemm_raw(
                    tq,
                    tk,
                    d,
                    p.as_mut_ptr(),
                    tk as isize,
                    false,
                    qp,
                    qs,
                    1,
                    kp,
                    1,
                    ks,
                    scale,
                    false,
                );
            }
            for (i, row) in p.chunks_mut(tk).enumerate() {
                let valid = (i + off + 1).min(tk);
                if let Some(r) = vec_f32::as_f32_mut(&mut row[..valid]) {
                    let m = vec_f32::max(r);
                    vec_f32::exp_sub(r, m);
                    vec_f32::scale(r, 1.0 / vec_f32::sum(r));
                } else {
                    let m = row[..valid]
                        .iter()
                        .fold(T::neg_infinity(), |a, &x| a.max(x));
                    let mut s = T::zero();
                    for x in &mut row[..valid] {
                        *x = (*x - m).exp_v();
                    }
                    for &x in &row[..valid] {
                        s = s + x;
                    }
                    let inv = T::one() / s;
                    row[..valid].iter_mut().for_each(|x| *x = *x * inv);
                }
                row[valid..].iter_mut().for_each(|x| *x = T::zero());
            }
            let op = outp;
            // SAFETY: task (bi, hi) writes only rows of batch bi, columns hi·D..(hi+1)·D.
            unsafe {
                gemm_raw(
                    tq,
                    d,
                    tk,
                    op.0.add(bi * tq * h * d + hi * d),
                    qs,
                    false,
                    p.as_ptr(),
                    tk as isize,
                    1,
                    vp,
                    ks,
                    1,
                    T::one(),
                    false,
                );
            }
        });
}

/// `d_q (B·Tq, H·D)`, `d_k`, `d_v (B·kv_rows, Hkv·D)` overwritten; `d_out (B·Tq, H·D)`;
/// saved P; inputs `q`, `k`, `v` as in fwd.
#[allow(clippy::too_many_arguments)]
pub fn bwd<T: Real>(
    d_q: &mut [T],
    d_k: &mut [T],
    d_v: &mut [T],
    d_out: &[T],
    saved: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    dims: AttnDims,
) {
    let AttnDims {
        b,
        tq,
        tk,
        kv_rows,
        h,
        hkv,
        d,
    } = dims;
    let group = h / hkv;
    assert!(d_q.len() == b * tq * h * d && d_out.len() == d_q.len());
    assert!(d_k.len() >= b * kv_rows * hkv * d && d_v.len() == d_k.len());
    d_k.iter_mut().for_each(|x| *x = T::zero());
    d_v.iter_mut().for_each(|x| *x = T::zero());
    let scale = T::of(1.0 / (d as f64).sqrt());
    let (qs, ks) = ((h * d) as isize, (hkv * d) as isize);
    let (dqp, dkp, dvp) = (
        SendPtr(d_q.as_mut_ptr()),
        SendPtr(d_k.as_mut_ptr()),
        SendPtr(d_v.as_mut_ptr()),
    );
    (0..b * hkv).into_par_iter().for_each(|bg| {
        let (bi, g) = (bg / hkv, bg % hkv);
        let (dqp, dkp, dvp) = (dqp, dkp, dvp);
        let kv_base = bi * kv_rows * hkv * d + g * d;
        let mut ds = vec![T::zero(); tq * tk];
        for hi in g * group..(g + 1) * group {
            let p = &saved[(bi * h + hi) * tq * tk..(bi * h + hi + 1) * tq * tk];
            let q_base = bi * tq * h * d + hi * d;
            // SAFETY (all gemms below): strided extents inside the buffers; this task alone
            // writes rows of batch bi in columns of head hi (d_q) and group g (d_k, d_v).
            unsafe {
                // dP = dO_h · V_gᵀ  (Tq, Tk)
                gemm_raw(
                    tq,
                    tk,
                    d,
                    ds.as_mut_ptr(),
                    tk as isize,
                    false,
                    d_out[q_base..].as_ptr(),
                    qs,
                    1,
                    v[kv_base..].as_ptr(),
                    1,
                    ks,
                    T::one(),
                    false,
                );
            }
            for (dsr, pr) in ds.chunks_mut(tk).zip(p.chunks(tk)) {
                let dot: T = dsr.iter().zip(pr).map(|(&a, &b)| a * b).sum();
                for (x, &pv) in dsr.iter_mut().zip(pr) {
                    *x = pv * (*x - dot);
                }
            }
            let first = hi == g * group;
            unsafe {
                // dV_g += Pᵀ · dO_h  (Tk, D)
                gemm_raw(
                    tk,
                    d,
                    tq,
                    dvp.0.add(kv_base),
                    ks,
                    !first,
                    p.as_ptr(),
                    1,
                    tk as isize,
                    d_out[q_base..].as_ptr(),
                    qs,
                    1,
                    T::one(),
                    false,
                );
                // dQ_h = σ · dS · K_g  (Tq, D)
                gemm_raw(
                    tq,
                    d,
                    tk,
                    dqp.0.add(q_base),
                    qs,
                    false,
                    ds.as_ptr(),
                    tk as isize,
                    1,
                    k[kv_base..].as_ptr(),
                    ks,
                    1,
                    scale,
                    false,
                );
                // dK_g += σ · dSᵀ · Q_h  (Tk, D)
                gemm_raw(
                    tk,
                    d,
                    tq,
                    dkp.0.add(kv_base),
                    ks,
                    !first,
                    ds.as_ptr(),
                    1,
                    tk as isize,
                    q[q_base..].as_ptr(),
                    qs,
                    1,
                    scale,
                    false,
                );
            }
        }
    });
}
