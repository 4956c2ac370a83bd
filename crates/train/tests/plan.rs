//! The memory planner against hand calculations on the tiny fixture model
//! (tests/fixtures/tiny-llama: C 64, I 172, L 2, H 4, Hkv 2, D 16, V 320, untied), B 2, T 8,
//! r 4 on all seven projections. Every number below is derived here from those config numbers
//! and the schedule's buffer list (schedule.rs: `LayerSaved`, `Scratch`, `forward_backward`),
//! not from the planner.

use qlora_optim::{AdamWConfig, StateBits};
use qlora_train::plan::{self, DeviceDtype, MemoryPlan, Phase, PlanDevice, PlanRequest};
use qlora_train::{BaseFormat, LoraConfig, ModelConfig, TargetModules};
use std::path::Path;

const B: usize = 2;
const T: usize = 8;
const N: usize = B * T; // 16 rows
const C: usize = 64;
const I: usize = 172;
const L: usize = 2;
const H: usize = 4;
const D: usize = 16;
const KVD: usize = 2 * D; // Hkv·D = 32
const V: usize = 320;
const R: usize = 4;

/// Every arena block is rounded up to 256 bytes.
fn al(bytes: usize) -> u64 {
    (bytes.div_ceil(256) * 256) as u64
}

fn request(device: PlanDevice, dtype: DeviceDtype, checkpointing: bool) -> PlanRequest {
    let model = ModelConfig::from_dir(Path::new("../../tests/fixtures/tiny-llama")).unwrap();
    PlanRequest {
        model,
        lora: LoraConfig {
            r: R,
            lora_alpha: 8.0,
            target_modules: TargetModules::AllLinear,
            ..LoraConfig::default()
        },
        base: BaseFormat::QLORA,
        device,
        dtype,
        batch_size: B,
        seq_len: T,
        checkpointing,
        adamw: AdamWConfig::default(),
        paged: false,
        caching_pool: false,
    }
}

/// One layer's save set (`LayerSaved`) with `e` bytes per element; `att` = attention's save
/// buffer in elements.
fn layer_saved(e: usize, att: usize) -> u64 {
    // x_in, xn1, q (H·D = C), o, h_mid, xn2: (N, C) each
    6 * al(N * C * e)
        // rstd1, rstd2: (N,)
        + 2 * al(N * e)
        // k, v: (N, Hkv·D)
        + 2 * al(N * KVD * e)
        + al(att * e)
        // e, g, a: (N, I)
        + 3 * al(N * I * e)
        // u of each of the 7 projections: (N, R)
        + 7 * al(N * R * e)
}

/// The backward `Scratch` set plus d_xf and d_h.
fn scratch(e: usize) -> u64 {
    let sc = 3 * al(N * I * e) // d_a, d_e, d_g
        + 2 * al(N * C * e)    // d_xn, tmp
        + 2 * al(N * C * e)    // d_o, d_q (H·D = C)
        + 2 * al(N * KVD * e); // d_k, d_v
    sc + 2 * al(N * C * e) // d_xf, d_h
}

/// Resident lines shared by both devices.
fn check_resident(p: &MemoryPlan) {
    // Per layer: q 64×64, k 32×64, v 32×64, o 64×64, gate/up 172×64, down 64×172.
    let sizes = [C * C, KVD * C, KVD * C, C * C, I * C, I * C, C * I];
    let codes: usize = sizes.iter().map(|n| n / 2).sum(); // all even
    assert_eq!(p.nf4_codes, (L * codes) as u64, "nf4 codes");
    // Double quant: u8 code per 64-block + f32 nested absmax per 256 blocks (one each here);
    // on the CPU as bitsandbytes stores them, + 16 f32 NF4 map + 256 f32 dynamic map + f32
    // offset per tensor; on CUDA one 256 f32 dynamic map for the device.
    let consts: usize = match p.device {
        PlanDevice::Cpu => {
            L * sizes
                .iter()
                .map(|n| n / 64 + 4 + 64 + 1024 + 4)
                .sum::<usize>()
        }
        PlanDevice::Cuda => L * sizes.iter().map(|n| n / 64 + 4).sum::<usize>() + 1024,
    };
    assert_eq!(p.nf4_constants, consts as u64, "nf4 constants");
    // A (R, in) + B (out, R) per projection.
    let numel = L * R * ((C + C) + 2 * (C + KVD) + (C + C) + 2 * (C + I) + (I + C));
    assert_eq!(numel, 9248);
    assert_eq!(p.trainable_params, numel);
    assert_eq!(p.adapter_params, 4 * numel as u64);
    assert_eq!(p.adapter_grads, 4 * numel as u64);
    // AdamW 32-bit: m then v, f32, each section starting on 256 bytes: 36992 → 37120.
    // On CUDA also GpuAdamW's tables: 28 tensors of ≤ 2048 elements = 28 chunks of 32 B,
    // the two 256 f32 maps, 29 u32 first-chunk indices, 28 f64 partials, 2 f32, 4 u32.
    let tables = match p.device {
        PlanDevice::Cpu => 0,
        PlanDevice::Cuda => 28 * 32 + 2048 + 29 * 4 + 28 * 8 + 8 + 16,
    };
    assert_eq!(p.optimizer_state, 37120 + 36992 + 128 + tables);
    assert_eq!(p.optimizer_resident_fwd_bwd, p.optimizer_state);
    let sum: u64 = p.lines().iter().map(|(_, b)| b).sum();
    assert_eq!(p.total, sum);
    assert_eq!(
        p.arena_high_water,
        p.activations + p.scratch + p.loss + p.arena_fragmentation
    );
}

