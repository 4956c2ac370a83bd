//! Training data: files in, batches of token ids and labels out.
//!
//! # Pipeline
//! 1. [`Tokenizer::from_model_dir`] loads `tokenizer.json`, the special tokens and the chat
//!    template; [`Tokenizer::check_fits_vocab`] refuses a tokenizer whose ids the model cannot
//!    embed.
//! 2. [`Dataset::load`] reads a file ([`records`] documents the formats), tokenizes each record
//!    into an [`Example`] (`input_ids` + `labels`), truncates and validates.
//! 3. [`Dataset::split_eval`] holds out a seeded eval set.
//! 4. [`Batcher`] packs (optionally), shuffles per epoch and pads into [`Batch`]es, and reports a
//!    [`DataPosition`] a checkpoint stores to resume at the exact next batch.
//!
//! # Formats and what is trained on
//! | record | tokens | labels (default) | labels (`train_on_inputs`) |
//! |---|---|---|---|
//! | `{"text"}` | `encode(text)` (+ post-processor `<s>`) + eos | all | all |
//! | `{"prompt","completion"}` | `encode(prompt + completion)` + eos | tokens touching the completion, and eos | all |
//! | `{"messages"}` | `encode(template(messages))`, no post-processor | assistant content + its end token | all |
//! | `{"prompt":[…],"completion":[…]}` (TRL conversational) | as `messages` = prompt ++ completion | the completion's assistant turns | all |
//! | `{"input_ids","labels"?}` | as given | `labels`, or all | `labels`, or all |
//! | `.txt` | paragraphs as `{"text"}`, or the whole file in chunks ([`TextMode`]) | all | all |
//!
//! Labels follow the transformers convention: `labels` has the length of `input_ids`, holds the
//! token itself where it is a target and -100 where it is not, and the *model* shifts (position
//! `t` predicts `labels[t+1]`). Eos is appended (unless [`DataConfig::append_eos`] is off or the
//! sequence already ends with it) so the model learns to stop, as TRL's SFT does.
//!
//! **Prompt/completion masking.** The concatenation is tokenized once (tokenizing the two parts
//! separately would give different tokens where BPE merges across the seam); a token is a
//! completion token when its byte span in the text ends after the prompt (`end > len(prompt)`),
//! so a token straddling the seam counts as completion.
//!
//! **Assistant-turn masking** (the method). For a conversation `m[0..n]` the template renders
//! the whole text `R = render(m, add_generation_prompt = false)`. For each assistant message
//! `i`: `P = render(m[..i], add_generation_prompt = true)` is the text up to where the reply
//! starts and `Q = render(m[..=i], false)` the text through the end of that turn. Both must be
//! prefixes of `R` (else [`DataError::TemplateNotIncremental`]: templates that rewrite earlier
//! turns, e.g. stripping reasoning from old replies, cannot be masked this way). The assistant
//! span is `R[len P .. len Q]` with trailing whitespace removed (ChatML's `"\n"` after
//! `<|im_end|>` is formatting, not something the model must generate), so it covers the reply
//! and its end token (`<|im_end|>`, `<|eot_id|>`, `</s>`). Tokens of `encode(R)` whose byte
//! span overlaps an assistant span are trained on. This needs no `{% generation %}` markers in
//! the template, and agrees with transformers' `return_assistant_tokens_mask` on templates that
//! have them (tested).
//!
//! # Batch contract (what the model must do)
//! A [`Batch`] is `B` rows of `T` tokens, row-major `(B, T)`:
//! - `input_ids` u32; padding uses the tokenizer's pad id (pad = eos for Llama).
//! - `labels` i64, -100 = no loss. The label at the **first token of every segment** is -100:
//!   nothing predicts a sequence's first token, and in a packed row it stops the shifted loss from
//!   predicting example k+1's first token from example k's last. Padding labels are -100.
//! - `n_label_tokens` = number of labels ≠ -100 in the batch = exactly the terms of the shifted
//!   cross-entropy. Gradient accumulation divides the summed loss by the sum of this over the
//!   micro-batches of a step (so it equals one large batch).
//! - `segment_ids` u32: 1, 2, ... for the examples packed in a row (in order), 0 for padding.
//! - `position_ids` u32: restart at 0 at each segment start (rope sees each example as if it
//!   were alone); padding continues counting from the last segment, so an unpacked row's
//!   positions are exactly `0..T`.
//! - **Attention**: query `i` may attend key `j` of the same row iff
//!   `segment_ids[i] == segment_ids[j] && j <= i`, a block-diagonal causal mask. Attention never
//!   crosses example boundaries. Padding (segment 0) attends only to padding; its outputs never
//!   reach the loss. When [`Batch::is_packed`] is false every row is one segment followed by
//!   padding and the plain causal mask gives the same result for every non-padding token.

