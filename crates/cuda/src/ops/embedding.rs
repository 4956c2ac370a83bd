//! Embedding lookup and scatter-add gradient (`cuda/embedding.cu`).

use super::{check_float, check_len, check_len_mut, dim_i32, entry};
use crate::device::{Args, Device, Elem, Geometry, Stream, View, ViewMut};
use crate::error::{CudaError, Result};

const FILE: &str = "embedding.cu";

/// One 256-thread block per token row.
pub fn geometry(rows: usize) -> Geometry {
    Geometry {
        grid: (rows.max(1) as u32, 1, 1),
        block: (256, 1, 1),
        smem: 0,
    }
}

/// `out (rows, C) = table[ids]`, table (V, C). Checks the ids on the device and returns
/// `CudaError::BadArg` naming the count of out-of-range ids (this waits for the stream).
#[allow(clippy::too_many_arguments)]
pub fn fwd<T: Elem>(
    dev: &Device,
    out: &mut ViewMut<'_, T>,
    ids: &View<'_, i32>,
    table: &View<'_, T>,
    v: usize,
    c: usize,
    stream: Option<&Stream>,
) -> Result<()> {
    const OP: &str = "embedding::fwd";
    check_float::<T>(OP)?;
    let rows = ids.len();
    check_len_mut(OP, "out", out, rows * c)?;
    check_len(OP, "table", table, v * c)?;
    let mut bad = dev.zeros::<i32>(1, "embedding id check")?;
    let args = Args::new()
        .ptr_mut(out)
        .ptr_mut(&bad.view_mut())
        .ptr(ids)
        .ptr(table)
        .arg(dim_i32(OP, "V", v)?)
        .arg(dim_i32(OP, "C", c)?);
    dev.launch(
        FILE,
        &entry::<T>("qlr_embedding_fwd"),
        geometry(rows),
        args,
        stream,
    )?;
    if let Some(s) = stream {
        s.synchronize()?;
    }
    let n_bad = dev.download(&bad.view())?[0];
    if n_bad != 0 {
        return Err(CudaError::BadArg {
            op: OP.into(),
            arg: "ids".into(),
            msg: format!("{n_bad} token id(s) outside the vocabulary of {v}"),
        });
    }
    Ok(())
}

/// `d_table[ids[row]] += d_out[row]`, d_table (V, C) f32 (accumulating; zero it per step).
#[allow(clippy::too_many_arguments)]
pub fn bwd_acc<T: Elem>(
    dev: &Device,
    d_table: &mut ViewMut<'_, f32>,
    ids: &View<'_, i32>,
    d_out: &View<'_, T>,
    v: usize,
    c: usize,
    stream: Option<&Stream>,
) -> Result<()> {
    const OP: &str = "embedding::bwd_acc";
    check_float::<T>(OP)?;
    let rows = ids.len();
    check_len_mut(OP, "d_table", d_table, v * c)?;
    check_len(OP, "d_out", d_out, rows * c)?;
    let args = Args::new()
        .ptr_mut(d_table)
        .ptr(ids)
        .ptr(d_out)
        .arg(dim_i32(OP, "V", v)?)
        .arg(dim_i32(OP, "C", c)?);
    dev.launch(
        FILE,
        &entry::<T>("qlr_embedding_bwd_acc"),
        geometry(rows),
        args,
        stream,
    )
}
