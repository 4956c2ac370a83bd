//! The memory planner (design §3: "one activation arena and one scratch arena planned up front
//! from the config; `qlora memory` uses the same planner, so prediction and reality cannot
//! drift").
//!
//! How: the step's transient buffers are not predicted by a formula. The real schedule
//! ([`crate::schedule::forward_backward`]) runs on [`PlanBackend`], a dry-run backend whose ops
//! do no math and whose buffers take offsets from a deterministic [`ArenaPlanner`]; the arena's
//! high-water mark is the exact size of the step arena for that (B, T), and a device backend
//! that allocates through the same `ArenaPlanner` in the same order gets the same offsets, so it
//! fits by construction. The resident part (frozen weights, adapter, gradients, optimizer state)
//! is a sum over the shapes, using the same layouts the trainer allocates from
//! ([`AdapterLayout`], `qlora_optim::StateLayout`).
//!
//! A run on a 70B shape at T = 4096 takes milliseconds: buffers are lengths, not memory.

mod arena;
mod backend;
pub mod shapes;
mod temporaries;

pub use arena::ArenaPlanner;
pub use backend::{
    ArenaReport, Layout, Phase, PlanBackend, PlanBuf, PlanFrozen, Role, ARENA_ALIGN,
};
pub use temporaries::{cuda_step_temporaries, pool_held};

use serde::Serialize;

use crate::config::ModelConfig;
use crate::error::{Result, TrainError};
use crate::lora::{AdapterLayout, LoraConfig, Proj};
use crate::model::{BaseFormat, Layer, Linear, Model};
use crate::schedule::{forward_backward, Adapter, Batch, StepOptions};
use crate::Backend;
pub use qlora_optim::{AdamWConfig, StateBits};
use qlora_optim::{ArenaLayout, GpuAdamW, StateLayout};

/// The CUDA context (driver state, the kernel images of `cuda/*.cu`, cuBLASLt's handle): device
/// memory that `cudaMemGetInfo` counts and no allocation of ours owns. A stated constant, not
/// a measurement; `benches/RESULTS.md` records the measured value next to the prediction.
pub const CUDA_CONTEXT_BYTES: u64 = 512 << 20;

/// Which backend the plan is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanDevice {
    /// `CudaBackend`: NF4 codes resident, activations and 16-bit weights in `dtype`,
    /// flash-style attention (saves the log-sum-exp), cuBLASLt workspace, CUDA context.
    Cuda,
    /// `CpuBackend<f32>`: f32 everything; each frozen projection keeps its NF4 codes and f32
    /// block scales (an f32 compute copy without AVX-512F); attention saves its probabilities.
    Cpu,
}

/// Element type of activations and 16-bit weights on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceDtype {
    Bf16,
    F32,
}

impl DeviceDtype {
    pub fn bytes(self) -> usize {
        match self {
            DeviceDtype::Bf16 => 2,
            DeviceDtype::F32 => 4,
        }
    }
}

/// What to plan.
#[derive(Clone, Debug)]
pub struct PlanRequest {
    pub model: ModelConfig,
    pub lora: LoraConfig,
    /// How the projections are held (QLoRA: NF4, QB 64, double quant).
    pub base: BaseFormat,
    pub device: PlanDevice,
    pub dtype: DeviceDtype,
    /// B, T of one micro-batch (the worst case the run will see).
    pub batch_size: usize,
    pub seq_len: usize,
    pub checkpointing: bool,
    /// The optimizer (32-bit or blockwise 8-bit state and its `min_8bit_size`).
    pub adamw: AdamWConfig,
    /// State arena in managed memory, paged to the host between updates.
    pub paged: bool,
    /// CUDA: the device buffers come from qlora-cuda's caching pool (today's CudaBackend),
    /// not from one planned arena: add the pool's overhead line.
    pub caching_pool: bool,
}

