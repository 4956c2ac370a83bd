use anyhow::{bail, Context, Result};
use qlora_train::bench::{self, AdapterOptimizer, BenchOptions, BenchTimes, Timed};
use qlora_train::plan::{self, DeviceDtype, MemoryPlan, PlanDevice, PlanRequest};
use qlora_train::{Backend, BaseFormat, CpuBackend, LoraConfig, ModelConfig};

use super::step::StepArgs;

/// Time training steps (forward + backward + AdamW) on a model of real shapes with random
/// weights: tokens/s, ms per step by op class, MFU and peak memory next to the planner's
/// prediction. Nothing is downloaded.
#[derive(clap::Args)]
pub struct Args {
    /// The shapes default to llama3-8b.
    #[command(flatten)]
    pub step: StepArgs,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed steps (the tokens/s headline; no synchronize between ops).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Profiled steps (synchronize after every op, time per op class).
    #[arg(long, default_value_t = 1)]
    pub profile_steps: usize,
    /// cuda or cpu.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Peak dense TFLOP/s for MFU [default: 989 (H100 SXM bf16) on cuda; none on cpu].
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Random seed of the weights and tokens.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

struct Setup {
    name: String,
    config: ModelConfig,
    lora: LoraConfig,
    adamw: plan::AdamWConfig,
    /// The trainer's optimizer name (`adamw`, `paged_adamw_32bit`, …).
    optim: String,
    opts: BenchOptions,
}

fn setup(a: &Args) -> Result<Setup> {
    let step = a.step.resolve(Some("llama3-8b"))?;
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let optim = match (step.state_bits, a.step.paged) {
        (plan::StateBits::Full32, false) => "adamw",
        (plan::StateBits::Full32, true) => "paged_adamw_32bit",
        (plan::StateBits::Blockwise8, false) => "adamw_8bit",
        (plan::StateBits::Blockwise8, true) => "paged_adamw_8bit",
    };
    let lr = 2e-4;
    Ok(Setup {
        name: step.name,
        config: step.config,
        lora: step.lora,
        adamw: plan::AdamWConfig {
            lr,
            state_bits: step.state_bits,
            ..plan::AdamWConfig::default()
        },
        optim: optim.to_string(),
        opts: BenchOptions {
            warmup: a.warmup,
            steps: a.steps,
            profile_steps: a.profile_steps,
            checkpointing: step.checkpointing,
            lr,
            seed: a.seed,
        },
    })
}

/// Build the random model and adapter on `be`, run the steps. `make_opt` builds the backend's
/// optimizer for the adapter arena; `measured_peak` reads the backend's peak memory afterwards
/// (`(bytes, how it was measured)`).
fn bench_on<B: Backend, O: AdapterOptimizer<B>>(
    s: &Setup,
    a: &Args,
    be: B,
    make_opt: impl FnOnce(&Timed<B>, &qlora_train::Adapter<Timed<B>>) -> Result<O>,
    measured_peak: impl FnOnce(&B) -> Option<(u64, &'static str)>,
) -> Result<(BenchTimes, Option<(u64, &'static str)>)> {
    let timed = Timed::new(be, s.config.vocab_size);
    let model = bench::random_model(&timed, &s.config, s.opts.seed)?;
    let mut adapter = bench::random_adapter(&timed, &s.config, &s.lora, s.opts.seed ^ 1)?;
    let mut opt = make_opt(&timed, &adapter)?;
    let batch = bench::random_batch(
        &s.config,
        a.step.batch_size,
        a.step.seq_len,
        s.opts.seed ^ 2,
    )?;
    let times = bench::run(&timed, &model, &mut adapter, &mut opt, &batch, &s.opts)?;
    let peak = measured_peak(&timed.inner);
    Ok((times, peak))
}

fn report(
    s: &Setup,
    a: &Args,
    t: &BenchTimes,
    plan: &MemoryPlan,
    peak: Option<(u64, &str)>,
    peak_tflops: Option<f64>,
) -> String {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mut out = format!(
        "bench: {} on {}, B {} × T {}, LoRA r {} ({} trainable), checkpointing {}, {} timed \
         steps after {} warm-up\n",
        s.name,
        t.backend,
        a.step.batch_size,
        a.step.seq_len,
        a.step.rank,
        plan.trainable_params,
        if s.opts.checkpointing { "on" } else { "off" },
        t.steps,
        s.opts.warmup
    );
    out += &format!(
        "tokens/s {:.1}   ms/step {:.2}   loss {:.4} → {:.4}\n",
        t.tokens_per_s, t.ms_per_step, t.first_loss, t.last_loss
    );
    match peak_tflops {
        Some(p) => {
            let achieved = t.model_flops_per_step / (t.ms_per_step / 1e3) / 1e12;
            out += &format!(
                "MFU {:.1}% ({achieved:.1} of {p} TFLOP/s; {})\n",
                100.0 * achieved / p,
                bench::MFU_CONVENTION
            );
        }
        None => out += "MFU: no peak TFLOP/s given (--peak-tflops)\n",
    }
    if !t.profile.is_empty() {
        out += &format!(
            "profile ({} step(s), synchronize after every op; {:.2} ms/step in all):\n",
            s.opts.profile_steps, t.profiled_ms_per_step
        );
        for r in &t.profile {
            out += &format!(
                "  {:<10} {:>10.3} ms  {:>5.1}%  {:>6} calls\n",
                r.class,
                r.ms_per_step,
                100.0 * r.ms_per_step / t.profiled_ms_per_step,
                r.calls_per_step
            );
        }
    }
    let planned = plan.total;
    match peak {
        Some((m, how)) => {
            out += &format!(
                "peak memory: measured {:.2} GiB ({how}), planned {:.2} GiB ({:+.1}%)",
                gib(m),
                gib(planned),
                100.0 * (planned as f64 - m as f64) / m as f64
            )
        }
        None => {
            out += &format!(
                "peak memory: planned {:.2} GiB (not measured)",
                gib(planned)
            )
        }
    }
    out
}

pub fn run(a: Args) -> Result<()> {
    let s = setup(&a)?;
    let device = match a.device.as_str() {
        "cuda" => PlanDevice::Cuda,
        "cpu" => PlanDevice::Cpu,
        o => bail!("--device `{o}` (expected cuda or cpu)"),
    };
    let plan = plan::plan(&PlanRequest {
        model: s.config.clone(),
        lora: s.lora.clone(),
        base: BaseFormat::QLORA,
        device,
        dtype: match device {
            PlanDevice::Cuda => DeviceDtype::Bf16,
            PlanDevice::Cpu => DeviceDtype::F32,
        },
        batch_size: a.step.batch_size,
        seq_len: a.step.seq_len,
        checkpointing: s.opts.checkpointing,
        adamw: s.adamw.clone(),
        paged: a.step.paged,
        caching_pool: false,
    })?;
    let (times, peak, peak_tflops) = match device {
        PlanDevice::Cpu => {
            let adamw = s.adamw.clone();
            // The planner models the run's buffers, not the binary and its libraries: compare
            // with the peak above the resident set before the model exists.
            let base = bench::process_rss().unwrap_or(0);
            let (t, p) = bench_on(
                &s,
                &a,
                CpuBackend::<f32>::new(),
                |_, adapter| Ok(bench::host_adamw(&adapter.layout, adamw)?),
                |_| {
                    bench::process_peak_rss().map(|b| {
                        (
                            b.saturating_sub(base),
                            "process peak RSS above its resident set before the model",
                        )
                    })
                },
            )?;
            (t, p, a.peak_tflops)
        }
        PlanDevice::Cuda => {
            let be = qlora_train::CudaBackend::new().context("--device cuda")?;
            let (adamw, optim) = (s.adamw.clone(), s.optim.clone());
            let next_need = plan.step_bytes();
            let (t, p) = bench_on(
                &s,
                &a,
                be,
                |timed, adapter| {
                    // As the trainer: the planned step arena once the model and adapter are
                    // resident.
                    timed.inner.reserve_step_arena(plan.step_bytes() as usize)?;
                    Ok(bench::TrainerOptimizer::new(
                        &timed.inner,
                        &adapter.layout,
                        adamw,
                        &optim,
                        next_need,
                    )?)
                },
                |be| {
                    be.synchronize().ok()?;
                    let (free, total) = be.device().mem_info().ok()?;
                    Some((
                        (total - free) as u64,
                        "cudaMemGetInfo used after the run: CUDA context + the caching pool \
                         (resident tensors, the step arena, every block it ever handed out)",
                    ))
                },
            )?;
            (t, p, a.peak_tflops.or(Some(bench::H100_SXM_BF16_TFLOPS)))
        }
    };
    if a.json {
        let mut v = serde_json::to_value(&times)?;
        v["model"] = s.name.clone().into();
        v["batch_size"] = a.step.batch_size.into();
        v["seq_len"] = a.step.seq_len.into();
        v["rank"] = a.step.rank.into();
        v["checkpointing"] = s.opts.checkpointing.into();
        v["planned_peak_bytes"] = plan.total.into();
        v["measured_peak_bytes"] = peak.map(|p| p.0).into();
        v["measured_peak_source"] = peak.map(|p| p.1).into();
        v["peak_tflops"] = peak_tflops.into();
        v["mfu"] = peak_tflops
            .map(|p| times.model_flops_per_step / (times.ms_per_step / 1e3) / 1e12 / p)
            .into();
        v["mfu_convention"] = bench::MFU_CONVENTION.into();
        println!("{v}");
    } else {
        println!("{}", report(&s, &a, &times, &plan, peak, peak_tflops));
    }
    Ok(())
}
