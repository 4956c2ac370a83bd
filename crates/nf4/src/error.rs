//! Errors of the NF4 crate. Every variant names the file, tensor or key it is about.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Nf4Error {
    #[error("tensor `{tensor}`: element {index} is {value} (NaN/Inf cannot be quantized)")]
    NonFinite {
        tensor: String,
        index: usize,
        value: f32,
    },

    #[error("tensor `{tensor}`: {reason}")]
    BadTensor { tensor: String, reason: String },

    #[error("blocksize {0} is not supported (use 32, 64, 128, 256, 512, 1024, 2048 or 4096)")]
    BadBlocksize(usize),

    /// (`error`, not `source`: the message already includes it, and a chained report such as
    /// anyhow's `{:#}` would print it twice.)
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    #[error("{}: not a valid safetensors file: {reason}", path.display())]
    BadSafetensors { path: PathBuf, reason: String },

    #[error("{}: tensor `{tensor}`: {reason}", path.display())]
    BadStoredTensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },

    #[error("{}: {reason}", path.display())]
    BadJson { path: PathBuf, reason: String },

    #[error("{}: key `{key}`: {reason}", path.display())]
    BadConfig {
        path: PathBuf,
        key: String,
        reason: String,
    },

    #[error("tensor `{0}` not found in the checkpoint")]
    MissingTensor(String),

    #[error("{}: {reason}", path.display())]
    Output { path: PathBuf, reason: String },
}

pub type Result<T> = std::result::Result<T, Nf4Error>;

impl Nf4Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Nf4Error::Io {
            path: path.into(),
            error: source,
        }
    }
}