/// Predicted peak device memory, bytes, by line. `total` = the sum of every line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryPlan {
    pub device: PlanDevice,
    pub dtype: DeviceDtype,
    pub batch_size: usize,
    pub seq_len: usize,
    pub checkpointing: bool,
    /// Trainable parameters (the adapter arena's elements).
    pub trainable_params: usize,
    /// Packed NF4 codes of the projections, `ceil(out·in / 2)` each.
    pub nf4_codes: u64,
    /// Their quantization constants: on the CPU as bitsandbytes stores them (u8 absmax codes,
    /// nested absmax per QB2 blocks, offset, code tables; f32 absmax without double quant);
    /// on CUDA as the device holds them (the absmax codes and nested absmax per tensor, one
    /// shared 256-entry dynamic map; the NF4 map is in the kernel, the offset an argument).
    pub nf4_constants: u64,
    /// Unquantized frozen weights in the device dtype: lm_head (a copy even when tied:
    /// `Model` holds it as its own frozen linear), norms, biases; dense projections when the
    /// base is not NF4; on the CPU also the embedding and, per NF4 projection, the f32 block
    /// scales its AVX-512 GEMM reads the codes with (or, on a CPU without AVX-512F, the f32
    /// compute copy of the weight).
    pub dense_weights: u64,
    /// Informational (not device memory, not in `total`): the input embedding `CudaBackend`
    /// keeps in host memory, f32 `(V, C)`; 0 on the CPU, where it is in `dense_weights`.
    pub host_embedding: u64,
    /// f32 adapter parameters `(numel,)`.
    pub adapter_params: u64,
    /// f32 adapter gradients `(numel,)`.
    pub adapter_grads: u64,
    /// The optimizer's state arena (`StateLayout::total_bytes`); on CUDA also `GpuAdamW`'s
    /// device tables (`GpuAdamW::table_bytes`: chunk table, dynamic maps, norm partials).
    pub optimizer_state: u64,
    /// Of which resident during forward/backward (only the tables when paged; the update still
    /// brings the state in, and the step arena stays allocated then, so paging does not lower
    /// the peak).
    pub optimizer_resident_fwd_bwd: u64,
    /// Step arena, bytes live at its peak, by role (see [`Role`]).
    pub activations: u64,
    pub scratch: u64,
    pub loss: u64,
    /// `arena_high_water − (activations + scratch + loss)`: bytes lost to fragmentation.
    pub arena_fragmentation: u64,
    /// The step arena's size (what the backend allocates once).
    pub arena_high_water: u64,
    /// Where in the step the arena peaks.
    pub peak_phase: Phase,
    /// Informational (inside the arena, not a line of its own): the loss's logits + lse, which
    /// are live together before the peak.
    pub loss_working_set: u64,
    /// CUDA: cuBLASLt's workspace + the ops' temporaries (`CudaBackend::temporary`: each
    /// projection's dequantize-to-scratch weight, bf16 copies of LoRA A/B, `(N, R)` products,
    /// ids and losses), as the caching pool holds them after a step: per size class, the most
    /// blocks one op had live together ([`pool_held`]).
    pub workspace: u64,
    /// CUDA: what qlora-cuda's caching pool holds beyond the exact sizes above: each
    /// resident allocation and the step arena rounded to its size class
    /// (`qlora_cuda::device::pool_class`); with
    /// [`PlanRequest::caching_pool`] instead of the arena, the step's blocks reused only within
    /// their class (the pool replays the step's allocation sequence; a freed logits block
    /// cannot serve a backward scratch buffer).
    pub pool_overhead: u64,
    /// CUDA: [`CUDA_CONTEXT_BYTES`]; 0 on the CPU.
    pub cuda_context: u64,
    pub total: u64,
}

impl MemoryPlan {
    /// The frozen base as held: NF4 codes + constants + unquantized weights.
    pub fn base_bytes(&self) -> u64 {
        self.nf4_codes + self.nf4_constants + self.dense_weights
    }
    /// Adapter parameters + gradients + optimizer state.
    pub fn adapter_bytes(&self) -> u64 {
        self.adapter_params + self.adapter_grads + self.optimizer_state
    }
    /// The step arena (activations, scratch, loss, fragmentation).
    pub fn step_bytes(&self) -> u64 {
        self.arena_high_water
    }
    /// `(label, bytes)` of every line that adds up to `total`, in print order.
    pub fn lines(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("NF4 weights: codes", self.nf4_codes),
            ("NF4 weights: quantization constants", self.nf4_constants),
            (
                match self.device {
                    PlanDevice::Cuda => "unquantized weights (lm_head, norms)",
                    PlanDevice::Cpu => "unquantized weights (embedding, lm_head, norms)",
                },
                self.dense_weights,
            ),
            ("adapter parameters (f32)", self.adapter_params),
            ("adapter gradients (f32)", self.adapter_grads),
            ("optimizer state", self.optimizer_state),
            ("activations", self.activations),
            ("scratch (backward)", self.scratch),
            ("loss (logits + logsumexp)", self.loss),
            ("arena fragmentation", self.arena_fragmentation),
            ("workspace (cuBLASLt, op temporaries)", self.workspace),
            ("caching-pool overhead (size classes)", self.pool_overhead),
            ("CUDA context (stated constant)", self.cuda_context),
        ]
    }
}

