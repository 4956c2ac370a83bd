//! CPU backend vs transformers + PEFT fixtures (tests/fixtures/PROVENANCE.md):
//! logits within 1e-4 absolute, step-0 LoRA gradients within 1e-4 normalised error.

mod common;

use common::{fixture, max_abs, norm_err, read_all};
use qlora_train::*;

fn tiny() -> (CpuBackend, Model<CpuBackend>) {
    let be = CpuBackend::<f32>::new();
    let m = Model::load(&be, &fixture("tiny-llama"), BaseFormat::Dense).unwrap();
    (be, m)
}

fn ids_of(t: &(Vec<usize>, Vec<f64>)) -> (Vec<u32>, usize, usize) {
    let (b, s) = (t.0[0], t.0[1]);
    (t.1.iter().map(|&x| x as u32).collect(), b, s)
}

/// Logits of `model` (+ adapter) on the fixture's input_ids vs its `logits`; returns max |Δ|.
fn check_logits(
    be: &CpuBackend,
    model: &Model<CpuBackend>,
    adapter: Option<&Adapter<CpuBackend>>,
    file: &str,
) -> f64 {
    check_logits_tol(be, model, adapter, file, 1e-4)
}

fn check_logits_tol(
    be: &CpuBackend,
    model: &Model<CpuBackend>,
    adapter: Option<&Adapter<CpuBackend>>,
    file: &str,
    tol: f64,
) -> f64 {
    let fx = read_all(file);
    let (ids, b, t) = ids_of(&fx["input_ids"]);
    let logits = forward_logits(be, model, adapter, &ids, b, t, None).unwrap();
    let err = max_abs(&logits, &fx["logits"].1);
    assert!(err <= tol, "{file}: max |Δlogits| = {err:e} > {tol:e}");
    err
}

#[test]
fn base_f32_logits_and_hidden_states() {
    let (be, m) = tiny();
    let err = check_logits(&be, &m, None, "logits/base_f32.safetensors");
    eprintln!("base_f32: max |Δ| = {err:e}");
    // transformers 5 appends the FINAL-NORMED state as the last hidden state (PROVENANCE.md
    // says "before the final norm"; the numbers say after): check hidden.2 = norm(h_L).
    let fx = read_all("logits/base_f32.safetensors");
    let (ids, b, t) = ids_of(&fx["input_ids"]);
    let h = forward_hidden(&be, &m, None, &ids, b, t, None).unwrap();
    let c = m.config.hidden_size;
    let mut xf = vec![0f32; h.len()];
    let mut rstd = vec![0f32; b * t];
    qlora_train::cpu::rmsnorm::fwd(&mut xf, &mut rstd, &h, &m.norm, c, m.config.rms_norm_eps);
    let e = max_abs(&xf, &fx["hidden.2"].1);
    assert!(e <= 1e-4, "hidden.2: {e:e}");
}

#[test]
fn lora_f32_logits() {
    let (be, m) = tiny();
    let w = AdapterWeights::load(&fixture("tiny-llama-lora"), &m.config).unwrap();
    let a = Adapter::new(&be, &w);
    let err = check_logits(&be, &m, Some(&a), "logits/lora_f32.safetensors");
    eprintln!("lora_f32: max |Δ| = {err:e}");
}

