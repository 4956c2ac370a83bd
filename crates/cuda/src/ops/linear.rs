//! The NF4 + LoRA linear: fused kernels (`cuda/linear.cu`) and the dequantize-to-scratch +
//! cuBLASLt path, with a dispatcher by row count.
//!
//! fwd: `us = S·(x_l·Aᵀ)` (M,R) saved; `y = x·deq(W)ᵀ + us·Bᵀ` (M,N).
//! bwd: `vs = S·(dy·B)` (M,R) scratch; `dx (+)= dy·deq(W) + vs·A`; `dA += vsᵀ·x_l`; `dB += dyᵀ·us`.
//! `x_l` is the input of the LoRA branch (x after dropout; `x` itself without dropout).

use super::nf4::{Nf4Arg, Nf4Weight};
use super::{check_float, check_len, check_len_mut, dim_i32, entry};
use crate::blas::GemmShape;
use crate::device::{cdiv, Args, Device, Elem, Geometry, Stream, View, ViewMut};
use crate::error::{bad_arg, Result};

const FILE: &str = "linear.cu";

/// Dimensions of one LoRA linear: M rows (B·T), K in, N out, R rank, S scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearDims {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub r: usize,
    pub scale: f32,
}

/// Mirrors `struct QlrLinear` in cuda/linear.cu (136 bytes, static_assert there).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct LinearArg {
    out: u64,
    a1: u64,
    a2: u64,
    b2: u64,
    w: Nf4Arg,
    w_sc: i64,
    w_sj: i64,
    b2_sc: i64,
    b2_sj: i64,
    m: i32,
    n_out: i32,
    k1: i32,
    k2: i32,
    accumulate: i32,
    pad: i32,
}
const _: () = assert!(std::mem::size_of::<LinearArg>() == 136);

