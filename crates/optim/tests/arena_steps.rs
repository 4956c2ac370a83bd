//! The arena optimizer end to end: the one-call step equals the per-block/per-element
//! reference, odd sizes, padding untouched, non-finite gradients, thousands of steps, save/load
//! mid-run with bit-identical continuation, thread-count independence, 8-bit tracking 32-bit.

mod common;
use common::*;
use qlora_optim::adamw::{update_f32, StepScalars};
use qlora_optim::arena::StateKind;
use qlora_optim::blockwise8::{update_block, BlockState, Maps};
use qlora_optim::{
    AdamW, AdamWConfig, AdamWVariant, ArenaLayout, LrSchedule, OptimError, StateBits, QBLOCK,
};

fn cfg(bits: StateBits, variant: AdamWVariant) -> AdamWConfig {
    AdamWConfig {
        lr: 2e-3,
        weight_decay: 0.01,
        state_bits: bits,
        variant,
        max_grad_norm: Some(1.0),
        ..Default::default()
    }
}

const SIZES: [usize; 5] = [1, 4097, 4095, 4096, 300];

fn setup(bits: StateBits, variant: AdamWVariant) -> (AdamW, Vec<f32>) {
    let layout = ArenaLayout::packed(
        SIZES.iter().enumerate().map(|(i, &n)| (format!("t{i}"), n)),
        64,
    )
    .unwrap();
    let mut params = vec![f32::NAN; layout.len()]; // padding: must never be touched
    let mut rng = Rng(7);
    for t in layout.tensors() {
        params[t.offset..t.offset + t.numel].copy_from_slice(&rng.vec(t.numel, 0.05));
    }
    (AdamW::new(layout, cfg(bits, variant)).unwrap(), params)
}

fn grads(opt: &AdamW, rng: &mut Rng, scale: f32) -> Vec<f32> {
    let mut g = vec![f32::NAN; opt.layout().len()];
    for (i, t) in opt.layout().tensors().iter().enumerate() {
        let s = scale * [1.0, 0.01, 0.3, 3.0, 1e-4][i % 5];
        g[t.offset..t.offset + t.numel].copy_from_slice(&rng.vec(t.numel, s));
    }
    g
}

#[test]
fn min_8bit_size_threshold() {
    let (opt, _) = setup(StateBits::Blockwise8, AdamWVariant::Bnb);
    let kinds: Vec<_> = opt
        .state_layout()
        .per_tensor
        .iter()
        .map(|t| t.kind)
        .collect();
    use StateKind::*;
    assert_eq!(kinds, vec![F32, Blockwise8, F32, Blockwise8, F32]);
    let (opt, _) = setup(StateBits::Full32, AdamWVariant::Bnb);
    assert!(opt.state_layout().per_tensor.iter().all(|t| t.kind == F32));
}

