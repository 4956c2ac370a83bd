//! SwiGLU (`cuda/swiglu.cu`): `h = silu(e)·g`; the backward recomputes σ(e).

use super::{check_float, check_len, check_len_mut, entry};
use crate::device::{cdiv, Args, Device, Elem, Geometry, Stream, View, ViewMut};
use crate::error::Result;

const FILE: &str = "swiglu.cu";

/// Grid-stride elementwise: 256 threads, at most 8 blocks per SM's worth (`sm_count·8`).
pub fn geometry(n: usize, sm_count: u32) -> Geometry {
    let blocks = cdiv(n, 256).clamp(1, (sm_count as usize * 8).max(1));
    Geometry {
        grid: (blocks as u32, 1, 1),
        block: (256, 1, 1),
        smem: 0,
    }
}

/// `h = e·σ(e)·g`, all (n,) T; `h` may alias `e` or `g`.
pub fn fwd<T: Elem>(
    dev: &Device,
    h: &mut ViewMut<'_, T>,
    e: &View<'_, T>,
    g: &View<'_, T>,
    stream: Option<&Stream>,
) -> Result<()> {
    const OP: &str = "swiglu::fwd";
    check_float::<T>(OP)?;
    let n = e.len();
    check_len_mut(OP, "h", h, n)?;
    check_len(OP, "g", g, n)?;
    let args = Args::new().ptr_mut(h).ptr(e).ptr(g).arg(n as i64);
    dev.launch(
        FILE,
        &entry::<T>("qlr_swiglu_fwd"),
        geometry(n, dev.sm_count()),
        args,
        stream,
    )
}

/// `de = dh·g·σ(e)(1 + e(1−σ(e)))`, `dg = dh·e·σ(e)`. `de` may alias `e`, `dg` may alias `g`.
#[allow(clippy::too_many_arguments)]
pub fn bwd<T: Elem>(
    dev: &Device,
    de: &mut ViewMut<'_, T>,
    dg: &mut ViewMut<'_, T>,
    dh: &View<'_, T>,
    e: &View<'_, T>,
    g: &View<'_, T>,
    stream: Option<&Stream>,
) -> Result<()> {
    const OP: &str = "swiglu::bwd";
    check_float::<T>(OP)?;
    let n = dh.len();
    check_len_mut(OP, "de", de, n)?;
    check_len_mut(OP, "dg", dg, n)?;
    check_len(OP, "e", e, n)?;
    check_len(OP, "g", g, n)?;
    let args = Args::new()
        .ptr_mut(de)
        .ptr_mut(dg)
        .ptr(dh)
        .ptr(e)
        .ptr(g)
        .arg(n as i64);
    dev.launch(
        FILE,
        &entry::<T>("qlr_swiglu_bwd"),
        geometry(n, dev.sm_count()),
        args,
        stream,
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn grid_is_capped_and_nonzero() {
        assert_eq!(super::geometry(0, 132).grid.0, 1);
        assert_eq!(super::geometry(1000, 132).grid.0, 4);
        assert_eq!(super::geometry(1 << 30, 132).grid.0, 132 * 8);
    }
}
