//! Reading data files into typed records, each tagged with the line it came from.
//!
//! JSONL: one JSON object per line; blank lines are skipped (their numbers still count). The
//! record kind is decided by its keys, in this order: `input_ids` (pre-tokenized), `messages`,
//! `prompt` + `completion` (strings, or both lists of messages), `text`. Other keys (`id`, `source`, ...) are ignored.
//!
//! `.txt`: see [`TextMode`](super::TextMode).

use std::path::Path;

use serde_json::{Map, Value as Json};

use super::error::DataError;

/// One training record as written by the user.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// `{"text": ...}`: trained on every token.
    Text(String),
    /// `{"prompt": ..., "completion": ...}`: the completion is concatenated directly after the
    /// prompt (no separator is inserted); loss on the completion only by default.
    PromptCompletion { prompt: String, completion: String },
    /// `{"messages": [{"role", "content"}, ...]}`: rendered with the chat template. Each
    /// message is kept whole so template-specific keys reach the template.
    Messages(Vec<Json>),
    /// TRL's conversational prompt/completion, `{"prompt": [messages], "completion":
    /// [messages]}`: rendered as one conversation; only the assistant turns of `completion`
    /// are trained on by default.
    ChatPromptCompletion {
        prompt: Vec<Json>,
        completion: Vec<Json>,
    },
    /// `{"input_ids": [...], "labels": [...]?}`: used as is; `labels` default to `input_ids`.
    Tokens {
        input_ids: Vec<u32>,
        labels: Option<Vec<i64>>,
    },
}

/// A record and its 1-based line number in `path`.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceRecord {
    pub line: usize,
    pub record: Record,
}

fn type_name(v: &Json) -> String {
    match v {
        Json::Null => "null".into(),
        Json::Bool(_) => "a boolean".into(),
        Json::Number(_) => "a number".into(),
        Json::String(_) => "a string".into(),
        Json::Array(_) => "a list".into(),
        Json::Object(_) => "an object".into(),
    }
}

pub(crate) fn read_file(path: &Path) -> Result<String, DataError> {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|e| {
            // Report the line of the first invalid byte.
            let at = e.utf8_error().valid_up_to();
            let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
            DataError::InvalidRecord {
                path: path.to_owned(),
                line,
                message: "the file is not valid UTF-8".into(),
            }
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(DataError::MissingFile {
            path: path.to_owned(),
        }),
        Err(source) => Err(DataError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

struct Ctx<'a> {
    path: &'a Path,
    line: usize,
}

impl Ctx<'_> {
    fn wrong(&self, field: impl Into<String>, expected: &'static str, v: &Json) -> DataError {
        DataError::WrongType {
            path: self.path.to_owned(),
            line: self.line,
            field: field.into(),
            expected,
            found: type_name(v),
        }
    }

    fn string(&self, obj: &Map<String, Json>, key: &str) -> Result<String, DataError> {
        match &obj[key] {
            Json::String(s) => Ok(s.clone()),
            v => Err(self.wrong(key, "a string", v)),
        }
    }

    fn ids(&self, obj: &Map<String, Json>, key: &str) -> Result<Vec<u32>, DataError> {
        let Json::Array(a) = &obj[key] else {
            return Err(self.wrong(key, "a list of token ids", &obj[key]));
        };
        a.iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .ok_or_else(|| self.wrong(format!("{key}[{i}]"), "an integer in 0..2^32", v))
            })
            .collect()
    }

    fn labels(&self, obj: &Map<String, Json>) -> Result<Vec<i64>, DataError> {
        let Json::Array(a) = &obj["labels"] else {
            return Err(self.wrong("labels", "a list of token ids", &obj["labels"]));
        };
        a.iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_i64()
                    .ok_or_else(|| self.wrong(format!("labels[{i}]"), "an integer", v))
            })
            .collect()
    }

    /// A list of `{role, content}` objects under `key`; `empty` is the error for `[]`.
    fn message_list(&self, obj: &Map<String, Json>, key: &str) -> Result<Vec<Json>, DataError> {
        let Json::Array(list) = &obj[key] else {
            return Err(self.wrong(key, "a list of {role, content}", &obj[key]));
        };
        if list.is_empty() {
            return Err(if key == "messages" {
                DataError::EmptyMessages {
                    path: self.path.to_owned(),
                    line: self.line,
                }
            } else {
                DataError::InvalidRecord {
                    path: self.path.to_owned(),
                    line: self.line,
                    message: format!("`{key}` is an empty list of messages"),
                }
            });
        }
        for (i, m) in list.iter().enumerate() {
            let Json::Object(o) = m else {
                return Err(self.wrong(format!("{key}[{i}]"), "an object", m));
            };
            for field in ["role", "content"] {
                match o.get(field) {
                    Some(Json::String(_)) => {}
                    Some(v) => {
                        return Err(self.wrong(format!("{key}[{i}].{field}"), "a string", v))
                    }
                    None => {
                        return Err(DataError::InvalidRecord {
                            path: self.path.to_owned(),
                            line: self.line,
                            message: format!("{key}[{i}] has no `{field}`"),
                        })
                    }
                }
            }
        }
        Ok(list.clone())
    }

    fn record(&self, obj: &Map<String, Json>) -> Result<Record, DataError> {
        if obj.contains_key("input_ids") {
            let input_ids = self.ids(obj, "input_ids")?;
            let labels = match obj.get("labels") {
                None | Some(Json::Null) => None,
                Some(_) => Some(self.labels(obj)?),
            };
            return Ok(Record::Tokens { input_ids, labels });
        }
        if obj.contains_key("messages") {
            return Ok(Record::Messages(self.message_list(obj, "messages")?));
        }
        match (obj.contains_key("prompt"), obj.contains_key("completion")) {
            (true, true) if obj["prompt"].is_array() && obj["completion"].is_array() => {
                return Ok(Record::ChatPromptCompletion {
                    prompt: self.message_list(obj, "prompt")?,
                    completion: self.message_list(obj, "completion")?,
                })
            }
            (true, true) => {
                return Ok(Record::PromptCompletion {
                    prompt: self.string(obj, "prompt")?,
                    completion: self.string(obj, "completion")?,
                })
            }
            (true, false) | (false, true) => {
                let (present, missing) = if obj.contains_key("prompt") {
                    ("prompt", "completion")
                } else {
                    ("completion", "prompt")
                };
                return Err(DataError::MissingField {
                    path: self.path.to_owned(),
                    line: self.line,
                    present,
                    missing,
                });
            }
            (false, false) => {}
        }
        if obj.contains_key("text") {
            return Ok(Record::Text(self.string(obj, "text")?));
        }
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        Err(DataError::UnknownRecord {
            path: self.path.to_owned(),
            line: self.line,
            keys: if keys.is_empty() {
                "no keys".into()
            } else {
                keys.join(", ")
            },
        })
    }
}

