//! Bad input gives a typed error naming the file and line (issue item 8, the data cases).

mod data_util;

use data_util::*;
use qlora_train::data::{
    DataConfig, DataError, DataWarning, Dataset, EvalSplit, Tokenizer, IGNORE_INDEX,
};

fn cfg() -> DataConfig {
    DataConfig {
        max_seq_len: 64,
        ..DataConfig::default()
    }
}

/// Loads `content` and returns the error, checking its message names `d.jsonl:<line>`.
fn err_at(content: &str, line: usize) -> DataError {
    err_with(content, line, &tiny_tokenizer(), &cfg())
}

fn err_with(content: &str, line: usize, tok: &Tokenizer, cfg: &DataConfig) -> DataError {
    let e = load_str(content, tok, cfg).expect_err("must be refused");
    let msg = e.to_string();
    assert!(msg.contains(&format!("d.jsonl:{line}:")), "{msg}");
    e
}

#[test]
fn missing_file() {
    let e = Dataset::load("/nonexistent/train.jsonl", &tiny_tokenizer(), &cfg()).unwrap_err();
    assert!(matches!(e, DataError::MissingFile { .. }), "{e:?}");
    assert!(e.to_string().contains("/nonexistent/train.jsonl"));
}

#[test]
fn empty_file() {
    for content in ["", "\n  \n\n"] {
        let e = load_str(content, &tiny_tokenizer(), &cfg()).unwrap_err();
        assert!(matches!(e, DataError::EmptyFile { .. }), "{e:?}");
        assert!(e.to_string().contains("d.jsonl"));
    }
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "e.txt", "\n\n");
    let e = Dataset::load(&p, &tiny_tokenizer(), &cfg()).unwrap_err();
    assert!(matches!(e, DataError::EmptyFile { .. }), "{e:?}");
}

#[test]
fn malformed_json_line() {
    let e = err_at("{\"text\": \"a\"}\n\n{\"text\": \"b\"\n", 3);
    assert!(
        matches!(e, DataError::MalformedJson { line: 3, .. }),
        "{e:?}"
    );
}

#[test]
fn non_object_line() {
    let e = err_at("{\"text\": \"a\"}\n[1, 2]\n", 2);
    assert!(matches!(e, DataError::WrongType { line: 2, .. }), "{e:?}");
    let e = err_at("\n[\n  {\"text\": \"a\"}\n]\n", 2);
    assert!(e.to_string().contains("JSON array; expected JSONL"), "{e}");
}

#[test]
fn record_with_no_known_field() {
    let e = err_at("{\"text\": \"a\"}\n{\"txt\": \"b\", \"id\": 4}\n", 2);
    match e {
        DataError::UnknownRecord { line: 2, keys, .. } => assert_eq!(keys, "txt, id"),
        e => panic!("{e:?}"),
    }
}

