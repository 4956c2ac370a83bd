//! The training schedule, written once for every [`Backend`] (design §1): forward, loss,
//! backward into the adapter's gradient arena, with optional gradient checkpointing (save
//! each layer's input, recompute the layer in backward), and the inference forward with a
//! position offset and KV cache for generation.

use crate::backend::{AttnDims, Backend, Dropout, LinearDims, LoraArgs, RopeDims};
use crate::cpu::cross_entropy::IGNORE_INDEX;
use crate::cpu::splitmix64;
use crate::error::{Result, TrainError};
use crate::lora::{AdapterLayout, AdapterWeights, LoraConfig, Proj, SavedModule};
use crate::model::{Embedding, Model};

/// An adapter on a backend: parameters and gradients, each ONE flat arena `(numel,)` sliced
/// by `layout` (the optimizer steps the whole arena at once).
pub struct Adapter<B: Backend> {
    pub config: LoraConfig,
    pub layout: AdapterLayout,
    /// (numel,) trainable parameters
    pub params: B::Buf,
    /// (numel,) gradients; `forward_backward` ACCUMULATES here, `zero_grads` clears.
    pub grads: B::Buf,
}

impl<B: Backend> Adapter<B> {
    /// Upload host weights (gradients start at zero).
    pub fn new(be: &B, w: &AdapterWeights) -> Adapter<B> {
        Adapter {
            config: w.config.clone(),
            layout: w.layout.clone(),
            params: be.upload_f32(&w.data),
            grads: be.zeros_f32(w.layout.numel),
        }
    }
    /// Download the parameters as host adapter weights (for saving).
    pub fn to_weights(&self, be: &B) -> AdapterWeights {
        AdapterWeights {
            config: self.config.clone(),
            layout: self.layout.clone(),
            data: be.download(&self.params),
        }
    }
    pub fn zero_grads(&mut self, be: &B) {
        be.zero(&mut self.grads);
    }
    fn lora(
        &self,
        layer: usize,
        p: Proj,
        dropout: Option<Dropout>,
    ) -> Option<(&B::Buf, LoraArgs<'_>)> {
        self.layout
            .slot(layer, p)
            .map(|slot| (&self.params, LoraArgs { slot, dropout }))
    }
}

/// One micro-batch: `input_ids (B·T,)` and unshifted `labels (B·T,)` as transformers takes them
/// (`-100` = ignored; the model shifts: position t predicts `labels[t+1]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
    pub b: usize,
    pub t: usize,
}

impl Batch {
    /// Check lengths; labels −100 or < vocab is checked by the schedule.
    pub fn new(input_ids: Vec<u32>, labels: Vec<i32>, b: usize, t: usize) -> Result<Batch> {
        if b == 0 || t == 0 || input_ids.len() != b * t || labels.len() != b * t {
            return Err(TrainError::Batch(format!(
                "input_ids has {} and labels {} elements, expected B·T = {b}·{t} > 0",
                input_ids.len(),
                labels.len()
            )));
        }
        Ok(Batch {
            input_ids,
            labels,
            b,
            t,
        })
    }
    /// Causal-LM batch with `labels = input_ids`.
    pub fn causal_lm(input_ids: Vec<u32>, b: usize, t: usize) -> Result<Batch> {
        let labels = input_ids.iter().map(|&x| x as i32).collect();
        Batch::new(input_ids, labels, b, t)
    }
    /// Per-position targets `(B·T,)`: `labels[t+1]`, and −100 at each sequence's last position.
    pub fn shifted_targets(&self) -> Vec<i32> {
        let mut out = vec![IGNORE_INDEX; self.b * self.t];
        for bi in 0..self.b {
            for ti in 0..self.t - 1 {
                out[bi * self.t + ti] = self.labels[bi * self.t + ti + 1];
            }
        }
        out
    }
    /// Tokens that carry loss (non-ignored shifted targets).
    pub fn label_tokens(&self) -> usize {
        self.shifted_targets()
            .iter()
            .filter(|&&t| t != IGNORE_INDEX)
            .count()
    }
}

