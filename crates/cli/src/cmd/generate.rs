use anyhow::Result;
use qlora_train::data::Tokenizer;
use qlora_train::trainer::generate::{generate, prompt_ids, GenerateOptions};
use qlora_train::{Adapter, AdapterWeights, BaseFormat, CpuBackend, Model};
use std::io::Write;
use std::path::PathBuf;

/// Generate text from a prompt with a model (+ adapter) on the CPU, with a KV cache.
#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter directory to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// Render the prompt as a user turn with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 = greedy; otherwise sample from softmax(logits / T).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Directory with tokenizer.json [default: the model directory].
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Frozen base: nf4 (quantized on load, as QLoRA trains) or dense.
    #[arg(long, default_value = "nf4")]
    pub base: String,
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
    let adapter = match &a.adapter {
        Some(dir) => Some(Adapter::new(
            &be,
            &AdapterWeights::load(dir, &model.config)?,
        )),
        None => None,
    };
    let ids = prompt_ids(&tok, &a.prompt, a.chat)?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        seed: a.seed,
        chat: a.chat,
        use_cache: true,
    };
    // A plain prompt is continued in place; a chat reply is the next turn, on its own line.
    if a.chat {
        println!("{}", a.prompt);
    } else {
        print!("{}", a.prompt);
    }
    let mut out = std::io::stdout();
    let g = generate(&be, &model, adapter.as_ref(), &tok, &ids, &opts, &mut |s| {
        print!("{s}");
        let _ = out.flush();
    })?;
    println!();
    eprintln!(
        "[{} prompt tokens, {} new{}]",
        g.prompt_ids.len(),
        g.new_ids.len(),
        if g.stopped {
            ", stopped at end token"
        } else {
            ""
        }
    );
    Ok(())
}
