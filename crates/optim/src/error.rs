//! The crate's error type. Every variant names the tensor, key, file or step it is about.

use std::path::PathBuf;

/// Errors of `qlora-optim`.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("arena layout: tensor `{name}` has zero elements")]
    EmptyTensor { name: String },
    #[error("arena layout: tensor name `{name}` appears twice")]
    DuplicateTensor { name: String },
    #[error(
        "arena layout: tensor `{name}` at elements [{offset}, {end}) overlaps the previous tensor `{prev}` ending at {prev_end}, or is out of order"
    )]
    Overlap {
        name: String,
        offset: usize,
        end: usize,
        prev: String,
        prev_end: usize,
    },
    #[error("arena layout: tensor `{name}` ends at element {end}, past the arena length {len}")]
    OutOfArena {
        name: String,
        end: usize,
        len: usize,
    },
    #[error("arena layout: alignment {align} must be a power of two")]
    BadAlignment { align: usize },
    #[error("step {step}: the {what} arena has {got} elements, the layout needs {want}")]
    ArenaLength {
        step: u64,
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error("invalid optimizer setting `{key}` = {value}: {why}")]
    InvalidConfig {
        key: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("step {step}: invalid learning rate {lr}")]
    InvalidLr { step: u64, lr: f64 },
    #[error("optimizer state {path}: {what}")]
    StateFile { path: PathBuf, what: String },
    #[error("optimizer state {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "paging: the state arena needs {needed} bytes of device memory but only {free} are free; refusing to oversubscribe managed memory"
    )]
    WouldOversubscribe { needed: u64, free: u64 },
    #[error("CUDA: {0}")]
    Cuda(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, OptimError>;