/// The arena step against the reference applied tensor by tensor: every f32-state element via
/// `update_f32`, every 8-bit block via `update_block`, state kept here in plain vectors.
#[test]
fn arena_step_equals_per_tensor_reference() {
    for variant in [AdamWVariant::Torch, AdamWVariant::Bnb] {
        let (mut opt, mut params) = setup(StateBits::Blockwise8, variant);
        let layout = opt.layout().clone();
        let c = opt.config().clone();
        let maps = Maps::default();
        let mut ref_p = params.clone();
        // reference state per tensor
        let mut m32: Vec<Vec<f32>> = layout
            .tensors()
            .iter()
            .map(|t| vec![0.0; t.numel])
            .collect();
        let mut v32 = m32.clone();
        let mut c1: Vec<Vec<u8>> = layout
            .tensors()
            .iter()
            .map(|t| vec![0u8; t.numel.div_ceil(QBLOCK) * QBLOCK])
            .collect();
        let mut c2 = c1.clone();
        let mut am: Vec<Vec<f32>> = layout
            .tensors()
            .iter()
            .map(|t| vec![0.0; t.numel.div_ceil(QBLOCK)])
            .collect();
        let mut av = am.clone();
        let mut rng = Rng(99);
        for step in 0..12u64 {
            let g = grads(&opt, &mut rng, 0.5);
            let lr = 1e-3 * (1.0 + step as f64);
            let rep = opt.step(&mut params, &g, lr).unwrap();
            let s = StepScalars::new(&c, step + 1, lr, rep.grad_scale);
            for (i, t) in layout.tensors().iter().enumerate() {
                let p = &mut ref_p[t.offset..t.offset + t.numel];
                let gt = &g[t.offset..t.offset + t.numel];
                match opt.state_layout().per_tensor[i].kind {
                    StateKind::F32 => {
                        for e in 0..t.numel {
                            update_f32(&s, &mut p[e], &mut m32[i][e], &mut v32[i][e], gt[e]);
                        }
                    }
                    StateKind::Blockwise8 => {
                        for b in 0..t.numel.div_ceil(QBLOCK) {
                            let r = b * QBLOCK..((b + 1) * QBLOCK).min(t.numel);
                            let n = r.len();
                            update_block(
                                &s,
                                &maps,
                                &mut p[r.clone()],
                                &gt[r.clone()],
                                BlockState {
                                    c1: &mut c1[i][b * QBLOCK..b * QBLOCK + n],
                                    c2: &mut c2[i][b * QBLOCK..b * QBLOCK + n],
                                    absmax_m: &mut am[i][b],
                                    absmax_v: &mut av[i][b],
                                },
                            );
                        }
                    }
                }
            }
            let same = params
                .iter()
                .zip(&ref_p)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{variant:?} step {step}: arena differs from the reference"
            );
        }
    }
}

#[test]
fn odd_sizes_padding_and_nonfinite_gradients() {
    for bits in [StateBits::Full32, StateBits::Blockwise8] {
        let (mut opt, mut params) = setup(bits, AdamWVariant::Torch);
        let mut rng = Rng(3);
        let mut g = grads(&opt, &mut rng, 1.0);
        let t1 = opt.layout().tensors()[1].clone(); // 4097 elements
        let t0 = opt.layout().tensors()[0].clone(); // 1 element
        g[t1.offset + 4096] = f32::INFINITY; // the lone element of the last block
        g[t1.offset + 17] = f32::NAN;
        g[t0.offset] = f32::NEG_INFINITY;
        let before = params.clone();
        let (m_before, v_before) = opt.moments("t1").unwrap();
        let rep = opt.step(&mut params, &g, 1e-3).unwrap();
        assert_eq!(rep.nonfinite, 3);
        assert!(
            rep.grad_norm.unwrap().is_finite(),
            "norm skips non-finite elements"
        );
        for e in [t1.offset + 4096, t1.offset + 17, t0.offset] {
            assert_eq!(
                params[e].to_bits(),
                before[e].to_bits(),
                "element {e} moved"
            );
        }
        let (m, v) = opt.moments("t1").unwrap();
        // zero state stays zero for the skipped elements (dequantized 0 requantizes to 0)
        for e in [17usize, 4096] {
            assert_eq!((m[e], v[e]), (0.0, 0.0), "{bits:?} state of {e}");
            assert_eq!((m_before[e], v_before[e]), (0.0, 0.0));
        }
        // every other tensor element moved, padding untouched (still NaN)
        let in_tensor: Vec<bool> = {
            let mut f = vec![false; params.len()];
            for t in opt.layout().tensors() {
                f[t.offset..t.offset + t.numel]
                    .iter_mut()
                    .for_each(|x| *x = true);
            }
            f
        };
        for (e, &inside) in in_tensor.iter().enumerate() {
            if !inside {
                assert!(params[e].is_nan(), "padding element {e} was written");
            }
        }
        let moved = params
            .iter()
            .zip(&before)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(moved, opt.layout().numel() - 3, "{bits:?}");
        // a second step keeps working and the skipped state is still finite
        let g2 = grads(&opt, &mut rng, 1.0);
        opt.step(&mut params, &g2, 1e-3).unwrap();
        let (m, v) = opt.moments("t1").unwrap();
        assert!(m.iter().chain(&v).all(|x| x.is_finite()));
    }
}

