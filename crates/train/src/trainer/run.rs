//! The [`Trainer`]: set-up from a [`TrainConfig`], the step loop, evaluation, checkpoints and
//! resume (see the module docs of [`crate::trainer`] for the step's arithmetic).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::backend::TrainBackend;
use super::checkpoint::{
    load_state, publish_dir, staging_dir, CheckpointState, CHECKPOINT_PREFIX, FORMAT_VERSION,
    OPTIMIZER_FILE, STATE_FILE,
};
use super::config::TrainConfig;
use super::error::{Result, TrainerError};
use super::metrics::{append, EvalRecord, History, StepRecord};
use super::plot;
use crate::config::ModelConfig;
use crate::cpu::CpuBackend;
use crate::data::{self, DataConfig, DataPosition, Dataset, SplitMix64, Tokenizer};
use crate::lora::{AdapterWeights, ParamReport, SavedModule};
use crate::model::Model;
use crate::schedule::{self, forward_backward, forward_loss, Adapter, LossScale, StepOptions};
use crate::Backend;
use qlora_optim::{AdamW, ArenaLayout, LrSchedule};

/// Salt of the trainer's dropout-seed stream ("droprng!").
const DROPOUT_SALT: u64 = 0x6472_6f70_726e_6721;

/// What [`Trainer::run`] reports as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    Step(&'a StepRecord),
    Eval(&'a EvalRecord),
    Checkpoint(&'a Path),
}

/// How [`Trainer::run`] ended (errors aside).
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every planned step is done; the adapter is in `adapter`.
    Finished { adapter: PathBuf },
    /// Stopped by the stop flag (Ctrl-C); a checkpoint was written.
    Interrupted { checkpoint: PathBuf },
    /// Reached the `until` step asked for (more steps are planned).
    Paused { step: u64 },
}

/// What the run is about to do, for the start-of-run summary.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The backend it runs on (`Backend::name`, e.g. `cuda-bf16 (NVIDIA H100 80GB HBM3)`).
    pub device: String,
    pub model_dir: PathBuf,
    pub model: ModelConfig,
    /// PEFT's parameter count (trainable = the adapter arena).
    pub params: ParamReport,
    /// Bytes of the NF4 projections (codes + quantization constants); 0 for a dense base.
    pub nf4_bytes: usize,
    /// Projections held NF4.
    pub nf4_base: bool,
    /// Bytes the adapter, its gradients and the optimizer state take.
    pub adapter_bytes: usize,
    pub optimizer_bytes: usize,
    pub train_examples: usize,
    pub train_tokens: usize,
    pub train_label_tokens: usize,
    pub eval_examples: usize,
    pub batches_per_epoch: usize,
    pub total_steps: u64,
    /// Predicted peak memory of the run (see [`MemoryEstimate`]).
    pub memory: MemoryEstimate,
    /// Data warnings (truncations, dropped records).
    pub warnings: Vec<String>,
    /// The adapter started from `init_adapter` or a checkpoint (its own LoRA settings).
    pub adapter_from: Option<PathBuf>,
}

/// Predicted peak memory of a training run, in bytes: the memory planner's lines
/// ([`crate::plan::plan`], the schedule dry-run on the backend's layout) grouped for the
/// start-of-run summary, for a micro-batch of `batch_size × max_seq_len` (the worst case).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Frozen base as held (the CPU: NF4 codes its GEMM reads, f32 embedding, norms and
    /// lm_head — an f32 compute copy of each projection on CPUs without AVX-512F; CUDA: NF4
    /// codes and bf16 norms and lm_head, the input embedding staying in host memory).
    pub base: usize,
    /// Adapter parameters + gradients + optimizer state.
    pub adapter: usize,
    /// The step arena (saved activations, backward scratch, the loss's logits) and, on CUDA,
    /// the cuBLASLt/dequantize workspace and the caching pool's rounding.
    pub activations: usize,
    /// CUDA: the context the driver holds (a stated constant); 0 on the CPU.
    pub context: usize,
    /// The step arena the backend reserves before the first step (part of `activations`).
    pub step_arena: usize,
}