/// How the summed token loss is normalised before backward.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LossScale {
    /// Mean over this batch's label tokens (transformers' default).
    Mean,
    /// Divide by this many tokens: the label tokens of the whole accumulated batch, so that
    /// gradient accumulation equals one large batch.
    PerTokens(usize),
}

/// Options of one `forward_backward`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOptions {
    /// Save only each layer's input and recompute the layer in backward.
    pub checkpointing: bool,
    /// Seed of the LoRA dropout masks (vary per micro-batch); unused when dropout is 0.
    pub dropout_seed: u64,
    pub loss_scale: LossScale,
}

impl Default for StepOptions {
    fn default() -> Self {
        StepOptions {
            checkpointing: false,
            dropout_seed: 0,
            loss_scale: LossScale::Mean,
        }
    }
}

/// Summed token loss and how many tokens it covers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossStats {
    pub sum: f64,
    pub tokens: usize,
}

impl LossStats {
    /// Mean loss per label token (NaN when there are none).
    pub fn mean(&self) -> f64 {
        self.sum / self.tokens as f64
    }
}

/// Per-layer key/value cache for generation: `k`, `v` each `(B·capacity, Hkv·D)` per layer.
pub struct KvCache<B: Backend> {
    pub k: Vec<B::Buf>,
    pub v: Vec<B::Buf>,
    pub b: usize,
    pub capacity: usize,
    /// Positions already cached.
    pub len: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(be: &B, model: &Model<B>, b: usize, capacity: usize) -> KvCache<B> {
        let kvd = model.config.num_kv_heads * model.config.head_dim;
        let n = model.config.num_layers;
        KvCache {
            k: (0..n).map(|_| be.zeros(b * capacity * kvd)).collect(),
            v: (0..n).map(|_| be.zeros(b * capacity * kvd)).collect(),
            b,
            capacity,
            len: 0,
        }
    }
}

/// The save set of one layer (all `(N, ·)` with N = B·T rows).
struct LayerSaved<B: Backend> {
    /// (N, C) layer input, saved for rmsnorm::bwd (attention norm)
    x_in: B::Buf,
    /// (N, C) normed input of q/k/v, saved for nf4_lora_linear::bwd
    xn1: B::Buf,
    /// (N,) saved for rmsnorm::bwd
    rstd1: B::Buf,
    /// (N, H·D) after rope, saved for attention::bwd
    q: B::Buf,
    /// (N, Hkv·D) after rope
    k: B::Buf,
    /// (N, Hkv·D)
    v: B::Buf,
    /// attention_saved_len, saved for attention::bwd
    att: B::Buf,
    /// (N, H·D) attention output, input of o_proj
    o: B::Buf,
    /// (N, C) residual after attention, saved for rmsnorm::bwd (MLP norm)
    h_mid: B::Buf,
    /// (N, C) normed input of gate/up
    xn2: B::Buf,
    /// (N,)
    rstd2: B::Buf,
    /// (N, I) gate projection, saved for swiglu::bwd
    e: B::Buf,
    /// (N, I) up projection
    g: B::Buf,
    /// (N, I) silu(e)·g, input of down_proj
    a: B::Buf,
    /// (N, R_p) per projection: drop(x)·Aᵀ saved for nf4_lora_linear::bwd (empty if untargeted)
    u: Vec<B::Buf>,
}

/// Shapes of one forward.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    n: usize,
    c: usize,
    i: usize,
    qd: usize,
    kvd: usize,
    v: usize,
    attn: AttnDims,
    rope_q: RopeDims,
    rope_k: RopeDims,
}

