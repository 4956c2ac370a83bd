//! End-to-end conversion of GGUF files generated here from the `tiny-llama` fixture (a real
//! transformers checkpoint with a byte-level BPE tokenizer): the GGUF is written the way
//! llama.cpp's `convert_hf_to_gguf.py` writes a Llama (Q/K rows permuted, dims reversed, HF
//! names mapped to ggml names, vocabulary as arrays), then converted back, and the result must
//! equal the original weights bit for bit and tokenize exactly like the original tokenizer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use qlora_gguf::hf::permute_rows;
use qlora_gguf::writer::GgufWriter;
use qlora_gguf::{convert_to_hf, GgmlType, GgufError, OutDtype, Value, ValueType};
use serde_json::Value as Json;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny-llama")
        .join(name)
}

fn read_json(p: &Path) -> Json {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// name → (shape, row-major f32 values).
type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// The tensors of a safetensors file holding F32 or BF16 tensors.
fn load_safetensors(p: &Path) -> Tensors {
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let vals = match v.dtype() {
                safetensors::Dtype::F32 => v
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                safetensors::Dtype::BF16 => v
                    .data()
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                d => panic!("{name}: unexpected dtype {d:?}"),
            };
            (name, (v.shape().to_vec(), vals))
        })
        .collect()
}

/// HF tensor name → GGUF name (the mapping of llama.cpp's tensor_mapping.py for Llama).
fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, module) = rest.split_once('.').unwrap();
    let m = match module {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => panic!("unmapped {other}"),
    };
    format!("blk.{layer}.{m}")
}

fn strs(v: Vec<String>) -> Value {
    Value::Array(
        ValueType::String,
        v.into_iter().map(Value::String).collect(),
    )
}

const CHAT_TEMPLATE: &str = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}";

/// Metadata of tiny-llama as convert_hf_to_gguf.py writes it (llama.* from config.json,
/// tokenizer.ggml.* from tokenizer.json).
fn tiny_metadata(w: &mut GgufWriter, pre: &str) {
    let cfg = read_json(&fixture("config.json"));
    let u = |k: &str| Value::U32(cfg[k].as_u64().unwrap() as u32);
    w.kv("general.architecture", Value::String("llama".into()))
        .kv("general.name", Value::String("tiny-llama".into()))
        .kv("llama.context_length", u("max_position_embeddings"))
        .kv("llama.embedding_length", u("hidden_size"))
        .kv("llama.block_count", u("num_hidden_layers"))
        .kv("llama.feed_forward_length", u("intermediate_size"))
        .kv("llama.attention.head_count", u("num_attention_heads"))
        .kv("llama.attention.head_count_kv", u("num_key_value_heads"))
        .kv(
            "llama.rope.freq_base",
            Value::F32(cfg["rope_parameters"]["rope_theta"].as_f64().unwrap() as f32),
        )
        .kv(
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32),
        )
        .kv("llama.vocab_size", u("vocab_size"))
        .kv("llama.rope.dimension_count", u("head_dim"));

    let tok = read_json(&fixture("tokenizer.json"));
    let vocab = tok["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    // convert_hf_to_gguf marks special added tokens CONTROL (3), the rest NORMAL (1).
    let mut types = vec![1i32; tokens.len()];
    for a in tok["added_tokens"].as_array().unwrap() {
        if a["special"].as_bool().unwrap() {
            types[a["id"].as_u64().unwrap() as usize] = 3;
        }
    }
    let merges: Vec<String> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap()))
        .collect();
    w.kv("tokenizer.ggml.model", Value::String("gpt2".into()))
        .kv("tokenizer.ggml.pre", Value::String(pre.into()))
        .kv("tokenizer.ggml.tokens", strs(tokens))
        .kv(
            "tokenizer.ggml.token_type",
            Value::Array(ValueType::I32, types.into_iter().map(Value::I32).collect()),
        )
        .kv("tokenizer.ggml.merges", strs(merges))
        .kv("tokenizer.ggml.bos_token_id", Value::U32(1))
        .kv("tokenizer.ggml.eos_token_id", Value::U32(2))
        .kv("tokenizer.ggml.unknown_token_id", Value::U32(0))
        .kv("tokenizer.ggml.add_bos_token", Value::Bool(true))
        .kv("tokenizer.ggml.add_eos_token", Value::Bool(false))
        .kv(
            "tokenizer.chat_template",
            Value::String(CHAT_TEMPLATE.into()),
        );
}

