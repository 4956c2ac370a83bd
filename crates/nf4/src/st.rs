//! Safetensors files and Hugging Face model directories: memory-mapped reading with every
//! header field validated (a header whose offsets lie is an error naming file and tensor), and
//! writing, atomically and with memory bounded by the largest tensor rather than the file.

use crate::{to_f32, Dtype, Nf4Error, Result};
use memmap2::Mmap;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Headers larger than this are refused: real headers are kilobytes to a few megabytes.
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Where one tensor lives inside a safetensors file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the data section (after the header).
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One memory-mapped, validated safetensors file.
pub struct SafetensorsFile {
    pub path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    /// Sorted by name.
    pub tensors: BTreeMap<String, TensorInfo>,
    pub metadata: HashMap<String, String>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let bad = |reason: String| Nf4Error::BadSafetensors {
            path: path.into(),
            reason,
        };
        let file = File::open(path).map_err(|e| Nf4Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Nf4Error::io(path, e))?.len();
        if len < 8 {
            return Err(bad(format!(
                "file is {len} bytes, shorter than the 8-byte header length"
            )));
        }
        // SAFETY: the map is read-only; a concurrent writer truncating the file is outside the
        // contract of every checkpoint reader (transformers and safetensors map files too).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Nf4Error::io(path, e))?;
        // Checkpoints are read front to back: let the kernel read ahead aggressively.
        #[cfg(unix)]
        let _ = mmap.advise(memmap2::Advice::Sequential);
        let header_len = u64::from_le_bytes(mmap[..8].try_into().unwrap());
        if header_len > MAX_HEADER_BYTES || 8 + header_len > len {
            return Err(bad(format!("header length {header_len} exceeds the file size {len} (truncated or not safetensors)")));
        }
        let data_start = 8 + header_len as usize;
        let header: Value = serde_json::from_slice(&mmap[8..data_start])
            .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
        let Value::Object(entries) = header else {
            return Err(bad("header is not a JSON object".into()));
        };
        let data_len = mmap.len() - data_start;
        let mut tensors = BTreeMap::new();
        let mut metadata = HashMap::new();
        for (name, entry) in entries {
            if name == "__metadata__" {
                if let Value::Object(m) = entry {
                    for (k, v) in m {
                        metadata.insert(
                            k,
                            v.as_str()
                                .map(str::to_string)
                                .unwrap_or_else(|| v.to_string()),
                        );
                    }
                }
                continue;
            }
            let info = parse_entry(&entry).map_err(|reason| Nf4Error::BadStoredTensor {
                path: path.into(),
                tensor: name.clone(),
                reason,
            })?;
            if info.end > data_len {
                return Err(Nf4Error::BadStoredTensor {
                    path: path.into(),
                    tensor: name,
                    reason: format!("data ends at byte {} but the file has only {data_len} data bytes (truncated?)", info.end),
                });
            }
            tensors.insert(name, info);
        }
        // Tensors must not overlap: sort the ranges and compare neighbours.
        let mut ranges: Vec<(&String, &TensorInfo)> =
            tensors.iter().filter(|(_, t)| t.end > t.start).collect();
        ranges.sort_by_key(|(_, t)| t.start);
        for w in ranges.windows(2) {
            if w[1].1.start < w[0].1.end {
                return Err(Nf4Error::BadStoredTensor {
                    path: path.into(),
                    tensor: w[1].0.clone(),
                    reason: format!(
                        "its bytes {}..{} overlap tensor `{}`",
                        w[1].1.start, w[1].1.end, w[0].0
                    ),
                });
            }
        }
        Ok(SafetensorsFile {
            path: path.into(),
            mmap,
            data_start,
            tensors,
            metadata,
        })
    }

    /// The raw little-endian bytes of a tensor.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.tensors.get(name).ok_or_else(|| {
            Nf4Error::MissingTensor(format!("{name} (in {})", self.path.display()))
        })?;
        Ok(&self.mmap[self.data_start + t.start..self.data_start + t.end])
    }

    /// Ask the kernel to start reading a tensor's pages now (it is about to be used).
    pub fn prefetch(&self, name: &str) {
        #[cfg(unix)]
        if let Some(t) = self.tensors.get(name) {
            let start = (self.data_start + t.start) / 4096 * 4096;
            let _ = self.mmap.advise_range(
                memmap2::Advice::WillNeed,
                start,
                self.data_start + t.end - start,
            );
        }
        #[cfg(not(unix))]
        let _ = name;
    }

    /// Let the kernel drop the cached pages of a tensor we are done with, so that streaming
    /// through a large checkpoint keeps resident memory near one tensor, not the whole file.
    pub fn release(&self, name: &str) {
        #[cfg(unix)]
        if let Some(t) = self.tensors.get(name) {
            let page = 4096;
            let start = (self.data_start + t.start) / page * page;
            let end = self.data_start + t.end;
            // SAFETY: the map is read-only and file-backed; dropped pages are re-read from the
            // file if touched again, so no data can be lost or observed changed.
            let _ = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
        #[cfg(not(unix))]
        let _ = name;
    }
}