/// Parses JSONL `content` read from `path`.
pub fn parse_jsonl(path: &Path, content: &str) -> Result<Vec<SourceRecord>, DataError> {
    let mut out = Vec::new();
    for (i, text) in content.lines().enumerate() {
        let ctx = Ctx { path, line: i + 1 };
        // A UTF-8 byte-order mark at the start of the file is an editor artefact, not data.
        let text = if i == 0 {
            text.trim_start_matches('\u{feff}')
        } else {
            text
        };
        if text.trim().is_empty() {
            continue;
        }
        // A JSON array file is a common mistake for JSONL: say so instead of a parse error.
        if out.is_empty() && text.trim_start().starts_with('[') {
            return Err(DataError::InvalidRecord {
                path: path.to_owned(),
                line: ctx.line,
                message: "the file is a JSON array; expected JSONL (one JSON object per line)"
                    .into(),
            });
        }
        let value: Json = serde_json::from_str(text).map_err(|e| DataError::MalformedJson {
            path: path.to_owned(),
            line: ctx.line,
            message: e.to_string(),
        })?;
        let Json::Object(obj) = &value else {
            return Err(DataError::WrongType {
                path: path.to_owned(),
                line: ctx.line,
                field: "record".into(),
                expected: "a JSON object",
                found: type_name(&value),
            });
        };
        out.push(SourceRecord {
            line: ctx.line,
            record: ctx.record(obj)?,
        });
    }
    if out.is_empty() {
        return Err(DataError::EmptyFile {
            path: path.to_owned(),
        });
    }
    Ok(out)
}

/// Splits `.txt` content into paragraphs separated by one or more blank (whitespace-only)
/// lines; each paragraph keeps its inner newlines and is tagged with its first line.
pub fn parse_paragraphs(path: &Path, content: &str) -> Result<Vec<SourceRecord>, DataError> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, text) in content.lines().enumerate() {
        if text.trim().is_empty() {
            if let Some((line, p)) = current.take() {
                out.push(SourceRecord {
                    line,
                    record: Record::Text(p),
                });
            }
            continue;
        }
        match &mut current {
            Some((_, p)) => {
                p.push('\n');
                p.push_str(text);
            }
            None => current = Some((i + 1, text.to_owned())),
        }
    }
    if let Some((line, p)) = current {
        out.push(SourceRecord {
            line,
            record: Record::Text(p),
        });
    }
    if out.is_empty() {
        return Err(DataError::EmptyFile {
            path: path.to_owned(),
        });
    }
    Ok(out)
}

/// True for paths read as plain text rather than JSONL.
pub fn is_plain_text(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("txt"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("d.jsonl")
    }

    #[test]
    fn kinds_are_detected_with_line_numbers() {
        let src = "{\"text\": \"a\"}\n\n{\"prompt\": \"p\", \"completion\": \"c\", \"id\": 3}\n\
                   {\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n\
                   {\"input_ids\": [1, 2], \"labels\": [-100, 2]}\n";
        let r = parse_jsonl(p(), src).unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!(r[0].line, 1);
        assert_eq!(r[0].record, Record::Text("a".into()));
        assert_eq!(r[1].line, 3);
        assert!(matches!(r[1].record, Record::PromptCompletion { .. }));
        assert_eq!(r[2].line, 4);
        assert!(matches!(r[2].record, Record::Messages(ref m) if m.len() == 1));
        assert_eq!(
            r[3].record,
            Record::Tokens {
                input_ids: vec![1, 2],
                labels: Some(vec![-100, 2])
            }
        );
    }

    #[test]
    fn paragraphs_split_on_blank_lines() {
        let r = parse_paragraphs(Path::new("a.txt"), "one\ntwo\n\n  \nthree\n").unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].line, &r[0].record),
            (1, &Record::Text("one\ntwo".into()))
        );
        assert_eq!(
            (r[1].line, &r[1].record),
            (5, &Record::Text("three".into()))
        );
    }
}