/// A GGUF of tiny-llama: every tensor f32 except those named in `q8`, which are stored as
/// Q8_0 (and returned with their exact dequantized values, to compare against).
fn tiny_gguf(pre: &str, drop_lm_head: bool, q8: &[&str]) -> (GgufWriter, Tensors) {
    let cfg = read_json(&fixture("config.json"));
    let (h, hkv) = (
        cfg["num_attention_heads"].as_u64().unwrap() as usize,
        cfg["num_key_value_heads"].as_u64().unwrap() as usize,
    );
    let mut expected = load_safetensors(&fixture("model.safetensors"));
    if drop_lm_head {
        expected.remove("lm_head.weight");
    }
    let mut w = GgufWriter::new();
    // A non-default alignment, to exercise `general.alignment`.
    w.kv("general.alignment", Value::U32(64));
    tiny_metadata(&mut w, pre);
    for (name, (shape, vals)) in expected.iter_mut() {
        let g = gguf_name(name);
        // convert_hf_to_gguf: permute(q, n_head, n_head) and permute(k, n_head, n_head_kv).
        let stored = if g.ends_with("attn_q.weight") {
            permute_rows(vals, shape[0], shape[1], h)
        } else if g.ends_with("attn_k.weight") {
            permute_rows(vals, shape[0], shape[1], hkv)
        } else {
            vals.clone()
        };
        if q8.contains(&g.as_str()) {
            // Q8_0 of each 32-value block: d = f16(absmax / 127), q = round(x / d) clamped; the
            // reference dequantization is then q·d, computed here in f64 (exact: an 11-bit
            // mantissa times a 7-bit integer). Only tensors without the Q/K row permutation are
            // stored this way, so the expected HF values are q·d in the same order.
            assert!(!g.contains("attn_q") && !g.contains("attn_k"));
            let mut bytes = Vec::new();
            let mut deq = Vec::new();
            for blk in stored.chunks(32) {
                let amax = blk.iter().fold(0f32, |a, &x| a.max(x.abs()));
                let d = half::f16::from_f32(amax / 127.0);
                bytes.extend_from_slice(&d.to_le_bytes());
                for &x in blk {
                    let q = if d.to_f32() == 0.0 {
                        0
                    } else {
                        (x / d.to_f32()).round().clamp(-127.0, 127.0) as i8
                    };
                    bytes.push(q as u8);
                    deq.push((q as f64 * d.to_f64()) as f32);
                }
            }
            let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
            w.tensor(&g, &dims, GgmlType::Q8_0, bytes);
            *vals = deq;
        } else {
            w.tensor_f32(&g, shape, &stored);
        }
    }
    (w, expected)
}

#[test]
fn tiny_llama_round_trip_weights_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let (w, expected) = tiny_gguf("gpt-2", false, &["blk.1.ffn_gate.weight"]);
    let gguf = dir.path().join("tiny.gguf");
    w.write(&gguf).unwrap();
    let out = dir.path().join("out/hf");
    let summary = convert_to_hf(&gguf, &out, OutDtype::F32).unwrap();
    assert_eq!(summary.n_tensors, expected.len());
    assert_eq!(summary.source_types["Q8_0"], 1);
    assert_eq!(summary.tokenizer_model, "gpt2");

    let got = load_safetensors(&out.join("model.safetensors"));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (name, (shape, vals)) in &expected {
        let (gs, gv) = &got[name];
        assert_eq!(gs, shape, "{name}: shape");
        let bad = gv
            .iter()
            .zip(vals)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(bad, None, "{name}: first differing element");
    }

    // The project's own loader reads the directory and sees the same values.
    let mw = qlora_nf4::ModelWeights::open(&out).unwrap();
    assert_eq!(mw.names(), expected.keys().cloned().collect::<Vec<_>>());
    for (name, (_, vals)) in &expected {
        assert_eq!(&mw.get_f32(name).unwrap(), vals, "{name} via ModelWeights");
    }
    // Exactly the five files (no spool or temporary file left inside).
    let mut files: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );

    // config.json: every field a Llama loader reads equals the original.
    let orig = read_json(&fixture("config.json"));
    let cfg = read_json(&out.join("config.json"));
    for k in [
        "architectures",
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "hidden_act",
        "attention_bias",
        "mlp_bias",
        "rope_parameters",
        "dtype",
    ] {
        assert_eq!(cfg[k], orig[k], "config.json `{k}`");
    }
    assert_eq!(cfg["rope_theta"], orig["rope_parameters"]["rope_theta"]);
    let gen = read_json(&out.join("generation_config.json"));
    assert_eq!(gen["bos_token_id"], 1);
    assert_eq!(gen["eos_token_id"], 2);

    let tc = read_json(&out.join("tokenizer_config.json"));
    assert_eq!(tc["bos_token"], "<s>");
    assert_eq!(tc["eos_token"], "</s>");
    assert_eq!(tc["unk_token"], "<unk>");
    assert_eq!(tc["chat_template"], CHAT_TEMPLATE);
    // No temporary directory is left beside the output.
    let left: Vec<_> = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("hf")]);
}

