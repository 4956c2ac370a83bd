//! The training step `qlora memory` and `qlora bench` both describe: which model shape, one
//! micro-batch, the LoRA adapter, checkpointing and the optimizer. One set of flags, one
//! validation, so the prediction and the benchmark always mean the same configuration.

use anyhow::{bail, Context, Result};
use qlora_train::plan::{self, StateBits};
use qlora_train::{LoraConfig, ModelConfig, TargetModules};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct StepArgs {
    /// Model directory (its config.json is read; the weights are not).
    #[arg(long, conflicts_with = "shape")]
    pub model: Option<PathBuf>,
    /// A named shape: llama2-7b, llama3-8b, mistral-7b, qwen2.5-7b, llama3-70b, tiny.
    #[arg(long)]
    pub shape: Option<String>,
    /// Tokens per sequence (T).
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    /// Sequences per micro-batch (B).
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// LoRA rank (alpha = 2·rank).
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Comma-separated module names (q_proj,v_proj,…) or all-linear.
    #[arg(long, value_delimiter = ',', default_value = "all-linear")]
    pub target_modules: Vec<String>,
    /// Save only each layer's input and recompute the layer in backward (the default).
    #[arg(long, overrides_with = "no_gradient_checkpointing")]
    pub gradient_checkpointing: bool,
    /// Keep every layer's activations instead.
    #[arg(long, overrides_with = "gradient_checkpointing")]
    pub no_gradient_checkpointing: bool,
    /// adamw32 (f32 m, v) or adamw8 (bitsandbytes' blockwise 8-bit state).
    #[arg(long, default_value = "adamw32")]
    pub optimizer: String,
    /// Optimizer state in CUDA managed memory, paged to the host between updates (as
    /// bitsandbytes' paged_adamw_32bit).
    #[arg(long)]
    pub paged: bool,
}

/// A validated [`StepArgs`].
pub struct Step {
    /// The model's name for reports (the shape or the directory).
    pub name: String,
    pub config: ModelConfig,
    pub lora: LoraConfig,
    pub state_bits: StateBits,
    pub checkpointing: bool,
}

impl StepArgs {
    /// Resolve the model (`default_shape` when neither `--model` nor `--shape` is given;
    /// `None` makes one of them required) and check every value.
    pub fn resolve(&self, default_shape: Option<&str>) -> Result<Step> {
        let (name, config) = match (&self.model, self.shape.as_deref().or(default_shape)) {
            (Some(dir), _) => (
                dir.display().to_string(),
                ModelConfig::from_dir(dir).with_context(|| format!("--model {}", dir.display()))?,
            ),
            (None, Some(s)) => (s.to_string(), plan::shapes::shape(s)?),
            (None, None) => bail!("give --model DIR or --shape NAME"),
        };
        for (flag, v) in [
            ("--seq-len", self.seq_len),
            ("--batch-size", self.batch_size),
            ("--rank", self.rank),
        ] {
            if v == 0 {
                bail!("{flag} must be at least 1");
            }
        }
        let state_bits = match self.optimizer.as_str() {
            "adamw32" => StateBits::Full32,
            "adamw8" => StateBits::Blockwise8,
            o => bail!("--optimizer `{o}` (expected adamw32 or adamw8)"),
        };
        let target_modules = if self.target_modules.iter().any(|t| t == "all-linear") {
            TargetModules::AllLinear
        } else {
            TargetModules::List(self.target_modules.clone())
        };
        Ok(Step {
            name,
            config,
            lora: LoraConfig {
                r: self.rank,
                lora_alpha: 2.0 * self.rank as f64,
                target_modules,
                ..LoraConfig::default()
            },
            state_bits,
            checkpointing: !self.no_gradient_checkpointing,
        })
    }
}
