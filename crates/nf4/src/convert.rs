//! Streaming checkpoint conversion: a Hugging Face model directory → the transformers
//! bitsandbytes 4-bit format (`quantize_model_dir`), back to a plain checkpoint
//! (`dequantize_model_dir`), and a per-tensor report with quantization error (`inspect`).
//!
//! Memory: inputs are memory-mapped and released tensor by tensor; outputs are spooled to disk
//! as they are produced, so resident memory stays at a small multiple of the largest tensor.
//! Atomicity: everything is written into a temporary sibling directory that is renamed onto
//! the output only after the last byte is on disk; a failure leaves no half-written output.

use crate::bnb::{
    is_nf4_side_tensor, nf4_checkpoint_tensors, quantization_config, NF4_SIDE_SUFFIXES,
};
use crate::quant::{check_blocksize, FloatData};
use crate::st::{header_bound, ModelWeights, StreamingWriter};
use crate::{from_f32, Dtype, Nf4Error, Nf4Tensor, Result};
use rayon::prelude::*;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Options of `qlora quantize`.
#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    pub blocksize: usize,
    pub double_quant: bool,
    /// `bnb_4bit_compute_dtype` written into `quantization_config`.
    pub compute_dtype: Dtype,
    /// Module names (or name fragments, transformers' `llm_int8_skip_modules` rule) kept unquantized.
    pub skip_modules: Vec<String>,
    /// Replace an existing output directory.
    pub force: bool,
    /// Start a new shard when the current one would exceed this many bytes.
    pub max_shard_bytes: u64,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions {
            blocksize: 64,
            double_quant: true,
            compute_dtype: Dtype::BF16,
            skip_modules: Vec::new(),
            force: false,
            max_shard_bytes: 5_000_000_000,
        }
    }
}

/// What a conversion did, for the summary line.
#[derive(Clone, Debug, Default)]
pub struct ConvertSummary {
    pub tensors_in: usize,
    pub tensors_quantized: usize,
    pub tensors_kept: usize,
    pub params_total: u64,
    pub params_quantized: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Bytes of the quantized weights alone (codes + constants), for bits per parameter.
    pub bytes_quantized: u64,
    pub shards: usize,
    pub seconds: f64,
}

impl ConvertSummary {
    /// Storage bits per quantized parameter (4.127 for NF4 + double quant at blocksize 64,
    /// plus the fixed per-tensor tables, which matter only for tiny tensors).
    pub fn bits_per_quantized_param(&self) -> f64 {
        if self.params_quantized == 0 {
            0.0
        } else {
            self.bytes_quantized as f64 * 8.0 / self.params_quantized as f64
        }
    }
}

/// The Llama-family config values the converter checks shapes against.
#[derive(Clone, Debug)]
pub struct ShapeConfig {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub dtype: Option<Dtype>,
}

fn cfg_err(path: &Path, key: &str, reason: impl Into<String>) -> Nf4Error {
    Nf4Error::BadConfig {
        path: path.into(),
        key: key.into(),
        reason: reason.into(),
    }
}

/// Read `config.json` of a model directory.
pub fn read_config(dir: &Path) -> Result<(PathBuf, Map<String, Value>)> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Nf4Error::io(&path, e))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(m)) => Ok((path, m)),
        Ok(_) => Err(Nf4Error::BadJson {
            path,
            reason: "not a JSON object".into(),
        }),
        Err(e) => Err(Nf4Error::BadJson {
            path,
            reason: e.to_string(),
        }),
    }
}

