//! Forward+backward throughput of the CPU backend (one training micro-step, LoRA grads only):
//! the tiny fixture model (batch 4 × 32, as the fixtures' QLoRA run) and a synthetic Llama
//! (C 1024, I 2816, 4 layers, 16 heads, V 32000, batch 1 × 256, r 8 on all linear layers),
//! both with an NF4 base (blocksize 64, double quant), on 1 and 2 rayon threads.
//! Run: `cargo bench -p qlora-train --bench fwd_bwd` (release). Numbers go to benches/RESULTS.md.

use std::path::PathBuf;
use std::time::Instant;

use qlora_train::*;

fn lora_all_linear() -> LoraConfig {
    LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        target_modules: TargetModules::AllLinear,
        ..Default::default()
    }
}

fn bench(
    name: &str,
    model: &Model<CpuBackend>,
    b: usize,
    t: usize,
    steps: usize,
    checkpointing: bool,
) {
    let be = CpuBackend::<f32>::new();
    let w = AdapterWeights::init(&lora_all_linear(), &model.config, 0, |_| {
        unreachable!("no modules_to_save")
    })
    .unwrap();
    let mut adapter = Adapter::new(&be, &w);
    let v = model.config.vocab_size as u32;
    let ids: Vec<u32> = (0..b * t).map(|i| (i as u32 * 7919 + 13) % v).collect();
    let batch = Batch::causal_lm(ids, b, t).unwrap();
    let opts = StepOptions {
        checkpointing,
        ..Default::default()
    };
    for threads in [1usize, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            forward_backward(&be, model, &mut adapter, &batch, opts).unwrap(); // warm-up
            let (t0, c0) = (Instant::now(), cpu_seconds());
            for _ in 0..steps {
                forward_backward(&be, model, &mut adapter, &batch, opts).unwrap();
            }
            let s = t0.elapsed().as_secs_f64() / steps as f64;
            let cpu = (cpu_seconds() - c0) / steps as f64;
            println!(
                "fwd_bwd/{name}/ckpt={}/threads={threads}: {:.4} s/step, {:.0} tokens/s (process CPU {:.3} s/step)",
                checkpointing as u8,
                s,
                (b * t) as f64 / s,
                cpu
            );
        });
    }
}

fn main() {
    let be = CpuBackend::<f32>::new();
    let tiny_dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama");
    let tiny = Model::load(&be, &tiny_dir, BaseFormat::QLORA).unwrap();
    bench("tiny-llama/b4xt32/r8", &tiny, 4, 32, 50, false);

    let cfg = ModelConfig::synthetic_llama(1024, 2816, 4, 16, 16, 32000);
    let synth = Model::random(&be, cfg, 0, BaseFormat::QLORA).unwrap();
    bench(
        "synthetic-c1024-l4-v32000/b1xt256/r8",
        &synth,
        1,
        256,
        5,
        false,
    );
    bench(
        "synthetic-c1024-l4-v32000/b1xt256/r8",
        &synth,
        1,
        256,
        5,
        true,
    );
}

/// User+system CPU seconds of this process (Linux /proc; 0 elsewhere): on a loaded machine
/// wall time overstates the cost, CPU time does not.
fn cpu_seconds() -> f64 {
    let Ok(st) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let f: Vec<&str> = st
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let tick = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}