/// The planner's prediction for this run. `lora` is the adapter's own configuration (fresh,
/// `init_adapter` or checkpoint).
fn memory_estimate<B: TrainBackend>(
    be: &B,
    model: &Model<B>,
    lora: &crate::LoraConfig,
    config: &TrainConfig,
    data: &DataConfig,
) -> Result<MemoryEstimate> {
    let (device, dtype, caching_pool) = be.plan_target();
    let plan = crate::plan::plan(&crate::plan::PlanRequest {
        model: model.config.clone(),
        lora: lora.clone(),
        base: if model.nf4_base {
            crate::BaseFormat::QLORA
        } else {
            crate::BaseFormat::Dense
        },
        device,
        dtype,
        batch_size: data.batch_size,
        seq_len: data.max_seq_len,
        checkpointing: config.gradient_checkpointing,
        adamw: config.adamw_config()?,
        paged: config.optim.starts_with("paged_"),
        caching_pool,
    })?;
    // Exactly the plan: the step's buffers replay the planned offsets (op temporaries come
    // from the pool, counted in `workspace`).
    let arena = plan.step_bytes();
    Ok(MemoryEstimate {
        base: plan.base_bytes() as usize,
        adapter: plan.adapter_bytes() as usize,
        activations: (arena + plan.workspace + plan.pool_overhead) as usize,
        context: plan.cuda_context as usize,
        step_arena: arena as usize,
    })
}

impl MemoryEstimate {
    pub fn total(&self) -> usize {
        self.base + self.adapter + self.activations + self.context
    }
}

/// A training run on backend `B` (the CPU by default; [`crate::CudaBackend`] on a GPU): the
/// same loop, schedule and data order on both.
pub struct Trainer<B: TrainBackend = CpuBackend> {
    pub config: TrainConfig,
    pub data_config: DataConfig,
    be: B,
    pub model: Model<B>,
    pub adapter: Adapter<B>,
    opt: B::Optimizer,
    schedule: LrSchedule,
    train: Arc<Dataset>,
    eval: Option<Vec<data::Batch>>,
    pub tokenizer: Tokenizer,
    pos: DataPosition,
    /// Optimizer steps taken.
    pub step: u64,
    pub total_steps: u64,
    rng: SplitMix64,
    pub history: History,
    summary: Summary,
    last_checkpoint: Option<PathBuf>,
}

impl Trainer<CpuBackend> {
    /// Loads model, tokenizer, data and a fresh (or `init_adapter`) adapter, on the CPU.
    pub fn new(config: TrainConfig) -> Result<Trainer> {
        Trainer::new_on(CpuBackend::<f32>::new(), config)
    }

    /// Continues the run saved in checkpoint `dir` on the CPU (see [`Trainer::resume_on`]).
    pub fn resume(dir: &Path, adjust: impl FnOnce(&mut TrainConfig)) -> Result<Trainer> {
        Trainer::resume_on(CpuBackend::<f32>::new(), dir, adjust)
    }
}

impl<B: TrainBackend> Trainer<B> {
    /// Loads model, tokenizer, data and a fresh (or `init_adapter`) adapter onto `be` (the
    /// config's `device` key is the caller's to resolve: this runs where `be` is).
    pub fn new_on(be: B, config: TrainConfig) -> Result<Trainer<B>> {
        Trainer::build(be, config, None)
    }

    /// Continues the run saved in checkpoint `dir` on `be`; `adjust` may change the stored
    /// config (the CLI applies its flags, e.g. a larger `max_steps`). Data, model and LoRA
    /// settings must stay the same: the data position is refused on other data. The optimizer
    /// state file is the same on every backend, so a run may continue on another device.
    pub fn resume_on(
        be: B,
        dir: &Path,
        adjust: impl FnOnce(&mut TrainConfig),
    ) -> Result<Trainer<B>> {
        let st = load_state(dir)?;
        let mut config = st.config.clone();
        adjust(&mut config);
        let mut t = Trainer::build(be, config, Some(dir))?;
        if t.data_config != st.data_config {
            return Err(TrainerError::Checkpoint {
                path: dir.to_path_buf(),
                msg: "the data settings differ from the checkpoint's (max_seq_len, batch_size, \
                      packing, shuffle, seed, eval split …): its data position would be wrong"
                    .into(),
            });
        }
        let layout = arena_layout(&t.adapter)?;
        let host = AdamW::load(&dir.join(OPTIMIZER_FILE), layout, t.config.adamw_config()?)?;
        let need = t.summary.memory.activations as u64;
        t.opt = t.be.optimizer(host, &t.config, need)?;
        let opt_steps = B::optimizer_host(&t.opt).steps();
        if opt_steps != st.step {
            return Err(TrainerError::Checkpoint {
                path: dir.to_path_buf(),
                msg: format!(
                    "optimizer.bin has taken {} steps but trainer_state.json says {}",
                    opt_steps, st.step
                ),
            });
        }
        // Validates the position against this data (fingerprint, batch index).
        data::Batcher::resume(&t.train, &t.data_config, st.data_position)?;
        t.pos = st.data_position;
        t.step = st.step;
        t.rng = SplitMix64::new(st.rng_state);
        t.history = st.history;
        t.history.truncate(st.step);
        t.last_checkpoint = Some(dir.to_path_buf());
        if t.config.max_steps == st.config.max_steps && t.total_steps == st.total_steps {
            t.schedule = st.schedule;
        }
        Ok(t)
    }