/// Check the keys every Llama-family config needs and that they agree with each other.
pub fn shape_config(path: &Path, cfg: &Map<String, Value>) -> Result<ShapeConfig> {
    let get = |k: &str| -> Result<usize> {
        match cfg.get(k) {
            None | Some(Value::Null) => Err(cfg_err(path, k, "missing")),
            Some(v) => v
                .as_u64()
                .filter(|&v| v > 0)
                .map(|v| v as usize)
                .ok_or_else(|| cfg_err(path, k, format!("must be a positive integer, got {v}"))),
        }
    };
    let hidden = get("hidden_size")?;
    let heads = get("num_attention_heads")?;
    let kv_heads =
        if cfg.contains_key("num_key_value_heads") && !cfg["num_key_value_heads"].is_null() {
            get("num_key_value_heads")?
        } else {
            heads
        };
    if heads % kv_heads != 0 {
        return Err(cfg_err(
            path,
            "num_key_value_heads",
            format!("{kv_heads} does not divide num_attention_heads {heads}"),
        ));
    }
    let head_dim = if cfg.get("head_dim").is_some_and(|v| !v.is_null()) {
        get("head_dim")?
    } else {
        if hidden % heads != 0 {
            return Err(cfg_err(
                path,
                "num_attention_heads",
                format!("{heads} does not divide hidden_size {hidden} and there is no head_dim"),
            ));
        }
        hidden / heads
    };
    let dtype = ["dtype", "torch_dtype"]
        .iter()
        .find_map(|k| cfg.get(*k).and_then(Value::as_str))
        .map(|s| {
            Dtype::from_torch_name(s)
                .ok_or_else(|| cfg_err(path, "dtype", format!("unknown dtype `{s}`")))
        })
        .transpose()?;
    Ok(ShapeConfig {
        hidden,
        intermediate: get("intermediate_size")?,
        layers: get("num_hidden_layers")?,
        heads,
        kv_heads,
        head_dim,
        vocab: get("vocab_size")?,
        dtype,
    })
}

/// The shape a known Llama-family tensor must have, if `name` is one.
fn expected_shape(c: &ShapeConfig, name: &str) -> Option<Vec<usize>> {
    let (q, kv) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
    let leaf = name.rsplit('.').nth(1)?;
    let suffix = name.rsplit('.').next()?;
    if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
        return Some(vec![c.vocab, c.hidden]);
    }
    if !name.starts_with("model.layers.") {
        return None;
    }
    Some(match (leaf, suffix) {
        ("q_proj", "weight") => vec![q, c.hidden],
        ("k_proj" | "v_proj", "weight") => vec![kv, c.hidden],
        ("o_proj", "weight") => vec![c.hidden, q],
        ("gate_proj" | "up_proj", "weight") => vec![c.intermediate, c.hidden],
        ("down_proj", "weight") => vec![c.hidden, c.intermediate],
        ("q_proj", "bias") => vec![q],
        ("k_proj" | "v_proj", "bias") => vec![kv],
        ("input_layernorm" | "post_attention_layernorm", "weight") => vec![c.hidden],
        _ => return None,
    })
}

/// transformers' `llm_int8_skip_modules` rule: a module is skipped when an entry equals its
/// path or is one of its dot-separated segments sequences (`lm_head`, `mlp.down_proj`, …).
fn is_skipped(module: &str, skip: &[String]) -> bool {
    skip.iter().any(|s| {
        module == s
            || module.ends_with(&format!(".{s}"))
            || module.starts_with(&format!("{s}."))
            || module.contains(&format!(".{s}."))
    })
}

/// Is this tensor a decoder Linear weight that the QLoRA recipe quantizes? Only 2-D `.weight`s
/// inside `model.layers.N.` that are not norms; embeddings, norms, biases, `lm_head` stay.
pub fn is_quantizable(name: &str, shape: &[usize]) -> bool {
    name.starts_with("model.layers.")
        && name.ends_with(".weight")
        && shape.len() == 2
        && !name.contains("norm")
}

/// Files of a model directory that are weights (rewritten) rather than copied along.
fn is_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name == "model.safetensors.index.json"
        || name.ends_with(".bin")
        || name.ends_with(".pt")
        || name.ends_with(".pth")
        || name == "pytorch_model.bin.index.json"
}

