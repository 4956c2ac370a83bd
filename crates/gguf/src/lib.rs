//! GGUF (llama.cpp) import: a bounds-checked memory-mapped reader, dequantization of the
//! common ggml block types exactly as llama.cpp's reference, and (see `convert`) the
//! reconstruction of a Hugging Face Llama model directory from a `llama` GGUF file.

pub mod dequant;
pub mod error;
pub mod reader;
pub mod writer;

pub use dequant::GgmlType;
pub use error::{GgufError, Result};
pub use reader::{GgufFile, TensorInfo, Value, ValueType};
