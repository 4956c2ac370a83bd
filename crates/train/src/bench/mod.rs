//! `qlora bench`'s library side: a model of real shapes with random weights (NF4 codes and
//! double-quantized absmax drawn directly, nothing quantized or downloaded), and timed training
//! steps (forward + backward + AdamW) on any [`Backend`]: an unprofiled pass for the headline
//! tokens/s and a profiled pass through [`Timed`] for milliseconds per op class.
//!
//! MFU convention (printed with the number): model FLOPs per step =
//! `2·N·tokens` (forward) + `2·N·tokens` (input gradients; no weight gradients exist for the
//! frozen base) + attention `6·B·L·H·T²·D` (causal: QKᵀ and PV forward are `T²·D` each per
//! head, the backward's dV, dP, dQ, dK four more), with N = the parameters that take part in a
//! matmul (the seven projections and lm_head; the embedding is a lookup). Recompute under
//! checkpointing and the LoRA branch are not counted (they are overhead, not model FLOPs).

mod timed;

pub use timed::{OpClass, Timed};

use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;

use crate::backend::{Backend, FrozenWeight};
use crate::config::ModelConfig;
use crate::error::TrainError;
use crate::lora::{AdapterWeights, LoraConfig, Proj};
use crate::model::{Layer, Linear, Model};
use crate::schedule::{forward_backward, Adapter, Batch, LossScale, StepOptions};
use qlora_nf4::{Absmax, Dtype, Nf4Tensor, QuantState, NESTED_BLOCKSIZE};

