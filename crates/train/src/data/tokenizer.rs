//! The model's tokenizer: `tokenizer.json` through the `tokenizers` crate, the special tokens
//! from `tokenizer_config.json` (falling back to `config.json`), and the chat template.

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use super::error::DataError;
use super::template::ChatTemplate;

/// Token ids of one text with the byte span of each token in that text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// Per token, the half-open byte range `[start, end)` of the text it came from. Special
    /// tokens added by the post-processor (e.g. a leading `<s>`) have the empty span `(0, 0)`.
    /// Byte-level BPE with `trim_offsets` leaves the leading space out of `Ġword`'s span.
    pub offsets: Vec<(usize, usize)>,
}

/// A loaded tokenizer with the special tokens the pipeline needs.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The model directory it was loaded from (named in errors).
    dir: PathBuf,
    bos: Option<(String, u32)>,
    eos: Option<(String, u32)>,
    pad_id: u32,
    /// Ids that end generation: eos plus every `eos_token_id` listed in config.json and
    /// generation_config.json (Llama 3.1 lists `<|end_of_text|>`, `<|eom_id|>`, `<|eot_id|>`).
    stop_ids: Vec<u32>,
    chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("dir", &self.dir)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad_id", &self.pad_id)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

fn read_json(path: &Path) -> Result<Option<Json>, DataError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(DataError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| DataError::Config {
            path: path.to_owned(),
            message: format!("invalid JSON: {e}"),
        })
}

/// A special token in `tokenizer_config.json`: a plain string, or the serialized `AddedToken`
/// object `{"__type": "AddedToken", "content": "<s>", ...}` older transformers wrote.
fn token_string(cfg: &Json, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// `config.json`'s `bos_token_id` etc.: an integer, or a list (Llama 3.1 lists several eos ids;
/// the first is the one appended to training sequences).
fn config_id(cfg: &Json, key: &str) -> Option<u32> {
    match cfg.get(key)? {
        Json::Number(n) => n.as_u64().and_then(|v| u32::try_from(v).ok()),
        Json::Array(a) => a.first()?.as_u64().and_then(|v| u32::try_from(v).ok()),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`, the special tokens and the chat template (if any) of a Hugging
    /// Face model directory.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self, DataError> {
        let dir = dir.as_ref().to_owned();
        let tok_path = dir.join("tokenizer.json");
        let bytes = match std::fs::read(&tok_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DataError::MissingFile { path: tok_path })
            }
            Err(source) => {
                return Err(DataError::Io {
                    path: tok_path,
                    source,
                })
            }
        };
        let inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| DataError::Tokenizer {
                path: tok_path.clone(),
                message: e.to_string(),
            })?;

        let tc_path = dir.join("tokenizer_config.json");
        let tc = read_json(&tc_path)?.unwrap_or(Json::Null);
        let mc_path = dir.join("config.json");
        let mc = read_json(&mc_path)?.unwrap_or(Json::Null);

        // A token named in tokenizer_config.json must exist in the vocabulary: a typo there
        // would otherwise silently fall back to config.json's id.
        let lookup = |key: &str, id_key: &str| -> Result<Option<(String, u32)>, DataError> {
            if let Some(s) = token_string(&tc, key) {
                let id = inner.token_to_id(&s).ok_or_else(|| DataError::Config {
                    path: tc_path.clone(),
                    message: format!("`{key}` {s:?} is not a token of tokenizer.json"),
                })?;
                return Ok(Some((s, id)));
            }
            Ok(config_id(&mc, id_key).map(|id| (inner.id_to_token(id).unwrap_or_default(), id)))
        };
        let bos = lookup("bos_token", "bos_token_id")?;
        let eos = lookup("eos_token", "eos_token_id")?;
        // Padding never reaches the loss (labels -100) or another token's attention (segment 0),
        // so any valid id works; transformers' convention for Llama is pad = eos.
        let pad_id = lookup("pad_token", "pad_token_id")?
            .map(|(_, id)| id)
            .or(eos.as_ref().map(|(_, id)| *id))
            .unwrap_or(0);

        let gc = read_json(&dir.join("generation_config.json"))?.unwrap_or(Json::Null);
        let mut stop_ids: Vec<u32> = eos.iter().map(|e| e.1).collect();
        for cfg in [&mc, &gc] {
            match cfg.get("eos_token_id") {
                Some(Json::Array(a)) => stop_ids.extend(
                    a.iter()
                        .filter_map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok())),
                ),
                Some(v) => stop_ids.extend(v.as_u64().and_then(|x| u32::try_from(x).ok())),
                None => {}
            }
        }
        let mut seen = std::collections::HashSet::new();
        stop_ids.retain(|id| seen.insert(*id));

        let chat_template = ChatTemplate::from_model_dir(&dir, &tc)?;
        Ok(Self {
            inner,
            dir,
            bos,
            eos,
            pad_id,
            stop_ids,
            chat_template,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|b| b.1)
    }
    pub fn eos_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|e| e.1)
    }
    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|b| b.0.as_str())
    }
    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_ref().map(|e| e.0.as_str())
    }
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }
    /// Token ids that end generation (eos first, then the other listed end ids).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Renders `messages` with the chat template (for `generate --chat`: pass
    /// `add_generation_prompt = true` and encode the result with `add_special_tokens = false`).
    pub fn apply_chat_template(
        &self,
        messages: &[Json],
        add_generation_prompt: bool,
    ) -> Result<String, DataError> {
        let t = self
            .chat_template
            .as_ref()
            .ok_or_else(|| DataError::Config {
                path: self.dir.join("tokenizer_config.json"),
                message: "the tokenizer has no chat template (neither `chat_template` here nor \
                          chat_template.jinja beside it)"
                    .into(),
            })?;
        t.render(
            messages,
            add_generation_prompt,
            self.bos_token().unwrap_or(""),
            self.eos_token().unwrap_or(""),
        )
        .map_err(|message| DataError::Config {
            path: t.path().to_owned(),
            message: format!("chat template failed: {message}"),
        })
    }
    /// The underlying `tokenizers` tokenizer (for decoding in `generate`).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Number of ids the tokenizer can produce: highest id (added tokens included) + 1.
    pub fn id_bound(&self) -> usize {
        self.inner
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .map_or(0, |m| m as usize + 1)
    }

    /// Refuses a tokenizer that can produce an id the model has no embedding row for. A
    /// tokenizer *smaller* than the model is normal (embedding matrices are often padded to a
    /// multiple of 64), so only `max id < vocab_size` is required.
    pub fn check_fits_vocab(&self, model_vocab_size: usize) -> Result<(), DataError> {
        let bound = self.id_bound();
        let special_max = [self.bos_id(), self.eos_id(), Some(self.pad_id)]
            .into_iter()
            .flatten()
            .max()
            .map_or(0, |m| m as usize + 1);
        let bound = bound.max(special_max);
        if bound > model_vocab_size {
            return Err(DataError::VocabMismatch {
                path: self.dir.join("tokenizer.json"),
                max_id: (bound - 1) as u32,
                n_tokens: self.inner.get_vocab_size(true),
                model_vocab: model_vocab_size,
            });
        }
        Ok(())
    }

    /// Tokenizes `text`. `add_special_tokens` runs the post-processor (for Llama: prepend
    /// `<s>`); chat-template output is encoded without it, as transformers'
    /// `apply_chat_template` does, because the template writes the special tokens itself.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Encoded, String> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| e.to_string())?;
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            offsets: enc.get_offsets().to_vec(),
        })
    }

    /// Ids back to text.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| e.to_string())
    }
}
