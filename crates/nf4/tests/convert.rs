//! `quantize_model_dir` against transformers' own 4-bit checkpoint of the same model
//! (tests/fixtures/qlora-bnb4/quantized_base), the read-back path, and every bad input.

use qlora_nf4::convert::{dequantize_model_dir, inspect, quantize_model_dir, QuantizeOptions};
use qlora_nf4::{Absmax, Dtype, ModelWeights, Nf4Error};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn f32_opts() -> QuantizeOptions {
    // The fixture was made with f32 compute (bnb_4bit_compute_dtype float32).
    QuantizeOptions {
        compute_dtype: Dtype::F32,
        ..Default::default()
    }
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn quantize_tiny_llama_reproduces_transformers_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    let s = quantize_model_dir(&fixtures().join("tiny-llama"), &out, &f32_opts()).unwrap();
    assert_eq!(s.tensors_quantized, 14);
    assert_eq!(s.tensors_kept, 7);

    let ours = ModelWeights::open(&out).unwrap();
    let theirs = ModelWeights::open(&fixtures().join("qlora-bnb4/quantized_base")).unwrap();
    assert_eq!(ours.names(), theirs.names(), "same tensor keys");
    let (mut codes_total, mut codes_off) = (0, 0);
    for name in theirs.names() {
        let (a, b) = (
            ours.tensor_info(&name).unwrap(),
            theirs.tensor_info(&name).unwrap(),
        );
        assert_eq!(
            (a.dtype, &a.shape),
            (b.dtype, &b.shape),
            "{name}: dtype/shape"
        );
        let (x, y) = (ours.bytes(&name).unwrap(), theirs.bytes(&name).unwrap());
        if name.ends_with(".weight.absmax") && a.dtype == Dtype::U8 {
            // Nested 8-bit codes: ±1 allowed (bitsandbytes' CPU lookup table is approximate).
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                let d = (*p as i32 - *q as i32).abs();
                assert!(d <= 1, "{name}[{i}]: {p} vs {q}");
                codes_off += d as usize;
            }
            codes_total += x.len();
        } else {
            assert_eq!(x, y, "{name}: bytes differ");
        }
    }
    assert!(
        codes_off * 100 <= codes_total,
        "{codes_off}/{codes_total} nested codes off by one"
    );
    assert_eq!(
        read_json(&out.join("config.json")),
        read_json(&fixtures().join("qlora-bnb4/quantized_base/config.json"))
    );
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).exists(), "{f} copied");
    }
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "no temporary left behind"
    );
}

#[test]
fn read_back_transformers_checkpoint_and_dequantize() {
    let q = ModelWeights::open(&fixtures().join("qlora-bnb4/quantized_base")).unwrap();
    let orig = ModelWeights::open(&fixtures().join("tiny-llama")).unwrap();
    let name = "model.layers.1.mlp.down_proj.weight";
    let t = q.get_nf4(name).unwrap();
    assert_eq!(t.shape(), &[64, 172]);
    assert!(matches!(t.state.absmax, Absmax::Double { .. }));
    // NF4 error is bounded by half the widest code gap (≈0.16) times the block absmax.
    let deq = t.dequantize_f32();
    let w = orig.get_f32(name).unwrap();
    let absmax = t.state.absmax_f32();
    for (i, (d, w)) in deq.iter().zip(&w).enumerate() {
        assert!((d - w).abs() <= 0.17 * absmax[i / 64] + 1e-6, "{name}[{i}]");
    }

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("deq");
    let s = dequantize_model_dir(
        &fixtures().join("qlora-bnb4/quantized_base"),
        &out,
        Some(Dtype::BF16),
        false,
        5_000_000_000,
    )
    .unwrap();
    assert_eq!(s.tensors_quantized, 14);
    let d = ModelWeights::open(&out).unwrap();
    assert_eq!(d.info(name).unwrap(), (Dtype::BF16, vec![64, 172]));
    let bf: Vec<f32> = d.get_f32(name).unwrap();
    let want: Vec<f32> = t.dequantize_bf16().iter().map(|v| v.to_f32()).collect();
    assert_eq!(bf, want);
    let cfg = read_json(&out.join("config.json"));
    assert!(cfg.get("quantization_config").is_none());
    assert_eq!(cfg["dtype"], "bfloat16");
    assert_eq!(d.names().len(), orig.names().len());
}