/// Dense bf16 tensor-core peak of an H100 SXM (NVIDIA's datasheet, without sparsity), TFLOP/s.
pub const H100_SXM_BF16_TFLOPS: f64 = 989.0;

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("optimizer: {0}")]
    Optim(#[from] qlora_optim::OptimError),
    #[error("bench: `{key}`: {msg}")]
    Config { key: &'static str, msg: String },
    #[error(transparent)]
    Trainer(#[from] crate::trainer::TrainerError),
    #[error("bench: step {step}: loss is {loss} (not finite)")]
    NonFiniteLoss { step: usize, loss: f64 },
}

/// The AdamW update of the adapter arena on a backend: `params` and `grads` are the adapter's
/// flat `(numel,)` arenas. The host AdamW serves every backend whose buffers are host vectors
/// (`CpuBackend`); a device backend provides its own (one launch over the arena).
pub trait AdapterOptimizer<B: Backend> {
    fn step(
        &mut self,
        be: &B,
        params: &mut B::Buf,
        grads: &B::Buf,
        lr: f64,
    ) -> Result<(), BenchError>;
}

impl<B: Backend<Buf = Vec<f32>>> AdapterOptimizer<B> for qlora_optim::AdamW {
    fn step(
        &mut self,
        _be: &B,
        params: &mut Vec<f32>,
        grads: &Vec<f32>,
        lr: f64,
    ) -> Result<(), BenchError> {
        qlora_optim::AdamW::step(self, params, grads, lr)?;
        Ok(())
    }
}

/// The trainer's optimizer on a [`TrainBackend`](crate::trainer::TrainBackend): the host AdamW
/// on the CPU, qlora-optim's `GpuAdamW` (one launch over the arena) on CUDA.
pub struct TrainerOptimizer<B: crate::trainer::TrainBackend>(pub B::Optimizer);

impl<B: crate::trainer::TrainBackend> TrainerOptimizer<B> {
    /// `optim` is the trainer's optimizer name (`adamw`, `adamw_8bit`, `paged_adamw_32bit`, …);
    /// `next_need` the bytes one forward/backward allocates (the paging policy's input).
    pub fn new(
        be: &B,
        layout: &crate::lora::AdapterLayout,
        adamw: qlora_optim::AdamWConfig,
        optim: &str,
        next_need: u64,
    ) -> Result<Self, BenchError> {
        let host = host_adamw(layout, adamw)?;
        let config = crate::trainer::TrainConfig {
            optim: optim.to_string(),
            ..crate::trainer::TrainConfig::default()
        };
        Ok(TrainerOptimizer(be.optimizer(host, &config, next_need)?))
    }
}

impl<B: crate::trainer::TrainBackend> AdapterOptimizer<B> for TrainerOptimizer<B> {
    fn step(
        &mut self,
        be: &B,
        params: &mut B::Buf,
        grads: &B::Buf,
        lr: f64,
    ) -> Result<(), BenchError> {
        be.optimizer_step(&mut self.0, params, grads, lr)?;
        Ok(())
    }
}

/// The host AdamW over an adapter's arena (the CPU backend's optimizer; the trainer builds the
/// same from the same layout).
pub fn host_adamw(
    layout: &crate::lora::AdapterLayout,
    config: qlora_optim::AdamWConfig,
) -> Result<qlora_optim::AdamW, BenchError> {
    let arena = qlora_optim::ArenaLayout::from_ranges(
        layout.tensors().into_iter().map(|(k, _, r)| (k, r)),
        layout.numel,
    )?;
    Ok(qlora_optim::AdamW::new(arena, config)?)
}

/// A random NF4 weight `(out, in)` in bitsandbytes' layout (QB 64, double quant): uniformly
/// random 4-bit codes, absmax codes uniform over the signed dynamic map around an offset of
/// 0.05 with nested scale 0.01, so every block's absmax lies in [0.04, 0.06] (the absmax of 64
/// draws of N(0, 0.02²)). No f32 weight is ever formed.
pub fn random_nf4(name: &str, out: usize, inp: usize, rng: &mut SmallRng) -> Nf4Tensor {
    let n = out * inp;
    let mut packed = vec![0u8; n.div_ceil(2)];
    rng.fill_bytes(&mut packed);
    let blocks = n.div_ceil(64);
    let mut codes = vec![0u8; blocks];
    rng.fill_bytes(&mut codes);
    let state = QuantState {
        shape: vec![out, inp],
        blocksize: 64,
        dtype: Dtype::BF16,
        absmax: Absmax::Double {
            codes,
            nested_absmax: vec![0.01; blocks.div_ceil(NESTED_BLOCKSIZE)],
            offset: 0.05,
        },
    };
    debug_assert!(state.validate(name).is_ok());
    Nf4Tensor { packed, state }
}

fn uniform(rng: &mut SmallRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(lo..hi)).collect()
}

/// A model of `config`'s shapes on `be` with random weights: NF4 projections from
/// [`random_nf4`], embedding and lm_head U(−0.035, 0.035) (std ≈ 0.02), norms ≈ 1, biases
/// small. Every weight goes through `be.upload` / `be.frozen`, as a loaded model's do.
pub fn random_model<B: Backend>(
    be: &B,
    config: &ModelConfig,
    seed: u64,
) -> Result<Model<B>, BenchError> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let (c, v) = (config.hidden_size, config.vocab_size);
    let mut layers = Vec::with_capacity(config.num_layers);
    for l in 0..config.num_layers {
        let mut proj = Vec::with_capacity(7);
        for p in Proj::ALL {
            let (inf, outf) = p.dims(config);
            let name = format!("{}.weight", p.module_path(l));
            let w = random_nf4(&name, outf, inf, &mut rng);
            let has_bias = match p {
                Proj::Q | Proj::K | Proj::V => config.qkv_bias,
                Proj::O => config.o_bias,
                _ => config.mlp_bias,
            };
            proj.push(Linear {
                w: be.frozen(&name, FrozenWeight::Nf4(w), outf, inf)?,
                bias: has_bias.then(|| be.upload(&uniform(&mut rng, outf, -0.01, 0.01))),
                in_features: inf,
                out_features: outf,
            });
        }
        layers.push(Layer {
            attn_norm: be.upload(&uniform(&mut rng, c, 0.9, 1.1)),
            mlp_norm: be.upload(&uniform(&mut rng, c, 0.9, 1.1)),
            proj,
        });
    }
    let embed = crate::model::Embedding::new(be, uniform(&mut rng, v * c, -0.035, 0.035));
    let lm = uniform(&mut rng, v * c, -0.035, 0.035);
    Ok(Model {
        config: config.clone(),
        embed,
        layers,
        norm: be.upload(&uniform(&mut rng, c, 0.9, 1.1)),
        lm_head: Linear {
            w: be.frozen("lm_head.weight", FrozenWeight::Dense(lm), v, c)?,
            bias: None,
            in_features: c,
            out_features: v,
        },
        nf4_base: true,
    })
}

