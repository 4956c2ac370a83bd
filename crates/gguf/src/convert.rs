//! `convert_to_hf`: a `llama` GGUF file → a Hugging Face model directory.
//!
//! Everything that can be refused is checked before anything is written (architecture,
//! hyper-parameters, every tensor name/shape/type, the tokenizer). The files are written into
//! a sibling temporary directory which is renamed onto `out_dir` at the end, so an interrupted
//! or failed conversion never leaves a half-written model where a later step would find it.

use std::collections::{BTreeMap, HashMap};

use std::path::{Path, PathBuf};

use half::bf16;
use serde_json::Value as Json;

use crate::error::{GgufError, Result};
use crate::hf::{GgufModel, LlamaHparams, OutDtype};
use crate::tokenizer::build_tokenizer;

/// What a conversion did.
#[derive(Clone, Debug)]
pub struct ConvertSummary {
    pub out_dir: PathBuf,
    pub dtype: OutDtype,
    pub hparams: LlamaHparams,
    /// Tensors written to `model.safetensors`.
    pub n_tensors: usize,
    /// Total elements of those tensors.
    pub n_params: u64,
    /// Source ggml type name → number of tensors stored in it.
    pub source_types: BTreeMap<String, usize>,
    /// `tokenizer.ggml.model` (`gpt2` or `llama`).
    pub tokenizer_model: String,
}

fn write_err(path: &Path) -> impl Fn(std::io::Error) -> GgufError + '_ {
    move |source| GgufError::Write {
        path: path.to_path_buf(),
        source,
    }
}

fn write_json(path: &Path, v: &Json) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v).expect("serde_json::Value always serializes");
    s.push('\n');
    std::fs::write(path, s).map_err(write_err(path))
}

/// Little-endian bytes of `x` in the output dtype (bf16: round to nearest even, one rounding).
fn encode(x: &[f32], dtype: OutDtype) -> Vec<u8> {
    match dtype {
        OutDtype::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        OutDtype::BF16 => x
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

/// Convert a `llama` GGUF file into a Hugging Face directory `out_dir` holding `config.json`,
/// `generation_config.json`, `model.safetensors` (`dtype`), `tokenizer.json` and
/// `tokenizer_config.json`. `out_dir` must not exist or be empty.
pub fn convert_to_hf(gguf: &Path, out_dir: &Path, dtype: OutDtype) -> Result<ConvertSummary> {
    let model = GgufModel::open(gguf)?;
    let tok = build_tokenizer(&model.file)?;
    let tokenizer_model = model.file.str("tokenizer.ggml.model")?.to_string();

    if out_dir.exists() {
        let empty = std::fs::read_dir(out_dir)
            .map_err(write_err(out_dir))?
            .next()
            .is_none();
        if !empty {
            return Err(GgufError::Write {
                path: out_dir.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "output directory exists and is not empty",
                ),
            });
        }
    }
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(write_err(&parent))?;
    let file_name = out_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let tmp = parent.join(format!(".{file_name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(write_err(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(write_err(&tmp))?;

    let result = (|| -> Result<ConvertSummary> {
        // One tensor in memory at a time: each is dequantized, encoded and appended behind a
        // header region reserved from the (known) names and ranks; the header is filled in at
        // the end. transformers writes {"format": "pt"}; some loaders check it.
        let st_dtype = match dtype {
            OutDtype::F32 => qlora_nf4::Dtype::F32,
            OutDtype::BF16 => qlora_nf4::Dtype::BF16,
        };
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let reserve = qlora_nf4::st::header_bound(
            model
                .tensors
                .iter()
                .map(|t| (t.hf_name.as_str(), t.shape.len())),
            Some(&meta),
        );
        let mut writer =
            qlora_nf4::StreamingWriter::create(&tmp.join("model.safetensors"), reserve)?;
        let mut source_types = BTreeMap::new();
        let mut n_params = 0u64;
        for t in &model.tensors {
            let info = model
                .file
                .tensor(&t.gguf_name)
                .expect("planned from the file");
            *source_types.entry(info.ty.name()).or_insert(0) += 1;
            let values = model.load(t)?;
            n_params += values.len() as u64;
            writer.add(&t.hf_name, st_dtype, &t.shape, &encode(&values, dtype))?;
        }
        writer.finish(Some(meta))?;
        write_json(&tmp.join("config.json"), &model.hparams.config_json(dtype))?;
        write_json(
            &tmp.join("generation_config.json"),
            &model.hparams.generation_config_json(),
        )?;
        write_json(&tmp.join("tokenizer.json"), &tok.tokenizer)?;
        write_json(&tmp.join("tokenizer_config.json"), &tok.tokenizer_config)?;
        if out_dir.exists() {
            // Checked empty above; rename cannot replace a directory on every platform.
            std::fs::remove_dir(out_dir).map_err(write_err(out_dir))?;
        }
        std::fs::rename(&tmp, out_dir).map_err(write_err(out_dir))?;
        Ok(ConvertSummary {
            out_dir: out_dir.to_path_buf(),
            dtype,
            hparams: model.hparams.clone(),
            n_tensors: model.tensors.len(),
            n_params,
            source_types,
            tokenizer_model: tokenizer_model.clone(),
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}