#[test]
fn bf16_output_is_one_rounding_of_the_original_and_tied_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let (w, expected) = tiny_gguf("gpt-2", true, &[]);
    let gguf = dir.path().join("tied.gguf");
    w.write(&gguf).unwrap();
    let out = dir.path().join("hf");
    std::fs::create_dir(&out).unwrap(); // an existing empty directory is accepted
    let s = convert_to_hf(&gguf, &out, OutDtype::BF16).unwrap();
    assert!(s.hparams.tie_word_embeddings);
    let cfg = read_json(&out.join("config.json"));
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["dtype"], "bfloat16");
    let got = load_safetensors(&out.join("model.safetensors"));
    assert!(!got.contains_key("lm_head.weight"));
    assert_eq!(got.len(), expected.len());
    for (name, (_, vals)) in &expected {
        let want: Vec<f32> = vals
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect();
        assert_eq!(got[name].1, want, "{name}");
    }
}

/// Texts covering ASCII, digits, punctuation, whitespace runs, newlines, non-Latin scripts,
/// emoji, and special-token strings inside text.
fn texts() -> Vec<String> {
    let corpus = std::fs::read_to_string(fixture("corpus.txt")).unwrap();
    let mut t: Vec<String> = corpus.lines().take(40).map(String::from).collect();
    t.extend(
        [
            "Quantize the model weight.",
            "",
            " ",
            "   leading and trailing spaces   ",
            "tabs\tand\nnew\n\nlines\r\n",
            "numbers 12345 and 3.14159, 1,000,000!",
            "Ünïcödé façade — naïve café 日本語のテキスト 한국어 Ελληνικά",
            "emoji 🦀🚀 and symbols ©®™ ∑∫√",
            "<s>special inside</s> text <unk>",
            "don't can't we'll it's I'M",
            "mixed\u{0}control\u{7f}chars",
        ]
        .map(String::from),
    );
    t
}

#[test]
fn tokenizer_from_gguf_matches_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let (w, _) = tiny_gguf("gpt-2", false, &[]);
    let gguf = dir.path().join("tok.gguf");
    w.write(&gguf).unwrap();
    let out = dir.path().join("hf");
    convert_to_hf(&gguf, &out, OutDtype::F32).unwrap();
    let orig = tokenizers::Tokenizer::from_file(fixture("tokenizer.json")).unwrap();
    let ours = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    assert_eq!(ours.get_vocab_size(true), orig.get_vocab_size(true));
    for text in texts() {
        for special in [true, false] {
            let a = orig.encode(text.as_str(), special).unwrap();
            let b = ours.encode(text.as_str(), special).unwrap();
            assert_eq!(b.get_ids(), a.get_ids(), "{text:?} add_special={special}");
        }
        let ids = orig
            .encode(text.as_str(), false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(
            ours.decode(&ids, false).unwrap(),
            orig.decode(&ids, false).unwrap(),
            "decode {text:?}"
        );
    }
    // The bos is prepended as the original's post-processor does.
    assert_eq!(ours.encode("a", true).unwrap().get_ids()[0], 1);
}