    fn build(be: B, config: TrainConfig, checkpoint: Option<&Path>) -> Result<Trainer<B>> {
        config.validate()?;
        let model_dir = config
            .model
            .clone()
            .ok_or_else(|| TrainerError::config("model", "no model directory given"))?;
        let data_path = config
            .data
            .clone()
            .ok_or_else(|| TrainerError::config("data", "no training data file given"))?;
        let model = Model::load(&be, &model_dir, config.base_format()?)?;
        // Device backends queue the uploads: a failed one is reported here, by name.
        be.synchronize()?;
        let tok_dir = config
            .tokenizer
            .clone()
            .unwrap_or_else(|| model_dir.clone());
        let tokenizer = Tokenizer::from_model_dir(&tok_dir)?;
        tokenizer.check_fits_vocab(model.config.vocab_size)?;
        let data_config = config.data_config(Some(model.config.max_position_embeddings));
        data_config.validate(Some(model.config.max_position_embeddings))?;
        let (train, split_eval) = Dataset::load_split(&data_path, &tokenizer, &data_config)?;
        let eval_ds = match &config.eval_data {
            Some(p) => Some(Dataset::load(p, &tokenizer, &data_config)?),
            None => split_eval,
        };
        let mut warnings = train.warning_summary();
        if let Some(e) = &eval_ds {
            warnings.extend(e.warning_summary());
        }
        let eval = eval_ds
            .as_ref()
            .map(|e| data::batch::eval_batches(e, &data_config))
            .transpose()?;

        let (weights, adapter_from) = match (checkpoint, &config.init_adapter) {
            (Some(dir), _) => (AdapterWeights::load(dir, &model.config)?, Some(dir.into())),
            (None, Some(dir)) => (AdapterWeights::load(dir, &model.config)?, Some(dir.clone())),
            (None, None) => {
                let lora = config.lora_config()?;
                let w = AdapterWeights::init(&lora, &model.config, config.seed, |m| {
                    Ok(match m {
                        SavedModule::LmHead => be.frozen_to_f32(&model.lm_head.w),
                        SavedModule::EmbedTokens => model.embed.to_f32(&be),
                    })
                })?;
                (w, None)
            }
        };
        let adapter = Adapter::new(&be, &weights);
        be.synchronize()?;
        let host_opt = AdamW::new(arena_layout(&adapter)?, config.adamw_config()?)?;
        let batcher = data::Batcher::new(&train, &data_config)?;
        let bpe = batcher.batches_per_epoch();
        if bpe == 0 {
            return Err(TrainerError::config(
                "batch_size",
                format!(
                    "with drop_last, {} rows make no full batch of {}",
                    batcher.rows_per_epoch(),
                    data_config.batch_size
                ),
            ));
        }
        let total_steps = if config.max_steps > 0 {
            config.max_steps
        } else {
            ((config.epochs * bpe as f64) / config.grad_accum as f64)
                .ceil()
                .max(1.0) as u64
        };
        let schedule = config.schedule(total_steps)?;
        let memory = memory_estimate(&be, &model, &adapter.config, &config, &data_config)?;
        let optimizer_bytes = host_opt.state_bytes();
        let opt = be.optimizer(host_opt, &config, memory.activations as u64)?;
        // After the resident tensors (model, adapter, optimizer state): the step buffers only.
        be.reserve_step_arena(memory.step_arena as u64)?;
        let summary = Summary {
            device: be.name(),
            memory,
            model_dir,
            params: ParamReport::new(&model.config, &adapter.layout, model.nf4_base),
            nf4_bytes: be.nf4_bytes(&model),
            nf4_base: model.nf4_base,
            adapter_bytes: 8 * adapter.layout.numel,
            optimizer_bytes,
            train_examples: train.len(),
            train_tokens: train.n_tokens(),
            train_label_tokens: train.n_label_tokens(),
            eval_examples: eval_ds.as_ref().map_or(0, |e| e.len()),
            batches_per_epoch: bpe,
            total_steps,
            warnings,
            adapter_from,
            model: model.config.clone(),
        };
        let pos = data::Batcher::position(&batcher);
        let rng = SplitMix64::new(config.seed ^ DROPOUT_SALT);
        Ok(Trainer {
            data_config,
            be,
            model,
            adapter,
            opt,
            schedule,
            train: Arc::new(train),
            eval,
            tokenizer,
            pos,
            step: 0,
            total_steps,
            rng,
            history: History::default(),
            summary,
            last_checkpoint: None,
            config,
        })
    }