/// A random adapter of `lora` (both A and B nonzero, so every LoRA product does real work).
pub fn random_adapter<B: Backend>(
    be: &B,
    config: &ModelConfig,
    lora: &LoraConfig,
    seed: u64,
) -> Result<Adapter<B>, BenchError> {
    let lora = LoraConfig {
        init: crate::lora::LoraInit::Random,
        ..lora.clone()
    };
    let w = AdapterWeights::init(&lora, config, seed, |m| {
        Err(TrainError::unsupported(
            "<bench>",
            format!("modules_to_save `{}` in a benchmark", m.name()),
        ))
    })?;
    Ok(Adapter::new(be, &w))
}

/// Parameters taking part in a matmul: the projections and lm_head.
pub fn matmul_params(config: &ModelConfig) -> u64 {
    let per_layer: usize = Proj::ALL
        .iter()
        .map(|p| {
            let (i, o) = p.dims(config);
            i * o
        })
        .sum();
    (config.num_layers * per_layer + config.vocab_size * config.hidden_size) as u64
}

/// Model FLOPs of one training step of B × T tokens (see the module docs for the convention).
pub fn model_flops(config: &ModelConfig, b: usize, t: usize) -> f64 {
    let tokens = (b * t) as f64;
    let n = matmul_params(config) as f64;
    let attn = 6.0
        * (b * config.num_layers * config.num_heads * config.head_dim) as f64
        * (t as f64)
        * (t as f64);
    4.0 * n * tokens + attn
}

/// The MFU convention in words, printed beside the number.
pub const MFU_CONVENTION: &str = "model FLOPs = 2·N·tokens (forward) + 2·N·tokens (input \
     gradients) + 6·B·L·H·T²·D (causal attention fwd+bwd), N = projection + lm_head parameters; \
     recompute and LoRA not counted";

/// How to run the benchmark.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub warmup: usize,
    /// Unprofiled timed steps (the headline).
    pub steps: usize,
    /// Profiled steps (synchronize after every op).
    pub profile_steps: usize,
    pub checkpointing: bool,
    pub lr: f64,
    pub seed: u64,
}

/// Milliseconds per step of one op class in the profiled pass.
#[derive(Clone, Debug, Serialize)]
pub struct ProfileRow {
    pub class: &'static str,
    pub ms_per_step: f64,
    pub calls_per_step: f64,
}

/// What one benchmark measured.
#[derive(Clone, Debug, Serialize)]
pub struct BenchTimes {
    pub backend: String,
    pub tokens_per_step: usize,
    pub steps: usize,
    pub ms_per_step: f64,
    pub tokens_per_s: f64,
    /// Per op class, from the profiled pass (whose total is slower: a synchronize per op).
    pub profile: Vec<ProfileRow>,
    pub profiled_ms_per_step: f64,
    pub model_flops_per_step: f64,
    /// Mean loss of the first and of the last timed step (random data, sanity only).
    pub first_loss: f64,
    pub last_loss: f64,
}

