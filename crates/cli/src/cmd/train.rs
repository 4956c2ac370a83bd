use anyhow::{bail, Context, Result};
use qlora_train::data::TextMode;
use qlora_train::trainer::{Event, Outcome, Summary, TrainBackend, TrainConfig, Trainer};
use qlora_train::{CpuBackend, CudaBackend};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::units::{human_bytes, human_count};

/// The demo settings (also `examples/tiny-demo.toml`), with the bundled model and data.
const DEMO_TOML: &str = include_str!("../../../../examples/tiny-demo.toml");
const DEMO_DATA: &[u8] = include_bytes!("../../../train/assets/demo/train.jsonl");
/// Where the no-argument demo writes its data (relative to the working directory).
const DEMO_DATA_PATH: &str = "runs/tiny-demo-data/train.jsonl";

/// Fine-tune a LoRA adapter (QLoRA: on an NF4 4-bit base) on the GPU or the CPU; no arguments:
/// the demo.
///
/// Settings come from a TOML file (--config) whose keys are the flags' names with `_`
/// (`--lora-r 16` ⇄ `lora_r = 16`); a flag given on the command line wins over the file.
/// With no arguments at all, trains the bundled tiny Llama on the bundled demo data
/// (examples/tiny-demo.toml) in well under a minute and writes everything under runs/.
///
/// Writes into --output-dir: `adapter/` (PEFT: adapter_config.json + adapter_model.safetensors),
/// `checkpoint-<step>/` every --save-every steps (adapter, optimizer state, schedule, data
/// position, RNG state; written to a temporary directory and renamed), `metrics.jsonl` (one
/// JSON line per step and per evaluation) and `loss.png` (train and eval loss). Ctrl-C writes
/// a checkpoint and exits; `--resume DIR` continues from one bit-identically.
#[derive(clap::Args, Default)]
pub struct Args {
    /// TOML config file (keys = flag names with `_`).
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Continue from this checkpoint directory, or from the newest checkpoint-<step> inside
    /// this output directory (the stored config; flags given here override).
    #[arg(long)]
    pub resume: Option<PathBuf>,

