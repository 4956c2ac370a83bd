//! What the [`Trainer`](super::Trainer) needs from a backend beyond the ops of one step: its
//! optimizer over the adapter arenas, the non-finite check of the gradients, and the memory
//! estimate of the start-of-run summary. The CPU runs the CPU AdamW on host arenas; CUDA runs
//! qlora-optim's `GpuAdamW` on the device arenas (the state in managed memory and paged under
//! the config's policy for the `paged_*` optimizers, in plain device memory otherwise).

use std::path::Path;

use super::config::TrainConfig;
use super::error::Result;
use super::run::MemoryEstimate;
use crate::backend::{AttnDims, Backend};
use crate::cpu::CpuBackend;
use crate::cuda::{CudaBackend, CudaBuf};
use crate::data::DataConfig;
use crate::lora::Proj;
use crate::model::Model;
use crate::schedule::Adapter;
use qlora_optim::{AdamW, GpuAdamW, StepReport};

/// A [`Backend`] the trainer can run on.
pub trait TrainBackend: Backend + Sized {
    /// The optimizer over this backend's f32 parameter and gradient arenas.
    type Optimizer: Send;

    /// Moves `host` (fresh or loaded from a checkpoint) to where it runs. `next_need`: bytes
    /// one forward/backward allocates (the paging policy's input).
    fn optimizer(
        &self,
        host: AdamW,
        config: &TrainConfig,
        next_need: u64,
    ) -> Result<Self::Optimizer>;
    /// Configuration, layout and step count (on a device the state in it may be stale).
    fn optimizer_host(opt: &Self::Optimizer) -> &AdamW;
    /// Writes the optimizer state (read back from the device first) to `path`.
    fn save_optimizer(&self, opt: &mut Self::Optimizer, path: &Path) -> Result<()>;
    /// One step over the whole arena at `lr`.
    fn optimizer_step(
        &self,
        opt: &mut Self::Optimizer,
        params: &mut Self::Buf,
        grads: &Self::Buf,
        lr: f64,
    ) -> Result<StepReport>;
    /// The global L2 norm of `grads` as the optimizer computes it (for the log when clipping,
    /// which reports it, is off).
    fn grad_norm(&self, opt: &Self::Optimizer, grads: &Self::Buf) -> Result<f32>;
    /// The first non-finite gradient value, if any.
    fn first_non_finite(&self, grads: &Self::Buf) -> Result<Option<f32>>;
    /// Predicted peak memory of a micro-batch of `batch_size × max_seq_len`.
    fn memory_estimate(
        &self,
        model: &Model<Self>,
        adapter: &Adapter<Self>,
        optimizer_bytes: usize,
        data: &DataConfig,
        checkpointing: bool,
    ) -> MemoryEstimate;
    /// Bytes of the NF4 projections (codes + quantization constants); 0 for a dense base.
    fn nf4_bytes(&self, model: &Model<Self>) -> usize;
}

/// Σ over layers of the LoRA ranks of layer `l` (the `u` buffers of its save set).
fn rank_sum<B: Backend>(adapter: &Adapter<B>, l: usize) -> usize {
    Proj::ALL
        .iter()
        .filter_map(|&p| adapter.layout.slot(l, p))
        .map(|s| s.r)
        .sum()
}

/// The attention dims of a training micro-batch.
fn train_attn(model_cfg: &crate::config::ModelConfig, b: usize, t: usize) -> AttnDims {
    AttnDims {
        b,
        tq: t,
        tk: t,
        kv_rows: t,
        h: model_cfg.num_heads,
        hkv: model_cfg.num_kv_heads,
        d: model_cfg.head_dim,
    }
}