#[test]
fn prompt_without_completion() {
    let e = err_at("{\"prompt\": \"a\"}\n", 1);
    assert!(
        matches!(
            e,
            DataError::MissingField {
                present: "prompt",
                missing: "completion",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn wrong_field_types() {
    let cases = [
        ("{\"text\": 5}", "text"),
        ("{\"prompt\": \"a\", \"completion\": [\"b\"]}", "completion"),
        ("{\"messages\": \"hi\"}", "messages"),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": 3}]}",
            "messages[0].content",
        ),
        ("{\"input_ids\": [1, \"2\"]}", "input_ids[1]"),
        ("{\"input_ids\": [1, -2]}", "input_ids[1]"),
        ("{\"input_ids\": [1, 2], \"labels\": [1, 2.5]}", "labels[1]"),
    ];
    for (line, field) in cases {
        let e = err_at(&format!("{{\"text\": \"ok\"}}\n{line}\n"), 2);
        match e {
            DataError::WrongType {
                field: f, line: 2, ..
            } => assert_eq!(f, field, "{line}"),
            e => panic!("{line}: {e:?}"),
        }
    }
}

#[test]
fn empty_messages_list() {
    let e = err_at("{\"messages\": []}\n", 1);
    assert!(
        matches!(e, DataError::EmptyMessages { line: 1, .. }),
        "{e:?}"
    );
}

#[test]
fn message_without_role() {
    let e = err_at("{\"messages\": [{\"content\": \"x\"}]}\n", 1);
    assert!(
        matches!(e, DataError::InvalidRecord { line: 1, .. }),
        "{e:?}"
    );
}

#[test]
fn messages_need_a_chat_template() {
    let e = err_at(
        "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n",
        1,
    );
    assert!(matches!(e, DataError::NoChatTemplate { .. }), "{e:?}");
}

#[test]
fn pretokenized_ids_and_labels_are_checked() {
    for (line, what) in [
        ("{\"input_ids\": [1, 320]}", "input_ids[1] = 320"),
        ("{\"input_ids\": [1, 2], \"labels\": [2]}", "1 labels for 2"),
        (
            "{\"input_ids\": [1, 2], \"labels\": [-100, 999]}",
            "labels[1] = 999",
        ),
        ("{\"input_ids\": []}", "empty"),
    ] {
        let e = err_at(line, 1);
        assert!(matches!(e, DataError::InvalidRecord { .. }), "{e:?}");
        assert!(e.to_string().contains(what), "{e}");
    }
}

/// Longer than `max_seq_len`: truncated with a warning by default, refused in strict mode.
#[test]
fn too_long_sequence() {
    let long: Vec<String> = (0..100).map(|i| (i % 300 + 3).to_string()).collect();
    let line = format!(
        "{{\"text\": \"x\"}}\n{{\"input_ids\": [{}]}}\n",
        long.join(", ")
    );
    let tok = tiny_tokenizer();
    let ds = load_str(&line, &tok, &cfg()).unwrap();
    assert_eq!(ds.examples[1].input_ids.len(), 64);
    assert_eq!(ds.examples[1].labels.len(), 64);
    assert!(matches!(
        &ds.warnings[..],
        [DataWarning::Truncated {
            line: 2,
            len: 100,
            max: 64,
            ..
        }]
    ));
    assert!(ds.warnings[0].to_string().contains("d.jsonl:2:"));
    let strict = DataConfig {
        strict: true,
        ..cfg()
    };
    let e = err_with(&line, 2, &tok, &strict);
    assert!(
        matches!(
            e,
            DataError::TooLong {
                line: 2,
                len: 100,
                max: 64,
                ..
            }
        ),
        "{e:?}"
    );
}

/// `max_seq_len` beyond the model's positions is an invalid setting.
#[test]
fn max_seq_len_longer_than_model_positions() {
    let c = DataConfig {
        max_seq_len: 512,
        ..cfg()
    };
    // tiny-llama: max_position_embeddings 256.
    let e = c.validate(Some(256)).unwrap_err();
    assert!(
        matches!(
            e,
            DataError::InvalidConfig {
                key: "max_seq_len",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(c.validate(Some(512)).is_ok());
}

#[test]
fn invalid_config_values() {
    for (c, key) in [
        (
            DataConfig {
                max_seq_len: 0,
                ..cfg()
            },
            "max_seq_len",
        ),
        (
            DataConfig {
                batch_size: 0,
                ..cfg()
            },
            "batch_size",
        ),
        (
            DataConfig {
                eval: EvalSplit::Fraction(1.5),
                ..cfg()
            },
            "eval_fraction",
        ),
    ] {
        match c.validate(None).unwrap_err() {
            DataError::InvalidConfig { key: k, .. } => assert_eq!(k, key),
            e => panic!("{e:?}"),
        }
    }
}

/// A tokenizer with more ids than the model has embedding rows is refused; the tiny tokenizer
/// fits the tiny model exactly.
#[test]
fn tokenizer_vocab_larger_than_model() {
    let cfg_text = std::fs::read_to_string(repo_fixture("tiny-llama/config.json")).unwrap();
    let model_vocab = serde_json::from_str::<serde_json::Value>(&cfg_text).unwrap()["vocab_size"]
        .as_u64()
        .unwrap() as usize;
    tiny_tokenizer().check_fits_vocab(model_vocab).unwrap();
    // The ChatML fixture adds two tokens (ids 320, 321) to the same vocabulary.
    let chatml = Tokenizer::from_model_dir(data_fixture("chatml")).unwrap();
    let e = chatml.check_fits_vocab(model_vocab).unwrap_err();
    match &e {
        DataError::VocabMismatch {
            max_id: 321,
            model_vocab: 320,
            ..
        } => {}
        e => panic!("{e:?}"),
    }
    assert!(e.to_string().contains("chatml/tokenizer.json"), "{e}");
}

#[test]
fn missing_tokenizer_json() {
    let dir = tempfile::tempdir().unwrap();
    let e = Tokenizer::from_model_dir(dir.path()).unwrap_err();
    assert!(matches!(e, DataError::MissingFile { .. }), "{e:?}");
    assert!(e.to_string().contains("tokenizer.json"));
}

#[test]
fn corrupt_tokenizer_json() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "tokenizer.json", "{\"model\": 3}");
    let e = Tokenizer::from_model_dir(dir.path()).unwrap_err();
    assert!(matches!(e, DataError::Tokenizer { .. }), "{e:?}");
}

/// Copies the ChatML fixture with another template.
fn chatml_with_template(template: &str) -> (tempfile::TempDir, Tokenizer) {
    let dir = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "config.json"] {
        std::fs::copy(data_fixture("chatml").join(f), dir.path().join(f)).unwrap();
    }
    let tc = serde_json::json!({"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": template});
    write(dir.path(), "tokenizer_config.json", &tc.to_string());
    let tok = Tokenizer::from_model_dir(dir.path()).unwrap();
    (dir, tok)
}

const CONV: &str = "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}";

#[test]
fn template_raise_exception_names_the_line() {
    let (_d, tok) = chatml_with_template(
        "{% if messages[0]['role'] == 'user' %}{{ raise_exception('Conversations must start with a system message') }}{% endif %}",
    );
    let e = err_with(&format!("{CONV}\n{CONV}\n"), 1, &tok, &cfg());
    assert!(
        matches!(e, DataError::TemplateRender { line: 1, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("must start with a system"), "{e}");
}

#[test]
fn template_syntax_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        data_fixture("chatml/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    write(
        dir.path(),
        "tokenizer_config.json",
        "{\"chat_template\": \"{% for m in messages %}\"}",
    );
    let e = Tokenizer::from_model_dir(dir.path()).unwrap_err();
    assert!(matches!(e, DataError::TemplateSyntax { .. }), "{e:?}");
}

/// A template whose output for the first k messages is not a prefix of the whole render
/// cannot be masked by the incremental method, and says so (the same data trains with
/// `train_on_inputs`).
#[test]
fn template_that_is_not_prefix_stable() {
    let (_d, tok) = chatml_with_template(
        "{{ messages | length }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
    );
    let e = err_with(&format!("{CONV}\n"), 1, &tok, &cfg());
    assert!(
        matches!(e, DataError::TemplateNotIncremental { index: 1, .. }),
        "{e:?}"
    );
    let all = DataConfig {
        train_on_inputs: true,
        ..cfg()
    };
    assert_eq!(load_str(CONV, &tok, &all).unwrap().len(), 1);
}

/// Records with nothing to learn are dropped with a warning; if none is left, an error.
#[test]
fn records_without_trainable_tokens() {
    let tok = Tokenizer::from_model_dir(data_fixture("chatml")).unwrap();
    // Long enough for the ChatML render with its default system prompt (90 tokens).
    let cfg = || DataConfig {
        max_seq_len: 256,
        ..DataConfig::default()
    };
    let user_only = "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}";
    let ds = load_str(&format!("{CONV}\n{user_only}\n"), &tok, &cfg()).unwrap();
    assert_eq!(ds.len(), 1);
    assert_eq!(ds.examples[0].line, 1);
    assert!(matches!(
        &ds.warnings[..],
        [DataWarning::NoLabels { line: 2, .. }]
    ));
    let e = load_str(user_only, &tok, &cfg()).unwrap_err();
    assert!(matches!(e, DataError::NoExamples { .. }), "{e:?}");
    // Pre-tokenized labels that are all -100 are likewise dropped.
    let ds = load_str(
        "{\"input_ids\": [1, 5, 6], \"labels\": [-100, -100, -100]}\n{\"input_ids\": [1, 5]}\n",
        &tiny_tokenizer(),
        &cfg(),
    )
    .unwrap();
    assert_eq!(ds.len(), 1);
    assert_eq!(ds.examples[0].labels, vec![1, 5]);
    assert_ne!(ds.examples[0].labels[1], IGNORE_INDEX);
}

#[test]
fn invalid_utf8_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.jsonl");
    std::fs::write(&p, b"{\"text\": \"a\"}\n{\"text\": \"\xff\"}\n").unwrap();
    let e = Dataset::load(&p, &tiny_tokenizer(), &cfg()).unwrap_err();
    assert!(
        matches!(e, DataError::InvalidRecord { line: 2, .. }),
        "{e:?}"
    );
}

/// Explicit pre-tokenized labels are kept even with `train_on_inputs`.
#[test]
fn explicit_labels_win_over_train_on_inputs() {
    let c = DataConfig {
        train_on_inputs: true,
        ..cfg()
    };
    let ds = load_str(
        "{\"input_ids\": [1, 5, 6], \"labels\": [-100, -100, 6]}",
        &tiny_tokenizer(),
        &c,
    )
    .unwrap();
    assert_eq!(ds.examples[0].labels, vec![-100, -100, 6]);
}

/// Many warnings are summarised, a few listed.
#[test]
fn warning_summary_groups_many_warnings() {
    let long: Vec<String> = (0..100).map(|i| (i % 300 + 3).to_string()).collect();
    let rec = format!("{{\"input_ids\": [{}]}}\n", long.join(", "));
    let ds = load_str(&rec.repeat(10), &tiny_tokenizer(), &cfg()).unwrap();
    assert_eq!(ds.warnings.len(), 10);
    let s = ds.warning_summary();
    assert_eq!(s.len(), 1);
    assert!(
        s[0].ends_with("d.jsonl: 10 sequences truncated to max_seq_len (lines 1, 2, 3, ...)"),
        "{}",
        s[0]
    );
    let ds = load_str(&rec.repeat(2), &tiny_tokenizer(), &cfg()).unwrap();
    assert_eq!(ds.warning_summary().len(), 2);
    assert!(ds.warning_summary()[1].contains("d.jsonl:2: sequence of 100 tokens truncated"));
}