fn bad(key: &str, msg: impl Into<String>) -> TrainError {
    TrainError::config("memory plan", key, msg)
}

/// Bytes of one NF4 projection of `n` elements as bitsandbytes lays it out:
/// `(codes, constants)` with `ceil(n/2)` packed codes and `QuantState::constant_bytes`'s
/// constants for `ceil(n/QB)` blocks.
pub fn nf4_bytes(n: usize, blocksize: usize, double_quant: bool) -> (u64, u64) {
    let blocks = n.div_ceil(blocksize);
    let constants = if double_quant {
        // u8 codes + f32 nested absmax per 256 blocks + 16-entry NF4 map + 256-entry dynamic
        // map (f32) + f32 offset.
        blocks + 4 * blocks.div_ceil(qlora_nf4::NESTED_BLOCKSIZE) + 4 * 16 + 4 * 256 + 4
    } else {
        4 * blocks + 4 * 16
    };
    (n.div_ceil(2) as u64, constants as u64)
}

/// A model of `config`'s shapes on the dry-run backend: no weight data anywhere.
pub fn shape_model(be: &PlanBackend, config: &ModelConfig) -> Model<PlanBackend> {
    let (c, v) = (config.hidden_size, config.vocab_size);
    let linear = |inf: usize, outf: usize, bias: bool| Linear {
        w: PlanFrozen {
            out_features: outf,
            in_features: inf,
        },
        bias: bias.then(|| be.zeros(outf)),
        in_features: inf,
        out_features: outf,
    };
    let layers = (0..config.num_layers)
        .map(|_| Layer {
            attn_norm: be.zeros(c),
            mlp_norm: be.zeros(c),
            proj: Proj::ALL
                .iter()
                .map(|&p| {
                    let (inf, outf) = p.dims(config);
                    let bias = match p {
                        Proj::Q | Proj::K | Proj::V => config.qkv_bias,
                        Proj::O => config.o_bias,
                        _ => config.mlp_bias,
                    };
                    linear(inf, outf, bias)
                })
                .collect(),
        })
        .collect();
    Model {
        config: config.clone(),
        // A host table is never read by the dry run: no data, as everywhere in this model.
        embed: if be.embedding_on_host() {
            crate::model::Embedding::Host(Vec::new())
        } else {
            crate::model::Embedding::Device(be.zeros(v * c))
        },
        layers,
        norm: be.zeros(c),
        lm_head: linear(c, v, false),
        nf4_base: true,
    }
}

/// The step whose arena is planned: the compute element size and attention save layout of
/// the backend, and (B, T, checkpointing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepShape {
    /// Bytes per element of the backend's `Buf` (2 bf16, 4 f32).
    pub elem_bytes: usize,
    pub layout: Layout,
    pub batch_size: usize,
    pub seq_len: usize,
    pub checkpointing: bool,
}

/// Run the schedule's step for `step` on the dry-run backend and report its arena: the size a
/// backend allocating through [`ArenaPlanner`] in the schedule's order needs for the step.
pub fn plan_step_arena(
    model: &ModelConfig,
    lora: &LoraConfig,
    layout: &AdapterLayout,
    step: StepShape,
) -> Result<ArenaReport> {
    let be = PlanBackend::new(step.elem_bytes, step.layout);
    let m = shape_model(&be, model);
    let mut adapter = Adapter {
        config: lora.clone(),
        layout: layout.clone(),
        params: be.zeros(layout.numel),
        grads: be.zeros(layout.numel),
    };
    let n = step.batch_size * step.seq_len;
    let batch = Batch::causal_lm(vec![0; n], step.batch_size, step.seq_len)?;
    be.start_recording();
    forward_backward(
        &be,
        &m,
        &mut adapter,
        &batch,
        StepOptions {
            checkpointing: step.checkpointing,
            ..StepOptions::default()
        },
    )?;
    Ok(be.finish())
}