    /// The backend the run is on.
    pub fn backend(&self) -> &B {
        &self.be
    }

    /// The start-of-run facts.
    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// The learning-rate schedule in use.
    pub fn schedule(&self) -> &LrSchedule {
        &self.schedule
    }

    /// The training data.
    pub fn train_data(&self) -> &Dataset {
        &self.train
    }

    /// The adapter as host weights (for saving or comparing).
    pub fn adapter_weights(&self) -> AdapterWeights {
        self.adapter.to_weights(&self.be)
    }

    fn metrics_path(&self) -> PathBuf {
        self.config.output_dir.join("metrics.jsonl")
    }

    /// Runs until all planned steps are done, `until` steps are reached, or `stop` is set
    /// (checked between steps: then a checkpoint is written). Metrics go to
    /// `output_dir/metrics.jsonl`, checkpoints to `output_dir/checkpoint-<step>`, the final
    /// adapter to `output_dir/adapter` and the curve to `output_dir/loss.png`. A fresh run
    /// first removes those outputs of an earlier run in the same directory.
    pub fn run(
        &mut self,
        until: Option<u64>,
        stop: &AtomicBool,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Outcome> {
        let out = self.config.output_dir.clone();
        if self.step == 0 && self.last_checkpoint.is_none() && self.history.steps.is_empty() {
            // A fresh run owns its output directory: an adapter or checkpoints left by an
            // earlier run there must not pass for this run's (or be picked by --resume).
            clear_previous_run(&out)?;
        }
        std::fs::create_dir_all(&out).map_err(|e| TrainerError::io(&out, e))?;
        // Start the metrics file over from what is known (a resumed run drops the lines of
        // steps after its checkpoint).
        self.history.write_jsonl(&self.metrics_path())?;
        let target = until.unwrap_or(self.total_steps).min(self.total_steps);
        if self.step == 0 && self.history.evals.is_empty() {
            if let Some(r) = self.evaluate()? {
                on_event(Event::Eval(&r));
            }
        }
        let train = Arc::clone(&self.train);
        let mut batcher = data::Batcher::resume(&train, &self.data_config, self.pos)?;
        while self.step < target {
            if stop.load(Ordering::SeqCst) {
                let ckpt = self.save_checkpoint()?;
                on_event(Event::Checkpoint(&ckpt));
                return Ok(Outcome::Interrupted { checkpoint: ckpt });
            }
            let rec = self.train_step(&mut batcher)?;
            append(&self.metrics_path(), &rec)?;
            on_event(Event::Step(&rec));
            self.history.steps.push(rec);
            let last = self.step == self.total_steps;
            let step = self.step;
            let every = |n: u64| n > 0 && step.is_multiple_of(n);
            if every(self.config.eval_every) || (last && self.eval.is_some()) {
                if let Some(r) = self.evaluate()? {
                    on_event(Event::Eval(&r));
                }
            }
            // The last step checkpoints too (when checkpointing is on), so a finished run can
            // be extended with `--resume` and a larger max_steps.
            if every(self.config.save_every) || (last && self.config.save_every > 0) {
                let ckpt = self.save_checkpoint()?;
                on_event(Event::Checkpoint(&ckpt));
            }
        }
        plot::write(&self.history, &out.join("loss.png"))?;
        if self.step < self.total_steps {
            return Ok(Outcome::Paused { step: self.step });
        }
        let adapter = out.join("adapter");
        self.save_adapter(&adapter)?;
        Ok(Outcome::Finished { adapter })
    }

    /// One optimizer step over `grad_accum` micro-batches.
    fn train_step(&mut self, batcher: &mut data::Batcher<'_>) -> Result<StepRecord> {
        let t0 = Instant::now();
        let step = self.step + 1;
        let micro: Vec<data::Batch> = (0..self.config.grad_accum)
            .map(|_| batcher.next_batch())
            .collect();
        // One large batch: every micro-batch's summed loss is divided by the step's total.
        let n_labels: usize = micro.iter().map(|b| b.n_label_tokens).sum();
        let n_tokens: usize = micro.iter().map(|b| b.n_tokens).sum();
        self.adapter.zero_grads(&self.be);
        let mut loss_sum = 0f64;
        for (i, b) in micro.iter().enumerate() {
            let sb = to_schedule_batch(b, self.train.pad_id)?;
            let opts = StepOptions {
                checkpointing: self.config.gradient_checkpointing,
                dropout_seed: self.rng.next_u64(),
                loss_scale: LossScale::PerTokens(n_labels),
            };
            let st = forward_backward(&self.be, &self.model, &mut self.adapter, &sb, opts)?;
            let non_finite = |what, value: String| {
                TrainerError::NonFinite(Box::new(super::error::NonFinite {
                    step,
                    micro: i,
                    what,
                    value,
                    lines: b.lines.iter().flatten().copied().collect(),
                    path: self.train.path.clone(),
                    kept: match &self.last_checkpoint {
                        Some(c) => format!("The last good checkpoint is {}", c.display()),
                        None => "No checkpoint was written before it (nothing is kept)".into(),
                    },
                }))
            };
            if !st.sum.is_finite() {
                return Err(non_finite("the loss", format!("{}", st.sum)));
            }
            if let Some(g) = self.be.first_non_finite(&self.adapter.grads)? {
                return Err(non_finite("a gradient", format!("{g}")));
            }
            loss_sum += st.sum;
        }
        let opt_steps = B::optimizer_host(&self.opt).steps();
        debug_assert_eq!(opt_steps, self.step);
        let lr = self.schedule.lr(self.config.lr, opt_steps);
        let rep = self.be.optimizer_step(
            &mut self.opt,
            &mut self.adapter.params,
            &self.adapter.grads,
            lr,
        )?;
        let grad_norm = match rep.grad_norm {
            Some(n) => n,
            None => self.be.grad_norm(&self.opt, &self.adapter.grads)?,
        };
        self.step = step;
        self.pos = data::Batcher::position(batcher);
        let bpe = batcher.batches_per_epoch() as f64;
        let seconds = t0.elapsed().as_secs_f64();
        Ok(StepRecord {
            step,
            epoch: self.pos.epoch as f64 + self.pos.batch as f64 / bpe,
            loss: loss_sum / n_labels as f64,
            lr,
            grad_norm: grad_norm as f64,
            tokens: n_tokens,
            label_tokens: n_labels,
            seconds,
            tokens_per_s: n_tokens as f64 / seconds.max(1e-9),
        })
    }

    /// Eval loss and perplexity over the eval set (None without one); recorded in the
    /// history and metrics file.
    pub fn evaluate(&mut self) -> Result<Option<EvalRecord>> {
        let Some(batches) = &self.eval else {
            return Ok(None);
        };
        let (mut sum, mut tokens) = (0f64, 0usize);
        for b in batches {
            let sb = to_schedule_batch(b, self.train.pad_id)?;
            let st = forward_loss(&self.be, &self.model, Some(&self.adapter), &sb)?;
            sum += st.sum;
            tokens += st.tokens;
        }
        let loss = sum / tokens as f64;
        let rec = EvalRecord {
            step: self.step,
            eval_loss: loss,
            eval_perplexity: loss.exp(),
            eval_tokens: tokens,
        };
        std::fs::create_dir_all(&self.config.output_dir)
            .map_err(|e| TrainerError::io(&self.config.output_dir, e))?;
        append(&self.metrics_path(), &rec)?;
        self.history.evals.push(rec.clone());
        Ok(Some(rec))
    }

    /// Writes `output_dir/checkpoint-<step>` atomically and returns its path.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let dst = self
            .config
            .output_dir
            .join(format!("{CHECKPOINT_PREFIX}{}", self.step));
        let tmp = staging_dir(&dst)?;
        self.adapter_weights().save(&tmp)?;
        self.be
            .save_optimizer(&mut self.opt, &tmp.join(OPTIMIZER_FILE))?;
        let st = CheckpointState {
            format_version: FORMAT_VERSION,
            step: self.step,
            total_steps: self.total_steps,
            schedule: self.schedule.clone(),
            data_position: self.pos,
            rng_state: self.rng.state,
            config: self.config.clone(),
            data_config: self.data_config.clone(),
            history: self.history.clone(),
        };
        let p = tmp.join(STATE_FILE);
        let text = serde_json::to_string_pretty(&st).expect("state serializes");
        std::fs::write(&p, text).map_err(|e| TrainerError::io(&p, e))?;
        plot::write(&self.history, &tmp.join("loss.png"))?;
        publish_dir(&tmp, &dst)?;
        plot::write(&self.history, &self.config.output_dir.join("loss.png"))?;
        if self.config.save_total_limit > 0 {
            prune_checkpoints(&self.config.output_dir, self.config.save_total_limit)?;
        }
        self.last_checkpoint = Some(dst.clone());
        Ok(dst)
    }

