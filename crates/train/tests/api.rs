//! Config parsing, LoRA targeting and PEFT I/O, KV-cache forward, evaluation.

mod common;

use std::path::Path;

use common::{fixture, read_all};
use qlora_train::*;

fn cfg(json: &str) -> Result<ModelConfig> {
    ModelConfig::from_json_str(json, Path::new("config.json"))
}

const LLAMA31_T4: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
 "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
 "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
 "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
 "torch_dtype": "bfloat16", "tie_word_embeddings": false, "hidden_act": "silu",
 "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}"#;

#[test]
fn config_transformers5_fixture() {
    let c = ModelConfig::from_dir(&fixture("tiny-llama")).unwrap();
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_layers),
        (64, 172, 2)
    );
    assert_eq!(
        (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size),
        (4, 2, 16, 320)
    );
    assert_eq!(c.rope_theta, 10000.0);
    assert_eq!(c.rope_scaling, RopeScaling::Default);
    assert_eq!(c.dtype.as_deref(), Some("float32"));
    assert!(!c.bnb_4bit && !c.tie_word_embeddings && !c.qkv_bias);
    assert!(
        ModelConfig::from_dir(&fixture("qlora-bnb4/quantized_base"))
            .unwrap()
            .bnb_4bit
    );
}

#[test]
fn config_transformers4_llama31_rope() {
    let c = cfg(LLAMA31_T4).unwrap();
    assert_eq!(c.rope_theta, 500000.0);
    assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
    assert_eq!(c.head_dim, 128);
    assert_eq!(c.eos_token_id, Some(128001));
    let f = c.rope_inv_freq();
    // High frequencies (wavelength < 8192/4) are kept, low ones (> 8192) divided by 8,
    // those between interpolated: compare with the unscaled table.
    let mut plain = c.clone();
    plain.rope_scaling = RopeScaling::Default;
    let p = plain.rope_inv_freq();
    let mut kinds = [0; 3];
    for (a, b) in f.iter().zip(&p) {
        let wl = 2.0 * std::f64::consts::PI / b;
        if wl < 2048.0 {
            assert_eq!(a, b);
            kinds[0] += 1;
        } else if wl > 8192.0 {
            assert!((a - b / 8.0).abs() <= 1e-15 * b);
            kinds[1] += 1;
        } else {
            assert!(*a < *b && *a > b / 8.0);
            kinds[2] += 1;
        }
    }
    assert!(kinds.iter().all(|&k| k > 0), "{kinds:?}");
    // transformers 5 spelling of the same
    let t5 = LLAMA31_T4
        .replace("\"rope_theta\": 500000.0,", "")
        .replace(
            "\"rope_scaling\": {",
            "\"rope_parameters\": {\"rope_theta\": 500000.0, ",
        )
        .replace("torch_dtype", "dtype");
    assert_eq!(cfg(&t5).unwrap(), c);
}

#[test]
fn config_qwen2_mistral_tied() {
    let qwen = r#"{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
      "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
      "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 1000000.0,
      "sliding_window": 131072, "use_sliding_window": false, "tie_word_embeddings": true,
      "torch_dtype": "bfloat16", "hidden_act": "silu", "rms_norm_eps": 1e-06}"#;
    let c = cfg(qwen).unwrap();
    assert!(c.qkv_bias && !c.o_bias && c.tie_word_embeddings);
    assert_eq!((c.head_dim, c.arch), (64, Arch::Qwen2));
    let e = cfg(&qwen.replace(
        "\"use_sliding_window\": false",
        "\"use_sliding_window\": true",
    ))
    .unwrap_err();
    assert!(e.to_string().contains("sliding_window"), "{e}");

    let mistral = r#"{"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
      "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
      "num_key_value_heads": 8, "vocab_size": 32768, "rope_theta": 1000000.0, "sliding_window": null}"#;
    assert_eq!(cfg(mistral).unwrap().arch, Arch::Mistral);
    let e =
        cfg(&mistral.replace("\"sliding_window\": null", "\"sliding_window\": 4096")).unwrap_err();
    assert!(e.to_string().contains("sliding_window 4096"), "{e}");
}

