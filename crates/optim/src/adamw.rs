//! The AdamW update itself: configuration, the per-step scalars computed on the host, and the
//! per-element math of both variants. The CPU step (`cpu`), the 8-bit block reference
//! (`blockwise8`) and `cuda/adamw.cu` all evaluate exactly these expressions in this order, with
//! one IEEE f32 rounding per operation (FMA only where PyTorch uses one).
//!
//! ## The two variants
//! **[`AdamWVariant::Torch`]** (default) is `torch.optim.AdamW` on the CPU (single-tensor path,
//! which PyTorch uses for CPU tensors), operation for operation in f32:
//! ```text
//! p  = p · f32(1 − lr·wd)                          (only if wd ≠ 0; before the moments)
//! m  = fma(f32(1−β1), g − m, m)                     (lerp_, weight < 0.5; vectorised lerp is an FMA)
//! v  = fma(f32(1−β2)·g, g, v·f32(β2))               (mul_ then addcmul_, contracted to an FMA)
//! d  = sqrt(v) / f32(sqrt(1−β2^t)) + f32(eps)
//! p  = p + (f32(−lr/(1−β1^t)) · m) / d              (addcdiv_)
//! ```
//! with the scalars computed in f64 as Python does and rounded once to f32. Measured against
//! torch 2.15 (AVX512): m and v are bit-identical; torch's vectorised `sqrt` is MKL's, which is
//! not correctly rounded on about 0.6% of inputs (1 ulp), so p agrees within a few ulp.
//!
//! **[`AdamWVariant::Bnb`]** is bitsandbytes' kernel (`specs/nf4.md` §7, `kOptimizer32bit2State`
//! / `kOptimizerStatic8bit2StateBlockwise`): bias correction folded into the step size and eps
//! scaled by `c2 = sqrt(1−β2^t)`, weight decay *after* the step:
//! ```text
//! m  = m·β1 + (1−β1)·g
//! v  = v·β2 + (1−β2)·(g·g)           (32-bit kernel)   v·β2 + ((1−β2)·g)·g   (8-bit kernel)
//! p  = p + step·(m / (sqrt(v) + eps·c2)),   step = −lr·c2/c1
//! p  = p · (1 − lr·wd)                (only if wd > 0)
//! ```
//! Differences to bitsandbytes' binary: the bias corrections come from the host in f64 (the
//! kernel uses `__powf` and `__fdividef`), divisions are IEEE, and no multiply-add is contracted
//! (nvcc may contract some). Both are a few ulp per step.
//!
//! In exact arithmetic the two steps are the same (`lr·c2/c1 · m/(sqrt(v) + eps·c2)` =
//! `lr/c1 · m/(sqrt(v)/c2 + eps)`); they differ by rounding and, through the weight-decay order,
//! by O(lr²·wd).
//!
//! ## Non-finite gradients
//! A gradient element that is NaN or ±inf leaves its parameter **and** its state unchanged
//! (issue #6); it is counted in [`crate::StepReport::nonfinite`] and excluded from the gradient
//! norm. This deliberately differs from bitsandbytes' 8-bit kernel, which zeroes m and v of such
//! an element, and from PyTorch, which lets the NaN spread into p, m and v. In 8-bit state an
//! unchanged element keeps its dequantized value, which is requantized against its block's new
//! absmax like every other element.

use crate::error::{OptimError, Result};
use serde::{Deserialize, Serialize};

/// Which AdamW arithmetic to run (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdamWVariant {
    /// `torch.optim.AdamW`, bit for bit on m and v (default: the parity target of `qlora train`).
    #[default]
    Torch,
    /// bitsandbytes' `AdamW`/`AdamW8bit`/`PagedAdamW*` kernel semantics.
    Bnb,
}

/// How the optimizer state is stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateBits {
    /// f32 m and v for every tensor.
    #[default]
    Full32,
    /// bitsandbytes' blockwise 8-bit state (blocks of [`crate::QBLOCK`], m in the signed and v in
    /// the unsigned dynamic map, one f32 absmax per block and moment) for tensors of at least
    /// [`AdamWConfig::min_8bit_size`] elements; smaller tensors keep f32 state.
    Blockwise8,
}

/// Optimizer hyper-parameters. `lr` is the base learning rate; [`crate::LrSchedule`] scales it
/// and the scaled value is passed to each `step`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub variant: AdamWVariant,
    pub state_bits: StateBits,
    /// Tensors with fewer elements keep f32 state under [`StateBits::Blockwise8`]
    /// (bitsandbytes' `min_8bit_size`, 4096).
    pub min_8bit_size: usize,
    /// Global L2 gradient-norm clipping (`torch.nn.utils.clip_grad_norm_` semantics); `None`
    /// disables clipping and the norm reduction.
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWConfig {
    /// `torch.optim.AdamW()`'s defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            variant: AdamWVariant::Torch,
            state_bits: StateBits::Full32,
            min_8bit_size: 4096,
            max_grad_norm: None,
        }
    }
}