    /// Hugging Face model directory (f32/bf16/f16 safetensors, or a bitsandbytes 4-bit one).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Directory with tokenizer.json [default: the model directory].
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Training data: .jsonl ({"text"}, {"prompt","completion"}, {"messages"},
    /// {"input_ids","labels"?}) or .txt.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Separate evaluation data [default: --eval-fraction / --eval-count of --data].
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Output directory [default: runs/qlora].
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Frozen base: nf4 (QLoRA, quantized on load) or dense [default: nf4].
    #[arg(long)]
    pub base: Option<String>,
    /// cuda, cpu, or auto: the GPU when one is usable, else the CPU with a one-line notice
    /// [default: auto].
    #[arg(long)]
    pub device: Option<String>,

    /// LoRA rank [default: 16].
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA alpha (scale = alpha / r) [default: 32].
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Dropout on the LoRA branch input [default: 0.05].
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Comma-separated module names (q_proj,v_proj,…) or all-linear [default: all-linear].
    #[arg(long, value_delimiter = ',')]
    pub target_modules: Option<Vec<String>>,
    /// Modules trained in full: lm_head, embed_tokens (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub modules_to_save: Option<Vec<String>>,
    /// rsLoRA scaling alpha/√r.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub use_rslora: Option<bool>,
    /// Start from this PEFT adapter directory instead of a fresh one.
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,

    /// Peak learning rate [default: 2e-4].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Decoupled weight decay [default: 0].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    #[arg(long)]
    pub adam_eps: Option<f64>,
    /// Global gradient-norm clip, 0 = off [default: 0.3].
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// adamw (32-bit state) or adamw_8bit; paged_adamw_32bit / paged_adamw_8bit keep the
    /// state in CUDA managed memory, paged per --paging [default: adamw].
    #[arg(long)]
    pub optim: Option<String>,
    /// When a paged optimizer's state goes back to host memory after a step: always, never,
    /// or above:N[K|M|G] (when the next step needs more than N bytes beyond the free memory)
    /// [default: above:0].
    #[arg(long)]
    pub paging: Option<String>,
    /// constant, linear or cosine, each after a linear warmup [default: constant].
    #[arg(long)]
    pub lr_scheduler: Option<String>,
    /// Warmup steps (0: --warmup-ratio of all steps).
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Warmup as a fraction of all steps [default: 0.03].
    #[arg(long)]
    pub warmup_ratio: Option<f64>,

    /// Optimizer steps; 0 = --epochs passes over the data [default: 0].
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Passes over the data when --max-steps is 0 [default: 1].
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Micro-batches per optimizer step; the loss is normalised by the label tokens of all
    /// of them, exactly as one large batch [default: 1].
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Evaluate every N steps (and at the start and end) [default: 0 = start and end only].
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Checkpoint every N steps, 0 = never [default: 100].
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Keep only the newest N checkpoints, 0 = all [default: 0].
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Seed of the adapter init, data order and dropout [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Recompute each layer in backward (less memory, same gradients).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub gradient_checkpointing: Option<bool>,

    /// Longest sequence in tokens; longer ones are truncated with a warning (or refused with
    /// --strict) [default: the model's max positions, at most 512].
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Sequences per micro-batch [default: 4].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Train on every token, not only completions / assistant turns.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub train_on_inputs: Option<bool>,
    /// Append eos to text and prompt/completion records [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub append_eos: Option<bool>,
    /// Refuse sequences longer than --max-seq-len instead of truncating them.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub strict: Option<bool>,
    /// .txt files: paragraphs (one example each) or chunks (the whole file cut into
    /// --max-seq-len pieces) [default: paragraphs].
    #[arg(long)]
    pub text_mode: Option<String>,
    /// Pack short examples into rows of up to --max-seq-len tokens. Attention does not cross
    /// examples: each packed example is computed as if alone (block-diagonal mask, positions
    /// restarting at 0), so the loss equals the unpacked one; on the CPU this keeps packing's
    /// batching but not its compute saving.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub packing: Option<bool>,
    /// Shuffle the data every epoch (seeded) [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub shuffle: Option<bool>,
    /// Hold out this fraction of --data for evaluation.
    #[arg(long)]
    pub eval_fraction: Option<f64>,
    /// Hold out this many examples of --data for evaluation.
    #[arg(long)]
    pub eval_count: Option<usize>,
    /// Pad every batch to --max-seq-len.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub pad_to_max_seq_len: Option<bool>,
    /// Drop each epoch's last, incomplete batch.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub drop_last: Option<bool>,
}

macro_rules! apply {
    ($a:expr, $c:expr; $($f:ident),*; opt $($o:ident),*) => {{
        $( if let Some(v) = $a.$f.clone() { $c.$f = v; } )*
        $( if let Some(v) = $a.$o.clone() { $c.$o = Some(v); } )*
    }};
}

impl Args {
    /// True when nothing at all was given (the demo).
    fn is_empty(&self) -> bool {
        let mut probe = TrainConfig::default();
        let before = probe.clone();
        self.apply(&mut probe).is_ok()
            && probe == before
            && self.config.is_none()
            && self.resume.is_none()
            && self.text_mode.is_none()
    }

    /// Writes every given flag into `c`.
    fn apply(&self, c: &mut TrainConfig) -> Result<()> {
        apply!(self, c;
            output_dir, base, device, lora_r, lora_alpha, lora_dropout, target_modules,
            modules_to_save, use_rslora, lr, weight_decay, adam_beta1, adam_beta2, adam_eps,
            max_grad_norm, optim, paging, lr_scheduler, warmup_steps, warmup_ratio, max_steps, epochs,
            grad_accum, eval_every, save_every, save_total_limit, seed, gradient_checkpointing,
            max_seq_len, batch_size, train_on_inputs, append_eos, strict, packing, shuffle,
            eval_fraction, eval_count, pad_to_max_seq_len, drop_last;
            opt model, tokenizer, data, eval_data, init_adapter);
        if let Some(m) = &self.text_mode {
            c.text_mode = serde_json::from_value::<TextMode>(serde_json::Value::from(m.as_str()))
                .map_err(|_| {
                anyhow::anyhow!(
                    "invalid config value `text_mode`: `{m}` (expected paragraphs or chunks)"
                )
            })?;
        }
        Ok(())
    }
}

/// Parses a TOML config (unknown keys and wrong types are errors naming the key).
pub fn read_config(path: &Path) -> Result<TrainConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_config(&text).with_context(|| format!("config {}", path.display()))
}

fn parse_config(text: &str) -> Result<TrainConfig> {
    toml::from_str::<TrainConfig>(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim()))
}