/// Fused kernel geometry: bf16 (mma.sync) tiles are 128×128 with 256 threads; f32 (SIMT)
/// tiles 64×64 with 256 threads. Grid x walks output columns, y output rows.
pub fn fused_geometry(bf16: bool, m: usize, n_out: usize) -> Geometry {
    let t = if bf16 { 128 } else { 64 };
    Geometry {
        grid: (cdiv(n_out, t).max(1) as u32, cdiv(m, t).max(1) as u32, 1),
        block: (256, 1, 1),
        smem: 0,
    }
}
/// Skinny forward (`qlr_linear_fwd_skinny_bf16`): 32 output columns per 256-thread block, all
/// M ≤ [`SKINNY_MAX_M`] rows in the block, K split over its 8 warps.
pub fn skinny_geometry(n_out: usize) -> Geometry {
    Geometry {
        grid: (cdiv(n_out, 32).max(1) as u32, 1, 1),
        block: (256, 1, 1),
        smem: 0,
    }
}
/// Most rows the skinny forward takes (four m16 tiles).
pub const SKINNY_MAX_M: usize = 64;
/// Whether the forward of `d` runs the skinny kernel: bf16, M ≤ [`SKINNY_MAX_M`], K a multiple
/// of its 128-wide chunks, a lane's 32 codes inside one scale block (QB % 32 == 0), and x
/// 8-byte aligned (its 4-element loads). Otherwise the 128×128-tile kernel runs.
pub fn skinny_fwd_applies(bf16: bool, d: &LinearDims, blocksize: usize, x_ptr: u64) -> bool {
    bf16 && d.m <= SKINNY_MAX_M
        && d.k.is_multiple_of(128)
        && blocksize.is_multiple_of(32)
        && x_ptr.is_multiple_of(8)
}
/// Skinny backward (`qlr_linear_bwd(_acc)_skinny_bf16`): 64 dx columns per 512-thread block,
/// all M ≤ [`SKINNY_BWD_MAX_M`] rows, K split over 16 warps.
pub fn skinny_bwd_geometry(k: usize) -> Geometry {
    Geometry {
        grid: (cdiv(k, 64).max(1) as u32, 1, 1),
        block: (512, 1, 1),
        smem: 0,
    }
}
/// Most rows the skinny backward takes (one m16 tile: with two, its 512 threads' 128
/// registers spilled).
pub const SKINNY_BWD_MAX_M: usize = 16;
/// Whether the backward of `d` runs the skinny kernel: bf16, M ≤ [`SKINNY_BWD_MAX_M`], K (the
/// dx width, W's row length) a multiple of 8 and QB % 8 == 0 (a lane's 8 codes share a scale),
/// N (the reduction) even and dy 4-byte aligned (its bf16-pair loads).
pub fn skinny_bwd_applies(bf16: bool, d: &LinearDims, blocksize: usize, dy_ptr: u64) -> bool {
    bf16 && d.m <= SKINNY_BWD_MAX_M
        && d.k.is_multiple_of(8)
        && blocksize.is_multiple_of(8)
        && d.n.is_multiple_of(2)
        && dy_ptr.is_multiple_of(4)
}
/// lora_proj: 32 rows of the input per 256-thread block; R ≤ 128.
pub fn proj_geometry(m: usize) -> Geometry {
    Geometry {
        grid: (cdiv(m, 32).max(1) as u32, 1, 1),
        block: (256, 1, 1),
        smem: 0,
    }
}
/// Largest rank the lora_proj kernel supports (its shared tile holds R × 64 floats).
pub const MAX_RANK: usize = 128;
/// lora_grad: 64×64 output tiles (p rows, q cols) and a split of the m reduction into
/// slices (multiples of 16 rows) so that about two waves of blocks cover `sm_count` SMs.
/// Returns the geometry and the rows per slice.
pub fn grad_geometry(m: usize, p: usize, q: usize, sm_count: u32) -> (Geometry, usize) {
    let tiles = cdiv(p, 64) * cdiv(q, 64);
    let max_splits = cdiv(m, 128).max(1); // at least 128 rows per slice
    let splits = (2 * sm_count as usize).div_ceil(tiles).clamp(1, max_splits);
    let m_per = cdiv(cdiv(m.max(1), splits), 16) * 16;
    let splits = cdiv(m.max(1), m_per);
    (
        Geometry {
            grid: (
                cdiv(q, 64).max(1) as u32,
                cdiv(p, 64).max(1) as u32,
                splits as u32,
            ),
            block: (256, 1, 1),
            smem: 0,
        },
        m_per,
    )
}

fn check_dims<T: Elem>(op: &str, w: &Nf4Weight, d: &LinearDims) -> Result<()> {
    check_float::<T>(op)?;
    if w.shape != [d.n, d.k] {
        return Err(bad_arg(
            op,
            "w",
            format!("shape {:?}, dims need [{}, {}]", w.shape, d.n, d.k),
        ));
    }
    if d.r == 0 || d.r > MAX_RANK {
        return Err(bad_arg(
            op,
            "r",
            format!("rank {} outside 1..={MAX_RANK}", d.r),
        ));
    }
    for (name, v) in [("m", d.m), ("k", d.k), ("n", d.n)] {
        dim_i32(op, name, v)?;
    }
    Ok(())
}