impl AdamWConfig {
    /// Rejects values PyTorch's AdamW rejects (and non-finite ones), naming the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key, value: f64, why| {
            Err(OptimError::InvalidConfig {
                key,
                value: value.to_string(),
                why,
            })
        };
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr", self.lr, "must be finite and >= 0");
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return bad("beta1", self.beta1, "must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad("beta2", self.beta2, "must be in [0, 1)");
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad("eps", self.eps, "must be finite and >= 0");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", self.weight_decay, "must be finite and >= 0");
        }
        if self.min_8bit_size == 0 {
            return bad("min_8bit_size", 0.0, "must be >= 1");
        }
        if let Some(n) = self.max_grad_norm {
            if !(n.is_finite() && n > 0.0) {
                return bad("max_grad_norm", n, "must be finite and > 0");
            }
        }
        Ok(())
    }
}

/// The per-step f32 constants, computed once on the host and passed verbatim (as a kernel
/// argument) to `cuda/adamw.cu`'s `QlrAdamwScalars`; the layout is shared, hence `repr(C)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StepScalars {
    /// 0 = [`AdamWVariant::Torch`], 1 = [`AdamWVariant::Bnb`].
    pub variant: u32,
    /// 1 when weight decay is applied (torch: wd ≠ 0; bnb: wd > 0).
    pub apply_wd: u32,
    /// Torch: the lerp weight f32(1−β1). Bnb: f32(β1).
    pub beta1: f32,
    /// Torch: the lerp weight minus one (used when the weight ≥ 0.5). Bnb: 1 − β1 in f32.
    pub one_minus_beta1: f32,
    /// f32(β2).
    pub beta2: f32,
    /// Torch: f32(1 − β2) from f64. Bnb: 1 − β2 in f32.
    pub one_minus_beta2: f32,
    /// Torch: f32(eps). Bnb: f32(eps)·c2 in f32.
    pub eps: f32,
    /// Torch: f32(−lr/(1−β1^t)). Bnb: f32(−lr·c2/c1).
    pub step_size: f32,
    /// Torch: f32(sqrt(1 − β2^t)). Bnb: unused (1).
    pub bc2_sqrt: f32,
    /// Weight-decay factor: torch f32(1 − lr·wd) from f64; bnb 1 − lr·wd in f32.
    pub wd_factor: f32,
    /// Multiplies every gradient element first (the clipping coefficient; 1 = none).
    pub grad_scale: f32,
    /// Torch only: 1 when the lerp weight is below 0.5 (PyTorch's `is_lerp_weight_small`).
    pub lerp_small: u32,
}

impl StepScalars {
    /// Scalars for the `t`-th step (1-based) at learning rate `lr` with gradient scale
    /// `grad_scale`.
    pub fn new(cfg: &AdamWConfig, t: u64, lr: f64, grad_scale: f32) -> StepScalars {
        let tf = t as f64;
        match cfg.variant {
            AdamWVariant::Torch => {
                // torch/optim/adam.py `_single_tensor_adam`, Python floats (f64).
                let bc1 = 1.0 - cfg.beta1.powf(tf);
                let bc2 = 1.0 - cfg.beta2.powf(tf);
                let step_size = lr / bc1;
                let bc2_sqrt = bc2.powf(0.5);
                let w = (1.0 - cfg.beta1) as f32;
                StepScalars {
                    variant: 0,
                    apply_wd: (cfg.weight_decay != 0.0) as u32,
                    beta1: w,
                    one_minus_beta1: w - 1.0,
                    beta2: cfg.beta2 as f32,
                    one_minus_beta2: (1.0 - cfg.beta2) as f32,
                    eps: cfg.eps as f32,
                    step_size: (-step_size) as f32,
                    bc2_sqrt: bc2_sqrt as f32,
                    wd_factor: (1.0 - lr * cfg.weight_decay) as f32,
                    grad_scale,
                    lerp_small: (w.abs() < 0.5) as u32,
                }
            }
            AdamWVariant::Bnb => {
                // bitsandbytes passes f32 hyper-parameters to its kernel.
                let (b1, b2, eps, lr32, wd) = (
                    cfg.beta1 as f32,
                    cfg.beta2 as f32,
                    cfg.eps as f32,
                    lr as f32,
                    cfg.weight_decay as f32,
                );
                let c1 = (1.0 - (b1 as f64).powf(tf)) as f32;
                let c2 = ((1.0 - (b2 as f64).powf(tf)).sqrt()) as f32;
                let step_size = (-(lr32 as f64) * c2 as f64 / c1 as f64) as f32;
                StepScalars {
                    variant: 1,
                    apply_wd: (wd > 0.0) as u32,
                    beta1: b1,
                    one_minus_beta1: 1.0 - b1,
                    beta2: b2,
                    one_minus_beta2: 1.0 - b2,
                    eps: c2 * eps,
                    step_size,
                    bc2_sqrt: 1.0,
                    wd_factor: 1.0 - lr32 * wd,
                    grad_scale,
                    lerp_small: 0,
                }
            }
        }
    }
}