#[test]
fn config_refusals_name_the_feature() {
    let e = cfg(r#"{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}"#).unwrap_err();
    assert!(e.to_string().contains("GPT2LMHeadModel"), "{e}");
    let yarn = LLAMA31_T4.replace("\"llama3\"", "\"yarn\"");
    assert!(cfg(&yarn)
        .unwrap_err()
        .to_string()
        .contains("rope_type \"yarn\""));
    let gelu = LLAMA31_T4.replace("\"silu\"", "\"gelu\"");
    assert!(cfg(&gelu).unwrap_err().to_string().contains("gelu"));
    let missing = LLAMA31_T4.replace("\"hidden_size\": 4096,", "");
    assert!(cfg(&missing)
        .unwrap_err()
        .to_string()
        .contains("hidden_size"));
}

#[test]
fn tied_embeddings_model_loads_without_lm_head() {
    let be = CpuBackend::<f32>::new();
    let mut c = ModelConfig::synthetic_llama(16, 24, 1, 4, 2, 30);
    c.tie_word_embeddings = true;
    let mut src = qlora_train::model::random_source(&c, 1).unwrap();
    src.tensors.remove("lm_head.weight");
    let m = Model::from_source(&be, c, &src, BaseFormat::Dense).unwrap();
    assert_eq!(
        m.lm_head.w.w,
        src.get_f32("model.embed_tokens.weight").unwrap()
    );
}

fn lora(json: &str) -> Result<LoraConfig> {
    LoraConfig::from_json_str(json, Path::new("adapter_config.json"))
}

fn tiny_cfg() -> ModelConfig {
    ModelConfig::from_dir(&fixture("tiny-llama")).unwrap()
}

#[test]
fn lora_targeting_and_patterns() {
    let c = tiny_cfg();
    let fx = AdapterWeights::load(&fixture("tiny-llama-lora"), &c).unwrap();
    assert_eq!(fx.layout.slots.len(), 14);
    assert_eq!(fx.layout.numel, 18496);
    assert_eq!(fx.config.lora_alpha, 16.0);

    let l = lora(r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]}"#).unwrap();
    let lay = AdapterLayout::new(&l, &c).unwrap();
    let got: Vec<_> = lay.slots.iter().map(|s| (s.layer, s.proj)).collect();
    assert_eq!(got, vec![(1, Proj::Q), (1, Proj::V)]);

    let l = lora(r#"{"r": 4, "lora_alpha": 8, "target_modules": ".*\\.(q|down)_proj"}"#).unwrap();
    let lay = AdapterLayout::new(&l, &c).unwrap();
    assert_eq!(lay.slots.len(), 4);
    // a bare regex must match the whole path: "q_proj" matches nothing
    let l = lora(r#"{"r": 4, "lora_alpha": 8, "target_modules": "q_proj"}"#).unwrap();
    assert!(AdapterLayout::new(&l, &c)
        .unwrap_err()
        .to_string()
        .contains("matches no module"));

    let l = lora(
        r#"{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "use_rslora": true,
            "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"model.layers.1.self_attn.q_proj": 32}}"#,
    )
    .unwrap();
    let lay = AdapterLayout::new(&l, &c).unwrap();
    assert_eq!(lay.slots.len(), 14);
    let d = lay.slot(0, Proj::Down).unwrap();
    assert_eq!((d.r, d.scale), (2, 8.0 / 2f64.sqrt()));
    assert_eq!(lay.slot(1, Proj::Q).unwrap().scale, 32.0 / 2.0);
    assert_eq!(lay.slot(0, Proj::Q).unwrap().scale, 8.0 / 2.0);
    assert_eq!(
        lay.slot(1, Proj::Q).unwrap().peft_key(false),
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    );
}

#[test]
fn lora_config_refusals() {
    for (json, what) in [
        (r#"{"lora_alpha": 8, "target_modules": ["q_proj"]}"#, "`r`"),
        (r#"{"r": 8, "target_modules": ["q_proj"]}"#, "`lora_alpha`"),
        (r#"{"r": 8, "lora_alpha": 8}"#, "`target_modules`"),
        (
            r#"{"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": true}"#,
            "use_dora",
        ),
        (
            r#"{"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "lora_bias": true}"#,
            "lora_bias",
        ),
        (
            r#"{"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "init_lora_weights": "pissa"}"#,
            "pissa",
        ),
        (
            r#"{"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "all"}"#,
            "bias",
        ),
        (
            r#"{"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "peft_type": "IA3"}"#,
            "IA3",
        ),
        (
            r#"{"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "modules_to_save": ["score"]}"#,
            "score",
        ),
    ] {
        let e = lora(json).unwrap_err().to_string();
        assert!(e.contains(what), "{json}: {e}");
    }
}

#[test]
fn adapter_save_load_round_trip_and_inits() {
    let c = tiny_cfg();
    let dir = tempfile::tempdir().unwrap();
    for init in [LoraInit::Default, LoraInit::Gaussian, LoraInit::Random] {
        let l = LoraConfig {
            r: 4,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            target_modules: TargetModules::AllLinear,
            init,
            modules_to_save: vec![SavedModule::LmHead],
            ..Default::default()
        };
        let w = AdapterWeights::init(&l, &c, 7, |_| Ok(vec![0.5; 320 * 64])).unwrap();
        for s in &w.layout.slots {
            let a = &w.data[s.a_range()];
            let b = &w.data[s.b_range()];
            let bound = 1.0 / (s.in_features as f32).sqrt();
            match init {
                LoraInit::Default => {
                    assert!(a.iter().all(|x| x.abs() <= bound) && b.iter().all(|&x| x == 0.0));
                }
                LoraInit::Gaussian => {
                    let std = (a.iter().map(|x| x * x).sum::<f32>() / a.len() as f32).sqrt();
                    assert!((std - 0.25).abs() < 0.05, "gaussian std {std}");
                    assert!(b.iter().all(|&x| x == 0.0));
                }
                LoraInit::Random => {
                    assert!(b.iter().all(|x| x.abs() <= 0.5) && b.iter().any(|&x| x != 0.0));
                }
            }
        }
        w.save(dir.path()).unwrap();
        let back = AdapterWeights::load(dir.path(), &c).unwrap();
        assert_eq!(back.data, w.data);
        // all-linear is written as the seven names (older PEFT has no "all-linear")
        let mut want = w.config.clone();
        want.target_modules =
            TargetModules::List(Proj::ALL.iter().map(|p| p.name().to_string()).collect());
        assert_eq!(back.config, want);
        assert_eq!(back.layout, w.layout);
    }
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    for key in [
        "alpha_pattern",
        "base_model_name_or_path",
        "bias",
        "fan_in_fan_out",
        "inference_mode",
        "init_lora_weights",
        "layers_pattern",
        "layers_to_transform",
        "lora_alpha",
        "lora_dropout",
        "modules_to_save",
        "peft_type",
        "r",
        "rank_pattern",
        "revision",
        "target_modules",
        "task_type",
        "use_rslora",
    ] {
        assert!(cfg.get(key).is_some(), "adapter_config.json lacks {key}");
    }
    assert_eq!(cfg.as_object().unwrap().len(), 18);
    let st = read_all_abs(&dir.path().join("adapter_model.safetensors"));
    assert!(st.contains_key("base_model.model.lm_head.weight"));
}

fn read_all_abs(p: &Path) -> std::collections::HashMap<String, (Vec<usize>, Vec<f64>)> {
    let rel = p.to_str().unwrap();
    // read_all joins onto the fixture dir; an absolute path replaces it.
    read_all(rel)
}

#[test]
fn adapter_reader_accepts_bf16_and_refuses_unplaced_or_missing() {
    let c = tiny_cfg();
    let src = fixture("tiny-llama-lora");
    let fx = AdapterWeights::load(&src, &c).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        src.join("adapter_config.json"),
        dir.path().join("adapter_config.json"),
    )
    .unwrap();
    let write = |extra: Option<&str>, skip: usize, dtype: qlora_nf4::Dtype| {
        let mut t: Vec<(String, qlora_nf4::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (k, shape, r) in fx.layout.tensors().into_iter().skip(skip) {
            let bytes = qlora_nf4::from_f32(dtype, &fx.data[r]).unwrap();
            t.push((k, dtype, shape, bytes));
        }
        if let Some(k) = extra {
            t.push((
                k.to_string(),
                dtype,
                vec![1],
                qlora_nf4::from_f32(dtype, &[0.0]).unwrap(),
            ));
        }
        qlora_nf4::write_safetensors(&dir.path().join("adapter_model.safetensors"), &t, None)
            .unwrap();
    };
    write(None, 0, qlora_nf4::Dtype::BF16);
    let back = AdapterWeights::load(dir.path(), &c).unwrap();
    for (a, b) in back.data.iter().zip(&fx.data) {
        assert_eq!(*a, half::bf16::from_f32(*b).to_f32());
    }
    write(
        Some("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"),
        0,
        qlora_nf4::Dtype::F32,
    );
    let e = AdapterWeights::load(dir.path(), &c)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lora_A.default.weight") && e.contains("cannot be placed"),
        "{e}"
    );
    write(None, 1, qlora_nf4::Dtype::F32);
    let e = AdapterWeights::load(dir.path(), &c)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing tensor") && e.contains("lora_A"), "{e}");
}

/// Generation path: prompt then one token at a time through the KV cache gives the logits
/// of the full causal forward.
#[test]
fn kv_cache_forward_matches_full_forward() {
    let be = CpuBackend::<f32>::new();
    let m = Model::load(&be, &fixture("tiny-llama"), BaseFormat::QLORA).unwrap();
    let w = AdapterWeights::load(&fixture("tiny-llama-lora"), &m.config).unwrap();
    let a = Adapter::new(&be, &w);
    let ids: Vec<u32> = vec![1, 40, 41, 99, 7, 250, 3, 18];
    let full = forward_logits(&be, &m, Some(&a), &ids, 1, 8, None).unwrap();
    let mut cache = KvCache::new(&be, &m, 1, 10);
    let mut inc = forward_logits(&be, &m, Some(&a), &ids[..5], 1, 5, Some(&mut cache)).unwrap();
    for t in 5..8 {
        inc.extend(
            forward_logits(&be, &m, Some(&a), &ids[t..t + 1], 1, 1, Some(&mut cache)).unwrap(),
        );
    }
    assert_eq!(cache.len, 8);
    let err = full
        .iter()
        .zip(&inc)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(err < 1e-5, "KV-cache logits differ by {err}");
    let Err(e) = forward_logits(&be, &m, Some(&a), &ids, 1, 8, Some(&mut cache)) else {
        panic!("a full KV cache accepted more positions")
    };
    assert!(e.to_string().contains("KV cache"));
}

/// An embedding held in host memory (as the CUDA backend holds it) gives the same logits and
/// LoRA gradients as the table on the backend: the gathered rows are the same values.
#[test]
fn host_embedding_is_the_device_embedding() {
    let be = CpuBackend::<f32>::new();
    let mut m = Model::load(&be, &fixture("tiny-llama"), BaseFormat::QLORA).unwrap();
    let w = AdapterWeights::load(&fixture("tiny-llama-lora"), &m.config).unwrap();
    let ids: Vec<u32> = vec![1, 40, 41, 99, 7, 250, 3, 18];
    let batch = Batch::causal_lm(ids.clone(), 2, 4).unwrap();
    let run = |m: &Model<CpuBackend>| {
        let mut a = Adapter::new(&be, &w);
        let logits = forward_logits(&be, m, Some(&a), &ids, 2, 4, None).unwrap();
        let loss = forward_backward(&be, m, &mut a, &batch, StepOptions::default()).unwrap();
        (logits, loss.sum, a.grads)
    };
    let on_device = run(&m);
    assert!(matches!(m.embed, Embedding::Device(_)));
    m.embed = Embedding::Host(m.embed.to_f32(&be));
    assert_eq!(run(&m), on_device);
}

/// Eval loss of every fixture batch with the trained adapter equals PEFT's
/// `eval_loss_after_per_batch` (losses.json).
#[test]
fn evaluate_matches_fixture_eval_losses() {
    let be = CpuBackend::<f32>::new();
    let m = Model::load(
        &be,
        &fixture("qlora-bnb4/quantized_base"),
        BaseFormat::Dense,
    )
    .unwrap();
    let w = AdapterWeights::load(&fixture("qlora-bnb4/adapter_final"), &m.config).unwrap();
    let a = Adapter::new(&be, &w);
    let losses: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("qlora-bnb4/losses.json")).unwrap())
            .unwrap();
    let batches = read_all("qlora-bnb4/batch.safetensors");
    for k in 0..8 {
        let (_, ids) = &batches[&format!("step{k}")];
        let seqs: Vec<Vec<u32>> = ids
            .chunks(32)
            .map(|c| c.iter().map(|&x| x as u32).collect())
            .collect();
        let r = evaluate(&be, &m, Some(&a), &seqs, &EvalOptions::default()).unwrap();
        let want = losses["eval_loss_after_per_batch"][k].as_f64().unwrap();
        assert!(
            (r.loss - want).abs() < 1e-5,
            "batch {k}: {} vs {want}",
            r.loss
        );
        assert_eq!(r.tokens, 4 * 31);
        assert!((r.perplexity - want.exp()).abs() < 1e-3);
    }
}

#[test]
fn eval_jsonl_and_logit_dump() {
    let be = CpuBackend::<f32>::new();
    let m = Model::load(&be, &fixture("tiny-llama"), BaseFormat::Dense).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("eval.jsonl");
    std::fs::write(
        &data,
        "{\"text\": \"Quantize the model weight.\"}\n\n{\"input_ids\": [1, 5, 9]}\n",
    )
    .unwrap();
    let recs = read_eval_jsonl(&data).unwrap();
    let tok = load_tokenizer(&fixture("tiny-llama")).unwrap();
    let seqs = tokenize_records(&recs, Some(&tok)).unwrap();
    let fx = read_all("logits/base_text_f32.safetensors");
    assert_eq!(
        seqs[0].iter().map(|&x| x as f64).collect::<Vec<_>>(),
        fx["input_ids"].1
    );
    let out = dir.path().join("logits.safetensors");
    let opts = EvalOptions {
        dump_logits: Some(out.clone()),
        batch_size: 1,
        ..Default::default()
    };
    let r = evaluate(&be, &m, None, &seqs, &opts).unwrap();
    assert_eq!((r.sequences, r.tokens), (2, 16 + 2));
    let dump = read_all_abs(&out);
    assert_eq!(dump["logits"].0, vec![2, 17, 320]);
    assert_eq!(dump["input_ids"].0, vec![2, 17]);
    // the first row's logits are the fixture's (right padding does not touch causal rows)
    let got: Vec<f32> = dump["logits"].1[..17 * 320]
        .iter()
        .map(|&x| x as f32)
        .collect();
    assert!(common::max_abs(&got, &fx["logits"].1) < 1e-4);

    std::fs::write(&data, "{\"text\": \"a\"}\n{\"prompt\": \"x\"}\n").unwrap();
    let e = read_eval_jsonl(&data).unwrap_err().to_string();
    assert!(e.contains("eval.jsonl:2"), "{e}");
    std::fs::write(&data, "{\"text\": \"a\"}\nnot json\n").unwrap();
    assert!(read_eval_jsonl(&data)
        .unwrap_err()
        .to_string()
        .contains(":2: invalid JSON"));
}

/// A bf16 checkpoint split into two shards with an index loads (dense and quantized on load)
/// and gives the logits of the f32 model run on bf16-rounded weights.
#[test]
fn sharded_bf16_checkpoint_loads() {
    use qlora_nf4::{from_f32, write_safetensors, Dtype, ModelWeights};
    let src = ModelWeights::open(&fixture("tiny-llama")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = std::fs::read_to_string(fixture("tiny-llama/config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        cfg.replace("\"float32\"", "\"bfloat16\""),
    )
    .unwrap();
    let names = src.names();
    let mut map = serde_json::Map::new();
    let mut rounded = MapSource::default();
    for (shard, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", shard + 1);
        let mut tensors = Vec::new();
        for n in part {
            let (_, shape) = src.info(n).unwrap();
            let v: Vec<f32> = src
                .get_f32(n)
                .unwrap()
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_f32())
                .collect();
            tensors.push((
                n.clone(),
                Dtype::BF16,
                shape.clone(),
                from_f32(Dtype::BF16, &v).unwrap(),
            ));
            rounded.tensors.insert(n.clone(), (shape, v));
            map.insert(n.clone(), serde_json::json!(file));
        }
        write_safetensors(&dir.path().join(&file), &tensors, None).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let be = CpuBackend::<f32>::new();
    let sharded = Model::load(&be, dir.path(), BaseFormat::Dense).unwrap();
    assert_eq!(sharded.config.dtype.as_deref(), Some("bfloat16"));
    let reference =
        Model::from_source(&be, sharded.config.clone(), &rounded, BaseFormat::Dense).unwrap();
    let ids: Vec<u32> = (0..10).map(|i| i * 31 % 320).collect();
    let a = forward_logits(&be, &sharded, None, &ids, 1, 10, None).unwrap();
    let b = forward_logits(&be, &reference, None, &ids, 1, 10, None).unwrap();
    assert_eq!(a, b);
    let q = Model::load(&be, dir.path(), BaseFormat::QLORA).unwrap();
    assert!(q.nf4_base);
    let nf4 = q.layers[0].proj[0].w.nf4.as_ref().unwrap();
    assert_eq!(
        nf4.state.dtype,
        qlora_nf4::Dtype::BF16,
        "QuantState keeps the original dtype"
    );
}

/// With LoRA dropout, checkpointing recomputes the same masks (they are a function of the
/// seed), so gradients are identical; another seed gives other gradients.
#[test]
fn dropout_masks_survive_recompute() {
    let be = CpuBackend::<f32>::new();
    let c = ModelConfig::synthetic_llama(32, 48, 2, 4, 2, 50);
    let m = Model::random(&be, c.clone(), 3, BaseFormat::QLORA).unwrap();
    let l = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.2,
        target_modules: TargetModules::AllLinear,
        init: LoraInit::Random,
        ..Default::default()
    };
    let w = AdapterWeights::init(&l, &c, 5, |_| unreachable!()).unwrap();
    let ids: Vec<u32> = (0..24).map(|i| (i * 13 + 1) % 50).collect();
    let batch = Batch::causal_lm(ids, 2, 12).unwrap();
    let run = |ckpt: bool, seed: u64| {
        let mut a = Adapter::new(&be, &w);
        let opts = StepOptions {
            checkpointing: ckpt,
            dropout_seed: seed,
            loss_scale: LossScale::Mean,
        };
        let s = forward_backward(&be, &m, &mut a, &batch, opts).unwrap();
        (s, a.grads)
    };
    let (s1, g1) = run(false, 9);
    let (s2, g2) = run(true, 9);
    assert_eq!((s1, &g1), (s2, &g2));
    let (_, g3) = run(false, 10);
    assert_ne!(g1, g3);
}

/// Gradient accumulation: two micro-batches with `PerTokens(total)` sum to the gradient of
/// the concatenated batch with `Mean`.
#[test]
fn accumulation_equals_one_large_batch() {
    let be = CpuBackend::<f32>::new();
    let m = Model::load(&be, &fixture("tiny-llama"), BaseFormat::Dense).unwrap();
    let w = AdapterWeights::load(&fixture("tiny-llama-lora"), &m.config).unwrap();
    let ids: Vec<u32> = (0..32).map(|i| (i * 37 + 5) % 320).collect();
    let mut labels: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
    labels[3..9].iter_mut().for_each(|l| *l = -100); // uneven label counts per micro-batch
    let whole = Batch::new(ids.clone(), labels.clone(), 4, 8).unwrap();
    let mut a = Adapter::new(&be, &w);
    forward_backward(&be, &m, &mut a, &whole, StepOptions::default()).unwrap();
    let halves = [
        Batch::new(ids[..16].to_vec(), labels[..16].to_vec(), 2, 8).unwrap(),
        Batch::new(ids[16..].to_vec(), labels[16..].to_vec(), 2, 8).unwrap(),
    ];
    let total: usize = halves.iter().map(|b| b.label_tokens()).sum();
    assert_eq!(total, whole.label_tokens());
    let mut acc = Adapter::new(&be, &w);
    let opts = StepOptions {
        loss_scale: LossScale::PerTokens(total),
        ..Default::default()
    };
    for h in &halves {
        forward_backward(&be, &m, &mut acc, h, opts).unwrap();
    }
    let err = a
        .grads
        .iter()
        .zip(&acc.grads)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = a.grads.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(
        err <= 1e-5 * scale,
        "accumulated grads differ by {err} (max {scale})"
    );
}
