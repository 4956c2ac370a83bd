use crate::units::{human_bytes, parse_size};
use anyhow::{Context, Result};
use qlora_nf4::convert::dequantize_model_dir;
use std::path::PathBuf;

/// Write a plain checkpoint from a bitsandbytes 4-bit model directory (ours or transformers').
#[derive(clap::Args)]
pub struct Args {
    /// The 4-bit model directory.
    pub q_dir: PathBuf,
    /// Output directory.
    pub out_dir: PathBuf,
    /// Output dtype of every float tensor (bf16, f16, f32); default: each weight's original dtype.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Replace OUT_DIR if it exists.
    #[arg(long)]
    pub force: bool,
    /// Largest shard before the output is split.
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
}

pub fn run(a: Args) -> Result<()> {
    let dtype = a
        .dtype
        .as_deref()
        .map(super::parse_float_dtype)
        .transpose()
        .context("--dtype")?;
    let s = dequantize_model_dir(
        &a.q_dir,
        &a.out_dir,
        dtype,
        a.force,
        parse_size(&a.max_shard_size)?,
    )
    .with_context(|| format!("dequantizing {}", a.q_dir.display()))?;
    println!(
        "dequantized {} NF4 tensors ({} others kept): {} → {} in {:.3} s, written to {}",
        s.tensors_quantized,
        s.tensors_kept,
        human_bytes(s.bytes_in),
        human_bytes(s.bytes_out),
        s.seconds,
        a.out_dir.display()
    );
    Ok(())
}