#[test]
fn lora_merged_f32_logits() {
    let be = CpuBackend::<f32>::new();
    let cfg = ModelConfig::from_dir(&fixture("tiny-llama")).unwrap();
    let w = AdapterWeights::load(&fixture("tiny-llama-lora"), &cfg).unwrap();
    let base = Model::load(&be, &fixture("tiny-llama"), BaseFormat::Dense).unwrap();
    let dir = qlora_nf4::ModelWeights::open(&fixture("tiny-llama")).unwrap();
    let dir: &dyn WeightSource = &dir;
    let mut src = MapSource::default();
    for name in [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
    ] {
        src.tensors.insert(
            name.into(),
            (dir.shape(name).unwrap(), dir.get_f32(name).unwrap()),
        );
    }
    for l in 0..cfg.num_layers {
        for n in ["input_layernorm", "post_attention_layernorm"] {
            let name = format!("model.layers.{l}.{n}.weight");
            src.tensors.insert(
                name.clone(),
                (dir.shape(&name).unwrap(), dir.get_f32(&name).unwrap()),
            );
        }
        for p in Proj::ALL {
            let name = format!("{}.weight", p.module_path(l));
            let wt = base.merged_proj_f32(&be, l, p, Some(&w));
            src.tensors
                .insert(name.clone(), (dir.shape(&name).unwrap(), wt));
        }
    }
    let m = Model::from_source(&be, cfg, &src, BaseFormat::Dense).unwrap();
    let err = check_logits(&be, &m, None, "logits/lora_merged_f32.safetensors");
    eprintln!("lora_merged_f32: max |Δ| = {err:e}");
}

#[test]
fn base_text_f32_through_tokenizer() {
    let (be, m) = tiny();
    let tok = tokenizers::Tokenizer::from_file(fixture("tiny-llama/tokenizer.json")).unwrap();
    let enc = tok.encode("Quantize the model weight.", true).unwrap();
    let fx = read_all("logits/base_text_f32.safetensors");
    let (want, _, _) = ids_of(&fx["input_ids"]);
    assert_eq!(
        enc.get_ids(),
        want.as_slice(),
        "tokenizer ids differ from transformers'"
    );
    check_logits(&be, &m, None, "logits/base_text_f32.safetensors");
}

/// Step-0 gradients of a fixture run: `dir` has adapter_init, batch.safetensors (step0) and
/// grads_step0.safetensors. Checks every tensor and both checkpointing settings.
fn check_grads_step0(be: &CpuBackend, m: &Model<CpuBackend>, dir: &str) {
    let w = AdapterWeights::load(&fixture(&format!("{dir}/adapter_init")), &m.config).unwrap();
    let batch = read_all(&format!("{dir}/batch.safetensors"));
    let (ids, b, t) = ids_of(&batch["step0"]);
    let batch = Batch::causal_lm(ids, b, t).unwrap();
    let want = read_all(&format!("{dir}/grads_step0.safetensors"));
    let mut grads = Vec::new();
    for ckpt in [false, true] {
        let mut a = Adapter::new(be, &w);
        let opts = StepOptions {
            checkpointing: ckpt,
            ..Default::default()
        };
        let loss = forward_backward(be, m, &mut a, &batch, opts).unwrap();
        let losses: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(&format!("{dir}/losses.json"))).unwrap(),
        )
        .unwrap();
        let ref_loss = losses["steps"][0]["loss"].as_f64().unwrap();
        assert!(
            (loss.mean() - ref_loss).abs() < 1e-5,
            "{dir}: loss {} vs {ref_loss}",
            loss.mean()
        );
        let mut worst = 0f64;
        for (key, _, range) in a.layout.tensors() {
            let (_, r) = want
                .get(&key)
                .unwrap_or_else(|| panic!("{dir}: no reference gradient {key}"));
            let got = &a.grads[range];
            let e = if r.iter().all(|&x| x == 0.0) {
                // lora_A of a zero-B init: the reference is exactly zero; so must ours be.
                got.iter().fold(0f64, |m, &x| m.max(x.abs() as f64))
            } else {
                norm_err(got, r)
            };
            assert!(e <= 1e-4, "{dir}: {key}: normalised error {e:e}");
            worst = worst.max(e);
        }
        assert_eq!(want.len(), a.layout.tensors().len(), "{dir}: tensor count");
        eprintln!(
            "{dir} (checkpointing {ckpt}): loss {:.7} vs {ref_loss:.7}, worst grad error {worst:e}",
            loss.mean()
        );
        grads.push(a.grads.clone());
    }
    assert_eq!(
        grads[0], grads[1],
        "{dir}: checkpointing changed the gradients"
    );
}

