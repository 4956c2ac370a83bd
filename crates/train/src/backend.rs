//! The narrow `Backend` trait the schedule is written against (design §2): one method per op
//! and direction. Argument order: outputs, saved-for-backward, inputs, weights, dims.
//! Buffers are backend handles (`Buf`), not a tensor library; shapes travel in the dims
//! structs. Every buffer in a signature documents its shape (letters in the crate docs).

use crate::error::Result;
use crate::lora::LoraSlot;

/// A frozen base weight handed to [`Backend::frozen`], `(out, in)` row-major.
pub enum FrozenWeight {
    /// Unquantized (f32 widened from f32/bf16/f16): `(out·in,)` f32.
    Dense(Vec<f32>),
    /// NF4 blockwise quantized (the source of truth for a 4-bit base).
    Nf4(qlora_nf4::Nf4Tensor),
}

/// Dims of a linear op: `x (N, in)`, `y (N, out)`, N = B·T rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearDims {
    pub n: usize,
    pub in_features: usize,
    pub out_features: usize,
}

/// LoRA branch of one linear: A, B (and their gradients) are slices of the adapter arenas.
#[derive(Clone, Copy, Debug)]
pub struct LoraArgs<'a> {
    /// Offsets, rank and scale of A `(R, in)` and B `(out, R)`.
    pub slot: &'a LoraSlot,
    /// Dropout on the LoRA input: keep with probability 1-p, scale kept by 1/(1-p); the mask
    /// is a pure function of (seed, element index), so backward and recompute regenerate it.
    pub dropout: Option<Dropout>,
}

/// Dropout probability and mask seed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f64,
    pub seed: u64,
}

/// Dims of causal GQA attention. Query rows `(B·Tq, H·D)`; key/value rows `(B·kv_rows, Hkv·D)`
/// of which the first Tk per batch are valid. Query `i` sits at position `Tk - Tq + i` and sees
/// keys `0..=Tk-Tq+i` (causal with a KV-cache offset; training has Tq = Tk).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    pub b: usize,
    pub tq: usize,
    pub tk: usize,
    pub kv_rows: usize,
    pub h: usize,
    pub hkv: usize,
    pub d: usize,
}

/// Dims of RoPE over `x (B·T, heads·D)` whose token `t` is at position `pos_offset + t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeDims {
    pub b: usize,
    pub t: usize,
    pub heads: usize,
    pub d: usize,
    pub pos_offset: usize,
}

/// The ops of one Llama training step, forward and backward. Gradients of frozen weights are
/// never formed; LoRA (and modules_to_save) gradients ACCUMULATE into the gradient arena.
pub trait Backend: Sync {
    /// A buffer of elements in the backend's compute dtype.
    type Buf: Send + Sync;
    /// A frozen base linear weight `(out, in)` prepared for this backend.
    type Frozen: Send + Sync;

