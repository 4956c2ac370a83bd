//! The one error type of the crate. Every variant names the file and, where there is one, the
//! metadata key or tensor it is about, so a user with a broken or unsupported GGUF file knows
//! what to look at without a debugger.

use std::path::PathBuf;

/// Errors of GGUF reading, dequantization and conversion to a Hugging Face directory.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// Opening, mapping or reading the file failed.
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Writing an output file or directory failed.
    #[error("{path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The first four bytes are not `GGUF`.
    #[error("{path}: not a GGUF file (magic bytes {magic:02x?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, magic: [u8; 4] },

    /// GGUF v1 (32-bit counts) or an unknown future version.
    #[error("{path}: GGUF version {version} is not supported (only versions 2 and 3)")]
    UnsupportedVersion { path: PathBuf, version: u32 },

    /// A read ran past the end of the file: the file is truncated or a length field is corrupt.
    #[error("{path}: truncated or corrupt: {what} needs {needed} bytes at offset {offset}, but the file has {len}")]
    Truncated {
        path: PathBuf,
        what: String,
        offset: u64,
        needed: u64,
        len: u64,
    },

    /// A structurally invalid header field (bad type tag, invalid UTF-8, overflow, ...).
    #[error("{path}: corrupt {what}: {reason}")]
    Corrupt {
        path: PathBuf,
        what: String,
        reason: String,
    },

    /// A metadata key is present but has the wrong type or an invalid value.
    #[error("{path}: metadata key `{key}`: {reason}")]
    Metadata {
        path: PathBuf,
        key: String,
        reason: String,
    },

    /// A metadata key the conversion needs is absent.
    #[error("{path}: missing metadata key `{key}`")]
    MissingKey { path: PathBuf, key: String },

    /// A tensor's header entry is inconsistent (shape, offset, size, duplicate name).
    #[error("{path}: tensor `{tensor}`: {reason}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },

    /// A tensor stored in a ggml type this crate does not dequantize.
    #[error("{path}: tensor `{tensor}` has ggml type {ty}, which is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)")]
    UnsupportedType {
        path: PathBuf,
        tensor: String,
        ty: String,
    },

    /// `general.architecture` is not one we can map to Hugging Face.
    #[error("{path}: architecture `{arch}` is not supported (only `llama`)")]
    UnsupportedArchitecture { path: PathBuf, arch: String },

    /// A model feature the conversion cannot represent faithfully (refused rather than guessed).
    #[error("{path}: {what} is not supported: {reason}")]
    Unsupported {
        path: PathBuf,
        what: String,
        reason: String,
    },

    /// Writing the safetensors output failed (the nf4 crate's error names file and tensor).
    #[error(transparent)]
    Safetensors(#[from] qlora_nf4::Nf4Error),

    /// The vocabulary metadata cannot be turned into a `tokenizer.json`.
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, GgufError>;
