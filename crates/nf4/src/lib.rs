//! NF4 blockwise quantization with double-quantized constants, byte-for-byte what bitsandbytes
//! writes (specs/nf4.md), and the Hugging Face checkpoint formats around it: plain safetensors
//! model directories (single or sharded) and the transformers bitsandbytes 4-bit format.

pub mod codebook;
mod dtype;
mod error;
pub mod quant;

pub use dtype::{from_f32, to_f32, Dtype};
pub use error::{Nf4Error, Result};
pub use quant::{Absmax, FloatData, Nf4Tensor, QuantState, NESTED_BLOCKSIZE};
