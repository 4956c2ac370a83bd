//! AdamW step over a 42 M-parameter adapter arena: Llama-3-8B (C 4096, I 14336, 32 layers,
//! 8 kv heads of 128), LoRA r 16 on all seven linear layers = 448 tensors, 41 943 040 elements.
//! CPU always; on a machine with a CUDA device also the GPU, unpaged and paged (always), 32- and
//! 8-bit state, and the device memory paging frees. Prints step time and effective bandwidth
//! (bytes the update must move / time).
//!
//! `cargo bench -p qlora-optim --bench adamw` (optionally `-- --steps N`).

use qlora_optim::{
    AdamW, AdamWConfig, ArenaLayout, GpuAdamW, PagingPolicy, StateBits, ARENA_ALIGN,
};
use std::time::Instant;

fn llama3_8b_r16() -> ArenaLayout {
    let (c, i, kv, r) = (4096usize, 14336usize, 1024usize, 16usize);
    let mut t = Vec::new();
    for l in 0..32 {
        for (m, inp, out) in [
            ("q_proj", c, c),
            ("k_proj", c, kv),
            ("v_proj", c, kv),
            ("o_proj", c, c),
            ("gate_proj", c, i),
            ("up_proj", c, i),
            ("down_proj", i, c),
        ] {
            t.push((format!("layers.{l}.{m}.lora_A"), r * inp));
            t.push((format!("layers.{l}.{m}.lora_B"), out * r));
        }
    }
    ArenaLayout::packed(t, ARENA_ALIGN).expect("layout")
}

/// Bytes one step must move per element: p read+write, g read, and the state read+write
/// (f32: m and v, 16 B; 8-bit: two codes, 4 B; absmax is 1/256 of that and ignored); the norm
/// pass reads g once more.
fn bytes_per_elem(bits: StateBits, clip: bool) -> f64 {
    let state = match bits {
        StateBits::Full32 => 16.0,
        StateBits::Blockwise8 => 4.0,
    };
    8.0 + 4.0 + state + if clip { 4.0 } else { 0.0 }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = args
        .iter()
        .position(|a| a == "--steps")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let layout = llama3_8b_r16();
    let n = layout.numel();
    println!(
        "adamw bench: {} tensors, {} elements (arena {}), {} steps each, rayon threads {}",
        layout.tensors().len(),
        n,
        layout.len(),
        steps,
        rayon::current_num_threads()
    );
    let mut params = vec![0.01f32; layout.len()];
    let grads: Vec<f32> = (0..layout.len())
        .map(|k| ((k % 1000) as f32 - 500.0) * 1e-6)
        .collect();
    for bits in [StateBits::Full32, StateBits::Blockwise8] {
        for clip in [None, Some(1.0)] {
            let cfg = AdamWConfig {
                state_bits: bits,
                max_grad_norm: clip,
                ..Default::default()
            };
            let mut opt = AdamW::new(layout.clone(), cfg).expect("optimizer");
            opt.step(&mut params, &grads, 1e-4).expect("warm-up step");
            let t = Instant::now();
            for _ in 0..steps {
                opt.step(&mut params, &grads, 1e-4).expect("step");
            }
            let dt = t.elapsed().as_secs_f64() / steps as f64;
            let gbs = bytes_per_elem(bits, clip.is_some()) * n as f64 / dt / 1e9;
            println!(
                "adamw/step/{}/cpu/clip={}/42M: {:8.2} ms  {:6.2} GB/s  state {} MiB",
                tag(bits),
                clip.is_some(),
                dt * 1e3,
                gbs,
                opt.state_bytes() >> 20
            );
        }
    }
    gpu(&layout, &grads, steps.max(20));
}

fn tag(bits: StateBits) -> &'static str {
    match bits {
        StateBits::Full32 => "f32",
        StateBits::Blockwise8 => "8bit",
    }
}

fn gpu(layout: &ArenaLayout, grads: &[f32], steps: usize) {
    let dev = match qlora_cuda::Device::open(0) {
        Ok(d) => d,
        Err(e) => {
            println!("adamw/step/*/gpu: skipped, no CUDA device ({e})");
            return;
        }
    };
    println!("GPU: {} ({} SMs)", dev.name(), dev.sm_count());
    let n = layout.numel();
    let g = dev.upload(grads, "grads").expect("grads");
    let mut p = dev
        .upload(&vec![0.01f32; layout.len()], "params")
        .expect("params");
    for bits in [StateBits::Full32, StateBits::Blockwise8] {
        for (paged, policy, name) in [
            (false, PagingPolicy::Never, "unpaged"),
            (true, PagingPolicy::Never, "paged-resident"),
            (true, PagingPolicy::Always, "paged-always"),
        ] {
            let cfg = AdamWConfig {
                state_bits: bits,
                ..Default::default()
            };
            let host = AdamW::new(layout.clone(), cfg).expect("optimizer");
            let mut opt = GpuAdamW::new(&dev, host, paged, policy).expect("gpu optimizer");
            let (free0, _) = dev.mem_info().expect("mem");
            opt.step(&dev, &mut p.view_mut(), &g.view(), 1e-4, 0)
                .expect("warm-up");
            let t = Instant::now();
            let mut freed = 0;
            for _ in 0..steps {
                freed = opt
                    .step(&dev, &mut p.view_mut(), &g.view(), 1e-4, 0)
                    .expect("step")
                    .paged_out_bytes;
            }
            let dt = t.elapsed().as_secs_f64() / steps as f64;
            let (free1, _) = dev.mem_info().expect("mem");
            let gbs = bytes_per_elem(bits, false) * n as f64 / dt / 1e9;
            println!(
                "adamw/step/{}/gpu/{name}/42M: {:8.3} ms  {:7.1} GB/s  state {} MiB  paged out {} MiB  free before {} MiB after {} MiB",
                tag(bits),
                dt * 1e3,
                gbs,
                opt.state_bytes() >> 20,
                freed >> 20,
                free0 >> 20,
                free1 >> 20
            );
        }
    }
}
