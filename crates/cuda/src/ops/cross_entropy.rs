//! Fused lm_head + cross entropy over token chunks (`cuda/cross_entropy.cu` + cuBLASLt):
//! T×V logits never exist at once, only `chunk × V` of them.

use super::{check_float, check_len, check_len_mut, dim_i32, entry};
use crate::blas::GemmShape;
use crate::device::{Args, Device, Elem, Geometry, View, ViewMut};
use crate::error::{bad_arg, Result};

const FILE: &str = "cross_entropy.cu";

/// One 256-thread block per row of the logits chunk.
pub fn geometry(rows: usize) -> Geometry {
    Geometry {
        grid: (rows.max(1) as u32, 1, 1),
        block: (256, 1, 1),
        smem: 0,
    }
}

/// Row ranges of the chunks: `[(start, len)]` covering `rows` in order.
pub fn chunks(rows: usize, chunk: usize) -> Vec<(usize, usize)> {
    (0..rows)
        .step_by(chunk.max(1))
        .map(|s| (s, chunk.max(1).min(rows - s)))
        .collect()
}

/// Row-wise forward over materialised logits: `loss (rows,) f32` per row (0 for an ignored
/// row: label < 0 or ≥ V), saved `lse (rows,) f32`; `logits (rows, V) T`, `labels (rows,) i32`.
pub fn fwd<T: Elem>(
    dev: &Device,
    loss: &mut ViewMut<'_, f32>,
    lse: &mut ViewMut<'_, f32>,
    logits: &View<'_, T>,
    labels: &View<'_, i32>,
    v: usize,
) -> Result<()> {
    const OP: &str = "cross_entropy::fwd";
    check_float::<T>(OP)?;
    let rows = labels.len();
    check_len_mut(OP, "loss", loss, rows)?;
    check_len_mut(OP, "lse", lse, rows)?;
    check_len(OP, "logits", logits, rows * v)?;
    let args = Args::new()
        .ptr_mut(loss)
        .ptr_mut(lse)
        .ptr(logits)
        .ptr(labels)
        .arg(dim_i32(OP, "V", v)?);
    dev.launch(
        FILE,
        &entry::<T>("qlr_cross_entropy_fwd"),
        geometry(rows),
        args,
        None,
    )
}

/// Row-wise backward IN PLACE over the logits: `z (rows, V) T` becomes
/// `grad_scale·(softmax(z) − onehot(label))`, 0 on ignored rows; `lse` from [`fwd`].
pub fn bwd<T: Elem>(
    dev: &Device,
    logits: &mut ViewMut<'_, T>,
    lse: &View<'_, f32>,
    labels: &View<'_, i32>,
    v: usize,
    grad_scale: f32,
) -> Result<()> {
    const OP: &str = "cross_entropy::bwd";
    check_float::<T>(OP)?;
    let rows = labels.len();
    check_len_mut(OP, "logits", logits, rows * v)?;
    check_len(OP, "lse", lse, rows)?;
    let args = Args::new()
        .ptr_mut(logits)
        .ptr(lse)
        .ptr(labels)
        .arg(dim_i32(OP, "V", v)?)
        .arg(grad_scale);
    dev.launch(
        FILE,
        &entry::<T>("qlr_cross_entropy_bwd"),
        geometry(rows),
        args,
        None,
    )
}

/// Loss and gradient in one pass over the chunks (the gradient is taken inside the forward, as
/// Unsloth's fused loss does). Outputs: `loss` (rows,) f32 per-row loss (0 for ignored rows),
/// `dh` (rows, C) T = ∂(grad_scale·Σ loss)/∂h; scratch: `logits` (chunk·V) T and `lse`
/// (chunk,) f32; inputs `h` (rows, C) T, `labels` (rows,) i32 (−100 = ignore), frozen `w_lm`
/// (V, C) T. `grad_scale` = dloss/n_valid for a mean loss (the caller counts valid labels).
#[allow(clippy::too_many_arguments)]
pub fn fused<T: Elem>(
    dev: &Device,
    loss: &mut ViewMut<'_, f32>,
    dh: &mut ViewMut<'_, T>,
    logits: &mut ViewMut<'_, T>,
    lse: &mut ViewMut<'_, f32>,
    h: &View<'_, T>,
    labels: &View<'_, i32>,
    w_lm: &View<'_, T>,
    rows: usize,
    c: usize,
    v: usize,
    grad_scale: f32,
) -> Result<()> {
    const OP: &str = "cross_entropy::fused";
    check_float::<T>(OP)?;
    let chunk = lse.len();
    if chunk == 0 || logits.len() != chunk * v {
        return Err(bad_arg(
            OP,
            "logits",
            format!(
                "scratch of {} elements does not hold {chunk} rows of {v}",
                logits.len()
            ),
        ));
    }
    check_len_mut(OP, "loss", loss, rows)?;
    check_len_mut(OP, "dh", dh, rows * c)?;
    check_len(OP, "h", h, rows * c)?;
    check_len(OP, "labels", labels, rows)?;
    check_len(OP, "w_lm", w_lm, v * c)?;
    let vi = dim_i32(OP, "V", v)?;
    for (s, n) in chunks(rows, chunk) {
        let mut z = logits.slice_mut(0, n * v);
        let hc = h.slice(s * c, n * c);
        // z (n, V) = h_c · w_lmᵀ
        dev.with_blas(|b| {
            b.gemm(
                dev,
                &mut z,
                &hc,
                w_lm,
                GemmShape {
                    m: n,
                    n: v,
                    k: c,
                    a_trans: false,
                    b_trans: true,
                },
                1.0,
                0.0,
            )
        })?;
        let lab = labels.slice(s, n);
        let loss_c = loss.slice_mut(s, n);
        let lse_c = lse.slice_mut(0, n);
        let args = Args::new()
            .ptr_mut(&loss_c)
            .ptr_mut(&lse_c)
            .ptr(&z.as_view())
            .ptr(&lab)
            .arg(vi);
        dev.launch(
            FILE,
            &entry::<T>("qlr_cross_entropy_fwd"),
            geometry(n),
            args,
            None,
        )?;
        let args = Args::new()
            .ptr_mut(&z)
            .ptr(&lse_c.as_view())
            .ptr(&lab)
            .arg(vi)
            .arg(grad_scale);
        dev.launch(
            FILE,
            &entry::<T>("qlr_cross_entropy_bwd"),
            geometry(n),
            args,
            None,
        )?;
        // dh_c (n, C) = dz · w_lm
        let mut dhc = dh.slice_mut(s * c, n * c);
        let zv = z.as_view();
        dev.with_blas(|b| {
            b.gemm(
                dev,
                &mut dhc,
                &zv,
                w_lm,
                GemmShape {
                    m: n,
                    n: c,
                    k: v,
                    a_trans: false,
                    b_trans: false,
                },
                1.0,
                0.0,
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn chunks_cover_rows_in_order() {
        assert_eq!(super::chunks(10, 4), vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(super::chunks(4, 4), vec![(0, 4)]);
        assert!(super::chunks(0, 4).is_empty());
    }
}
