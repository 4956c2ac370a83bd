//! GGUF v2/v3 parser over a memory map.
//!
//! File layout (gguf.h; all integers little-endian):
//! ```text
//! "GGUF" | u32 version | u64 n_tensors | u64 n_kv
//! n_kv × (string key | u32 value type | value)          string = u64 len + UTF-8 bytes
//!                                                       array  = u32 elem type + u64 n + n values
//! n_tensors × (string name | u32 n_dims | u64 ne[n_dims] | u32 ggml type | u64 offset)
//! zero padding to `general.alignment` (default 32)
//! tensor data; each tensor at data_start + offset, offset a multiple of the alignment
//! ```
//! `ne[0]` is the fastest-varying dimension (a row of a weight matrix). Version 1 used 32-bit
//! counts and is refused. Every read is bounds-checked against the mapped length, and array
//! lengths are checked against the bytes that remain before anything is allocated, so a
//! corrupt count cannot make us allocate terabytes.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::dequant::{self, GgmlType};
use crate::error::{GgufError, Result};

/// `GGUF_DEFAULT_ALIGNMENT` in gguf.h.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// `GGML_MAX_DIMS`.
pub const MAX_DIMS: u32 = 4;

/// A GGUF metadata value type tag (`enum gguf_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    fn from_u32(t: u32) -> Option<ValueType> {
        use ValueType::*;
        Some(match t {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Smallest encoded size of one value of this type (a string is at least its u64 length,
    /// an array at least its type tag and count); used to reject impossible array counts.
    fn min_size(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// A metadata value. Arrays keep their element type so that an empty array still has one.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(ValueType, Vec<Value>),
}

impl Value {
    /// The type tag of this value.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F32(_) => ValueType::F32,
            Value::F64(_) => ValueType::F64,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
        }
    }

    /// Any integer type as i128 (so u64 and negative i64 both fit); `None` for non-integers.
    pub fn as_int(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v as i128,
            Value::I8(v) => v as i128,
            Value::U16(v) => v as i128,
            Value::I16(v) => v as i128,
            Value::U32(v) => v as i128,
            Value::I32(v) => v as i128,
            Value::U64(v) => v as i128,
            Value::I64(v) => v as i128,
            _ => return None,
        })
    }

    /// F32 or F64 (narrowed) as f32; integers are not silently accepted as floats.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            _ => None,
        }
    }
}

/// One tensor-info entry, validated against the file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml dims, `ne[0]` fastest; the row-major (PyTorch/HF) shape is this reversed.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
    /// Product of `dims`.
    pub n_elements: u64,
}

impl TensorInfo {
    /// The row-major shape Hugging Face uses: ggml dims reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open, validated GGUF file. Tensor data stays in the memory map until asked for.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_start: u64,
}

/// Bounds-checked little-endian reader over the mapped bytes.
struct Cursor<'a> {
    path: &'a Path,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let remaining = (self.buf.len() - self.pos) as u64;
        if n > remaining {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: what(),
                offset: self.pos as u64,
                needed: n,
                len: self.buf.len() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn corrupt(&self, what: String, reason: String) -> GgufError {
        GgufError::Corrupt {
            path: self.path.to_path_buf(),
            what,
            reason,
        }
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(&|| format!("{} (string length)", what()))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| self.corrupt(what(), format!("string is not UTF-8 ({e})")))
    }

    fn value(&mut self, ty: ValueType, what: &dyn Fn() -> String, depth: u32) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(what)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(what)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => Value::U32(self.u32(what)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::U64 => Value::U64(self.u64(what)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Bool => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.corrupt(what(), format!("bool byte is {b}, not 0 or 1"))),
            },
            ValueType::String => Value::String(self.string(what)?),
            ValueType::Array => {
                // gguf.cpp allows nested arrays; a depth limit keeps a malicious file from
                // recursing the stack away.
                if depth >= 8 {
                    return Err(self.corrupt(what(), "arrays nested deeper than 8".into()));
                }
                let tag = self.u32(&|| format!("{} (array element type)", what()))?;
                let ety = ValueType::from_u32(tag).ok_or_else(|| {
                    self.corrupt(what(), format!("unknown array element type {tag}"))
                })?;
                let n = self.u64(&|| format!("{} (array length)", what()))?;
                if n.saturating_mul(ety.min_size()) > self.remaining() {
                    return Err(GgufError::Truncated {
                        path: self.path.to_path_buf(),
                        what: format!("{} ({n} array elements)", what()),
                        offset: self.pos as u64,
                        needed: n.saturating_mul(ety.min_size()),
                        len: self.buf.len() as u64,
                    });
                }
                // The count passed the size check, but a corrupt one can still be large: grow
                // from a bounded capacity instead of reserving it all up front.
                let mut items = Vec::with_capacity((n as usize).min(1 << 16));
                for i in 0..n {
                    items.push(self.value(ety, &|| format!("{}[{i}]", what()), depth + 1)?);
                }
                Value::Array(ety, items)
            }
        })
    }
}

