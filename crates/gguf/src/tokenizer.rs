//! `tokenizer.json` (the format of the Hugging Face `tokenizers` crate) and
//! `tokenizer_config.json` from a GGUF vocabulary.
//!
//! GGUF keeps the vocabulary as parallel arrays (`tokenizer.ggml.tokens`, `.token_type`,
//! `.scores`, `.merges`) plus the special ids. Two vocabulary kinds are rebuilt:
//! - `gpt2`: byte-level BPE. The tokens are already in GPT-2's byte→unicode alphabet (`Ġ` for a
//!   space) and the merges are `"left right"` strings, so the BPE model is the arrays as they
//!   are. What the arrays do not carry is the pre-tokenizer: `tokenizer.ggml.pre` names it and
//!   [`gpt2_pre_tokenizer`] restores the one the original HF tokenizer used.
//! - `llama`: SentencePiece BPE (Llama 1/2, Mistral, TinyLlama): `▁` for spaces, `<0xNN>` byte
//!   tokens for byte fallback, and scores instead of merges. The merges are recovered as
//!   transformers' `SentencePieceExtractor` does (see [`spm_merges`]).
//!
//! Token types (llama.cpp `llama_token_type`): 1 normal, 2 unknown, 3 control, 4 user-defined,
//! 5 unused, 6 byte. Control and unknown tokens become special added tokens, user-defined ones
//! non-special added tokens, so the `tokenizers` crate matches them in raw text as llama.cpp
//! does.

use std::collections::HashMap;

use serde_json::{json, Map, Value as Json};

use crate::error::{GgufError, Result};
use crate::reader::GgufFile;

const TOKEN_UNKNOWN: i64 = 2;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// The two JSON files of a tokenizer.
#[derive(Clone, Debug)]
pub struct TokenizerFiles {
    /// `tokenizer.json`
    pub tokenizer: Json,
    /// `tokenizer_config.json`
    pub tokenizer_config: Json,
}

/// The `tokenizer.ggml.pre` names whose pre-tokenizer we know (for `gpt2` vocabularies).
pub const SUPPORTED_PRE: &[&str] = &["default", "gpt-2", "smollm", "starcoder", "llama-bpe"];

/// Llama 3's split regex, as in its HF `tokenizer.json` (and llama.cpp's `LLAMA3` pre-type).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// The HF pre-tokenizer of a `gpt2`-kind vocabulary, and whether its BPE sets `ignore_merges`.
///
/// - `gpt-2`/`default`: GPT-2's regex inside `ByteLevel` (llama.cpp's GPT2 pre-type uses the
///   same regex). A missing `tokenizer.ggml.pre` means `default` (llama.cpp does the same).
/// - `smollm`/`starcoder`: llama.cpp splits `\p{N}` first, then GPT-2's regex: in HF terms
///   `Digits(individual_digits)` then `ByteLevel`, which is what SmolLM's tokenizer.json has.
/// - `llama-bpe` (Llama 3): `Split` on [`LLAMA3_SPLIT`] (isolated) then `ByteLevel` without its
///   own regex; Llama 3's BPE has `ignore_merges: true` (a whole word in the vocabulary is taken
///   as is), as llama.cpp's `ignore_merges` for that pre-type.
pub fn gpt2_pre_tokenizer(pre: &str) -> Option<(Json, bool)> {
    Some(match pre {
        "default" | "gpt-2" => (byte_level(true), false),
        "smollm" | "starcoder" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]}),
            false,
        ),
        "llama-bpe" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
                byte_level(false),
            ]}),
            true,
        ),
        _ => return None,
    })
}

/// The merges of a SentencePiece BPE vocabulary, as transformers' `SentencePieceExtractor`
/// derives them: for every piece (in id order), every split into two pieces that are both in
/// the vocabulary (split at character boundaries), the splits of one piece ordered by
/// (left id, right id); then all merges stably sorted by the score of the merged piece,
/// highest first. `tokens[i]` has score `scores[i]`.
pub fn spm_merges(
    tokens: &[&str],
    scores: &[f32],
    vocab: &HashMap<&str, usize>,
) -> Vec<[String; 2]> {
    let mut merges: Vec<(usize, usize, f32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        let mut local = Vec::new();
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                local.push((li, ri, scores[id]));
            }
        }
        local.sort_by_key(|&(l, r, _)| (l, r));
        merges.extend(local);
    }
    // `sort_by` is stable; scores are finite (checked by the caller), so total_cmp orders them
    // as Python's sort does.
    merges.sort_by(|a, b| b.2.total_cmp(&a.2));
    merges
        .into_iter()
        .map(|(l, r, _)| [tokens[l].to_string(), tokens[r].to_string()])
        .collect()
}

