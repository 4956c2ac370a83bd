//! The training loop's contracts on the tiny model and the bundled demo data: resume is
//! bit-identical, gradient accumulation equals one large batch, NaN stops with the step and
//! data lines, merge reproduces PEFT's merged logits, generation with the KV cache equals
//! generation without it.

mod common;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use common::{fixture, max_abs, read_all};
use qlora_train::trainer::generate::{generate, prompt_ids, GenerateOptions};
use qlora_train::trainer::merge::{merge, MergeDtype};
use qlora_train::trainer::{Outcome, TrainConfig, Trainer, TrainerError};
use qlora_train::{forward_logits, Adapter, AdapterWeights, BaseFormat, CpuBackend, Model};

fn demo_data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/demo/train.jsonl")
}

fn base_cfg(out: PathBuf) -> TrainConfig {
    TrainConfig {
        model: Some(fixture("tiny-llama")),
        data: Some(demo_data()),
        output_dir: out,
        lora_r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.1,
        lr: 1e-2,
        lr_scheduler: "cosine".into(),
        warmup_steps: 2,
        max_grad_norm: 1.0,
        weight_decay: 0.01,
        max_steps: 10,
        grad_accum: 2,
        batch_size: 4,
        max_seq_len: 64,
        eval_count: 8,
        eval_every: 4,
        save_every: 0,
        ..TrainConfig::default()
    }
}

fn no_stop() -> AtomicBool {
    AtomicBool::new(false)
}

#[test]
fn resume_is_bit_identical() {
    resume_case(|c| c);
}

/// The same with bitsandbytes-style 8-bit optimizer state (lm_head's 20480 elements are above
/// min_8bit_size, so its moments are blockwise-quantized) and gradient checkpointing.
#[test]
fn resume_is_bit_identical_8bit_state() {
    resume_case(|c| TrainConfig {
        optim: "adamw_8bit".into(),
        modules_to_save: vec!["lm_head".into()],
        gradient_checkpointing: true,
        ..c
    });
}

fn resume_case(f: impl Fn(TrainConfig) -> TrainConfig) {
    let tmp = tempfile::tempdir().unwrap();
    let base_cfg = |p: PathBuf| f(base_cfg(p));
    let mut a = Trainer::new(base_cfg(tmp.path().join("a"))).unwrap();
    let Outcome::Finished { adapter: fa } = a.run(None, &no_stop(), &mut |_| {}).unwrap() else {
        panic!("straight run did not finish")
    };

    let mut b = Trainer::new(base_cfg(tmp.path().join("b"))).unwrap();
    assert_eq!(
        b.run(Some(5), &no_stop(), &mut |_| {}).unwrap(),
        Outcome::Paused { step: 5 }
    );
    let ckpt = b.save_checkpoint().unwrap();
    drop(b);
    let mut c = Trainer::resume(&ckpt, |_| {}).unwrap();
    assert_eq!(c.step, 5);
    let Outcome::Finished { adapter: fc } = c.run(None, &no_stop(), &mut |_| {}).unwrap() else {
        panic!("resumed run did not finish")
    };
    let la: Vec<u64> = a.history.steps.iter().map(|r| r.loss.to_bits()).collect();
    let lc: Vec<u64> = c.history.steps.iter().map(|r| r.loss.to_bits()).collect();
    assert_eq!(la.len(), 10);
    assert_eq!(la, lc, "losses differ after resume");
    let ea: Vec<u64> = a
        .history
        .evals
        .iter()
        .map(|r| r.eval_loss.to_bits())
        .collect();
    let ec: Vec<u64> = c
        .history
        .evals
        .iter()
        .map(|r| r.eval_loss.to_bits())
        .collect();
    assert_eq!(ea, ec, "eval losses differ after resume");
    let bytes = |p: &PathBuf| std::fs::read(p.join("adapter_model.safetensors")).unwrap();
    assert_eq!(bytes(&fa), bytes(&fc), "adapter bytes differ after resume");
    // The metrics file of the resumed run holds every step once.
    let m = std::fs::read_to_string(tmp.path().join("b/metrics.jsonl")).unwrap();
    let steps = m.lines().filter(|l| l.contains("\"tokens_per_s\"")).count();
    assert_eq!(steps, 10, "{m}");
    assert!(tmp.path().join("b/loss.png").is_file());
    assert!(ckpt.join("loss.png").is_file());
    // The schedule as transformers runs it: warmup from 0 over 2 steps, then cosine to 0 at
    // step 10 (the lr of 0-based step k is base · λ(k)).
    let lrs: Vec<f64> = a.history.steps.iter().map(|r| r.lr).collect();
    assert_eq!(lrs[0], 0.0);
    assert!((lrs[1] - 0.5e-2).abs() < 1e-12, "{lrs:?}");
    assert!((lrs[2] - 1e-2).abs() < 1e-12, "{lrs:?}");
    let k = 9.0;
    let want = 1e-2 * 0.5 * (1.0 + (std::f64::consts::PI * (k - 2.0) / 8.0).cos());
    assert!((lrs[9] - want).abs() < 1e-12, "{lrs:?}");
}

