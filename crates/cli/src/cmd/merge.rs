use anyhow::{bail, Result};
use qlora_train::trainer::merge::{merge, MergeDtype};
use qlora_train::ModelConfig;
use std::path::PathBuf;

/// Fold a LoRA adapter into its base and write a plain Hugging Face checkpoint.
///
/// Every adapted projection becomes W' = deq(W) + s·B·A (an NF4 base is dequantized, not
/// re-quantized); modules_to_save copies replace their base module; config.json loses its
/// quantization_config.
#[derive(clap::Args)]
pub struct Args {
    /// Base model directory (dense or bitsandbytes 4-bit).
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter directory.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output directory (staged and renamed into place).
    #[arg(long)]
    pub output: PathBuf,
    /// f32, bf16 or f16 [default: bf16 for a 4-bit base, else the base's dtype].
    #[arg(long)]
    pub dtype: Option<String>,
    /// Replace --output if it exists.
    #[arg(long)]
    pub force: bool,
}

fn parse(s: &str) -> Result<MergeDtype> {
    Ok(match s {
        "f32" | "fp32" | "float32" => MergeDtype::F32,
        "bf16" | "bfloat16" => MergeDtype::BF16,
        "f16" | "fp16" | "float16" => MergeDtype::F16,
        o => bail!("invalid value `{o}` for --dtype (expected f32, bf16 or f16)"),
    })
}

pub fn run(a: Args) -> Result<()> {
    let dtype = match &a.dtype {
        Some(s) => parse(s)?,
        None => {
            let c = ModelConfig::from_dir(&a.model)?;
            if c.bnb_4bit {
                MergeDtype::BF16
            } else {
                c.dtype
                    .as_deref()
                    .map(parse)
                    .transpose()?
                    .unwrap_or(MergeDtype::F32)
            }
        }
    };
    let r = merge(&a.model, &a.adapter, &a.output, dtype, a.force)?;
    println!(
        "merged {} LoRA projections{} into {} ({} tensors, {})",
        r.merged_projections,
        if r.replaced_modules.is_empty() {
            String::new()
        } else {
            format!(" and replaced {}", r.replaced_modules.join(", "))
        },
        r.output.display(),
        r.tensors,
        dtype.torch_name()
    );
    Ok(())
}
