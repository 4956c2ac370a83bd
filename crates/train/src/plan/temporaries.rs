//! The op temporaries of `CudaBackend` (crates/train/src/cuda): buffers an op allocates and
//! drops inside itself (`CudaBackend::temporary`), always from qlora-cuda's caching pool and
//! never from the step arena, so that the arena replays exactly the planned offsets.
//!
//! The pool never returns memory to the driver: a freed block goes to the free list of its
//! size class (`qlora_cuda::device::pool_class`) and serves the next request of that class.
//! Ops run one after another on one stream and drop their temporaries before returning, so
//! after a step the pool holds, per size class, as many blocks as one op ever had live together:
//! `Σ_class class · max_op count(op, class)` ([`pool_held`]). This module lists, per op, the
//! temporaries live together, from the code that allocates them; the emulated-GPU test
//! `tests/plan_gpu.rs` checks the sum against the pool after real steps.

use qlora_cuda::device::pool_class;
use qlora_cuda::ops::linear::{Dispatch, LinearPath};

use crate::config::ModelConfig;
use crate::lora::{AdapterLayout, LoraConfig, Proj, SavedModule};

/// Bytes of each op's temporaries that are live together, one entry per distinct op shape of
/// one training step (forward, recompute and backward) of `CudaBackend` with `el`-byte
/// activations, `n = B·T` tokens, `b·h·t` attention rows.
pub fn cuda_step_temporaries(
    cfg: &ModelConfig,
    lora: &LoraConfig,
    layout: &AdapterLayout,
    nf4: bool,
    el: usize,
    (b, t): (usize, usize),
) -> Vec<Vec<usize>> {
    let n = b * t;
    let mut sets: Vec<Vec<usize>> = Vec::new();
    let dropout = lora.lora_dropout > 0.0;
    for l in 0..cfg.num_layers {
        for p in Proj::ALL {
            let (inf, outf) = p.dims(cfg);
            // cuda/linear.rs `base_bf16` / the dispatcher's scratch: W dequantized, (out, in).
            let deq = if nf4 { vec![inf * outf * el] } else { vec![] };
            let Some(s) = layout.slot(l, p) else {
                // Frozen projection: the base product on the dequantized weight, fwd and bwd.
                sets.push(deq);
                continue;
            };
            // `lora_bf16`: A (R, in) and B (out, R) rounded to bf16, live for the whole call;
            // `u` (fwd without a save slot, under checkpointing) or `vs` (bwd): (N, R).
            let mut set = vec![s.r * inf * el, outf * s.r * el, n * s.r * el];
            if dropout {
                // fwd: x_d = drop(x) (N, in) beside the dispatcher's scratch; bwd: the base
                // product on the dequantized W beside t = vs·A (N, in), then x_d again.
                set.push(n * inf * el);
                set.extend(deq);
            } else if nf4 && Dispatch::default().path(n) == LinearPath::DequantBlas {
                set.extend(deq);
            }
            sets.push(set);
        }
    }
    // attention_bwd: delta = rowsum(dO ⊙ O), (B·H·T,) f32.
    sets.push(vec![b * cfg.num_heads * t * 4]);
    // cross_entropy_fwd: the targets (N,) i32 and per-token losses (N,) f32; bwd: targets.
    sets.push(vec![n * 4, n * 4]);
    for m in &lora.modules_to_save {
        match m {
            // dense_linear_fwd/bwd: the trainable f32 weight rounded to bf16, (V, C).
            SavedModule::LmHead => sets.push(vec![cfg.vocab_size * cfg.hidden_size * el]),
            // embedding_fwd of the f32 table: ids (N,) i32, the f32 rows (N, C) and the kernel's
            // one-word out-of-range flag; bwd: ids and the flag.
            SavedModule::EmbedTokens => sets.push(vec![n * 4, n * cfg.hidden_size * 4, 4]),
        }
    }
    sets
}

/// Bytes the caching pool holds for `sets` after all of them ran (see the module docs).
pub fn pool_held(sets: &[Vec<usize>]) -> usize {
    use std::collections::BTreeMap;
    let mut max_count: BTreeMap<usize, usize> = BTreeMap::new();
    for set in sets {
        let mut count: BTreeMap<usize, usize> = BTreeMap::new();
        for &bytes in set.iter().filter(|&&b| b > 0) {
            *count.entry(pool_class(bytes)).or_insert(0) += 1;
        }
        for (class, c) in count {
            let m = max_count.entry(class).or_insert(0);
            *m = (*m).max(c);
        }
    }
    max_count.iter().map(|(class, c)| class * c).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_holds_per_class_the_most_blocks_one_op_had_live() {
        let k = pool_class(1000);
        assert_eq!(k, pool_class(900));
        // Two same-class temporaries in one op need two blocks; later ops reuse them.
        let sets = vec![vec![1000, 900], vec![1000], vec![900, 800, 700]];
        assert_eq!(pool_held(&sets), 3 * k);
        // Different classes add up; empty buffers take no block.
        let big = pool_class(3 << 20);
        assert_eq!(pool_held(&[vec![3 << 20, 0], vec![1000]]), big + k);
    }
}
