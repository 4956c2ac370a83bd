//! The linears of [`CudaBackend`]: the frozen NF4/dense + LoRA linear and the trainable dense
//! `lm_head` (modules_to_save).
//!
//! The trait's math (see `cpu::nf4_lora_linear`), with `x_d = drop(x)`:
//! fwd `y = x·Wᵀ + bias + S·(x_d·Aᵀ)·Bᵀ`; bwd `g = d_y·B`, `dB += S·d_yᵀ·u`, `dA += S·gᵀ·x_d`,
//! `d_x (+)= d_y·W + S·(g·A) ⊙ mask`.
//! The kernels carry the scale inside the rank-R intermediates: `us = S·x_d·Aᵀ` (what this
//! backend saves as `u`, so its `u` is S times the CPU backend's) and `vs = S·d_y·B`; then
//! `dB += d_yᵀ·us` and `dA += vsᵀ·x_d` are the same products.
//!
//! Paths:
//! - NF4 base with LoRA, no dropout, and both `d_x` and the gradient arena wanted: the
//!   launchers of `ops::linear` through their [`Dispatch`](qlora_cuda::ops::linear::Dispatch)
//!   (fused NF4-dequantizing GEMM for small row counts, dequantize-to-scratch + cuBLASLt above).
//! - Everything else (no LoRA: untargeted projections and the frozen `lm_head`; a dense base;
//!   LoRA dropout, whose mask multiplies only the LoRA part of `d_x`): the base product by
//!   cuBLASLt on the bf16 weight (dequantized into a scratch for NF4), the rank-R products by
//!   the LoRA kernels of `ops::linear`, the mask by `ops::elementwise`.
//!
//! LoRA A and B are f32 master weights in the adapter arena; each call rounds the slot's A and
//! B once to a bf16 scratch (R·(in+out) elements: small next to the activations).

use half::bf16;
use qlora_cuda::blas::GemmShape;
use qlora_cuda::ops::{elementwise, linear as g_linear, nf4 as g_nf4};
use qlora_cuda::{View, ViewMut};

use super::{bad, view, view_mut, CResult, CudaBackend, CudaBuf, CudaFrozen, Dtype};
use crate::backend::{Dropout, LinearDims, LoraArgs};
use crate::lora::LoraSlot;

/// The bf16 copies of one slot's A `(R, in)` and B `(out, R)`, each in its own scratch buffer
/// (pool allocations start 512-byte aligned: cuBLASLt's heuristics assume aligned operands,
/// and a B placed right after A in one buffer would start anywhere).
struct LoraBf16 {
    /// (R·in,) bf16
    a: CudaBuf,
    /// (out·R,) bf16
    b: CudaBuf,
}

impl LoraBf16 {
    fn a(&self, op: &str) -> CResult<View<'_, bf16>> {
        view::<bf16>(&self.a, op, "lora_a")
    }
    fn b(&self, op: &str) -> CResult<View<'_, bf16>> {
        view::<bf16>(&self.b, op, "lora_b")
    }
}

/// The dropout of a call, when it drops anything.
fn active(d: Option<Dropout>) -> Option<Dropout> {
    d.filter(|d| d.p > 0.0)
}

impl CudaBackend {
    fn gemm(
        &self,
        c: &mut ViewMut<'_, bf16>,
        a: &View<'_, bf16>,
        b: &View<'_, bf16>,
        s: GemmShape,
        beta: f32,
    ) -> CResult<()> {
        self.dev
            .with_blas(|bl| bl.gemm(&self.dev, c, a, b, s, 1.0, beta))
    }

    /// Rounds the slot's f32 A and B (adapter arena `params`) to bf16.
    fn lora_bf16(&self, params: &CudaBuf, s: &LoraSlot, op: &str) -> CResult<LoraBf16> {
        Ok(LoraBf16 {
            a: self.to_bf16(params, s.a_offset, s.r * s.in_features, op)?,
            b: self.to_bf16(params, s.b_offset, s.out_features * s.r, op)?,
        })
    }