/// The demo: the bundled model and data written under runs/, the demo settings.
fn demo_config() -> Result<TrainConfig> {
    let model = PathBuf::from("runs/tiny-llama");
    crate::bundled::write_tiny_llama(&model)?;
    let data = PathBuf::from(DEMO_DATA_PATH);
    std::fs::create_dir_all(data.parent().unwrap()).context("creating runs/tiny-demo-data")?;
    std::fs::write(&data, DEMO_DATA).with_context(|| format!("writing {}", data.display()))?;
    let mut c = parse_config(DEMO_TOML).context("the bundled demo config")?;
    c.model = Some(model);
    c.data = Some(data);
    println!(
        "no arguments: fine-tuning the bundled tiny Llama on the bundled demo data \
         (settings: examples/tiny-demo.toml)"
    );
    Ok(c)
}

fn print_summary(s: &Summary, c: &TrainConfig) {
    let m = &s.model;
    println!("device     {}", s.device);
    println!("model      {}", s.model_dir.display());
    println!(
        "           {:?}: {} layers, hidden {}, {} heads ({} kv), MLP {}, vocab {}, max positions {}",
        m.arch,
        m.num_layers,
        m.hidden_size,
        m.num_heads,
        m.num_kv_heads,
        m.intermediate_size,
        m.vocab_size,
        m.max_position_embeddings
    );
    println!(
        "base       {}",
        if s.nf4_base {
            format!(
                "NF4, {} for the quantized projections",
                human_bytes(s.nf4_bytes as u64)
            )
        } else {
            "dense f32 (not quantized)".to_string()
        }
    );
    println!("parameters {}", s.params.peft_line());
    match &s.adapter_from {
        Some(p) => println!("adapter    from {}", p.display()),
        None => println!(
            "adapter    LoRA r {} alpha {} dropout {} on {}{}",
            c.lora_r,
            c.lora_alpha,
            c.lora_dropout,
            c.target_modules.join(","),
            if c.modules_to_save.is_empty() {
                String::new()
            } else {
                format!(" + full {}", c.modules_to_save.join(","))
            }
        ),
    }
    println!(
        "memory     predicted peak {}: base {} ({}), adapter + grads + optimizer {}, \
         activations of one {}×{} micro-batch {}{}",
        human_bytes(s.memory.total() as u64),
        human_bytes(s.memory.base as u64),
        match (s.device.starts_with("cpu"), s.nf4_base) {
            (true, true) if qlora_train::cpu::reads_nf4_codes::<f32>(64) => {
                "NF4 codes read by the GEMM + f32 embeddings, norms and lm_head on the CPU"
            }
            (true, true) => "f32 compute copy on the CPU + NF4 codes",
            (true, false) => "f32 on the CPU",
            (false, true) => {
                "NF4 codes + bf16 norms and lm_head on the GPU (input embedding in host memory)"
            }
            (false, false) => "bf16 on the GPU (input embedding in host memory)",
        },
        human_bytes(s.memory.adapter as u64),
        c.batch_size,
        trainer_seq_len(c, s),
        human_bytes(s.memory.activations as u64),
        if s.memory.context > 0 {
            format!(", CUDA context {}", human_bytes(s.memory.context as u64))
        } else {
            String::new()
        }
    );
    println!(
        "data       {} examples, {} tokens ({} trained on); eval {} examples",
        human_count(s.train_examples as u64),
        human_count(s.train_tokens as u64),
        human_count(s.train_label_tokens as u64),
        s.eval_examples
    );
    println!(
        "schedule   {} steps ({} batches/epoch × {} accumulated, batch {}), lr {} {}",
        s.total_steps, s.batches_per_epoch, c.grad_accum, c.batch_size, c.lr, c.lr_scheduler
    );
    for w in &s.warnings {
        eprintln!("warning: {w}");
    }
}

fn trainer_seq_len(c: &TrainConfig, s: &Summary) -> usize {
    c.data_config(Some(s.model.max_position_embeddings))
        .max_seq_len
}

