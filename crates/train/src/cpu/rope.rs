//! Rotary position embedding as transformers' `apply_rotary_pos_emb` with `rotate_half`:
//! for `i < D/2`, with `c = cos(pos·f_i)`, `s = sin(pos·f_i)`:
//! fwd `y_i = x_i·c − x_{i+D/2}·s`, `y_{i+D/2} = x_{i+D/2}·c + x_i·s` (a rotation by θ);
//! bwd is the transpose (rotation by −θ): `dx_i = dy_i·c + dy_{i+D/2}·s`,
//! `dx_{i+D/2} = dy_{i+D/2}·c − dy_i·s`. Nothing is saved but the table.

use rayon::prelude::*;

use super::Real;
use crate::backend::RopeDims;

fn apply<T: Real>(x: &mut [T], table: &[T], dims: RopeDims, sign: T) {
    let RopeDims {
        b,
        t,
        heads,
        d,
        pos_offset,
    } = dims;
    let row = heads * d;
    let half = d / 2;
    assert!(x.len() == b * t * row && table.len() >= (pos_offset + t) * d);
    x.par_chunks_mut(row).enumerate().for_each(|(r, xr)| {
        let pos = pos_offset + r % t;
        let cs = &table[pos * d..pos * d + half];
        let sn = &table[pos * d + half..pos * d + d];
        for xh in xr.chunks_mut(d) {
            let (lo, hi) = xh.split_at_mut(half);
            for i in 0..half {
                let (a, bb) = (lo[i], hi[i]);
                let s = sign * sn[i];
                lo[i] = a * cs[i] - bb * s;
                hi[i] = bb * cs[i] + a * s;
            }
        }
    });
}

/// Rotate `x (B·T, heads·D)` in place; `table (P, D)` = per position D/2 cos then D/2 sin.
pub fn fwd<T: Real>(x: &mut [T], table: &[T], dims: RopeDims) {
    apply(x, table, dims, T::one())
}

/// Apply the transpose rotation to `d_x (B·T, heads·D)` in place.
pub fn bwd<T: Real>(d_x: &mut [T], table: &[T], dims: RopeDims) {
    apply(d_x, table, dims, -T::one())
}

/// The rope table `(P, D)` in f32 for positions `0..p`, as transformers computes it: the angle
/// `f32(pos) · f32(inv_freq)` rounded to f32, then cos/sin of that f32 angle.
pub fn table_f32(inv_freq: &[f64], p: usize) -> Vec<f32> {
    let half = inv_freq.len();
    let d = 2 * half;
    let mut t = vec![0f32; p * d];
    for pos in 0..p {
        for (i, &f) in inv_freq.iter().enumerate() {
            let ang = (pos as f32 * f as f32) as f64;
            t[pos * d + i] = ang.cos() as f32;
            t[pos * d + half + i] = ang.sin() as f32;
        }
    }
    t
}
