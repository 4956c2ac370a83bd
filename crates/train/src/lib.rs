//! Llama-family model, LoRA adapters and the training schedule (forward, backward,
//! recompute), written once against the [`Backend`] trait; [`CpuBackend`] is the f32
//! reference implementation, [`CudaBackend`] the GPU one (bf16 compute, f32 LoRA master
//! weights and gradients, NF4 base on the device). The [`trainer::Trainer`] runs on either
//! ([`trainer::TrainBackend`]).
//!
//! # Dimension letters
//! Used in every buffer's doc comment (e.g. `/// (B·T, C) f32, saved for rmsnorm::bwd`):
//!
//! | letter | meaning |
//! |---|---|
//! | B | batch (sequences per micro-batch) |
//! | T | sequence length (tokens per sequence) |
//! | C | hidden size |
//! | H | attention (query) heads |
//! | Hkv | key/value heads (grouped-query attention: H/Hkv query heads share one) |
//! | D | head dimension |
//! | I | MLP width (intermediate size) |
//! | V | vocabulary size |
//! | R | LoRA rank |
//! | S | LoRA scale (alpha/R, or alpha/√R with rsLoRA) |
//! | QB | NF4 quantization block (64 elements) |
//! | QB2 | double-quantization block of the absmax vector (256 blocks) |
//! | N | rows of a linear op, = B·T |

pub mod backend;
pub mod bench;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod data;
pub mod error;
pub mod eval;
pub mod lora;
pub mod model;
pub mod plan;
pub mod schedule;
mod st;
pub mod trainer;
pub mod weights;

pub use backend::{AttnDims, Backend, Dropout, FrozenWeight, LinearDims, LoraArgs, RopeDims};
pub use config::{Arch, ModelConfig, RopeScaling};
pub use cpu::{CpuBackend, CpuFrozen};
pub use cuda::{CudaBackend, CudaBuf, CudaFrozen};
pub use error::{Result, TrainError};
pub use eval::{
    evaluate, load_tokenizer, read_eval_jsonl, tokenize_records, EvalOptions, EvalRecord,
    EvalReport,
};
pub use lora::{
    AdapterLayout, AdapterWeights, LoraConfig, LoraInit, LoraSlot, ParamReport, Proj, SavedModule,
    TargetModules,
};
pub use model::{BaseFormat, Embedding, Layer, Linear, Model};
pub use schedule::{
    forward_backward, forward_hidden, forward_logits, forward_loss, Adapter, Batch, KvCache,
    LossScale, LossStats, StepOptions,
};
pub use weights::{MapSource, WeightSource};