#[test]
fn inspect_reports_error_against_original() {
    let (rows, overall) = inspect(
        &fixtures().join("qlora-bnb4/quantized_base"),
        Some(&fixtures().join("tiny-llama")),
    )
    .unwrap();
    assert_eq!(rows.len(), 21);
    let nf4: Vec<_> = rows.iter().filter(|r| r.dtype == "nf4").collect();
    assert_eq!(nf4.len(), 14);
    let overall = overall.unwrap();
    // NF4 on Gaussian-like weights: relative error ≈ 0.1 (QLoRA paper, Fig. 2 ballpark).
    assert!(
        overall.relative > 0.03 && overall.relative < 0.2,
        "relative {}",
        overall.relative
    );
    assert!(overall.max_abs > 0.0 && overall.mean_abs < overall.max_abs);
}

#[test]
fn quantize_roundtrips_bf16_sharded_model() {
    // Convert the fixture to bf16 shards, quantize with small shards, dequantize back.
    let tmp = tempfile::tempdir().unwrap();
    let bf = tmp.path().join("bf16");
    dequantize_model_dir(
        &fixtures().join("qlora-bnb4/quantized_base"),
        &bf,
        Some(Dtype::BF16),
        false,
        60_000,
    )
    .unwrap();
    assert!(
        bf.join("model.safetensors.index.json").exists(),
        "small max shard size gives shards"
    );
    let q = tmp.path().join("q");
    let opts = QuantizeOptions {
        max_shard_bytes: 50_000,
        blocksize: 128,
        ..Default::default()
    };
    let s = quantize_model_dir(&bf, &q, &opts).unwrap();
    assert!(s.shards > 1);
    let w = ModelWeights::open(&q).unwrap();
    let t = w.get_nf4("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(t.state.blocksize, 128);
    assert_eq!(t.state.dtype, Dtype::BF16);
    let cfg = read_json(&q.join("config.json"));
    assert_eq!(
        cfg["quantization_config"]["bnb_4bit_compute_dtype"],
        "bfloat16"
    );
}

#[test]
fn skip_modules_and_no_double_quant() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    let opts = QuantizeOptions {
        double_quant: false,
        skip_modules: vec!["down_proj".into()],
        ..Default::default()
    };
    let s = quantize_model_dir(&fixtures().join("tiny-llama"), &out, &opts).unwrap();
    assert_eq!(s.tensors_quantized, 12);
    let w = ModelWeights::open(&out).unwrap();
    assert!(!w.is_nf4("model.layers.0.mlp.down_proj.weight"));
    let t = w.get_nf4("model.layers.0.mlp.up_proj.weight").unwrap();
    assert!(matches!(t.state.absmax, Absmax::F32(_)));
    let cfg = read_json(&out.join("config.json"));
    assert_eq!(
        cfg["quantization_config"]["llm_int8_skip_modules"],
        serde_json::json!(["down_proj"])
    );
    assert_eq!(
        cfg["quantization_config"]["bnb_4bit_use_double_quant"],
        false
    );
}

// ---- bad input: each names the file/tensor, returns an error, and leaves no output ----

/// A writable copy of the tiny model to corrupt.
fn scratch_model() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(fixtures().join("tiny-llama").join(f), dir.join(f)).unwrap();
    }
    (tmp, dir)
}

fn quantize_err(dir: &Path) -> (String, PathBuf) {
    let out = dir.parent().unwrap().join("out");
    let err = quantize_model_dir(dir, &out, &QuantizeOptions::default()).unwrap_err();
    assert!(!out.exists(), "no output after an error: {err}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "no temporary left behind: {leftovers:?}"
    );
    (err.to_string(), out)
}