    /// The frozen weight as a bf16 `(out, in)` matrix: the dense buffer itself, or NF4
    /// dequantized (bit-exact, then rounded once to bf16) into `scratch`.
    fn base_bf16<'a>(
        &self,
        w: &'a CudaFrozen,
        scratch: &'a mut Option<CudaBuf>,
        op: &str,
    ) -> CResult<View<'a, bf16>> {
        match w {
            CudaFrozen::Dense { w, .. } => view::<bf16>(w, op, "w"),
            CudaFrozen::Nf4 { w: nw, .. } => {
                let mut s = self.temporary(Dtype::Bf16, nw.numel(), op)?;
                g_nf4::dequant_fwd(
                    &self.dev,
                    &mut view_mut::<bf16>(&mut s, op, "dequant scratch")?,
                    nw,
                    None,
                )?;
                *scratch = Some(s);
                view::<bf16>(scratch.as_ref().expect("set above"), op, "dequant scratch")
            }
        }
    }

    fn check_shape(w: &CudaFrozen, dims: LinearDims, op: &str) -> CResult<()> {
        if w.shape() != (dims.out_features, dims.in_features) {
            return Err(bad(
                op,
                "w",
                format!(
                    "shape {:?}, dims need ({}, {})",
                    w.shape(),
                    dims.out_features,
                    dims.in_features
                ),
            ));
        }
        Ok(())
    }

    /// `x_d = drop(x)` into a new scratch.
    fn dropped(&self, x: &View<'_, bf16>, d: Dropout, op: &str) -> CResult<CudaBuf> {
        let mut xd = self.temporary(Dtype::Bf16, x.len(), op)?;
        elementwise::dropout_fwd(
            &self.dev,
            &mut view_mut::<bf16>(&mut xd, op, "x_d")?,
            x,
            d.seed,
            d.p,
            None,
        )?;
        Ok(xd)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn linear_fwd(
        &self,
        y: &mut CudaBuf,
        u: Option<&mut CudaBuf>,
        x: &CudaBuf,
        w: &CudaFrozen,
        bias: Option<&CudaBuf>,
        lora: Option<(&CudaBuf, LoraArgs<'_>)>,
        dims: LinearDims,
    ) -> CResult<()> {
        const OP: &str = "nf4_lora_linear_fwd";
        Self::check_shape(w, dims, OP)?;
        let LinearDims {
            n,
            in_features: k,
            out_features: o,
        } = dims;
        let xv = view::<bf16>(x, OP, "x")?;
        let mut yv = view_mut::<bf16>(y, OP, "y")?;
        // y = x·Wᵀ: (n, o) from x (n, k) and W (o, k).
        let base = GemmShape {
            m: n,
            n: o,
            k,
            a_trans: false,
            b_trans: true,
        };
        match lora {
            None => {
                let mut scr = None;
                let wv = self.base_bf16(w, &mut scr, OP)?;
                self.gemm(&mut yv, &xv, &wv, base, 0.0)?;
            }
            Some((params, args)) => {
                let s = args.slot;
                let ab = self.lora_bf16(params, s, OP)?;
                let (av, bv) = (ab.a(OP)?, ab.b(OP)?);
                let mut own_u = None;
                let ub: &mut CudaBuf = match u {
                    Some(u) => u,
                    None => own_u.insert(self.temporary(Dtype::Bf16, n * s.r, OP)?),
                };
                let mut usv = view_mut::<bf16>(ub, OP, "u")?;
                let xd = match active(args.dropout) {
                    Some(d) => Some(self.dropped(&xv, d, OP)?),
                    None => None,
                };
                let xl = match &xd {
                    Some(b) => view::<bf16>(b, OP, "x_d")?,
                    None => xv,
                };
                let scale = s.scale as f32;
                match w {
                    CudaFrozen::Nf4 { w: nw, .. } => {
                        let d = g_linear::LinearDims {
                            m: n,
                            k,
                            n: o,
                            r: s.r,
                            scale,
                        };
                        let mut scr = match self.dispatch.path(n) {
                            g_linear::LinearPath::DequantBlas => {
                                Some(self.temporary(Dtype::Bf16, o * k, OP)?)
                            }
                            g_linear::LinearPath::Fused => None,
                        };
                        let mut sv = match scr.as_mut() {
                            Some(b) => Some(view_mut::<bf16>(b, OP, "dequant scratch")?),
                            None => None,
                        };
                        self.dispatch.fwd(
                            &self.dev,
                            &mut yv,
                            &mut usv,
                            sv.as_mut(),
                            &xv,
                            &xl,
                            nw,
                            &av,
                            &bv,
                            d,
                        )?;
                    }
                    CudaFrozen::Dense { w: wd, .. } => {
                        let wv = view::<bf16>(wd, OP, "w")?;
                        self.gemm(&mut yv, &xv, &wv, base, 0.0)?;
                        // us (n, r) = S·x_d·Aᵀ: Bop (k, j) at A[j·K + k].
                        g_linear::lora_proj(
                            &self.dev, &mut usv, &xl, &av, 1, k, n, k, s.r, scale, None,
                        )?;
                        // y += us·Bᵀ: (n, o) from us (n, r), B (o, r).
                        self.gemm(
                            &mut yv,
                            &usv.as_view(),
                            &bv,
                            GemmShape {
                                m: n,
                                n: o,
                                k: s.r,
                                a_trans: false,
                                b_trans: true,
                            },
                            1.0,
                        )?;
                    }
                }
            }
        }
        if let Some(b) = bias {
            elementwise::bias_fwd(&self.dev, &mut yv, &view::<bf16>(b, OP, "bias")?, n, None)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn linear_bwd(
        &self,
        d_x: Option<&mut CudaBuf>,
        acc_dx: bool,
        grads: Option<&mut CudaBuf>,
        d_y: &CudaBuf,
        x: &CudaBuf,
        u: Option<&CudaBuf>,
        w: &CudaFrozen,
        lora: Option<(&CudaBuf, LoraArgs<'_>)>,
        dims: LinearDims,
    ) -> CResult<()> {
        const OP: &str = "nf4_lora_linear_bwd";
        Self::check_shape(w, dims, OP)?;
        let LinearDims {
            n,
            in_features: k,
            out_features: o,
        } = dims;
        let dyv = view::<bf16>(d_y, OP, "d_y")?;
        let beta = if acc_dx { 1.0 } else { 0.0 };
        // d_x (=|+=) d_y·W: (n, k) from d_y (n, o) and W (o, k).
        let base = GemmShape {
            m: n,
            n: k,
            k: o,
            a_trans: false,
            b_trans: false,
        };
        let Some((params, args)) = lora else {
            if let Some(dx) = d_x {
                let mut scr = None;
                let wv = self.base_bf16(w, &mut scr, OP)?;
                self.gemm(&mut view_mut::<bf16>(dx, OP, "d_x")?, &dyv, &wv, base, beta)?;
            }
            return Ok(());
        };
        let s = args.slot;
        let r = s.r;
        let scale = s.scale as f32;
        let u = u.ok_or_else(|| bad(OP, "u", "LoRA backward needs the saved u"))?;
        let usv = view::<bf16>(u, OP, "u")?;
        let ab = self.lora_bf16(params, s, OP)?;
        let (av, bv) = (ab.a(OP)?, ab.b(OP)?);
        let dropout = active(args.dropout);
        let xv = view::<bf16>(x, OP, "x")?;
        let grad_views = |g| grad_views(g, s, OP);
        match (w, dropout, d_x, grads) {
            (CudaFrozen::Nf4 { w: nw, .. }, None, Some(dx), Some(g)) => {
                let (mut da, mut db) = grad_views(g)?;
                let mut vs = self.temporary(Dtype::Bf16, n * r, OP)?;
                let mut scr = match self.dispatch.path(n) {
                    g_linear::LinearPath::DequantBlas => {
                        Some(self.temporary(Dtype::Bf16, o * k, OP)?)
                    }
                    g_linear::LinearPath::Fused => None,
                };
                let mut sv = match scr.as_mut() {
                    Some(b) => Some(view_mut::<bf16>(b, OP, "dequant scratch")?),
                    None => None,
                };
                self.dispatch.bwd(
                    &self.dev,
                    &mut view_mut::<bf16>(dx, OP, "d_x")?,
                    &mut da,
                    &mut db,
                    &mut view_mut::<bf16>(&mut vs, OP, "vs")?,
                    sv.as_mut(),
                    &dyv,
                    &xv,
                    &usv,
                    nw,
                    &av,
                    &bv,
                    g_linear::LinearDims {
                        m: n,
                        k,
                        n: o,
                        r,
                        scale,
                    },
                    acc_dx,
                )?;
            }
            (_, dropout, d_x, grads) => {
                // vs (n, r) = S·d_y·B: Bop (n, j) at B[n·R + j].
                let mut vs = self.temporary(Dtype::Bf16, n * r, OP)?;
                let mut vsv = view_mut::<bf16>(&mut vs, OP, "vs")?;
                g_linear::lora_proj(&self.dev, &mut vsv, &dyv, &bv, r, 1, n, o, r, scale, None)?;
                let vsv = vsv.as_view();
                // (n, k) from vs (n, r) and A (r, k).
                let lora_dx = GemmShape {
                    m: n,
                    n: k,
                    k: r,
                    a_trans: false,
                    b_trans: false,
                };
                if let Some(dx) = d_x {
                    let mut scr = None;
                    let wv = self.base_bf16(w, &mut scr, OP)?;
                    let mut dxv = view_mut::<bf16>(dx, OP, "d_x")?;
                    self.gemm(&mut dxv, &dyv, &wv, base, beta)?;
                    match dropout {
                        None => self.gemm(&mut dxv, &vsv, &av, lora_dx, 1.0)?,
                        Some(d) => {
                            let mut t = self.temporary(Dtype::Bf16, n * k, OP)?;
                            let mut tv = view_mut::<bf16>(&mut t, OP, "t")?;
                            self.gemm(&mut tv, &vsv, &av, lora_dx, 0.0)?;
                            elementwise::dropout_bwd_acc(
                                &self.dev,
                                &mut dxv,
                                &tv.as_view(),
                                d.seed,
                                d.p,
                                None,
                            )?;
                        }
                    }
                }
                if let Some(g) = grads {
                    let xd = match dropout {
                        Some(d) => Some(self.dropped(&xv, d, OP)?),
                        None => None,
                    };
                    let xl = match &xd {
                        Some(b) => view::<bf16>(b, OP, "x_d")?,
                        None => xv,
                    };
                    let (mut da, mut db) = grad_views(g)?;
                    // dA (r, k) += vsᵀ·x_d;  dB (o, r) += d_yᵀ·us.
                    g_linear::lora_grad(&self.dev, &mut da, &vsv, &xl, n, r, k, None)?;
                    g_linear::lora_grad(&self.dev, &mut db, &dyv, &usv, n, o, r, None)?;
                }
            }
        }
        Ok(())
    }

    /// `(out·in,)` bf16 copy of the trainable dense weight at `w_off` of the f32 arena.
    fn dense_w(
        &self,
        params: &CudaBuf,
        w_off: usize,
        dims: LinearDims,
        op: &str,
    ) -> CResult<CudaBuf> {
        self.to_bf16(params, w_off, dims.in_features * dims.out_features, op)
    }

    pub(super) fn dense_fwd(
        &self,
        y: &mut CudaBuf,
        x: &CudaBuf,
        params: &CudaBuf,
        w_off: usize,
        dims: LinearDims,
    ) -> CResult<()> {
        const OP: &str = "dense_linear_fwd";
        let wb = self.dense_w(params, w_off, dims, OP)?;
        self.gemm(
            &mut view_mut::<bf16>(y, OP, "y")?,
            &view::<bf16>(x, OP, "x")?,
            &view::<bf16>(&wb, OP, "w")?,
            GemmShape {
                m: dims.n,
                n: dims.out_features,
                k: dims.in_features,
                a_trans: false,
                b_trans: true,
            },
            0.0,
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn dense_bwd(
        &self,
        d_x: &mut CudaBuf,
        grads: &mut CudaBuf,
        d_y: &CudaBuf,
        x: &CudaBuf,
        params: &CudaBuf,
        w_off: usize,
        dims: LinearDims,
    ) -> CResult<()> {
        const OP: &str = "dense_linear_bwd";
        let LinearDims {
            n,
            in_features: k,
            out_features: o,
        } = dims;
        let wb = self.dense_w(params, w_off, dims, OP)?;
        let dyv = view::<bf16>(d_y, OP, "d_y")?;
        // d_x (n, k) = d_y (n, o)·W (o, k)
        self.gemm(
            &mut view_mut::<bf16>(d_x, OP, "d_x")?,
            &dyv,
            &view::<bf16>(&wb, OP, "w")?,
            GemmShape {
                m: n,
                n: k,
                k: o,
                a_trans: false,
                b_trans: false,
            },
            0.0,
        )?;
        if w_off + o * k > grads.len() {
            return Err(bad(
                OP,
                "grads",
                format!("W at {w_off} does not fit the arena of {}", grads.len()),
            ));
        }
        // dW (o, k) += d_yᵀ·x, accumulated in f32.
        let mut g = view_mut::<f32>(grads, OP, "grads")?;
        g_linear::lora_grad(
            &self.dev,
            &mut g.slice_mut(w_off, o * k),
            &dyv,
            &view::<bf16>(x, OP, "x")?,
            n,
            o,
            k,
            None,
        )
    }
}

/// The slot's `dA (R, in)` and `dB (out, R)` in the f32 gradient arena `g`, as disjoint
/// writable views (A precedes B in the LoraSlot layout, so one split gives both).
fn grad_views<'a>(
    g: &'a mut CudaBuf,
    s: &LoraSlot,
    op: &str,
) -> CResult<(ViewMut<'a, f32>, ViewMut<'a, f32>)> {
    let (r, k, o) = (s.r, s.in_features, s.out_features);
    if s.a_offset + r * k > s.b_offset || s.b_offset + o * r > g.len() {
        return Err(bad(
            op,
            "grads",
            format!(
                "slot A at {} and B at {} do not fit the arena of {}",
                s.a_offset,
                s.b_offset,
                g.len()
            ),
        ));
    }
    let all = view_mut::<f32>(g, op, "grads")?;
    let (lo, hi) = all.split_at_mut(s.b_offset);
    let (da, _) = lo.split_at_mut(s.a_offset).1.split_at_mut(r * k);
    let (db, _) = hi.split_at_mut(o * r);
    Ok((da, db))
}