pub mod batch;
pub mod error;
pub mod records;
pub mod rng;
pub mod template;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

pub use batch::{Batch, Batcher, DataPosition};
pub use error::{DataError, DataWarning};
pub use records::{Record, SourceRecord};
pub use rng::SplitMix64;
pub use template::ChatTemplate;
pub use tokenizer::{Encoded, Tokenizer};

/// Label value that the loss ignores (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// How a `.txt` file becomes examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextMode {
    /// One example per paragraph; paragraphs are separated by one or more blank lines. Each is
    /// tokenized like `{"text"}` and truncated to `max_seq_len` like any record.
    #[default]
    Paragraphs,
    /// The whole file is tokenized once (post-processor `<s>` at the start, eos at the end) and
    /// cut into consecutive pieces of `max_seq_len` tokens (the last may be shorter); nothing is
    /// truncated or lost. For continued pre-training on long documents.
    Chunks,
}

/// How many examples to hold out for evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalSplit {
    #[default]
    None,
    /// `round(fraction · n)` examples (at least 1 when the fraction is > 0), `0 ≤ fraction < 1`.
    Fraction(f64),
    Count(usize),
}

/// Settings of the data pipeline (each is a CLI flag / TOML key). Serializable so a checkpoint
/// can record the settings its [`DataPosition`] is only valid with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Longest sequence (and packed row) in tokens. Must not exceed the model's
    /// `max_position_embeddings` (the caller checks; see [`DataConfig::validate`]).
    pub max_seq_len: usize,
    /// Train on every token, not just completions / assistant turns.
    pub train_on_inputs: bool,
    /// Append eos to `text` and `prompt`/`completion` records (not to pre-tokenized ones, and
    /// not to chat renders, whose template writes its own end tokens).
    pub append_eos: bool,
    /// Refuse (instead of truncating with a warning) a sequence longer than `max_seq_len`.
    pub strict: bool,
    pub text_mode: TextMode,
    /// Concatenate short examples into rows of up to `max_seq_len` tokens (attention stays
    /// within each example: see the batch contract).
    pub packing: bool,
    /// Shuffle the rows every epoch (seeded).
    pub shuffle: bool,
    pub seed: u64,
    pub eval: EvalSplit,
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// Pad every batch to `max_seq_len` instead of to its longest row (fixed shapes).
    pub pad_to_max_seq_len: bool,
    /// Drop an epoch's last batch when it has fewer than `batch_size` rows.
    pub drop_last: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            max_seq_len: 512,
            train_on_inputs: false,
            append_eos: true,
            strict: false,
            text_mode: TextMode::Paragraphs,
            packing: false,
            shuffle: true,
            seed: 42,
            eval: EvalSplit::None,
            batch_size: 4,
            pad_to_max_seq_len: false,
            drop_last: false,
        }
    }
}

impl DataConfig {
    /// Checks the values against each other and against the model's `max_position_embeddings`
    /// (`None` when the model does not say).
    pub fn validate(&self, max_position_embeddings: Option<usize>) -> Result<(), DataError> {
        let bad = |key, message: String| Err(DataError::InvalidConfig { key, message });
        if self.max_seq_len < 2 {
            return bad(
                "max_seq_len",
                format!("{} (must be at least 2)", self.max_seq_len),
            );
        }
        if let Some(mp) = max_position_embeddings {
            if self.max_seq_len > mp {
                return bad(
                    "max_seq_len",
                    format!(
                        "{} is longer than the model's max_position_embeddings {mp}",
                        self.max_seq_len
                    ),
                );
            }
        }
        if self.batch_size == 0 {
            return bad("batch_size", "0 (must be at least 1)".into());
        }
        if let EvalSplit::Fraction(f) = self.eval {
            if !(0.0..1.0).contains(&f) {
                return bad("eval_fraction", format!("{f} (must be in [0, 1))"));
            }
        }
        Ok(())
    }
}