    /// Writes the adapter as a PEFT directory at `dir` (staged and renamed into place).
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        let tmp = staging_dir(dir)?;
        self.adapter_weights().save(&tmp)?;
        publish_dir(&tmp, dir)
    }

    /// The newest checkpoint written or resumed from.
    pub fn last_checkpoint(&self) -> Option<&Path> {
        self.last_checkpoint.as_deref()
    }
}

/// Removes what an earlier run left in `out`: `adapter/`, `checkpoint-<step>/`, their
/// staging directories, `metrics.jsonl` and `loss.png`. Other files are left alone.
fn clear_previous_run(out: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(());
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let p = e.path();
        let ours_dir = name == "adapter"
            || name.starts_with(CHECKPOINT_PREFIX)
            || (name.starts_with('.') && name.ends_with(".tmp"));
        if ours_dir && p.is_dir() {
            std::fs::remove_dir_all(&p).map_err(|e| TrainerError::io(&p, e))?;
        } else if name == "metrics.jsonl" || name == "loss.png" {
            std::fs::remove_file(&p).map_err(|e| TrainerError::io(&p, e))?;
        }
    }
    Ok(())
}

/// Deletes all but the `keep` newest `checkpoint-<step>` directories of `out`.
fn prune_checkpoints(out: &Path, keep: usize) -> Result<()> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(out)
        .map_err(|e| TrainerError::io(out, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix(CHECKPOINT_PREFIX)?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    found.sort();
    let n = found.len().saturating_sub(keep);
    for (_, p) in &found[..n] {
        std::fs::remove_dir_all(p).map_err(|e| TrainerError::io(p, e))?;
    }
    Ok(())
}

/// A data batch as the schedule takes it. A packed batch (rows holding several examples,
/// which must attend only within their own segment and see positions restarting at 0) is
/// computed as its segments, one per row, padded to the longest: for every token this is
/// exactly the block-diagonal causal mask with per-segment positions of the batch contract
/// (norms, projections and the MLP act per token; attention and rope only see the segment).
/// The schedule's attention is plain causal over a row, so this is how packing stays exact;
/// it keeps packing's batching (rows of about `max_seq_len` tokens) but not its compute
/// saving. Labels are carried over unchanged, so `n_label_tokens` is the same.
pub fn to_schedule_batch(b: &data::Batch, pad_id: u32) -> Result<schedule::Batch> {
    if !b.is_packed() {
        return Ok(schedule::Batch::new(
            b.input_ids.clone(),
            b.labels_i32(),
            b.batch_size,
            b.seq_len,
        )?);
    }
    let segs = b.segments();
    let t = segs.iter().map(|s| s.2).max().unwrap_or(1);
    let mut ids = vec![pad_id; segs.len() * t];
    let mut labels = vec![crate::cpu::cross_entropy::IGNORE_INDEX; segs.len() * t];
    for (i, &(row, start, len)) in segs.iter().enumerate() {
        let src = row * b.seq_len + start;
        ids[i * t..i * t + len].copy_from_slice(&b.input_ids[src..src + len]);
        for k in 0..len {
            labels[i * t + k] = b.labels[src + k] as i32;
        }
    }
    Ok(schedule::Batch::new(ids, labels, segs.len(), t)?)
}

fn arena_layout<B: Backend>(a: &Adapter<B>) -> Result<ArenaLayout> {
    Ok(ArenaLayout::from_ranges(
        a.layout.tensors().into_iter().map(|(k, _, r)| (k, r)),
        a.layout.numel,
    )?)
}
