//! Rows, epochs and batches (the contract is in the module docs of [`crate::data`]).
//!
//! The rows (single examples, or packs of them) are fixed when the [`Batcher`] is made, so every
//! epoch has the same number of batches; each epoch visits the rows in a fresh seeded order.
//! [`DataPosition`] is everything needed to continue at the next batch: the epoch, the batch
//! index within it, and the shuffle generator's state at the start of that epoch (the epoch's
//! order is re-derived from it).

use serde::{Deserialize, Serialize};

use super::error::DataError;
use super::rng::SplitMix64;
use super::{DataConfig, Dataset, IGNORE_INDEX};

/// Salt of the packing stream ("packrows").
const PACK_SALT: u64 = 0x7061_636b_726f_7773;

/// Where the batcher is; stored in checkpoints (serde, e.g. as JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    /// 0-based epoch of the next batch.
    pub epoch: u64,
    /// Index within that epoch of the next batch.
    pub batch: u64,
    /// SplitMix64 state at the start of `epoch`, before its rows were shuffled.
    pub rng_state: u64,
    /// [`Dataset::fingerprint`] of the data this position belongs to.
    pub dataset_fingerprint: u64,
}

/// One micro-batch. Every `Vec` is row-major `(batch_size, seq_len)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// B: rows in this batch (the last of an epoch may have fewer than configured).
    pub batch_size: usize,
    /// T: tokens per row (longest row, or `max_seq_len` with `pad_to_max_seq_len`).
    pub seq_len: usize,
    /// (B, T) u32 token ids; padding = pad id.
    pub input_ids: Vec<u32>,
    /// (B, T) i64 targets, unshifted; -100 at padding and at each segment's first token.
    pub labels: Vec<i64>,
    /// (B, T) u32 rope positions, restarting at 0 per segment.
    pub position_ids: Vec<u32>,
    /// (B, T) u32: 1.. for the examples of a row, 0 for padding.
    pub segment_ids: Vec<u32>,
    /// Labels ≠ -100: the number of terms in this batch's shifted cross-entropy.
    pub n_label_tokens: usize,
    /// Non-padding tokens (for tokens/s).
    pub n_tokens: usize,
    /// Per row, the source line of each packed example (to name a batch in an error).
    pub lines: Vec<Vec<usize>>,
}

impl Batch {
    /// `labels` as i32 (the CPU cross-entropy's target type); every value is -100 or a token
    /// id < 2^32 checked at load, and token ids of real vocabularies fit in i32.
    pub fn labels_i32(&self) -> Vec<i32> {
        self.labels.iter().map(|&l| l as i32).collect()
    }

    /// True when some row holds more than one example, so a block-diagonal mask is required.
    pub fn is_packed(&self) -> bool {
        self.lines.iter().any(|l| l.len() > 1)
    }

    /// Whether query `i` may attend key `j` in row `row` (the mask contract, for tests and
    /// reference implementations).
    pub fn attends(&self, row: usize, i: usize, j: usize) -> bool {
        let s = &self.segment_ids[row * self.seq_len..(row + 1) * self.seq_len];
        j <= i && s[i] == s[j]
    }

    /// Every non-padding segment as `(row, start, len)`, in order (the `cu_seqlens` of a
    /// variable-length attention kernel).
    pub fn segments(&self) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        for row in 0..self.batch_size {
            let s = &self.segment_ids[row * self.seq_len..(row + 1) * self.seq_len];
            let mut t = 0;
            while t < s.len() {
                let id = s[t];
                let start = t;
                while t < s.len() && s[t] == id {
                    t += 1;
                }
                if id != 0 {
                    out.push((row, start, t - start));
                }
            }
        }
        out
    }
}

/// Turns a [`Dataset`] into an endless, resumable stream of batches.
#[derive(Debug, Clone)]
pub struct Batcher<'a> {
    ds: &'a Dataset,
    /// Rows: example indices packed together (one each without packing).
    rows: Vec<Vec<usize>>,
    batch_size: usize,
    max_seq_len: usize,
    pad_to_max: bool,
    drop_last: bool,
    shuffle: bool,
    pos: DataPosition,
    /// Row order of the current epoch (derived from `pos`).
    order: Vec<usize>,
    /// Generator state after shuffling the current epoch = the next epoch's start state.
    next_rng_state: u64,
}

