//! The training run: configuration, the optimizer loop over the adapter arena, evaluation,
//! checkpoints and resume, metrics, the loss-curve plot, and the two things users do with a
//! trained adapter (merge it into the base, generate with it).
//!
//! # One optimizer step
//! ```text
//! micro-batches b_1..b_A (A = grad_accum) from the Batcher, N = Σ_i n_label_tokens(b_i)
//! grads = 0
//! for each b_i:  grads += ∂/∂θ [ Σ_{tokens of b_i} CE / N ]      (LossScale::PerTokens(N))
//! loss  = Σ_i Σ_{tokens of b_i} CE / N                            (= the mean over one big batch)
//! AdamW step (qlora-optim, whole arena) at lr = base_lr · λ(step), with global clipping
//! ```
//! Dividing every micro-batch by the step's total label-token count (not by its own count, and
//! not by A) is what makes A micro-batches equal one batch of their union: the gradient of a
//! mean over N tokens is the sum of per-token gradients over N.
//!
//! # Determinism
//! Everything random is a function of saved state: the data order of
//! [`crate::data::DataPosition`] and the trainer's own SplitMix64 stream (`rng_state`) that
//! seeds each micro-batch's LoRA-dropout masks. A checkpoint stores both, the adapter, the
//! optimizer state and the step, so a resumed run takes bit-identical steps on the CPU. On the
//! GPU the LoRA-gradient kernels sum with f32 atomics, so runs (and resumes) agree to f32
//! rounding, not bit for bit.
//!
//! # Devices
//! [`Trainer`] is generic over [`TrainBackend`]: `Trainer::new` / `resume` run on the CPU
//! (the f32 reference, CPU AdamW); `Trainer::new_on(CudaBackend::new()?, config)` runs the
//! same loop on the GPU (bf16 compute, f32 adapter arenas, `GpuAdamW`, paged for the
//! `paged_*` optimizers). The `device` key (`auto`, `cuda`, `cpu`) is resolved by the caller
//! (`qlora train`); checkpoints are the same files on both, so a run may resume on the other.

mod backend;
mod checkpoint;
mod config;
mod error;
pub mod generate;
pub mod merge;
mod metrics;
pub mod plot;
mod run;

pub use backend::{CudaOptimizer, TrainBackend};
pub use checkpoint::{load_state, resolve_checkpoint, CheckpointState, CHECKPOINT_PREFIX};
pub use config::{TrainConfig, ALL_LINEAR, DEFAULT_MAX_SEQ_LEN};
pub use error::{NonFinite, Result, TrainerError};
pub use metrics::{EvalRecord, History, StepRecord};
pub use run::{to_schedule_batch, Event, MemoryEstimate, Outcome, Summary, Trainer};