fn dims_of(
    cfg: &crate::config::ModelConfig,
    b: usize,
    t: usize,
    pos_offset: usize,
    kv_rows: usize,
) -> Dims {
    let (h, hkv, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let rope = |heads| RopeDims {
        b,
        t,
        heads,
        d,
        pos_offset,
    };
    Dims {
        b,
        t,
        n: b * t,
        c: cfg.hidden_size,
        i: cfg.intermediate_size,
        qd: h * d,
        kvd: hkv * d,
        v: cfg.vocab_size,
        attn: AttnDims {
            b,
            tq: t,
            tk: pos_offset + t,
            kv_rows,
            h,
            hkv,
            d,
        },
        rope_q: rope(h),
        rope_k: rope(hkv),
    }
}

impl<B: Backend> LayerSaved<B> {
    fn new(be: &B, dm: &Dims, layout: Option<&AdapterLayout>, layer: usize) -> Self {
        let n = dm.n;
        let u = Proj::ALL
            .iter()
            .map(|&p| match layout.and_then(|l| l.slot(layer, p)) {
                Some(s) => be.zeros(n * s.r),
                None => be.zeros(0),
            })
            .collect();
        LayerSaved {
            x_in: be.zeros(n * dm.c),
            xn1: be.zeros(n * dm.c),
            rstd1: be.zeros_f32(n),
            q: be.zeros(n * dm.qd),
            k: be.zeros(n * dm.kvd),
            v: be.zeros(n * dm.kvd),
            att: be.zeros_f32(be.attention_saved_len(dm.attn)),
            o: be.zeros(n * dm.qd),
            h_mid: be.zeros(n * dm.c),
            xn2: be.zeros(n * dm.c),
            rstd2: be.zeros_f32(n),
            e: be.zeros(n * dm.i),
            g: be.zeros(n * dm.i),
            a: be.zeros(n * dm.i),
            u,
        }
    }
}

/// Everything one layer call needs besides its buffers.
struct Ctx<'a, B: Backend> {
    be: &'a B,
    model: &'a Model<B>,
    adapter: Option<&'a Adapter<B>>,
    /// LoRA dropout (p, step seed) when training with dropout.
    dropout: Option<(f64, u64)>,
    /// (P, D) rope table
    rope: &'a B::Buf,
    dm: Dims,
}

