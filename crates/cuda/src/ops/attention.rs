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

/// Whether [`fwd`] takes the tensor-core kernel: bf16 and D a multiple of 16 up to 128.
pub fn uses_mma(bf16: bool, d: usize) -> bool {
    bf16 && d.is_multiple_of(16) && (16..=MAX_HEAD_DIM).contains(&d)
}
/// Tensor-core forward: 64 query rows (4 warps) per 128-thread block, grid (T/64, B·H).
pub fn geometry_mma(t: usize, bh: usize) -> Geometry {
    Geometry {
        grid: (cdiv(t, 64).max(1) as u32, bh.max(1) as u32, 1),
        block: (128, 1, 1),
        smem: 0,
    }
}

/// Outputs `o` (B,T,H,D) T; saved `lse` (B,H,T) f32; inputs q (B,T,H,D), k, v (B,T,Hkv,D).
/// bf16 with D ∈ 16·{1..8} runs the tensor-core kernel, everything else the SIMT kernel.
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
    fwd_impl(dev, o, lse, q, k, v, a, stream, true)
}

/// The SIMT forward for any dtype and D ≤ 128 (what [`fwd`] uses when the tensor-core kernel
/// does not apply; public so tests can check both).
#[allow(clippy::too_many_arguments)]
pub fn fwd_simt<T: Elem>(
    dev: &Device,
    o: &mut ViewMut<'_, T>,
    lse: &mut ViewMut<'_, f32>,
    q: &View<'_, T>,
    k: &View<'_, T>,
    v: &View<'_, T>,
    a: AttnDims,
    stream: Option<&Stream>,
) -> Result<()> {
    fwd_impl(dev, o, lse, q, k, v, a, stream, false)
}

#[allow(clippy::too_many_arguments)]
fn fwd_impl<T: Elem>(
    dev: &Device,
    o: &mut ViewMut<'_, T>,
    lse: &mut ViewMut<'_, f32>,
    q: &View<'_, T>,
    k: &View<'_, T>,
    v: &View<'_, T>,
    a: AttnDims,
    stream: Option<&Stream>,
    allow_mma: bool,
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
    if allow_mma && uses_mma(T::SUFFIX == "bf16", a.d) {
        // The kernel reads K/V rows as 16-byte vectors.
        if !(q.device_ptr() | k.device_ptr() | v.device_ptr() | o.device_ptr()).is_multiple_of(16) {
            return Err(bad_arg(
                OP,
                "q/k/v/o",
                "tensor-core path needs 16-byte aligned buffers",
            ));
        }
        return dev.launch(
            FILE,
            "qlr_attention_fwd_mma_bf16",
            geometry_mma(a.t, a.b * a.h),
            args,
            stream,
        );
    }
    dev.launch(
        FILE,
        &entry::<T>("qlr_attention_fwd"),
        geometry_rows(a.t, a.b * a.h),
        args,
        stream,
    )
}

/// Dynamic shared memory of `qlr_attention_bwd_dkv_mma_bf16` (cuda/attention.cu): bf16 tiles
/// Kb, Vb [64][136], Qs, Os [32][136], Qt, Ot [128][40], then lse and delta [32] f32.
pub const DKV_MMA_SMEM: u32 =
    ((2 * 64 * 136 + 2 * 32 * 136 + 2 * 128 * 40) * 2 + 2 * 32 * 4) as u32;

/// Outputs `dq` (B,T,H,D), `dk`, `dv` (B,T,Hkv,D) T; scratch `delta` (B,H,T) f32; inputs `dout`,
/// saved `o`, `lse`, and q, k, v. bf16 with D ∈ 16·{1..8} runs the tensor-core kernels.
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
    bwd_impl(
        dev, dq, dk, dv, delta, dout, o, lse, q, k, v, a, stream, true,
    )
}

/// The SIMT backward for any dtype and D ≤ 128 (public so tests can check both paths).
#[allow(clippy::too_many_arguments)]
pub fn bwd_simt<T: Elem>(
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
    bwd_impl(
        dev, dq, dk, dv, delta, dout, o, lse, q, k, v, a, stream, false,
    )
}

#[allow(clippy::too_many_arguments)]
fn bwd_impl<T: Elem>(
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
    allow_mma: bool,
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
    let mma = allow_mma && uses_mma(T::SUFFIX == "bf16", a.d);
    if mma {
        let ptrs = q.device_ptr()
            | k.device_ptr()
            | v.device_ptr()
            | dout.device_ptr()
            | dq.device_ptr()
            | dk.device_ptr()
            | dv.device_ptr();
        if !ptrs.is_multiple_of(16) {
            return Err(bad_arg(
                OP,
                "q/k/v/dout/dq/dk/dv",
                "tensor-core path needs 16-byte aligned buffers",
            ));
        }
    }
    let args = Args::new()
        .ptr_mut(dq)
        .ptr(q)
        .ptr(k)
        .ptr(v)
        .ptr(dout)
        .ptr(lse)
        .ptr(&dl)
        .arg(arg);
    if mma {
        dev.launch(
            FILE,
            "qlr_attention_bwd_dq_mma_bf16",
            geometry_mma(a.t, a.b * a.h),
            args,
            stream,
        )?;
    } else {
        dev.launch(
            FILE,
            &entry::<T>("qlr_attention_bwd_dq"),
            geometry_rows(a.t, a.b * a.h),
            args,
            stream,
        )?;
    }
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
    if mma {
        let geo = Geometry {
            smem: DKV_MMA_SMEM,
            ..geometry_mma(a.t, a.b * a.hkv)
        };
        dev.launch(FILE, "qlr_attention_bwd_dkv_mma_bf16", geo, args, stream)
    } else {
        dev.launch(
            FILE,
            &entry::<T>("qlr_attention_bwd_dkv"),
            geometry_rows(a.t, a.b * a.hkv),
            args,
            stream,
        )
    }
}

/// Useful causal FLOPs of fwd (2 GEMMs over the lower triangle): 2·2·B·H·D·T(T+1)/2.
pub fn fwd_flops(a: &AttnDims) -> f64 {
    4.0 * (a.b * a.h * a.d) as f64 * (a.t as f64 * (a.t as f64 + 1.0) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mma_path_selection() {
        assert!(uses_mma(true, 128) && uses_mma(true, 16) && uses_mma(true, 64));
        assert!(
            !uses_mma(false, 128)
                && !uses_mma(true, 24)
                && !uses_mma(true, 256)
                && !uses_mma(true, 0)
        );
        assert_eq!(geometry_mma(2048, 32).grid, (32, 32, 1));
        assert_eq!(geometry_mma(65, 1).grid, (2, 1, 1));
    }

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