impl<'a> Batcher<'a> {
    /// A batcher at the start of epoch 0.
    pub fn new(ds: &'a Dataset, cfg: &DataConfig) -> Result<Self, DataError> {
        cfg.validate(None)?;
        if ds.examples.is_empty() {
            return Err(DataError::NoExamples {
                path: ds.path.clone(),
                reason: "empty dataset".into(),
            });
        }
        if let Some(e) = ds
            .examples
            .iter()
            .find(|e| e.input_ids.len() > cfg.max_seq_len)
        {
            return Err(DataError::TooLong {
                path: ds.path.clone(),
                line: e.line,
                len: e.input_ids.len(),
                max: cfg.max_seq_len,
            });
        }
        let rows = if cfg.packing {
            // Pack in a seeded order (file order without shuffling) so that which examples share
            // a row does not follow the file's grouping; fixed for the whole run.
            let mut idx: Vec<usize> = (0..ds.examples.len()).collect();
            if cfg.shuffle {
                SplitMix64::derived(cfg.seed, PACK_SALT).shuffle(&mut idx);
            }
            pack_greedy(&idx, |i| ds.examples[i].input_ids.len(), cfg.max_seq_len)
        } else {
            (0..ds.examples.len()).map(|i| vec![i]).collect()
        };
        let n_batches = if cfg.drop_last {
            rows.len() / cfg.batch_size
        } else {
            rows.len().div_ceil(cfg.batch_size)
        };
        if n_batches == 0 {
            return Err(DataError::InvalidConfig {
                key: "batch_size",
                message: format!(
                    "{} rows of {} make no full batch of {} with drop_last",
                    rows.len(),
                    ds.path.display(),
                    cfg.batch_size
                ),
            });
        }
        let mut b = Batcher {
            ds,
            rows,
            batch_size: cfg.batch_size,
            max_seq_len: cfg.max_seq_len,
            pad_to_max: cfg.pad_to_max_seq_len,
            drop_last: cfg.drop_last,
            shuffle: cfg.shuffle,
            pos: DataPosition {
                epoch: 0,
                batch: 0,
                rng_state: cfg.seed,
                dataset_fingerprint: ds.fingerprint(),
            },
            order: Vec::new(),
            next_rng_state: 0,
        };
        b.start_epoch();
        Ok(b)
    }

    /// A batcher continuing at `pos` (from a checkpoint made with the same data and config).
    pub fn resume(ds: &'a Dataset, cfg: &DataConfig, pos: DataPosition) -> Result<Self, DataError> {
        let mut b = Self::new(ds, cfg)?;
        if pos.dataset_fingerprint != b.pos.dataset_fingerprint {
            return Err(DataError::InvalidPosition {
                message: format!(
                    "the checkpoint was made on different data than {} (fingerprint {:016x}, now \
                     {:016x})",
                    ds.path.display(),
                    pos.dataset_fingerprint,
                    b.pos.dataset_fingerprint
                ),
            });
        }
        if pos.batch >= b.batches_per_epoch() as u64 {
            return Err(DataError::InvalidPosition {
                message: format!(
                    "batch {} of epoch {} but an epoch has {} batches",
                    pos.batch,
                    pos.epoch,
                    b.batches_per_epoch()
                ),
            });
        }
        b.pos = pos;
        b.start_epoch();
        Ok(b)
    }

    /// Derives the current epoch's row order from `pos.rng_state`.
    fn start_epoch(&mut self) {
        self.order = (0..self.rows.len()).collect();
        let mut rng = SplitMix64::new(self.pos.rng_state);
        if self.shuffle {
            rng.shuffle(&mut self.order);
        }
        self.next_rng_state = rng.state;
    }

    /// Batches in every epoch.
    pub fn batches_per_epoch(&self) -> usize {
        if self.drop_last {
            self.rows.len() / self.batch_size
        } else {
            self.rows.len().div_ceil(self.batch_size)
        }
    }

    /// Rows in every epoch (= examples without packing).
    pub fn rows_per_epoch(&self) -> usize {
        self.rows.len()
    }

    /// Position of the batch the next call to [`Batcher::next_batch`] returns.
    pub fn position(&self) -> DataPosition {
        self.pos
    }

