use crate::units::{human_bytes, human_count, parse_size};
use anyhow::{Context, Result};
use qlora_nf4::convert::{quantize_model_dir, QuantizeOptions};
use std::path::PathBuf;

/// Quantize the decoder Linear weights of a Hugging Face model directory to NF4 (bitsandbytes
/// 4-bit format, loadable by transformers with `load_in_4bit`). Embeddings, norms, biases and
/// lm_head stay in the model dtype; tokenizer and generation files are copied.
///
/// With no arguments, quantizes the bundled tiny Llama into runs/tiny-llama-nf4 (the demo).
#[derive(clap::Args)]
pub struct Args {
    /// Input model directory (config.json + model.safetensors or sharded safetensors).
    /// Default: the tiny Llama bundled in the binary.
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
        None => model_dir.display().to_string(),
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
        s.params_quantized as f64 / secs / 1e6,
        s.bytes_in as f64 / secs / 1e9
    );
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