/// One tokenized training sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    /// Same length as `input_ids`; -100 where no loss is taken.
    pub labels: Vec<i64>,
    /// 1-based line of the record in the source file (for messages naming a batch).
    pub line: usize,
}

/// The tokenized contents of one data file.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    pub examples: Vec<Example>,
    /// Truncations and dropped examples, for the CLI to print.
    pub warnings: Vec<DataWarning>,
    /// Token id used for padding.
    pub pad_id: u32,
}

impl Dataset {
    /// Reads, tokenizes and validates `path` (`.txt` as plain text, anything else as JSONL).
    pub fn load(
        path: impl AsRef<Path>,
        tokenizer: &Tokenizer,
        cfg: &DataConfig,
    ) -> Result<Dataset, DataError> {
        cfg.validate(None)?;
        let path = path.as_ref();
        let content = records::read_file(path)?;
        let mut ds = Dataset {
            path: path.to_owned(),
            examples: Vec::new(),
            warnings: Vec::new(),
            pad_id: tokenizer.pad_id(),
        };
        if records::is_plain_text(path) && cfg.text_mode == TextMode::Chunks {
            ds.load_chunks(&content, tokenizer, cfg)?;
        } else {
            let recs = if records::is_plain_text(path) {
                records::parse_paragraphs(path, &content)?
            } else {
                records::parse_jsonl(path, &content)?
            };
            let bound = tokenizer.id_bound();
            // Tokenizing (and template rendering) is the slow part: run it on all cores, then
            // keep file order for examples, warnings and the first error reported.
            let encoded: Vec<_> = recs
                .par_iter()
                .map(|r| encode_record(&r.record, tokenizer, cfg, path, r.line, bound))
                .collect();
            for (r, enc) in recs.iter().zip(encoded) {
                let (ids, labels) = enc?;
                ds.push(ids, labels, r.line, cfg)?;
            }
        }
        if ds.examples.is_empty() {
            return Err(DataError::NoExamples {
                path: path.to_owned(),
                reason: "every record was dropped for having no token to train on".into(),
            });
        }
        Ok(ds)
    }

    /// [`Dataset::load`] followed by [`Dataset::split_eval`] with `cfg.eval` and `cfg.seed`.
    pub fn load_split(
        path: impl AsRef<Path>,
        tokenizer: &Tokenizer,
        cfg: &DataConfig,
    ) -> Result<(Dataset, Option<Dataset>), DataError> {
        Dataset::load(path, tokenizer, cfg)?.split_eval(cfg.eval, cfg.seed)
    }

    /// Truncates (or refuses), drops examples with nothing to learn, stores the rest.
    fn push(
        &mut self,
        mut ids: Vec<u32>,
        mut labels: Vec<i64>,
        line: usize,
        cfg: &DataConfig,
    ) -> Result<(), DataError> {
        if ids.len() > cfg.max_seq_len {
            if cfg.strict {
                return Err(DataError::TooLong {
                    path: self.path.clone(),
                    line,
                    len: ids.len(),
                    max: cfg.max_seq_len,
                });
            }
            self.warnings.push(DataWarning::Truncated {
                path: self.path.clone(),
                line,
                len: ids.len(),
                max: cfg.max_seq_len,
            });
            ids.truncate(cfg.max_seq_len);
            labels.truncate(cfg.max_seq_len);
        }
        // Position 0 is never a target (nothing precedes it), so a trainable token must be at
        // t >= 1: this is what the batch's `n_label_tokens` will count.
        if labels.iter().skip(1).all(|&l| l == IGNORE_INDEX) {
            self.warnings.push(DataWarning::NoLabels {
                path: self.path.clone(),
                line,
            });
            return Ok(());
        }
        self.examples.push(Example {
            input_ids: ids,
            labels,
            line,
        });
        Ok(())
    }

