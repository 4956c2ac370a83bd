//! What the [`Trainer`](super::Trainer) needs from a backend beyond the ops of one step: its
//! optimizer over the adapter arenas, the non-finite check of the gradients, what the memory
//! planner models for it (the start-of-run summary's prediction) and its step arena. The CPU
//! runs the CPU AdamW on host arenas; CUDA runs qlora-optim's `GpuAdamW` on the device arenas
//! (the state in managed memory and paged under the config's policy for the `paged_*`
//! optimizers, in plain device memory otherwise).

use std::path::Path;

use super::config::TrainConfig;
use super::error::Result;
use crate::backend::Backend;
use crate::cpu::CpuBackend;
use crate::cuda::{CudaBackend, CudaBuf};
use crate::model::Model;
use crate::plan::{DeviceDtype, PlanDevice};
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
    /// What the memory planner ([`crate::plan`]) models for this backend: the device, its
    /// activation dtype, and whether buffers come from qlora-cuda's caching pool.
    fn plan_target(&self) -> (PlanDevice, DeviceDtype, bool);
    /// Before the first step: reserve the planned step arena of `bytes` (a backend that
    /// allocates from the host keeps its allocator; the default does nothing).
    fn reserve_step_arena(&self, _bytes: u64) -> Result<()> {
        Ok(())
    }
    /// Bytes of the NF4 projections (codes + quantization constants); 0 for a dense base.
    fn nf4_bytes(&self, model: &Model<Self>) -> usize;
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
    /// f32 everything, host memory, no pool.
    fn plan_target(&self) -> (PlanDevice, DeviceDtype, bool) {
        (PlanDevice::Cpu, DeviceDtype::F32, false)
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
    /// bf16 activations (f32 statistics), step buffers from the planned arena.
    fn plan_target(&self) -> (PlanDevice, DeviceDtype, bool) {
        (PlanDevice::Cuda, DeviceDtype::Bf16, false)
    }
    fn reserve_step_arena(&self, bytes: u64) -> Result<()> {
        Ok(CudaBackend::reserve_step_arena(self, bytes as usize)?)
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