#[test]
fn grad_accumulation_equals_one_large_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |batch: usize, accum: usize, out: &str| {
        let cfg = TrainConfig {
            batch_size: batch,
            grad_accum: accum,
            shuffle: false,
            lora_dropout: 0.0,
            max_steps: 3,
            eval_count: 0,
            eval_every: 0,
            ..base_cfg(tmp.path().join(out))
        };
        let mut t = Trainer::new(cfg).unwrap();
        t.run(None, &no_stop(), &mut |_| {}).unwrap();
        (
            t.history.steps.iter().map(|r| r.loss).collect::<Vec<_>>(),
            t.adapter_weights().data,
        )
    };
    let (l1, p1) = run(8, 1, "one");
    let (l2, p2) = run(4, 2, "two");
    // Same tokens, same normalisation; only the f32 summation order (and right padding)
    // differs. Dividing each micro-batch by its own token count would differ by ~1e-2 here.
    for (a, b) in l1.iter().zip(&l2) {
        assert!((a - b).abs() < 1e-5, "loss {a} vs {b}");
    }
    let m = p1.iter().fold(0f32, |a, &b| a.max(b.abs()));
    let d = p1
        .iter()
        .zip(&p2)
        .fold(0f32, |a, (&x, &y)| a.max((x - y).abs()));
    assert!(d / m < 1e-4, "adapter normalised difference {}", d / m);
}

#[test]
fn non_finite_loss_stops_with_step_and_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        lr: 1e30,
        max_grad_norm: 0.0,
        lr_scheduler: "constant".into(),
        warmup_steps: 0,
        warmup_ratio: 0.0,
        save_every: 1,
        eval_count: 0,
        eval_every: 0,
        ..base_cfg(tmp.path().join("nan"))
    };
    let mut t = Trainer::new(cfg).unwrap();
    let err = t.run(None, &no_stop(), &mut |_| {}).unwrap_err();
    let TrainerError::NonFinite(nf) = &err else {
        panic!("expected NonFinite, got {err}")
    };
    let (step, lines, kept) = (&nf.step, &nf.lines, &nf.kept);
    assert!(*step >= 2, "{err}");
    assert!(!lines.is_empty());
    assert!(kept.contains(&format!("checkpoint-{}", step - 1)), "{err}");
    assert!(!tmp.path().join("nan/adapter").exists(), "no final adapter");
    assert!(tmp
        .path()
        .join(format!("nan/checkpoint-{}", step - 1))
        .is_dir());
}

#[test]
fn merged_tiny_model_matches_peft_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let rep = merge(
        &fixture("tiny-llama"),
        &fixture("tiny-llama-lora"),
        &out,
        MergeDtype::F32,
        false,
    )
    .unwrap();
    assert_eq!(rep.merged_projections, 14);
    let be = CpuBackend::<f32>::new();
    let m = Model::load(&be, &out, BaseFormat::Dense).unwrap();
    let fx = read_all("logits/lora_merged_f32.safetensors");
    let (shape, ids) = &fx["input_ids"];
    let ids: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    let logits = forward_logits(&be, &m, None, &ids, shape[0], shape[1], None).unwrap();
    let err = max_abs(&logits, &fx["logits"].1);
    assert!(err <= 1e-4, "merged logits max |Δ| {err:e}");
    assert!(out.join("tokenizer.json").is_file());
    // Existing output is refused without force.
    assert!(merge(
        &fixture("tiny-llama"),
        &fixture("tiny-llama-lora"),
        &out,
        MergeDtype::BF16,
        false
    )
    .is_err());
}

