//! NF4 blockwise quantization with double-quantized constants, byte-for-byte what bitsandbytes
//! writes (specs/nf4.md), and the Hugging Face checkpoint formats around it: plain safetensors
//! model directories (single or sharded) and the transformers bitsandbytes 4-bit format.

pub mod bnb;
pub mod codebook;
pub mod convert;
mod dtype;
mod error;
pub mod quant;
pub mod st;

pub use dtype::{from_f32, to_f32, Dtype};
pub use error::{Nf4Error, Result};
pub use quant::{Absmax, Dequant, FloatData, Nf4Tensor, QuantState, NESTED_BLOCKSIZE};
pub use st::{write_safetensors, ModelWeights, SafetensorsFile, StreamingWriter, TensorInfo};