/// `out (m, r) = scale · a (m, kk) · Bop` with Bop element (k, j) at `b[k·sbk + j·sbj]`
/// (r ≤ [`MAX_RANK`]); the LoRA down-projections `S·x·Aᵀ` (sbk 1, sbj K) and `S·dy·B` (sbk R,
/// sbj 1).
#[allow(clippy::too_many_arguments)]
pub fn lora_proj<T: Elem>(
    dev: &Device,
    out: &mut ViewMut<'_, T>,
    a: &View<'_, T>,
    b: &View<'_, T>,
    sbk: usize,
    sbj: usize,
    m: usize,
    kk: usize,
    r: usize,
    scale: f32,
    stream: Option<&Stream>,
) -> Result<()> {
    const OP: &str = "linear::lora_proj";
    check_float::<T>(OP)?;
    // The kernel's shared tile holds MAX_RANK rows of Bop and each thread at most 16 outputs:
    // a larger rank would index past both (CudaBackend's dense-base and dropout paths call
    // this launcher directly, without `check_dims`).
    if r == 0 || r > MAX_RANK {
        return Err(bad_arg(OP, "r", format!("rank {r} outside 1..={MAX_RANK}")));
    }
    check_len_mut(OP, "out", out, m * r)?;
    check_len(OP, "a", a, m * kk)?;
    // Bop's largest index, (kk−1)·sbk + (r−1)·sbj, must lie inside `b` (nothing is read
    // when kk = 0).
    let b_need = match kk {
        0 => 0,
        _ => (kk - 1) * sbk + (r - 1) * sbj + 1,
    };
    if b.len() < b_need {
        return Err(bad_arg(
            OP,
            "b",
            format!("{} elements, the strides need {b_need}", b.len()),
        ));
    }
    dim_i32(OP, "m", m)?;
    dim_i32(OP, "k", kk)?;
    let args = Args::new()
        .ptr_mut(out)
        .ptr(a)
        .ptr(b)
        .arg(sbk as i64)
        .arg(sbj as i64)
        .arg(m as i32)
        .arg(kk as i32)
        .arg(r as i32)
        .arg(scale);
    dev.launch(
        FILE,
        &entry::<T>("qlr_linear_lora_proj_fwd"),
        proj_geometry(m),
        args,
        stream,
    )
}

/// `c (p, q) f32 += lᵀ · rr` with l (m, p), rr (m, q) T, any p and q (64×64 tiles, f32
/// atomics over the split m reduction): the LoRA and dense weight gradients.
#[allow(clippy::too_many_arguments)]
pub fn lora_grad<T: Elem>(
    dev: &Device,
    c: &mut ViewMut<'_, f32>,
    l: &View<'_, T>,
    rr: &View<'_, T>,
    m: usize,
    p: usize,
    q: usize,
    stream: Option<&Stream>,
) -> Result<()> {
    const OP: &str = "linear::lora_grad";
    check_float::<T>(OP)?;
    check_len_mut(OP, "c", c, p * q)?;
    check_len(OP, "l", l, m * p)?;
    check_len(OP, "rr", rr, m * q)?;
    for (name, v) in [("m", m), ("p", p), ("q", q)] {
        dim_i32(OP, name, v)?;
    }
    let (geo, m_per) = grad_geometry(m, p, q, dev.sm_count());
    let args = Args::new()
        .ptr_mut(c)
        .ptr(l)
        .ptr(rr)
        .arg(m as i32)
        .arg(p as i32)
        .arg(q as i32)
        .arg(m_per as i32);
    dev.launch(
        FILE,
        &entry::<T>("qlr_linear_lora_grad_bwd_acc"),
        geo,
        args,
        stream,
    )
}

