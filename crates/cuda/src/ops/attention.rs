//! Causal GQA attention (`cuda/attention.cu`): fwd saves o and lse; bwd runs delta, dq, dkv.

use super::{check_float, check_len, check_len_mut, dim_i32, entry};
use crate::device::{cdiv, Args, Device, Elem, Geometry, Stream, View, ViewMut};
use crate::error::{bad_arg, Result};

const FILE: &str = "attention.cu";
/// Largest head dim the kernels hold per warp (4 dims per lane).
pub const MAX_HEAD_DIM: usize = 128;
/// Rows (query or key) per 256-thread block: one warp each.
const ROWS_PER_BLOCK: usize = 8;

/// B batch, T seq, H query heads, Hkv kv heads, D head dim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub hkv: usize,
    pub d: usize,
}

/// Mirrors `struct QlrAttn` in cuda/attention.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AttnArg {
    b: i32,
    t: i32,
    h: i32,
    hkv: i32,
    d: i32,
    scale: f32,
}

/// fwd and dq: grid (T/8 query blocks, B·H); dkv: (T/8 key blocks, B·Hkv); delta: B·T·H/8.
pub fn geometry_rows(t: usize, bh: usize) -> Geometry {
    Geometry {
        grid: (cdiv(t, ROWS_PER_BLOCK).max(1) as u32, bh.max(1) as u32, 1),
        block: (256, 1, 1),
        smem: 0,
    }
}
pub fn geometry_delta(rows: usize) -> Geometry {
    Geometry {
        grid: (cdiv(rows, ROWS_PER_BLOCK).max(1) as u32, 1, 1),
        block: (256, 1, 1),
        smem: 0,
    }
}

fn check(op: &str, a: &AttnDims) -> Result<AttnArg> {
    if a.d == 0 || a.d > MAX_HEAD_DIM {
        return Err(bad_arg(
            op,
            "D",
            format!("head dim {} outside 1..={MAX_HEAD_DIM}", a.d),
        ));
    }
    if a.hkv == 0 || !a.h.is_multiple_of(a.hkv) {
        return Err(bad_arg(
            op,
            "Hkv",
            format!(
                "{} query heads are not a multiple of {} kv heads",
                a.h, a.hkv
            ),
        ));
    }
    if a.b * a.h > 65535 * 1024 || a.b * a.hkv == 0 {
        return Err(bad_arg(op, "B·H", "out of range"));
    }
    Ok(AttnArg {
        b: dim_i32(op, "B", a.b)?,
        t: dim_i32(op, "T", a.t)?,
        h: dim_i32(op, "H", a.h)?,
        hkv: dim_i32(op, "Hkv", a.hkv)?,
        d: dim_i32(op, "D", a.d)?,
        scale: 1.0 / (a.d as f32).sqrt(),
    })
}

/// Outputs `o` (B,T,H,D) T; saved `lse` (B,H,T) f32; inputs q (B,T,H,D), k, v (B,T,Hkv,D).
#[allow(clippy::too_many_arguments)]
pub fn fwd<T: Elem>(
    dev: &Device,
    o: &mut ViewMut<'_, T>,
    lse: &mut ViewMut<'_, f32>,
    q: &View<'_, T>,
    k: &View<'_, T>,
    v: &View<'_, T>,
    a: AttnDims,
    stream: Option<&Stream>,
) -> Result<()> {
    const OP: &str = "attention::fwd";
    check_float::<T>(OP)?;
    let arg = check(OP, &a)?;
    let (nq, nk) = (a.b * a.t * a.h * a.d, a.b * a.t * a.hkv * a.d);
    check_len_mut(OP, "o", o, nq)?;
    check_len_mut(OP, "lse", lse, a.b * a.h * a.t)?;
    check_len(OP, "q", q, nq)?;
    check_len(OP, "k", k, nk)?;
    check_len(OP, "v", v, nk)?;
    let args = Args::new()
        .ptr_mut(o)
        .ptr_mut(lse)
        .ptr(q)
        .ptr(k)
        .ptr(v)
        .arg(arg);
    dev.launch(
        FILE,
        &entry::<T>("qlr_attention_fwd"),
        geometry_rows(a.t, a.b * a.h),
        args,
        stream,
    )
}