fn parse_entry(entry: &Value) -> std::result::Result<TensorInfo, String> {
    let dtype_s = entry
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or("missing `dtype`")?;
    let dtype = Dtype::from_safetensors_name(dtype_s)
        .ok_or_else(|| format!("unsupported dtype {dtype_s}"))?;
    let shape: Vec<usize> = entry
        .get("shape")
        .and_then(Value::as_array)
        .ok_or("missing `shape`")?
        .iter()
        .map(|d| {
            d.as_u64()
                .map(|d| d as usize)
                .ok_or("shape entries must be non-negative integers")
        })
        .collect::<std::result::Result<_, _>>()?;
    let offsets = entry
        .get("data_offsets")
        .and_then(Value::as_array)
        .ok_or("missing `data_offsets`")?;
    let (start, end) = match offsets.as_slice() {
        [s, e] => (
            s.as_u64().ok_or("bad data_offsets")? as usize,
            e.as_u64().ok_or("bad data_offsets")? as usize,
        ),
        _ => return Err("data_offsets must be [start, end]".into()),
    };
    if end < start {
        return Err(format!("data_offsets [{start}, {end}] are reversed"));
    }
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("shape overflows")?;
    if numel * dtype.size() != end - start {
        return Err(format!(
            "shape {shape:?} of {dtype_s} needs {} bytes but data_offsets [{start}, {end}] span {}",
            numel * dtype.size(),
            end - start
        ));
    }
    Ok(TensorInfo {
        dtype,
        shape,
        start,
        end,
    })
}

/// The weights of a Hugging Face model directory: `model.safetensors`, or shards listed in
/// `model.safetensors.index.json`. Tensors are memory-mapped, never copied until asked for.
pub struct ModelWeights {
    pub dir: PathBuf,
    pub files: Vec<Arc<SafetensorsFile>>,
    /// tensor name → index into `files`.
    index: BTreeMap<String, usize>,
}

