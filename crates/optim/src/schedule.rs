//! Learning-rate schedules, exactly transformers' `get_constant_schedule_with_warmup`,
//! `get_linear_schedule_with_warmup` and `get_cosine_schedule_with_warmup` (plus the
//! `min_lr_rate` of `get_cosine_with_min_lr_schedule_with_warmup`) as driven by torch's
//! `LambdaLR`: the optimizer step with 0-based index `k` runs at `base_lr · λ(k)`, all in f64
//! (Python floats). transformers' warmup therefore starts at lr 0 on the first step.
//! ```text
//! warmup (k < W):  λ = k / max(1, W)
//! constant:        λ = 1
//! linear:          λ = max(0, (N − k) / max(1, N − W))
//! cosine:          p = (k − W) / max(1, N − W);  f = 0.5·(1 + cos(π·cycles·2·p));
//!                  λ = max(0, f·(1 − min_lr_rate) + min_lr_rate)
//! ```

use crate::error::{OptimError, Result};
use serde::{Deserialize, Serialize};

/// A learning-rate schedule (factor of the base learning rate per optimizer step).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LrSchedule {
    /// Linear warmup over `warmup` steps, then constant (`warmup` 0: plain constant).
    Constant { warmup: u64 },
    /// Linear warmup, then linear decay to 0 at step `total`.
    Linear { warmup: u64, total: u64 },
    /// Linear warmup, then cosine decay over `total − warmup` steps (`num_cycles` 0.5: to 0
    /// once), floored at `min_lr_rate` of the base rate.
    Cosine {
        warmup: u64,
        total: u64,
        num_cycles: f64,
        min_lr_rate: f64,
    },
}

impl LrSchedule {
    /// By name as the CLI spells it: `constant`, `linear`, `cosine` (cycles 0.5, no floor).
    pub fn from_name(name: &str, warmup: u64, total: u64) -> Result<LrSchedule> {
        match name {
            "constant" => Ok(LrSchedule::Constant { warmup }),
            "linear" => Ok(LrSchedule::Linear { warmup, total }),
            "cosine" => Ok(LrSchedule::Cosine {
                warmup,
                total,
                num_cycles: 0.5,
                min_lr_rate: 0.0,
            }),
            _ => Err(OptimError::InvalidConfig {
                key: "lr_scheduler",
                value: name.to_string(),
                why: "expected one of constant, linear, cosine",
            }),
        }
    }

    /// λ(k) for the optimizer step with 0-based index `step`.
    pub fn factor(&self, step: u64) -> f64 {
        let k = step as f64;
        let warm = |w: u64| -> Option<f64> { (step < w).then(|| k / (w.max(1) as f64)) };
        match *self {
            LrSchedule::Constant { warmup } => warm(warmup).unwrap_or(1.0),
            LrSchedule::Linear { warmup, total } => warm(warmup).unwrap_or_else(|| {
                // Python ints: (N − k) may be negative past the end.
                let num = total as f64 - k;
                let den = (total as i128 - warmup as i128).max(1) as f64;
                (num / den).max(0.0)
            }),
            LrSchedule::Cosine {
                warmup,
                total,
                num_cycles,
                min_lr_rate,
            } => warm(warmup).unwrap_or_else(|| {
                let progress =
                    (k - warmup as f64) / ((total as i128 - warmup as i128).max(1) as f64);
                let f = 0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos());
                let f = f * (1.0 - min_lr_rate) + min_lr_rate;
                f.max(0.0)
            }),
        }
    }

    /// The learning rate of the optimizer step with 0-based index `step`.
    pub fn lr(&self, base_lr: f64, step: u64) -> f64 {
        base_lr * self.factor(step)
    }
}