#[test]
fn cpu_checkpointed_plan_matches_hand_calculation() {
    let p = plan::plan(&request(PlanDevice::Cpu, DeviceDtype::F32, true)).unwrap();
    check_resident(&p);
    let e = 4;
    // f32 embedding + lm_head + 5 norms, and per projection the f32 block scales of the
    // GEMM that reads NF4 codes (or, without AVX-512F, its f32 compute copy).
    let sizes = 2 * C * C + 2 * KVD * C + 3 * I * C;
    let proj = if qlora_train::cpu::reads_nf4_codes::<f32>(64) {
        L * (2 * C * C / 64 + 2 * KVD * C / 64 + 3 * I * C / 64)
    } else {
        L * sizes
    };
    assert_eq!(p.dense_weights, (4 * (2 * V * C + 5 * C + proj)) as u64);
    assert_eq!(
        p.host_embedding, 0,
        "the CPU holds the embedding among its weights"
    );
    assert_eq!((p.workspace, p.cuda_context), (0, 0));
    // Peak: backward of the last layer, right after its recompute buffers are allocated.
    // Live activations: rope table (T, D), h, tmp, the L saved layer inputs, xf, rstdf, the
    // recomputed layer's save set and its input copy x.
    let att = B * H * T * T; // CPU attention saves P (B, H, T, T)
    let acts = al(T * D * e)
        + 2 * al(N * C * e)
        + L as u64 * al(N * C * e)
        + al(N * C * e)
        + al(N * e)
        + layer_saved(e, att)
        + al(N * C * e);
    assert_eq!(p.activations, acts, "activations");
    assert_eq!(p.scratch, scratch(e), "scratch");
    // Of the loss, only lse (N,) is still live (the logits die after lm_head's backward).
    assert_eq!(p.loss, al(N * e), "loss");
    assert_eq!(p.peak_phase, Phase::Backward);
    assert_eq!(p.activations + p.scratch + p.loss, 153_344);
    // logits (N, V) f32 + lse (N,).
    assert_eq!(p.loss_working_set, al(N * V * e) + al(N * e));
}

#[test]
fn cpu_plan_without_checkpointing_matches_hand_calculation() {
    let p = plan::plan(&request(PlanDevice::Cpu, DeviceDtype::F32, false)).unwrap();
    check_resident(&p);
    let e = 4;
    // Peak: first layer backward; both layers' save sets live, logits freed.
    let att = B * H * T * T;
    let acts = al(T * D * e)
        + 2 * al(N * C * e)
        + L as u64 * layer_saved(e, att)
        + al(N * C * e)
        + al(N * e);
    assert_eq!(p.activations, acts, "activations");
    assert_eq!(p.scratch, scratch(e), "scratch");
    assert_eq!(p.loss, al(N * e), "loss");
    assert_eq!(p.activations + p.scratch + p.loss, 207_104);
}