/// Byte-level id of a single byte in the GPT-2 alphabet (the tiny vocabulary has all 256).
fn id_of(tok: &tokenizers::Tokenizer, s: &str) -> u32 {
    tok.token_to_id(s)
        .unwrap_or_else(|| panic!("{s:?} not in vocab"))
}

#[test]
fn gpt2_pre_tokenizer_variants() {
    // Add the tokens "12" and "34" with merges "1 2" and "3 4" (lowest priority) to the tiny
    // vocabulary, then encode "1234" (no leading space):
    // - gpt-2: GPT-2's regex keeps " ?\p{N}+" together → one piece "1234" → [12, 34].
    // - smollm: digits are split individually first (Digits(individual_digits)), so no merge
    //   can join them → [1, 2, 3, 4].
    // - llama-bpe: \p{N}{1,3} → pieces "123" and "4" → [12, 3, 4].
    let dir = tempfile::tempdir().unwrap();
    for (pre, want) in [
        ("gpt-2", vec!["12", "34"]),
        ("smollm", vec!["1", "2", "3", "4"]),
        ("llama-bpe", vec!["12", "3", "4"]),
    ] {
        let (mut w, _) = tiny_gguf(pre, false, &[]);
        for (k, v) in w.metadata.iter_mut() {
            match (k.as_str(), v) {
                ("tokenizer.ggml.tokens", Value::Array(_, items)) => {
                    items.push(Value::String("12".into()));
                    items.push(Value::String("34".into()));
                }
                ("tokenizer.ggml.token_type", Value::Array(_, items)) => {
                    items.extend([Value::I32(1), Value::I32(1)]);
                }
                ("tokenizer.ggml.merges", Value::Array(_, items)) => {
                    items.push(Value::String("1 2".into()));
                    items.push(Value::String("3 4".into()));
                }
                ("llama.vocab_size", v) => *v = Value::U32(322),
                _ => {}
            }
        }
        // The embedding and head must match the grown vocabulary: pad two zero rows.
        for t in w.tensors.iter_mut() {
            if t.name == "token_embd.weight" || t.name == "output.weight" {
                t.dims[1] += 2;
                t.data.extend(std::iter::repeat_n(0u8, 2 * 64 * 4));
            }
        }
        let gguf = dir.path().join(format!("{pre}.gguf"));
        w.write(&gguf).unwrap();
        let out = dir.path().join(pre);
        convert_to_hf(&gguf, &out, OutDtype::F32).unwrap();
        let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
        let ids = tok.encode("1234", false).unwrap().get_ids().to_vec();
        let want: Vec<u32> = want.iter().map(|s| id_of(&tok, s)).collect();
        assert_eq!(ids, want, "pre-tokenizer {pre}");
    }
}