/// Fused forward. Outputs: `y` (M,N) T; saved: `us` (M,R) T = S·(x_l·Aᵀ) for bwd. Inputs: `x`
/// (M,K), `x_l` (M,K) the LoRA-branch input; weights `w` NF4 `[N,K]`, `lora_a` (R,K), `lora_b` (N,R).
#[allow(clippy::too_many_arguments)]
pub fn fwd<T: Elem>(
    dev: &Device,
    y: &mut ViewMut<'_, T>,
    us: &mut ViewMut<'_, T>,
    x: &View<'_, T>,
    x_l: &View<'_, T>,
    w: &Nf4Weight,
    lora_a: &View<'_, T>,
    lora_b: &View<'_, T>,
    d: LinearDims,
    stream: Option<&Stream>,
) -> Result<()> {
    const OP: &str = "linear::fwd";
    check_dims::<T>(OP, w, &d)?;
    check_len_mut(OP, "y", y, d.m * d.n)?;
    check_len_mut(OP, "us", us, d.m * d.r)?;
    check_len(OP, "x", x, d.m * d.k)?;
    check_len(OP, "x_l", x_l, d.m * d.k)?;
    check_len(OP, "lora_a", lora_a, d.r * d.k)?;
    check_len(OP, "lora_b", lora_b, d.n * d.r)?;
    // us[m, j] = S · Σ_k x_l[m, k] · A[j, k]: Bop (k, j) at A[j·K + k].
    lora_proj(dev, us, x_l, lora_a, 1, d.k, d.m, d.k, d.r, d.scale, stream)?;
    let map = dev.dynamic_map()?;
    let arg = LinearArg {
        out: y.device_ptr(),
        a1: x.device_ptr(),
        a2: us.device_ptr(),
        b2: lora_b.device_ptr(),
        w: w.arg(&map.view()),
        // W element (c = n, j = k) at n·K + k; B element (c = n, j = r) at n·R + r.
        w_sc: d.k as i64,
        w_sj: 1,
        b2_sc: d.r as i64,
        b2_sj: 1,
        m: d.m as i32,
        n_out: d.n as i32,
        k1: d.k as i32,
        k2: d.r as i32,
        accumulate: 0,
        pad: 0,
    };
    let bf16 = T::SUFFIX == "bf16";
    // Few rows: the skinny kernel streams W at memory bandwidth (cuda/linear.cu).
    let (stem, geo) = if skinny_fwd_applies(bf16, &d, w.blocksize, x.device_ptr()) {
        ("qlr_linear_fwd_skinny", skinny_geometry(d.n))
    } else {
        ("qlr_linear_fwd", fused_geometry(bf16, d.m, d.n))
    };
    dev.launch(FILE, &entry::<T>(stem), geo, Args::new().arg(arg), stream)
}

/// Fused backward. Outputs: `dx` (M,K) T (overwritten, or accumulated when `accumulate_dx`:
/// q/k/v and gate/up share their input), `d_lora_a` (R,K) f32 and `d_lora_b` (N,R) f32, both
/// accumulated (`+=`: zero them at the start of a step). Scratch: `vs` (M,R) T. Inputs: `dy`
/// (M,N), `x_l` (M,K), saved `us` (M,R); weights as in [`fwd`].
#[allow(clippy::too_many_arguments)]
pub fn bwd<T: Elem>(
    dev: &Device,
    dx: &mut ViewMut<'_, T>,
    d_lora_a: &mut ViewMut<'_, f32>,
    d_lora_b: &mut ViewMut<'_, f32>,
    vs: &mut ViewMut<'_, T>,
    dy: &View<'_, T>,
    x_l: &View<'_, T>,
    us: &View<'_, T>,
    w: &Nf4Weight,
    lora_a: &View<'_, T>,
    lora_b: &View<'_, T>,
    d: LinearDims,
    accumulate_dx: bool,
    stream: Option<&Stream>,
) -> Result<()> {
    const OP: &str = "linear::bwd";
    check_dims::<T>(OP, w, &d)?;
    check_len_mut(OP, "dx", dx, d.m * d.k)?;
    check_len_mut(OP, "d_lora_a", d_lora_a, d.r * d.k)?;
    check_len_mut(OP, "d_lora_b", d_lora_b, d.n * d.r)?;
    check_len_mut(OP, "vs", vs, d.m * d.r)?;
    check_len(OP, "dy", dy, d.m * d.n)?;
    check_len(OP, "x_l", x_l, d.m * d.k)?;
    check_len(OP, "us", us, d.m * d.r)?;
    check_len(OP, "lora_a", lora_a, d.r * d.k)?;
    check_len(OP, "lora_b", lora_b, d.n * d.r)?;
    // vs[m, j] = S · Σ_n dy[m, n] · B[n, j]: Bop (n, j) at B[n·R + j].
    lora_proj(dev, vs, dy, lora_b, d.r, 1, d.m, d.n, d.r, d.scale, stream)?;
    let map = dev.dynamic_map()?;
    let arg = LinearArg {
        out: dx.device_ptr(),
        a1: dy.device_ptr(),
        a2: vs.device_ptr(),
        b2: lora_a.device_ptr(),
        w: w.arg(&map.view()),
        // dx[m, c] = Σ_j dy[m, j]·W[j, c]: W element (c = k, j = n) at n·K + k; A element (c = k, j = r) at r·K + k.
        w_sc: 1,
        w_sj: d.k as i64,
        b2_sc: 1,
        b2_sj: d.k as i64,
        m: d.m as i32,
        n_out: d.k as i32,
        k1: d.n as i32,
        k2: d.r as i32,
        accumulate: accumulate_dx as i32,
        pad: 0,
    };
    let bf16 = T::SUFFIX == "bf16";
    let stem = if accumulate_dx {
        "qlr_linear_bwd_acc"
    } else {
        "qlr_linear_bwd"
    };
    // Few rows: the skinny kernel streams W at memory bandwidth (cuda/linear.cu).
    let (entry_name, geo) = if skinny_bwd_applies(bf16, &d, w.blocksize, dy.device_ptr()) {
        (
            format!("{stem}_skinny_{}", T::SUFFIX),
            skinny_bwd_geometry(d.k),
        )
    } else {
        (entry::<T>(stem), fused_geometry(bf16, d.m, d.k))
    };
    dev.launch(FILE, &entry_name, geo, Args::new().arg(arg), stream)?;
    // dA[j, k] += Σ_m vs[m, j] · x_l[m, k];  dB[n, j] += Σ_m dy[m, n] · us[m, j].
    lora_grad(dev, d_lora_a, &vs.as_view(), x_l, d.m, d.r, d.k, stream)?;
    lora_grad(dev, d_lora_b, dy, us, d.m, d.n, d.r, stream)
}

