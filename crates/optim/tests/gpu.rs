//! GPU tests of `cuda/adamw.cu` through [`GpuAdamW`] (lane C; `cargo test -- --ignored` on a
//! machine with an NVIDIA GPU). Without a device they are ignored; run with `--ignored` and no
//! device they fail loudly rather than pass.
//!
//! The kernel uses only IEEE-rounded intrinsics and the CPU reproduces its f64 norm order, so the
//! expectations are bit equality: GPU vs CPU (params and the whole state arena, both variants,
//! both state widths, clipping on), and paged vs unpaged.

mod common;
use common::*;
use qlora_cuda::Device;
use qlora_optim::{
    AdamW, AdamWConfig, AdamWVariant, ArenaLayout, GpuAdamW, PagingPolicy, StateBits,
};

fn device() -> Device {
    Device::open(0).unwrap_or_else(|e| panic!("this test needs a CUDA device: {e}"))
}

fn layout() -> ArenaLayout {
    // odd sizes, an 8-bit-eligible tensor with a one-element tail block, tiny tensors
    ArenaLayout::packed(
        [
            ("a", 1usize),
            ("b", 4097),
            ("c", 300),
            ("d", 70_000),
            ("e", 4096),
        ],
        64,
    )
    .unwrap()
}

fn cfg(bits: StateBits, variant: AdamWVariant) -> AdamWConfig {
    AdamWConfig {
        lr: 3e-3,
        weight_decay: 0.05,
        state_bits: bits,
        variant,
        max_grad_norm: Some(0.7),
        ..Default::default()
    }
}

fn init(l: &ArenaLayout, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed);
    rng.vec(l.len(), 0.1)
}

fn grads(l: &ArenaLayout, rng: &mut Rng, step: usize) -> Vec<f32> {
    let mut g = rng.vec(l.len(), 0.05 * (1 + step % 3) as f32);
    if step == 3 {
        g[100] = f32::NAN; // inside tensor b
        g[l.get("d").unwrap().offset + 5] = f32::INFINITY;
    }
    g
}

/// Runs `steps` GPU steps; returns params and the state arena bytes.
fn run_gpu(
    dev: &Device,
    bits: StateBits,
    variant: AdamWVariant,
    paged: bool,
    policy: PagingPolicy,
    steps: usize,
) -> (Vec<f32>, Vec<u8>, Vec<u64>) {
    let l = layout();
    let host = AdamW::new(l.clone(), cfg(bits, variant)).unwrap();
    let mut opt = GpuAdamW::new(dev, host, paged, policy).unwrap();
    let mut p = dev.upload(&init(&l, 1), "params").unwrap();
    let mut rng = Rng(2);
    let mut paged_out = Vec::new();
    for s in 0..steps {
        let g = dev.upload(&grads(&l, &mut rng, s), "grads").unwrap();
        let rep = opt
            .step(
                dev,
                &mut p.view_mut(),
                &g.view(),
                3e-3 * (1.0 + s as f64 / 10.0),
                0,
            )
            .unwrap();
        assert_eq!(rep.step.nonfinite, if s == 3 { 2 } else { 0 });
        paged_out.push(rep.paged_out_bytes);
    }
    let params = dev.download(&p.view()).unwrap();
    let state = opt.to_host(dev).unwrap().state().bytes().to_vec();
    (params, state, paged_out)
}

fn run_cpu(bits: StateBits, variant: AdamWVariant, steps: usize) -> (Vec<f32>, Vec<u8>) {
    let l = layout();
    let mut opt = AdamW::new(l.clone(), cfg(bits, variant)).unwrap();
    let mut p = init(&l, 1);
    let mut rng = Rng(2);
    for s in 0..steps {
        let g = grads(&l, &mut rng, s);
        opt.step(&mut p, &g, 3e-3 * (1.0 + s as f64 / 10.0))
            .unwrap();
    }
    (p, opt.state().bytes().to_vec())
}