#[test]
fn refusals_name_what_is_refused_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let case = |label: &str, edit: &dyn Fn(&mut GgufWriter)| -> GgufError {
        let (mut w, _) = tiny_gguf("gpt-2", false, &[]);
        edit(&mut w);
        let gguf = dir.path().join(format!("{label}.gguf"));
        w.write(&gguf).unwrap();
        let out = dir.path().join(format!("{label}-out"));
        let err = convert_to_hf(&gguf, &out, OutDtype::F32).unwrap_err();
        assert!(!out.exists(), "{label}: output written despite {err}");
        assert!(err.to_string().contains(&format!("{label}.gguf")), "{err}");
        err
    };
    let set = |key: &'static str, v: Value| {
        move |w: &mut GgufWriter| {
            w.metadata.iter_mut().find(|(k, _)| k == key).unwrap().1 = v.clone();
        }
    };

    let err = case(
        "arch",
        &set("general.architecture", Value::String("qwen2".into())),
    );
    assert!(
        matches!(&err, GgufError::UnsupportedArchitecture { arch, .. } if arch == "qwen2"),
        "{err}"
    );

    let err = case("q2k", &|w| {
        let t = w
            .tensors
            .iter_mut()
            .find(|t| t.name == "blk.0.ffn_up.weight")
            .unwrap();
        // Q2_K: 84 bytes per 256 elements; ffn_up is 172 × 64 = 11008 = 43 blocks.
        t.ty = GgmlType::from_id(10);
        t.data = vec![0; 43 * 84];
    });
    assert!(
        matches!(&err, GgufError::UnsupportedType { tensor, ty, .. } if tensor == "blk.0.ffn_up.weight" && ty == "Q2_K"),
        "{err}"
    );

    let err = case("unknown", &|w| {
        w.tensor_f32("blk.0.attn_sinks.weight", &[4], &[0.0; 4]);
    });
    assert!(err.to_string().contains("blk.0.attn_sinks.weight"), "{err}");

    let err = case("missing", &|w| {
        w.tensors.retain(|t| t.name != "blk.1.ffn_down.weight")
    });
    assert!(err.to_string().contains("blk.1.ffn_down.weight"), "{err}");

    let err = case("shape", &set("llama.feed_forward_length", Value::U32(128)));
    assert!(matches!(err, GgufError::Tensor { .. }), "{err}");

    let err = case(
        "pre",
        &set("tokenizer.ggml.pre", Value::String("qwen2".into())),
    );
    assert!(matches!(err, GgufError::Tokenizer { .. }), "{err}");
    assert!(err.to_string().contains("qwen2"), "{err}");

    let err = case("merge", &|w| {
        let m = w
            .metadata
            .iter_mut()
            .find(|(k, _)| k == "tokenizer.ggml.merges");
        if let Some((_, Value::Array(_, items))) = m {
            items.push(Value::String("zq xw".into()));
        }
    });
    assert!(err.to_string().contains("\"zq xw\""), "{err}");

    let err = case("rope", &|w| {
        w.kv("llama.rope.scaling.type", Value::String("yarn".into()));
    });
    assert!(err.to_string().contains("yarn"), "{err}");

    let err = case("nokey", &|w| {
        w.metadata.retain(|(k, _)| k != "llama.block_count");
    });
    assert!(
        matches!(&err, GgufError::MissingKey { key, .. } if key == "llama.block_count"),
        "{err}"
    );

    // A non-empty output directory is never overwritten.
    let (w, _) = tiny_gguf("gpt-2", false, &[]);
    let gguf = dir.path().join("ok.gguf");
    w.write(&gguf).unwrap();
    let out = dir.path().join("full");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let err = convert_to_hf(&gguf, &out, OutDtype::F32).unwrap_err();
    assert!(matches!(err, GgufError::Write { .. }), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "x");
}

#[test]
fn corrupted_headers_never_panic() {
    // 600 deterministic single-byte corruptions of the header region (metadata, vocabulary
    // and tensor infos) of a tiny-llama GGUF: each file must either be refused with an error
    // or, where the corruption happens to produce a valid file, convert without panicking.
    let dir = tempfile::tempdir().unwrap();
    let (w, _) = tiny_gguf("gpt-2", false, &[]);
    let bytes = w.to_bytes();
    let header_len = {
        let p = dir.path().join("h.gguf");
        std::fs::write(&p, &bytes).unwrap();
        qlora_gguf::GgufFile::open(&p).unwrap().data_start() as usize
    };
    let mut state = 0x2545F4914F6CDD1Du64;
    let mut next = || {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let p = dir.path().join("m.gguf");
    let (mut refused, mut accepted) = (0, 0);
    for _ in 0..600 {
        let mut b = bytes.clone();
        let at = (next() % header_len as u64) as usize;
        b[at] = (next() & 0xFF) as u8;
        std::fs::write(&p, &b).unwrap();
        let ok = qlora_gguf::GgufModel::open(&p).and_then(|m| {
            for t in &m.tensors {
                m.load(t)?;
            }
            qlora_gguf::build_tokenizer(&m.file)
        });
        match ok {
            Ok(_) => accepted += 1,
            Err(e) => {
                assert!(e.to_string().contains("m.gguf"), "{e}");
                refused += 1;
            }
        }
    }
    // Most bytes of the header are string contents (token texts), which stay valid when
    // changed, so both outcomes occur.
    assert!(
        refused > 0 && accepted > 0,
        "{refused} refused, {accepted} accepted"
    );
}