impl ModelWeights {
    pub fn open(dir: &Path) -> Result<ModelWeights> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Nf4Error::io(&index_path, e))?;
            let json: Value = serde_json::from_str(&text).map_err(|e| Nf4Error::BadJson {
                path: index_path.clone(),
                reason: e.to_string(),
            })?;
            let map = json
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| Nf4Error::BadConfig {
                    path: index_path.clone(),
                    key: "weight_map".into(),
                    reason: "missing or not an object".into(),
                })?;
            let mut shard_names: Vec<&str> = Vec::new();
            for (tensor, shard) in map {
                let shard = shard.as_str().ok_or_else(|| Nf4Error::BadConfig {
                    path: index_path.clone(),
                    key: format!("weight_map.{tensor}"),
                    reason: "not a file name".into(),
                })?;
                if shard.contains('/') || shard.contains('\\') {
                    return Err(Nf4Error::BadConfig {
                        path: index_path.clone(),
                        key: format!("weight_map.{tensor}"),
                        reason: format!("shard `{shard}` is not a plain file name"),
                    });
                }
                if !shard_names.contains(&shard) {
                    shard_names.push(shard);
                }
            }
            shard_names.sort();
            let files: Vec<Arc<SafetensorsFile>> = shard_names
                .iter()
                .map(|s| SafetensorsFile::open(&dir.join(s)).map(Arc::new))
                .collect::<Result<_>>()?;
            let mut index = BTreeMap::new();
            for (tensor, shard) in map {
                let i = shard_names
                    .iter()
                    .position(|s| Some(*s) == shard.as_str())
                    .unwrap();
                if !files[i].tensors.contains_key(tensor) {
                    return Err(Nf4Error::BadConfig {
                        path: index_path.clone(),
                        key: format!("weight_map.{tensor}"),
                        reason: format!("tensor is not in shard {}", files[i].path.display()),
                    });
                }
                index.insert(tensor.clone(), i);
            }
            Ok(ModelWeights {
                dir: dir.into(),
                files,
                index,
            })
        } else if single.exists() {
            let f = Arc::new(SafetensorsFile::open(&single)?);
            let index = f.tensors.keys().map(|k| (k.clone(), 0)).collect();
            Ok(ModelWeights {
                dir: dir.into(),
                files: vec![f],
                index,
            })
        } else if dir.join("pytorch_model.bin").exists()
            || dir.join("pytorch_model.bin.index.json").exists()
        {
            Err(Nf4Error::Io {
                path: dir.into(),
                error: std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "has only pytorch_model.bin (pickle) weights, which are not read for safety; \
                     convert them to safetensors first (transformers: save_pretrained(..., safe_serialization=True))",
                ),
            })
        } else {
            Err(Nf4Error::Io {
                path: dir.into(),
                error: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json in this directory",
                ),
            })
        }
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn file_of(&self, name: &str) -> Result<&Arc<SafetensorsFile>> {
        self.index
            .get(name)
            .map(|&i| &self.files[i])
            .ok_or_else(|| Nf4Error::MissingTensor(format!("{name} (in {})", self.dir.display())))
    }

    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        Ok(&self.file_of(name)?.tensors[name])
    }

    pub fn info(&self, name: &str) -> Result<(Dtype, Vec<usize>)> {
        let t = self.tensor_info(name)?;
        Ok((t.dtype, t.shape.clone()))
    }

    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        self.file_of(name)?.bytes(name)
    }

    /// A float tensor widened exactly to f32, row-major.
    pub fn get_f32(&self, name: &str) -> Result<Vec<f32>> {
        let f = self.file_of(name)?;
        let t = &f.tensors[name];
        to_f32(t.dtype, f.bytes(name)?).ok_or_else(|| Nf4Error::BadStoredTensor {
            path: f.path.clone(),
            tensor: name.into(),
            reason: format!(
                "dtype {} is not a float type (expected F32, BF16 or F16)",
                t.dtype.safetensors_name()
            ),
        })
    }

    pub fn release(&self, name: &str) {
        if let Ok(f) = self.file_of(name) {
            f.release(name);
        }
    }

    pub fn prefetch(&self, name: &str) {
        if let Ok(f) = self.file_of(name) {
            f.prefetch(name);
        }
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> usize {
        self.index
            .iter()
            .map(|(n, &i)| {
                let t = &self.files[i].tensors[n];
                t.end - t.start
            })
            .sum()
    }
}

/// A tensor to be written: (name, dtype, shape, little-endian bytes).
pub type OwnedTensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// Write a safetensors file atomically (`<path>.partial`, then rename).
pub fn write_safetensors(
    path: &Path,
    tensors: &[OwnedTensor],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let reserve = header_bound(
        tensors.iter().map(|t| (t.0.as_str(), t.2.len())),
        metadata.as_ref(),
    );
    let mut w = StreamingWriter::create(path, reserve)?;
    for (name, dtype, shape, bytes) in tensors {
        w.add(name, *dtype, shape, bytes)?;
    }
    w.finish(metadata).map(|_| ())
}

