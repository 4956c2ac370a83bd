//! The run's settings: one flat table, so every key is both a TOML key and a `qlora train`
//! flag of the same name (`lora_r` ⇄ `--lora-r`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::{Result, TrainerError};
use crate::data::{DataConfig, EvalSplit, TextMode};
use crate::lora::{LoraConfig, LoraInit, SavedModule, TargetModules};
use crate::model::BaseFormat;
use qlora_optim::{AdamWConfig, AdamWVariant, LrSchedule, StateBits};

/// `max_seq_len = 0` resolves to the model's max_position_embeddings capped at this.
pub const DEFAULT_MAX_SEQ_LEN: usize = 512;

/// `target_modules = ["all-linear"]`: the seven projections of every layer.
pub const ALL_LINEAR: &str = "all-linear";

/// Everything a training run is configured by (defaults: the QLoRA paper's recipe where it
/// has one, transformers' `TrainingArguments` otherwise).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    // ---- model and data
    /// Hugging Face model directory (f32/bf16/f16 safetensors, or a bitsandbytes 4-bit one).
    pub model: Option<PathBuf>,
    /// Directory with tokenizer.json (+ tokenizer_config.json); default: the model directory.
    pub tokenizer: Option<PathBuf>,
    /// Training data: JSONL (`text`, `prompt`/`completion`, `messages`, `input_ids`) or `.txt`.
    pub data: Option<PathBuf>,
    /// Separate evaluation data (else `eval_fraction` / `eval_count` of `data`).
    pub eval_data: Option<PathBuf>,
    /// Where the adapter, checkpoints, metrics.jsonl and loss.png go.
    pub output_dir: PathBuf,
    /// How the frozen base is held: `nf4` (QLoRA: quantized on load) or `dense` (plain LoRA).
    /// A bitsandbytes 4-bit checkpoint is always NF4.
    pub base: String,
    /// `auto` (the GPU when one is usable, else the CPU with a notice), `cuda` or `cpu`.
    pub device: String,

    // ---- LoRA
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Module-name suffixes (`q_proj`, …) or `all-linear`.
    pub target_modules: Vec<String>,
    /// Modules trained in full and saved whole: `lm_head`, `embed_tokens`.
    pub modules_to_save: Vec<String>,
    pub use_rslora: bool,
    /// Start from this PEFT adapter instead of a fresh initialisation.
    pub init_adapter: Option<PathBuf>,

    // ---- optimizer
    pub lr: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// Global gradient-norm clip; 0 turns clipping off.
    pub max_grad_norm: f64,
    /// `adamw` (32-bit state) or `adamw_8bit` (bitsandbytes blockwise 8-bit state); the
    /// `paged_` forms keep the state in CUDA managed memory, paged per `paging` (on the CPU
    /// they are the plain ones).
    pub optim: String,
    /// When a paged optimizer's state goes back to host memory after a step: `always`,
    /// `never`, or `above:N[K|M|G]` (when the next forward/backward needs more than N bytes
    /// beyond what is free with the state resident).
    pub paging: String,
    /// `constant`, `linear` or `cosine` (each after a linear warmup).
    pub lr_scheduler: String,
    /// Warmup steps; when 0, `warmup_ratio · total steps`.
    pub warmup_steps: u64,
    pub warmup_ratio: f64,

    // ---- loop
    /// Optimizer steps to take; 0 = run `epochs` passes over the data.
    pub max_steps: u64,
    pub epochs: f64,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Evaluate every N steps (and at the end); 0 = only at the end.
    pub eval_every: u64,
    /// Write a checkpoint every N steps; 0 = none (the final adapter is always written).
    pub save_every: u64,
    /// Keep only the newest N checkpoints (older ones are deleted after a new one is
    /// complete); 0 = keep all.
    pub save_total_limit: usize,
    /// Seed of the adapter initialisation, data order and dropout masks.
    pub seed: u64,
    /// Recompute each layer in backward instead of saving its activations.
    pub gradient_checkpointing: bool,

    // ---- data pipeline (crate::data::DataConfig)
    /// Longest sequence in tokens; 0 = the model's max_position_embeddings, at most
    /// [`DEFAULT_MAX_SEQ_LEN`].
    pub max_seq_len: usize,
    pub batch_size: usize,
    pub train_on_inputs: bool,
    pub append_eos: bool,
    pub strict: bool,
    pub text_mode: TextMode,
    pub packing: bool,
    pub shuffle: bool,
    pub eval_fraction: f64,
    pub eval_count: usize,
    pub pad_to_max_seq_len: bool,
    pub drop_last: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        let d = DataConfig::default();
        TrainConfig {
            model: None,
            tokenizer: None,
            data: None,
            eval_data: None,
            output_dir: PathBuf::from("runs/qlora"),
            base: "nf4".into(),
            device: "auto".into(),
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            target_modules: vec![ALL_LINEAR.into()],
            modules_to_save: Vec::new(),
            use_rslora: false,
            init_adapter: None,
            lr: 2e-4,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: 0.3,
            optim: "adamw".into(),
            paging: "above:0".into(),
            lr_scheduler: "constant".into(),
            warmup_steps: 0,
            warmup_ratio: 0.03,
            max_steps: 0,
            epochs: 1.0,
            grad_accum: 1,
            eval_every: 0,
            save_every: 100,
            save_total_limit: 0,
            seed: 42,
            gradient_checkpointing: false,
            max_seq_len: 0,
            batch_size: d.batch_size,
            train_on_inputs: d.train_on_inputs,
            append_eos: d.append_eos,
            strict: d.strict,
            text_mode: d.text_mode,
            packing: d.packing,
            shuffle: d.shuffle,
            eval_fraction: 0.0,
            eval_count: 0,
            pad_to_max_seq_len: d.pad_to_max_seq_len,
            drop_last: d.drop_last,
        }
    }
}

