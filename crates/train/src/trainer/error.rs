//! Errors of a training run; every variant names the key, file, step or batch it is about.

use std::path::PathBuf;

use crate::data::DataError;
use crate::error::TrainError;
use qlora_optim::OptimError;

/// Everything that can stop a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// A configuration value is invalid (names the TOML key / flag).
    #[error("invalid config value `{key}`: {msg}")]
    Config { key: String, msg: String },
    #[error(transparent)]
    Model(#[from] TrainError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("optimizer: {0}")]
    Optim(#[from] OptimError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint directory is incomplete or belongs to another run.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    /// The loss or a gradient became NaN/Inf: training stops, nothing after the last
    /// checkpoint is written (boxed: it is large and rare).
    #[error("{0}")]
    NonFinite(Box<NonFinite>),
    /// A feature the run asked for that this build cannot do (named).
    #[error("{0}")]
    Unsupported(String),
}

/// Where a NaN/Inf appeared.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "step {step}: {what} is {value} on micro-batch {micro} (data lines {lines:?} of {path}); \
     training stopped. {kept}",
    path = path.display()
)]
pub struct NonFinite {
    /// 1-based optimizer step.
    pub step: u64,
    /// 0-based micro-batch within the step.
    pub micro: usize,
    /// `the loss` or `a gradient`.
    pub what: &'static str,
    pub value: String,
    /// Source lines (1-based) of the micro-batch's examples.
    pub lines: Vec<usize>,
    pub path: PathBuf,
    /// Which checkpoint is the last good one (or that there is none).
    pub kept: String,
}

/// Result alias of the trainer.
pub type Result<T> = std::result::Result<T, TrainerError>;

impl TrainerError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainerError::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn config(key: &str, msg: impl Into<String>) -> Self {
        TrainerError::Config {
            key: key.to_string(),
            msg: msg.into(),
        }
    }
}