/// New (m, v) of one element from the old ones and the (already scaled) gradient `g`.
/// `bits8` selects bitsandbytes' 8-bit kernel association for v (variant Bnb only).
#[inline(always)]
pub fn moments(s: &StepScalars, m: f32, v: f32, g: f32, bits8: bool) -> (f32, f32) {
    if s.variant == 0 {
        // lerp_(g, w): weight < 0.5 → self + w·(end − self); else end − (end − self)·(1 − w),
        // both as PyTorch's vectorised fmadd.
        let d = g - m;
        let m2 = if s.lerp_small != 0 {
            s.beta1.mul_add(d, m)
        } else {
            s.one_minus_beta1.mul_add(d, g)
        };
        let v2 = (s.one_minus_beta2 * g).mul_add(g, v * s.beta2);
        (m2, v2)
    } else {
        let m2 = m * s.beta1 + s.one_minus_beta1 * g;
        let v2 = if bits8 {
            v * s.beta2 + (s.one_minus_beta2 * g) * g
        } else {
            v * s.beta2 + s.one_minus_beta2 * (g * g)
        };
        (m2, v2)
    }
}

/// New parameter value from the old one and the *new* moments.
#[inline(always)]
pub fn param(s: &StepScalars, p: f32, m: f32, v: f32) -> f32 {
    if s.variant == 0 {
        let p = if s.apply_wd != 0 { p * s.wd_factor } else { p };
        let denom = v.sqrt() / s.bc2_sqrt + s.eps;
        p + (s.step_size * m) / denom
    } else {
        let p = p + s.step_size * (m / (v.sqrt() + s.eps));
        if s.apply_wd != 0 {
            p * s.wd_factor
        } else {
            p
        }
    }
}

/// One element of the 32-bit update; returns false (and changes nothing) when `g_raw` is not
/// finite.
#[inline(always)]
pub fn update_f32(s: &StepScalars, p: &mut f32, m: &mut f32, v: &mut f32, g_raw: f32) -> bool {
    if !g_raw.is_finite() {
        return false;
    }
    let g = g_raw * s.grad_scale;
    let (m2, v2) = moments(s, *m, *v, g, false);
    *p = param(s, *p, m2, v2);
    *m = m2;
    *v = v2;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_the_key() {
        let c = AdamWConfig {
            beta2: 1.0,
            ..Default::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("beta2"), "{e}");
        let c = AdamWConfig {
            max_grad_norm: Some(0.0),
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_grad_norm"));
        assert!(AdamWConfig::default().validate().is_ok());
    }

    #[test]
    fn first_step_of_torch_variant_by_hand() {
        // t = 1, m = v = 0: m = 0.1·g, v = 0.001·g², denom = |g|·sqrt(0.001)/sqrt(0.001) + eps,
        // p -= lr/0.1 · 0.1·g/(|g| + eps) ≈ lr·sign(g).
        let cfg = AdamWConfig {
            lr: 0.01,
            weight_decay: 0.0,
            ..Default::default()
        };
        let s = StepScalars::new(&cfg, 1, cfg.lr, 1.0);
        let (mut p, mut m, mut v) = (1.0f32, 0.0f32, 0.0f32);
        assert!(update_f32(&s, &mut p, &mut m, &mut v, 0.5));
        assert!((p - 0.99).abs() < 1e-7, "{p}");
        assert_eq!(m, 0.1f32 * 0.5);
        assert!((v - 0.00025).abs() < 1e-12);
    }

    #[test]
    fn bnb_weight_decay_after_torch_before() {
        // With g = 0 and zero state the step is 0 and only the decay acts: both give p·(1−lr·wd).
        for variant in [AdamWVariant::Torch, AdamWVariant::Bnb] {
            let cfg = AdamWConfig {
                lr: 0.1,
                weight_decay: 0.5,
                variant,
                ..Default::default()
            };
            let s = StepScalars::new(&cfg, 1, cfg.lr, 1.0);
            let (mut p, mut m, mut v) = (2.0f32, 0.0, 0.0);
            update_f32(&s, &mut p, &mut m, &mut v, 0.0);
            assert_eq!(p, 2.0 * 0.95, "{variant:?}");
        }
    }

    #[test]
    fn nonfinite_gradient_changes_nothing() {
        let cfg = AdamWConfig::default();
        let s = StepScalars::new(&cfg, 3, 1e-3, 1.0);
        for g in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let (mut p, mut m, mut v) = (1.5f32, 0.25f32, 0.125f32);
            assert!(!update_f32(&s, &mut p, &mut m, &mut v, g));
            assert_eq!((p, m, v), (1.5, 0.25, 0.125));
        }
    }

    #[test]
    fn lerp_branch_for_small_beta1() {
        // β1 = 0.3 → weight 0.7 ≥ 0.5 → end − (end − self)·(1 − w).
        let cfg = AdamWConfig {
            beta1: 0.3,
            ..Default::default()
        };
        let s = StepScalars::new(&cfg, 1, 1e-3, 1.0);
        assert_eq!(s.lerp_small, 0);
        let (m, _) = moments(&s, 1.0, 0.0, 2.0, false);
        let w = 0.7f32;
        assert_eq!(m, (w - 1.0).mul_add(2.0 - 1.0, 2.0));
        assert!((m - 1.7).abs() < 1e-6);
    }
}
