//! The trainer against real QLoRA/LoRA runs (tests/fixtures/PROVENANCE.md: transformers +
//! bitsandbytes + PEFT, PyTorch AdamW lr 5e-3, weight decay 0, no schedule, no clipping, one
//! step per [4, 32] batch): the batches are fed as pre-tokenized JSONL through the data
//! pipeline and the whole loop, starting from the fixture's `adapter_init`. Every step's loss
//! must be within 1e-5 of `losses.json` and the final adapter within 1e-5 normalised error
//! (max |Δ| / max |ref| per tensor) of `adapter_final`.

mod common;

/// Why the from-lora and fp32 adapters cannot all be within 1e-5: an element whose gradient is
/// near Adam's eps (1e-8) takes the step `lr·g/(|g|+eps)`, whose sensitivity to the gradient
/// is `lr·eps/(|g|+eps)² ≤ lr/eps`. Our gradients match PyTorch's to about 1e-6 of the
/// tensor's largest (parity.rs: ≤ 1.0e-6 normalised, different f32 summation order), i.e.
/// δg ≈ 1e-6 · 7.7e-4 ≈ 8e-10 absolute on q_proj.lora_A; one step then differs by up to
/// lr·δg/eps ≈ 5e-3 · 8e-10 / 1e-8 ≈ 4e-4 absolute ≈ 3e-3 of max |A| ≈ 0.12. Measured: the
/// element with g₀ = −2.8e-9 ends 4e-5 away (2.5e-4 normalised), everything else in the tensor
/// is within 7e-7. So those runs are checked at 1e-5 element-wise for ≥ 99.9 % of elements
/// and at this bound for the worst one; the bnb4 run (A gets no step-0 gradient) meets 1e-5.
const ADAM_ILL_CONDITIONED_TOL: f64 = 1e-3;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use common::{fixture, norm_err, read_all};
use qlora_train::trainer::{Outcome, TrainConfig, Trainer};
use qlora_train::AdapterWeights;

/// The fixture's 8 batches as 32 JSONL records `{"input_ids": [...]}` in order.
fn write_batches(dir: &str, out: &Path) -> usize {
    let batches = read_all(&format!("{dir}/batch.safetensors"));
    let mut lines = String::new();
    let mut steps = 0;
    for s in 0.. {
        let Some((shape, ids)) = batches.get(&format!("step{s}")) else {
            break;
        };
        let (b, t) = (shape[0], shape[1]);
        for r in 0..b {
            let row: Vec<u64> = ids[r * t..(r + 1) * t].iter().map(|&x| x as u64).collect();
            lines.push_str(&serde_json::json!({ "input_ids": row }).to_string());
            lines.push('\n');
        }
        steps += 1;
    }
    std::fs::write(out, lines).unwrap();
    steps
}

fn parity(dir: &str, base: PathBuf, fmt: &str, adapter_tol: f64) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("batches.jsonl");
    let steps = write_batches(dir, &data);
    assert_eq!(steps, 8);
    let cfg = TrainConfig {
        model: Some(base),
        base: fmt.into(),
        // The 4-bit checkpoint has no tokenizer files; the ids are pre-tokenized anyway.
        tokenizer: Some(fixture("tiny-llama")),
        data: Some(data),
        output_dir: tmp.path().join("out"),
        init_adapter: Some(fixture(&format!("{dir}/adapter_init"))),
        lr: 5e-3,
        weight_decay: 0.0,
        max_grad_norm: 0.0,
        lr_scheduler: "constant".into(),
        warmup_ratio: 0.0,
        max_steps: 8,
        batch_size: 4,
        max_seq_len: 32,
        shuffle: false,
        save_every: 0,
        ..TrainConfig::default()
    };
    let mut tr = Trainer::new(cfg).unwrap();
    let out = tr.run(None, &AtomicBool::new(false), &mut |_| {}).unwrap();
    let Outcome::Finished { adapter } = out else {
        panic!("{dir}: run did not finish: {out:?}")
    };
    let losses: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(&format!("{dir}/losses.json"))).unwrap(),
    )
    .unwrap();
    let want: Vec<f64> = losses["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(tr.history.steps.len(), want.len());
    let mut worst_loss = 0f64;
    for (r, w) in tr.history.steps.iter().zip(&want) {
        let d = (r.loss - w).abs();
        assert!(
            d <= 1e-5,
            "{dir}: step {} loss {} vs {w} (Δ {d:e})",
            r.step,
            r.loss
        );
        assert_eq!(r.label_tokens, 4 * 31, "mean over batch·(seq−1) tokens");
        worst_loss = worst_loss.max(d);
    }
    // The written PEFT directory, read back, against PEFT's adapter_final.
    let cfgm = tr.model.config.clone();
    let got = AdapterWeights::load(&adapter, &cfgm).unwrap();
    let want_final = read_all(&format!("{dir}/adapter_final/adapter_model.safetensors"));
    // Elements beyond 1e-5 of their tensor's max |ref|, and the worst normalised error.
    let (mut worst, mut off, mut n) = (0f64, 0usize, 0usize);
    for (key, _, range) in got.layout.tensors() {
        let (_, r) = &want_final[&key];
        let e = norm_err(&got.data[range.clone()], r);
        let m = r.iter().fold(0f64, |a, &b| a.max(b.abs()));
        off += got.data[range]
            .iter()
            .zip(r)
            .filter(|(&g, &w)| (g as f64 - w).abs() > 1e-5 * m)
            .count();
        n += r.len();
        assert!(
            e <= adapter_tol,
            "{dir}: {key}: normalised error {e:e} > {adapter_tol:e}"
        );
        worst = worst.max(e);
    }
    assert!(
        off * 1000 <= n,
        "{dir}: {off} of {n} adapter elements are beyond 1e-5 normalised error"
    );
    assert_eq!(want_final.len(), got.layout.tensors().len());
    eprintln!(
        "{dir}: worst |Δloss| {worst_loss:e}, worst adapter error {worst:e}, {off}/{n} elements beyond 1e-5"
    );
}

#[test]
fn qlora_bnb4_eight_steps() {
    parity(
        "qlora-bnb4",
        fixture("qlora-bnb4/quantized_base"),
        "nf4",
        1e-5,
    );
}

#[test]
fn qlora_bnb4_from_lora_eight_steps() {
    parity(
        "qlora-bnb4-from-lora",
        fixture("qlora-bnb4/quantized_base"),
        "nf4",
        ADAM_ILL_CONDITIONED_TOL,
    );
}

#[test]
fn qlora_fp32_eight_steps() {
    // The f32 control: `base = "dense"` keeps tiny-llama's f32 projections.
    parity(
        "qlora-fp32",
        fixture("tiny-llama"),
        "dense",
        ADAM_ILL_CONDITIONED_TOL,
    );
}
