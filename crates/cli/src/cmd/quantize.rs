use crate::units::{human_bytes, human_count, parse_size};
use anyhow::{Context, Result};
use qlora_nf4::convert::{quantize_model_dir, QuantizeOptions};
use std::path::{Path, PathBuf};

/// Quantize the decoder Linear weights of a Hugging Face model directory to NF4 (bitsandbytes
/// 4-bit format, loadable by transformers with `load_in_4bit`). Embeddings, norms, biases and
/// lm_head stay in the model dtype; tokenizer and generation files are copied.
///
/// MODEL may also be a llama-architecture GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K,
/// Q5_K, Q6_K tensors): it is dequantized exactly, converted to a Hugging Face directory
/// (weights, config.json, tokenizer.json, tokenizer_config.json with the chat template) and
/// quantized to NF4; with --dtype it is only converted.
///
/// With no arguments, quantizes the bundled tiny Llama into runs/tiny-llama-nf4 (the demo).
#[derive(clap::Args)]
pub struct Args {
    /// Input model directory (config.json + model.safetensors or sharded safetensors), or a
    /// GGUF file. Default: the tiny Llama bundled in the binary.
    pub model_dir: Option<PathBuf>,
    /// Output directory (written to a temporary sibling and renamed at the end).
    /// Default with the bundled model: runs/tiny-llama-nf4.
    pub out_dir: Option<PathBuf>,
    /// Elements per absmax block (32…4096, a power of two).
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,
    /// Store absmax as f32 instead of double-quantizing it to 8 bits.
    #[arg(long)]
    pub no_double_quant: bool,
    /// bnb_4bit_compute_dtype recorded in the config: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    pub compute_dtype: String,
    /// Modules to keep unquantized (comma-separated names such as `down_proj` or `layers.0.mlp`).
    #[arg(long, value_delimiter = ',')]
    pub skip_modules: Vec<String>,
    /// Replace OUT_DIR if it exists.
    #[arg(long)]
    pub force: bool,
    /// Largest shard before the output is split (e.g. 5GB, 500MB).
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
    /// GGUF input only: convert to a plain bf16 or f32 checkpoint without quantizing.
    #[arg(long)]
    pub dtype: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    let (model_dir, out_dir, demo) = match (&a.model_dir, &a.out_dir) {
        (Some(m), Some(o)) => (m.clone(), o.clone(), None),
        (Some(m), None) => {
            anyhow::bail!("missing OUT_DIR: qlora quantize {} <OUT_DIR>", m.display())
        }
        (None, _) => {
            let staging = tempfile::tempdir().context("creating a temporary directory")?;
            let m = staging.path().join("tiny-llama");
            crate::bundled::write_tiny_llama(&m)?;
            println!("no model given: quantizing the bundled tiny Llama (2 layers, hidden 64, vocab 320)");
            (
                m,
                a.out_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("runs/tiny-llama-nf4")),
                Some(staging),
            )
        }
    };
    let mut gguf_staging = None;
    let input_name = model_dir.display().to_string();
    let model_dir = if qlora_gguf::is_gguf(&model_dir) {
        let staging = gguf_input(&model_dir, &out_dir, &a)?;
        match staging {
            None => return Ok(()),
            Some((dir, path)) => {
                gguf_staging = Some(dir);
                path
            }
        }
    } else {
        if a.dtype.is_some() {
            anyhow::bail!(
                "--dtype applies to GGUF input only ({} is not a GGUF file)",
                model_dir.display()
            );
        }
        model_dir
    };
    let opts = QuantizeOptions {
        blocksize: a.blocksize,
        double_quant: !a.no_double_quant,
        compute_dtype: super::parse_float_dtype(&a.compute_dtype).context("--compute-dtype")?,
        skip_modules: a.skip_modules.clone(),
        // The demo may replace its own previous output.
        force: a.force || (demo.is_some() && a.out_dir.is_none()),
        max_shard_bytes: parse_size(&a.max_shard_size).context("--max-shard-size")?,
    };
    let s = quantize_model_dir(&model_dir, &out_dir, &opts)
        .with_context(|| format!("quantizing {}", model_dir.display()))?;
    let source = match demo {
        Some(_) => "the bundled tiny-llama".to_string(),
        None => input_name,
    };
    println!("quantized {source} → {}", out_dir.display());
    println!(
        "  tensors: {} ({} quantized to NF4, {} kept), shards: {}",
        s.tensors_in, s.tensors_quantized, s.tensors_kept, s.shards
    );
    println!(
        "  parameters: {} ({} quantized)",
        human_count(s.params_total),
        human_count(s.params_quantized)
    );
    println!(
        "  size: {} → {} ({:.2}× smaller); {:.3} bits per quantized parameter",
        human_bytes(s.bytes_in),
        human_bytes(s.bytes_out),
        s.bytes_in as f64 / s.bytes_out.max(1) as f64,
        s.bits_per_quantized_param()
    );
    let secs = s.seconds.max(1e-9);
    println!(
        "  time: {:.3} s, {:.1} M params/s, {:.2} GB/s of input",
        s.seconds,
        s.params_total as f64 / secs / 1e6,
        s.bytes_in as f64 / secs / 1e9
    );
    drop(gguf_staging);
    if demo.is_some() {
        let (_, err) = qlora_nf4::convert::inspect(&out_dir, Some(&model_dir))?;
        if let Some(e) = err {
            println!(
                "  quantization error: mean |Δ| {:.3e}, max |Δ| {:.3e}, relative {:.4}",
                e.mean_abs, e.max_abs, e.relative
            );
        }
        println!("next: `qlora inspect {}` lists every tensor; the directory loads in transformers with bitsandbytes.", out_dir.display());
    }
    Ok(())
}

