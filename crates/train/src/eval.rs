//! Evaluation: mean token loss and perplexity over a set of sequences, optionally dumping the
//! logits as safetensors (`input_ids` I64 `[N, T]`, `logits` F32 `[N, T, V]`) for interop
//! checks against transformers. Plus the minimal JSONL reader `qlora eval` needs
//! (`{"text": …}` or `{"input_ids": […]}` per line); the full data pipeline is elsewhere.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::backend::Backend;
use crate::cpu::cross_entropy::IGNORE_INDEX;
use crate::error::{Result, TrainError};
use crate::model::Model;
use crate::schedule::{forward_logits, Adapter, Batch};
use crate::st;

/// One eval record.
#[derive(Clone, Debug, PartialEq)]
pub enum EvalRecord {
    Text(String),
    Ids(Vec<u32>),
}

/// Read `{"text": "..."}` / `{"input_ids": [...]}` lines (blank lines skipped). Errors name the
/// file and 1-based line.
pub fn read_eval_jsonl(path: &Path) -> Result<Vec<EvalRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let err = |line: usize, msg: String| TrainError::Data {
        path: path.to_path_buf(),
        line,
        msg,
    };
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(l).map_err(|e| err(i + 1, format!("invalid JSON: {e}")))?;
        if let Some(t) = v.get("text") {
            let t = t
                .as_str()
                .ok_or_else(|| err(i + 1, "\"text\" is not a string".into()))?;
            out.push(EvalRecord::Text(t.to_string()));
        } else if let Some(ids) = v.get("input_ids") {
            let ids = ids
                .as_array()
                .ok_or_else(|| err(i + 1, "\"input_ids\" is not a list".into()))?
                .iter()
                .map(|x| {
                    x.as_u64()
                        .filter(|&n| n <= u32::MAX as u64)
                        .map(|n| n as u32)
                        .ok_or_else(|| err(i + 1, format!("input_ids entry {x} is not a token id")))
                })
                .collect::<Result<Vec<u32>>>()?;
            out.push(EvalRecord::Ids(ids));
        } else {
            return Err(err(
                i + 1,
                "record has neither \"text\" nor \"input_ids\"".into(),
            ));
        }
    }
    if out.is_empty() {
        return Err(err(0, "no records".into()));
    }
    Ok(out)
}

/// Load `<model_dir>/tokenizer.json`.
pub fn load_tokenizer(model_dir: &Path) -> Result<tokenizers::Tokenizer> {
    let p = model_dir.join("tokenizer.json");
    tokenizers::Tokenizer::from_file(&p).map_err(|e| TrainError::Tokenizer {
        path: p.clone(),
        msg: e.to_string(),
    })
}

/// Records → token ids (texts through `tokenizer` with its special tokens, as transformers'
/// `tokenizer(text)` does). `tokenizer` may be None when every record is pre-tokenized.
pub fn tokenize_records(
    records: &[EvalRecord],
    tokenizer: Option<&tokenizers::Tokenizer>,
) -> Result<Vec<Vec<u32>>> {
    records
        .iter()
        .enumerate()
        .map(|(i, r)| match r {
            EvalRecord::Ids(ids) => Ok(ids.clone()),
            EvalRecord::Text(t) => {
                let tok = tokenizer.ok_or_else(|| TrainError::Data {
                    path: PathBuf::from("<eval data>"),
                    line: i + 1,
                    msg: "a text record needs a tokenizer (tokenizer.json)".into(),
                })?;
                tok.encode(t.as_str(), true)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| TrainError::Data {
                        path: PathBuf::from("<eval data>"),
                        line: i + 1,
                        msg: format!("tokenizer: {e}"),
                    })
            }
        })
        .collect()
}