#[test]
fn cuda_bf16_plan_matches_hand_calculation() {
    let p = plan::plan(&request(PlanDevice::Cuda, DeviceDtype::Bf16, true)).unwrap();
    check_resident(&p);
    let e = 2;
    // bf16 lm_head + 5 norms; projections only as NF4; the embedding is in host memory
    // (f32, informational, outside the total).
    assert_eq!(p.dense_weights, (2 * (V * C + 5 * C)) as u64);
    assert_eq!(p.host_embedding, (4 * V * C) as u64);
    // 32 MiB cuBLASLt + the op temporaries as the pool holds them (blocks of powers of two
    // ≥ 512 B). N = 16 rows ≤ the linear crossover (64): the fused path, no dequantize
    // scratch. Each LoRA linear holds A (R, in), B (out, R) and (N, R) in bf16: all ≤ 512 B
    // except gate/up's B and down's A (172·4·2 = 1376 B → 2048); q, k, v, o hold three 512s.
    // attention_bwd's delta (B·H·T f32 = 256 B) and cross entropy's targets + losses (2×64 B)
    // need no more: 3 × 512 + 2048.
    assert_eq!(p.workspace, (32 << 20) + 3 * 512 + 2048);
    assert_eq!(p.cuda_context, plan::CUDA_CONTEXT_BYTES);
    // CudaBackend keeps rstd and lse in f32, saves attention as one f32 block (lse (B, H, T)
    // rounded up to 4, then the bf16 output two per element), and its rope table is the D/2
    // inverse frequencies + T positions in f32.
    let rope = al((D / 2 + T) * 4);
    let att_f32 = (B * H * T).div_ceil(4) * 4 + (N * H * D).div_ceil(2);
    let saved = 6 * al(N * C * e)          // x_in, xn1, q, o, h_mid, xn2
        + 2 * al(N * 4)                    // rstd1, rstd2 f32
        + 2 * al(N * KVD * e)              // k, v
        + al(att_f32 * 4)
        + 3 * al(N * I * e)                // e, g, a
        + 7 * al(N * R * e); // u
    let acts = rope
        + 2 * al(N * C * e)                // h, tmp
        + L as u64 * al(N * C * e)         // layer inputs
        + al(N * C * e)                    // xf
        + al(N * 4)                        // rstdf f32
        + saved
        + al(N * C * e); // recompute input copy
    assert_eq!(p.activations, acts, "activations");
    assert_eq!(p.scratch, scratch(e), "scratch");
    assert_eq!(p.loss, al(N * 4), "loss (lse f32)");
    assert_eq!(p.loss_working_set, al(N * V * e) + al(N * 4));
}

/// Above the linear crossover (N = 128 > 64) every LoRA linear dequantizes its weight into a
/// temporary of the pool as well.
#[test]
fn cuda_workspace_above_the_crossover_holds_each_dequantize_size_class() {
    let mut req = request(PlanDevice::Cuda, DeviceDtype::Bf16, true);
    req.seq_len = 64;
    let n = B * 64;
    assert!(n > qlora_cuda::ops::linear::Dispatch::default().crossover_m);
    let p = plan::plan(&req).unwrap();
    // Per op, bytes → pool class: A (R·in·2), B (out·R·2), (N, R) = 1024, W (out·in·2):
    //   q, o:      512, 512, 1024, 8192
    //   k, v:      512, 256→512, 1024, 4096
    //   gate, up:  512, 1376→2048, 1024, 22016→32768
    //   down:      1376→2048, 512, 1024, 32768
    //   attention_bwd delta: B·H·T·4 = 2048; cross entropy: 512 B targets + 512 B losses.
    // Most blocks of one class live in one op: 512 ×2 (q, o; cross entropy), one of the rest.
    let held = 2 * 512 + 1024 + 2048 + 4096 + 8192 + 32768;
    assert_eq!(p.workspace, (32 << 20) + held as u64);
    // With LoRA dropout, x_d (N, in) joins every LoRA linear, and the backward dequantizes
    // W whatever the row count: down's x_d is 128·172·2 = 44032 B → 65536.
    req.lora.lora_dropout = 0.1;
    let q = plan::plan(&req).unwrap();
    assert_eq!(q.workspace, (32 << 20) + (held + 16384 + 65536) as u64);
}