    fn load_chunks(
        &mut self,
        content: &str,
        tok: &Tokenizer,
        cfg: &DataConfig,
    ) -> Result<(), DataError> {
        if content.trim().is_empty() {
            return Err(DataError::EmptyFile {
                path: self.path.clone(),
            });
        }
        let enc = tok
            .encode(content, true)
            .map_err(|message| DataError::Encode {
                path: self.path.clone(),
                line: 1,
                message,
            })?;
        let mut ids = enc.ids;
        let mut starts: Vec<usize> = enc.offsets.iter().map(|o| o.0).collect();
        if let Some(eos) = tok.eos_id().filter(|_| cfg.append_eos) {
            if ids.last() != Some(&eos) {
                ids.push(eos);
                starts.push(content.len());
            }
        }
        // Line of each chunk's first token: newlines before its byte offset, counted
        // incrementally over the (monotone) chunk starts.
        let bytes = content.as_bytes();
        let (mut line, mut scanned) = (1usize, 0usize);
        for (chunk, chunk_starts) in ids
            .chunks(cfg.max_seq_len)
            .zip(starts.chunks(cfg.max_seq_len))
        {
            let at = chunk_starts[0].clamp(scanned, bytes.len());
            line += bytes[scanned..at].iter().filter(|&&b| b == b'\n').count();
            scanned = at;
            let labels = chunk.iter().map(|&t| t as i64).collect();
            self.push(chunk.to_vec(), labels, line, cfg)?;
        }
        Ok(())
    }

    /// Builds a dataset from already-made examples (checked like pre-tokenized records).
    pub fn from_examples(
        path: impl AsRef<Path>,
        examples: Vec<Example>,
        pad_id: u32,
    ) -> Result<Dataset, DataError> {
        let path = path.as_ref().to_owned();
        for e in &examples {
            if e.input_ids.len() != e.labels.len() || e.input_ids.is_empty() {
                return Err(DataError::InvalidRecord {
                    path,
                    line: e.line,
                    message: format!(
                        "{} input_ids but {} labels (must be equal and non-zero)",
                        e.input_ids.len(),
                        e.labels.len()
                    ),
                });
            }
        }
        if examples.is_empty() {
            return Err(DataError::NoExamples {
                path,
                reason: "no examples given".into(),
            });
        }
        Ok(Dataset {
            path,
            examples,
            warnings: Vec::new(),
            pad_id,
        })
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }
    /// Total tokens (for the start-up summary).
    pub fn n_tokens(&self) -> usize {
        self.examples.iter().map(|e| e.input_ids.len()).sum()
    }
    /// Tokens that carry loss (position 0 of each example excluded, as in a batch).
    pub fn n_label_tokens(&self) -> usize {
        self.examples
            .iter()
            .map(|e| {
                e.labels
                    .iter()
                    .skip(1)
                    .filter(|&&l| l != IGNORE_INDEX)
                    .count()
            })
            .sum()
    }

    /// The warnings as lines for a terminal: each kind listed one by one up to 3 times, beyond
    /// that summarised as a count with the first few lines (a file where every record is too
    /// long must not print a million lines).
    pub fn warning_summary(&self) -> Vec<String> {
        const SHOW: usize = 3;
        let truncated: Vec<&DataWarning> = self
            .warnings
            .iter()
            .filter(|w| matches!(w, DataWarning::Truncated { .. }))
            .collect();
        let dropped: Vec<&DataWarning> = self
            .warnings
            .iter()
            .filter(|w| matches!(w, DataWarning::NoLabels { .. }))
            .collect();
        let line_of = |w: &DataWarning| match w {
            DataWarning::Truncated { line, .. } | DataWarning::NoLabels { line, .. } => *line,
        };
        let mut out = Vec::new();
        for (group, what) in [
            (truncated, "sequences truncated to max_seq_len"),
            (dropped, "records dropped for having no token to train on"),
        ] {
            if group.len() <= SHOW {
                out.extend(group.iter().map(|w| w.to_string()));
            } else {
                let lines: Vec<String> = group
                    .iter()
                    .take(SHOW)
                    .map(|w| line_of(w).to_string())
                    .collect();
                out.push(format!(
                    "{}: {} {what} (lines {}, ...)",
                    self.path.display(),
                    group.len(),
                    lines.join(", ")
                ));
            }
        }
        out
    }