    fn name(&self) -> String;
    /// Waits until every op queued so far has finished and returns the first error any of
    /// them hit since the previous call. Op methods return nothing so that the schedule stays
    /// readable; a backend whose ops can fail (a device launch, an out-of-memory) keeps the
    /// first error sticky, skips later ops, and reports it here. Timing wrappers call this to
    /// attribute asynchronous work to the op that queued it.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    /// A zero-filled buffer of `n` elements.
    fn zeros(&self, n: usize) -> Self::Buf;
    /// Host f32 → buffer (rounded to the compute dtype).
    fn upload(&self, host: &[f32]) -> Self::Buf;
    /// A zero-filled buffer of `n` elements the backend keeps in f32 whatever its compute
    /// dtype: the LoRA master weights' gradient arena, per-row statistics (`rmsnorm` rstd,
    /// cross-entropy lse) and attention's saved buffer. Same as [`Backend::zeros`] for an f32
    /// backend.
    fn zeros_f32(&self, n: usize) -> Self::Buf {
        self.zeros(n)
    }
    /// Host f32 → an f32 buffer (exact): the LoRA master weights (the adapter arena).
    fn upload_f32(&self, host: &[f32]) -> Self::Buf {
        self.upload(host)
    }
    /// The RoPE table for positions `0..positions` from the inverse frequencies `(D/2,)`
    /// (llama3 scaling already applied), in whatever form [`Backend::rope_fwd`] reads: by
    /// default the `(P, D)` cos/sin table of [`crate::cpu::rope::table_f32`].
    fn rope_table(&self, inv_freq: &[f64], positions: usize) -> Self::Buf {
        self.upload(&crate::cpu::rope::table_f32(inv_freq, positions))
    }
    /// Buffer → host f32.
    fn download(&self, buf: &Self::Buf) -> Vec<f32>;
    fn len(&self, buf: &Self::Buf) -> usize;
    /// Prepare a frozen weight `(out, in)`; `name` is for errors.
    fn frozen(&self, name: &str, w: FrozenWeight, out: usize, inp: usize) -> Result<Self::Frozen>;
    /// QLoRA's quantize-on-load: the dense `(out, in)` weight `data` quantized to NF4
    /// (bitsandbytes' rules, blocksize `qb`, optionally double-quantized; `dtype` is the
    /// checkpoint dtype the QuantState records) and prepared. By default on the host
    /// (`Nf4Tensor::quantize`, then [`Backend::frozen`]); a device backend quantizes where the
    /// weight will live.
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
    ) -> Result<Self::Frozen> {
        let t = qlora_nf4::Nf4Tensor::quantize(name, &data, &[out, inp], qb, double_quant, dtype)?;
        self.frozen(name, FrozenWeight::Nf4(t), out, inp)
    }
    /// The frozen weight as f32 `(out·in,)` (NF4: dequantized), for merging.
    fn frozen_to_f32(&self, w: &Self::Frozen) -> Vec<f32>;

    /// `dst[dst_off..dst_off+n] = src[src_off..src_off+n]`.
    fn copy(&self, dst: &mut Self::Buf, dst_off: usize, src: &Self::Buf, src_off: usize, n: usize);
    /// `dst = 0`.
    fn zero(&self, dst: &mut Self::Buf);
    /// Residual add: `dst += src` (same length).
    fn add_acc(&self, dst: &mut Self::Buf, src: &Self::Buf);

    /// `out (N, C) = table[ids]`, `table (V, C)` at element offset `table_off`.
    fn embedding_fwd(
        &self,
        out: &mut Self::Buf,
        ids: &[u32],
        table: &Self::Buf,
        table_off: usize,
        c: usize,
    );
    /// Does this backend keep the frozen input embedding `(V, C)` in host memory? A step reads
    /// only its N rows, so a device backend spends no device memory on the table (Llama 3's
    /// 128 256 × 4096 is 1 GB in bf16) and uploads the gathered rows instead
    /// ([`Backend::embedding_fwd_host`]).
    fn embedding_on_host(&self) -> bool {
        false
    }
    /// `out (N, C) = table[ids]` for a host table `(V·C,)` f32 (ids already checked < V by
    /// the schedule). Default: gather on the host, upload, copy into `out`.
    fn embedding_fwd_host(&self, out: &mut Self::Buf, ids: &[u32], table: &[f32], c: usize) {
        let rows = crate::model::gather_rows(table, ids, c, |x| x)
            .unwrap_or_else(|id| unreachable!("token id {id} passed the schedule's check"));
        let tmp = self.upload(&rows);
        self.copy(out, 0, &tmp, 0, rows.len());
    }
    /// `d_table[ids[i]] += d_out[i]` into `d_table` at element offset `off`.
    fn embedding_bwd_acc(
        &self,
        d_table: &mut Self::Buf,
        off: usize,
        ids: &[u32],
        d_out: &Self::Buf,
        c: usize,
    );

    /// `out (N, C) = x · rstd · w`, `rstd (N,)` saved, `w (C,)`.
    fn rmsnorm_fwd(
        &self,
        out: &mut Self::Buf,
        rstd: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        c: usize,
        eps: f64,
    );
    /// `d_x (N, C)` (overwritten) from `d_out`, the saved `x` and `rstd`; the norm weight is frozen.
    fn rmsnorm_bwd(
        &self,
        d_x: &mut Self::Buf,
        d_out: &Self::Buf,
        x: &Self::Buf,
        rstd: &Self::Buf,
        w: &Self::Buf,
        c: usize,
    );

    /// Rotate `x (B·T, heads·D)` in place; `table (P, D)`: per position, D/2 cos then D/2 sin.
    fn rope_fwd(&self, x: &mut Self::Buf, table: &Self::Buf, dims: RopeDims);
    /// The transpose rotation (by −θ) applied to `d_x` in place.
    fn rope_bwd(&self, d_x: &mut Self::Buf, table: &Self::Buf, dims: RopeDims);

    /// Elements of the attention save buffer for `dims`.
    fn attention_saved_len(&self, dims: AttnDims) -> usize;
    /// `out (B·Tq, H·D)`, `saved` (backend-defined, `attention_saved_len`).
    fn attention_fwd(
        &self,
        out: &mut Self::Buf,
        saved: &mut Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        dims: AttnDims,
    );
    /// `d_q (B·Tq, H·D)`, `d_k`, `d_v (B·kv_rows, Hkv·D)`, all overwritten.
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self,
        d_q: &mut Self::Buf,
        d_k: &mut Self::Buf,
        d_v: &mut Self::Buf,
        d_out: &Self::Buf,
        saved: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        dims: AttnDims,
    );

    /// `out = silu(gate) ⊙ up`, all `(N, I)`.
    fn swiglu_fwd(&self, out: &mut Self::Buf, gate: &Self::Buf, up: &Self::Buf);
    /// `d_gate`, `d_up` (overwritten) from `d_out` and the saved `gate`, `up`.
    fn swiglu_bwd(
        &self,
        d_gate: &mut Self::Buf,
        d_up: &mut Self::Buf,
        d_out: &Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
    );

    /// `y (N, out) = x·deq(W)ᵀ + bias + S·(drop(x)·Aᵀ)·Bᵀ`; `u (N, R)` = drop(x)·Aᵀ saved for bwd
    /// (pass `None` for inference; only this backend's bwd reads it: CudaBackend stores it
    /// pre-scaled, S·drop(x)·Aᵀ). `params` is the adapter arena.
    #[allow(clippy::too_many_arguments)]
    fn nf4_lora_linear_fwd(
        &self,
        y: &mut Self::Buf,
        u: Option<&mut Self::Buf>,
        x: &Self::Buf,
        w: &Self::Frozen,
        bias: Option<&Self::Buf>,
        lora: Option<(&Self::Buf, LoraArgs<'_>)>,
        dims: LinearDims,
    );
    /// `d_x (N, in)` = (or += when `acc_dx`) `d_y·deq(W) + S·((d_y·B)·A) ⊙ mask`;
    /// `grads` (adapter gradient arena): `dB += S·d_yᵀ·u`, `dA += S·(d_y·B)ᵀ·drop(x)`.
    #[allow(clippy::too_many_arguments)]
    fn nf4_lora_linear_bwd(
        &self,
        d_x: Option<&mut Self::Buf>,
        acc_dx: bool,
        grads: Option<&mut Self::Buf>,
        d_y: &Self::Buf,
        x: &Self::Buf,
        u: Option<&Self::Buf>,
        w: &Self::Frozen,
        lora: Option<(&Self::Buf, LoraArgs<'_>)>,
        dims: LinearDims,
    );

    /// A trainable dense linear (modules_to_save `lm_head`): `y (N, out) = x·Wᵀ`, W `(out, in)`
    /// at element offset `w_off` of the adapter arena `params`.
    fn dense_linear_fwd(
        &self,
        y: &mut Self::Buf,
        x: &Self::Buf,
        params: &Self::Buf,
        w_off: usize,
        dims: LinearDims,
    );
    /// `d_x = d_y·W` (overwritten), `dW += d_yᵀ·x` into `grads` at `w_off`.
    #[allow(clippy::too_many_arguments)]
    fn dense_linear_bwd(
        &self,
        d_x: &mut Self::Buf,
        grads: &mut Self::Buf,
        d_y: &Self::Buf,
        x: &Self::Buf,
        params: &Self::Buf,
        w_off: usize,
        dims: LinearDims,
    );

    /// Per-row cross entropy of `logits (N, V)` against `targets (N,)` (-100 = ignored):
    /// `lse (N,)` saved; returns (Σ loss over non-ignored rows in f64, count).
    fn cross_entropy_fwd(
        &self,
        lse: &mut Self::Buf,
        logits: &Self::Buf,
        targets: &[i32],
        v: usize,
    ) -> (f64, usize);
    /// `d_logits (N, V) = scale·(softmax(logits) − onehot(target))`, zero on ignored rows;
    /// written in place over `logits` (the logits are dead after this).
    fn cross_entropy_bwd(
        &self,
        logits_to_d: &mut Self::Buf,
        lse: &Self::Buf,
        targets: &[i32],
        v: usize,
        scale: f64,
    );
}