impl<B: Backend> Ctx<'_, B> {
    fn lora(&self, layer: usize, p: Proj) -> Option<(&B::Buf, LoraArgs<'_>)> {
        let dropout = self.dropout.map(|(pr, seed)| Dropout {
            p: pr,
            seed: splitmix64(seed ^ ((layer as u64) << 8 | p.index() as u64)),
        });
        self.adapter.and_then(|a| a.lora(layer, p, dropout))
    }
    fn lin_dims(&self, layer: usize, p: Proj) -> LinearDims {
        let l = &self.model.layers[layer].proj[p.index()];
        LinearDims {
            n: self.dm.n,
            in_features: l.in_features,
            out_features: l.out_features,
        }
    }

    /// `y = proj(x)` saving `u` into `s.u[p]` when the projection has LoRA.
    fn linear_fwd(
        &self,
        layer: usize,
        p: Proj,
        y: &mut B::Buf,
        u: &mut B::Buf,
        x: &B::Buf,
        save: bool,
    ) {
        let l = &self.model.layers[layer].proj[p.index()];
        let lora = self.lora(layer, p);
        let u = (save && lora.is_some()).then_some(u);
        self.be.nf4_lora_linear_fwd(
            y,
            u,
            x,
            &l.w,
            l.bias.as_ref(),
            lora,
            self.lin_dims(layer, p),
        );
    }

    /// `d_x` None: the input gradient is not needed (only LoRA grads are accumulated).
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd(
        &self,
        layer: usize,
        p: Proj,
        d_x: Option<&mut B::Buf>,
        acc: bool,
        grads: &mut B::Buf,
        d_y: &B::Buf,
        x: &B::Buf,
        u: &B::Buf,
    ) {
        let l = &self.model.layers[layer].proj[p.index()];
        let lora = self.lora(layer, p);
        let u = lora.is_some().then_some(u);
        self.be.nf4_lora_linear_bwd(
            d_x,
            acc,
            Some(grads),
            d_y,
            x,
            u,
            &l.w,
            lora,
            self.lin_dims(layer, p),
        );
    }

    /// One decoder layer forward: `h (N, C)` in = layer input, out = layer output.
    /// With `kv` (generation), this step's k/v are appended to the cache and attention reads
    /// the cache. `tmp (N, C)` scratch.
    fn layer_fwd(
        &self,
        layer: usize,
        h: &mut B::Buf,
        s: &mut LayerSaved<B>,
        tmp: &mut B::Buf,
        save: bool,
        kv: Option<(&mut B::Buf, &mut B::Buf, usize)>,
    ) {
        let (be, dm) = (self.be, &self.dm);
        let lw = &self.model.layers[layer];
        let eps = self.model.config.rms_norm_eps;
        if save {
            be.copy(&mut s.x_in, 0, h, 0, dm.n * dm.c);
        }
        be.rmsnorm_fwd(&mut s.xn1, &mut s.rstd1, h, &lw.attn_norm, dm.c, eps);
        let [uq, uk, uv, uo, ug, uu, ud] = &mut s.u[..] else {
            unreachable!("seven projections")
        };
        self.linear_fwd(layer, Proj::Q, &mut s.q, uq, &s.xn1, save);
        self.linear_fwd(layer, Proj::K, &mut s.k, uk, &s.xn1, save);
        self.linear_fwd(layer, Proj::V, &mut s.v, uv, &s.xn1, save);
        be.rope_fwd(&mut s.q, self.rope, dm.rope_q);
        be.rope_fwd(&mut s.k, self.rope, dm.rope_k);
        match kv {
            None => be.attention_fwd(&mut s.o, &mut s.att, &s.q, &s.k, &s.v, dm.attn),
            Some((kc, vc, cap)) => {
                let past = dm.attn.tk - dm.t;
                for bi in 0..dm.b {
                    let (dst, src) = ((bi * cap + past) * dm.kvd, bi * dm.t * dm.kvd);
                    be.copy(kc, dst, &s.k, src, dm.t * dm.kvd);
                    be.copy(vc, dst, &s.v, src, dm.t * dm.kvd);
                }
                be.attention_fwd(&mut s.o, &mut s.att, &s.q, kc, vc, dm.attn);
            }
        }
        self.linear_fwd(layer, Proj::O, tmp, uo, &s.o, save);
        be.add_acc(h, tmp);
        if save {
            be.copy(&mut s.h_mid, 0, h, 0, dm.n * dm.c);
        }
        be.rmsnorm_fwd(&mut s.xn2, &mut s.rstd2, h, &lw.mlp_norm, dm.c, eps);
        self.linear_fwd(layer, Proj::Gate, &mut s.e, ug, &s.xn2, save);
        self.linear_fwd(layer, Proj::Up, &mut s.g, uu, &s.xn2, save);
        be.swiglu_fwd(&mut s.a, &s.e, &s.g);
        self.linear_fwd(layer, Proj::Down, tmp, ud, &s.a, save);
        be.add_acc(h, tmp);
    }

    /// One decoder layer backward: `d_h (N, C)` in = d(layer output), out = d(layer input)
    /// when `need_dx`; without it (layer 0 when the embedding is frozen: nothing upstream
    /// takes a gradient) the attention input's gradient is skipped — q, k, v's `d_y·W`
    /// products (N·C·(H + 2·Hkv)·D multiply-adds) and the first norm's backward — and `d_h`
    /// is left as d(h_mid).
    fn layer_bwd(
        &self,
        layer: usize,
        d_h: &mut B::Buf,
        s: &LayerSaved<B>,
        sc: &mut Scratch<B>,
        grads: &mut B::Buf,
        need_dx: bool,
    ) {
        let (be, dm) = (self.be, &self.dm);
        let lw = &self.model.layers[layer];
        let u = |p: Proj| &s.u[p.index()];
        // MLP: h_out = h_mid + down(silu(e)·g)
        self.linear_bwd(
            layer,
            Proj::Down,
            Some(&mut sc.d_a),
            false,
            grads,
            d_h,
            &s.a,
            u(Proj::Down),
        );
        be.swiglu_bwd(&mut sc.d_e, &mut sc.d_g, &sc.d_a, &s.e, &s.g);
        self.linear_bwd(
            layer,
            Proj::Gate,
            Some(&mut sc.d_xn),
            false,
            grads,
            &sc.d_e,
            &s.xn2,
            u(Proj::Gate),
        );
        self.linear_bwd(
            layer,
            Proj::Up,
            Some(&mut sc.d_xn),
            true,
            grads,
            &sc.d_g,
            &s.xn2,
            u(Proj::Up),
        );
        be.rmsnorm_bwd(
            &mut sc.tmp,
            &sc.d_xn,
            &s.h_mid,
            &s.rstd2,
            &lw.mlp_norm,
            dm.c,
        );
        be.add_acc(d_h, &sc.tmp); // d_h = d(h_mid)
                                  // attention: h_mid = x_in + o_proj(attn(rope(q), rope(k), v))
        self.linear_bwd(
            layer,
            Proj::O,
            Some(&mut sc.d_o),
            false,
            grads,
            d_h,
            &s.o,
            u(Proj::O),
        );
        be.attention_bwd(
            &mut sc.d_q,
            &mut sc.d_k,
            &mut sc.d_v,
            &sc.d_o,
            &s.att,
            &s.q,
            &s.k,
            &s.v,
            dm.attn,
        );
        be.rope_bwd(&mut sc.d_q, self.rope, dm.rope_q);
        be.rope_bwd(&mut sc.d_k, self.rope, dm.rope_k);
        self.linear_bwd(
            layer,
            Proj::Q,
            need_dx.then_some(&mut sc.d_xn),
            false,
            grads,
            &sc.d_q,
            &s.xn1,
            u(Proj::Q),
        );
        self.linear_bwd(
            layer,
            Proj::K,
            need_dx.then_some(&mut sc.d_xn),
            true,
            grads,
            &sc.d_k,
            &s.xn1,
            u(Proj::K),
        );
        self.linear_bwd(
            layer,
            Proj::V,
            need_dx.then_some(&mut sc.d_xn),
            true,
            grads,
            &sc.d_v,
            &s.xn1,
            u(Proj::V),
        );
        if need_dx {
            be.rmsnorm_bwd(
                &mut sc.tmp,
                &sc.d_xn,
                &s.x_in,
                &s.rstd1,
                &lw.attn_norm,
                dm.c,
            );
            be.add_acc(d_h, &sc.tmp); // d_h = d(x_in)
        }
    }
}