/// Outputs `dq` (B,T,H,D), `dk`, `dv` (B,T,Hkv,D) T; scratch `delta` (B,H,T) f32; inputs `dout`,
/// saved `o`, `lse`, and q, k, v.
#[allow(clippy::too_many_arguments)]
pub fn bwd<T: Elem>(
    dev: &Device,
    dq: &mut ViewMut<'_, T>,
    dk: &mut ViewMut<'_, T>,
    dv: &mut ViewMut<'_, T>,
    delta: &mut ViewMut<'_, f32>,
    dout: &View<'_, T>,
    o: &View<'_, T>,
    lse: &View<'_, f32>,
    q: &View<'_, T>,
    k: &View<'_, T>,
    v: &View<'_, T>,
    a: AttnDims,
    stream: Option<&Stream>,
) -> Result<()> {
    const OP: &str = "attention::bwd";
    check_float::<T>(OP)?;
    let arg = check(OP, &a)?;
    let (nq, nk) = (a.b * a.t * a.h * a.d, a.b * a.t * a.hkv * a.d);
    check_len_mut(OP, "dq", dq, nq)?;
    check_len_mut(OP, "dk", dk, nk)?;
    check_len_mut(OP, "dv", dv, nk)?;
    check_len_mut(OP, "delta", delta, a.b * a.h * a.t)?;
    check_len(OP, "dout", dout, nq)?;
    check_len(OP, "o", o, nq)?;
    check_len(OP, "lse", lse, a.b * a.h * a.t)?;
    check_len(OP, "q", q, nq)?;
    check_len(OP, "k", k, nk)?;
    check_len(OP, "v", v, nk)?;
    let args = Args::new().ptr_mut(delta).ptr(dout).ptr(o).arg(arg);
    dev.launch(
        FILE,
        &entry::<T>("qlr_attention_bwd_delta"),
        geometry_delta(a.b * a.t * a.h),
        args,
        stream,
    )?;
    let dl = delta.as_view();
    let args = Args::new()
        .ptr_mut(dq)
        .ptr(q)
        .ptr(k)
        .ptr(v)
        .ptr(dout)
        .ptr(lse)
        .ptr(&dl)
        .arg(arg);
    dev.launch(
        FILE,
        &entry::<T>("qlr_attention_bwd_dq"),
        geometry_rows(a.t, a.b * a.h),
        args,
        stream,
    )?;
    let args = Args::new()
        .ptr_mut(dk)
        .ptr_mut(dv)
        .ptr(q)
        .ptr(k)
        .ptr(v)
        .ptr(dout)
        .ptr(lse)
        .ptr(&dl)
        .arg(arg);
    dev.launch(
        FILE,
        &entry::<T>("qlr_attention_bwd_dkv"),
        geometry_rows(a.t, a.b * a.hkv),
        args,
        stream,
    )
}

/// Useful causal FLOPs of fwd (2 GEMMs over the lower triangle): 2·2·B·H·D·T(T+1)/2.
pub fn fwd_flops(a: &AttnDims) -> f64 {
    4.0 * (a.b * a.h * a.d) as f64 * (a.t as f64 * (a.t as f64 + 1.0) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_covered() {
        let g = geometry_rows(2048, 32);
        assert_eq!(g.grid, (256, 32, 1));
        assert_eq!(geometry_rows(9, 2).grid, (2, 2, 1));
        assert_eq!(geometry_delta(17).grid.0, 3);
    }

    #[test]
    fn bad_dims_are_typed_errors() {
        assert!(check(
            "t",
            &AttnDims {
                b: 1,
                t: 4,
                h: 4,
                hkv: 3,
                d: 16
            }
        )
        .is_err());
        assert!(check(
            "t",
            &AttnDims {
                b: 1,
                t: 4,
                h: 4,
                hkv: 2,
                d: 256
            }
        )
        .is_err());
        let a = check(
            "t",
            &AttnDims {
                b: 1,
                t: 4,
                h: 4,
                hkv: 2,
                d: 16,
            },
        )
        .unwrap();
        assert_eq!(a.scale, 0.25);
    }
}