/// A 24-cell progress bar `[████░░░░]` for `done` of `total` steps (eighth-cell resolution).
fn bar(done: u64, total: u64) -> String {
    const CELLS: u64 = 24;
    const PARTIAL: [char; 8] = [' ', '▏', '▎', '▍', '▌', '▋', '▊', '▉'];
    let eighths = (done.min(total) * CELLS * 8)
        .checked_div(total)
        .unwrap_or(CELLS * 8);
    let (full, part) = ((eighths / 8) as usize, (eighths % 8) as usize);
    let mut s = String::with_capacity(CELLS as usize * 3 + 2);
    s.push('[');
    s.extend(std::iter::repeat_n('█', full));
    if full < CELLS as usize {
        s.push(if part > 0 { PARTIAL[part] } else { '░' });
        s.extend(std::iter::repeat_n('░', CELLS as usize - full - 1));
    }
    s.push(']');
    s
}

fn eta(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

pub fn run(a: Args) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        // The handler only raises the flag; the loop checks it between steps and writes a
        // checkpoint before returning.
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond Ctrl-C: exiting without a checkpoint");
                std::process::exit(130);
            }
            eprintln!("\nCtrl-C: writing a checkpoint after this step…");
        });
    }
    if let Some(dir) = &a.resume {
        let dir = qlora_train::trainer::resolve_checkpoint(dir)?;
        // The device is decided from the stored config with this command's flags applied.
        let mut probe = qlora_train::trainer::load_state(&dir)?.config;
        a.apply(&mut probe)?;
        return match choose_device(&probe)? {
            Chosen::Cuda(be) => drive(resume_on(be, &a, &dir)?, &stop),
            Chosen::Cpu => drive(resume_on(CpuBackend::new(), &a, &dir)?, &stop),
        };
    }
    let mut c = if a.is_empty() {
        demo_config()?
    } else if let Some(p) = &a.config {
        read_config(p)?
    } else {
        TrainConfig::default()
    };
    a.apply(&mut c)?;
    if c.model.is_none() {
        bail!("no model: pass --model DIR or `model = \"…\"` in --config (or no arguments at all for the demo)");
    }
    if c.data.is_none() {
        bail!("no training data: pass --data FILE or `data = \"…\"` in --config");
    }
    match choose_device(&c)? {
        Chosen::Cuda(be) => drive(Trainer::new_on(be, c)?, &stop),
        Chosen::Cpu => drive(Trainer::new_on(CpuBackend::new(), c)?, &stop),
    }
}

/// Where `qlora train` runs.
enum Chosen {
    Cuda(CudaBackend),
    Cpu,
}

/// The `device` key: `cuda` opens the GPU or fails with the reason; `cpu` is the CPU; `auto`
/// opens the GPU when one is usable and otherwise says why in one line and uses the CPU.
fn choose_device(c: &TrainConfig) -> Result<Chosen> {
    Ok(match c.device_choice()? {
        Some(false) => Chosen::Cpu,
        Some(true) => {
            Chosen::Cuda(CudaBackend::new().map_err(|e| anyhow::anyhow!("--device cuda: {e}"))?)
        }
        None => match CudaBackend::new() {
            Ok(be) => Chosen::Cuda(be),
            Err(e) => {
                eprintln!("{e}; training on the CPU");
                Chosen::Cpu
            }
        },
    })
}

