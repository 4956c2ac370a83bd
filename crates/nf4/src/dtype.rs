//! Element types of checkpoint tensors and exact conversion of float types to f32.

use half::{bf16, f16};

/// Element dtypes of checkpoint tensors (the subset of safetensors' that model files use).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    BF16,
    F16,
    F64,
    U8,
    I8,
    I16,
    I32,
    I64,
    Bool,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::U8 | Dtype::I8 | Dtype::Bool => 1,
            Dtype::BF16 | Dtype::F16 | Dtype::I16 => 2,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F64 | Dtype::I64 => 8,
        }
    }

    /// The safetensors header spelling.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::BF16 => "BF16",
            Dtype::F16 => "F16",
            Dtype::F64 => "F64",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::I16 => "I16",
            Dtype::I32 => "I32",
            Dtype::I64 => "I64",
            Dtype::Bool => "BOOL",
        }
    }

    pub fn from_safetensors_name(s: &str) -> Option<Dtype> {
        Some(match s {
            "F32" => Dtype::F32,
            "BF16" => Dtype::BF16,
            "F16" => Dtype::F16,
            "F64" => Dtype::F64,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "I16" => Dtype::I16,
            "I32" => Dtype::I32,
            "I64" => Dtype::I64,
            "BOOL" => Dtype::Bool,
            _ => return None,
        })
    }

    /// The torch spelling used in `config.json` (`dtype`/`torch_dtype`) and the quant-state JSON.
    pub fn torch_name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::BF16 => "bfloat16",
            Dtype::F16 => "float16",
            Dtype::F64 => "float64",
            Dtype::U8 => "uint8",
            Dtype::I8 => "int8",
            Dtype::I16 => "int16",
            Dtype::I32 => "int32",
            Dtype::I64 => "int64",
            Dtype::Bool => "bool",
        }
    }

    pub fn from_torch_name(s: &str) -> Option<Dtype> {
        Some(match s.trim_start_matches("torch.") {
            "float32" | "float" => Dtype::F32,
            "bfloat16" => Dtype::BF16,
            "float16" | "half" => Dtype::F16,
            "float64" | "double" => Dtype::F64,
            "uint8" => Dtype::U8,
            "int8" => Dtype::I8,
            "int16" => Dtype::I16,
            "int32" => Dtype::I32,
            "int64" => Dtype::I64,
            "bool" => Dtype::Bool,
            _ => return None,
        })
    }

    /// f32, bf16 and f16: the dtypes whose weights can be quantized and computed with.
    pub fn is_float16_or_32(self) -> bool {
        matches!(self, Dtype::F32 | Dtype::BF16 | Dtype::F16)
    }
}

/// Widen little-endian f32/bf16/f16 bytes to f32. Exact: every bf16 and f16 value is an f32.
/// Returns None for other dtypes or a byte count that is not a multiple of the element size.
pub fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    if !bytes.len().is_multiple_of(dtype.size()) {
        return None;
    }
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        _ => return None,
    })
}

/// Round f32 values once (round-to-nearest-even) to `dtype` (f32, bf16 or f16) as LE bytes.
pub fn from_f32(dtype: Dtype, values: &[f32]) -> Option<Vec<u8>> {
    Some(match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes())
            .collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes())
            .collect(),
        _ => return None,
    })
}