#[test]
fn eight_bit_state_follows_the_blockwise_rule() {
    let mut req = request(PlanDevice::Cuda, DeviceDtype::Bf16, true);
    // With min_8bit_size 512, the tensors of ≥ 512 elements are gate B, up B (172×4) and
    // down A (4×172): 688 elements = 3 blocks of 256 each; 6 such tensors in 2 layers.
    req.adamw = AdamWConfig {
        state_bits: StateBits::Blockwise8,
        min_8bit_size: 512,
        ..AdamWConfig::default()
    };
    let p = plan::plan(&req).unwrap();
    let n32 = 9248 - 6 * 688; // 5120 elements keep f32 m, v
    let blocks = 6 * 3;
    let m32 = 4 * n32; // 20480, already 256-aligned
    let absmax = al(4 * blocks) as usize; // 72 → 256 each
    let n8 = blocks * 256; // 4608 codes per moment, 256-aligned
                           // GpuAdamW's tables: 22 f32 tensors of one chunk + 6 × 3 blocks = 40 chunks of 32 B,
                           // the two maps, 29 first-chunk indices, 40 f64 partials, clip and counters.
    let tables = 40 * 32 + 2048 + 29 * 4 + 40 * 8 + 8 + 16;
    assert_eq!(
        p.optimizer_state,
        (2 * m32 + 2 * absmax + 2 * n8 + tables) as u64
    );
    // Paged: the state leaves the device between updates but still counts at the update;
    // the tables stay.
    req.paged = true;
    let q = plan::plan(&req).unwrap();
    assert_eq!(q.optimizer_resident_fwd_bwd, tables as u64);
    // (Managed memory is not from the pool: only the size-class rounding line differs.)
    assert_eq!(q.total - q.pool_overhead, p.total - p.pool_overhead);
}

#[test]
fn bad_requests_are_named_errors() {
    let mut req = request(PlanDevice::Cpu, DeviceDtype::F32, true);
    req.seq_len = 0;
    let e = plan::plan(&req).unwrap_err().to_string();
    assert!(e.contains("seq_len"), "{e}");
    let mut req = request(PlanDevice::Cpu, DeviceDtype::F32, true);
    req.batch_size = 0;
    assert!(plan::plan(&req)
        .unwrap_err()
        .to_string()
        .contains("batch_size"));
    let req = request(PlanDevice::Cpu, DeviceDtype::Bf16, true);
    assert!(plan::plan(&req).unwrap_err().to_string().contains("f32"));
    let mut req = request(PlanDevice::Cuda, DeviceDtype::Bf16, true);
    req.lora.target_modules = TargetModules::List(vec!["nothing".into()]);
    assert!(plan::plan(&req)
        .unwrap_err()
        .to_string()
        .contains("target_modules"));
}

#[test]
fn llama3_70b_at_4096_plans_in_well_under_a_second() {
    let mut req = request(PlanDevice::Cuda, DeviceDtype::Bf16, true);
    req.model = plan::shapes::shape("llama3-70b").unwrap();
    req.seq_len = 4096;
    req.batch_size = 1;
    let t0 = std::time::Instant::now();
    let p = plan::plan(&req).unwrap();
    assert!(t0.elapsed().as_secs_f64() < 5.0, "{:?}", t0.elapsed());
    // 70.55 B parameters minus the embedding and lm_head, at 4 bits each: about 35 GB codes.
    let proj: usize = 80 * (8192 * 8192 * 2 + 2 * 1024 * 8192 + 3 * 8192 * 28672);
    assert_eq!(p.nf4_codes, proj as u64 / 2);
    // Checkpointing keeps 80 layer inputs of (4096, 8192) bf16 = 64 MiB each.
    assert!(p.activations >= 80 * (64 << 20));
}

#[test]
fn dry_run_attention_save_matches_the_cpu_backend() {
    use qlora_train::plan::{Layout, PlanBackend};
    use qlora_train::{AttnDims, Backend, CpuBackend};
    let dims = AttnDims {
        b: 3,
        tq: 5,
        tk: 7,
        kv_rows: 7,
        h: 4,
        hkv: 2,
        d: 16,
    };
    let plan_be = PlanBackend::new(4, Layout::Cpu);
    assert_eq!(
        plan_be.attention_saved_len(dims),
        CpuBackend::<f32>::new().attention_saved_len(dims)
    );
}

#[test]
fn trainer_groups_add_up() {
    let p = plan::plan(&request(PlanDevice::Cpu, DeviceDtype::F32, true)).unwrap();
    assert_eq!(p.base_bytes() + p.adapter_bytes() + p.step_bytes(), p.total);
}

#[test]
fn caching_pool_changes_only_the_pool_line() {
    let arena = plan::plan(&request(PlanDevice::Cuda, DeviceDtype::Bf16, true)).unwrap();
    let mut req = request(PlanDevice::Cuda, DeviceDtype::Bf16, true);
    req.caching_pool = true;
    let pool = plan::plan(&req).unwrap();
    // Resident tensors come from the pool either way: tiny tensors all round up (the
    // embedding's 40960 bytes to a 65536-byte class alone).
    assert!(arena.pool_overhead >= 65536 - 40960);
    assert_eq!(
        pool.total - pool.pool_overhead,
        arena.total - arena.pool_overhead
    );
}
