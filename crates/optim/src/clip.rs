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
//! see `crate::adamw`).
//!
//! The f64 summation order is exactly `cuda/adamw.cu`'s `qlr_adamw_sumsq_f32`, so the CPU and
//! GPU norms (and hence the clipped steps) are bit-identical and independent of thread counts:
//! per chunk, thread `x` of 256 accumulates elements `x, x+256, …` in order; each warp of 32
//! combines its lanes by the xor butterfly of `__shfl_xor_sync` (offsets 16, 8, 4, 2, 1; lane
//! 0's value); the 8 warp sums are added in order starting from 0. The per-tensor fold uses the
//! same block sum over threads `x` holding tensors `x, x+256, …`.

use crate::arena::Chunk;
use crate::launch::THREADS;
use rayon::prelude::*;

/// The CUDA block sum: xor butterfly within each warp, then the warps in order.
fn block_sum(acc: &[f64; THREADS as usize]) -> f64 {
    let mut t = 0.0f64;
    for w in acc.chunks_exact(32) {
        let mut v = [0f64; 32];
        v.copy_from_slice(w);
        for o in [16usize, 8, 4, 2, 1] {
            let prev = v;
            for (i, x) in v.iter_mut().enumerate() {
                *x = prev[i] + prev[i ^ o];
            }
        }
        t += v[0];
    }
    t
}

/// Per-chunk sums of squares of the finite gradient elements, in f64 (GPU order).
pub fn chunk_sumsq(chunks: &[Chunk], grads: &[f32]) -> Vec<f64> {
    chunks
        .par_iter()
        .map(|c| {
            let a = c.param_offset as usize;
            let g = &grads[a..a + c.len as usize];
            // Accumulator x sees elements x, x+256, … in increasing order, exactly as GPU
            // thread x; walking rows of 256 keeps the memory access sequential.
            let mut acc = [0f64; THREADS as usize];
            for row in g.chunks(THREADS as usize) {
                for (slot, &v) in acc.iter_mut().zip(row) {
                    let v = if v.is_finite() { v as f64 } else { 0.0 };
                    *slot += v * v;
                }
            }
            block_sum(&acc)
        })
        .collect()
}

/// Global norm from the per-chunk sums (see the module docs for the two levels).
pub fn total_norm(chunks: &[Chunk], sumsq: &[f64], n_tensors: usize) -> f32 {
    let mut per_tensor = vec![0f64; n_tensors];
    for (c, s) in chunks.iter().zip(sumsq) {
        per_tensor[c.tensor as usize] += s;
    }
    let mut acc = [0f64; THREADS as usize];
    for (t, s) in per_tensor.iter().enumerate() {
        let n = s.sqrt() as f32 as f64;
        acc[t % THREADS as usize] += n * n;
    }
    block_sum(&acc).sqrt() as f32
}

/// The clipping coefficient torch applies (≤ 1), from the total norm.
pub fn clip_coef(total_norm: f32, max_norm: f64) -> f32 {
    let r = 1.0f32 / (total_norm + 1e-6f32);
    (r * max_norm as f32).min(1.0)
}

/// For each tensor, the index of its first chunk (chunks of a tensor are contiguous), plus the
/// total: `(n_tensors + 1,)` u32, uploaded for the GPU fold.
pub fn tensor_first_chunk(chunks: &[Chunk], n_tensors: usize) -> Vec<u32> {
    let mut first = vec![chunks.len() as u32; n_tensors + 1];
    for (i, c) in chunks.iter().enumerate().rev() {
        first[c.tensor as usize] = i as u32;
    }
    first
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

    #[test]
    fn block_sum_is_exact_on_integers_and_ordered() {
        let mut a = [0f64; 256];
        for (i, x) in a.iter_mut().enumerate() {
            *x = i as f64;
        }
        assert_eq!(block_sum(&a), (255 * 256 / 2) as f64);
    }

    #[test]
    fn norm_of_known_vector() {
        use crate::arena::Chunk;
        // two tensors: [3, 4] and [12] (one chunk each) → norms 5 and 12 → total 13
        let chunks = [
            Chunk {
                param_offset: 0,
                state_offset: 0,
                len: 2,
                kind: 0,
                block: 0,
                tensor: 0,
            },
            Chunk {
                param_offset: 2,
                state_offset: 2,
                len: 1,
                kind: 0,
                block: 0,
                tensor: 1,
            },
        ];
        let g = [3.0f32, 4.0, 12.0];
        let s = chunk_sumsq(&chunks, &g);
        assert_eq!(s, vec![25.0, 144.0]);
        assert_eq!(total_norm(&chunks, &s, 2), 13.0);
        assert_eq!(tensor_first_chunk(&chunks, 2), vec![0, 1, 2]);
        let g = [3.0f32, f32::NAN, 12.0];
        let s = chunk_sumsq(&chunks, &g);
        assert_eq!(total_norm(&chunks, &s, 2), 12.369317);
    }
}