/// An upper bound of the JSON header size for tensors with these names and ranks: what
/// [`StreamingWriter::create`] reserves so that the header can be written in front of the data
/// afterwards. Per entry: the name (escaped, at most doubled), the fixed keys, at most 20
/// digits per shape dimension and per offset.
pub fn header_bound<'a>(
    entries: impl Iterator<Item = (&'a str, usize)>,
    metadata: Option<&HashMap<String, String>>,
) -> usize {
    let meta: usize = metadata.map_or(0, |m| {
        32 + m
            .iter()
            .map(|(k, v)| 2 * (k.len() + v.len()) + 8)
            .sum::<usize>()
    });
    2 + meta
        + entries
            .map(|(name, ndim)| 2 * name.len() + 64 + 21 * ndim + 42)
            .sum::<usize>()
}

/// Writes a safetensors file while its tensors are produced one by one, with memory bounded by
/// one tensor: data is appended behind a reserved header region, and `finish` writes the header
/// into that region, padded with spaces (which the format allows), then renames
/// `<path>.partial` onto `path`. If the header outgrows the reservation (a too-small estimate),
/// `finish` falls back to copying the data behind a fresh header.
pub struct StreamingWriter {
    path: PathBuf,
    partial: PathBuf,
    file: BufWriter<File>,
    /// Bytes reserved for the header (a multiple of 8, so the data starts 8-byte aligned).
    reserve: usize,
    entries: Vec<(String, Dtype, Vec<usize>, usize, usize)>,
    offset: usize,
}

impl StreamingWriter {
    /// Start writing `path` (as `<path>.partial`), reserving `header_reserve` bytes for the
    /// header (see [`header_bound`]).
    pub fn create(path: &Path, header_reserve: usize) -> Result<StreamingWriter> {
        let partial = partial_path(path);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)
            .map_err(|e| Nf4Error::io(&partial, e))?;
        let reserve = header_reserve.div_ceil(8) * 8;
        let mut file = BufWriter::with_capacity(1 << 20, f);
        file.seek(SeekFrom::Start(8 + reserve as u64))
            .map_err(|e| Nf4Error::io(&partial, e))?;
        Ok(StreamingWriter {
            path: path.into(),
            partial,
            file,
            reserve,
            entries: Vec::new(),
            offset: 0,
        })
    }

    pub fn add(&mut self, name: &str, dtype: Dtype, shape: &[usize], bytes: &[u8]) -> Result<()> {
        let numel: usize = shape.iter().product();
        if numel * dtype.size() != bytes.len() {
            return Err(Nf4Error::BadTensor {
                tensor: name.into(),
                reason: format!(
                    "shape {shape:?} of {} needs {} bytes, got {}",
                    dtype.safetensors_name(),
                    numel * dtype.size(),
                    bytes.len()
                ),
            });
        }
        if self.entries.iter().any(|e| e.0 == name) {
            return Err(Nf4Error::BadTensor {
                tensor: name.into(),
                reason: "written twice".into(),
            });
        }
        self.file
            .write_all(bytes)
            .map_err(|e| Nf4Error::io(&self.partial, e))?;
        self.entries.push((
            name.into(),
            dtype,
            shape.to_vec(),
            self.offset,
            self.offset + bytes.len(),
        ));
        self.offset += bytes.len();
        Ok(())
    }

    pub fn data_bytes(&self) -> usize {
        self.offset
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.0.as_str())
    }

    /// Write the header and move the file into place. Returns the file size. Header entries
    /// are sorted by name; the data keeps arrival order.
    pub fn finish(self, metadata: Option<HashMap<String, String>>) -> Result<u64> {
        let StreamingWriter {
            path,
            partial,
            file,
            reserve,
            mut entries,
            offset,
        } = self;
        let fail = |e: std::io::Error| {
            let _ = std::fs::remove_file(&partial);
            Nf4Error::io(&path, e)
        };
        let mut file = file.into_inner().map_err(|e| fail(e.into_error()))?;
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut header = serde_json::Map::new();
        if let Some(m) = metadata {
            let mut sorted: Vec<_> = m.into_iter().collect();
            sorted.sort();
            let m = sorted
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            header.insert("__metadata__".into(), Value::Object(m));
        }
        for (name, dtype, shape, s, e) in &entries {
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": dtype.safetensors_name(), "shape": shape, "data_offsets": [s, e]}),
            );
        }
        let mut hbytes =
            serde_json::to_vec(&Value::Object(header)).expect("JSON of strings and numbers");
        let size = if hbytes.len() <= reserve {
            hbytes.resize(reserve, b' ');
            let mut write_header = || -> std::io::Result<u64> {
                file.seek(SeekFrom::Start(0))?;
                file.write_all(&(reserve as u64).to_le_bytes())?;
                file.write_all(&hbytes)?;
                file.set_len((8 + reserve + offset) as u64)?;
                Ok((8 + reserve + offset) as u64)
            };
            write_header().map_err(fail)?
        } else {
            // The reservation was too small: copy the data behind a header of the right size.
            while !(8 + hbytes.len()).is_multiple_of(8) {
                hbytes.push(b' ');
            }
            let copy = partial.with_extension("partial2");
            let mut copy_over = || -> std::io::Result<u64> {
                let mut out = BufWriter::new(File::create(&copy)?);
                out.write_all(&(hbytes.len() as u64).to_le_bytes())?;
                out.write_all(&hbytes)?;
                file.seek(SeekFrom::Start(8 + reserve as u64))?;
                std::io::copy(&mut (&mut file).take(offset as u64), &mut out)?;
                out.flush()?;
                std::fs::rename(&copy, &partial)?;
                Ok((8 + hbytes.len() + offset) as u64)
            };
            copy_over().map_err(|e| {
                let _ = std::fs::remove_file(&copy);
                fail(e)
            })?
        };
        drop(file);
        std::fs::rename(&partial, &path).map_err(|e| Nf4Error::io(&path, e))?;
        Ok(size)
    }
}

fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> Vec<OwnedTensor> {
        (0..20)
            .map(|i| {
                (
                    format!("layer.{i}.weight"),
                    Dtype::F32,
                    vec![2, 3],
                    vec![i as u8; 24],
                )
            })
            .collect()
    }

    fn check(path: &Path) {
        let f = SafetensorsFile::open(path).unwrap();
        assert_eq!(f.tensors.len(), 20);
        for i in 0..20 {
            assert_eq!(
                f.bytes(&format!("layer.{i}.weight")).unwrap(),
                &[i as u8; 24][..]
            );
        }
        assert_eq!(f.metadata.get("format").map(String::as_str), Some("pt"));
        assert_eq!(f.data_start % 8, 0, "data 8-byte aligned");
    }

    #[test]
    fn header_fits_the_reservation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(&p, &tensors(), Some(meta)).unwrap();
        check(&p);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no partial file left"
        );
    }

    #[test]
    fn header_larger_than_reserved_falls_back_to_copy() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.safetensors");
        let mut w = StreamingWriter::create(&p, 16).unwrap();
        for (n, d, s, b) in tensors() {
            w.add(&n, d, &s, &b).unwrap();
        }
        w.finish(Some(HashMap::from([(
            "format".to_string(),
            "pt".to_string(),
        )])))
        .unwrap();
        check(&p);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no partial file left"
        );
    }

    #[test]
    fn bound_is_an_upper_bound() {
        let t = tensors();
        let bound = header_bound(t.iter().map(|t| (t.0.as_str(), t.2.len())), None);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.safetensors");
        write_safetensors(&p, &t, None).unwrap();
        let n = u64::from_le_bytes(std::fs::read(&p).unwrap()[..8].try_into().unwrap()) as usize;
        let header = std::fs::read(&p).unwrap()[8..8 + n].to_vec();
        let used = String::from_utf8(header).unwrap().trim_end().len();
        assert!(used <= bound, "{used} > {bound}");
    }
}