#[test]
fn thousands_of_steps_stay_finite_and_converge() {
    // minimise ½|p − target|² with noisy gradients: g = p − target + noise
    for bits in [StateBits::Full32, StateBits::Blockwise8] {
        for variant in [AdamWVariant::Torch, AdamWVariant::Bnb] {
            let (mut opt, mut params) = setup(bits, variant);
            let mut rng = Rng(11);
            let target: Vec<f32> = rng.vec(params.len(), 0.5);
            let sched = LrSchedule::Cosine {
                warmup: 100,
                total: 3000,
                num_cycles: 0.5,
                min_lr_rate: 0.0,
            };
            let mut opt_cfg = opt.config().clone();
            opt_cfg.lr = 2e-2;
            opt = AdamW::new(opt.layout().clone(), opt_cfg).unwrap();
            let err0: f64 = dist(&opt, &params, &target);
            for _ in 0..3000 {
                let mut g = vec![0f32; params.len()];
                for t in opt.layout().tensors() {
                    for e in t.offset..t.offset + t.numel {
                        g[e] = params[e] - target[e] + 0.01 * rng.uniform();
                    }
                }
                let rep = opt.step_scheduled(&mut params, &g, &sched).unwrap();
                assert_eq!(rep.nonfinite, 0);
            }
            assert_eq!(opt.steps(), 3000);
            for t in opt.layout().tensors() {
                assert!(params[t.offset..t.offset + t.numel]
                    .iter()
                    .all(|x| x.is_finite()));
                let (m, v) = opt.moments(&t.name).unwrap();
                assert!(
                    m.iter().chain(&v).all(|x| x.is_finite()),
                    "{} state",
                    t.name
                );
            }
            let err = dist(&opt, &params, &target);
            assert!(err < 0.05 * err0, "{bits:?} {variant:?}: {err0} -> {err}");
        }
    }
}

fn dist(opt: &AdamW, p: &[f32], target: &[f32]) -> f64 {
    let mut s = 0f64;
    for t in opt.layout().tensors() {
        for e in t.offset..t.offset + t.numel {
            s += ((p[e] - target[e]) as f64).powi(2);
        }
    }
    s.sqrt()
}

#[test]
fn save_load_mid_run_continues_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    for bits in [StateBits::Full32, StateBits::Blockwise8] {
        let sched = LrSchedule::Linear {
            warmup: 2,
            total: 10,
        };
        let (mut a, mut pa) = setup(bits, AdamWVariant::Torch);
        let mut rng = Rng(5);
        let gs: Vec<Vec<f32>> = (0..10).map(|_| grads(&a, &mut rng, 2.0)).collect();
        for g in &gs {
            a.step_scheduled(&mut pa, g, &sched).unwrap();
        }
        let (mut b, mut pb) = setup(bits, AdamWVariant::Torch);
        for g in &gs[..5] {
            b.step_scheduled(&mut pb, g, &sched).unwrap();
        }
        let path = dir.path().join(format!("opt-{bits:?}.safetensors"));
        b.save(&path).unwrap();
        let cfg = b.config().clone();
        let layout = b.layout().clone();
        drop(b);
        let mut b = AdamW::load(&path, layout, cfg).unwrap();
        assert_eq!(b.steps(), 5);
        for g in &gs[5..] {
            b.step_scheduled(&mut pb, g, &sched).unwrap();
        }
        assert!(
            pa.iter().zip(&pb).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{bits:?} params"
        );
        assert_eq!(a.state().bytes(), b.state().bytes(), "{bits:?} state");
        assert_eq!(a.to_bytes().unwrap(), b.to_bytes().unwrap());
    }
}

