//! Chat templates: the Jinja program a Hugging Face tokenizer ships to turn a list of messages
//! into text, rendered with `minijinja` configured like transformers' own environment.
//!
//! transformers renders with `ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True)`, the `loopcontrols` extension, a `raise_exception(msg)` global and a
//! `tojson` filter that is Python's `json.dumps(ensure_ascii=False)`. The same settings are
//! applied here, and `minijinja-contrib`'s pycompat callback supplies the Python string, list and
//! dict methods templates call (`.strip()`, `.startswith()`, `.split()`, `.items()`, ...).
//! Variables passed: `messages`, `add_generation_prompt`, `bos_token`, `eos_token`.

use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde_json::Value as Json;

use super::error::DataError;

const NAME: &str = "chat_template";

/// A compiled chat template and where it came from.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The file it was read from: `tokenizer_config.json` or `chat_template.jinja`.
    path: PathBuf,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("path", &self.path)
            .finish()
    }
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`: separators `", "` and
/// `": "` without indent, `","` and `": "` with it (serde_json's compact form has no spaces,
/// which would change the rendered text of tool-calling templates).
fn py_json(v: &Json, indent: Option<usize>, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        Json::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                py_json(x, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Json::Object(o) if !o.is_empty() => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&Json::String(k.clone()).to_string());
                out.push_str(": ");
                py_json(x, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        // Scalars, `[]` and `{}`: serde_json writes these exactly as Python does (strings with
        // non-ASCII kept, as ensure_ascii=False does).
        other => out.push_str(&other.to_string()),
    }
}

fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    py_json(&json, indent, 0, &mut out);
    Ok(Value::from(out))
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// A minijinja error with its cause chain (the template line is in the detail).
fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

impl ChatTemplate {
    /// Compiles a template source. `path` is where it came from, for error messages.
    pub fn new(source: String, path: PathBuf) -> Result<Self, DataError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source)
            .map_err(|e| DataError::TemplateSyntax {
                path: path.clone(),
                message: describe(&e),
            })?;
        Ok(Self { env, path })
    }

    /// The template of a model directory: `chat_template` in `tokenizer_config.json` (a string,
    /// or a list of `{name, template}` of which `default` is used), else `chat_template.jinja`
    /// beside it (transformers ≥ 4.50 / 5 write it there). `tokenizer_config` is that file's
    /// parsed content (`Null` when absent).
    pub fn from_model_dir(dir: &Path, tokenizer_config: &Json) -> Result<Option<Self>, DataError> {
        let tc_path = dir.join("tokenizer_config.json");
        match tokenizer_config.get("chat_template") {
            Some(Json::String(s)) => return Self::new(s.clone(), tc_path).map(Some),
            Some(Json::Array(list)) => {
                let default = list.iter().find_map(|t| {
                    (t.get("name")?.as_str()? == "default")
                        .then(|| t.get("template")?.as_str())
                        .flatten()
                });
                return match default {
                    Some(s) => Self::new(s.to_owned(), tc_path).map(Some),
                    None => Err(DataError::Config {
                        path: tc_path,
                        message: "`chat_template` is a list without a template named `default`"
                            .into(),
                    }),
                };
            }
            Some(Json::Null) | None => {}
            Some(_) => {
                return Err(DataError::Config {
                    path: tc_path,
                    message: "`chat_template` must be a string or a list of {name, template}"
                        .into(),
                })
            }
        }
        let jinja = dir.join("chat_template.jinja");
        match std::fs::read_to_string(&jinja) {
            Ok(s) => Self::new(s, jinja).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(DataError::Io {
                path: jinja,
                source,
            }),
        }
    }

    /// Where the template was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renders `messages` (each a JSON object with at least `role` and `content`; other keys are
    /// passed through for templates that use them). The error is the template's message, e.g.
    /// what a `raise_exception` call said.
    pub fn render(
        &self,
        messages: &[Json],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, String> {
        let tmpl = self.env.get_template(NAME).map_err(|e| describe(&e))?;
        tmpl.render(minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        })
        .map_err(|e| describe(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_matches_python_json_dumps() {
        // Expected strings: Python 3.11 `json.dumps(v, ensure_ascii=False)` and `indent=2`.
        let v: Json = serde_json::from_str(r#"{"a": [1, 2.5, "é"], "b": {}, "c": null}"#).unwrap();
        let mut s = String::new();
        py_json(&v, None, 0, &mut s);
        assert_eq!(s, r#"{"a": [1, 2.5, "é"], "b": {}, "c": null}"#);
        let mut s = String::new();
        py_json(&v, Some(2), 0, &mut s);
        assert_eq!(
            s,
            "{\n  \"a\": [\n    1,\n    2.5,\n    \"é\"\n  ],\n  \"b\": {},\n  \"c\": null\n}"
        );
    }

    #[test]
    fn raise_exception_surfaces_its_message() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
                .into(),
            PathBuf::from("t.jinja"),
        )
        .unwrap();
        let m = vec![serde_json::json!({"role": "assistant", "content": "x"})];
        let err = t.render(&m, false, "", "").unwrap_err();
        assert!(err.contains("first must be user"), "{err}");
        let m = vec![serde_json::json!({"role": "user", "content": "x"})];
        assert_eq!(t.render(&m, false, "", "").unwrap(), "ok");
    }

    #[test]
    fn syntax_error_names_the_file() {
        let e = ChatTemplate::new(
            "{% for x in %}".into(),
            PathBuf::from("dir/chat_template.jinja"),
        )
        .unwrap_err();
        assert!(matches!(e, DataError::TemplateSyntax { .. }));
        assert!(e.to_string().contains("dir/chat_template.jinja"), "{e}");
    }
}
