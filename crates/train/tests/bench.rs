//! The benchmark library on the CPU backend: a short run on the tiny shape, the profiled op
//! counts against the schedule (counted by hand), random NF4 weights, and the MFU FLOP count.

use qlora_train::bench::{self, BenchOptions, OpClass, Timed};
use qlora_train::plan::shapes::shape;
use qlora_train::plan::AdamWConfig;
use qlora_train::{CpuBackend, LoraConfig, TargetModules};

#[test]
fn short_cpu_run_profiles_every_op_of_the_schedule() {
    let config = shape("tiny").unwrap(); // L = 2
    let lora = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: TargetModules::AllLinear,
        ..LoraConfig::default()
    };
    let timed = Timed::new(CpuBackend::<f32>::new(), config.vocab_size);
    let model = bench::random_model(&timed, &config, 1).unwrap();
    let mut adapter = bench::random_adapter(&timed, &config, &lora, 2).unwrap();
    let before = adapter.params.clone();
    let mut opt = bench::host_adamw(
        &adapter.layout,
        AdamWConfig {
            lr: 1e-3,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    let batch = bench::random_batch(&config, 2, 16, 3).unwrap();
    let opts = BenchOptions {
        warmup: 1,
        steps: 2,
        profile_steps: 1,
        checkpointing: true,
        lr: 1e-3,
        seed: 4,
    };
    let t = bench::run(&timed, &model, &mut adapter, &mut opt, &batch, &opts).unwrap();
    assert_eq!(t.tokens_per_step, 32);
    assert!(t.ms_per_step > 0.0 && t.tokens_per_s > 0.0);
    assert!(t.first_loss.is_finite() && t.last_loss.is_finite());
    // 4 optimizer steps ran (1 warm-up, 2 timed, 1 profiled): the adapter moved.
    assert_ne!(adapter.params, before);
    let calls = |c: &str| {
        t.profile
            .iter()
            .find(|r| r.class == c)
            .unwrap_or_else(|| panic!("{c} missing"))
            .calls_per_step
    };
    // Checkpointing: per layer 7 projections in the forward, 7 in the recompute, 7 backward.
    assert_eq!(calls("linear"), (2 * 21) as f64);
    // lm_head forward and backward; attention fwd (forward + recompute) and bwd per layer.
    assert_eq!(calls("lm_head"), 2.0);
    assert_eq!(calls("attention"), (2 * 3) as f64);
    // rmsnorm: 2 per layer forward, 2 recompute, 2 backward, + the final norm fwd and bwd,
    // less layer 0's attention-norm backward (the frozen embedding takes no gradient).
    assert_eq!(calls("norm"), (2 * 6 + 2 - 1) as f64);
    // rope: q and k in forward, recompute and backward.
    assert_eq!(calls("rope"), (2 * 6) as f64);
    assert_eq!(calls("swiglu"), (2 * 3) as f64);
    assert_eq!(calls("embedding"), 1.0);
    assert_eq!(calls("loss"), 2.0);
    assert_eq!(calls("optimizer"), 1.0);
    let sum: f64 = t.profile.iter().map(|r| r.ms_per_step).sum();
    assert!(sum <= t.profiled_ms_per_step * 1.01, "{sum} vs {t:?}");
    assert_eq!(OpClass::ALL.len(), t.profile.len());
}

#[test]
fn random_nf4_is_a_valid_double_quantized_tensor() {
    use rand::SeedableRng;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0);
    let w = bench::random_nf4("w", 96, 64, &mut rng);
    w.state.validate("w").unwrap();
    assert_eq!(w.packed.len(), 96 * 64 / 2);
    // absmax = map[code]·0.01 + 0.05 with map values in [−1, 1].
    for a in w.state.absmax_f32() {
        assert!((0.04..=0.06).contains(&a), "{a}");
    }
    let x = w.dequantize_f32();
    assert!(x.iter().all(|v| v.abs() <= 0.06));
    // Uniform codes over the 16 NF4 levels: a nonzero spread.
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    assert!(mean_sq > 1e-4, "{mean_sq}");
}

#[test]
fn mfu_flops_follow_the_stated_convention() {
    let c = shape("llama3-8b").unwrap();
    // Projections per layer: q 4096², k, v 1024·4096, o 4096², gate, up, down 14336·4096.
    let proj = 32u64 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096);
    let n = proj + 128256 * 4096;
    assert_eq!(bench::matmul_params(&c), n);
    let t = 2048f64;
    let attn = 6.0 * 32.0 * 32.0 * 128.0 * t * t;
    let want = 4.0 * n as f64 * t + attn;
    assert_eq!(bench::model_flops(&c, 1, 2048), want);
}

#[test]
fn zero_steps_is_an_error() {
    let config = shape("tiny").unwrap();
    let lora = LoraConfig {
        r: 2,
        target_modules: TargetModules::AllLinear,
        ..LoraConfig::default()
    };
    let timed = Timed::new(CpuBackend::<f32>::new(), config.vocab_size);
    let model = bench::random_model(&timed, &config, 1).unwrap();
    let mut adapter = bench::random_adapter(&timed, &config, &lora, 2).unwrap();
    let mut opt = bench::host_adamw(&adapter.layout, AdamWConfig::default()).unwrap();
    let batch = bench::random_batch(&config, 1, 8, 3).unwrap();
    let opts = BenchOptions {
        warmup: 0,
        steps: 0,
        profile_steps: 0,
        checkpointing: false,
        lr: 1e-3,
        seed: 0,
    };
    let e = bench::run(&timed, &model, &mut adapter, &mut opt, &batch, &opts).unwrap_err();
    assert!(e.to_string().contains("steps"), "{e}");
}
