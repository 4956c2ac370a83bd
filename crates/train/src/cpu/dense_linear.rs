//! A trainable dense linear (the modules_to_save copy of `lm_head`): fwd `y = x·Wᵀ`;
//! bwd `d_x = d_y·W`, `dW += d_yᵀ·x` (W lives in the adapter arena, so it gets a gradient).

use super::{mm_nn, mm_nt, mm_tn, Real};
use crate::backend::LinearDims;

/// Trainable dense linear fwd: `y (N, out) = x (N, in) · W (out, in)ᵀ`.
pub fn fwd<T: Real>(y: &mut [T], x: &[T], w: &[T], dims: LinearDims) {
    mm_nt(
        y,
        x,
        w,
        dims.n,
        dims.out_features,
        dims.in_features,
        T::one(),
        false,
    );
}

/// Trainable dense linear bwd: `d_x = d_y·W` (overwritten), `d_w (out, in) += d_yᵀ·x`.
pub fn bwd_acc_dw<T: Real>(
    d_x: &mut [T],
    d_w: &mut [T],
    d_y: &[T],
    x: &[T],
    w: &[T],
    dims: LinearDims,
) {
    let LinearDims {
        n,
        in_features: i,
        out_features: o,
    } = dims;
    mm_nn(d_x, d_y, w, n, i, o, T::one(), false);
    mm_tn(d_w, d_y, x, o, i, n, T::one(), true);
}
