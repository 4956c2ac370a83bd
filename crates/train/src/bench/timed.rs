//! [`Timed<B>`]: a backend that forwards every op to `B` and, while profiling, waits for the
//! op to finish ([`Backend::synchronize`]) and adds its wall time to the op's class. Without
//! profiling it only forwards (no synchronize), so the same model and adapter serve the
//! headline (unprofiled) and the per-op (profiled) passes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::backend::{AttnDims, Backend, FrozenWeight, LinearDims, LoraArgs, RopeDims};
use crate::error::Result;

/// The op classes of the profile, in print order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OpClass {
    /// The NF4 + LoRA projections of the decoder layers (fwd and bwd).
    Linear,
    /// lm_head (the `(N, V)` product, fwd and bwd).
    LmHead,
    Attention,
    /// rmsnorm fwd and bwd.
    Norm,
    Rope,
    Swiglu,
    Embedding,
    /// Cross entropy fwd and bwd.
    Loss,
    /// copy, zero, residual add, allocation, upload/download, building the rope table.
    Memory,
    /// The AdamW step over the adapter arena (timed by the bench loop, not by `Timed`).
    Optimizer,
}

impl OpClass {
    pub const ALL: [OpClass; 10] = [
        OpClass::Linear,
        OpClass::LmHead,
        OpClass::Attention,
        OpClass::Norm,
        OpClass::Rope,
        OpClass::Swiglu,
        OpClass::Embedding,
        OpClass::Loss,
        OpClass::Memory,
        OpClass::Optimizer,
    ];
    pub fn name(self) -> &'static str {
        match self {
            OpClass::Linear => "linear",
            OpClass::LmHead => "lm_head",
            OpClass::Attention => "attention",
            OpClass::Norm => "norm",
            OpClass::Rope => "rope",
            OpClass::Swiglu => "swiglu",
            OpClass::Embedding => "embedding",
            OpClass::Loss => "loss",
            OpClass::Memory => "memory",
            OpClass::Optimizer => "optimizer",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// Profiling wrapper around a backend.
pub struct Timed<B> {
    pub inner: B,
    /// V: a linear with `V` outputs is lm_head.
    vocab_size: usize,
    profiling: AtomicBool,
    /// Accumulated time and call count per [`OpClass`].
    totals: Mutex<[(Duration, u64); 10]>,
    /// First error `synchronize` reported while profiling.
    error: Mutex<Option<crate::error::TrainError>>,
}

impl<B: Backend> Timed<B> {
    pub fn new(inner: B, vocab_size: usize) -> Timed<B> {
        Timed {
            inner,
            vocab_size,
            profiling: AtomicBool::new(false),
            totals: Mutex::new([(Duration::ZERO, 0); 10]),
            error: Mutex::new(None),
        }
    }
    /// Turn per-op synchronize-and-time on or off.
    pub fn set_profiling(&self, on: bool) {
        self.profiling.store(on, Ordering::SeqCst);
    }
    /// Clear the accumulated times.
    pub fn reset(&self) {
        *self.totals.lock().unwrap_or_else(|e| e.into_inner()) = [(Duration::ZERO, 0); 10];
    }
    /// Add time to a class measured outside the wrapper (the optimizer step).
    pub fn add(&self, class: OpClass, d: Duration) {
        let mut t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        t[class.index()].0 += d;
        t[class.index()].1 += 1;
    }
    /// `(class, total time, calls)` for every class, in [`OpClass::ALL`] order.
    pub fn totals(&self) -> Vec<(OpClass, Duration, u64)> {
        let t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        OpClass::ALL
            .iter()
            .map(|&c| (c, t[c.index()].0, t[c.index()].1))
            .collect()
    }
    /// The first error a profiled op's synchronize returned, if any (taken).
    pub fn take_error(&self) -> Option<crate::error::TrainError> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn run<R>(&self, class: OpClass, f: impl FnOnce(&B) -> R) -> R {
        if !self.profiling.load(Ordering::Relaxed) {
            return f(&self.inner);
        }
        let t0 = Instant::now();
        let r = f(&self.inner);
        if let Err(e) = self.inner.synchronize() {
            self.error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(e);
        }
        self.add(class, t0.elapsed());
        r
    }
    fn linear_class(&self, dims: LinearDims) -> OpClass {
        if dims.out_features == self.vocab_size {
            OpClass::LmHead
        } else {
            OpClass::Linear
        }
    }
}

impl<B: Backend> Backend for Timed<B> {
    type Buf = B::Buf;
    type Frozen = B::Frozen;

    fn name(&self) -> String {
        self.inner.name()
    }
    fn synchronize(&self) -> Result<()> {
        if let Some(e) = self.take_error() {
            return Err(e);
        }
        self.inner.synchronize()
    }
    fn zeros(&self, n: usize) -> B::Buf {
        self.run(OpClass::Memory, |b| b.zeros(n))
    }
    fn upload(&self, host: &[f32]) -> B::Buf {
        self.run(OpClass::Memory, |b| b.upload(host))
    }
    fn zeros_f32(&self, n: usize) -> B::Buf {
        self.run(OpClass::Memory, |b| b.zeros_f32(n))
    }
    fn upload_f32(&self, host: &[f32]) -> B::Buf {
        self.run(OpClass::Memory, |b| b.upload_f32(host))
    }
    fn rope_table(&self, inv_freq: &[f64], positions: usize) -> B::Buf {
        self.run(OpClass::Memory, |b| b.rope_table(inv_freq, positions))
    }
    fn download(&self, buf: &B::Buf) -> Vec<f32> {
        self.run(OpClass::Memory, |b| b.download(buf))
    }
    fn len(&self, buf: &B::Buf) -> usize {
        self.inner.len(buf)
    }
    fn frozen(&self, name: &str, w: FrozenWeight, out: usize, inp: usize) -> Result<B::Frozen> {
        self.inner.frozen(name, w, out, inp)
    }
    #[allow(clippy::too_many_arguments)]
    fn quantize_frozen(
        &self,
        name: &str,
        data: Vec<f32>,
        out: usize,
        inp: usize,
        qb: usize,
        double_quant: bool,
        dtype: qlora_nf4::Dtype,
    ) -> Result<B::Frozen> {
        self.inner
            .quantize_frozen(name, data, out, inp, qb, double_quant, dtype)
    }
    fn frozen_to_f32(&self, w: &B::Frozen) -> Vec<f32> {
        self.inner.frozen_to_f32(w)
    }
    fn copy(&self, dst: &mut B::Buf, dst_off: usize, src: &B::Buf, src_off: usize, n: usize) {
        self.run(OpClass::Memory, |b| b.copy(dst, dst_off, src, src_off, n))
    }
    fn zero(&self, dst: &mut B::Buf) {
        self.run(OpClass::Memory, |b| b.zero(dst))
    }
    fn add_acc(&self, dst: &mut B::Buf, src: &B::Buf) {
        self.run(OpClass::Memory, |b| b.add_acc(dst, src))
    }
    fn embedding_fwd(&self, out: &mut B::Buf, ids: &[u32], table: &B::Buf, off: usize, c: usize) {
        self.run(OpClass::Embedding, |b| {
            b.embedding_fwd(out, ids, table, off, c)
        })
    }
    fn embedding_bwd_acc(
        &self,
        d_table: &mut B::Buf,
        off: usize,
        ids: &[u32],
        d_out: &B::Buf,
        c: usize,
    ) {
        self.run(OpClass::Embedding, |b| {
            b.embedding_bwd_acc(d_table, off, ids, d_out, c)
        })
    }
    fn rmsnorm_fwd(
        &self,
        out: &mut B::Buf,
        rstd: &mut B::Buf,
        x: &B::Buf,
        w: &B::Buf,
        c: usize,
        eps: f64,
    ) {
        self.run(OpClass::Norm, |b| b.rmsnorm_fwd(out, rstd, x, w, c, eps))
    }
    fn rmsnorm_bwd(
        &self,
        d_x: &mut B::Buf,
        d_out: &B::Buf,
        x: &B::Buf,
        rstd: &B::Buf,
        w: &B::Buf,
        c: usize,
    ) {
        self.run(OpClass::Norm, |b| b.rmsnorm_bwd(d_x, d_out, x, rstd, w, c))
    }
    fn rope_fwd(&self, x: &mut B::Buf, table: &B::Buf, dims: RopeDims) {
        self.run(OpClass::Rope, |b| b.rope_fwd(x, table, dims))
    }
    fn rope_bwd(&self, d_x: &mut B::Buf, table: &B::Buf, dims: RopeDims) {
        self.run(OpClass::Rope, |b| b.rope_bwd(d_x, table, dims))
    }
    fn attention_saved_len(&self, dims: AttnDims) -> usize {
        self.inner.attention_saved_len(dims)
    }
    fn attention_fwd(
        &self,
        out: &mut B::Buf,
        saved: &mut B::Buf,
        q: &B::Buf,
        k: &B::Buf,
        v: &B::Buf,
        dims: AttnDims,
    ) {
        self.run(OpClass::Attention, |b| {
            b.attention_fwd(out, saved, q, k, v, dims)
        })
    }
    fn attention_bwd(
        &self,
        d_q: &mut B::Buf,
        d_k: &mut B::Buf,
        d_v: &mut B::Buf,
        d_out: &B::Buf,
        saved: &B::Buf,
        q: &B::Buf,
        k: &B::Buf,
        v: &B::Buf,
        dims: AttnDims,
    ) {
        self.run(OpClass::Attention, |b| {
            b.attention_bwd(d_q, d_k, d_v, d_out, saved, q, k, v, dims)
        })
    }
    fn swiglu_fwd(&self, out: &mut B::Buf, gate: &B::Buf, up: &B::Buf) {
        self.run(OpClass::Swiglu, |b| b.swiglu_fwd(out, gate, up))
    }
    fn swiglu_bwd(
        &self,
        d_gate: &mut B::Buf,
        d_up: &mut B::Buf,
        d_out: &B::Buf,
        gate: &B::Buf,
        up: &B::Buf,
    ) {
        self.run(OpClass::Swiglu, |b| {
            b.swiglu_bwd(d_gate, d_up, d_out, gate, up)
        })
    }
    fn nf4_lora_linear_fwd(
        &self,
        y: &mut B::Buf,
        u: Option<&mut B::Buf>,
        x: &B::Buf,
        w: &B::Frozen,
        bias: Option<&B::Buf>,
        lora: Option<(&B::Buf, LoraArgs<'_>)>,
        dims: LinearDims,
    ) {
        self.run(self.linear_class(dims), |b| {
            b.nf4_lora_linear_fwd(y, u, x, w, bias, lora, dims)
        })
    }
    fn nf4_lora_linear_bwd(
        &self,
        d_x: Option<&mut B::Buf>,
        acc_dx: bool,
        grads: Option<&mut B::Buf>,
        d_y: &B::Buf,
        x: &B::Buf,
        u: Option<&B::Buf>,
        w: &B::Frozen,
        lora: Option<(&B::Buf, LoraArgs<'_>)>,
        dims: LinearDims,
    ) {
        self.run(self.linear_class(dims), |b| {
            b.nf4_lora_linear_bwd(d_x, acc_dx, grads, d_y, x, u, w, lora, dims)
        })
    }
    fn dense_linear_fwd(
        &self,
        y: &mut B::Buf,
        x: &B::Buf,
        params: &B::Buf,
        w_off: usize,
        dims: LinearDims,
    ) {
        self.run(self.linear_class(dims), |b| {
            b.dense_linear_fwd(y, x, params, w_off, dims)
        })
    }
    fn dense_linear_bwd(
        &self,
        d_x: &mut B::Buf,
        grads: &mut B::Buf,
        d_y: &B::Buf,
        x: &B::Buf,
        params: &B::Buf,
        w_off: usize,
        dims: LinearDims,
    ) {
        self.run(self.linear_class(dims), |b| {
            b.dense_linear_bwd(d_x, grads, d_y, x, params, w_off, dims)
        })
    }
    fn cross_entropy_fwd(
        &self,
        lse: &mut B::Buf,
        logits: &B::Buf,
        targets: &[i32],
        v: usize,
    ) -> (f64, usize) {
        self.run(OpClass::Loss, |b| {
            b.cross_entropy_fwd(lse, logits, targets, v)
        })
    }
    fn cross_entropy_bwd(
        &self,
        logits_to_d: &mut B::Buf,
        lse: &B::Buf,
        targets: &[i32],
        v: usize,
        scale: f64,
    ) {
        self.run(OpClass::Loss, |b| {
            b.cross_entropy_bwd(logits_to_d, lse, targets, v, scale)
        })
    }
}
