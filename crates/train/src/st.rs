//! Small safetensors helpers: widen F32/BF16/F16 tensors to f32, write files atomically.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{Result, TrainError};

/// Read a whole file into memory (adapters and fixtures are small; base models use mmap).
pub(crate) fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| TrainError::io(path, e))
}

/// Parse a safetensors buffer, naming `path` on failure.
pub(crate) fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| TrainError::tensor(path, "<header>", format!("invalid safetensors: {e}")))
}

/// Widen an F32/BF16/F16 tensor to f32 exactly (every bf16/f16 value is an f32).
pub(crate) fn view_to_f32(path: &Path, name: &str, v: &TensorView<'_>) -> Result<Vec<f32>> {
    nf4_dtype(v.dtype())
        .and_then(|d| qlora_nf4::to_f32(d, v.data()))
        .ok_or_else(|| {
            TrainError::tensor(
                path,
                name,
                format!("dtype {:?}; expected F32, BF16 or F16", v.dtype()),
            )
        })
}

/// The same dtype in qlora-nf4's enum (the names are safetensors' own).
fn nf4_dtype(d: Dtype) -> Option<qlora_nf4::Dtype> {
    qlora_nf4::Dtype::from_safetensors_name(&format!("{d:?}"))
}

/// One tensor to write: name, dtype, shape, little-endian bytes.
pub(crate) struct OutTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl OutTensor {
    pub(crate) fn f32(name: impl Into<String>, shape: Vec<usize>, data: &[f32]) -> OutTensor {
        OutTensor {
            name: name.into(),
            dtype: Dtype::F32,
            shape,
            bytes: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
    pub(crate) fn i64(name: impl Into<String>, shape: Vec<usize>, data: &[i64]) -> OutTensor {
        OutTensor {
            name: name.into(),
            dtype: Dtype::I64,
            shape,
            bytes: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// Write a safetensors file atomically (qlora-nf4's writer: `<path>.partial`, then rename), so
/// a reader never sees a half-written file.
pub(crate) fn write_atomic(path: &Path, tensors: &[OutTensor], format_pt: bool) -> Result<()> {
    let owned = tensors
        .iter()
        .map(|t| {
            let d = nf4_dtype(t.dtype).ok_or_else(|| {
                TrainError::tensor(path, &t.name, format!("cannot write dtype {:?}", t.dtype))
            })?;
            Ok((t.name.clone(), d, t.shape.clone(), t.bytes.clone()))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = format_pt.then(|| HashMap::from([("format".to_string(), "pt".to_string())]));
    qlora_nf4::write_safetensors(path, &owned, meta)
        .map_err(|e| TrainError::tensor(path, "<file>", e.to_string()))
}

/// Write bytes to `path` through a temp file + rename in the same directory.
pub(crate) fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| TrainError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}