/// Backward scratch, allocated once per step.
struct Scratch<B: Backend> {
    /// (N, I)
    d_a: B::Buf,
    d_e: B::Buf,
    d_g: B::Buf,
    /// (N, C)
    d_xn: B::Buf,
    tmp: B::Buf,
    /// (N, H·D)
    d_o: B::Buf,
    d_q: B::Buf,
    /// (N, Hkv·D)
    d_k: B::Buf,
    d_v: B::Buf,
}

fn validate<B: Backend>(model: &Model<B>, ids: &[u32], labels: Option<&[i32]>) -> Result<()> {
    let v = model.config.vocab_size;
    if let Some((i, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= v) {
        return Err(TrainError::Batch(format!(
            "input_ids[{i}] = {id} is outside the vocabulary (V = {v})"
        )));
    }
    if let Some(labels) = labels {
        if let Some((i, &l)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l != IGNORE_INDEX && (l < 0 || l as usize >= v))
        {
            return Err(TrainError::Batch(format!(
                "labels[{i}] = {l} is neither -100 nor a token id < {v}"
            )));
        }
    }
    Ok(())
}

fn rope_table<B: Backend>(be: &B, model: &Model<B>, positions: usize) -> B::Buf {
    be.rope_table(&model.config.rope_inv_freq(), positions)
}

fn embed<B: Backend>(
    be: &B,
    model: &Model<B>,
    adapter: Option<&Adapter<B>>,
    ids: &[u32],
    n: usize,
) -> B::Buf {
    let c = model.config.hidden_size;
    let mut h = be.zeros(n * c);
    match adapter.and_then(|a| {
        a.layout
            .saved_slot(SavedModule::EmbedTokens)
            .map(|s| (a, s.offset))
    }) {
        Some((a, off)) => be.embedding_fwd(&mut h, ids, &a.params, off, c),
        None => match &model.embed {
            Embedding::Device(t) => be.embedding_fwd(&mut h, ids, t, 0, c),
            Embedding::Host(t) => be.embedding_fwd_host(&mut h, ids, t, c),
        },
    }
    h
}

/// `logits (N, V)` from the final hidden `xf (N, C)` through lm_head (frozen, or the trainable
/// modules_to_save copy).
fn lm_head_fwd<B: Backend>(
    be: &B,
    model: &Model<B>,
    adapter: Option<&Adapter<B>>,
    xf: &B::Buf,
    n: usize,
) -> B::Buf {
    let dims = LinearDims {
        n,
        in_features: model.config.hidden_size,
        out_features: model.config.vocab_size,
    };
    let mut logits = be.zeros(n * dims.out_features);
    match adapter.and_then(|a| {
        a.layout
            .saved_slot(SavedModule::LmHead)
            .map(|s| (a, s.offset))
    }) {
        Some((a, off)) => be.dense_linear_fwd(&mut logits, xf, &a.params, off, dims),
        None => be.nf4_lora_linear_fwd(&mut logits, None, xf, &model.lm_head.w, None, None, dims),
    }
    logits
}

/// Forward, loss and backward of one micro-batch; LoRA (and modules_to_save) gradients are
/// ADDED to `adapter.grads`. Returns the summed loss and its token count (for logging the
/// mean, or for accumulation). Checkpointing on/off give identical gradients.
pub fn forward_backward<B: Backend>(
    be: &B,
    model: &Model<B>,
    adapter: &mut Adapter<B>,
    batch: &Batch,
    opts: StepOptions,
) -> Result<LossStats> {
    validate(model, &batch.input_ids, Some(&batch.labels))?;
    let dm = dims_of(&model.config, batch.b, batch.t, 0, batch.t);
    let targets = batch.shifted_targets();
    let rope = rope_table(be, model, batch.t);
    let nl = model.config.num_layers;
    let mut grads = std::mem::replace(&mut adapter.grads, be.zeros(0));
    let adapter_ref: &Adapter<B> = adapter;
    let dropout = (adapter_ref.config.lora_dropout > 0.0)
        .then_some((adapter_ref.config.lora_dropout, opts.dropout_seed));
    let cx = Ctx {
        be,
        model,
        adapter: Some(adapter_ref),
        dropout,
        rope: &rope,
        dm,
    };
    let (n, c) = (dm.n, dm.c);
    let layout = Some(&adapter_ref.layout);

    // ---- forward
    let mut h = embed(be, model, Some(adapter_ref), &batch.input_ids, n);
    let mut tmp = be.zeros(n * c);
    let mut saved: Vec<LayerSaved<B>> = Vec::new();
    let mut inputs: Vec<B::Buf> = Vec::new();
    if opts.checkpointing {
        // Only the layer inputs persist; the layer's working set is dropped after each layer
        // (save = false: nothing is copied into it for backward).
        for l in 0..nl {
            let mut x = be.zeros(n * c);
            be.copy(&mut x, 0, &h, 0, n * c);
            inputs.push(x);
            let mut s = LayerSaved::new(be, &dm, layout, l);
            cx.layer_fwd(l, &mut h, &mut s, &mut tmp, false, None);
        }
    } else {
        for l in 0..nl {
            let mut s = LayerSaved::new(be, &dm, layout, l);
            cx.layer_fwd(l, &mut h, &mut s, &mut tmp, true, None);
            saved.push(s);
        }
    }
    let mut xf = be.zeros(n * c);
    let mut rstdf = be.zeros_f32(n);
    be.rmsnorm_fwd(
        &mut xf,
        &mut rstdf,
        &h,
        &model.norm,
        c,
        model.config.rms_norm_eps,
    );
    let mut logits = lm_head_fwd(be, model, Some(adapter_ref), &xf, n);
    let mut lse = be.zeros_f32(n);
    let (sum, tokens) = be.cross_entropy_fwd(&mut lse, &logits, &targets, dm.v);

    // ---- backward
    let denom = match opts.loss_scale {
        LossScale::Mean => tokens,
        LossScale::PerTokens(k) => k,
    };
    let scale = if denom == 0 { 0.0 } else { 1.0 / denom as f64 };
    be.cross_entropy_bwd(&mut logits, &lse, &targets, dm.v, scale);
    let lm_dims = LinearDims {
        n,
        in_features: c,
        out_features: dm.v,
    };
    let mut d_xf = be.zeros(n * c);
    match adapter_ref.layout.saved_slot(SavedModule::LmHead) {
        Some(s) => be.dense_linear_bwd(
            &mut d_xf,
            &mut grads,
            &logits,
            &xf,
            &adapter_ref.params,
            s.offset,
            lm_dims,
        ),
        None => be.nf4_lora_linear_bwd(
            Some(&mut d_xf),
            false,
            None,
            &logits,
            &xf,
            None,
            &model.lm_head.w,
            None,
            lm_dims,
        ),
    }
    drop(logits);
    let mut d_h = be.zeros(n * c);
    be.rmsnorm_bwd(&mut d_h, &d_xf, &h, &rstdf, &model.norm, c);
    let mut sc = Scratch {
        d_a: be.zeros(n * dm.i),
        d_e: be.zeros(n * dm.i),
        d_g: be.zeros(n * dm.i),
        d_xn: be.zeros(n * c),
        tmp: be.zeros(n * c),
        d_o: be.zeros(n * dm.qd),
        d_q: be.zeros(n * dm.qd),
        d_k: be.zeros(n * dm.kvd),
        d_v: be.zeros(n * dm.kvd),
    };
    let embed_grad = adapter_ref
        .layout
        .saved_slot(SavedModule::EmbedTokens)
        .is_some();
    for l in (0..nl).rev() {
        let need_dx = l > 0 || embed_grad;
        if opts.checkpointing {
            // Recompute the layer from its saved input with the same ops (and the same dropout
            // masks, which are a function of the seed): the save set is bit-identical.
            let mut s = LayerSaved::new(be, &dm, layout, l);
            let mut x = be.zeros(n * c);
            be.copy(&mut x, 0, &inputs[l], 0, n * c);
            cx.layer_fwd(l, &mut x, &mut s, &mut tmp, true, None);
            cx.layer_bwd(l, &mut d_h, &s, &mut sc, &mut grads, need_dx);
        } else {
            cx.layer_bwd(l, &mut d_h, &saved[l], &mut sc, &mut grads, need_dx);
        }
    }
    if let Some(s) = adapter_ref.layout.saved_slot(SavedModule::EmbedTokens) {
        be.embedding_bwd_acc(&mut grads, s.offset, &batch.input_ids, &d_h, c);
    }
    adapter.grads = grads;
    // Device backends queue ops asynchronously and keep their first error sticky: this is
    // where it becomes a typed error naming the op.
    be.synchronize()?;
    Ok(LossStats { sum, tokens })
}

/// Logits `(B·T, V)` of `input_ids (B·T,)` at positions `cache.len ..` (0 without a cache).
/// With a cache, this step's keys/values are appended (generation); without, plain causal
/// attention over the batch. No dropout, nothing saved.
pub fn forward_logits<B: Backend>(
    be: &B,
    model: &Model<B>,
    adapter: Option<&Adapter<B>>,
    input_ids: &[u32],
    b: usize,
    t: usize,
    cache: Option<&mut KvCache<B>>,
) -> Result<B::Buf> {
    let h = forward_hidden(be, model, adapter, input_ids, b, t, cache)?;
    let (n, c) = (b * t, model.config.hidden_size);
    let mut xf = be.zeros(n * c);
    let mut rstd = be.zeros_f32(n);
    be.rmsnorm_fwd(
        &mut xf,
        &mut rstd,
        &h,
        &model.norm,
        c,
        model.config.rms_norm_eps,
    );
    let logits = lm_head_fwd(be, model, adapter, &xf, n);
    be.synchronize()?;
    Ok(logits)
}

/// Hidden states `(B·T, C)` after the last layer (before the final norm).
pub fn forward_hidden<B: Backend>(
    be: &B,
    model: &Model<B>,
    adapter: Option<&Adapter<B>>,
    input_ids: &[u32],
    b: usize,
    t: usize,
    mut cache: Option<&mut KvCache<B>>,
) -> Result<B::Buf> {
    if b == 0 || t == 0 || input_ids.len() != b * t {
        return Err(TrainError::Batch(format!(
            "input_ids has {} elements, expected B·T = {b}·{t} > 0",
            input_ids.len()
        )));
    }
    validate(model, input_ids, None)?;
    let (pos, kv_rows) = match &cache {
        Some(kc) => {
            if kc.b != b || kc.len + t > kc.capacity {
                return Err(TrainError::Batch(format!(
                    "KV cache holds batch {} with {}/{} positions; cannot add batch {b} × {t}",
                    kc.b, kc.len, kc.capacity
                )));
            }
            (kc.len, kc.capacity)
        }
        None => (0, t),
    };
    let dm = dims_of(&model.config, b, t, pos, kv_rows);
    let rope = rope_table(be, model, pos + t);
    let cx = Ctx {
        be,
        model,
        adapter,
        dropout: None,
        rope: &rope,
        dm,
    };
    let n = b * t;
    let mut h = embed(be, model, adapter, input_ids, n);
    let mut tmp = be.zeros(n * dm.c);
    let mut s = LayerSaved::new(be, &dm, None, 0);
    for l in 0..model.config.num_layers {
        let kv = cache.as_deref_mut().map(|kc| {
            let cap = kc.capacity;
            let (k, v) = (&mut kc.k[l], &mut kc.v[l]);
            (k, v, cap)
        });
        cx.layer_fwd(l, &mut h, &mut s, &mut tmp, false, kv);
    }
    if let Some(kc) = cache {
        kc.len += t;
    }
    Ok(h)
}

/// Mean-able loss of a batch without gradients (evaluation): the summed token loss and count.
pub fn forward_loss<B: Backend>(
    be: &B,
    model: &Model<B>,
    adapter: Option<&Adapter<B>>,
    batch: &Batch,
) -> Result<LossStats> {
    validate(model, &batch.input_ids, Some(&batch.labels))?;
    let logits = forward_logits(be, model, adapter, &batch.input_ids, batch.b, batch.t, None)?;
    let mut lse = be.zeros_f32(batch.b * batch.t);
    let (sum, tokens) = be.cross_entropy_fwd(
        &mut lse,
        &logits,
        &batch.shifted_targets(),
        model.config.vocab_size,
    );
    be.synchronize()?;
    Ok(LossStats { sum, tokens })
}
