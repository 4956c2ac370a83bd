//! GGUF (llama.cpp) import: a bounds-checked memory-mapped reader, dequantization of the
//! common ggml block types exactly as llama.cpp's reference, and the reconstruction of a
//! Hugging Face Llama model directory (weights, `config.json`, `tokenizer.json`) from a
//! `llama` GGUF file.
//!
//! Entry points: [`convert_to_hf`] writes a whole HF directory; [`GgufModel`] gives the same
//! tensors one at a time (HF names, shapes and f32 values) for callers that stream them into
//! another format.

pub mod convert;
pub mod dequant;
pub mod error;
pub mod hf;
pub mod reader;
pub mod tokenizer;
pub mod writer;

pub use convert::{convert_to_hf, ConvertSummary};
pub use dequant::GgmlType;
pub use error::{GgufError, Result};
pub use hf::{GgufModel, HfTensor, LlamaHparams, OutDtype};
pub use reader::{is_gguf, GgufFile, TensorInfo, Value, ValueType};
pub use tokenizer::{build_tokenizer, TokenizerFiles};