/// The memory plan of one training configuration.
pub fn plan(req: &PlanRequest) -> Result<MemoryPlan> {
    if req.batch_size == 0 {
        return Err(bad("batch_size", "must be > 0"));
    }
    if req.seq_len == 0 {
        return Err(bad("seq_len", "must be > 0"));
    }
    if req.device == PlanDevice::Cpu && req.dtype != DeviceDtype::F32 {
        return Err(bad("device_dtype", "the CPU backend computes in f32 only"));
    }
    let cfg = &req.model;
    let layout = AdapterLayout::new(&req.lora, cfg)?;
    let el = req.dtype.bytes();
    let layout_of_device = match req.device {
        PlanDevice::Cuda => Layout::Cuda,
        PlanDevice::Cpu => Layout::Cpu,
    };
    let arena = plan_step_arena(
        cfg,
        &req.lora,
        &layout,
        StepShape {
            elem_bytes: el,
            layout: layout_of_device,
            batch_size: req.batch_size,
            seq_len: req.seq_len,
            checkpointing: req.checkpointing,
        },
    )?;

    // Resident: frozen weights.
    let (c, v) = (cfg.hidden_size, cfg.vocab_size);
    let (mut codes, mut constants) = (0u64, 0u64);
    // lm_head + (2L + 1) norms, and on the CPU the embedding, in elements (CudaBackend keeps
    // the embedding in host memory: `Backend::embedding_on_host`).
    let embed_on_device = req.device == PlanDevice::Cpu;
    let mut dense = (1 + embed_on_device as usize) * v * c + (2 * cfg.num_layers + 1) * c;
    // Bytes of each resident device allocation (CudaBackend: one per tensor), for the pool
    // model: lm_head (and the embedding when on the device), the norms.
    let mut resident: Vec<usize> = vec![v * c * el; 1 + embed_on_device as usize];
    resident.extend(std::iter::repeat_n(c * el, 2 * cfg.num_layers + 1));
    for _ in 0..cfg.num_layers {
        for p in Proj::ALL {
            let (inf, outf) = p.dims(cfg);
            let bias = match p {
                Proj::Q | Proj::K | Proj::V => cfg.qkv_bias,
                Proj::O => cfg.o_bias,
                _ => cfg.mlp_bias,
            };
            if bias {
                dense += outf;
                resident.push(outf * el);
            }
            match req.base {
                BaseFormat::Nf4 {
                    blocksize,
                    double_quant,
                } => {
                    let (a, b) = nf4_bytes(inf * outf, blocksize, double_quant);
                    codes += a;
                    // Nf4Weight::upload: packed codes, then the absmax codes and nested
                    // absmax (or the f32 absmax). The code tables and the offset are not
                    // per tensor on the device (the NF4 map is in the kernel, the offset a
                    // launch argument, the dynamic map shared: below).
                    let blocks = (inf * outf).div_ceil(blocksize);
                    resident.push(a as usize);
                    let on_device = if double_quant {
                        vec![blocks, 4 * blocks.div_ceil(qlora_nf4::NESTED_BLOCKSIZE)]
                    } else {
                        vec![4 * blocks]
                    };
                    constants += match req.device {
                        PlanDevice::Cuda => on_device.iter().sum::<usize>() as u64,
                        PlanDevice::Cpu => b,
                    };
                    resident.extend(on_device);
                    // CpuBackend: the f32 per-block scales its GEMM reads the codes with, or
                    // (f64, no AVX-512F) the f32 compute copy of the weight.
                    if req.device == PlanDevice::Cpu {
                        dense += if crate::cpu::reads_nf4_codes::<f32>(blocksize) {
                            blocks
                        } else {
                            inf * outf
                        };
                    }
                }
                BaseFormat::Dense => {
                    dense += inf * outf;
                    resident.push(inf * outf * el);
                }
            }
        }
    }
    let dense_weights = (dense * el) as u64;
    // `Device::dynamic_map`: the 256-entry f32 map that decodes the absmax codes of double
    // quantization, one per device.
    if req.device == PlanDevice::Cuda
        && matches!(
            req.base,
            BaseFormat::Nf4 {
                double_quant: true,
                ..
            }
        )
    {
        constants += 4 * 256;
        resident.push(4 * 256);
    }

    // Adapter, gradients, optimizer: the trainer's arenas.
    let numel = layout.numel;
    let arena_layout =
        ArenaLayout::from_ranges(layout.tensors().into_iter().map(|(k, _, r)| (k, r)), numel)
            .map_err(|e| bad("adapter layout", e.to_string()))?;
    let state_layout = StateLayout::new(&arena_layout, &req.adamw);
    // CUDA: GpuAdamW's tables (chunk table, maps, norm partials) stay on the device even
    // when the state arena is paged.
    let optimizer_tables: Vec<usize> = match req.device {
        PlanDevice::Cuda => GpuAdamW::table_bytes(&arena_layout, &state_layout).to_vec(),
        PlanDevice::Cpu => Vec::new(),
    };
    let tables = optimizer_tables.iter().sum::<usize>() as u64;
    let optimizer_state = state_layout.total_bytes as u64 + tables;
    let adapter_params = 4 * numel as u64;
    let adapter_grads = 4 * numel as u64;

    let nf4 = matches!(req.base, BaseFormat::Nf4 { .. });
    let (workspace, cuda_context, pool_overhead) = match req.device {
        PlanDevice::Cuda => {
            // cuBLASLt's workspace (made on first use, kept) and the ops' temporaries as the
            // caching pool holds them after a step, size classes included (`temporaries`).
            let temporaries = pool_held(&cuda_step_temporaries(
                cfg,
                &req.lora,
                &layout,
                nf4,
                el,
                (req.batch_size, req.seq_len),
            ));
            let ws = qlora_cuda::blas::WORKSPACE_BYTES + temporaries;
            // Every device allocation comes from qlora-cuda's caching pool, rounded to its
            // size class: the resident tensors and the workspace always; the step's buffers
            // either one by one (`caching_pool`, reused only within their class) or as the one
            // planned step arena.
            let pool = {
                use qlora_cuda::device::pool_class;
                resident.extend([4 * numel, 4 * numel]);
                if !req.paged {
                    resident.push(state_layout.total_bytes);
                }
                resident.extend(&optimizer_tables);
                resident.push(qlora_cuda::blas::WORKSPACE_BYTES);
                let rounding: usize = resident.iter().map(|&b| pool_class(b) - b).sum();
                let step = if req.caching_pool {
                    arena.pool_held.saturating_sub(arena.high_water)
                } else {
                    pool_class(arena.high_water) - arena.high_water
                };
                rounding + step
            };
            (ws as u64, CUDA_CONTEXT_BYTES, pool as u64)
        }
        PlanDevice::Cpu => (0, 0, 0),
    };

    let live = (arena.activations + arena.scratch + arena.loss) as u64;
    let mut p = MemoryPlan {
        device: req.device,
        dtype: req.dtype,
        batch_size: req.batch_size,
        seq_len: req.seq_len,
        checkpointing: req.checkpointing,
        trainable_params: numel,
        nf4_codes: codes,
        nf4_constants: constants,
        dense_weights,
        host_embedding: if embed_on_device {
            0
        } else {
            (4 * v * c) as u64
        },
        adapter_params,
        adapter_grads,
        optimizer_state,
        optimizer_resident_fwd_bwd: if req.paged { tables } else { optimizer_state },
        activations: arena.activations as u64,
        scratch: arena.scratch as u64,
        loss: arena.loss as u64,
        arena_fragmentation: arena.high_water as u64 - live,
        arena_high_water: arena.high_water as u64,
        peak_phase: arena.peak_phase,
        loss_working_set: arena.loss_working_set as u64,
        workspace,
        pool_overhead,
        cuda_context,
        total: 0,
    };
    p.total = p.lines().iter().map(|(_, b)| b).sum();
    Ok(p)
}
