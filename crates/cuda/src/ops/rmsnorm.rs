//! RMSNorm (`cuda/rmsnorm.cu`): fwd saves rstd (rows,) f32; bwd gives dx only (frozen g).

use super::{check_float, check_len, check_len_mut, dim_i32, entry};
use crate::device::{Args, Device, Elem, Geometry, Stream, View, ViewMut};
use crate::error::Result;

const FILE: &str = "rmsnorm.cu";

/// One 256-thread block per row.
pub fn geometry(rows: usize) -> Geometry {
    Geometry {
        grid: (rows.max(1) as u32, 1, 1),
        block: (256, 1, 1),
        smem: 0,
    }
}

/// `y (rows, C) = x · rstd · g`; saved `rstd (rows,) f32`. `y` may alias `x`.
#[allow(clippy::too_many_arguments)]
pub fn fwd<T: Elem>(
    dev: &Device,
    y: &mut ViewMut<'_, T>,
    rstd: &mut ViewMut<'_, f32>,
    x: &View<'_, T>,
    g: &View<'_, T>,
    rows: usize,
    c: usize,
    eps: f32,
    stream: Option<&Stream>,
) -> Result<()> {
    const OP: &str = "rmsnorm::fwd";
    check_float::<T>(OP)?;
    check_len_mut(OP, "y", y, rows * c)?;
    check_len_mut(OP, "rstd", rstd, rows)?;
    check_len(OP, "x", x, rows * c)?;
    check_len(OP, "g", g, c)?;
    let args = Args::new()
        .ptr_mut(y)
        .ptr_mut(rstd)
        .ptr(x)
        .ptr(g)
        .arg(dim_i32(OP, "C", c)?)
        .arg(eps);
    dev.launch(
        FILE,
        &entry::<T>("qlr_rmsnorm_fwd"),
        geometry(rows),
        args,
        stream,
    )
}

/// `dx = rstd · (dy·g − x̂ · mean(dy·g·x̂))`. `dx` may alias `dy`.
#[allow(clippy::too_many_arguments)]
pub fn bwd<T: Elem>(
    dev: &Device,
    dx: &mut ViewMut<'_, T>,
    dy: &View<'_, T>,
    x: &View<'_, T>,
    rstd: &View<'_, f32>,
    g: &View<'_, T>,
    rows: usize,
    c: usize,
    stream: Option<&Stream>,
) -> Result<()> {
    const OP: &str = "rmsnorm::bwd";
    check_float::<T>(OP)?;
    check_len_mut(OP, "dx", dx, rows * c)?;
    check_len(OP, "dy", dy, rows * c)?;
    check_len(OP, "x", x, rows * c)?;
    check_len(OP, "rstd", rstd, rows)?;
    check_len(OP, "g", g, c)?;
    let args = Args::new()
        .ptr_mut(dx)
        .ptr(dy)
        .ptr(x)
        .ptr(rstd)
        .ptr(g)
        .arg(dim_i32(OP, "C", c)?);
    dev.launch(
        FILE,
        &entry::<T>("qlr_rmsnorm_bwd"),
        geometry(rows),
        args,
        stream,
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_block_per_row() {
        assert_eq!(super::geometry(4096).grid, (4096, 1, 1));
        assert_eq!(super::geometry(0).grid, (1, 1, 1));
    }
}
