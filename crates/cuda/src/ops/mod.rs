//! One typed launcher per kernel. Argument order (design §6): outputs, saved-for-backward,
//! inputs, weights, dims, stream. Every launch geometry is a pure function tested on the CPU.

pub mod attention;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
pub mod linear;
pub mod nf4;
pub mod residual;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

use crate::device::{Elem, View, ViewMut};
use crate::error::{bad_arg, Result};

/// Check that a view holds exactly `want` elements.
pub(crate) fn check_len<T: Elem>(op: &str, name: &str, v: &View<'_, T>, want: usize) -> Result<()> {
    if v.len() != want {
        return Err(bad_arg(
            op,
            name,
            format!("has {} elements, the dims need {want}", v.len()),
        ));
    }
    Ok(())
}
pub(crate) fn check_len_mut<T: Elem>(
    op: &str,
    name: &str,
    v: &ViewMut<'_, T>,
    want: usize,
) -> Result<()> {
    if v.len() != want {
        return Err(bad_arg(
            op,
            name,
            format!("has {} elements, the dims need {want}", v.len()),
        ));
    }
    Ok(())
}
/// `i32` kernel argument from a dimension, refusing overflow.
pub(crate) fn dim_i32(op: &str, name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| bad_arg(op, name, format!("{v} does not fit in i32")))
}
/// Kernel entry name: `qlr_<op>_<dir>_<dtype>`.
pub(crate) fn entry<T: Elem>(stem: &str) -> String {
    format!("{stem}_{}", T::SUFFIX)
}
/// Only f32 and bf16 are kernel dtypes.
pub(crate) fn check_float<T: Elem>(op: &str) -> Result<()> {
    match T::SUFFIX {
        "f32" | "bf16" => Ok(()),
        other => Err(bad_arg(
            op,
            "dtype",
            format!("{other} is not a kernel dtype (f32, bf16)"),
        )),
    }
}