/// Which implementation of the linear to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearPath {
    /// NF4 dequantized inside the GEMM (`cuda/linear.cu`).
    Fused,
    /// Dequantize W into a (N,K) scratch, then cuBLASLt.
    DequantBlas,
}

/// Picks the path by row count: fused up to `crossover_m` rows, dequant + cuBLASLt above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dispatch {
    pub crossover_m: usize,
}
impl Default for Dispatch {
    /// Until our own H100 measurement (benches/linear.rs) replaces it: bitsandbytes' H100
    /// calibration switches to dequantize + cuBLAS above M ≈ 32–64 rows for large weights
    /// (perf-notes §4). `QLORA_LINEAR_CROSSOVER` overrides it.
    fn default() -> Self {
        let m = std::env::var("QLORA_LINEAR_CROSSOVER")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64);
        Dispatch { crossover_m: m }
    }
}
/// The first N·K elements of the dequantize path's `scratch`, which must hold W.
fn weight_scratch<'s, T: Elem>(s: &'s mut ViewMut<'_, T>, d: LinearDims) -> Result<ViewMut<'s, T>> {
    if s.len() < d.n * d.k {
        return Err(bad_arg(
            "linear::Dispatch",
            "scratch",
            format!("{} elements, W needs {}", s.len(), d.n * d.k),
        ));
    }
    Ok(s.slice_mut(0, d.n * d.k))
}

impl Dispatch {
    pub fn path(&self, m: usize) -> LinearPath {
        if m <= self.crossover_m {
            LinearPath::Fused
        } else {
            LinearPath::DequantBlas
        }
    }

