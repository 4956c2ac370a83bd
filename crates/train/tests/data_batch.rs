//! Batches: the parity fixture's batches, packing without cross-example attention, seeded
//! shuffles, eval splits and bit-exact resume.

mod data_util;

use std::collections::BTreeSet;

use data_util::*;
use qlora_train::data::batch::eval_batches;
use qlora_train::data::{
    Batch, Batcher, DataConfig, DataError, DataPosition, Dataset, EvalSplit, Example, TextMode,
    IGNORE_INDEX,
};

/// `n` examples; example `i` has `lens[i]` tokens `100·i + k` (k = 0..), all labelled.
fn synthetic(lens: &[usize]) -> Dataset {
    let examples = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let ids: Vec<u32> = (0..n as u32).map(|k| 100 * i as u32 + k).collect();
            Example {
                labels: ids.iter().map(|&t| t as i64).collect(),
                input_ids: ids,
                line: i + 1,
            }
        })
        .collect();
    Dataset::from_examples("synthetic.jsonl", examples, 7).unwrap()
}

fn row<T: Copy>(v: &[T], b: &Batch, r: usize) -> Vec<T> {
    v[r * b.seq_len..(r + 1) * b.seq_len].to_vec()
}

/// The eight batches of `qlora-bnb4` written as pre-tokenized JSONL come back as the same
/// (4, 32) tensors in order, with 4·31 label tokens each (the fixture's loss is the mean over
/// batch·(seq−1) tokens).
#[test]
fn parity_fixture_batches_round_trip() {
    let bytes = std::fs::read(repo_fixture("qlora-bnb4/batch.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let steps: Vec<Vec<u32>> = (0..8)
        .map(|s| {
            st.tensor(&format!("step{s}"))
                .unwrap()
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
                .collect()
        })
        .collect();
    let mut jsonl = String::new();
    for s in &steps {
        for r in s.chunks(32) {
            jsonl.push_str(&serde_json::json!({ "input_ids": r }).to_string());
            jsonl.push('\n');
        }
    }
    let cfg = DataConfig {
        max_seq_len: 32,
        batch_size: 4,
        shuffle: false,
        ..DataConfig::default()
    };
    let ds = load_str(&jsonl, &tiny_tokenizer(), &cfg).unwrap();
    assert_eq!(ds.len(), 32);
    let mut b = Batcher::new(&ds, &cfg).unwrap();
    assert_eq!(b.batches_per_epoch(), 8);
    for s in &steps {
        let batch = b.next_batch();
        assert_eq!((batch.batch_size, batch.seq_len), (4, 32));
        assert_eq!(&batch.input_ids, s);
        assert_eq!(batch.n_label_tokens, 4 * 31);
        assert!(!batch.is_packed());
        for r in 0..4 {
            let want: Vec<i64> = std::iter::once(IGNORE_INDEX)
                .chain(s[r * 32 + 1..(r + 1) * 32].iter().map(|&t| t as i64))
                .collect();
            assert_eq!(row(&batch.labels, &batch, r), want);
            assert_eq!(
                row(&batch.position_ids, &batch, r),
                (0..32).collect::<Vec<u32>>()
            );
            assert_eq!(row(&batch.segment_ids, &batch, r), vec![1; 32]);
        }
    }
    assert_eq!(b.position().epoch, 1);
    assert_eq!(b.position().batch, 0);
}

#[test]
fn packing_layout_follows_the_contract() {
    let ds = synthetic(&[5, 3, 7, 2, 6]);
    let cfg = DataConfig {
        max_seq_len: 10,
        batch_size: 3,
        packing: true,
        shuffle: false,
        ..DataConfig::default()
    };
    let mut b = Batcher::new(&ds, &cfg).unwrap();
    assert_eq!(b.rows_per_epoch(), 3);
    let batch = b.next_batch();
    assert_eq!((batch.batch_size, batch.seq_len), (3, 9));
    assert!(batch.is_packed());
    assert_eq!(batch.lines, vec![vec![1, 2], vec![3, 4], vec![5]]);
    // Row 0: example 0 (5 tokens) then example 1 (3 tokens), one pad.
    assert_eq!(
        row(&batch.input_ids, &batch, 0),
        vec![0, 1, 2, 3, 4, 100, 101, 102, 7]
    );
    assert_eq!(
        row(&batch.labels, &batch, 0),
        vec![-100, 1, 2, 3, 4, -100, 101, 102, -100]
    );
    assert_eq!(
        row(&batch.position_ids, &batch, 0),
        vec![0, 1, 2, 3, 4, 0, 1, 2, 3]
    );
    assert_eq!(
        row(&batch.segment_ids, &batch, 0),
        vec![1, 1, 1, 1, 1, 2, 2, 2, 0]
    );
    // Row 2: one example of 6, three pads whose positions continue.
    assert_eq!(
        row(&batch.position_ids, &batch, 2),
        (0..9).collect::<Vec<u32>>()
    );
    assert_eq!(
        row(&batch.labels, &batch, 2)[6..],
        [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    );
    // (5−1) + (3−1) + (7−1) + (2−1) + (6−1) label tokens.
    assert_eq!(batch.n_label_tokens, 18);
    assert_eq!(batch.n_tokens, 23);
    assert_eq!(
        batch.segments(),
        vec![(0, 0, 5), (0, 5, 3), (1, 0, 7), (1, 7, 2), (2, 0, 6)]
    );
    // Block-diagonal causal mask: no attention across the seam at 5, causal within.
    assert!(batch.attends(0, 4, 0));
    assert!(!batch.attends(0, 5, 4));
    assert!(batch.attends(0, 7, 5));
    assert!(!batch.attends(0, 6, 7));
    assert!(!batch.attends(0, 8, 7));
}

/// Packing changes nothing an example sees: each segment carries exactly the ids, labels
/// (after its first token) and positions it has when batched alone, and its mask is the plain
/// causal mask over the segment.
#[test]
fn packed_segments_equal_examples_alone() {
    let lens = [9, 4, 12, 3, 3, 8, 1, 15, 6, 2, 11, 5];
    let ds = synthetic(&lens);
    let packed_cfg = DataConfig {
        max_seq_len: 16,
        batch_size: 2,
        packing: true,
        seed: 3,
        ..DataConfig::default()
    };
    let alone_cfg = DataConfig {
        packing: false,
        shuffle: false,
        batch_size: 1,
        ..packed_cfg.clone()
    };
    let alone: Vec<Batch> = eval_batches(&ds, &alone_cfg).unwrap();
    let mut b = Batcher::new(&ds, &packed_cfg).unwrap();
    let mut seen = BTreeSet::new();
    let mut total_labels = 0;
    for _ in 0..b.batches_per_epoch() {
        let batch = b.next_batch();
        total_labels += batch.n_label_tokens;
        let segs = batch.segments();
        let lines: Vec<usize> = batch.lines.iter().flatten().copied().collect();
        assert_eq!(segs.len(), lines.len());
        for (&(r, start, len), &line) in segs.iter().zip(&lines) {
            assert!(seen.insert(line), "example {line} twice in an epoch");
            let a = &alone[line - 1];
            let at =
                |v: &[u32]| v[r * batch.seq_len + start..r * batch.seq_len + start + len].to_vec();
            assert_eq!(at(&batch.input_ids), a.input_ids[..len].to_vec());
            assert_eq!(at(&batch.position_ids), a.position_ids[..len].to_vec());
            let l = &batch.labels[r * batch.seq_len + start..][..len];
            assert_eq!(l, &a.labels[..len]);
            for i in 0..len {
                for j in 0..batch.seq_len {
                    let inside = j >= start && j < start + len;
                    assert_eq!(
                        batch.attends(r, start + i, j),
                        inside && j <= start + i,
                        "row {r} q {} k {j}",
                        start + i
                    );
                }
            }
        }
    }
    assert_eq!(seen.len(), lens.len());
    assert_eq!(
        total_labels,
        lens.iter().map(|l| l - 1).sum::<usize>(),
        "packing must not change the number of loss terms"
    );
}

/// Every epoch visits every example once, in an order fixed by the seed.
#[test]
fn shuffling_is_seeded_and_complete() {
    let ds = synthetic(&[3; 20]);
    let order = |seed: u64, epochs: usize| -> Vec<Vec<usize>> {
        let cfg = DataConfig {
            max_seq_len: 8,
            batch_size: 3,
            seed,
            ..DataConfig::default()
        };
        let mut b = Batcher::new(&ds, &cfg).unwrap();
        (0..epochs)
            .map(|_| {
                (0..b.batches_per_epoch())
                    .flat_map(|_| b.next_batch().lines.concat())
                    .collect()
            })
            .collect()
    };
    let a = order(1, 3);
    assert_eq!(a, order(1, 3));
    assert_ne!(a, order(2, 3));
    for epoch in &a {
        let mut e = epoch.clone();
        e.sort();
        assert_eq!(e, (1..=20).collect::<Vec<_>>());
    }
    assert_ne!(a[0], a[1]);
    assert_ne!(a[0], (1..=20).collect::<Vec<_>>());
}

/// Stop anywhere (mid-epoch, at an epoch's end), save the position as JSON, resume: the
/// stream continues bit-identically, with packing and shuffling on.
#[test]
fn resume_is_bit_identical() {
    let ds = synthetic(&[5, 3, 7, 2, 6, 4, 4, 9, 1, 8, 3, 3, 5]);
    let cfg = DataConfig {
        max_seq_len: 10,
        batch_size: 2,
        packing: true,
        seed: 11,
        ..DataConfig::default()
    };
    let mut straight = Batcher::new(&ds, &cfg).unwrap();
    let per_epoch = straight.batches_per_epoch();
    let reference: Vec<Batch> = (0..3 * per_epoch).map(|_| straight.next_batch()).collect();
    for stop in [1, per_epoch - 1, per_epoch, per_epoch + 2, 2 * per_epoch] {
        let mut first = Batcher::new(&ds, &cfg).unwrap();
        for _ in 0..stop {
            first.next_batch();
        }
        let saved = serde_json::to_string(&first.position()).unwrap();
        drop(first);
        let pos: DataPosition = serde_json::from_str(&saved).unwrap();
        let mut resumed = Batcher::resume(&ds, &cfg, pos).unwrap();
        for (k, want) in reference[stop..].iter().enumerate() {
            assert_eq!(&resumed.next_batch(), want, "stop {stop}, batch {k}");
        }
    }
}

#[test]
fn resume_refuses_other_data_or_bad_position() {
    let ds = synthetic(&[3, 4, 5, 6]);
    let cfg = DataConfig {
        max_seq_len: 8,
        batch_size: 2,
        ..DataConfig::default()
    };
    let pos = Batcher::new(&ds, &cfg).unwrap().position();
    let other = synthetic(&[3, 4, 5, 7]);
    let e = Batcher::resume(&other, &cfg, pos).unwrap_err();
    assert!(matches!(e, DataError::InvalidPosition { .. }), "{e:?}");
    let e = Batcher::resume(&ds, &cfg, DataPosition { batch: 2, ..pos }).unwrap_err();
    assert!(matches!(e, DataError::InvalidPosition { .. }), "{e:?}");
}

#[test]
fn eval_split_is_seeded_and_disjoint() {
    let ds = synthetic(&[2; 10]);
    let lines = |d: &Dataset| d.examples.iter().map(|e| e.line).collect::<Vec<_>>();
    let (train, eval) = ds.clone().split_eval(EvalSplit::Fraction(0.2), 5).unwrap();
    let eval = eval.unwrap();
    assert_eq!((train.len(), eval.len()), (8, 2));
    let mut all: Vec<usize> = lines(&train).into_iter().chain(lines(&eval)).collect();
    all.sort();
    assert_eq!(all, (1..=10).collect::<Vec<_>>());
    // File order is kept within each part.
    assert!(lines(&train).windows(2).all(|w| w[0] < w[1]));
    let (_, again) = ds.clone().split_eval(EvalSplit::Fraction(0.2), 5).unwrap();
    assert_eq!(lines(&again.unwrap()), lines(&eval));
    let differs = (0..20u64).any(|s| {
        lines(
            &ds.clone()
                .split_eval(EvalSplit::Count(2), s)
                .unwrap()
                .1
                .unwrap(),
        ) != lines(&eval)
    });
    assert!(differs);
    let (t, e) = ds.clone().split_eval(EvalSplit::Count(3), 5).unwrap();
    assert_eq!((t.len(), e.unwrap().len()), (7, 3));
    // A tiny fraction still holds out one example.
    assert_eq!(
        ds.clone()
            .split_eval(EvalSplit::Fraction(0.01), 5)
            .unwrap()
            .1
            .unwrap()
            .len(),
        1
    );
    assert!(ds
        .clone()
        .split_eval(EvalSplit::None, 5)
        .unwrap()
        .1
        .is_none());
    let e = ds.split_eval(EvalSplit::Count(10), 5).unwrap_err();
    assert!(
        matches!(e, DataError::InvalidConfig { key: "eval", .. }),
        "{e:?}"
    );
}

#[test]
fn fixed_padding_and_drop_last() {
    let ds = synthetic(&[3, 5, 2, 4, 6]);
    let cfg = DataConfig {
        max_seq_len: 8,
        batch_size: 2,
        shuffle: false,
        pad_to_max_seq_len: true,
        drop_last: true,
        ..DataConfig::default()
    };
    let mut b = Batcher::new(&ds, &cfg).unwrap();
    assert_eq!(b.batches_per_epoch(), 2);
    let x = b.next_batch();
    assert_eq!((x.batch_size, x.seq_len), (2, 8));
    assert_eq!(row(&x.input_ids, &x, 0), vec![0, 1, 2, 7, 7, 7, 7, 7]);
    assert_eq!(row(&x.segment_ids, &x, 0), vec![1, 1, 1, 0, 0, 0, 0, 0]);
    b.next_batch();
    // The fifth example is dropped at the epoch's end; the next epoch starts over.
    assert_eq!(b.position().epoch, 1);
    let keep = DataConfig {
        drop_last: false,
        ..cfg
    };
    let mut b = Batcher::new(&ds, &keep).unwrap();
    assert_eq!(b.batches_per_epoch(), 3);
    b.next_batch();
    b.next_batch();
    assert_eq!(b.next_batch().batch_size, 1);
}

#[test]
fn eval_batches_cover_the_set_once_in_order() {
    let ds = synthetic(&[3, 5, 2, 4, 6]);
    let cfg = DataConfig {
        max_seq_len: 8,
        batch_size: 2,
        ..DataConfig::default()
    };
    let batches = eval_batches(&ds, &cfg).unwrap();
    let lines: Vec<usize> = batches.iter().flat_map(|b| b.lines.concat()).collect();
    assert_eq!(lines, vec![1, 2, 3, 4, 5]);
}

/// `.txt` in chunk mode: the whole file tokenized once, eos appended, cut into `max_seq_len`
/// pieces that concatenate back to it, each tagged with the line its first token is on.
#[test]
fn txt_chunks_cover_the_whole_file() {
    let tok = tiny_tokenizer();
    let corpus = repo_fixture("tiny-llama/corpus.txt");
    let cfg = DataConfig {
        max_seq_len: 64,
        text_mode: TextMode::Chunks,
        ..DataConfig::default()
    };
    let ds = Dataset::load(&corpus, &tok, &cfg).unwrap();
    let text = std::fs::read_to_string(&corpus).unwrap();
    let mut whole = tok.encode(&text, true).unwrap().ids;
    whole.push(tok.eos_id().unwrap());
    let joined: Vec<u32> = ds
        .examples
        .iter()
        .flat_map(|e| e.input_ids.clone())
        .collect();
    assert_eq!(joined, whole);
    assert!(ds.examples[..ds.len() - 1]
        .iter()
        .all(|e| e.input_ids.len() == 64));
    assert!(ds.warnings.is_empty());
    assert_eq!(ds.examples[0].line, 1);
    assert!(ds.examples.windows(2).all(|w| w[0].line <= w[1].line));
    let last = ds.examples.last().unwrap().line;
    assert!(last > 380 && last <= 400, "{last}");
    // Paragraph mode on the same file: it has no blank lines, so one (truncated) example.
    let para = Dataset::load(
        &corpus,
        &tok,
        &DataConfig {
            text_mode: TextMode::Paragraphs,
            ..cfg
        },
    )
    .unwrap();
    assert_eq!(para.len(), 1);
    assert_eq!(para.warnings.len(), 1);
}

/// The settings round-trip through JSON (checkpoints store them beside the position).
#[test]
fn data_config_serializes() {
    let c = DataConfig {
        eval: EvalSplit::Fraction(0.1),
        text_mode: TextMode::Chunks,
        packing: true,
        ..DataConfig::default()
    };
    let s = serde_json::to_string(&c).unwrap();
    assert!(s.contains("\"eval\":{\"fraction\":0.1}"), "{s}");
    assert_eq!(serde_json::from_str::<DataConfig>(&s).unwrap(), c);
    let partial: DataConfig = serde_json::from_str("{\"max_seq_len\": 128}").unwrap();
    assert_eq!(partial.max_seq_len, 128);
    assert_eq!(partial.seed, DataConfig::default().seed);
    assert!(serde_json::from_str::<DataConfig>("{\"max_seq_lenn\": 1}").is_err());
}