/// An NF4 base is dequantized before the merge: the merged (dense f32) model reproduces
/// transformers' NF4 base + LoRA logits (logits/nf4_lora_f32), and config.json loses its
/// quantization_config.
#[test]
fn merged_nf4_base_matches_nf4_lora_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    merge(
        &fixture("qlora-bnb4/quantized_base"),
        &fixture("tiny-llama-lora"),
        &out,
        MergeDtype::F32,
        false,
    )
    .unwrap();
    let cfg = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(!cfg.contains("quantization_config"), "{cfg}");
    let be = CpuBackend::<f32>::new();
    let m = Model::load(&be, &out, BaseFormat::Dense).unwrap();
    assert!(!m.nf4_base);
    let fx = read_all("logits/nf4_lora_f32.safetensors");
    let (shape, ids) = &fx["input_ids"];
    let ids: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    let logits = forward_logits(&be, &m, None, &ids, shape[0], shape[1], None).unwrap();
    let err = max_abs(&logits, &fx["logits"].1);
    assert!(err <= 1e-4, "merged NF4 logits max |Δ| {err:e}");
}

#[test]
fn generation_with_cache_equals_without() {
    let be = CpuBackend::<f32>::new();
    let m = Model::load(&be, &fixture("tiny-llama"), BaseFormat::Dense).unwrap();
    let w = AdapterWeights::load(&fixture("tiny-llama-lora"), &m.config).unwrap();
    let a = Adapter::new(&be, &w);
    let tok = qlora_train::data::Tokenizer::from_model_dir(fixture("tiny-llama")).unwrap();
    let ids = prompt_ids(&tok, "The adapter", false).unwrap();
    let mut out = Vec::new();
    for use_cache in [true, false] {
        let opts = GenerateOptions {
            max_new_tokens: 12,
            use_cache,
            ..Default::default()
        };
        let g = generate(&be, &m, Some(&a), &tok, &ids, &opts, &mut |_| {}).unwrap();
        assert!(!g.new_ids.is_empty());
        out.push(g.new_ids);
    }
    assert_eq!(out[0], out[1]);
    assert!(prompt_ids(&tok, "hi", true).is_err(), "no chat template");
}

/// A packed batch through the trainer's conversion gives, token for token, the loss of its
/// examples computed one at a time (attention never crosses examples, positions restart).
#[test]
fn packed_batch_equals_its_examples_alone() {
    use qlora_train::data::{Batcher, DataConfig, Dataset, Tokenizer};
    use qlora_train::trainer::to_schedule_batch;
    use qlora_train::{forward_loss, Batch};
    let be = CpuBackend::<f32>::new();
    let m = Model::load(&be, &fixture("tiny-llama"), BaseFormat::Dense).unwrap();
    let w = AdapterWeights::load(&fixture("tiny-llama-lora"), &m.config).unwrap();
    let a = Adapter::new(&be, &w);
    let tok = Tokenizer::from_model_dir(fixture("tiny-llama")).unwrap();
    let cfg = DataConfig {
        max_seq_len: 64,
        packing: true,
        batch_size: 2,
        ..DataConfig::default()
    };
    let ds = Dataset::load(demo_data(), &tok, &cfg).unwrap();
    let b = Batcher::new(&ds, &cfg).unwrap().next_batch();
    assert!(b.is_packed());
    let sb = to_schedule_batch(&b, ds.pad_id).unwrap();
    assert_eq!(sb.label_tokens(), b.n_label_tokens);
    let packed = forward_loss(&be, &m, Some(&a), &sb).unwrap();
    let (mut sum, mut n) = (0f64, 0usize);
    for (row, start, len) in b.segments() {
        let at = row * b.seq_len + start;
        let ids = b.input_ids[at..at + len].to_vec();
        let labels = b.labels[at..at + len].iter().map(|&l| l as i32).collect();
        let one = Batch::new(ids, labels, 1, len).unwrap();
        let st = forward_loss(&be, &m, Some(&a), &one).unwrap();
        sum += st.sum;
        n += st.tokens;
    }
    assert_eq!(packed.tokens, n);
    assert!(
        (packed.sum - sum).abs() <= 1e-5 * sum.abs(),
        "{} vs {sum}",
        packed.sum
    );
    // Computing the packed rows as plain causal rows would let examples see each other.
    let naive = Batch::new(b.input_ids.clone(), b.labels_i32(), b.batch_size, b.seq_len).unwrap();
    let wrong = forward_loss(&be, &m, Some(&a), &naive).unwrap();
    assert!((wrong.sum - sum).abs() > 1e-3, "test would not see a leak");
}

#[test]
fn save_total_limit_keeps_the_newest() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        max_steps: 5,
        save_every: 1,
        save_total_limit: 2,
        eval_count: 0,
        eval_every: 0,
        ..base_cfg(tmp.path().join("o"))
    };
    let mut t = Trainer::new(cfg).unwrap();
    t.run(None, &no_stop(), &mut |_| {}).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(tmp.path().join("o"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    names.sort();
    assert_eq!(names, ["checkpoint-4", "checkpoint-5"]);
}