    /// Forward by [`Dispatch::path`]: the dequant path needs `scratch` (N·K elements of T,
    /// e.g. one buffer sized for the largest weight); without it the fused kernel runs.
    /// Returns the path taken. Same outputs and contract as [`fwd`].
    #[allow(clippy::too_many_arguments)]
    pub fn fwd<T: Elem>(
        &self,
        dev: &Device,
        y: &mut ViewMut<'_, T>,
        us: &mut ViewMut<'_, T>,
        scratch: Option<&mut ViewMut<'_, T>>,
        x: &View<'_, T>,
        x_l: &View<'_, T>,
        w: &Nf4Weight,
        lora_a: &View<'_, T>,
        lora_b: &View<'_, T>,
        d: LinearDims,
    ) -> Result<LinearPath> {
        match (self.path(d.m), scratch) {
            (LinearPath::DequantBlas, Some(s)) => {
                let mut s = weight_scratch(s, d)?;
                fwd_dequant_blas(dev, y, us, &mut s, x, x_l, w, lora_a, lora_b, d)?;
                Ok(LinearPath::DequantBlas)
            }
            _ => {
                fwd(dev, y, us, x, x_l, w, lora_a, lora_b, d, None)?;
                Ok(LinearPath::Fused)
            }
        }
    }

    /// Backward by [`Dispatch::path`], as [`Dispatch::fwd`]; same contract as [`bwd`].
    #[allow(clippy::too_many_arguments)]
    pub fn bwd<T: Elem>(
        &self,
        dev: &Device,
        dx: &mut ViewMut<'_, T>,
        d_lora_a: &mut ViewMut<'_, f32>,
        d_lora_b: &mut ViewMut<'_, f32>,
        vs: &mut ViewMut<'_, T>,
        scratch: Option<&mut ViewMut<'_, T>>,
        dy: &View<'_, T>,
        x_l: &View<'_, T>,
        us: &View<'_, T>,
        w: &Nf4Weight,
        lora_a: &View<'_, T>,
        lora_b: &View<'_, T>,
        d: LinearDims,
        accumulate_dx: bool,
    ) -> Result<LinearPath> {
        match (self.path(d.m), scratch) {
            (LinearPath::DequantBlas, Some(s)) => {
                let mut s = weight_scratch(s, d)?;
                bwd_dequant_blas(
                    dev,
                    dx,
                    d_lora_a,
                    d_lora_b,
                    vs,
                    &mut s,
                    dy,
                    x_l,
                    us,
                    w,
                    lora_a,
                    lora_b,
                    d,
                    accumulate_dx,
                )?;
                Ok(LinearPath::DequantBlas)
            }
            _ => {
                bwd(
                    dev,
                    dx,
                    d_lora_a,
                    d_lora_b,
                    vs,
                    dy,
                    x_l,
                    us,
                    w,
                    lora_a,
                    lora_b,
                    d,
                    accumulate_dx,
                    None,
                )?;
                Ok(LinearPath::Fused)
            }
        }
    }
}

/// Forward through dequantize-to-`scratch` (N·K elements of T) + cuBLASLt:
/// `y = x·Wᵀ` then `y += us·Bᵀ` (beta = 1). Same outputs and contract as [`fwd`].
#[allow(clippy::too_many_arguments)]
pub fn fwd_dequant_blas<T: Elem>(
    dev: &Device,
    y: &mut ViewMut<'_, T>,
    us: &mut ViewMut<'_, T>,
    scratch: &mut ViewMut<'_, T>,
    x: &View<'_, T>,
    x_l: &View<'_, T>,
    w: &Nf4Weight,
    lora_a: &View<'_, T>,
    lora_b: &View<'_, T>,
    d: LinearDims,
) -> Result<()> {
    const OP: &str = "linear::fwd_dequant_blas";
    check_dims::<T>(OP, w, &d)?;
    check_len_mut(OP, "y", y, d.m * d.n)?;
    check_len_mut(OP, "us", us, d.m * d.r)?;
    check_len_mut(OP, "scratch", scratch, d.n * d.k)?;
    check_len(OP, "x", x, d.m * d.k)?;
    check_len(OP, "x_l", x_l, d.m * d.k)?;
    check_len(OP, "lora_a", lora_a, d.r * d.k)?;
    check_len(OP, "lora_b", lora_b, d.n * d.r)?;
    super::nf4::dequant_fwd(dev, scratch, w, None)?;
    lora_proj(dev, us, x_l, lora_a, 1, d.k, d.m, d.k, d.r, d.scale, None)?;
    let (sv, uv) = (scratch.as_view(), us.as_view());
    dev.with_blas(|b| {
        b.gemm(
            dev,
            y,
            x,
            &sv,
            GemmShape {
                m: d.m,
                n: d.n,
                k: d.k,
                a_trans: false,
                b_trans: true,
            },
            1.0,
            0.0,
        )?;
        b.gemm(
            dev,
            y,
            &uv,
            lora_b,
            GemmShape {
                m: d.m,
                n: d.n,
                k: d.r,
                a_trans: false,
                b_trans: true,
            },
            1.0,
            1.0,
        )
    })
}

