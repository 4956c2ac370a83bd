//! Glue ops of the training backend (`cuda/elementwise.cu`): dtype casts, LoRA dropout (the
//! CPU backend's mask, bit for bit) and the bias add.

use super::{check_float, check_len, check_len_mut, dim_i32, entry};
use crate::device::{Args, Device, Elem, Stream, View, ViewMut};
use crate::error::{bad_arg, Result};

const FILE: &str = "elementwise.cu";
pub use super::swiglu::geometry;

/// `y (n,) D = x (n,) S` for the two float types (bf16 → f32 exact, f32 → bf16 rounded to
/// nearest even). `D` names the kernel; `S` must be the other float type.
pub fn cast<D: Elem, S: Elem>(
    dev: &Device,
    y: &mut ViewMut<'_, D>,
    x: &View<'_, S>,
    stream: Option<&Stream>,
) -> Result<()> {
    const OP: &str = "elementwise::cast";
    check_float::<D>(OP)?;
    check_float::<S>(OP)?;
    if D::SUFFIX == S::SUFFIX {
        return Err(bad_arg(
            OP,
            "x",
            format!("already {} (a cast needs the other float type)", S::SUFFIX),
        ));
    }
    let n = x.len();
    check_len_mut(OP, "y", y, n)?;
    let args = Args::new().ptr_mut(y).ptr(x).arg(n as i64);
    dev.launch(
        FILE,
        &entry::<D>("qlr_elementwise_cast_fwd"),
        geometry(n, dev.sm_count()),
        args,
        stream,
    )
}

/// The f32 keep-scale `1/(1−p)` as the CPU backend rounds it (`f64` division, then `f32`).
pub fn keep_scale(p: f64) -> f32 {
    (1.0 / (1.0 - p)) as f32
}

fn check_p(op: &str, p: f64) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(bad_arg(
            op,
            "p",
            format!("dropout probability {p} outside [0, 1)"),
        ));
    }
    Ok(())
}

/// `y = x ⊙ m(seed, i)` over the flat index i; `y` may alias `x`.
pub fn dropout_fwd<T: Elem>(
    dev: &Device,
    y: &mut ViewMut<'_, T>,
    x: &View<'_, T>,
    seed: u64,
    p: f64,
    stream: Option<&Stream>,
) -> Result<()> {
    const OP: &str = "elementwise::dropout_fwd";
    check_float::<T>(OP)?;
    check_p(OP, p)?;
    let n = x.len();
    check_len_mut(OP, "y", y, n)?;
    let args = Args::new()
        .ptr_mut(y)
        .ptr(x)
        .arg(n as i64)
        .arg(seed)
        .arg(p)
        .arg(keep_scale(p));
    dev.launch(
        FILE,
        &entry::<T>("qlr_elementwise_dropout_fwd"),
        geometry(n, dev.sm_count()),
        args,
        stream,
    )
}

/// `y += t ⊙ m(seed, i)` (the dropout's backward added into an input gradient).
pub fn dropout_bwd_acc<T: Elem>(
    dev: &Device,
    y: &mut ViewMut<'_, T>,
    t: &View<'_, T>,
    seed: u64,
    p: f64,
    stream: Option<&Stream>,
) -> Result<()> {
    const OP: &str = "elementwise::dropout_bwd_acc";
    check_float::<T>(OP)?;
    check_p(OP, p)?;
    let n = t.len();
    check_len_mut(OP, "y", y, n)?;
    let args = Args::new()
        .ptr_mut(y)
        .ptr(t)
        .arg(n as i64)
        .arg(seed)
        .arg(p)
        .arg(keep_scale(p));
    dev.launch(
        FILE,
        &entry::<T>("qlr_elementwise_dropout_bwd_acc"),
        geometry(n, dev.sm_count()),
        args,
        stream,
    )
}

/// `y (rows, n) += b (n,)` broadcast over rows.
pub fn bias_fwd<T: Elem>(
    dev: &Device,
    y: &mut ViewMut<'_, T>,
    b: &View<'_, T>,
    rows: usize,
    stream: Option<&Stream>,
) -> Result<()> {
    const OP: &str = "elementwise::bias_fwd";
    check_float::<T>(OP)?;
    let n = b.len();
    check_len_mut(OP, "y", y, rows * n)?;
    check_len(OP, "b", b, n)?;
    let args = Args::new()
        .ptr_mut(y)
        .ptr(b)
        .arg(rows as i64)
        .arg(dim_i32(OP, "n", n)?);
    dev.launch(
        FILE,
        &entry::<T>("qlr_elementwise_bias_fwd"),
        geometry(rows * n, dev.sm_count()),
        args,
        stream,
    )
}

/// Number of NaN/Inf elements of `x` (waits for the stream: one `i32` read back).
pub fn nonfinite_count(dev: &Device, x: &View<'_, f32>, stream: Option<&Stream>) -> Result<usize> {
    const OP: &str = "elementwise::nonfinite_count";
    let n = x.len();
    let mut count = dev.zeros::<i32>(1, "nonfinite count")?;
    let args = Args::new().ptr_mut(&count.view_mut()).ptr(x).arg(n as i64);
    dev.launch(
        FILE,
        "qlr_elementwise_nonfinite_count_f32",
        geometry(n, dev.sm_count()),
        args,
        stream,
    )?;
    if let Some(s) = stream {
        s.synchronize()?;
    }
    let c = dev.download(&count.view())?[0];
    usize::try_from(c).map_err(|_| bad_arg(OP, "count", format!("{c} is negative")))
}
