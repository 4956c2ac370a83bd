//! Where base-model tensors come from: a Hugging Face directory of safetensors (single file or
//! sharded with `model.safetensors.index.json`, memory-mapped), or an in-memory map
//! (synthetic models for benchmarks and tests).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};
use crate::st;

/// A named-tensor store the model loader reads from.
pub trait WeightSource {
    /// Names errors (a directory or "<synthetic>").
    fn origin(&self) -> PathBuf;
    fn contains(&self, name: &str) -> bool;
    /// Shape of a tensor.
    fn shape(&self, name: &str) -> Result<Vec<usize>>;
    /// An F32/BF16/F16 tensor widened exactly to f32, row-major.
    fn get_f32(&self, name: &str) -> Result<Vec<f32>>;
}

/// Safetensors files of a model directory, memory-mapped.
pub struct SafetensorsDir {
    dir: PathBuf,
    files: Vec<(PathBuf, memmap2::Mmap)>,
    /// tensor name → index into `files`
    index: HashMap<String, usize>,
}

impl SafetensorsDir {
    /// Open `dir/model.safetensors` or the shards listed by `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<SafetensorsDir> {
        let idx_path = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if idx_path.exists() {
            let text = std::fs::read_to_string(&idx_path).map_err(|e| TrainError::io(&idx_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| TrainError::Json {
                path: idx_path.clone(),
                source,
            })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| TrainError::config(&idx_path, "weight_map", "missing or not an object"))?;
            let mut names: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
            names.sort();
            names.dedup();
            names
        } else {
            vec!["model.safetensors".to_string()]
        };
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for name in shard_names {
            if name.contains('/') || name.contains("..") {
                return Err(TrainError::config(&idx_path, "weight_map", format!("shard name `{name}` is not a plain file name")));
            }
            let p = dir.join(&name);
            let f = std::fs::File::open(&p).map_err(|e| TrainError::io(&p, e))?;
            // SAFETY: the file is opened read-only; a concurrent writer would be a user error
            // that at worst yields garbage values, which header validation bounds.
            let mm = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| TrainError::io(&p, e))?;
            let parsed = st::parse(&p, &mm)?;
            for n in parsed.names() {
                index.insert(n.to_string(), files.len());
            }
            files.push((p, mm));
        }
        Ok(SafetensorsDir {
            dir: dir.to_path_buf(),
            files,
            index,
        })
    }

    fn view<R>(&self, name: &str, f: impl FnOnce(&Path, &safetensors::tensor::TensorView<'_>) -> Result<R>) -> Result<R> {
        let &i = self.index.get(name).ok_or_else(|| TrainError::MissingTensor {
            path: self.dir.clone(),
            tensor: name.to_string(),
        })?;
        let (p, mm) = &self.files[i];
        let parsed = st::parse(p, mm)?;
        let v = parsed
            .tensor(name)
            .map_err(|e| TrainError::tensor(p, name, e.to_string()))?;
        f(p, &v)
    }
}

impl WeightSource for SafetensorsDir {
    fn origin(&self) -> PathBuf {
        self.dir.clone()
    }
    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.view(name, |_, v| Ok(v.shape().to_vec()))
    }
    fn get_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.view(name, |p, v| st::view_to_f32(p, name, v))
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
