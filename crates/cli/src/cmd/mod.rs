pub mod bench;
pub mod dequantize;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod memory;
pub mod merge;
pub mod quantize;
pub mod step;
pub mod train;

use anyhow::{bail, Result};
use qlora_nf4::Dtype;

/// `bf16|f16|f32` (also the torch spellings) → Dtype.
pub fn parse_float_dtype(s: &str) -> Result<Dtype> {
    Ok(match s {
        "bf16" | "bfloat16" => Dtype::BF16,
        "f16" | "fp16" | "float16" => Dtype::F16,
        "f32" | "fp32" | "float32" => Dtype::F32,
        other => bail!("unknown dtype `{other}` (expected bf16, f16 or f32)"),
    })
}
