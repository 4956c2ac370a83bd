//! Causal grouped-query attention, one (batch, head) at a time through gemm.
//! fwd: `S = σ·Q_h·K_gᵀ` (σ = D^-½, g = h / (H/Hkv)), causal mask `j ≤ i + (Tk − Tq)`,
//! `P = softmax(S)` (saved, `(B, H, Tq, Tk)`), `O_h = P·V_g`.
//! bwd: `dP = dO_h·V_gᵀ`, `dS = P ⊙ (dP − rowsum(P ⊙ dP))`, `dQ_h = σ·dS·K_g`,
//! `dK_g += σ·dSᵀ·Q_h`, `dV_g += Pᵀ·dO_h` summed over the H/Hkv heads sharing group g.

use rayon::prelude::*;

use super::{gemm_raw, vec_f32, Real, SendPtr};
use crate::backend::AttnDims;

/// Rows (queries) and columns (keys) are processed in blocks of this many: a block of rows
/// multiplies only the keys its last row sees, so causal attention does about half the
/// products of the full square (the masked ones were exact zeros; every sum keeps its order,
/// so results are unchanged up to KC-blocking of sums longer than the GEMM's KC).
const BLOCK: usize = 64;

/// Keys visible to the first `rows` queries: query i sees keys j ≤ i + off.
fn visible(rows: usize, off: usize, tk: usize) -> usize {
    (rows + off).min(tk)
}

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
            let op = outp;
            for r0 in (0..tq).step_by(BLOCK) {
                let r1 = (r0 + BLOCK).min(tq);
                // Rows r0..r1 see keys 0..cols at most (row i: j ≤ i + off).
                let cols = visible(r1, off, tk);
                let pb = &mut p[r0 * tk..r1 * tk];
                // SAFETY: strided extents lie inside q/k/v (asserted above); pb is this
                // task's own.
                unsafe {
                    // S = σ·Q_h[r0..r1]·K_g[..cols]ᵀ
                    gemm_raw(
                        r1 - r0,
                        cols,
                        d,
                        pb.as_mut_ptr(),
                        tk as isize,
                        false,
                        qp.offset(r0 as isize * qs),
                        qs,
                        1,
                        kp,
                        1,
                        ks,
                        scale,
                        false,
                    );
                }
                for (i, row) in pb.chunks_mut(tk).enumerate() {
                    let valid = visible(r0 + i + 1, off, tk);
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
                // SAFETY: task (bi, hi) writes only rows of batch bi, columns hi·D..(hi+1)·D.
                unsafe {
                    // O_h[r0..r1] = P[r0..r1, ..cols]·V_g[..cols]
                    gemm_raw(
                        r1 - r0,
                        d,
                        cols,
                        op.0.add((bi * tq + r0) * h * d + hi * d),
                        qs,
                        false,
                        pb.as_ptr(),
                        tk as isize,
                        1,
                        vp,
                        ks,
                        1,
                        T::one(),
                        false,
                    );
                }
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
    let off = tk - tq;
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
            let first = hi == g * group;
            // Row blocks: dP, dS and dQ over the keys the rows see.
            for r0 in (0..tq).step_by(BLOCK) {
                let r1 = (r0 + BLOCK).min(tq);
                let cols = visible(r1, off, tk);
                let dsb = &mut ds[r0 * tk..r1 * tk];
                // SAFETY (all gemms below): strided extents inside the buffers; this task
                // alone writes rows of batch bi in columns of head hi (d_q) and group g
                // (d_k, d_v).
                unsafe {
                    // dP = dO_h[r0..r1]·V_g[..cols]ᵀ
                    gemm_raw(
                        r1 - r0,
                        cols,
                        d,
                        dsb.as_mut_ptr(),
                        tk as isize,
                        false,
                        d_out[q_base + r0 * h * d..].as_ptr(),
                        qs,
                        1,
                        v[kv_base..].as_ptr(),
                        1,
                        ks,
                        T::one(),
                        false,
                    );
                }
                for (dsr, pr) in dsb.chunks_mut(tk).zip(p[r0 * tk..r1 * tk].chunks(tk)) {
                    let dot: T = dsr[..cols]
                        .iter()
                        .zip(&pr[..cols])
                        .map(|(&a, &b)| a * b)
                        .sum();
                    for (x, &pv) in dsr[..cols].iter_mut().zip(&pr[..cols]) {
                        *x = pv * (*x - dot);
                    }
                    // dS is zero where P is (masked keys): the column blocks below read it.
                    dsr[cols..].iter_mut().for_each(|x| *x = T::zero());
                }
                unsafe {
                    // dQ_h[r0..r1] = σ · dS[r0..r1, ..cols] · K_g[..cols]
                    gemm_raw(
                        r1 - r0,
                        d,
                        cols,
                        dqp.0.add(q_base + r0 * h * d),
                        qs,
                        false,
                        dsb.as_ptr(),
                        tk as isize,
                        1,
                        k[kv_base..].as_ptr(),
                        ks,
                        1,
                        scale,
                        false,
                    );
                }
            }
            // Column blocks: dV and dK rows c0..c1 from the queries that see them (i ≥ c0 − off).
            for c0 in (0..tk).step_by(BLOCK) {
                let c1 = (c0 + BLOCK).min(tk);
                let i0 = c0.saturating_sub(off).min(tq);
                unsafe {
                    // dV_g[c0..c1] += P[i0.., c0..c1]ᵀ · dO_h[i0..]
                    gemm_raw(
                        c1 - c0,
                        d,
                        tq - i0,
                        dvp.0.add(kv_base + c0 * hkv * d),
                        ks,
                        !first,
                        p[i0 * tk + c0..].as_ptr(),
                        1,
                        tk as isize,
                        d_out[q_base + i0 * h * d..].as_ptr(),
                        qs,
                        1,
                        T::one(),
                        false,
                    );
                    // dK_g[c0..c1] += σ · dS[i0.., c0..c1]ᵀ · Q_h[i0..]
                    gemm_raw(
                        c1 - c0,
                        d,
                        tq - i0,
                        dkp.0.add(kv_base + c0 * hkv * d),
                        ks,
                        !first,
                        ds[i0 * tk + c0..].as_ptr(),
                        1,
                        tk as isize,
                        q[q_base + i0 * h * d..].as_ptr(),
                        qs,
                        1,
                        scale,
                        false,
                    );
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain definition, in f64, one (batch, head) at a time over the full square.
    #[allow(clippy::type_complexity)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d_out: &[f32],
        dm: AttnDims,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let AttnDims {
            b,
            tq,
            tk,
            kv_rows,
            h,
            hkv,
            d,
        } = dm;
        let (off, group, sc) = (tk - tq, h / hkv, 1.0 / (d as f64).sqrt());
        let qi = |bi: usize, t: usize, hi: usize, e: usize| (bi * tq + t) * h * d + hi * d + e;
        let ki = |bi: usize, t: usize, g: usize, e: usize| (bi * kv_rows + t) * hkv * d + g * d + e;
        let mut out = vec![0f64; q.len()];
        let (mut dq, mut dk, mut dv) = (
            vec![0f64; q.len()],
            vec![0f64; k.len()],
            vec![0f64; v.len()],
        );
        for bi in 0..b {
            for hi in 0..h {
                let g = hi / group;
                for i in 0..tq {
                    let valid = (i + off + 1).min(tk);
                    let s: Vec<f64> = (0..valid)
                        .map(|j| {
                            (0..d)
                                .map(|e| q[qi(bi, i, hi, e)] as f64 * k[ki(bi, j, g, e)] as f64)
                                .sum::<f64>()
                                * sc
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    let p: Vec<f64> = s.iter().map(|x| (x - m).exp() / z).collect();
                    let dp: Vec<f64> = (0..valid)
                        .map(|j| {
                            (0..d)
                                .map(|e| d_out[qi(bi, i, hi, e)] as f64 * v[ki(bi, j, g, e)] as f64)
                                .sum()
                        })
                        .collect();
                    let dot: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                    for j in 0..valid {
                        let ds = p[j] * (dp[j] - dot) * sc;
                        for e in 0..d {
                            out[qi(bi, i, hi, e)] += p[j] * v[ki(bi, j, g, e)] as f64;
                            dv[ki(bi, j, g, e)] += p[j] * d_out[qi(bi, i, hi, e)] as f64;
                            dq[qi(bi, i, hi, e)] += ds * k[ki(bi, j, g, e)] as f64;
                            dk[ki(bi, j, g, e)] += ds * q[qi(bi, i, hi, e)] as f64;
                        }
                    }
                }
            }
        }
        (out, dq, dk, dv)
    }

    /// Several row and column blocks (ragged last block), with and without a key offset
    /// (tk > tq), GQA: forward and every gradient against the f64 definition.
    #[test]
    fn blocked_causal_attention_matches_the_full_square() {
        for &(tq, tk) in &[(150usize, 150usize), (130, 150), (64, 64), (65, 65)] {
            let dm = AttnDims {
                b: 2,
                tq,
                tk,
                kv_rows: tk,
                h: 4,
                hkv: 2,
                d: 32,
            };
            let gen = |n: usize, seed: u64| -> Vec<f32> {
                (0..n)
                    .map(|i| {
                        let z = crate::cpu::splitmix64(seed ^ crate::cpu::splitmix64(i as u64));
                        (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                    })
                    .collect()
            };
            let nq = dm.b * tq * dm.h * dm.d;
            let nk = dm.b * tk * dm.hkv * dm.d;
            let (q, k, v, d_out) = (gen(nq, 1), gen(nk, 2), gen(nk, 3), gen(nq, 4));
            let mut out = vec![0f32; nq];
            let mut saved = vec![0f32; saved_len(dm)];
            fwd(&mut out, &mut saved, &q, &k, &v, dm);
            let (mut dq, mut dk, mut dv) = (vec![0f32; nq], vec![1f32; nk], vec![1f32; nk]);
            bwd(&mut dq, &mut dk, &mut dv, &d_out, &saved, &q, &k, &v, dm);
            let (ro, rdq, rdk, rdv) = reference(&q, &k, &v, &d_out, dm);
            for (what, got, want) in [
                ("out", &out, &ro),
                ("dq", &dq, &rdq),
                ("dk", &dk, &rdk),
                ("dv", &dv, &rdv),
            ] {
                let err = got
                    .iter()
                    .zip(want.iter())
                    .map(|(&g, &w)| (g as f64 - w).abs())
                    .fold(0f64, f64::max);
                assert!(err < 2e-5, "tq {tq} tk {tk}: {what} differs by {err:e}");
            }
        }
    }
}
