//! `Backend` for the CPU: buffers are `Vec<T>`, every op calls `cpu::<op>::{fwd,bwd}`.

use std::marker::PhantomData;

use super::{
    add_acc, attention, cross_entropy, dense_linear, embedding, nf4_lora_linear, rmsnorm, rope,
    swiglu, Real,
};
use crate::backend::{AttnDims, Backend, FrozenWeight, LinearDims, LoraArgs, RopeDims};
use crate::error::{Result, TrainError};

/// The CPU backend in element type `T` (f32 for training; f64 for gradient checks). It uses
/// the rayon pool it is called in (wrap calls in `ThreadPool::install` to pick threads).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend<T: Real = f32> {
    _t: PhantomData<T>,
}

impl<T: Real> CpuBackend<T> {
    pub fn new() -> Self {
        CpuBackend { _t: PhantomData }
    }
}

/// A frozen linear weight on the CPU: the NF4 tensor (the source of truth: saved, hashed,
/// merged from) and, when the GEMM cannot read NF4 codes itself (f64, no AVX-512F:
/// [`super::reads_nf4_codes`]), its dequantized `(out, in)` matrix in `T` cached at load
/// (exact: NF4 dequantization is one f32 product); a dense weight is that matrix alone.
pub struct CpuFrozen<T> {
    /// (out·in,) T, the compute copy; empty for an NF4 weight the GEMM reads as codes
    pub w: Vec<T>,
    /// The packed NF4 weight when the base is 4-bit.
    pub nf4: Option<qlora_nf4::Nf4Tensor>,
    /// (n_blocks,) f32: the NF4 weight's per-block absmax (double quantization undone), read
    /// by the GEMM that dequantizes while packing; empty when `w` holds the weight.
    pub scales: Vec<f32>,
    pub out_features: usize,
    pub in_features: usize,
}

impl<T> CpuFrozen<T> {
    /// The weight as the products read it (the codes alongside the T copy for NF4).
    pub fn as_ref(&self) -> super::FrozenRef<'_, T> {
        super::FrozenRef {
            w: &self.w,
            nf4: self.nf4.as_ref().map(|t| super::Nf4W::of(t, &self.scales)),
        }
    }
}

fn lora_of<'a, T>(
    l: Option<(&'a Vec<T>, LoraArgs<'a>)>,
) -> Option<(
    &'a [T],
    &'a crate::lora::LoraSlot,
    Option<crate::backend::Dropout>,
)> {
    l.map(|(p, a)| (p.as_slice(), a.slot, a.dropout))
}

impl<T: Real> Backend for CpuBackend<T> {
    type Buf = Vec<T>;
    type Frozen = CpuFrozen<T>;

    fn name(&self) -> String {
        format!("cpu-{}", std::any::type_name::<T>())
    }
    fn zeros(&self, n: usize) -> Vec<T> {
        vec![T::zero(); n]
    }
    fn upload(&self, host: &[f32]) -> Vec<T> {
        host.iter().map(|&x| T::of(x as f64)).collect()
    }
    fn download(&self, buf: &Vec<T>) -> Vec<f32> {
        buf.iter().map(|&x| x.f64() as f32).collect()
    }
    fn len(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }
    fn frozen(&self, name: &str, w: FrozenWeight, out: usize, inp: usize) -> Result<CpuFrozen<T>> {
        let (data, nf4) = match w {
            FrozenWeight::Dense(v) => (v, None),
            FrozenWeight::Nf4(t) => {
                if t.shape() != [out, inp] {
                    return Err(TrainError::tensor(
                        "<model>",
                        name,
                        format!("NF4 shape {:?}, expected [{out}, {inp}]", t.shape()),
                    ));
                }
                // The GEMM reads codes and constants directly: their lengths must hold.
                t.state.validate(name)?;
                if t.packed.len() < (out * inp).div_ceil(2) {
                    return Err(TrainError::tensor(
                        "<model>",
                        name,
                        format!(
                            "{} bytes of NF4 codes for {out}×{inp} weights",
                            t.packed.len()
                        ),
                    ));
                }
                // The GEMM reads the codes where it can; otherwise the T copy it multiplies.
                let copy = if super::reads_nf4_codes::<T>(t.state.blocksize) {
                    Vec::new()
                } else {
                    t.dequantize_f32()
                };
                (copy, Some(t))
            }
        };
        if nf4.is_none() && data.len() != out * inp {
            return Err(TrainError::tensor(
                "<model>",
                name,
                format!("{} elements, expected {out}×{inp}", data.len()),
            ));
        }
        Ok(CpuFrozen {
            w: data.iter().map(|&x| T::of(x as f64)).collect(),
            // Only the code-reading GEMM needs the per-block scales.
            scales: match &nf4 {
                Some(t) if data.is_empty() => t.state.absmax_f32(),
                _ => Vec::new(),
            },
            nf4,
            out_features: out,
            in_features: inp,
        })
    }
    fn frozen_to_f32(&self, w: &CpuFrozen<T>) -> Vec<f32> {
        match &w.nf4 {
            Some(t) if w.w.is_empty() => t.dequantize_f32(),
            _ => w.w.iter().map(|&x| x.f64() as f32).collect(),
        }
    }

    fn copy(&self, dst: &mut Vec<T>, dst_off: usize, src: &Vec<T>, src_off: usize, n: usize) {
        dst[dst_off..dst_off + n].copy_from_slice(&src[src_off..src_off + n]);
    }
    fn zero(&self, dst: &mut Vec<T>) {
        dst.iter_mut().for_each(|x| *x = T::zero());
    }
    fn add_acc(&self, dst: &mut Vec<T>, src: &Vec<T>) {
        add_acc(dst, src)
    }