fn patch_header(dir: &Path, f: impl Fn(&mut Value)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut h: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    f(&mut h);
    let mut hb = serde_json::to_vec(&h).unwrap();
    hb.resize(n.max(hb.len()), b' ');
    let mut out = (hb.len() as u64).to_le_bytes().to_vec();
    out.extend(hb);
    out.extend(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

#[test]
fn truncated_safetensors() {
    let (_t, dir) = scratch_model();
    let p = dir.join("model.safetensors");
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() - 1000]).unwrap();
    let (e, _) = quantize_err(&dir);
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn garbage_safetensors() {
    let (_t, dir) = scratch_model();
    std::fs::write(
        dir.join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header",
    )
    .unwrap();
    let (e, _) = quantize_err(&dir);
    assert!(
        e.contains("model.safetensors") && e.contains("header length"),
        "{e}"
    );
    std::fs::write(
        dir.join("model.safetensors"),
        [2u8, 0, 0, 0, 0, 0, 0, 0, b'{', b'x'],
    )
    .unwrap();
    let (e, _) = quantize_err(&dir);
    assert!(e.contains("not valid JSON"), "{e}");
}

#[test]
fn header_offsets_that_lie() {
    let (_t, dir) = scratch_model();
    patch_header(&dir, |h| {
        h["model.norm.weight"]["data_offsets"][1] =
            serde_json::json!(h["model.norm.weight"]["data_offsets"][1].as_u64().unwrap() + 4)
    });
    let (e, _) = quantize_err(&dir);
    assert!(
        e.contains("model.norm.weight") && e.contains("data_offsets"),
        "{e}"
    );
    let (_t, dir) = scratch_model();
    patch_header(&dir, |h| {
        h["model.norm.weight"]["data_offsets"] =
            h["model.layers.0.input_layernorm.weight"]["data_offsets"].clone()
    });
    let (e, _) = quantize_err(&dir);
    assert!(e.contains("overlap"), "{e}");
}

#[test]
fn unsupported_dtype() {
    let (_t, dir) = scratch_model();
    patch_header(&dir, |h| {
        let t = &mut h["model.layers.0.mlp.up_proj.weight"];
        t["dtype"] = "I32".into();
    });
    let (e, _) = quantize_err(&dir);
    assert!(
        e.contains("model.layers.0.mlp.up_proj.weight") && e.contains("I32"),
        "{e}"
    );
    patch_header(&dir, |h| {
        h["model.layers.0.mlp.up_proj.weight"]["dtype"] = "F8_E4M3".into()
    });
    let (e, _) = quantize_err(&dir);
    assert!(e.contains("unsupported dtype F8_E4M3"), "{e}");
}

#[test]
fn missing_and_contradictory_config() {
    let (_t, dir) = scratch_model();
    let cfg_path = dir.join("config.json");
    let mut cfg = read_json(&cfg_path);
    cfg.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let (e, _) = quantize_err(&dir);
    assert!(
        e.contains("config.json") && e.contains("hidden_size") && e.contains("missing"),
        "{e}"
    );

    let mut cfg = read_json(&fixtures().join("tiny-llama/config.json"));
    cfg["num_key_value_heads"] = 3.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let (e, _) = quantize_err(&dir);
    assert!(e.contains("num_key_value_heads"), "{e}");

    std::fs::write(&cfg_path, "{not json").unwrap();
    let (e, _) = quantize_err(&dir);
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn shape_that_does_not_match_config() {
    let (_t, dir) = scratch_model();
    let cfg_path = dir.join("config.json");
    let mut cfg = read_json(&cfg_path);
    cfg["intermediate_size"] = 128.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let (e, _) = quantize_err(&dir);
    assert!(
        e.contains("mlp") && e.contains("does not match config.json"),
        "{e}"
    );
}

#[test]
fn nan_weight_names_tensor_and_index() {
    let (_t, dir) = scratch_model();
    let path = dir.join("model.safetensors");
    let st = qlora_nf4::SafetensorsFile::open(&path).unwrap();
    let info = st.tensors["model.layers.1.self_attn.o_proj.weight"].clone();
    let n = u64::from_le_bytes(std::fs::read(&path).unwrap()[..8].try_into().unwrap()) as usize;
    drop(st);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = 8 + n + info.start + 4 * 77;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let (e, _) = quantize_err(&dir);
    assert!(
        e.contains("model.layers.1.self_attn.o_proj.weight") && e.contains("element 77"),
        "{e}"
    );
}

#[test]
fn existing_output_needs_force() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let err = quantize_model_dir(
        &fixtures().join("tiny-llama"),
        &out,
        &QuantizeOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, Nf4Error::Output { .. }) && err.to_string().contains("--force"),
        "{err}"
    );
    assert!(out.join("keep.txt").exists(), "untouched without --force");
    quantize_model_dir(
        &fixtures().join("tiny-llama"),
        &out,
        &QuantizeOptions {
            force: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!out.join("keep.txt").exists() && out.join("model.safetensors").exists());
}

#[test]
fn write_failure_leaves_nothing() {
    // The output's parent is a file, so the staging directory cannot be created.
    let tmp = tempfile::tempdir().unwrap();
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let err = quantize_model_dir(
        &fixtures().join("tiny-llama"),
        &blocker.join("out"),
        &QuantizeOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("file"), "{err}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn missing_shard_and_index_lies() {
    let tmp = tempfile::tempdir().unwrap();
    let bf = tmp.path().join("bf16");
    dequantize_model_dir(
        &fixtures().join("qlora-bnb4/quantized_base"),
        &bf,
        None,
        false,
        60_000,
    )
    .unwrap();
    let idx_path = bf.join("model.safetensors.index.json");
    let mut idx = read_json(&idx_path);
    idx["weight_map"]["model.norm.weight"] = "model-00001-of-00009.safetensors".into();
    std::fs::write(&idx_path, idx.to_string()).unwrap();
    let (e, _) = quantize_err(&bf);
    assert!(e.contains("model-00001-of-00009.safetensors"), "{e}");
}

#[test]
fn corrupt_quant_state_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("q");
    quantize_model_dir(
        &fixtures().join("tiny-llama"),
        &q,
        &QuantizeOptions::default(),
    )
    .unwrap();
    let w = ModelWeights::open(&q).unwrap();
    let name = "model.layers.0.self_attn.k_proj.weight";
    let mut tensors: Vec<_> = w
        .names()
        .iter()
        .map(|n| {
            let i = w.tensor_info(n).unwrap();
            (
                n.clone(),
                i.dtype,
                i.shape.clone(),
                w.bytes(n).unwrap().to_vec(),
            )
        })
        .collect();
    drop(w);
    for t in tensors.iter_mut() {
        if t.0 == format!("{name}.quant_state.bitsandbytes__nf4") {
            let s = String::from_utf8(t.3.clone())
                .unwrap()
                .replace("[32, 64]", "[64, 64]");
            t.2 = vec![s.len()];
            t.3 = s.into_bytes();
        }
    }
    qlora_nf4::write_safetensors(&q.join("model.safetensors"), &tensors, None).unwrap();
    let w = ModelWeights::open(&q).unwrap();
    let e = w.get_nf4(name).unwrap_err().to_string();
    assert!(e.contains(name) && e.contains("needs"), "{e}");
}

#[test]
fn pickle_only_checkpoint_is_refused_by_name() {
    let (_t, dir) = scratch_model();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), b"not read").unwrap();
    let (e, _) = quantize_err(&dir);
    assert!(
        e.contains("pytorch_model.bin") && e.contains("safetensors"),
        "{e}"
    );
}