/// Options of [`evaluate`].
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Sequences longer than this are truncated (counted in the report).
    pub max_seq_len: usize,
    /// Sequences per forward.
    pub batch_size: usize,
    /// Write `input_ids` `[N, Tmax]` (right-padded with `pad_id`) and `logits` `[N, Tmax, V]`.
    pub dump_logits: Option<PathBuf>,
    /// Token used for right padding (its positions carry no loss).
    pub pad_id: u32,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            max_seq_len: 2048,
            batch_size: 8,
            dump_logits: None,
            pad_id: 0,
        }
    }
}

/// Result of [`evaluate`].
#[derive(Clone, Debug, PartialEq)]
pub struct EvalReport {
    /// Mean cross entropy per predicted token over the whole set (token-weighted).
    pub loss: f64,
    /// exp(loss)
    pub perplexity: f64,
    /// Predicted tokens (Σ over sequences of len − 1).
    pub tokens: usize,
    pub sequences: usize,
    /// Sequences cut to `max_seq_len`.
    pub truncated: usize,
}

/// Mean loss and perplexity of `model` (+ adapter) on `seqs` (each a full token sequence; the
/// model predicts token t+1 from 0..=t, as causal-LM training does).
pub fn evaluate<B: Backend>(
    be: &B,
    model: &Model<B>,
    adapter: Option<&Adapter<B>>,
    seqs: &[Vec<u32>],
    opts: &EvalOptions,
) -> Result<EvalReport> {
    if seqs.is_empty() {
        return Err(TrainError::Batch("no sequences to evaluate".into()));
    }
    let max = opts.max_seq_len.max(1);
    let truncated = seqs.iter().filter(|s| s.len() > max).count();
    let seqs: Vec<&[u32]> = seqs.iter().map(|s| &s[..s.len().min(max)]).collect();
    if let Some(i) = seqs.iter().position(|s| s.is_empty()) {
        return Err(TrainError::Batch(format!("sequence {i} is empty")));
    }
    let v = model.config.vocab_size;
    let global_t = seqs.iter().map(|s| s.len()).max().unwrap_or(1);
    let mut dump: Option<(Vec<i64>, Vec<f32>)> = opts.dump_logits.as_ref().map(|_| {
        (
            Vec::with_capacity(seqs.len() * global_t),
            Vec::with_capacity(seqs.len() * global_t * v),
        )
    });
    let (mut sum, mut tokens) = (0f64, 0usize);
    for chunk in seqs.chunks(opts.batch_size.max(1)) {
        // Dumps need one common T; otherwise pad only to this chunk's longest.
        let t = if dump.is_some() {
            global_t
        } else {
            chunk.iter().map(|s| s.len()).max().unwrap_or(1)
        };
        let b = chunk.len();
        let mut ids = vec![opts.pad_id; b * t];
        let mut labels = vec![IGNORE_INDEX; b * t];
        for (bi, s) in chunk.iter().enumerate() {
            for (ti, &id) in s.iter().enumerate() {
                ids[bi * t + ti] = id;
                labels[bi * t + ti] = id as i32;
            }
        }
        // Right padding under a causal mask leaves the real positions' logits unchanged.
        let batch = Batch::new(ids, labels, b, t)?;
        let logits = forward_logits(be, model, adapter, &batch.input_ids, b, t, None)?;
        let mut lse = be.zeros(b * t);
        let (s, n) = be.cross_entropy_fwd(&mut lse, &logits, &batch.shifted_targets(), v);
        sum += s;
        tokens += n;
        if let Some((di, dl)) = dump.as_mut() {
            di.extend(batch.input_ids.iter().map(|&x| x as i64));
            dl.extend(be.download(&logits));
        }
    }
    if let (Some(path), Some((di, dl))) = (&opts.dump_logits, dump) {
        let n = seqs.len();
        st::write_atomic(
            path,
            &[
                st::OutTensor::i64("input_ids", vec![n, global_t], &di),
                st::OutTensor::f32("logits", vec![n, global_t, v], &dl),
            ],
            true,
        )?;
    }
    let loss = sum / tokens as f64;
    Ok(EvalReport {
        loss,
        perplexity: loss.exp(),
        tokens,
        sequences: seqs.len(),
        truncated,
    })
}