    fn embedding_fwd(
        &self,
        out: &mut Vec<T>,
        ids: &[u32],
        table: &Vec<T>,
        table_off: usize,
        c: usize,
    ) {
        embedding::fwd(out, ids, &table[table_off..], c)
    }
    fn embedding_bwd_acc(
        &self,
        d_table: &mut Vec<T>,
        off: usize,
        ids: &[u32],
        d_out: &Vec<T>,
        c: usize,
    ) {
        embedding::bwd_acc(&mut d_table[off..], ids, d_out, c)
    }

    fn rmsnorm_fwd(
        &self,
        out: &mut Vec<T>,
        rstd: &mut Vec<T>,
        x: &Vec<T>,
        w: &Vec<T>,
        c: usize,
        eps: f64,
    ) {
        rmsnorm::fwd(out, rstd, x, w, c, eps)
    }
    fn rmsnorm_bwd(
        &self,
        d_x: &mut Vec<T>,
        d_out: &Vec<T>,
        x: &Vec<T>,
        rstd: &Vec<T>,
        w: &Vec<T>,
        c: usize,
    ) {
        rmsnorm::bwd(d_x, d_out, x, rstd, w, c)
    }

    fn rope_fwd(&self, x: &mut Vec<T>, table: &Vec<T>, dims: RopeDims) {
        rope::fwd(x, table, dims)
    }
    fn rope_bwd(&self, d_x: &mut Vec<T>, table: &Vec<T>, dims: RopeDims) {
        rope::bwd(d_x, table, dims)
    }

    fn attention_saved_len(&self, dims: AttnDims) -> usize {
        attention::saved_len(dims)
    }
    fn attention_fwd(
        &self,
        out: &mut Vec<T>,
        saved: &mut Vec<T>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        dims: AttnDims,
    ) {
        attention::fwd(out, saved, q, k, v, dims)
    }
    fn attention_bwd(
        &self,
        d_q: &mut Vec<T>,
        d_k: &mut Vec<T>,
        d_v: &mut Vec<T>,
        d_out: &Vec<T>,
        saved: &Vec<T>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        dims: AttnDims,
    ) {
        attention::bwd(d_q, d_k, d_v, d_out, saved, q, k, v, dims)
    }

    fn swiglu_fwd(&self, out: &mut Vec<T>, gate: &Vec<T>, up: &Vec<T>) {
        swiglu::fwd(out, gate, up)
    }
    fn swiglu_bwd(
        &self,
        d_gate: &mut Vec<T>,
        d_up: &mut Vec<T>,
        d_out: &Vec<T>,
        gate: &Vec<T>,
        up: &Vec<T>,
    ) {
        swiglu::bwd(d_gate, d_up, d_out, gate, up)
    }

    fn nf4_lora_linear_fwd(
        &self,
        y: &mut Vec<T>,
        u: Option<&mut Vec<T>>,
        x: &Vec<T>,
        w: &CpuFrozen<T>,
        bias: Option<&Vec<T>>,
        lora: Option<(&Vec<T>, LoraArgs<'_>)>,
        dims: LinearDims,
    ) {
        nf4_lora_linear::fwd(
            y,
            u.map(|u| u.as_mut_slice()),
            x,
            w.as_ref(),
            bias.map(|b| b.as_slice()),
            lora_of(lora),
            dims,
        )
    }
    fn nf4_lora_linear_bwd(
        &self,
        d_x: Option<&mut Vec<T>>,
        acc_dx: bool,
        grads: Option<&mut Vec<T>>,
        d_y: &Vec<T>,
        x: &Vec<T>,
        u: Option<&Vec<T>>,
        w: &CpuFrozen<T>,
        lora: Option<(&Vec<T>, LoraArgs<'_>)>,
        dims: LinearDims,
    ) {
        nf4_lora_linear::bwd(
            d_x.map(|d| d.as_mut_slice()),
            acc_dx,
            grads.map(|g| g.as_mut_slice()),
            d_y,
            x,
            u.map(|u| u.as_slice()),
            w.as_ref(),
            lora_of(lora),
            dims,
        )
    }

    fn dense_linear_fwd(
        &self,
        y: &mut Vec<T>,
        x: &Vec<T>,
        params: &Vec<T>,
        w_off: usize,
        dims: LinearDims,
    ) {
        let n = dims.in_features * dims.out_features;
        dense_linear::fwd(y, x, &params[w_off..w_off + n], dims)
    }
    fn dense_linear_bwd(
        &self,
        d_x: &mut Vec<T>,
        grads: &mut Vec<T>,
        d_y: &Vec<T>,
        x: &Vec<T>,
        params: &Vec<T>,
        w_off: usize,
        dims: LinearDims,
    ) {
        let n = dims.in_features * dims.out_features;
        dense_linear::bwd_acc_dw(
            d_x,
            &mut grads[w_off..w_off + n],
            d_y,
            x,
            &params[w_off..w_off + n],
            dims,
        )
    }

    fn cross_entropy_fwd(
        &self,
        lse: &mut Vec<T>,
        logits: &Vec<T>,
        targets: &[i32],
        v: usize,
    ) -> (f64, usize) {
        cross_entropy::fwd(lse, logits, targets, v)
    }
    fn cross_entropy_bwd(
        &self,
        logits_to_d: &mut Vec<T>,
        lse: &Vec<T>,
        targets: &[i32],
        v: usize,
        scale: f64,
    ) {
        cross_entropy::bwd(logits_to_d, lse, targets, v, scale)
    }
}
