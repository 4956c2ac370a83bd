//! Residual add (`cuda/residual.cu`). Its backward is the identity; `bwd_acc` adds a branch
//! gradient into the residual-stream gradient.

use super::{check_float, check_len, check_len_mut, entry};
use crate::device::{Args, Device, Elem, Stream, View, ViewMut};
use crate::error::Result;

const FILE: &str = "residual.cu";
pub use super::swiglu::geometry;

/// `y = a + b` (n,) T. For the in-place `h += x` use [`fwd_inplace`] (Rust borrows forbid
/// passing `h` as both `y` and `a`; the kernel itself allows that aliasing).
pub fn fwd<T: Elem>(
    dev: &Device,
    y: &mut ViewMut<'_, T>,
    a: &View<'_, T>,
    b: &View<'_, T>,
    stream: Option<&Stream>,
) -> Result<()> {
    const OP: &str = "residual::fwd";
    check_float::<T>(OP)?;
    let n = a.len();
    check_len_mut(OP, "y", y, n)?;
    check_len(OP, "b", b, n)?;
    let args = Args::new().ptr_mut(y).ptr(a).ptr(b).arg(n as i64);
    dev.launch(
        FILE,
        &entry::<T>("qlr_residual_fwd"),
        geometry(n, dev.sm_count()),
        args,
        stream,
    )
}

/// `h += x` in place (the same kernel as `bwd_acc`: an accumulate of `x` into `h`).
pub fn fwd_inplace<T: Elem>(
    dev: &Device,
    h: &mut ViewMut<'_, T>,
    x: &View<'_, T>,
    stream: Option<&Stream>,
) -> Result<()> {
    bwd_acc(dev, h, x, stream)
}

/// `dh += d` (n,) T.
pub fn bwd_acc<T: Elem>(
    dev: &Device,
    dh: &mut ViewMut<'_, T>,
    d: &View<'_, T>,
    stream: Option<&Stream>,
) -> Result<()> {
    const OP: &str = "residual::bwd_acc";
    check_float::<T>(OP)?;
    let n = dh.len();
    check_len(OP, "d", d, n)?;
    let args = Args::new().ptr_mut(dh).ptr(d).arg(n as i64);
    dev.launch(
        FILE,
        &entry::<T>("qlr_residual_bwd_acc"),
        geometry(n, dev.sm_count()),
        args,
        stream,
    )
}
