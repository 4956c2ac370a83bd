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

/// Keep freed memory in the process instead of returning it to the kernel.
///
/// The CPU backend allocates each step's activations afresh (the schedule owns its buffers),
/// and glibc serves large allocations (the (N, V) logits are ~100 MB for SmolLM2 at 4 × 128)
/// with fresh `mmap`s that it unmaps on free: every step then page-faults and kernel-zeroes
/// hundreds of MB again (measured: 2.0 M minor faults and 7.4 s of system time in 12 SmolLM2
/// steps; 0.3 M and 2.5 s with this, 8 % less wall time). Raising the mmap and trim thresholds
/// keeps those pages in the heap for the next step; peak memory is unchanged (the same buffers
/// are live at the peak either way). A glibc that refuses a value keeps its default.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() {
    keep_freed_memory();
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