/// Whether `path` is a file that starts with the GGUF magic (for callers that accept either a
/// GGUF file or a model directory). Unreadable paths are not GGUF.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file()
        && File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == b"GGUF"
}

impl GgufFile {
    /// Map and parse `path`; validates the header, every metadata entry and every tensor
    /// entry (offset alignment, sizes of supported types within the file, no duplicates).
    pub fn open(path: &Path) -> Result<GgufFile> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this process; as with every mmap-based
        // model loader, the file must not be truncated by another process while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let mut c = Cursor {
            path,
            buf: &mmap,
            pos: 0,
        };
        let magic: [u8; 4] = c.array(&|| "the magic bytes".into())?;
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic {
                path: path.to_path_buf(),
                magic,
            });
        }
        let version = c.u32(&|| "the version".into())?;
        if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            return Err(c.corrupt(
                "header".into(),
                format!(
                    "big-endian GGUF v{} files are not supported (convert it little-endian)",
                    version.swap_bytes()
                ),
            ));
        }
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion {
                path: path.to_path_buf(),
                version,
            });
        }
        let n_tensors = c.u64(&|| "the tensor count".into())?;
        let n_kv = c.u64(&|| "the metadata count".into())?;

        // Each KV needs at least 8 (key length) + 4 (type) + 1 bytes.
        if n_kv.saturating_mul(13) > c.remaining() {
            return Err(c.corrupt(
                "header".into(),
                format!("metadata count {n_kv} cannot fit in the file"),
            ));
        }
        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut key_index = HashMap::new();
        for i in 0..n_kv {
            let key = c.string(&|| format!("metadata key #{i}"))?;
            let kwhat = || format!("metadata key `{key}`");
            let tag = c.u32(&|| format!("{} (value type)", kwhat()))?;
            let ty = ValueType::from_u32(tag)
                .ok_or_else(|| c.corrupt(kwhat(), format!("unknown value type {tag}")))?;
            let v = c.value(ty, &kwhat, 0)?;
            if key_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(c.corrupt(kwhat(), "key appears twice".into()));
            }
            metadata.push((key, v));
        }

        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((k, v)) => {
                let a = v.as_int().ok_or_else(|| GgufError::Metadata {
                    path: path.to_path_buf(),
                    key: k.clone(),
                    reason: format!("expected an integer, found {:?}", v.value_type()),
                })?;
                // gguf.cpp requires a non-zero power of two.
                if a <= 0 || a > u32::MAX as i128 || (a as u64).count_ones() != 1 {
                    return Err(GgufError::Metadata {
                        path: path.to_path_buf(),
                        key: k.clone(),
                        reason: format!("alignment {a} is not a power of two"),
                    });
                }
                a as u64
            }
        };

        // Each tensor entry needs at least 8 + 4 + 4 + 8 bytes.
        if n_tensors.saturating_mul(24) > c.remaining() {
            return Err(c.corrupt(
                "header".into(),
                format!("tensor count {n_tensors} cannot fit in the file"),
            ));
        }
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = c.string(&|| format!("tensor #{i} name"))?;
            let twhat = |s: &str| format!("tensor `{name}` {s}");
            let n_dims = c.u32(&|| twhat("dimension count"))?;
            if n_dims > MAX_DIMS {
                return Err(GgufError::Tensor {
                    path: path.to_path_buf(),
                    tensor: name,
                    reason: format!("{n_dims} dimensions (ggml allows at most {MAX_DIMS})"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(c.u64(&|| twhat(&format!("dimension {d}")))?);
            }
            let ty = GgmlType::from_id(c.u32(&|| twhat("type"))?);
            let offset = c.u64(&|| twhat("data offset"))?;
            raw.push((name, dims, ty, offset));
        }
        // The data section starts at the next multiple of the alignment after the header.
        let header_end = c.pos as u64;
        let data_start = header_end.div_ceil(alignment) * alignment;
        let file_len = mmap.len() as u64;

        let mut tensors = Vec::with_capacity(raw.len());
        let mut tensor_index = HashMap::new();
        for (name, dims, ty, offset) in raw {
            let terr = |reason: String| GgufError::Tensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
                reason,
            };
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| terr(format!("element count of dims {dims:?} overflows")))?;
            if offset % alignment != 0 {
                return Err(terr(format!(
                    "data offset {offset} is not a multiple of the alignment {alignment}"
                )));
            }
            if let Some((be, _)) = ty.block_layout() {
                if dims.first().copied().unwrap_or(1) % be as u64 != 0 {
                    return Err(terr(format!(
                        "row length {} is not a multiple of the {}-element block of {}",
                        dims[0],
                        be,
                        ty.name()
                    )));
                }
                let bytes = ty
                    .bytes_for(n_elements)
                    .ok_or_else(|| terr("byte size overflows".into()))?;
                let end = data_start
                    .checked_add(offset)
                    .and_then(|s| s.checked_add(bytes));
                if end.is_none_or(|e| e > file_len) {
                    return Err(GgufError::Truncated {
                        path: path.to_path_buf(),
                        what: format!("tensor `{name}` data ({} {dims:?})", ty.name()),
                        offset: data_start.saturating_add(offset),
                        needed: bytes,
                        len: file_len,
                    });
                }
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(terr("name appears twice".into()));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                n_elements,
            });
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            key_index,
            tensors,
            tensor_index,
            alignment,
            data_start,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// The alignment of tensor data (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Byte offset of the data section in the file.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// All metadata, in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// All tensor entries, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    fn meta_err(&self, key: &str, reason: String) -> GgufError {
        GgufError::Metadata {
            path: self.path.clone(),
            key: key.to_string(),
            reason,
        }
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
        })
    }

    /// A string value; `Ok(None)` when absent, an error when present with another type.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.meta_err(
                key,
                format!("expected a string, found {:?}", v.value_type()),
            )),
        }
    }

    /// A required string value.
    pub fn str(&self, key: &str) -> Result<&str> {
        self.require(key)?;
        Ok(self.get_str(key)?.unwrap_or_default())
    }

    /// A non-negative integer value of any integer type; `Ok(None)` when absent.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_int() {
                Some(i) if (0..=u64::MAX as i128).contains(&i) => Ok(Some(i as u64)),
                Some(i) => Err(self.meta_err(key, format!("expected >= 0, found {i}"))),
                None => Err(self.meta_err(
                    key,
                    format!("expected an integer, found {:?}", v.value_type()),
                )),
            },
        }
    }

    /// A required non-negative integer.
    pub fn u64(&self, key: &str) -> Result<u64> {
        self.require(key)?;
        Ok(self.get_u64(key)?.unwrap_or_default())
    }

    /// An F32/F64 value; `Ok(None)` when absent.
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f32().map(Some).ok_or_else(|| {
                self.meta_err(key, format!("expected a float, found {:?}", v.value_type()))
            }),
        }
    }

    /// A bool value; `Ok(None)` when absent.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => {
                Err(self.meta_err(key, format!("expected a bool, found {:?}", v.value_type())))
            }
        }
    }

    fn get_array(&self, key: &str) -> Result<Option<&[Value]>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(_, items)) => Ok(Some(items)),
            Some(v) => Err(self.meta_err(
                key,
                format!("expected an array, found {:?}", v.value_type()),
            )),
        }
    }

    /// An array of strings; `Ok(None)` when absent.
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(items) = self.get_array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(self.meta_err(
                    key,
                    format!("element {i}: expected a string, found {:?}", v.value_type()),
                )),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// An array of floats; `Ok(None)` when absent.
    pub fn get_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(items) = self.get_array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_f32().ok_or_else(|| {
                    self.meta_err(
                        key,
                        format!("element {i}: expected a float, found {:?}", v.value_type()),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// An array of integers; `Ok(None)` when absent.
    pub fn get_int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(items) = self.get_array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_int()
                    .filter(|x| (i64::MIN as i128..=i64::MAX as i128).contains(x))
                    .map(|x| x as i64)
                    .ok_or_else(|| {
                        self.meta_err(
                            key,
                            format!("element {i}: expected an integer, found {v:?}"),
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// The raw bytes of a tensor's data (only for supported types, whose size is known).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.tensor(name).ok_or_else(|| GgufError::Tensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            reason: "no such tensor in the file".into(),
        })?;
        let bytes =
            t.ty.bytes_for(t.n_elements)
                .ok_or_else(|| GgufError::UnsupportedType {
                    path: self.path.clone(),
                    tensor: name.to_string(),
                    ty: t.ty.name(),
                })?;
        // In range: `open` checked data_start + offset + bytes <= file length.
        let start = (self.data_start + t.offset) as usize;
        Ok(&self.mmap[start..start + bytes as usize])
    }

    /// A tensor dequantized to f32, in ggml element order (row-major over the reversed dims).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let bytes = self.tensor_bytes(name)?;
        let t = self.tensor(name).expect("tensor_bytes found it");
        dequant::dequantize(t.ty, bytes, t.n_elements as usize).map_err(|e| GgufError::Tensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            reason: e.to_string(),
        })
    }
}