/// Elements of the schedule's activations for one micro-batch, split into those held in the
/// compute dtype and those held in f32 (rstd, lse, attention's saved buffer): the save set of
/// each layer (4 (N, C), 2 (N, H·D), 2 (N, Hkv·D), 3 (N, I), the LoRA u's; 2 (N,) f32 and the
/// attention save), all layers or (checkpointing) the layer inputs plus one recomputed layer;
/// the backward scratch (3 (N, I), 5 (N, C), 2 (N, H·D), 2 (N, Hkv·D); 2 (N,) f32) and the
/// (N, V) logits.
fn activation_elems<B: Backend>(
    be: &B,
    model: &Model<B>,
    adapter: &Adapter<B>,
    data: &DataConfig,
    checkpointing: bool,
) -> (usize, usize) {
    let c = &model.config;
    let (b, t) = (data.batch_size, data.max_seq_len);
    let n = b * t;
    let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let att = be.attention_saved_len(train_attn(c, b, t));
    let layer = |l: usize| {
        (
            n * (4 * c.hidden_size
                + 2 * qd
                + 2 * kvd
                + 3 * c.intermediate_size
                + rank_sum(adapter, l)),
            2 * n + att,
        )
    };
    let (saved, saved_f32) = if checkpointing {
        let (x, f) = (0..c.num_layers).map(layer).max().unwrap_or((0, 0));
        (c.num_layers * n * c.hidden_size + x, f)
    } else {
        (0..c.num_layers)
            .map(layer)
            .fold((0, 0), |(a, b), (x, f)| (a + x, b + f))
    };
    let scratch = n * (3 * c.intermediate_size + 5 * c.hidden_size + 2 * qd + 2 * kvd);
    (saved + scratch + n * c.vocab_size, saved_f32 + 2 * n)
}

impl TrainBackend for CpuBackend {
    type Optimizer = AdamW;

    fn optimizer(&self, host: AdamW, _config: &TrainConfig, _next_need: u64) -> Result<AdamW> {
        Ok(host)
    }
    fn optimizer_host(opt: &AdamW) -> &AdamW {
        opt
    }
    fn save_optimizer(&self, opt: &mut AdamW, path: &Path) -> Result<()> {
        Ok(opt.save(path)?)
    }
    fn optimizer_step(
        &self,
        opt: &mut AdamW,
        params: &mut Vec<f32>,
        grads: &Vec<f32>,
        lr: f64,
    ) -> Result<StepReport> {
        Ok(opt.step(params, grads, lr)?)
    }
    fn grad_norm(&self, opt: &AdamW, grads: &Vec<f32>) -> Result<f32> {
        Ok(opt.grad_norm(grads)?)
    }
    fn first_non_finite(&self, grads: &Vec<f32>) -> Result<Option<f32>> {
        Ok(grads.iter().copied().find(|g| !g.is_finite()))
    }
    /// The CPU holds the frozen base as an f32 compute copy of every projection beside its NF4
    /// codes, plus f32 embeddings, norms and lm_head; every activation is f32.
    fn memory_estimate(
        &self,
        model: &Model<Self>,
        adapter: &Adapter<Self>,
        optimizer_bytes: usize,
        data: &DataConfig,
        checkpointing: bool,
    ) -> MemoryEstimate {
        let c = &model.config;
        let f = std::mem::size_of::<f32>();
        let mut base =
            (2 * c.vocab_size * c.hidden_size + (2 * c.num_layers + 1) * c.hidden_size) * f;
        for p in model.layers.iter().flat_map(|l| &l.proj) {
            base += p.w.w.len() * f
                + p.w
                    .nf4
                    .as_ref()
                    .map_or(0, |t| t.packed.len() + t.state.constant_bytes());
        }
        let (act, stat) = activation_elems(self, model, adapter, data, checkpointing);
        MemoryEstimate {
            base,
            adapter: 2 * adapter.layout.numel * f + optimizer_bytes,
            activations: (act + stat) * f,
        }
    }
    fn nf4_bytes(&self, model: &Model<Self>) -> usize {
        model
            .layers
            .iter()
            .flat_map(|l| &l.proj)
            .filter_map(|p| p.w.nf4.as_ref())
            .map(|t| t.packed.len() + t.state.constant_bytes())
            .sum()
    }
}

