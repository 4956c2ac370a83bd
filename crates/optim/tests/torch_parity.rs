//! 32-bit AdamW against PyTorch, step by step (`fixtures/adamw_torch.safetensors`, made by
//! `fixtures/gen_fixtures.py` with torch 2.15.0's `torch.optim.AdamW` on the CPU).
//!
//! m and v must be bit-identical at every step. p is allowed the effect of torch's vectorised
//! `sqrt` (MKL), which is 1 ulp off the correctly rounded value on ~0.6% of inputs: per step the
//! update `u = s·m/d` may differ by `|u|·2⁻²³` and p's own rounding by `ulp(p)`, so after k
//! steps `|Δp| ≤ k·(4·lr·2⁻²³) + k·2⁻²³·|p|` (`|u| ≤ ~3.2·lr` for Adam's first steps,
//! `(1−β1)/sqrt(1−β2)`).

mod common;
use common::*;
use qlora_optim::{AdamW, AdamWConfig, ArenaLayout, ARENA_ALIGN};
use safetensors::SafeTensors;

struct Case {
    sizes: Vec<usize>,
    steps: usize,
    betas: (f64, f64),
    eps: f64,
    wd: f64,
    max_norm: Option<f64>,
}

fn case(st: &SafeTensors, meta: &serde_json::Value, name: &str) -> Case {
    let c = &meta[name];
    let f = |k: &str| c[k].as_f64().unwrap();
    let _ = st;
    Case {
        sizes: c["sizes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect(),
        steps: c["steps"].as_u64().unwrap() as usize,
        betas: (
            c["betas"][0].as_f64().unwrap(),
            c["betas"][1].as_f64().unwrap(),
        ),
        eps: f("eps"),
        wd: f("weight_decay"),
        max_norm: c["max_norm"].as_f64(),
    }
}

/// `own_clip`: clip with this crate's norm (m, v, p then carry its ≤ 2-ulp norm difference);
/// otherwise feed torch's already clipped gradients (`gclip`) with clipping off, which must give
/// bit-identical m and v again.
fn run(name: &str, own_clip: bool) {
    let bytes = fixture("adamw_torch.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, md) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&md.metadata().as_ref().unwrap()["cases"]).unwrap();
    let c = case(&st, &meta, name);
    let lrs = f64s(&st, &format!("{name}.lr"));
    let layout = ArenaLayout::packed(
        c.sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (format!("t{i}"), n)),
        ARENA_ALIGN,
    )
    .unwrap();
    let cfg = AdamWConfig {
        lr: lrs[0],
        beta1: c.betas.0,
        beta2: c.betas.1,
        eps: c.eps,
        weight_decay: c.wd,
        max_grad_norm: if own_clip { c.max_norm } else { None },
        ..Default::default()
    };
    let mut opt = AdamW::new(layout.clone(), cfg).unwrap();
    let mut params = vec![0f32; layout.len()];
    for (i, t) in layout.tensors().iter().enumerate() {
        params[t.offset..t.offset + t.numel].copy_from_slice(&f32s(&st, &format!("{name}.p0.{i}")));
    }
    let torch_norms = c.max_norm.map(|_| f32s(&st, &format!("{name}.total_norm")));
    let gkey = if c.max_norm.is_some() && !own_clip {
        "gclip"
    } else {
        "g"
    };
    let mut worst_p = 0f64;
    let (mut p_exact, mut p_total) = (0usize, 0usize);
    for s in 0..c.steps {
        let mut grads = vec![0f32; layout.len()];
        for (i, t) in layout.tensors().iter().enumerate() {
            grads[t.offset..t.offset + t.numel]
                .copy_from_slice(&f32s(&st, &format!("{name}.{gkey}.{s}.{i}")));
        }
        let rep = opt.step(&mut params, &grads, lrs[s]).unwrap();
        assert_eq!(rep.step, s as u64 + 1);
        assert_eq!(rep.nonfinite, 0);
        if let (Some(tn), true) = (&torch_norms, own_clip) {
            // torch reduces in f32: allow 2 ulp on the norm; the coefficient then differs by
            // at most that relative amount and so do the clipped gradients.
            let n = rep.grad_norm.unwrap();
            within(
                &format!("{name} step {s} total_norm"),
                &[n],
                &[tn[s]],
                0.0,
                2.0 * 2f64.powi(-23),
            );
            // and the clipped gradients: coef·g against torch's, within the same 2 ulp (+1 for
            // the multiply's own rounding)
            for (i, t) in layout.tensors().iter().enumerate() {
                let want = f32s(&st, &format!("{name}.gclip.{s}.{i}"));
                let got: Vec<f32> = grads[t.offset..t.offset + t.numel]
                    .iter()
                    .map(|g| g * rep.grad_scale)
                    .collect();
                within(
                    &format!("{name} s{s} gclip{i}"),
                    &got,
                    &want,
                    0.0,
                    3.0 * 2f64.powi(-23),
                );
            }
        }
        let k = (s + 1) as f64;
        let lr_max = lrs[..=s].iter().cloned().fold(0.0, f64::max);
        for (i, t) in layout.tensors().iter().enumerate() {
            let (m, v) = opt.moments(&t.name).unwrap();
            let wm = f32s(&st, &format!("{name}.m.{s}.{i}"));
            let wv = f32s(&st, &format!("{name}.v.{s}.{i}"));
            let wp = f32s(&st, &format!("{name}.p.{s}.{i}"));
            let p = &params[t.offset..t.offset + t.numel];
            if !own_clip || c.max_norm.is_none() {
                assert!(
                    m.iter().zip(&wm).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{name} step {s} tensor {i}: m not bit-identical"
                );
                assert!(
                    v.iter().zip(&wv).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{name} step {s} tensor {i}: v not bit-identical"
                );
            } else {
                // Clipped gradients carry the coefficient's ≤ 3-ulp relative difference into
                // every term of m = Σ β1^j (1−β1) g_j (and 2× into v); with cancellation between
                // terms the bound is relative to the sum of magnitudes, ≤ max|g| here.
                let r = 3.0 * 2f64.powi(-23);
                let gmax = (0..=s)
                    .flat_map(|q| f32s(&st, &format!("{name}.gclip.{q}.{i}")))
                    .fold(0f64, |a, x| a.max(x.abs() as f64));
                within(&format!("{name} s{s} m{i}"), &m, &wm, 2.0 * r * gmax, r);
                within(
                    &format!("{name} s{s} v{i}"),
                    &v,
                    &wv,
                    4.0 * r * gmax * gmax,
                    2.0 * r,
                );
            }
            // with own clipping the gradient differences move the update by up to a few ulp of
            // lr more per step
            let atol = k * (if own_clip { 16.0 } else { 4.0 }) * lr_max * 2f64.powi(-23);
            let rtol = k * 2f64.powi(-23);
            let w = within(&format!("{name} step {s} p{i}"), p, &wp, atol, rtol);
            worst_p = worst_p.max(w);
            p_exact += p
                .iter()
                .zip(&wp)
                .filter(|(a, b)| a.to_bits() == b.to_bits())
                .count();
            p_total += p.len();
        }
    }
    eprintln!(
        "torch parity case {name} (own clip {own_clip}): p worst {:.1}% of budget, {p_exact}/{p_total} bit-identical",
        worst_p * 100.0
    );
}

#[test]
fn torch_adamw_weight_decay_odd_sizes() {
    run("a", false);
}

#[test]
fn torch_adamw_changing_lr_on_torch_clipped_grads() {
    run("b", false);
}

#[test]
fn torch_adamw_changing_lr_with_own_clipping() {
    run("b", true);
}

#[test]
fn torch_adamw_qlora_shapes_no_decay() {
    run("c", false);
}