/// Random token ids `(B·T,)` in `[0, V)`, labels = ids.
pub fn random_batch(
    config: &ModelConfig,
    b: usize,
    t: usize,
    seed: u64,
) -> Result<Batch, BenchError> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let v = config.vocab_size as u32;
    let ids = (0..b * t).map(|_| rng.gen_range(0..v)).collect();
    Ok(Batch::causal_lm(ids, b, t)?)
}

/// Warm-up, timed and profiled training steps of `batch` on `timed`'s backend.
pub fn run<B: Backend, O: AdapterOptimizer<B>>(
    timed: &Timed<B>,
    model: &Model<Timed<B>>,
    adapter: &mut Adapter<Timed<B>>,
    opt: &mut O,
    batch: &Batch,
    o: &BenchOptions,
) -> Result<BenchTimes, BenchError> {
    if o.steps == 0 {
        return Err(BenchError::Config {
            key: "steps",
            msg: "must be at least 1".into(),
        });
    }
    let mut step_no = 0usize;
    let mut step = |timed: &Timed<B>, profile: bool| -> Result<f64, BenchError> {
        adapter.zero_grads(timed);
        let stats = forward_backward(
            timed,
            model,
            adapter,
            batch,
            StepOptions {
                checkpointing: o.checkpointing,
                dropout_seed: o.seed ^ step_no as u64,
                loss_scale: LossScale::Mean,
            },
        )?;
        let t0 = Instant::now();
        opt.step(&timed.inner, &mut adapter.params, &adapter.grads, o.lr)?;
        if profile {
            timed.inner.synchronize()?;
            timed.add(OpClass::Optimizer, t0.elapsed());
        }
        step_no += 1;
        let loss = stats.mean();
        if !loss.is_finite() {
            return Err(BenchError::NonFiniteLoss {
                step: step_no,
                loss,
            });
        }
        Ok(loss)
    };
    timed.set_profiling(false);
    for _ in 0..o.warmup {
        step(timed, false)?;
    }
    timed.synchronize()?;
    let t0 = Instant::now();
    let mut losses = Vec::with_capacity(o.steps);
    for _ in 0..o.steps {
        losses.push(step(timed, false)?);
    }
    timed.synchronize()?;
    let elapsed = t0.elapsed();

    timed.reset();
    timed.set_profiling(true);
    let p0 = Instant::now();
    for _ in 0..o.profile_steps {
        step(timed, true)?;
    }
    timed.synchronize()?;
    let profiled = p0.elapsed();
    timed.set_profiling(false);
    let per = |d: Duration| d.as_secs_f64() * 1e3 / o.profile_steps.max(1) as f64;
    let profile = timed
        .totals()
        .into_iter()
        .filter(|_| o.profile_steps > 0)
        .map(|(c, d, n)| ProfileRow {
            class: c.name(),
            ms_per_step: per(d),
            calls_per_step: n as f64 / o.profile_steps.max(1) as f64,
        })
        .collect();
    let tokens = batch.b * batch.t;
    let ms = elapsed.as_secs_f64() * 1e3 / o.steps as f64;
    Ok(BenchTimes {
        backend: timed.name(),
        tokens_per_step: tokens,
        steps: o.steps,
        ms_per_step: ms,
        tokens_per_s: tokens as f64 / (ms / 1e3),
        profile,
        profiled_ms_per_step: per(profiled),
        model_flops_per_step: model_flops(&model.config, batch.b, batch.t),
        first_loss: losses[0],
        last_loss: *losses.last().unwrap_or(&f64::NAN),
    })
}

/// The process's peak resident set (`VmHWM` of /proc/self/status), bytes; the CPU backend's
/// "device memory". `None` where /proc is not available.
pub fn process_peak_rss() -> Option<u64> {
    proc_status_bytes("VmHWM:")
}

/// The process's current resident set (`VmRSS`), bytes: taken before the model is built, it
/// is the baseline (code, libraries, runtime) the planner does not model.
pub fn process_rss() -> Option<u64> {
    proc_status_bytes("VmRSS:")
}

fn proc_status_bytes(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
