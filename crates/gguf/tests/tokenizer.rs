//! The SentencePiece (`tokenizer.ggml.model = "llama"`) path on a hand-made vocabulary whose
//! merges and encodings are derived by hand below.

use qlora_gguf::tokenizer::build_tokenizer;
use qlora_gguf::writer::GgufWriter;
use qlora_gguf::{GgufFile, Value, ValueType};

/// Vocabulary (id: piece, type, score):
///   0 <unk> (2), 1 <s> (3), 2 </s> (3), 3 + b: <0xBB> (6, byte fallback) for every byte b,
///   259.. : ▁ h e l o w r d (1, scores −100 … −107; single characters, so no merges),
///   267 ▁h (−1), 268 ll (−2), 269 llo (−3), 270 ▁he (−4), 271 ▁hello (−5),
///   272 <|user|> (4, user-defined).
fn spm_gguf(dir: &std::path::Path) -> std::path::PathBuf {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0f32; 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    for (i, p) in ["▁", "h", "e", "l", "o", "w", "r", "d"].iter().enumerate() {
        tokens.push(p.to_string());
        types.push(1);
        scores.push(-100.0 - i as f32);
    }
    for (i, p) in ["▁h", "ll", "llo", "▁he", "▁hello"].iter().enumerate() {
        tokens.push(p.to_string());
        types.push(1);
        scores.push(-1.0 - i as f32);
    }
    tokens.push("<|user|>".into());
    types.push(4);
    scores.push(0.0);
    assert_eq!(tokens.len(), 273);

    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::String("llama".into()))
        .kv("tokenizer.ggml.model", Value::String("llama".into()))
        .kv(
            "tokenizer.ggml.tokens",
            Value::Array(
                ValueType::String,
                tokens.into_iter().map(Value::String).collect(),
            ),
        )
        .kv(
            "tokenizer.ggml.token_type",
            Value::Array(ValueType::I32, types.into_iter().map(Value::I32).collect()),
        )
        .kv(
            "tokenizer.ggml.scores",
            Value::Array(ValueType::F32, scores.into_iter().map(Value::F32).collect()),
        )
        .kv("tokenizer.ggml.bos_token_id", Value::U32(1))
        .kv("tokenizer.ggml.eos_token_id", Value::U32(2))
        .kv("tokenizer.ggml.unknown_token_id", Value::U32(0));
    let p = dir.join("spm.gguf");
    w.write(&p).unwrap();
    p
}

#[test]
fn sentencepiece_vocabulary_with_byte_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let f = GgufFile::open(&spm_gguf(dir.path())).unwrap();
    let files = build_tokenizer(&f).unwrap();

    // Merges: each piece split into two in-vocabulary pieces, ordered by the merged piece's
    // score (highest first): ▁h (−1) = ▁+h; ll (−2) = l+l; llo (−3) = ll+o (l+lo: "lo" is not
    // a piece); ▁he (−4) = ▁h+e; ▁hello (−5) = ▁he+llo (the only split with both halves in
    // the vocabulary).
    let merges = &files.tokenizer["model"]["merges"];
    assert_eq!(
        merges,
        &serde_json::json!([
            ["▁", "h"],
            ["l", "l"],
            ["ll", "o"],
            ["▁h", "e"],
            ["▁he", "llo"]
        ])
    );
    // SentencePiece adds bos by default (tokenizer.ggml.add_bos_token absent).
    assert_eq!(files.tokenizer_config["add_bos_token"], true);
    assert_eq!(files.tokenizer_config["bos_token"], "<s>");
    assert_eq!(files.tokenizer_config["unk_token"], "<unk>");

    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, serde_json::to_string(&files.tokenizer).unwrap()).unwrap();
    let tok = tokenizers::Tokenizer::from_file(&path).unwrap();

    // "hello wörld" → Metaspace (prepend at the start, spaces → ▁, no split):
    // "▁hello▁wörld". Symbols ▁ h e l l o ▁ w ö r l d; ö is not a piece, so byte fallback
    // gives its UTF-8 bytes C3 B6 → ids 3 + 0xC3 = 198 and 3 + 0xB6 = 185. Merging by rank:
    // ▁h, then ll, llo, ▁he, ▁hello; the second ▁ and "rld" have no applicable merge.
    // With bos: [1, ▁hello 271, ▁ 259, w 264, 198, 185, r 265, l 262, d 266].
    let enc = tok.encode("hello wörld", true).unwrap();
    assert_eq!(enc.get_ids(), &[1, 271, 259, 264, 198, 185, 265, 262, 266]);
    assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "hello wörld");

    // A user-defined token is matched in raw text; the text after it is not at offset 0, so
    // no ▁ is prepended there: "hello" → h e l l o → h, e, llo (no "h e" merge exists).
    let enc = tok.encode("hello<|user|>hello", false).unwrap();
    assert_eq!(enc.get_ids(), &[271, 272, 260, 261, 269]);
    // Special tokens in text are matched as themselves; "hello" after <s> is not at offset 0
    // either, so it is h, e, llo as above.
    let enc = tok.encode("<s>hello</s>", false).unwrap();
    assert_eq!(enc.get_ids(), &[1, 260, 261, 269, 2]);
}

#[test]
fn llama_vocabulary_needs_scores() {
    let dir = tempfile::tempdir().unwrap();
    let p = spm_gguf(dir.path());
    // Remove the scores key by rewriting the file without it.
    let f = GgufFile::open(&p).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata() {
        if k != "tokenizer.ggml.scores" {
            w.kv(k, v.clone());
        }
    }
    let q = dir.path().join("noscores.gguf");
    w.write(&q).unwrap();
    let err = build_tokenizer(&GgufFile::open(&q).unwrap()).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.scores"), "{err}");
}