fn finite_in(key: &str, v: f64, lo: f64, hi: f64, incl_hi: bool) -> Result<()> {
    let ok = v.is_finite() && v >= lo && (v < hi || (incl_hi && v == hi));
    if !ok {
        let close = if incl_hi { ']' } else { ')' };
        return Err(TrainerError::config(
            key,
            format!("{v} (must be in [{lo}, {hi}{close})"),
        ));
    }
    Ok(())
}

impl TrainConfig {
    /// Checks every value on its own (the model-dependent checks happen at load).
    pub fn validate(&self) -> Result<()> {
        self.device_choice()?;
        self.paging_policy()?;
        self.base_format()?;
        if self.lora_r == 0 {
            return Err(TrainerError::config("lora_r", "0 (must be at least 1)"));
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return Err(TrainerError::config(
                "lora_alpha",
                format!("{} (must be > 0)", self.lora_alpha),
            ));
        }
        finite_in("lora_dropout", self.lora_dropout, 0.0, 1.0, false)?;
        self.lora_config()?;
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(TrainerError::config(
                "lr",
                format!("{} (must be > 0)", self.lr),
            ));
        }
        finite_in("max_grad_norm", self.max_grad_norm, 0.0, f64::MAX, true)?;
        finite_in("warmup_ratio", self.warmup_ratio, 0.0, 1.0, false)?;
        self.adamw_config()?.validate()?;
        LrSchedule::from_name(&self.lr_scheduler, 0, 1)?;
        if self.grad_accum == 0 {
            return Err(TrainerError::config("grad_accum", "0 (must be at least 1)"));
        }
        if self.max_steps == 0 && !(self.epochs.is_finite() && self.epochs > 0.0) {
            return Err(TrainerError::config(
                "epochs",
                format!("{} (must be > 0 when max_steps is 0)", self.epochs),
            ));
        }
        if self.eval_count > 0 && self.eval_fraction > 0.0 {
            return Err(TrainerError::config(
                "eval_fraction",
                "set either eval_fraction or eval_count, not both",
            ));
        }
        self.data_config(None).validate(None)?;
        Ok(())
    }

    /// `base` as a [`BaseFormat`].
    pub fn base_format(&self) -> Result<BaseFormat> {
        match self.base.as_str() {
            "nf4" => Ok(BaseFormat::QLORA),
            "dense" => Ok(BaseFormat::Dense),
            other => Err(TrainerError::config(
                "base",
                format!("`{other}` (expected nf4 or dense)"),
            )),
        }
    }

    /// The LoRA configuration of a fresh adapter.
    pub fn lora_config(&self) -> Result<LoraConfig> {
        let target_modules = if self.target_modules.iter().any(|t| t == ALL_LINEAR) {
            TargetModules::AllLinear
        } else if self.target_modules.is_empty() {
            return Err(TrainerError::config("target_modules", "is empty"));
        } else {
            TargetModules::List(self.target_modules.clone())
        };
        let modules_to_save = self
            .modules_to_save
            .iter()
            .map(|m| match m.as_str() {
                "lm_head" => Ok(SavedModule::LmHead),
                "embed_tokens" => Ok(SavedModule::EmbedTokens),
                other => Err(TrainerError::config(
                    "modules_to_save",
                    format!("`{other}` (supported: lm_head, embed_tokens)"),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LoraConfig {
            r: self.lora_r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            use_rslora: self.use_rslora,
            target_modules,
            layers_to_transform: None,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            init: LoraInit::Default,
            modules_to_save,
            base_model_name_or_path: self.model.as_ref().map(|p| p.display().to_string()),
        })
    }

    /// The `device` key: `Some(true)` = cuda, `Some(false)` = cpu, `None` = auto.
    pub fn device_choice(&self) -> Result<Option<bool>> {
        match self.device.as_str() {
            "auto" => Ok(None),
            "cpu" => Ok(Some(false)),
            "cuda" | "gpu" => Ok(Some(true)),
            other => Err(TrainerError::config(
                "device",
                format!("`{other}` (expected auto, cuda or cpu)"),
            )),
        }
    }

    /// The `paging` key as the optimizer's policy.
    pub fn paging_policy(&self) -> Result<qlora_optim::PagingPolicy> {
        Ok(qlora_optim::PagingPolicy::parse(&self.paging)?)
    }

    /// The optimizer's settings.
    pub fn adamw_config(&self) -> Result<AdamWConfig> {
        let state_bits = match self.optim.as_str() {
            "adamw" | "adamw_32bit" | "paged_adamw_32bit" => StateBits::Full32,
            "adamw_8bit" | "paged_adamw_8bit" => StateBits::Blockwise8,
            other => {
                return Err(TrainerError::config(
                    "optim",
                    format!("`{other}` (expected adamw or adamw_8bit)"),
                ))
            }
        };
        Ok(AdamWConfig {
            lr: self.lr,
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            eps: self.adam_eps,
            weight_decay: self.weight_decay,
            variant: AdamWVariant::Torch,
            state_bits,
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
            ..AdamWConfig::default()
        })
    }

    /// The schedule over `total` optimizer steps.
    pub fn schedule(&self, total: u64) -> Result<LrSchedule> {
        let warmup = if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            // transformers' get_warmup_steps: ceil(total · ratio).
            (total as f64 * self.warmup_ratio).ceil() as u64
        };
        Ok(LrSchedule::from_name(&self.lr_scheduler, warmup, total)?)
    }

    /// The data pipeline's settings for a model with `max_position_embeddings` (which
    /// resolves `max_seq_len = 0`).
    pub fn data_config(&self, max_position_embeddings: Option<usize>) -> DataConfig {
        DataConfig {
            max_seq_len: match self.max_seq_len {
                0 => max_position_embeddings
                    .unwrap_or(DEFAULT_MAX_SEQ_LEN)
                    .min(DEFAULT_MAX_SEQ_LEN),
                n => n,
            },
            train_on_inputs: self.train_on_inputs,
            append_eos: self.append_eos,
            strict: self.strict,
            text_mode: self.text_mode,
            packing: self.packing,
            shuffle: self.shuffle,
            seed: self.seed,
            eval: if self.eval_data.is_some() {
                EvalSplit::None
            } else if self.eval_count > 0 {
                EvalSplit::Count(self.eval_count)
            } else if self.eval_fraction > 0.0 {
                EvalSplit::Fraction(self.eval_fraction)
            } else {
                EvalSplit::None
            },
            batch_size: self.batch_size,
            pad_to_max_seq_len: self.pad_to_max_seq_len,
            drop_last: self.drop_last,
        }
    }
}