#[test]
fn load_rejects_mismatches_with_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (opt, _) = setup(StateBits::Blockwise8, AdamWVariant::Torch);
    let path = dir.path().join("s.safetensors");
    opt.save(&path).unwrap();
    let mut other = opt.config().clone();
    other.beta2 = 0.99;
    let e = AdamW::load(&path, opt.layout().clone(), other).unwrap_err();
    assert!(
        matches!(e, OptimError::StateFile { .. }) && e.to_string().contains("beta2"),
        "{e}"
    );
    let l2 = ArenaLayout::packed([("t0", 1usize), ("t1", 4098)], 64).unwrap();
    let e = AdamW::load(&path, l2, opt.config().clone()).unwrap_err();
    assert!(e.to_string().contains("t1"), "{e}");
    let bytes = std::fs::read(&path).unwrap();
    let trunc = dir.path().join("trunc.safetensors");
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    let e = AdamW::load(&trunc, opt.layout().clone(), opt.config().clone()).unwrap_err();
    assert!(e.to_string().contains("trunc.safetensors"), "{e}");
    let e = AdamW::load(
        &dir.path().join("missing"),
        opt.layout().clone(),
        opt.config().clone(),
    )
    .unwrap_err();
    assert!(matches!(e, OptimError::Io { .. }));
}

#[test]
fn wrong_arena_lengths_and_lr_are_errors_naming_the_step() {
    let (mut opt, mut params) = setup(StateBits::Full32, AdamWVariant::Torch);
    let g = vec![0f32; params.len() - 1];
    let e = opt.step(&mut params, &g, 1e-3).unwrap_err().to_string();
    assert!(e.contains("step 1") && e.contains("gradient"), "{e}");
    let g = vec![0f32; params.len()];
    let e = opt.step(&mut params, &g, f64::NAN).unwrap_err().to_string();
    assert!(e.contains("step 1") && e.contains("learning rate"), "{e}");
    assert_eq!(opt.steps(), 0);
}

#[test]
fn result_does_not_depend_on_thread_count() {
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let (mut opt, mut p) = setup(StateBits::Blockwise8, AdamWVariant::Bnb);
            let mut rng = Rng(8);
            let mut norms = Vec::new();
            for _ in 0..5 {
                let g = grads(&opt, &mut rng, 3.0);
                norms.push(
                    opt.step(&mut p, &g, 1e-3)
                        .unwrap()
                        .grad_norm
                        .unwrap()
                        .to_bits(),
                );
            }
            (
                p.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                norms,
                opt.to_bytes().unwrap(),
            )
        })
    };
    let (a, b) = (run(1), run(3));
    assert_eq!(a.1, b.1, "norms");
    let d = a.0.iter().zip(&b.0).position(|(x, y)| x != y);
    assert_eq!(d, None, "first differing param");
    assert!(a.2 == b.2, "state bytes");
}

#[test]
fn eight_bit_tracks_thirty_two_bit() {
    // Same gradients (a fixed quadratic pull plus noise) into both: after 100 steps the 8-bit
    // parameters stay within a few percent of the step size of the 32-bit ones.
    let (mut o32, mut p32) = setup(StateBits::Full32, AdamWVariant::Bnb);
    let (mut o8, mut p8) = setup(StateBits::Blockwise8, AdamWVariant::Bnb);
    let mut rng = Rng(21);
    let lr = 1e-3;
    for _ in 0..100 {
        let noise = grads(&o32, &mut rng, 0.1);
        let mk = |p: &[f32]| -> Vec<f32> {
            p.iter()
                .zip(&noise)
                .map(|(x, n)| if x.is_nan() { *n } else { x + n })
                .collect()
        };
        let (g32, g8) = (mk(&p32), mk(&p8));
        o32.step(&mut p32, &g32, lr).unwrap();
        o8.step(&mut p8, &g8, lr).unwrap();
    }
    let t = o8.layout().tensors()[1].clone();
    let mut worst = 0f32;
    for e in t.offset..t.offset + t.numel {
        worst = worst.max((p8[e] - p32[e]).abs());
    }
    // 100 steps of at most ~lr each: the paths may drift by a fraction of the total movement
    assert!(worst < 100.0 * lr as f32 * 0.1, "worst {worst}");
    assert!(worst > 0.0, "8-bit state must actually differ from 32-bit");
}
