//! The `qlora` binary: argument parsing, progress and reporting. No training or format logic
//! lives here; every subcommand calls a library crate.

mod bundled;
mod cmd;
mod units;

use clap::{Parser, Subcommand};

/// QLoRA fine-tuning in one binary: NF4 4-bit base weights, LoRA adapters, no Python.
#[derive(Parser)]
#[command(name = "qlora", version, about, long_about = None)]
struct Cli {
    /// Worker threads for CPU work (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Quantize a Hugging Face model directory to the bitsandbytes NF4 4-bit format.
    Quantize(cmd::quantize::Args),
    /// Turn a bitsandbytes 4-bit checkpoint back into a plain f32/bf16/f16 checkpoint.
    Dequantize(cmd::dequantize::Args),
    /// Per-tensor dtype, shape, quantization state and size; with --against, quantization error.
    Inspect(cmd::inspect::Args),
    // (about texts: the doc comments of each Args struct)
    Train(Box<cmd::train::Args>),
    Eval(cmd::eval::Args),
    Merge(cmd::merge::Args),
    Generate(cmd::generate::Args),
    Memory(cmd::memory::Args),
    Bench(cmd::bench::Args),
}

fn main() {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
        {
            eprintln!("error: --threads {n}: {e}");
            std::process::exit(2);
        }
    }
    let result = match cli.command {
        Command::Quantize(a) => cmd::quantize::run(a),
        Command::Dequantize(a) => cmd::dequantize::run(a),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Train(a) => cmd::train::run(*a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Merge(a) => cmd::merge::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Memory(a) => cmd::memory::run(a),
        Command::Bench(a) => cmd::bench::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {}", report(&e));
        std::process::exit(1);
    }
}

/// The error and its causes, `: `-separated (anyhow's `{:#}`), except a cause whose text the
/// message so far already ends with: many library errors print their source themselves.
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if out.ends_with(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}