    /// Holds out examples for evaluation, chosen by a seeded shuffle of the indices (its own
    /// stream, independent of the epoch shuffles). Both parts keep file order. Returns
    /// `(train, None)` for [`EvalSplit::None`] or a split of 0 examples.
    pub fn split_eval(
        self,
        eval: EvalSplit,
        seed: u64,
    ) -> Result<(Dataset, Option<Dataset>), DataError> {
        let n = self.examples.len();
        let n_eval = match eval {
            EvalSplit::None => 0,
            EvalSplit::Count(c) => c,
            EvalSplit::Fraction(f) => {
                if !(0.0..1.0).contains(&f) {
                    return Err(DataError::InvalidConfig {
                        key: "eval_fraction",
                        message: format!("{f} (must be in [0, 1))"),
                    });
                }
                if f > 0.0 {
                    ((f * n as f64).round() as usize).max(1)
                } else {
                    0
                }
            }
        };
        if n_eval == 0 {
            return Ok((self, None));
        }
        if n_eval >= n {
            return Err(DataError::InvalidConfig {
                key: "eval",
                message: format!(
                    "holding out {n_eval} of {n} examples of {} leaves none to train on",
                    self.path.display()
                ),
            });
        }
        let mut idx: Vec<usize> = (0..n).collect();
        SplitMix64::derived(seed, EVAL_SALT).shuffle(&mut idx);
        let mut is_eval = vec![false; n];
        for &i in &idx[..n_eval] {
            is_eval[i] = true;
        }
        let (mut train, mut evals) = (Vec::new(), Vec::new());
        for (e, ev) in self.examples.into_iter().zip(is_eval) {
            if ev {
                evals.push(e)
            } else {
                train.push(e)
            }
        }
        let eval_ds = Dataset {
            path: self.path.clone(),
            examples: evals,
            warnings: Vec::new(),
            pad_id: self.pad_id,
        };
        Ok((
            Dataset {
                examples: train,
                ..self
            },
            Some(eval_ds),
        ))
    }

    /// A stable 64-bit FNV-1a hash of every example's ids and labels, stored in
    /// [`DataPosition`] so a resume on changed data is refused instead of silently replaying a
    /// different order.
    pub fn fingerprint(&self) -> u64 {
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |x: u64| {
            for b in x.to_le_bytes() {
                h ^= b as u64;
                h = h.wrapping_mul(PRIME);
            }
        };
        eat(self.examples.len() as u64);
        for e in &self.examples {
            eat(e.input_ids.len() as u64);
            e.input_ids.iter().for_each(|&t| eat(t as u64));
            e.labels.iter().for_each(|&l| eat(l as u64));
        }
        h
    }
}

/// Salt of the eval-split stream ("evalsplt" in ASCII), so it differs from the shuffle stream.
const EVAL_SALT: u64 = 0x6576_616c_7370_6c74;

fn encode_err(path: &Path, line: usize) -> impl Fn(String) -> DataError + '_ {
    move |message| DataError::Encode {
        path: path.to_owned(),
        line,
        message,
    }
}

/// Tokens and labels of one record (before truncation).
fn encode_record(
    rec: &Record,
    tok: &Tokenizer,
    cfg: &DataConfig,
    path: &Path,
    line: usize,
    id_bound: usize,
) -> Result<(Vec<u32>, Vec<i64>), DataError> {
    let eos = tok.eos_id().filter(|_| cfg.append_eos);
    let with_eos = |ids: &mut Vec<u32>, labels: &mut Vec<i64>| {
        if let Some(e) = eos {
            if ids.last() != Some(&e) {
                ids.push(e);
                labels.push(e as i64);
            }
        }
    };
    let invalid = |message: String| DataError::InvalidRecord {
        path: path.to_owned(),
        line,
        message,
    };
    match rec {
        Record::Text(text) => {
            let enc = tok.encode(text, true).map_err(encode_err(path, line))?;
            let mut ids = enc.ids;
            let mut labels: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
            with_eos(&mut ids, &mut labels);
            Ok((ids, labels))
        }
        Record::PromptCompletion { prompt, completion } => {
            let full = format!("{prompt}{completion}");
            let enc = tok.encode(&full, true).map_err(encode_err(path, line))?;
            let seam = prompt.len();
            let mut labels: Vec<i64> = enc
                .ids
                .iter()
                .zip(&enc.offsets)
                .map(|(&t, &(_, end))| {
                    if cfg.train_on_inputs || end > seam {
                        t as i64
                    } else {
                        IGNORE_INDEX
                    }
                })
                .collect();
            let mut ids = enc.ids;
            with_eos(&mut ids, &mut labels);
            Ok((ids, labels))
        }
        Record::Messages(messages) => encode_chat(messages, 0, tok, cfg, path, line),
        Record::ChatPromptCompletion { prompt, completion } => {
            let messages: Vec<Json> = prompt.iter().chain(completion).cloned().collect();
            encode_chat(&messages, prompt.len(), tok, cfg, path, line)
        }
        Record::Tokens { input_ids, labels } => {
            if input_ids.is_empty() {
                return Err(invalid("`input_ids` is empty".into()));
            }
            if let Some((i, &t)) = input_ids
                .iter()
                .enumerate()
                .find(|(_, &t)| t as usize >= id_bound)
            {
                return Err(invalid(format!(
                    "input_ids[{i}] = {t} is not a token of the tokenizer (ids < {id_bound})"
                )));
            }
            let labels = match labels {
                None => input_ids.iter().map(|&t| t as i64).collect(),
                Some(l) => {
                    if l.len() != input_ids.len() {
                        return Err(invalid(format!(
                            "{} labels for {} input_ids (must be equal)",
                            l.len(),
                            input_ids.len()
                        )));
                    }
                    if let Some((i, &v)) = l
                        .iter()
                        .enumerate()
                        .find(|(_, &v)| v != IGNORE_INDEX && !(0..id_bound as i64).contains(&v))
                    {
                        return Err(invalid(format!(
                            "labels[{i}] = {v} is neither -100 nor a token id (< {id_bound})"
                        )));
                    }
                    // Explicit labels are the user's decision and win over train_on_inputs.
                    l.clone()
                }
            };
            Ok((input_ids.clone(), labels))
        }
    }
}