fn added_token(id: usize, content: &str, special: bool) -> Json {
    json!({
        "id": id,
        "content": content,
        "single_word": false,
        "lstrip": false,
        "rstrip": false,
        "normalized": false,
        "special": special,
    })
}

/// A `TemplateProcessing` that adds bos and/or eos around each sequence; `None` when neither.
fn template(bos: Option<(&str, usize)>, eos: Option<(&str, usize)>) -> Option<Json> {
    if bos.is_none() && eos.is_none() {
        return None;
    }
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let seq = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
    let mut specials = Map::new();
    for (t, id) in bos.iter().chain(eos.iter()) {
        specials.insert(t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    // bos? $X eos? for one sequence; a pair is the two wrapped one after the other.
    let wrap = |part: &str, type_id: u32| {
        let mut out = Vec::new();
        if let Some((b, _)) = bos {
            out.push(special(b, type_id));
        }
        out.push(seq(part, type_id));
        if let Some((e, _)) = eos {
            out.push(special(e, type_id));
        }
        out
    };
    let single = wrap("A", 0);
    let mut pair = wrap("A", 0);
    pair.extend(wrap("B", 1));
    Some(
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}),
    )
}

/// Build `tokenizer.json` and `tokenizer_config.json` from the `tokenizer.*` metadata.
pub fn build_tokenizer(f: &GgufFile) -> Result<TokenizerFiles> {
    let path = f.path().to_path_buf();
    let terr = |reason: String| GgufError::Tokenizer {
        path: path.clone(),
        reason,
    };
    let model = f.str("tokenizer.ggml.model")?;
    let tokens =
        f.get_str_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| GgufError::MissingKey {
                path: path.clone(),
                key: "tokenizer.ggml.tokens".into(),
            })?;
    let n = tokens.len();
    let types = match f.get_int_array("tokenizer.ggml.token_type")? {
        Some(t) if t.len() == n => t,
        Some(t) => {
            return Err(GgufError::Metadata {
                path: path.clone(),
                key: "tokenizer.ggml.token_type".into(),
                reason: format!("{} entries for {n} tokens", t.len()),
            })
        }
        None => vec![1; n],
    };
    let id_key = |key: &str| -> Result<Option<usize>> {
        match f.get_u64(key)? {
            None => Ok(None),
            Some(v) if (v as usize) < n => Ok(Some(v as usize)),
            Some(v) => Err(GgufError::Metadata {
                path: path.clone(),
                key: key.to_string(),
                reason: format!("id {v} is outside the vocabulary of {n} tokens"),
            }),
        }
    };
    let bos = id_key("tokenizer.ggml.bos_token_id")?;
    let eos = id_key("tokenizer.ggml.eos_token_id")?;
    let unk = id_key("tokenizer.ggml.unknown_token_id")?;
    let pad = id_key("tokenizer.ggml.padding_token_id")?;
    // llama.cpp's defaults when the keys are absent: SentencePiece vocabularies add bos,
    // byte-level BPE ones do not; neither adds eos.
    let add_bos = f
        .get_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(model == "llama");
    let add_eos = f.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);

    // The BPE vocabulary is a map, so a string that appears twice can keep only one id; the
    // first one wins (the encoder can only ever produce one of them anyway).
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(n);
    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        if !ids.contains_key(t) {
            ids.insert(t, i);
            vocab.insert(t.to_string(), json!(i));
        }
    }

    let mut added = Vec::new();
    for (i, (t, ty)) in tokens.iter().zip(&types).enumerate() {
        match *ty {
            TOKEN_UNKNOWN | TOKEN_CONTROL => added.push(added_token(i, t, true)),
            TOKEN_USER_DEFINED => added.push(added_token(i, t, false)),
            _ => {}
        }
    }
    let bos_s = bos.map(|i| tokens[i]);
    let eos_s = eos.map(|i| tokens[i]);
    let post = template(
        bos.filter(|_| add_bos).map(|i| (tokens[i], i)),
        eos.filter(|_| add_eos).map(|i| (tokens[i], i)),
    );
    if add_bos && bos.is_none() || add_eos && eos.is_none() {
        return Err(terr(
            "add_bos_token/add_eos_token is set but the bos/eos id is missing".into(),
        ));
    }

    let tokenizer = match model {
        "gpt2" => {
            let pre = f.get_str("tokenizer.ggml.pre")?.unwrap_or("default");
            let (pre_tokenizer, ignore_merges) = gpt2_pre_tokenizer(pre).ok_or_else(|| {
                terr(format!(
                    "pre-tokenizer `tokenizer.ggml.pre = {pre:?}` is not supported (supported: {})",
                    SUPPORTED_PRE.join(", ")
                ))
            })?;
            let merges = f
                .get_str_array("tokenizer.ggml.merges")?
                .ok_or_else(|| GgufError::MissingKey {
                    path: path.clone(),
                    key: "tokenizer.ggml.merges".into(),
                })?;
            // llama.cpp splits a merge at the first space after the first character (a merge
            // of a space-like token such as " " would otherwise split at 0).
            let merges = merges
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let first = m.chars().next().map(char::len_utf8).unwrap_or(0);
                    match m[first..].find(' ') {
                        Some(p) => {
                            let (l, r) = (&m[..first + p], &m[first + p + 1..]);
                            // tokenizers refuses to load a merge whose parts are not tokens;
                            // say which one here instead.
                            if !ids.contains_key(l) || !ids.contains_key(r) {
                                return Err(GgufError::Metadata {
                                    path: path.clone(),
                                    key: "tokenizer.ggml.merges".into(),
                                    reason: format!("merge {i} ({m:?}) joins a string that is not a token"),
                                });
                            }
                            Ok(json!([l, r]))
                        }
                        None => Err(GgufError::Metadata {
                            path: path.clone(),
                            key: "tokenizer.ggml.merges".into(),
                            reason: format!("merge {i} ({m:?}) has no space separator"),
                        }),
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            // GPT-2's HF post-processor is ByteLevel (offsets only); special tokens, when the
            // model adds them, come from a TemplateProcessing after it.
            let byte_post =
                json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
            let post_processor = match post {
                None => byte_post,
                Some(t) => json!({"type": "Sequence", "processors": [byte_post, t]}),
            };
            json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added,
                "normalizer": null,
                "pre_tokenizer": pre_tokenizer,
                "post_processor": post_processor,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {
                    "type": "BPE",
                    "dropout": null,
                    "unk_token": null,
                    "continuing_subword_prefix": null,
                    "end_of_word_suffix": null,
                    "fuse_unk": false,
                    "byte_fallback": false,
                    "ignore_merges": ignore_merges,
                    "vocab": vocab,
                    "merges": merges,
                }
            })
        }
        "llama" => {
            let scores = f
                .get_f32_array("tokenizer.ggml.scores")?
                .ok_or_else(|| GgufError::MissingKey {
                    path: path.clone(),
                    key: "tokenizer.ggml.scores".into(),
                })?;
            if scores.len() != n {
                return Err(GgufError::Metadata {
                    path: path.clone(),
                    key: "tokenizer.ggml.scores".into(),
                    reason: format!("{} scores for {n} tokens", scores.len()),
                });
            }
            if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
                return Err(GgufError::Metadata {
                    path: path.clone(),
                    key: "tokenizer.ggml.scores".into(),
                    reason: format!("score {i} is not finite"),
                });
            }
            let merges = spm_merges(&tokens, &scores, &ids);
            // SentencePiece prepends "▁" to the text once (add_dummy_prefix); llama.cpp keeps
            // that choice in `add_space_prefix` (default true). The HF equivalent is Metaspace
            // with prepend_scheme "first" and no splitting, and a decoder that strips the one
            // leading space it produced.
            let prefix = f
                .get_bool("tokenizer.ggml.add_space_prefix")?
                .unwrap_or(true);
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if prefix {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added,
                "normalizer": null,
                "pre_tokenizer": {
                    "type": "Metaspace",
                    "replacement": "▁",
                    "prepend_scheme": if prefix { "first" } else { "never" },
                    "split": false,
                },
                "post_processor": post,
                "decoder": {"type": "Sequence", "decoders": decoders},
                "model": {
                    "type": "BPE",
                    "dropout": null,
                    "unk_token": unk.map(|i| tokens[i]),
                    "continuing_subword_prefix": null,
                    "end_of_word_suffix": null,
                    "fuse_unk": true,
                    "byte_fallback": true,
                    "ignore_merges": false,
                    "vocab": vocab,
                    "merges": merges,
                }
            })
        }
        other => {
            return Err(terr(format!(
                "vocabulary kind `tokenizer.ggml.model = {other:?}` is not supported (supported: gpt2, llama)"
            )))
        }
    };

    let mut config = Map::new();
    config.insert("add_bos_token".into(), json!(add_bos));
    config.insert("add_eos_token".into(), json!(add_eos));
    config.insert("bos_token".into(), json!(bos_s));
    config.insert("eos_token".into(), json!(eos_s));
    config.insert("pad_token".into(), json!(pad.map(|i| tokens[i])));
    config.insert("unk_token".into(), json!(unk.map(|i| tokens[i])));
    if let Some(t) = f.get_str("tokenizer.chat_template")? {
        config.insert("chat_template".into(), json!(t));
    }
    config.insert("clean_up_tokenization_spaces".into(), json!(false));
    if let Some(ctx) = f.get_u64("llama.context_length")? {
        config.insert("model_max_length".into(), json!(ctx));
    }
    config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    Ok(TokenizerFiles {
        tokenizer,
        tokenizer_config: Json::Object(config),
    })
}
