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
    /// checkpoint is written.
    #[error(
        "step {step}: {what} is {value} on micro-batch {micro} (data lines {lines:?} of {path}); \
         training stopped. {kept}"
    )]
    NonFinite {
        step: u64,
        micro: usize,
        what: &'static str,
        value: String,
        lines: Vec<usize>,
        path: PathBuf,
        /// Which checkpoint is the last good one (or that there is none).
        kept: String,
    },
    /// A feature the run asked for that this build cannot do (named).
    #[error("{0}")]
    Unsupported(String),
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