/// Output staging: a temporary sibling directory renamed onto the target at the end.
struct Staging {
    tmp: PathBuf,
    out: PathBuf,
    done: bool,
}

impl Staging {
    fn new(input: &Path, out: &Path, force: bool) -> Result<Staging> {
        if out.exists() && !force {
            return Err(Nf4Error::Output {
                path: out.into(),
                reason: "already exists (pass --force to replace it)".into(),
            });
        }
        let in_c = input.canonicalize().map_err(|e| Nf4Error::io(input, e))?;
        if out.canonicalize().is_ok_and(|o| o == in_c) {
            return Err(Nf4Error::Output {
                path: out.into(),
                reason: "is the input directory".into(),
            });
        }
        let name = out.file_name().ok_or_else(|| Nf4Error::Output {
            path: out.into(),
            reason: "has no directory name".into(),
        })?;
        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| Nf4Error::io(parent, e))?;
        let tmp = parent.join(format!(
            ".{}.partial-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(|e| Nf4Error::io(&tmp, e))?;
        Ok(Staging {
            tmp,
            out: out.into(),
            done: false,
        })
    }

    fn commit(mut self) -> Result<()> {
        if self.out.exists() {
            let old = self.tmp.with_extension("old");
            std::fs::rename(&self.out, &old).map_err(|e| Nf4Error::io(&self.out, e))?;
            std::fs::rename(&self.tmp, &self.out).map_err(|e| Nf4Error::io(&self.out, e))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&self.tmp, &self.out).map_err(|e| Nf4Error::io(&self.out, e))?;
        }
        self.done = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// A tensor to write, borrowed: (name, dtype, shape, little-endian bytes).
type TensorRef<'a> = (&'a str, Dtype, &'a [usize], &'a [u8]);

/// Writes tensors into one or more shards, `model.safetensors` or `model-0000i-of-0000n…`.
struct ShardedWriter {
    dir: PathBuf,
    max_bytes: u64,
    /// Header bytes reserved per shard: the bound for the whole model, so any shard fits.
    header_reserve: usize,
    done: Vec<(PathBuf, Vec<String>)>,
    current: Option<StreamingWriter>,
    total: u64,
}

impl ShardedWriter {
    fn new(dir: &Path, max_bytes: u64, header_reserve: usize) -> ShardedWriter {
        ShardedWriter {
            dir: dir.into(),
            max_bytes,
            header_reserve,
            done: Vec::new(),
            current: None,
            total: 0,
        }
    }

    /// Add a group of tensors that belongs in one shard (a weight and its quant-state side keys).
    fn add_group(&mut self, group: &[TensorRef]) -> Result<()> {
        let size: u64 = group.iter().map(|t| t.3.len() as u64).sum();
        if let Some(w) = &self.current {
            if w.data_bytes() as u64 + size > self.max_bytes && w.data_bytes() > 0 {
                self.close_current()?;
            }
        }
        if self.current.is_none() {
            let path = self
                .dir
                .join(format!(".shard{}.safetensors", self.done.len()));
            self.current = Some(StreamingWriter::create(&path, self.header_reserve)?);
        }
        let w = self.current.as_mut().unwrap();
        for &(n, d, s, b) in group {
            w.add(n, d, s, b)?;
        }
        self.total += size;
        Ok(())
    }

    fn close_current(&mut self) -> Result<()> {
        if let Some(w) = self.current.take() {
            let names: Vec<String> = w.names().map(str::to_string).collect();
            let path = self
                .dir
                .join(format!(".shard{}.safetensors", self.done.len()));
            w.finish(Some(pt_metadata()))?;
            self.done.push((path, names));
        }
        Ok(())
    }

