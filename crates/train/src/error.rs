//! The crate's error type: every variant names the file, tensor, key or step it is about.

use std::path::PathBuf;

/// Everything that can go wrong in `qlora-train` on user input.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A config.json / adapter_config.json key is missing, has the wrong type or a bad value.
    #[error("{path}: key `{key}`: {msg}")]
    Config {
        path: PathBuf,
        key: String,
        msg: String,
    },
    /// A model or adapter feature that this crate does not implement (named).
    #[error("{path}: unsupported: {what}")]
    Unsupported { path: PathBuf, what: String },
    /// A safetensors file is unreadable or a tensor in it has the wrong dtype/shape.
    #[error("{path}: tensor `{tensor}`: {msg}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    /// A tensor the model or adapter needs is absent.
    #[error("{path}: missing tensor `{tensor}`")]
    MissingTensor { path: PathBuf, tensor: String },
    /// An adapter file holds a key that cannot be placed on the model.
    #[error("{path}: tensor `{tensor}` cannot be placed: {msg}")]
    UnplacedTensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    /// Error from the NF4 crate (quantization, safetensors, bnb checkpoints).
    #[error(transparent)]
    Nf4(#[from] qlora_nf4::Nf4Error),
    /// Bad batch / dims handed to the schedule (names what).
    #[error("batch: {0}")]
    Batch(String),
    /// Tokenizer load or encode failure.
    #[error("{path}: tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    /// No GPU can be used (driver, libraries or device missing); the reason from qlora-cuda.
    #[error("no usable CUDA device ({0})")]
    NoDevice(String),
    /// A device op failed (launch, allocation, a kernel's argument check, an unsupported
    /// shape): the first such error since the last `Backend::synchronize`, naming the op.
    #[error("CUDA backend, op {op}: {msg}")]
    Device { op: String, msg: String },
    /// Eval data (JSONL) problem, with the line number (1-based).
    #[error("{path}:{line}: {msg}")]
    Data {
        path: PathBuf,
        line: usize,
        msg: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, TrainError>;

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn config(path: impl Into<PathBuf>, key: &str, msg: impl Into<String>) -> Self {
        TrainError::Config {
            path: path.into(),
            key: key.to_string(),
            msg: msg.into(),
        }
    }
    pub(crate) fn unsupported(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        TrainError::Unsupported {
            path: path.into(),
            what: what.into(),
        }
    }
    pub(crate) fn tensor(path: impl Into<PathBuf>, tensor: &str, msg: impl Into<String>) -> Self {
        TrainError::Tensor {
            path: path.into(),
            tensor: tensor.to_string(),
            msg: msg.into(),
        }
    }
}
