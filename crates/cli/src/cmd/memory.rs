use anyhow::{bail, Result};
use qlora_train::plan::{self, DeviceDtype, MemoryPlan, PlanDevice, PlanRequest};
use qlora_train::BaseFormat;

use super::step::StepArgs;

/// Predict the peak device memory of a QLoRA training step, line by line, from the same
/// planner the trainer allocates from (no GPU needed, nothing loaded but config.json).
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub step: StepArgs,
    /// cuda or cpu.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Activation and 16-bit weight dtype: bf16 or f32 [default: bf16 on cuda, f32 on cpu].
    #[arg(long)]
    pub device_dtype: Option<String>,
    /// nf4 (QLoRA: blocksize 64, double quant) or dense frozen projections.
    #[arg(long, default_value = "nf4")]
    pub base: String,
    /// Predict step buffers served by qlora-cuda's caching pool (size classes, per-class
    /// reuse) instead of the planned step arena the trainer reserves (CUDA).
    #[arg(long)]
    pub caching_pool: bool,
    /// Print the plan as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// The plan request the arguments describe, and the model's name for the report.
pub fn request(a: &Args) -> Result<(String, PlanRequest)> {
    let step = a.step.resolve(None)?;
    let device = match a.device.as_str() {
        "cuda" => PlanDevice::Cuda,
        "cpu" => PlanDevice::Cpu,
        o => bail!("--device `{o}` (expected cuda or cpu)"),
    };
    let dtype = match (a.device_dtype.as_deref(), device) {
        (None, PlanDevice::Cuda) | (Some("bf16"), _) => DeviceDtype::Bf16,
        (None, PlanDevice::Cpu) | (Some("f32"), _) => DeviceDtype::F32,
        (Some(o), _) => bail!("--device-dtype `{o}` (expected bf16 or f32)"),
    };
    let adamw = plan::AdamWConfig {
        state_bits: step.state_bits,
        ..plan::AdamWConfig::default()
    };
    let base = match a.base.as_str() {
        "nf4" => BaseFormat::QLORA,
        "dense" => BaseFormat::Dense,
        o => bail!("--base `{o}` (expected nf4 or dense)"),
    };
    Ok((
        step.name,
        PlanRequest {
            model: step.config,
            lora: step.lora,
            base,
            device,
            dtype,
            batch_size: a.step.batch_size,
            seq_len: a.step.seq_len,
            checkpointing: step.checkpointing,
            adamw,
            paged: a.step.paged,
            caching_pool: a.caching_pool,
        },
    ))
}

fn gib(b: u64) -> String {
    format!("{:.2}", b as f64 / (1u64 << 30) as f64)
}

/// The plan as a table: one line per part, GiB with 2 decimals and exact bytes.
pub fn table(name: &str, req: &PlanRequest, p: &MemoryPlan) -> String {
    let mut s = format!(
        "memory plan: {name} on {:?} ({:?}), B {} × T {}, LoRA r {} ({} trainable), \
         checkpointing {}, {}{}\n",
        p.device,
        p.dtype,
        p.batch_size,
        p.seq_len,
        req.lora.r,
        p.trainable_params,
        if p.checkpointing { "on" } else { "off" },
        match req.adamw.state_bits {
            plan::StateBits::Full32 => "AdamW 32-bit",
            plan::StateBits::Blockwise8 => "AdamW 8-bit",
        },
        if req.paged { " (paged)" } else { "" },
    );
    s += &format!("{:<44} {:>9} {:>16}\n", "", "GiB", "bytes");
    for (label, bytes) in p.lines() {
        s += &format!("{label:<44} {:>9} {bytes:>16}\n", gib(bytes));
    }
    s += &format!(
        "{:<44} {:>9} {:>16}\n",
        "total (predicted peak)",
        gib(p.total),
        p.total
    );
    s += &format!(
        "step arena: {} bytes, peak during {}; the loss's logits + lse ({} GiB) are live \
         earlier, inside the same arena",
        p.arena_high_water,
        p.peak_phase.name(),
        gib(p.loss_working_set)
    );
    if req.paged {
        s += "; paged optimizer state is off the device during forward/backward but counts \
              at the update (the step arena stays allocated)";
    }
    if p.host_embedding > 0 {
        s += &format!(
            "\ninput embedding: {} GiB of f32 in host memory, not on the device (a step \
             uploads only its N gathered rows)",
            gib(p.host_embedding)
        );
    }
    s
}

pub fn run(a: Args) -> Result<()> {
    let (name, req) = request(&a)?;
    let p = plan::plan(&req)?;
    if a.json {
        let mut v = serde_json::to_value(&p)?;
        v["model"] = serde_json::Value::String(name);
        v["rank"] = req.lora.r.into();
        v["paged"] = req.paged.into();
        println!("{v}");
    } else {
        println!("{}", table(&name, &req, &p));
    }
    Ok(())
}
