//! AdamW for the LoRA adapter arena: 32-bit and bitsandbytes-style blockwise 8-bit state, one
//! flat state arena, one update per step over all tensors, global grad-norm clipping, LR
//! schedules, state save/load, and the paging policy of the CUDA path.
//!
//! ```no_run
//! use qlora_optim::{AdamW, AdamWConfig, ArenaLayout, LrSchedule, ARENA_ALIGN};
//! # fn main() -> Result<(), qlora_optim::OptimError> {
//! let layout = ArenaLayout::packed([("q.lora_A", 8 * 64), ("q.lora_B", 64 * 8)], ARENA_ALIGN)?;
//! let mut params = vec![0f32; layout.len()];
//! let grads = vec![0f32; layout.len()];
//! let cfg = AdamWConfig { lr: 5e-3, weight_decay: 0.0, ..Default::default() };
//! let sched = LrSchedule::from_name("cosine", 10, 1000)?;
//! let mut opt = AdamW::new(layout, cfg)?;
//! let report = opt.step_scheduled(&mut params, &grads, &sched)?;
//! # let _ = report; Ok(()) }
//! ```
//! See [`adamw`] for the exact arithmetic of each variant and the non-finite-gradient rule,
//! [`arena`] for the memory layout, [`paging`] for the GPU paging policy, [`gpu`] for the CUDA
//! path (`cuda/adamw.cu`).

pub mod adamw;
pub mod arena;
pub mod blockwise8;
pub mod clip;
pub mod cpu;
pub mod dynamic_map;
mod error;
pub mod gpu;
pub mod launch;
pub mod paging;
pub mod schedule;
mod state_io;

pub use adamw::{AdamWConfig, AdamWVariant, StateBits, StepScalars};
pub use arena::{ArenaLayout, Chunk, StateArena, StateLayout, TensorSpec, ARENA_ALIGN, QBLOCK};
pub use cpu::{AdamW, StepReport};
pub use error::{OptimError, Result};
pub use gpu::{GpuAdamW, GpuStepReport};
pub use paging::{DeviceMemory, PagingPolicy};
pub use schedule::LrSchedule;
