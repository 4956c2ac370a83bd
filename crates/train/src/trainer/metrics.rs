//! Per-step and per-evaluation records, kept in memory (for the plot and checkpoints) and
//! appended to `metrics.jsonl` one JSON object per line.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::{Result, TrainerError};

/// One optimizer step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// 1-based optimizer step.
    pub step: u64,
    /// Fractional epoch reached after this step.
    pub epoch: f64,
    /// Mean token loss over the step's micro-batches (one big batch).
    pub loss: f64,
    /// Learning rate the step used.
    pub lr: f64,
    /// Global gradient L2 norm before clipping.
    pub grad_norm: f64,
    /// Non-padding tokens processed in the step.
    pub tokens: usize,
    /// Tokens that carried loss.
    pub label_tokens: usize,
    /// Wall-clock seconds of the step.
    pub seconds: f64,
    pub tokens_per_s: f64,
}

/// One evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Optimizer steps taken when evaluated (0 = before training).
    pub step: u64,
    pub eval_loss: f64,
    pub eval_perplexity: f64,
    pub eval_tokens: usize,
}

/// Everything logged so far.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    pub steps: Vec<StepRecord>,
    pub evals: Vec<EvalRecord>,
}

impl History {
    /// Keeps only what happened up to optimizer step `step` (resume).
    pub fn truncate(&mut self, step: u64) {
        self.steps.retain(|r| r.step <= step);
        self.evals.retain(|r| r.step <= step);
    }

    /// Rewrites `path` with this history, steps and evals interleaved in step order.
    pub fn write_jsonl(&self, path: &Path) -> Result<()> {
        let mut out = Vec::new();
        let mut e = self.evals.iter().peekable();
        for s in &self.steps {
            while let Some(ev) = e.next_if(|ev| ev.step < s.step) {
                line(&mut out, ev);
            }
            line(&mut out, s);
            while let Some(ev) = e.next_if(|ev| ev.step == s.step) {
                line(&mut out, ev);
            }
        }
        for ev in e {
            line(&mut out, ev);
        }
        std::fs::write(path, out).map_err(|err| TrainerError::io(path, err))
    }
}

fn line<T: Serialize>(out: &mut Vec<u8>, v: &T) {
    serde_json::to_writer(&mut *out, v).expect("records serialize");
    out.push(b'\n');
}

/// Appends one record as a line of `path`.
pub(crate) fn append<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let mut buf = Vec::new();
    line(&mut buf, v);
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(&buf))
        .map_err(|e| TrainerError::io(path, e))
}
