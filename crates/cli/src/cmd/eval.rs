use anyhow::{Context, Result};
use qlora_train::data::{DataConfig, Dataset, Tokenizer};
use qlora_train::{evaluate, Adapter, AdapterWeights, BaseFormat, CpuBackend, EvalOptions, Model};
use std::path::PathBuf;

/// Loss and perplexity of a model (+ adapter) on a data file.
///
/// The loss covers every token of each record (the model predicts token t+1 from 0..=t; no
/// eos is appended, as transformers' `tokenizer(text)`); --dump-logits writes them.
#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter directory to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Data: .jsonl in any format `qlora train` reads, or .txt.
    #[arg(long)]
    pub data: PathBuf,
    /// Directory with tokenizer.json [default: the model directory].
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Write `input_ids` [N, T] and `logits` [N, T, V] (f32) to this safetensors file.
    #[arg(long)]
    pub dump_logits: Option<PathBuf>,
    /// Frozen base: dense (as stored) or nf4 (quantized on load, as QLoRA trained it).
    #[arg(long, default_value = "dense")]
    pub base: String,
    /// Longest sequence; longer ones are truncated (reported).
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: usize,
    /// Sequences per forward.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
}

pub fn run(a: Args) -> Result<()> {
    let format = match a.base.as_str() {
        "dense" => BaseFormat::Dense,
        "nf4" => BaseFormat::QLORA,
        o => anyhow::bail!("invalid value `{o}` for --base (expected dense or nf4)"),
    };
    let be = CpuBackend::<f32>::new();
    let model = Model::load(&be, &a.model, format)?;
    let tok = Tokenizer::from_model_dir(a.tokenizer.as_ref().unwrap_or(&a.model))?;
    tok.check_fits_vocab(model.config.vocab_size)?;
    // Every record as the token sequence training would see, with no eos appended (as
    // transformers' `tokenizer(text)`), not truncated here (evaluate reports truncation).
    let cfg = DataConfig {
        max_seq_len: usize::MAX / 2,
        train_on_inputs: true,
        append_eos: false,
        shuffle: false,
        ..DataConfig::default()
    };
    let ds = Dataset::load(&a.data, &tok, &cfg)?;
    for w in ds.warning_summary() {
        eprintln!("warning: {w}");
    }
    let seqs: Vec<Vec<u32>> = ds.examples.iter().map(|e| e.input_ids.clone()).collect();
    let adapter = match &a.adapter {
        Some(dir) => Some(Adapter::new(
            &be,
            &AdapterWeights::load(dir, &model.config)?,
        )),
        None => None,
    };
    let opts = EvalOptions {
        max_seq_len: a.max_seq_len,
        batch_size: a.batch_size,
        dump_logits: a.dump_logits.clone(),
        pad_id: tok.pad_id(),
    };
    let r = evaluate(&be, &model, adapter.as_ref(), &seqs, &opts)
        .with_context(|| format!("evaluating {}", a.data.display()))?;
    println!(
        "eval loss {:.6} | perplexity {:.4} | {} sequences, {} predicted tokens{}",
        r.loss,
        r.perplexity,
        r.sequences,
        r.tokens,
        if r.truncated > 0 {
            format!(", {} truncated to {}", r.truncated, a.max_seq_len)
        } else {
            String::new()
        }
    );
    if let Some(p) = &a.dump_logits {
        println!("logits     {}", p.display());
    }
    Ok(())
}