#[test]
fn qlora_fp32_grads_step0() {
    let (be, m) = tiny();
    check_grads_step0(&be, &m, "qlora-fp32");
}

fn bnb_base() -> (CpuBackend, Model<CpuBackend>) {
    let be = CpuBackend::<f32>::new();
    // A bitsandbytes checkpoint is read as stored, whatever format is asked.
    let m = Model::load(
        &be,
        &fixture("qlora-bnb4/quantized_base"),
        BaseFormat::Dense,
    )
    .unwrap();
    assert!(m.nf4_base);
    (be, m)
}

#[test]
fn nf4_base_f32_logits() {
    let (be, m) = bnb_base();
    let err = check_logits(&be, &m, None, "logits/nf4_base_f32.safetensors");
    eprintln!("nf4_base_f32: max |Δ| = {err:e}");
}

#[test]
fn nf4_lora_f32_logits() {
    let (be, m) = bnb_base();
    let w = AdapterWeights::load(&fixture("tiny-llama-lora"), &m.config).unwrap();
    let a = Adapter::new(&be, &w);
    let err = check_logits(&be, &m, Some(&a), "logits/nf4_lora_f32.safetensors");
    eprintln!("nf4_lora_f32: max |Δ| = {err:e}");
}

/// Quantizing the f32 model on load gives bitsandbytes' packed codes byte for byte, and the
/// same logits as the bnb checkpoint (nested absmax codes may differ by one step, nf4.md §3).
#[test]
fn quantize_on_load_matches_bnb_checkpoint() {
    let be = CpuBackend::<f32>::new();
    let ours = Model::load(&be, &fixture("tiny-llama"), BaseFormat::QLORA).unwrap();
    let (_, bnb) = bnb_base();
    for (lo, lb) in ours.layers.iter().zip(&bnb.layers) {
        for (po, pb) in lo.proj.iter().zip(&lb.proj) {
            assert_eq!(
                po.w.nf4.as_ref().unwrap().packed,
                pb.w.nf4.as_ref().unwrap().packed
            );
        }
    }
    // Our nested absmax codes are exact-nearest, bnb's CPU table is off by one code on ~0.5%
    // of blocks: a block scale moves by up to nested_absmax/127 ≈ 0.4% of its size, which
    // measured 1.2e-4 on these logits; 1e-3 leaves room and still catches a wrong block.
    let err = check_logits_tol(&be, &ours, None, "logits/nf4_base_f32.safetensors", 1e-3);
    eprintln!("quantize-on-load vs nf4_base_f32: max |Δ| = {err:e}");
}

#[test]
fn qlora_bnb4_grads_step0() {
    let (be, m) = bnb_base();
    check_grads_step0(&be, &m, "qlora-bnb4");
}

#[test]
fn qlora_bnb4_from_lora_grads_step0() {
    let (be, m) = bnb_base();
    check_grads_step0(&be, &m, "qlora-bnb4-from-lora");
}

/// PEFT printed trainable 18496 for this adapter on the NF4 tiny model (losses.json); the
/// total is PEFT's count with packed NF4 weights counted as 2·numel (see ParamReport::new).
#[test]
fn trainable_parameter_report_matches_peft() {
    let (_, m) = bnb_base();
    let w = AdapterWeights::load(&fixture("qlora-bnb4/adapter_init"), &m.config).unwrap();
    let losses: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("qlora-bnb4/losses.json")).unwrap())
            .unwrap();
    let rep = ParamReport::new(&m.config, &w.layout, m.nf4_base);
    assert_eq!(
        rep.trainable as u64,
        losses["trainable_params"].as_u64().unwrap()
    );
    assert_eq!(rep.all, 150_400);
    assert_eq!(
        rep.peft_line(),
        "trainable params: 18,496 || all params: 150,400 || trainable%: 12.2979"
    );
}