/// Tokens and labels of a conversation; assistant turns before `first_trainable` are context,
/// not targets.
fn encode_chat(
    messages: &[Json],
    first_trainable: usize,
    tok: &Tokenizer,
    cfg: &DataConfig,
    path: &Path,
    line: usize,
) -> Result<(Vec<u32>, Vec<i64>), DataError> {
    let template = tok
        .chat_template()
        .ok_or_else(|| DataError::NoChatTemplate {
            dir: tok.dir().to_owned(),
            path: path.to_owned(),
            line,
        })?;
    let (text, spans) = render_with_assistant_spans(
        template,
        messages,
        tok.bos_token().unwrap_or(""),
        tok.eos_token().unwrap_or(""),
        (!cfg.train_on_inputs).then_some(first_trainable),
    )
    .map_err(|e| match e {
        SpanError::Render(message) => DataError::TemplateRender {
            path: path.to_owned(),
            line,
            message,
        },
        SpanError::NotPrefix(index) => DataError::TemplateNotIncremental {
            path: path.to_owned(),
            line,
            index,
        },
    })?;
    let enc = tok.encode(&text, false).map_err(encode_err(path, line))?;
    let labels = enc
        .ids
        .iter()
        .zip(&enc.offsets)
        .map(|(&t, &(s, e))| {
            let inside = spans.iter().any(|&(a, b)| s < b && e > a);
            if cfg.train_on_inputs || inside {
                t as i64
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    Ok((enc.ids, labels))
}

enum SpanError {
    Render(String),
    NotPrefix(usize),
}

/// Renders `messages` and, with `Some(first)`, locates the byte span of every assistant reply
/// from message `first` on, plus its end token, in the rendered text (method in the module
/// docs).
fn render_with_assistant_spans(
    t: &ChatTemplate,
    messages: &[Json],
    bos: &str,
    eos: &str,
    spans_from: Option<usize>,
) -> Result<(String, Vec<(usize, usize)>), SpanError> {
    let full = t
        .render(messages, false, bos, eos)
        .map_err(SpanError::Render)?;
    let mut spans = Vec::new();
    let Some(first) = spans_from else {
        return Ok((full, spans));
    };
    for (i, m) in messages.iter().enumerate().skip(first) {
        if m.get("role").and_then(Json::as_str) != Some("assistant") {
            continue;
        }
        let before = t
            .render(&messages[..i], true, bos, eos)
            .map_err(SpanError::Render)?;
        let through = t
            .render(&messages[..=i], false, bos, eos)
            .map_err(SpanError::Render)?;
        if !full.starts_with(&before) || !full.starts_with(&through) || through.len() < before.len()
        {
            return Err(SpanError::NotPrefix(i));
        }
        let end = before.len() + through[before.len()..].trim_end().len();
        if end > before.len() {
            spans.push((before.len(), end));
        }
    }
    Ok((full, spans))
}
