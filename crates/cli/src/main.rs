use clap::Parser;

/// QLoRA fine-tuning: NF4 4-bit base weights, LoRA adapters, one binary.
#[derive(Parser)]
#[command(name = "qlora", version, about)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
}