    /// Name the shards and write the index when there is more than one. Returns (bytes, shards).
    fn finish(mut self) -> Result<(u64, usize)> {
        self.close_current()?;
        let n = self.done.len().max(1);
        if self.done.is_empty() {
            let w = StreamingWriter::create(&self.dir.join("model.safetensors"), 64)?;
            w.finish(Some(pt_metadata()))?;
            return Ok((0, 1));
        }
        let mut bytes = 0;
        let mut weight_map = BTreeMap::new();
        for (i, (path, names)) in self.done.iter().enumerate() {
            let final_name = if n == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
            };
            let dest = self.dir.join(&final_name);
            std::fs::rename(path, &dest).map_err(|e| Nf4Error::io(&dest, e))?;
            bytes += std::fs::metadata(&dest)
                .map_err(|e| Nf4Error::io(&dest, e))?
                .len();
            for name in names {
                weight_map.insert(name.clone(), Value::String(final_name.clone()));
            }
        }
        if n > 1 {
            let index = json!({"metadata": {"total_size": self.total}, "weight_map": weight_map});
            write_json(&self.dir.join("model.safetensors.index.json"), &index)?;
        }
        Ok((bytes, n))
    }
}

/// The header metadata transformers writes.
fn pt_metadata() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}

/// Header bytes to reserve for any shard of `weights` written by `quantize` (true) or plain.
fn output_header_bound(
    weights: &ModelWeights,
    names: &[String],
    quantized: impl Fn(&str) -> bool,
) -> Result<usize> {
    let mut entries: Vec<(String, usize)> = Vec::new();
    for name in names {
        let ndim = weights.tensor_info(name)?.shape.len();
        if quantized(name) {
            entries.push((name.clone(), 2));
            for suf in NF4_SIDE_SUFFIXES {
                entries.push((format!("{name}.{suf}"), 1));
            }
        } else {
            entries.push((name.clone(), ndim.max(1)));
        }
    }
    let meta = pt_metadata();
    Ok(header_bound(
        entries.iter().map(|(n, d)| (n.as_str(), *d)),
        Some(&meta),
    ))
}

/// Write JSON the way transformers does (2-space indent, trailing newline).
pub fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v).expect("serializable");
    s.push('\n');
    std::fs::write(path, s).map_err(|e| Nf4Error::io(path, e))
}

