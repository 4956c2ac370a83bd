//! The real-model demo's bundled files, checked without the model (CI has no network):
//! `examples/smollm2-demo.toml` loads and validates and points at the bundled data, and the
//! pirate dataset (`examples/data/pirate-{train,eval}.jsonl`) renders through SmolLM2's chat
//! template with every record valid and the counts the README states.
//!
//! The template comes from `crates/train/tests/fixtures/data/chatml`, which holds
//! SmolLM2-135M-Instruct's `chat_template` verbatim (the one `qlora quantize` rebuilds from the
//! GGUF metadata) on the tiny fixture's byte-level BPE vocabulary: the token ids differ from the
//! real tokenizer's, the rendered text and the assistant-only label spans do not.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use qlora_train::data::{Dataset, Tokenizer, IGNORE_INDEX};
use qlora_train::trainer::TrainConfig;
use serde_json::Value;

/// Counts the README's walkthrough states ("316 training examples, 39 held out").
const TRAIN_RECORDS: usize = 316;
const EVAL_RECORDS: usize = 39;
/// The issue asks for a small file.
const MAX_BYTES: u64 = 200 * 1024;
/// SmolLM2's default system turn, rendered when a conversation has no system message.
const DEFAULT_SYSTEM: &str =
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn demo_config() -> TrainConfig {
    let path = repo().join("examples/smollm2-demo.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn chatml_tokenizer() -> Tokenizer {
    Tokenizer::from_model_dir(repo().join("crates/train/tests/fixtures/data/chatml")).unwrap()
}

/// (user, assistant) of every record, read as plain JSON (independently of the data pipeline).
fn turns(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}:{}: {e}", path.display(), i + 1));
            let m = v["messages"]
                .as_array()
                .unwrap_or_else(|| panic!("{}:{}: no `messages` list", path.display(), i + 1));
            assert_eq!(m.len(), 2, "{}:{}", path.display(), i + 1);
            assert_eq!(m[0]["role"], "user", "{}:{}", path.display(), i + 1);
            assert_eq!(m[1]["role"], "assistant", "{}:{}", path.display(), i + 1);
            let s = |j: usize| m[j]["content"].as_str().unwrap().to_string();
            (s(0), s(1))
        })
        .collect()
}

#[test]
fn demo_config_validates_and_names_the_bundled_data() {
    let c = demo_config();
    c.validate().unwrap();
    assert_eq!(
        c.model.as_deref(),
        Some(Path::new("models/smollm2-135m-instruct"))
    );
    assert!(c.output_dir.starts_with("runs"), "{:?}", c.output_dir);
    for p in [c.data.as_ref().unwrap(), c.eval_data.as_ref().unwrap()] {
        let full = repo().join(p);
        let len = std::fs::metadata(&full)
            .unwrap_or_else(|e| panic!("{}: {e}", full.display()))
            .len();
        assert!(len < MAX_BYTES, "{}: {len} bytes", full.display());
    }
    // The model's positions (8192) are not the limit; the demo's own max_seq_len is.
    assert!(c.max_seq_len > 0 && c.max_seq_len <= 512);
}

#[test]
fn pirate_data_renders_through_the_smollm2_template() {
    let c = demo_config();
    let tok = chatml_tokenizer();
    // Strict: a record that does not fit is an error, not a silent truncation. The fixture's
    // 320-id vocabulary has few merges, so its sequences are about three times as long as the
    // real tokenizer's: the demo's max_seq_len is checked on the real model (README), here
    // only that nothing is cut.
    let cfg = qlora_train::data::DataConfig {
        strict: true,
        max_seq_len: 1024,
        ..c.data_config(None)
    };
    for (path, n) in [
        (c.data.unwrap(), TRAIN_RECORDS),
        (c.eval_data.unwrap(), EVAL_RECORDS),
    ] {
        let path = repo().join(path);
        let want = turns(&path);
        assert_eq!(want.len(), n, "{}", path.display());
        let ds = Dataset::load(&path, &tok, &cfg).unwrap();
        assert_eq!(ds.len(), n, "{}", path.display());
        assert!(ds.warnings.is_empty(), "{:?}", ds.warnings);
        for (e, (user, assistant)) in ds.examples.iter().zip(&want) {
            let at = format!("{}:{}", path.display(), e.line);
            let text = tok.decode(&e.input_ids, false).unwrap();
            assert_eq!(
                text,
                format!(
                    "{DEFAULT_SYSTEM}<|im_start|>user\n{user}<|im_end|>\n\
                     <|im_start|>assistant\n{assistant}<|im_end|>\n"
                ),
                "{at}"
            );
            // Loss on the reply and its end token only: one contiguous labelled span.
            let first = e.labels.iter().position(|&l| l != IGNORE_INDEX).unwrap();
            let last = e.labels.iter().rposition(|&l| l != IGNORE_INDEX).unwrap();
            assert!(
                e.labels[first..=last].iter().all(|&l| l != IGNORE_INDEX),
                "{at}"
            );
            let ids: Vec<u32> = e.labels[first..=last].iter().map(|&l| l as u32).collect();
            assert_eq!(ids, e.input_ids[first..=last], "{at}");
            assert_eq!(
                tok.decode(&ids, false).unwrap(),
                format!("{assistant}<|im_end|>"),
                "{at}"
            );
        }
    }
}

/// One recognisable style: every reply speaks pirate, and stays short (1-3 sentences).
#[test]
fn every_reply_is_a_short_pirate_answer() {
    let c = demo_config();
    let markers = [
        "arr",
        "ahoy",
        "matey",
        "me hearty",
        "shiver me timbers",
        "aye",
    ];
    for p in [c.data.unwrap(), c.eval_data.unwrap()] {
        let path = repo().join(p);
        for (i, (user, reply)) in turns(&path).iter().enumerate() {
            let lower = reply.to_lowercase();
            assert!(
                markers.iter().any(|m| lower.contains(m)),
                "{}:{}: not in pirate speak: {reply}",
                path.display(),
                i + 1
            );
            // Sentences of four words or more: an interjection ("Arr!", "Careful, matey!")
            // or an abbreviation ("E. coli") does not count as one.
            let sentences = reply
                .split_inclusive(['.', '!', '?'])
                .filter(|s| s.split_whitespace().count() >= 4)
                .count();
            assert!(
                (1..=3).contains(&sentences) && reply.len() < 300,
                "{}:{}: {sentences} sentences: {reply}",
                path.display(),
                i + 1
            );
            assert!(user.ends_with('?'), "{}:{}: {user}", path.display(), i + 1);
        }
    }
}

/// No question is asked twice, none of the eval questions is in the training data, and the
/// README's before/after prompts (`examples/data/pirate-prompts.txt`) are in neither.
#[test]
fn eval_and_generation_prompts_are_held_out() {
    let c = demo_config();
    let norm = |s: &str| s.trim().to_lowercase();
    let train: Vec<String> = turns(&repo().join(c.data.unwrap()))
        .iter()
        .map(|t| norm(&t.0))
        .collect();
    let eval: Vec<String> = turns(&repo().join(c.eval_data.unwrap()))
        .iter()
        .map(|t| norm(&t.0))
        .collect();
    let mut seen = HashSet::new();
    for q in train.iter().chain(&eval) {
        assert!(seen.insert(q.clone()), "asked twice: {q}");
    }
    let prompts = std::fs::read_to_string(repo().join("examples/data/pirate-prompts.txt")).unwrap();
    let prompts: Vec<&str> = prompts.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(prompts.len() >= 3);
    for p in prompts {
        assert!(!seen.contains(&norm(p)), "prompt in the data: {p}");
    }
}