/// Backward through dequantize-to-`scratch` + cuBLASLt; same contract as [`bwd`].
#[allow(clippy::too_many_arguments)]
pub fn bwd_dequant_blas<T: Elem>(
    dev: &Device,
    dx: &mut ViewMut<'_, T>,
    d_lora_a: &mut ViewMut<'_, f32>,
    d_lora_b: &mut ViewMut<'_, f32>,
    vs: &mut ViewMut<'_, T>,
    scratch: &mut ViewMut<'_, T>,
    dy: &View<'_, T>,
    x_l: &View<'_, T>,
    us: &View<'_, T>,
    w: &Nf4Weight,
    lora_a: &View<'_, T>,
    lora_b: &View<'_, T>,
    d: LinearDims,
    accumulate_dx: bool,
) -> Result<()> {
    const OP: &str = "linear::bwd_dequant_blas";
    check_dims::<T>(OP, w, &d)?;
    check_len_mut(OP, "dx", dx, d.m * d.k)?;
    check_len_mut(OP, "d_lora_a", d_lora_a, d.r * d.k)?;
    check_len_mut(OP, "d_lora_b", d_lora_b, d.n * d.r)?;
    check_len_mut(OP, "vs", vs, d.m * d.r)?;
    check_len_mut(OP, "scratch", scratch, d.n * d.k)?;
    check_len(OP, "dy", dy, d.m * d.n)?;
    check_len(OP, "x_l", x_l, d.m * d.k)?;
    check_len(OP, "us", us, d.m * d.r)?;
    super::nf4::dequant_fwd(dev, scratch, w, None)?;
    lora_proj(dev, vs, dy, lora_b, d.r, 1, d.m, d.n, d.r, d.scale, None)?;
    let (sv, vv) = (scratch.as_view(), vs.as_view());
    let beta = if accumulate_dx { 1.0 } else { 0.0 };
    dev.with_blas(|b| {
        b.gemm(
            dev,
            dx,
            dy,
            &sv,
            GemmShape {
                m: d.m,
                n: d.k,
                k: d.n,
                a_trans: false,
                b_trans: false,
            },
            1.0,
            beta,
        )?;
        b.gemm(
            dev,
            dx,
            &vv,
            lora_a,
            GemmShape {
                m: d.m,
                n: d.k,
                k: d.r,
                a_trans: false,
                b_trans: false,
            },
            1.0,
            1.0,
        )
    })?;
    lora_grad(dev, d_lora_a, &vs.as_view(), x_l, d.m, d.r, d.k, None)?;
    lora_grad(dev, d_lora_b, dy, us, d.m, d.n, d.r, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_tiles_cover_the_output() {
        for (bf16, t) in [(true, 128usize), (false, 64)] {
            for (m, n) in [(1usize, 1usize), (16, 4096), (129, 1024), (8192, 14336)] {
                let g = fused_geometry(bf16, m, n);
                assert!(g.grid.0 as usize * t >= n && (g.grid.0 as usize - 1) * t < n);
                assert!(g.grid.1 as usize * t >= m && (g.grid.1 as usize - 1) * t < m);
                assert_eq!(g.block, (256, 1, 1));
            }
        }
    }

    #[test]
    fn grad_split_covers_m_exactly_once() {
        for (m, p, q) in [
            (1usize, 16usize, 4096usize),
            (100, 16, 16),
            (8192, 4096, 16),
            (8192, 16, 14336),
            (4096, 14336, 16),
        ] {
            let (g, m_per) = grad_geometry(m, p, q, 132);
            assert_eq!(m_per % 16, 0);
            let z = g.grid.2 as usize;
            assert!(z * m_per >= m, "{m} {z} {m_per}");
            assert!(
                (z - 1) * m_per < m.max(1),
                "no empty slice: {m} {z} {m_per}"
            );
            assert!(m_per >= 16);
        }
    }

    #[test]
    fn dispatch_by_rows() {
        let d = Dispatch { crossover_m: 64 };
        assert_eq!(d.path(1), LinearPath::Fused);
        assert_eq!(d.path(64), LinearPath::Fused);
        assert_eq!(d.path(65), LinearPath::DequantBlas);
    }

    #[test]
    fn skinny_forward_takes_few_rows_whole_chunks_and_bf16_only() {
        let d = |m, k| LinearDims {
            m,
            k,
            n: 4096,
            r: 16,
            scale: 2.0,
        };
        assert!(skinny_fwd_applies(true, &d(1, 4096), 64, 256));
        assert!(skinny_fwd_applies(true, &d(64, 128), 64, 256));
        assert!(!skinny_fwd_applies(true, &d(65, 4096), 64, 256), "M");
        assert!(!skinny_fwd_applies(true, &d(16, 4160), 64, 256), "K % 128");
        assert!(!skinny_fwd_applies(true, &d(16, 4096), 16, 256), "QB % 32");
        assert!(
            !skinny_fwd_applies(true, &d(16, 4096), 64, 260),
            "x alignment"
        );
        assert!(!skinny_fwd_applies(false, &d(16, 4096), 64, 256), "f32");
        // 32 columns per block: Llama-3-8B's narrowest output (1024) still fills 32 blocks,
        // the 4096-wide ones 128 (one per SM of an H100).
        assert_eq!(skinny_geometry(4096).grid, (128, 1, 1));
        assert_eq!(skinny_geometry(40).grid, (2, 1, 1));
        assert_eq!(skinny_geometry(0).grid, (1, 1, 1));
    }
    #[test]
    fn skinny_backward_takes_few_rows_and_whole_column_groups() {
        let d = |m, k, n| LinearDims {
            m,
            k,
            n,
            r: 16,
            scale: 2.0,
        };
        assert!(skinny_bwd_applies(true, &d(1, 4096, 14336), 64, 256));
        assert!(skinny_bwd_applies(true, &d(16, 72, 40), 64, 4));
        assert!(!skinny_bwd_applies(true, &d(17, 4096, 4096), 64, 256), "M");
        assert!(
            !skinny_bwd_applies(true, &d(16, 4100, 4096), 64, 256),
            "K % 8"
        );
        assert!(
            !skinny_bwd_applies(true, &d(16, 4096, 4095), 64, 256),
            "N odd"
        );
        assert!(
            !skinny_bwd_applies(true, &d(16, 4096, 4096), 4, 256),
            "QB % 8"
        );
        assert!(
            !skinny_bwd_applies(true, &d(16, 4096, 4096), 64, 2),
            "dy alignment"
        );
        assert!(
            !skinny_bwd_applies(false, &d(16, 4096, 4096), 64, 256),
            "f32"
        );
        // 64 columns per block: 64 blocks for Llama-3-8B's 4096-wide dx, 224 for 14336.
        let g = skinny_bwd_geometry(4096);
        assert_eq!((g.grid, g.block), ((64, 1, 1), (512, 1, 1)));
        assert_eq!(skinny_bwd_geometry(14336).grid.0, 224);
        assert_eq!(skinny_bwd_geometry(72).grid.0, 2);
    }
    #[test]
    fn proj_geometry_rows() {
        assert_eq!(proj_geometry(1).grid.0, 1);
        assert_eq!(proj_geometry(33).grid.0, 2);
    }
}