/// Copy tokenizer, generation and other non-weight files along.
fn copy_side_files(from: &Path, to: &Path) -> Result<()> {
    for entry in std::fs::read_dir(from).map_err(|e| Nf4Error::io(from, e))? {
        let entry = entry.map_err(|e| Nf4Error::io(from, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "config.json"
            || is_weight_file(&name)
            || name.starts_with('.')
            || !entry
                .file_type()
                .map_err(|e| Nf4Error::io(entry.path(), e))?
                .is_file()
        {
            continue;
        }
        std::fs::copy(entry.path(), to.join(&name)).map_err(|e| Nf4Error::io(entry.path(), e))?;
    }
    Ok(())
}

/// Quantize the decoder Linear weights of a model directory to NF4 and write the transformers
/// bitsandbytes 4-bit format into `out` (see the module docs for memory and atomicity).
pub fn quantize_model_dir(
    input: &Path,
    out: &Path,
    opts: &QuantizeOptions,
) -> Result<ConvertSummary> {
    let start = Instant::now();
    check_blocksize(opts.blocksize)?;
    let (cfg_path, mut cfg) = read_config(input)?;
    if cfg.contains_key("quantization_config") {
        return Err(cfg_err(
            &cfg_path,
            "quantization_config",
            "the model is already quantized (use `qlora dequantize` first)",
        ));
    }
    let shapes = shape_config(&cfg_path, &cfg)?;
    let weights = ModelWeights::open(input)?;
    // Validate everything before writing anything.
    let names = weights.names();
    // The one rule for "this tensor becomes NF4": used to validate, to plan headers, to write.
    let quantized = |name: &str| {
        let info = weights.tensor_info(name).expect("listed tensor");
        let module = name.rsplit_once('.').map_or(name, |(m, _)| m);
        is_quantizable(name, &info.shape) && !is_skipped(module, &opts.skip_modules)
    };
    for name in &names {
        let info = weights.tensor_info(name)?;
        if let Some(want) = expected_shape(&shapes, name) {
            if info.shape != want {
                return Err(Nf4Error::BadStoredTensor {
                    path: weights.file_of(name)?.path.clone(),
                    tensor: name.clone(),
                    reason: format!(
                        "shape {:?} does not match config.json (expected {want:?})",
                        info.shape
                    ),
                });
            }
        }
        if quantized(name) && !info.dtype.is_float16_or_32() {
            return Err(Nf4Error::BadStoredTensor {
                path: weights.file_of(name)?.path.clone(),
                tensor: name.clone(),
                reason: format!(
                    "unsupported dtype {} for quantization (F32, BF16, F16 only)",
                    info.dtype.safetensors_name()
                ),
            });
        }
    }
    let staging = Staging::new(input, out, opts.force)?;
    let reserve = output_header_bound(&weights, &names, quantized)?;
    let mut writer = ShardedWriter::new(&staging.tmp, opts.max_shard_bytes, reserve);
    let mut s = ConvertSummary {
        tensors_in: names.len(),
        bytes_in: weights.total_bytes() as u64,
        ..Default::default()
    };
    // Parallel over tensors as well as over blocks: consecutive tensors are quantized together
    // in batches whose input totals at most the largest tensor, so resident memory stays a small
    // multiple of it; results are written in order.
    let size_of = |name: &String| weights.tensor_info(name).map(|i| i.end - i.start);
    let largest = names
        .iter()
        .map(size_of)
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .max()
        .unwrap_or(0);
    let mut i = 0;
    while i < names.len() {
        let (mut j, mut batch_bytes) = (i, 0);
        while j < names.len() && (j == i || batch_bytes + size_of(&names[j])? <= largest) {
            batch_bytes += size_of(&names[j])?;
            j += 1;
        }
        let batch = &names[i..j];
        batch.iter().for_each(|n| weights.prefetch(n));
        let results: Vec<Option<Nf4Tensor>> = batch
            .par_iter()
            .map(|name| {
                if !quantized(name) {
                    return Ok(None);
                }
                let info = weights.tensor_info(name)?;
                let data = FloatData::Bytes(info.dtype, weights.bytes(name)?);
                let (bs, dq) = (opts.blocksize, opts.double_quant);
                Nf4Tensor::quantize_data(name, data, &info.shape, bs, dq, info.dtype).map(Some)
            })
            .collect::<Result<_>>()?;
        for (name, t) in batch.iter().zip(results) {
            let info = weights.tensor_info(name)?;
            s.params_total += info.numel() as u64;
            match t {
                Some(t) => {
                    let group = nf4_checkpoint_tensors(name, &t);
                    s.bytes_quantized += group.iter().map(|g| g.3.len() as u64).sum::<u64>();
                    let refs: Vec<TensorRef> = group
                        .iter()
                        .map(|(n, d, sh, b)| (n.as_str(), *d, sh.as_slice(), b.as_slice()))
                        .collect();
                    writer.add_group(&refs)?;
                    s.tensors_quantized += 1;
                    s.params_quantized += info.numel() as u64;
                }
                None => {
                    writer.add_group(&[(name, info.dtype, &info.shape, weights.bytes(name)?)])?;
                    s.tensors_kept += 1;
                }
            }
            weights.release(name);
        }
        i = j;
    }
    (s.bytes_out, s.shards) = writer.finish()?;
    cfg.insert(
        "quantization_config".into(),
        quantization_config(opts.compute_dtype, opts.double_quant, &opts.skip_modules),
    );
    write_json(&staging.tmp.join("config.json"), &Value::Object(cfg))?;
    copy_side_files(input, &staging.tmp)?;
    staging.commit()?;
    s.seconds = start.elapsed().as_secs_f64();
    Ok(s)
}

/// Read a bitsandbytes 4-bit model directory and write a plain checkpoint, every float tensor
/// in `dtype` (or, when None, NF4 weights in their quant-state dtype and the rest unchanged).
pub fn dequantize_model_dir(
    input: &Path,
    out: &Path,
    dtype: Option<Dtype>,
    force: bool,
    max_shard_bytes: u64,
) -> Result<ConvertSummary> {
    let start = Instant::now();
    let (cfg_path, mut cfg) = read_config(input)?;
    let weights = ModelWeights::open(input)?;
    if !weights.has_bnb4() {
        return Err(cfg_err(
            &cfg_path,
            "quantization_config",
            "the checkpoint has no bitsandbytes 4-bit weights",
        ));
    }
    let staging = Staging::new(input, out, force)?;
    let reserve = output_header_bound(&weights, &weights.names(), |_| false)?;
    let mut writer = ShardedWriter::new(&staging.tmp, max_shard_bytes, reserve);
    let names = weights.names();
    let mut s = ConvertSummary {
        tensors_in: names.len(),
        bytes_in: weights.total_bytes() as u64,
        ..Default::default()
    };
    for name in &names {
        if is_nf4_side_tensor(name) {
            continue;
        }
        let (entry_dtype, shape, bytes) = if weights.is_nf4(name) {
            let t = weights.get_nf4(name)?;
            let d = dtype.unwrap_or(t.state.dtype);
            s.tensors_quantized += 1;
            s.params_quantized += t.numel() as u64;
            (
                d,
                t.state.shape.clone(),
                t.dequantize_bytes(d).map_err(|_| Nf4Error::BadTensor {
                    tensor: name.clone(),
                    reason: format!("cannot write as {}", d.torch_name()),
                })?,
            )
        } else {
            let info = weights.tensor_info(name)?;
            s.tensors_kept += 1;
            match dtype {
                Some(d) if info.dtype.is_float16_or_32() && d != info.dtype => (
                    d,
                    info.shape.clone(),
                    from_f32(d, &weights.get_f32(name)?).expect("float dtype"),
                ),
                _ => (
                    info.dtype,
                    info.shape.clone(),
                    weights.bytes(name)?.to_vec(),
                ),
            }
        };
        s.params_total += shape.iter().product::<usize>() as u64;
        writer.add_group(&[(name, entry_dtype, &shape, &bytes)])?;
        weights.release(name);
    }
    (s.bytes_out, s.shards) = writer.finish()?;
    cfg.remove("quantization_config");
    if let Some(d) = dtype {
        let key = if cfg.contains_key("torch_dtype") && !cfg.contains_key("dtype") {
            "torch_dtype"
        } else {
            "dtype"
        };
        cfg.insert(key.into(), Value::String(d.torch_name().into()));
    }
    write_json(&staging.tmp.join("config.json"), &Value::Object(cfg))?;
    copy_side_files(input, &staging.tmp)?;
    staging.commit()?;
    s.seconds = start.elapsed().as_secs_f64();
    Ok(s)
}

/// One row of `qlora inspect`.
#[derive(Clone, Debug)]
pub struct TensorReport {
    pub name: String,
    /// Stored dtype, or `nf4` for a 4-bit weight.
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Bytes on disk including quantization side tensors.
    pub bytes: u64,
    /// e.g. `nf4 bs64 dq(offset 0.0515) float32`.
    pub quant: Option<String>,
    pub error: Option<QuantError>,
}

/// Quantization error of one tensor against its original.
#[derive(Clone, Copy, Debug, Default)]
pub struct QuantError {
    pub mean_abs: f64,
    pub max_abs: f64,
    /// ‖deq(W) − W‖₂ / ‖W‖₂ (Frobenius).
    pub relative: f64,
    pub numel: u64,
    sum_sq_err: f64,
    sum_sq_ref: f64,
}

impl QuantError {
    pub fn measure(got: &[f32], want: &[f32]) -> QuantError {
        let mut e = QuantError {
            numel: got.len() as u64,
            ..Default::default()
        };
        let mut sum_abs = 0f64;
        for (&g, &w) in got.iter().zip(want) {
            let d = (g as f64 - w as f64).abs();
            sum_abs += d;
            e.max_abs = e.max_abs.max(d);
            e.sum_sq_err += d * d;
            e.sum_sq_ref += (w as f64) * (w as f64);
        }
        e.mean_abs = if got.is_empty() {
            0.0
        } else {
            sum_abs / got.len() as f64
        };
        e.relative = if e.sum_sq_ref > 0.0 {
            (e.sum_sq_err / e.sum_sq_ref).sqrt()
        } else {
            0.0
        };
        e
    }

    /// Combine per-tensor errors into the overall (element-weighted) error.
    pub fn merge(&self, o: &QuantError) -> QuantError {
        let n = self.numel + o.numel;
        let mean_abs = if n == 0 {
            0.0
        } else {
            (self.mean_abs * self.numel as f64 + o.mean_abs * o.numel as f64) / n as f64
        };
        let (se, sr) = (
            self.sum_sq_err + o.sum_sq_err,
            self.sum_sq_ref + o.sum_sq_ref,
        );
        QuantError {
            mean_abs,
            max_abs: self.max_abs.max(o.max_abs),
            relative: if sr > 0.0 { (se / sr).sqrt() } else { 0.0 },
            numel: n,
            sum_sq_err: se,
            sum_sq_ref: sr,
        }
    }
}

/// Per-tensor report of a checkpoint directory; with `against`, the quantization error of every
/// 4-bit weight relative to the same tensor in the original directory.
pub fn inspect(
    dir: &Path,
    against: Option<&Path>,
) -> Result<(Vec<TensorReport>, Option<QuantError>)> {
    let weights = ModelWeights::open(dir)?;
    let orig = against.map(ModelWeights::open).transpose()?;
    let mut rows = Vec::new();
    let mut overall: Option<QuantError> = None;
    for name in weights.names() {
        if is_nf4_side_tensor(&name) {
            continue;
        }
        let info = weights.tensor_info(&name)?.clone();
        if weights.is_nf4(&name) {
            let t = weights.get_nf4(&name)?;
            let bytes = (info.end - info.start) as u64
                + NF4_SIDE_SUFFIXES
                    .iter()
                    .filter_map(|suf| weights.tensor_info(&format!("{name}.{suf}")).ok())
                    .map(|i| (i.end - i.start) as u64)
                    .sum::<u64>();
            let dq = match &t.state.absmax {
                crate::Absmax::Double { offset, .. } => {
                    format!(" double-quant(offset {offset:.6})")
                }
                crate::Absmax::F32(_) => String::new(),
            };
            let quant = format!(
                "nf4 blocksize {}{dq} → {}",
                t.state.blocksize,
                t.state.dtype.torch_name()
            );
            let error = match &orig {
                Some(o) => {
                    let want = o.get_f32(&name)?;
                    if want.len() != t.numel() {
                        return Err(Nf4Error::BadTensor {
                            tensor: name.clone(),
                            reason: format!(
                                "original has {} elements, quantized {}",
                                want.len(),
                                t.numel()
                            ),
                        });
                    }
                    let e = QuantError::measure(&t.dequantize_f32(), &want);
                    overall = Some(overall.map_or(e, |a| a.merge(&e)));
                    o.release(&name);
                    Some(e)
                }
                None => None,
            };
            rows.push(TensorReport {
                name,
                dtype: "nf4".into(),
                shape: t.state.shape.clone(),
                bytes,
                quant: Some(quant),
                error,
            });
        } else {
            rows.push(TensorReport {
                name,
                dtype: info.dtype.safetensors_name().into(),
                shape: info.shape.clone(),
                bytes: (info.end - info.start) as u64,
                quant: None,
                error: None,
            });
        }
        weights.release(&rows.last().unwrap().name);
    }
    Ok((rows, overall))
}
