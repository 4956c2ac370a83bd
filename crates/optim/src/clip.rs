//! Global gradient-norm clipping, `torch.nn.utils.clip_grad_norm_(params, max_norm)` (norm
//! type 2) over every adapter tensor as one reduction:
//! ```text
//! n_i   = f32(sqrt(Σ_{e ∈ tensor i} g_e²))            per tensor, sums in f64
//! total = f32(sqrt(Σ_i n_i²))                          f64
//! coef  = min(1, f32(1 / f32(total + 1e-6)) · f32(max_norm))   (torch: max_norm / t is t.reciprocal()·max_norm)
//! g    *= coef                                         (applied inside the update, never written back)
//! ```
//! torch sums in f32 with its own reduction tree, so `total` agrees to about one f32 ulp.
//! Non-finite gradient elements are left out of the sums (they are skipped by the update too,
//! see `crate::adamw`). The summation order is fixed (each chunk sequentially in f64, chunks of
//! a tensor in arena order), so the result does not depend on the thread count.

use crate::arena::Chunk;
use rayon::prelude::*;

/// Per-chunk sums of squares of the finite gradient elements, in f64.
pub fn chunk_sumsq(chunks: &[Chunk], grads: &[f32]) -> Vec<f64> {
    chunks
        .par_iter()
        .map(|c| {
            let a = c.param_offset as usize;
            grads[a..a + c.len as usize]
                .iter()
                .filter(|g| g.is_finite())
                .map(|&g| (g as f64) * (g as f64))
                .sum::<f64>()
        })
        .collect()
}

/// Global norm from the per-chunk sums (see the module docs for the two levels).
pub fn total_norm(chunks: &[Chunk], sumsq: &[f64], n_tensors: usize) -> f32 {
    let mut per_tensor = vec![0f64; n_tensors];
    for (c, s) in chunks.iter().zip(sumsq) {
        per_tensor[c.tensor as usize] += s;
    }
    let total: f64 = per_tensor
        .iter()
        .map(|&s| {
            let n = s.sqrt() as f32 as f64;
            n * n
        })
        .sum();
    total.sqrt() as f32
}

/// The clipping coefficient torch applies (≤ 1), from the total norm.
pub fn clip_coef(total_norm: f32, max_norm: f64) -> f32 {
    let r = 1.0f32 / (total_norm + 1e-6f32);
    (r * max_norm as f32).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coef_is_one_below_the_threshold_and_scales_above() {
        assert_eq!(clip_coef(0.5, 1.0), 1.0);
        let c = clip_coef(4.0, 1.0);
        assert!((c - 0.25).abs() < 1e-7);
        // NaN-free even for a zero gradient
        assert_eq!(clip_coef(0.0, 1.0), 1.0);
    }
}
