use crate::units::human_bytes;
use anyhow::{Context, Result};
use qlora_nf4::convert::inspect;
use std::path::PathBuf;

/// List every tensor of a checkpoint directory with dtype, shape, quantization state and size.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory (plain or bitsandbytes 4-bit).
    pub dir: PathBuf,
    /// The original unquantized model: also print the quantization error of every NF4 tensor.
    #[arg(long)]
    pub against: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let (rows, overall) = inspect(&a.dir, a.against.as_deref())
        .with_context(|| format!("inspecting {}", a.dir.display()))?;
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(4);
    let with_err = a.against.is_some();
    print!(
        "{:<width$}  {:<5} {:<14} {:>10}  quantization",
        "tensor", "dtype", "shape", "bytes"
    );
    if with_err {
        print!("  {:>10} {:>10} {:>9}", "mean|Δ|", "max|Δ|", "rel.err");
    }
    println!();
    let mut total = 0;
    for r in &rows {
        total += r.bytes;
        let shape = format!("{:?}", r.shape);
        print!(
            "{:<width$}  {:<5} {:<14} {:>10}  {}",
            r.name,
            r.dtype,
            shape,
            r.bytes,
            r.quant.as_deref().unwrap_or("-")
        );
        if let Some(e) = &r.error {
            print!(
                "  {:>10.3e} {:>10.3e} {:>9.4}",
                e.mean_abs, e.max_abs, e.relative
            );
        }
        println!();
    }
    let n_nf4 = rows.iter().filter(|r| r.quant.is_some()).count();
    println!(
        "{} tensors ({} NF4), {} in total",
        rows.len(),
        n_nf4,
        human_bytes(total)
    );
    if let Some(e) = overall {
        println!(
            "quantization error over {} NF4 parameters: mean |Δ| {:.4e}, max |Δ| {:.4e}, relative (‖Δ‖/‖W‖) {:.4}",
            e.numel, e.mean_abs, e.max_abs, e.relative
        );
    }
    Ok(())
}
