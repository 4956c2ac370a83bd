//! Typed errors and warnings of the data pipeline. Every variant names the file it is about
//! and, where a record is at fault, its 1-based line number (for `.txt` paragraphs: the line
//! the paragraph starts on).

use std::fmt;
use std::path::PathBuf;

/// Everything that can go wrong between a data file on disk and a batch.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: file not found", path = path.display())]
    MissingFile { path: PathBuf },

    #[error("{path}: cannot read: {source}", path = path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: the file is empty (no records)", path = path.display())]
    EmptyFile { path: PathBuf },

    #[error("{path}:{line}: malformed JSON: {message}", path = path.display())]
    MalformedJson {
        path: PathBuf,
        line: usize,
        message: String,
    },

    #[error(
        "{path}:{line}: record has none of the known fields \
         (`text`, `prompt`+`completion`, `messages`, `input_ids`); it has: {keys}",
        path = path.display()
    )]
    UnknownRecord {
        path: PathBuf,
        line: usize,
        keys: String,
    },

    #[error("{path}:{line}: record has `{present}` but no `{missing}`", path = path.display())]
    MissingField {
        path: PathBuf,
        line: usize,
        present: &'static str,
        missing: &'static str,
    },

    #[error("{path}:{line}: field `{field}` must be {expected}, found {found}", path = path.display())]
    WrongType {
        path: PathBuf,
        line: usize,
        field: String,
        expected: &'static str,
        found: String,
    },

    #[error("{path}:{line}: `messages` is an empty list", path = path.display())]
    EmptyMessages { path: PathBuf, line: usize },

    #[error("{path}:{line}: {message}", path = path.display())]
    InvalidRecord {
        path: PathBuf,
        line: usize,
        message: String,
    },

    #[error(
        "{path}:{line}: sequence of {len} tokens is longer than max_seq_len {max} \
         (strict mode refuses to truncate)",
        path = path.display()
    )]
    TooLong {
        path: PathBuf,
        line: usize,
        len: usize,
        max: usize,
    },

    #[error(
        "{path}: the tokenizer has token ids up to {max_id} ({n_tokens} tokens) but the model's \
         vocab_size is {model_vocab}: ids >= {model_vocab} have no embedding row",
        path = path.display()
    )]
    VocabMismatch {
        path: PathBuf,
        max_id: u32,
        n_tokens: usize,
        model_vocab: usize,
    },

    #[error("{path}: invalid tokenizer: {message}", path = path.display())]
    Tokenizer { path: PathBuf, message: String },

    #[error("{path}: {message}", path = path.display())]
    Config { path: PathBuf, message: String },

    #[error("{path}:{line}: cannot tokenize: {message}", path = path.display())]
    Encode {
        path: PathBuf,
        line: usize,
        message: String,
    },

    #[error(
        "{path}:{line}: a `messages` record needs a chat template, but {dir} has none (neither \
         `chat_template` in tokenizer_config.json nor chat_template.jinja)",
        dir = dir.display(), path = path.display()
    )]
    NoChatTemplate {
        dir: PathBuf,
        path: PathBuf,
        line: usize,
    },

    #[error("{path}: chat template does not compile: {message}", path = path.display())]
    TemplateSyntax { path: PathBuf, message: String },

    #[error("{path}:{line}: chat template failed: {message}", path = path.display())]
    TemplateRender {
        path: PathBuf,
        line: usize,
        message: String,
    },

    #[error(
        "{path}:{line}: the chat template is not prefix-stable at message {index}: rendering \
         the first messages does not give a prefix of the whole conversation, so the assistant \
         turns cannot be located (use train_on_inputs, or a template that renders turns \
         independently)",
        path = path.display()
    )]
    TemplateNotIncremental {
        path: PathBuf,
        line: usize,
        index: usize,
    },

    #[error("invalid data setting `{key}`: {message}")]
    InvalidConfig { key: &'static str, message: String },

    #[error("{path}: no usable examples ({reason})", path = path.display())]
    NoExamples { path: PathBuf, reason: String },

    #[error("invalid data position: {message}")]
    InvalidPosition { message: String },
}

/// Things that do not stop a run but that the user must be told (the CLI prints them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataWarning {
    /// The sequence was cut to `max` tokens (the tail, including any end token, is lost).
    Truncated {
        path: PathBuf,
        line: usize,
        len: usize,
        max: usize,
    },
    /// The example has no token to learn from (no completion / assistant turn, or all of it
    /// was truncated away) and was dropped.
    NoLabels { path: PathBuf, line: usize },
}

impl fmt::Display for DataWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataWarning::Truncated {
                path,
                line,
                len,
                max,
            } => write!(
                f,
                "{}:{line}: sequence of {len} tokens truncated to max_seq_len {max}",
                path.display()
            ),
            DataWarning::NoLabels { path, line } => write!(
                f,
                "{}:{line}: no token to train on (no completion/assistant tokens left); dropped",
                path.display()
            ),
        }
    }
}