/// GGUF input: with --dtype, convert into OUT_DIR and return None; otherwise convert to an exact
/// f32 Hugging Face directory in a temporary folder and return it for quantization.
fn gguf_input(
    gguf: &Path,
    out_dir: &Path,
    a: &Args,
) -> Result<Option<(tempfile::TempDir, PathBuf)>> {
    use qlora_gguf::{convert_to_hf, OutDtype};
    let target = match a.dtype.as_deref() {
        None => None,
        Some(s) => Some(match super::parse_float_dtype(s).context("--dtype")? {
            qlora_nf4::Dtype::BF16 => OutDtype::BF16,
            qlora_nf4::Dtype::F32 => OutDtype::F32,
            _ => anyhow::bail!("--dtype {s}: GGUF conversion writes bf16 or f32"),
        }),
    };
    let Some(dtype) = target else {
        let tmp = temp_beside(out_dir)?;
        let hf = tmp.path().join("hf");
        let s = convert_to_hf(gguf, &hf, OutDtype::F32)
            .with_context(|| format!("converting {}", gguf.display()))?;
        println!(
            "read {}: {} tensors ({}), tokenizer `{}`",
            gguf.display(),
            s.n_tensors,
            source_types(&s.source_types),
            s.tokenizer_model
        );
        return Ok(Some((tmp, hf)));
    };
    if out_dir.exists() && !a.force {
        anyhow::bail!(
            "{}: already exists (pass --force to replace it)",
            out_dir.display()
        );
    }
    let tmp = temp_beside(out_dir)?;
    let staged = tmp.path().join("out");
    let s = convert_to_hf(gguf, &staged, dtype)
        .with_context(|| format!("converting {}", gguf.display()))?;
    if out_dir.exists() {
        std::fs::remove_dir_all(out_dir)
            .with_context(|| format!("replacing {}", out_dir.display()))?;
    }
    std::fs::rename(&staged, out_dir)
        .with_context(|| format!("moving the output to {}", out_dir.display()))?;
    println!(
        "converted {} → {} ({}): {} tensors, {} parameters ({}), tokenizer `{}`",
        gguf.display(),
        out_dir.display(),
        dtype.torch_name(),
        s.n_tensors,
        human_count(s.n_params),
        source_types(&s.source_types),
        s.tokenizer_model
    );
    Ok(None)
}

/// A temporary directory beside `out_dir` (same file system, so the final rename is atomic).
fn temp_beside(out_dir: &Path) -> Result<tempfile::TempDir> {
    let parent = out_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    tempfile::Builder::new()
        .prefix(".qlora-gguf-")
        .tempdir_in(parent)
        .context("creating a temporary directory")
}

fn source_types(t: &std::collections::BTreeMap<String, usize>) -> String {
    t.iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}
