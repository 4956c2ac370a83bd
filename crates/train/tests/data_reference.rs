//! Tokenization, chat templates and label masks against the Python reference stack.
//!
//! Expected values come from `tests/fixtures/data/reference.json`, written by
//! `make_reference.py` with tokenizers 0.23.2, transformers 5.18.0 and jinja2 3.1.6: ids from
//! `AutoTokenizer`, chat text from `apply_chat_template`, assistant masks from transformers'
//! `return_assistant_tokens_mask` on the same template with `{% generation %}` markers, and
//! prompt/completion masks by TRL's method (tokenize the prompt alone for the masked prefix).

mod data_util;

use data_util::*;
use qlora_train::data::{ChatTemplate, DataConfig, Dataset, Tokenizer};
use serde_json::Value as Json;

fn reference() -> Json {
    let text = std::fs::read_to_string(data_fixture("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn tokenizer_for(model: &str) -> Tokenizer {
    match model {
        "tiny-llama" => tiny_tokenizer(),
        m => Tokenizer::from_model_dir(data_fixture(m)).unwrap(),
    }
}

fn ints<T: TryFrom<i64>>(v: &Json) -> Vec<T>
where
    T::Error: std::fmt::Debug,
{
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| T::try_from(x.as_i64().unwrap()).unwrap())
        .collect()
}

fn cfg() -> DataConfig {
    DataConfig {
        max_seq_len: 256,
        ..DataConfig::default()
    }
}

/// Every reference record loads to exactly the reference ids and labels.
#[test]
fn records_match_transformers_and_trl() {
    let r = reference();
    let cases = r["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    for case in cases {
        let tok = tokenizer_for(case["model"].as_str().unwrap());
        let line = serde_json::to_string(&case["record"]).unwrap();
        let ds = load_str(&line, &tok, &cfg()).unwrap();
        assert_eq!(ds.len(), 1);
        let ex = &ds.examples[0];
        assert_eq!(
            ex.input_ids,
            ints::<u32>(&case["input_ids"]),
            "ids of {line}"
        );
        assert_eq!(ex.labels, ints::<i64>(&case["labels"]), "labels of {line}");
        assert!(ds.warnings.is_empty());
    }
}

/// `train_on_inputs` labels every token, whatever the record kind.
#[test]
fn train_on_inputs_labels_everything() {
    let r = reference();
    for case in r["cases"].as_array().unwrap() {
        let tok = tokenizer_for(case["model"].as_str().unwrap());
        let line = serde_json::to_string(&case["record"]).unwrap();
        let c = DataConfig {
            train_on_inputs: true,
            ..cfg()
        };
        let ex = &load_str(&line, &tok, &c).unwrap().examples[0];
        let want: Vec<i64> = ints::<i64>(&case["input_ids"]);
        assert_eq!(ex.labels, want, "{line}");
    }
}

/// The rendered text equals `apply_chat_template(tokenize=False)`, with and without the
/// generation prompt, for the ChatML template (from tokenizer_config.json) and the Llama-3
/// template (from chat_template.jinja).
#[test]
fn chat_templates_render_like_transformers() {
    let r = reference();
    let mut seen = 0;
    for case in r["cases"].as_array().unwrap() {
        let Some(text) = case.get("text") else {
            continue;
        };
        let tok = tokenizer_for(case["model"].as_str().unwrap());
        let t = tok.chat_template().expect("fixture has a template");
        let msgs = case["record"]["messages"].as_array().unwrap();
        let bos = tok.bos_token().unwrap();
        let eos = tok.eos_token().unwrap();
        assert_eq!(
            t.render(msgs, false, bos, eos).unwrap(),
            text.as_str().unwrap()
        );
        assert_eq!(
            t.render(msgs, true, bos, eos).unwrap(),
            case["generation_text"].as_str().unwrap()
        );
        seen += 1;
    }
    assert_eq!(seen, 4);
    let chatml = Tokenizer::from_model_dir(data_fixture("chatml")).unwrap();
    assert!(chatml
        .chat_template()
        .unwrap()
        .path()
        .ends_with("tokenizer_config.json"));
    let llama3 = Tokenizer::from_model_dir(data_fixture("llama3")).unwrap();
    assert!(llama3
        .chat_template()
        .unwrap()
        .path()
        .ends_with("chat_template.jinja"));
}

/// Python string/dict methods, namespace, loop controls and `tojson` render exactly as in
/// transformers' Jinja environment.
#[test]
fn pycompat_template_matches_python_jinja() {
    let r = reference();
    let p = &r["pycompat"];
    let t = ChatTemplate::new(
        p["template"].as_str().unwrap().to_owned(),
        "pycompat.jinja".into(),
    )
    .unwrap();
    let got = t
        .render(p["messages"].as_array().unwrap(), true, "<s>", "</s>")
        .unwrap();
    assert_eq!(got, p["text"].as_str().unwrap());
}

/// The tokenizer reproduces the ids transformers used for the `base_text_f32` logits fixture,
/// and reads the special tokens of the tiny model.
#[test]
fn tiny_tokenizer_matches_logits_fixture() {
    let tok = tiny_tokenizer();
    let bytes = std::fs::read(repo_fixture("logits/base_text_f32.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor("input_ids").unwrap();
    let want: Vec<u32> = ids
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect();
    let got = tok.encode("Quantize the model weight.", true).unwrap();
    assert_eq!(got.ids, want);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.pad_id(), 2);
    assert_eq!(tok.id_bound(), 320);
    assert!(tok.chat_template().is_none());
    assert_eq!(
        tok.decode(&got.ids, true).unwrap(),
        "Quantize the model weight."
    );
}

/// A `{"text"}` record and the same text as a `.txt` paragraph give the same example.
#[test]
fn txt_paragraph_equals_text_record() {
    let tok = tiny_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "a.txt",
        "Quantize the model weight.\n\n\nRust are scale batch to as query 2334,\nIn are sequence attention rotary 9031?\n",
    );
    let ds = Dataset::load(&p, &tok, &cfg()).unwrap();
    let r = reference();
    let texts: Vec<&Json> = r["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["record"].get("text").is_some())
        .collect();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.examples[0].line, 1);
    assert_eq!(ds.examples[1].line, 4);
    for (ex, case) in ds.examples.iter().zip(texts) {
        assert_eq!(ex.input_ids, ints::<u32>(&case["input_ids"]));
    }
}

/// The generation prompt for `generate --chat`, and the stop ids read from the model files.
#[test]
fn chat_prompt_and_stop_ids() {
    let r = reference();
    let case = &r["cases"][2];
    assert_eq!(case["model"], "llama3");
    let tok = Tokenizer::from_model_dir(data_fixture("llama3")).unwrap();
    let msgs = case["record"]["messages"].as_array().unwrap();
    assert_eq!(
        tok.apply_chat_template(msgs, true).unwrap(),
        case["generation_text"].as_str().unwrap()
    );
    // eos <|eot_id|> (323) from tokenizer_config.json, then config.json's eos_token_id 2.
    assert_eq!(tok.stop_ids(), &[323, 2]);
    assert_eq!(tiny_tokenizer().stop_ids(), &[2]);
    let e = tiny_tokenizer()
        .apply_chat_template(msgs, true)
        .unwrap_err();
    assert!(e.to_string().contains("no chat template"), "{e}");
}

/// A token that spans the prompt/completion seam (the prompt ends with a space that BPE merges
/// into the completion's first word) is trained on: masked tokens decode to exactly the prompt
/// without that space, labelled ones to the completion with the space and eos.
#[test]
fn seam_token_counts_as_completion() {
    let tok = tiny_tokenizer();
    let ds = load_str(
        r#"{"prompt": "Scale the ", "completion": "loss rate."}"#,
        &tok,
        &cfg(),
    )
    .unwrap();
    let ex = &ds.examples[0];
    let pick = |trained: bool| -> Vec<u32> {
        ex.input_ids
            .iter()
            .zip(&ex.labels)
            .filter(|&(_, &l)| (l != -100) == trained)
            .map(|(&i, _)| i)
            .collect()
    };
    assert_eq!(tok.decode(&pick(false), false).unwrap(), "<s>Scale the");
    assert_eq!(tok.decode(&pick(true), false).unwrap(), " loss rate.</s>");
    assert!(ex
        .input_ids
        .iter()
        .zip(&ex.labels)
        .all(|(&i, &l)| l == -100 || l == i as i64));
}

/// TRL's conversational prompt/completion trains on the completion's assistant turn only: the
/// same ids as the whole conversation as `messages`, and of the two labelled runs that
/// transformers' mask gives there, only the second.
#[test]
fn conversational_prompt_completion() {
    let r = reference();
    let case = &r["cases"][0];
    assert_eq!(case["model"], "chatml");
    let msgs = case["record"]["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 5);
    let rec = serde_json::json!({"prompt": msgs[..4], "completion": msgs[4..]});
    let tok = Tokenizer::from_model_dir(data_fixture("chatml")).unwrap();
    let ds = load_str(&rec.to_string(), &tok, &cfg()).unwrap();
    let ex = &ds.examples[0];
    let want_ids = ints::<u32>(&case["input_ids"]);
    assert_eq!(ex.input_ids, want_ids);
    let full = ints::<i64>(&case["labels"]);
    // Start of the second labelled run.
    let second = (1..full.len())
        .rev()
        .find(|&t| full[t] != -100 && full[t - 1] == -100)
        .unwrap();
    assert!(
        full[..second].iter().any(|&l| l != -100),
        "two runs expected"
    );
    let want: Vec<i64> = full
        .iter()
        .enumerate()
        .map(|(t, &l)| if t < second { -100 } else { l })
        .collect();
    assert_eq!(ex.labels, want);
    let e = load_str(
        &serde_json::json!({"prompt": [], "completion": msgs[4..]}).to_string(),
        &tok,
        &cfg(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("`prompt` is an empty list"), "{e}");
}
