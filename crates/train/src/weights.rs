//! Where base-model tensors come from: a Hugging Face directory of safetensors (single file or
//! sharded, memory-mapped, through `qlora_nf4::ModelWeights`, including bitsandbytes 4-bit
//! weights), or an in-memory map (synthetic models for benchmarks and tests).

use std::collections::HashMap;
use std::path::PathBuf;

use crate::error::{Result, TrainError};

/// A named-tensor store the model loader reads from.
pub trait WeightSource {
    /// Names errors (a directory or "<synthetic>").
    fn origin(&self) -> PathBuf;
    fn contains(&self, name: &str) -> bool;
    /// Shape of a tensor.
    fn shape(&self, name: &str) -> Result<Vec<usize>>;
    /// An F32/BF16/F16 tensor widened exactly to f32, row-major.
    fn get_f32(&self, name: &str) -> Result<Vec<f32>>;
    /// Is `"<module>.weight"` stored as bitsandbytes 4-bit NF4?
    fn is_nf4(&self, _weight_name: &str) -> bool {
        false
    }
    /// Load a bitsandbytes NF4 weight.
    fn get_nf4(&self, weight_name: &str) -> Result<qlora_nf4::Nf4Tensor> {
        Err(TrainError::tensor(
            self.origin(),
            weight_name,
            "is not an NF4 weight",
        ))
    }
    /// Stored dtype of a tensor (None: f32 in memory).
    fn dtype(&self, _name: &str) -> Option<qlora_nf4::Dtype> {
        None
    }
}

impl WeightSource for qlora_nf4::ModelWeights {
    fn origin(&self) -> PathBuf {
        self.dir.clone()
    }
    fn contains(&self, name: &str) -> bool {
        qlora_nf4::ModelWeights::contains(self, name)
    }
    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.info(name)?.1)
    }
    fn get_f32(&self, name: &str) -> Result<Vec<f32>> {
        Ok(qlora_nf4::ModelWeights::get_f32(self, name)?)
    }
    fn is_nf4(&self, weight_name: &str) -> bool {
        qlora_nf4::ModelWeights::is_nf4(self, weight_name)
    }
    fn get_nf4(&self, weight_name: &str) -> Result<qlora_nf4::Nf4Tensor> {
        Ok(qlora_nf4::ModelWeights::get_nf4(self, weight_name)?)
    }
    fn dtype(&self, name: &str) -> Option<qlora_nf4::Dtype> {
        self.info(name).ok().map(|(d, _)| d)
    }
}

/// Tensors held in memory: `name → (shape, f32 data)`.
#[derive(Default)]
pub struct MapSource {
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl WeightSource for MapSource {
    fn origin(&self) -> PathBuf {
        PathBuf::from("<in-memory weights>")
    }
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.tensors
            .get(name)
            .map(|(s, _)| s.clone())
            .ok_or_else(|| TrainError::MissingTensor {
                path: self.origin(),
                tensor: name.to_string(),
            })
    }
    fn get_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.tensors
            .get(name)
            .map(|(_, d)| d.clone())
            .ok_or_else(|| TrainError::MissingTensor {
                path: self.origin(),
                tensor: name.to_string(),
            })
    }
}