/// `Trainer::resume_on` with this command's flags applied to the stored config.
fn resume_on<B: TrainBackend>(be: B, a: &Args, dir: &Path) -> Result<Trainer<B>> {
    let mut err = None;
    let t = Trainer::resume_on(be, dir, |c| {
        if let Err(e) = a.apply(c) {
            err = Some(e);
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    let t = t?;
    println!("resuming {} at step {}", dir.display(), t.step);
    Ok(t)
}

/// Runs the loop with progress lines and the end-of-run report.
fn drive<B: TrainBackend>(mut trainer: Trainer<B>, stop: &AtomicBool) -> Result<()> {
    print_summary(trainer.summary(), &trainer.config);
    let total = trainer.total_steps;
    let start_step = trainer.step;
    let t0 = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut on_event = |e: Event<'_>| match e {
        Event::Step(r) => {
            let done = (r.step - start_step) as f64;
            let per = t0.elapsed().as_secs_f64() / done.max(1.0);
            let line = format!(
                "step {:>5}/{total} | loss {:.4} | lr {:.3e} | grad norm {:.3} | {:.0} tok/s | ETA {}",
                r.step,
                r.loss,
                r.lr,
                r.grad_norm,
                r.tokens_per_s,
                eta(per * (total - r.step) as f64)
            );
            if tty {
                // In place, with a bar: the line is rewritten every step.
                eprint!("\r{} {line}", bar(r.step - start_step, total - start_step));
                if r.step == total {
                    eprintln!();
                }
            } else {
                eprintln!("{line}");
            }
            let _ = std::io::stderr().flush();
        }
        Event::Eval(r) => {
            if tty {
                eprintln!();
            }
            eprintln!(
                "eval  step {:>5} | loss {:.4} | perplexity {:.3}",
                r.step, r.eval_loss, r.eval_perplexity
            );
        }
        Event::Checkpoint(p) => {
            if tty {
                eprintln!();
            }
            eprintln!("checkpoint {}", p.display());
        }
    };
    let outcome = trainer.run(None, stop, &mut on_event)?;
    let out = trainer.config.output_dir.clone();
    let secs = t0.elapsed().as_secs_f64();
    match outcome {
        Outcome::Finished { adapter } => {
            let h = &trainer.history;
            let first = h.steps.first().map(|r| r.loss).unwrap_or(f64::NAN);
            let last = h.steps.last().map(|r| r.loss).unwrap_or(f64::NAN);
            println!(
                "done: {} steps in {:.1} s, train loss {:.4} → {:.4}{}",
                trainer.step,
                secs,
                first,
                last,
                h.evals
                    .last()
                    .map(|e| format!(
                        ", eval loss {:.4} (perplexity {:.3})",
                        e.eval_loss, e.eval_perplexity
                    ))
                    .unwrap_or_default()
            );
            println!("adapter    {}", adapter.display());
            println!("loss curve {}", out.join("loss.png").display());
            println!("metrics    {}", out.join("metrics.jsonl").display());
            if let Some(m) = &trainer.config.model {
                // The bundled demo's data continues number sequences; any other run gets a
                // placeholder prompt, and --chat where the model has a chat template.
                let demo = trainer.config.data.as_deref() == Some(Path::new(DEMO_DATA_PATH));
                let chat = trainer.tokenizer.chat_template().is_some();
                println!(
                    "try        qlora generate --model {} --adapter {} --prompt \"{}\"{}",
                    m.display(),
                    adapter.display(),
                    if demo { "Step down from 91:" } else { "…" },
                    if chat && !demo { " --chat" } else { "" }
                );
            }
        }
        Outcome::Interrupted { checkpoint } => {
            println!(
                "interrupted at step {}: checkpoint {}\ncontinue with: qlora train --resume {}",
                trainer.step,
                checkpoint.display(),
                checkpoint.display()
            );
            std::process::exit(130);
        }
        Outcome::Paused { step } => println!("stopped at step {step}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_toml_parses_and_validates() {
        let mut c = parse_config(DEMO_TOML).unwrap();
        c.model = Some("m".into());
        c.validate().unwrap();
        assert_eq!(c.modules_to_save, vec!["lm_head".to_string()]);
    }

    #[test]
    fn every_example_config_parses_and_validates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let mut c = read_config(&p).unwrap();
                c.model.get_or_insert_with(|| "m".into());
                c.validate()
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 2);
    }

    #[test]
    fn bar_fills_in_eighths_and_is_always_24_cells() {
        let cells = |s: &str| s.chars().count() - 2;
        for (done, total) in [(0, 10), (1, 10), (5, 10), (10, 10), (3, 0), (7, 1000)] {
            assert_eq!(cells(&bar(done, total)), 24, "{done}/{total}");
        }
        assert_eq!(bar(0, 10), format!("[{}]", "░".repeat(24)));
        assert_eq!(bar(10, 10), format!("[{}]", "█".repeat(24)));
        // 1/10 of 24 cells = 2.4 cells = 2 full cells and 3 eighths.
        assert_eq!(bar(1, 10), format!("[██▍{}]", "░".repeat(21)));
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse_config("lora_rank = 3\n").unwrap_err().to_string();
        assert!(e.contains("lora_rank"), "{e}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let mut c = parse_config("lr = 0.5\nlora_r = 3\n").unwrap();
        let a = Args {
            lr: Some(0.25),
            ..Args::default()
        };
        a.apply(&mut c).unwrap();
        assert_eq!((c.lr, c.lora_r), (0.25, 3));
    }
}