fn bits_eq(a: &[f32], b: &[f32]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x.to_bits() != y.to_bits())
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_step_equals_cpu_bit_for_bit() {
    let dev = device();
    for bits in [StateBits::Full32, StateBits::Blockwise8] {
        for variant in [AdamWVariant::Torch, AdamWVariant::Bnb] {
            let (gp, gs, _) = run_gpu(&dev, bits, variant, false, PagingPolicy::Never, 12);
            let (cp, cs) = run_cpu(bits, variant, 12);
            assert_eq!(
                bits_eq(&gp, &cp),
                None,
                "{bits:?} {variant:?}: first differing param"
            );
            assert!(gs == cs, "{bits:?} {variant:?}: state arena differs");
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn paged_and_unpaged_are_bit_identical() {
    let dev = device();
    for bits in [StateBits::Full32, StateBits::Blockwise8] {
        let v = AdamWVariant::Torch;
        let (p0, s0, _) = run_gpu(&dev, bits, v, false, PagingPolicy::Never, 10);
        let (p1, s1, out1) = run_gpu(&dev, bits, v, true, PagingPolicy::Always, 10);
        let (p2, s2, out2) = run_gpu(&dev, bits, v, true, PagingPolicy::Never, 10);
        assert_eq!(bits_eq(&p0, &p1), None, "{bits:?} paged(always)");
        assert_eq!(bits_eq(&p0, &p2), None, "{bits:?} paged(never)");
        assert!(s0 == s1 && s0 == s2, "{bits:?} state");
        assert!(out1.iter().all(|&b| b > 0), "always pages out every step");
        assert!(out2.iter().all(|&b| b == 0));
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn page_out_frees_device_memory() {
    let dev = device();
    // 64 Mi elements: the f32 state is 512 MiB, clearly visible in cuMemGetInfo.
    let l = ArenaLayout::packed([("big", 64usize << 20)], 64).unwrap();
    let c = AdamWConfig {
        state_bits: StateBits::Full32,
        ..Default::default()
    };
    let host = AdamW::new(l.clone(), c).unwrap();
    let bytes = host.state_bytes() as u64;
    let mut opt = GpuAdamW::new(&dev, host, true, PagingPolicy::Always).unwrap();
    let mut p = dev.zeros::<f32>(l.len(), "params").unwrap();
    let g = dev.upload(&vec![1e-3f32; l.len()], "grads").unwrap();
    opt.step(&dev, &mut p.view_mut(), &g.view(), 1e-3, 0)
        .unwrap();
    dev.synchronize().unwrap();
    let (free_out, _) = dev.mem_info().unwrap();
    assert!(!opt.resident());
    // a step with a policy that keeps it resident
    let host2 = opt.to_host(&dev).unwrap().clone();
    drop(opt);
    let mut opt2 = GpuAdamW::new(&dev, host2, true, PagingPolicy::Never).unwrap();
    opt2.step(&dev, &mut p.view_mut(), &g.view(), 1e-3, 0)
        .unwrap();
    dev.synchronize().unwrap();
    let (free_in, _) = dev.mem_info().unwrap();
    eprintln!(
        "state {bytes} B; free with state paged out {free_out}, resident {free_in}: paging freed {} B",
        free_out as i64 - free_in as i64
    );
    assert!(
        free_out as u64 >= free_in as u64 + bytes * 9 / 10,
        "paging should free about {bytes} B"
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_save_load_continues_bit_identically() {
    let dev = device();
    let dir = tempfile::tempdir().unwrap();
    let l = layout();
    let c = cfg(StateBits::Blockwise8, AdamWVariant::Torch);
    let (straight, _, _) = run_gpu(
        &dev,
        StateBits::Blockwise8,
        AdamWVariant::Torch,
        true,
        PagingPolicy::Always,
        8,
    );
    // 4 steps, save, reload onto a new GpuAdamW, 4 more
    let mut opt = GpuAdamW::new(
        &dev,
        AdamW::new(l.clone(), c.clone()).unwrap(),
        true,
        PagingPolicy::Always,
    )
    .unwrap();
    let mut p = dev.upload(&init(&l, 1), "params").unwrap();
    let mut rng = Rng(2);
    for s in 0..8 {
        if s == 4 {
            let path = dir.path().join("opt.safetensors");
            opt.to_host(&dev).unwrap().save(&path).unwrap();
            drop(opt);
            let host = AdamW::load(&path, l.clone(), c.clone()).unwrap();
            opt = GpuAdamW::new(&dev, host, true, PagingPolicy::Always).unwrap();
        }
        let g = dev.upload(&grads(&l, &mut rng, s), "grads").unwrap();
        opt.step(
            &dev,
            &mut p.view_mut(),
            &g.view(),
            3e-3 * (1.0 + s as f64 / 10.0),
            0,
        )
        .unwrap();
    }
    let resumed = dev.download(&p.view()).unwrap();
    assert_eq!(bits_eq(&straight, &resumed), None);
}
