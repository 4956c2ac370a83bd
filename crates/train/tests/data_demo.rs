//! The bundled demo dataset loads cleanly with the tiny model's tokenizer and has a pattern a
//! small model can learn (numbers in `assets/demo/README.md`).

mod data_util;

use std::collections::HashMap;
use std::path::Path;

use data_util::*;
use qlora_train::data::{Batcher, DataConfig, Dataset, IGNORE_INDEX};

fn demo() -> Dataset {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/train.jsonl");
    let cfg = DataConfig {
        max_seq_len: 64,
        strict: true,
        ..DataConfig::default()
    };
    Dataset::load(path, &tiny_tokenizer(), &cfg).unwrap()
}

#[test]
fn demo_dataset_loads_without_warnings() {
    let ds = demo();
    assert_eq!(ds.len(), 240);
    assert!(ds.warnings.is_empty());
    assert_eq!(ds.n_tokens(), 6480);
    assert_eq!(ds.n_label_tokens(), 3000);
    assert!(ds.examples.iter().all(|e| e.input_ids.len() <= 31));
    // Each example ends with eos, which is trained on.
    assert!(ds
        .examples
        .iter()
        .all(|e| e.input_ids.last() == Some(&2) && e.labels.last() == Some(&2)));
    let cfg = DataConfig {
        max_seq_len: 64,
        batch_size: 8,
        ..DataConfig::default()
    };
    assert_eq!(Batcher::new(&ds, &cfg).unwrap().batches_per_epoch(), 30);
}

/// Conditional entropy of each label token given the token before it, over the dataset: what
/// a perfect bigram model would score. Far below uniform (ln 320 ≈ 5.77 nats), so the loss has
/// room to fall fast.
#[test]
fn demo_dataset_is_learnable() {
    let ds = demo();
    let mut pairs: HashMap<(u32, u32), f64> = HashMap::new();
    let mut prev: HashMap<u32, f64> = HashMap::new();
    let mut n = 0.0;
    for e in &ds.examples {
        for t in 1..e.input_ids.len() {
            if e.labels[t] != IGNORE_INDEX {
                *pairs
                    .entry((e.input_ids[t - 1], e.input_ids[t]))
                    .or_default() += 1.0;
                *prev.entry(e.input_ids[t - 1]).or_default() += 1.0;
                n += 1.0;
            }
        }
    }
    let h: f64 = pairs
        .iter()
        .map(|(&(a, _), &c)| -c / n * (c / prev[&a]).ln())
        .sum();
    assert!((h - 1.6958).abs() < 1e-3, "bigram entropy {h}");
    assert!(h < 0.3 * (320f64).ln());
}