/// The CUDA backend's optimizer: `GpuAdamW` and the device memory one forward/backward needs
/// (what `PagingPolicy::AboveBytes` compares the free memory with).
pub struct CudaOptimizer {
    pub opt: GpuAdamW,
    next_need: u64,
}

impl TrainBackend for CudaBackend {
    type Optimizer = CudaOptimizer;

    /// `paged_adamw_32bit` / `paged_adamw_8bit`: the state in managed memory under the
    /// config's `paging` policy; the others: plain device memory.
    fn optimizer(
        &self,
        host: AdamW,
        config: &TrainConfig,
        next_need: u64,
    ) -> Result<CudaOptimizer> {
        let paged = config.optim.starts_with("paged_");
        let policy = config.paging_policy()?;
        // Queued uploads (the adapter) must have landed before the optimizer copies state.
        self.synchronize()?;
        let opt = GpuAdamW::new(self.device(), host, paged, policy)?;
        Ok(CudaOptimizer { opt, next_need })
    }
    fn optimizer_host(opt: &CudaOptimizer) -> &AdamW {
        opt.opt.host()
    }
    fn save_optimizer(&self, opt: &mut CudaOptimizer, path: &Path) -> Result<()> {
        Ok(opt.opt.to_host(self.device())?.save(path)?)
    }
    fn optimizer_step(
        &self,
        opt: &mut CudaOptimizer,
        params: &mut CudaBuf,
        grads: &CudaBuf,
        lr: f64,
    ) -> Result<StepReport> {
        self.synchronize()?;
        let (mut p, g) = self.f32_views(params, grads, "optimizer_step")?;
        Ok(opt
            .opt
            .step(self.device(), &mut p, &g, lr, opt.next_need)?
            .step)
    }
    /// Reads the arena back and takes the host optimizer's norm (same f64 order as the CPU).
    fn grad_norm(&self, opt: &CudaOptimizer, grads: &CudaBuf) -> Result<f32> {
        let host = self.download(grads);
        self.synchronize()?;
        Ok(opt.opt.host().grad_norm(&host)?)
    }
    /// Counts on the device (one word read back); reads the arena only when there is one.
    fn first_non_finite(&self, grads: &CudaBuf) -> Result<Option<f32>> {
        if self.nonfinite_count(grads, "first_non_finite")? == 0 {
            return Ok(None);
        }
        let host = self.download(grads);
        self.synchronize()?;
        Ok(host.into_iter().find(|g| !g.is_finite()))
    }
    /// The device holds NF4 codes + scales, bf16 dense weights, embeddings and norms, f32
    /// adapter arenas and optimizer state (even when paged: its peak is on the device), bf16
    /// activations with f32 statistics.
    fn memory_estimate(
        &self,
        model: &Model<Self>,
        adapter: &Adapter<Self>,
        optimizer_bytes: usize,
        data: &DataConfig,
        checkpointing: bool,
    ) -> MemoryEstimate {
        let c = &model.config;
        let mut base = (c.vocab_size * c.hidden_size + (2 * c.num_layers + 1) * c.hidden_size) * 2
            + model.lm_head.w.device_bytes();
        for p in model.layers.iter().flat_map(|l| &l.proj) {
            base += p.w.device_bytes() + p.bias.as_ref().map_or(0, |b| 2 * b.len());
        }
        let (act, stat) = activation_elems(self, model, adapter, data, checkpointing);
        MemoryEstimate {
            base,
            adapter: 2 * adapter.layout.numel * 4 + optimizer_bytes,
            activations: act * 2 + stat * 4,
        }
    }
    fn nf4_bytes(&self, model: &Model<Self>) -> usize {
        model
            .layers
            .iter()
            .flat_map(|l| &l.proj)
            .filter(|p| matches!(p.w, crate::cuda::CudaFrozen::Nf4 { .. }))
            .map(|p| p.w.device_bytes())
            .sum()
    }
}