    /// The next batch; rolls over into the next epoch after the last one.
    pub fn next_batch(&mut self) -> Batch {
        let b = self.pos.batch as usize;
        let start = b * self.batch_size;
        let end = (start + self.batch_size).min(self.rows.len());
        let rows: Vec<&[usize]> = self.order[start..end]
            .iter()
            .map(|&r| self.rows[r].as_slice())
            .collect();
        let batch = build_batch(self.ds, &rows, self.pad_to_max.then_some(self.max_seq_len));
        self.pos.batch += 1;
        if self.pos.batch as usize >= self.batches_per_epoch() {
            self.pos.epoch += 1;
            self.pos.batch = 0;
            self.pos.rng_state = self.next_rng_state;
            self.start_epoch();
        }
        batch
    }
}

impl Iterator for Batcher<'_> {
    type Item = Batch;
    /// Never `None`: the stream is endless (stop by steps or by [`DataPosition::epoch`]).
    fn next(&mut self) -> Option<Batch> {
        Some(self.next_batch())
    }
}

/// One pass over `ds` in order without shuffling (for evaluation), packed if `cfg.packing`.
pub fn eval_batches(ds: &Dataset, cfg: &DataConfig) -> Result<Vec<Batch>, DataError> {
    let cfg = DataConfig {
        shuffle: false,
        drop_last: false,
        ..cfg.clone()
    };
    let mut b = Batcher::new(ds, &cfg)?;
    Ok((0..b.batches_per_epoch()).map(|_| b.next_batch()).collect())
}

/// Sequential greedy packing: walk `order`, start a new row when the next example would not
/// fit. Lengths are ≤ `max` (guaranteed by truncation), so every row is non-empty.
fn pack_greedy(order: &[usize], len: impl Fn(usize) -> usize, max: usize) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut used = 0;
    for &i in order {
        let l = len(i);
        if used + l > max && !cur.is_empty() {
            rows.push(std::mem::take(&mut cur));
            used = 0;
        }
        cur.push(i);
        used += l;
    }
    if !cur.is_empty() {
        rows.push(cur);
    }
    rows
}

/// Lays rows out as a padded `(B, T)` batch (contract in the module docs).
fn build_batch(ds: &Dataset, rows: &[&[usize]], fixed_len: Option<usize>) -> Batch {
    let row_len = |r: &[usize]| -> usize {
        r.iter()
            .map(|&i| ds.examples[i].input_ids.len())
            .sum::<usize>()
    };
    let t = fixed_len.unwrap_or_else(|| rows.iter().map(|r| row_len(r)).max().unwrap_or(0));
    let b = rows.len();
    let mut batch = Batch {
        batch_size: b,
        seq_len: t,
        input_ids: vec![ds.pad_id; b * t],
        labels: vec![IGNORE_INDEX; b * t],
        position_ids: vec![0; b * t],
        segment_ids: vec![0; b * t],
        n_label_tokens: 0,
        n_tokens: 0,
        lines: Vec::with_capacity(b),
    };
    for (r, row) in rows.iter().enumerate() {
        let base = r * t;
        let mut at = 0usize;
        let mut lines = Vec::with_capacity(row.len());
        for (s, &i) in row.iter().enumerate() {
            let e = &ds.examples[i];
            lines.push(e.line);
            for (k, (&id, &label)) in e.input_ids.iter().zip(&e.labels).enumerate() {
                let p = base + at + k;
                batch.input_ids[p] = id;
                // Nothing predicts a segment's first token (see the contract).
                batch.labels[p] = if k == 0 { IGNORE_INDEX } else { label };
                batch.position_ids[p] = k as u32;
                batch.segment_ids[p] = s as u32 + 1;
            }
            at += e.input_ids.len();
        }
        // Padding positions continue from the last real one so an unpacked row is 0..T.
        let last_len = row.last().map_or(0, |&i| ds.examples[i].input_ids.len());
        for (k, p) in (base + at..base + t).enumerate() {
            batch.position_ids[p] = (last_len + k) as u32;
        }
        batch.n_tokens += at;
        batch.lines.push(lines);
    }
    batch.n_label_tokens = batch.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    batch
}
