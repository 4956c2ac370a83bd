//! f64 central-difference checks of every op's backward (the same generic code the f32
//! backend runs), and of the whole schedule (`forward_backward` vs `forward_loss`).
//! Each op is checked through the scalar `L = Σ r ⊙ out` with a fixed random `r`, so the
//! analytic gradient is `bwd(d_out = r)`.

use qlora_train::cpu::{
    attention, cross_entropy, dense_linear, embedding, nf4_lora_linear, rmsnorm, rope, swiglu,
    FrozenRef,
};
use qlora_train::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const EPS: f64 = 1e-6;
const TOL: f64 = 1e-7;

fn rnd(rng: &mut SmallRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Compare `analytic` with central differences of `f` at every element of `x` (or a stride).
fn check(name: &str, x: &[f64], analytic: &[f64], mut f: impl FnMut(&[f64]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{name}");
    let step = (x.len() / 97).max(1);
    let scale = analytic.iter().fold(1e-3f64, |m, &g| m.max(g.abs()));
    let mut xp = x.to_vec();
    for i in (0..x.len()).step_by(step) {
        xp[i] = x[i] + EPS;
        let lp = f(&xp);
        xp[i] = x[i] - EPS;
        let lm = f(&xp);
        xp[i] = x[i];
        let num = (lp - lm) / (2.0 * EPS);
        let err = (num - analytic[i]).abs() / scale;
        assert!(
            err < TOL,
            "{name}[{i}]: analytic {} numeric {num} (err {err:e})",
            analytic[i]
        );
    }
}

#[test]
fn rmsnorm_bwd() {
    let mut rng = SmallRng::seed_from_u64(1);
    let (n, c) = (3, 8);
    let x = rnd(&mut rng, n * c);
    let w = rnd(&mut rng, c);
    let r = rnd(&mut rng, n * c);
    let f = |x: &[f64]| {
        let mut o = vec![0.0; n * c];
        let mut s = vec![0.0; n];
        rmsnorm::fwd(&mut o, &mut s, x, &w, c, 1e-5);
        dot(&o, &r)
    };
    let mut o = vec![0.0; n * c];
    let mut s = vec![0.0; n];
    rmsnorm::fwd(&mut o, &mut s, &x, &w, c, 1e-5);
    let mut dx = vec![0.0; n * c];
    rmsnorm::bwd(&mut dx, &r, &x, &s, &w, c);
    check("rmsnorm d_x", &x, &dx, f);
}

#[test]
fn rope_bwd() {
    let mut rng = SmallRng::seed_from_u64(2);
    let dims = RopeDims {
        b: 2,
        t: 3,
        heads: 2,
        d: 8,
        pos_offset: 2,
    };
    let inv: Vec<f64> = (0..4).map(|i| 1.0 / 100f64.powf(i as f64 / 4.0)).collect();
    let table: Vec<f64> = rope::table_f32(&inv, 5).iter().map(|&x| x as f64).collect();
    let n = 2 * 3 * 2 * 8;
    let x = rnd(&mut rng, n);
    let r = rnd(&mut rng, n);
    let f = |x: &[f64]| {
        let mut y = x.to_vec();
        rope::fwd(&mut y, &table, dims);
        dot(&y, &r)
    };
    let mut dx = r.clone();
    rope::bwd(&mut dx, &table, dims);
    check("rope d_x", &x, &dx, f);
}

#[test]
fn swiglu_bwd() {
    let mut rng = SmallRng::seed_from_u64(3);
    let n = 40;
    let e = rnd(&mut rng, n);
    let g = rnd(&mut rng, n);
    let r = rnd(&mut rng, n);
    let mut de = vec![0.0; n];
    let mut dg = vec![0.0; n];
    swiglu::bwd(&mut de, &mut dg, &r, &e, &g);
    let fe = |e: &[f64]| {
        let mut o = vec![0.0; n];
        swiglu::fwd(&mut o, e, &g);
        dot(&o, &r)
    };
    check("swiglu d_gate", &e, &de, fe);
    let fg = |g: &[f64]| {
        let mut o = vec![0.0; n];
        swiglu::fwd(&mut o, &e, g);
        dot(&o, &r)
    };
    check("swiglu d_up", &g, &dg, fg);
}

fn attention_case(dims: AttnDims, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let nq = dims.b * dims.tq * dims.h * dims.d;
    let nk = dims.b * dims.kv_rows * dims.hkv * dims.d;
    let (q, k, v, r) = (
        rnd(&mut rng, nq),
        rnd(&mut rng, nk),
        rnd(&mut rng, nk),
        rnd(&mut rng, nq),
    );
    let run = |q: &[f64], k: &[f64], v: &[f64]| {
        let mut o = vec![0.0; nq];
        let mut p = vec![0.0; attention::saved_len(dims)];
        attention::fwd(&mut o, &mut p, q, k, v, dims);
        (o, p)
    };
    let (_, p) = run(&q, &k, &v);
    let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
    attention::bwd(&mut dq, &mut dk, &mut dv, &r, &p, &q, &k, &v, dims);
    check("attention d_q", &q, &dq, |x| dot(&run(x, &k, &v).0, &r));
    check("attention d_k", &k, &dk, |x| dot(&run(&q, x, &v).0, &r));
    check("attention d_v", &v, &dv, |x| dot(&run(&q, &k, x).0, &r));
}

#[test]
fn attention_bwd_gqa() {
    attention_case(
        AttnDims {
            b: 2,
            tq: 4,
            tk: 4,
            kv_rows: 4,
            h: 4,
            hkv: 2,
            d: 4,
        },
        4,
    );
}

#[test]
fn attention_bwd_with_cache_offset() {
    // Tq < Tk (queries at positions 2..5 of a 5-long cache with 6 rows per batch).
    attention_case(
        AttnDims {
            b: 1,
            tq: 3,
            tk: 5,
            kv_rows: 6,
            h: 2,
            hkv: 1,
            d: 4,
        },
        5,
    );
}

fn slot(r: usize, i: usize, o: usize) -> LoraSlot {
    LoraSlot {
        layer: 0,
        proj: Proj::Q,
        r,
        in_features: i,
        out_features: o,
        scale: 1.7,
        a_offset: 3,
        b_offset: 3 + r * i,
    }
}

fn linear_case(dropout: Option<Dropout>, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let (n, i, o, rk) = (5, 6, 7, 3);
    let dims = LinearDims {
        n,
        in_features: i,
        out_features: o,
    };
    let s = slot(rk, i, o);
    let x = rnd(&mut rng, n * i);
    let w = rnd(&mut rng, o * i);
    let bias = rnd(&mut rng, o);
    let params = rnd(&mut rng, s.b_offset + o * rk + 2);
    let r = rnd(&mut rng, n * o);
    let run = |x: &[f64], p: &[f64]| {
        let mut y = vec![0.0; n * o];
        let mut u = vec![0.0; n * rk];
        nf4_lora_linear::fwd(
            &mut y,
            Some(&mut u),
            x,
            FrozenRef::dense(&w),
            Some(&bias),
            Some((p, &s, dropout)),
            dims,
        );
        (y, u)
    };
    let (_, u) = run(&x, &params);
    let mut dx = vec![0.0; n * i];
    let mut grads = vec![0.0; params.len()];
    nf4_lora_linear::bwd(
        Some(&mut dx),
        false,
        Some(&mut grads),
        &r,
        &x,
        Some(&u),
        FrozenRef::dense(&w),
        Some((&params, &s, dropout)),
        dims,
    );
    check("nf4_lora_linear d_x", &x, &dx, |x| {
        dot(&run(x, &params).0, &r)
    });
    check("nf4_lora_linear d_lora (A and B)", &params, &grads, |p| {
        dot(&run(&x, p).0, &r)
    });
    // outside the slot the gradient arena is untouched
    assert!(grads[..3]
        .iter()
        .chain(&grads[s.b_range().end..])
        .all(|&g| g == 0.0));
    // accumulate mode adds
    let mut dx2 = vec![1.0; n * i];
    nf4_lora_linear::bwd(
        Some(&mut dx2),
        true,
        None,
        &r,
        &x,
        Some(&u),
        FrozenRef::dense(&w),
        Some((&params, &s, dropout)),
        dims,
    );
    for (a, b) in dx2.iter().zip(&dx) {
        assert!((a - 1.0 - b).abs() < 1e-12);
    }
}

#[test]
fn nf4_lora_linear_bwd() {
    linear_case(None, 6);
}

#[test]
fn nf4_lora_linear_bwd_dropout() {
    linear_case(Some(Dropout { p: 0.3, seed: 42 }), 7);
}

#[test]
fn dense_linear_bwd() {
    let mut rng = SmallRng::seed_from_u64(8);
    let dims = LinearDims {
        n: 4,
        in_features: 5,
        out_features: 3,
    };
    let x = rnd(&mut rng, 20);
    let w = rnd(&mut rng, 15);
    let r = rnd(&mut rng, 12);
    let run = |x: &[f64], w: &[f64]| {
        let mut y = vec![0.0; 12];
        dense_linear::fwd(&mut y, x, w, dims);
        dot(&y, &r)
    };
    let mut dx = vec![0.0; 20];
    let mut dw = vec![0.0; 15];
    dense_linear::bwd_acc_dw(&mut dx, &mut dw, &r, &x, &w, dims);
    check("dense_linear d_x", &x, &dx, |x| run(x, &w));
    check("dense_linear d_w", &w, &dw, |w| run(&x, w));
}

#[test]
fn cross_entropy_bwd() {
    let mut rng = SmallRng::seed_from_u64(9);
    let (n, v) = (4, 6);
    let logits = rnd(&mut rng, n * v);
    let targets = [2, -100, 5, 0];
    let f = |x: &[f64]| {
        let mut lse = vec![0.0; n];
        let (s, c) = cross_entropy::fwd(&mut lse, x, &targets, v);
        assert_eq!(c, 3);
        s / 3.0
    };
    let mut lse = vec![0.0; n];
    cross_entropy::fwd(&mut lse, &logits, &targets, v);
    let mut d = logits.clone();
    cross_entropy::bwd(&mut d, &lse, &targets, v, 1.0 / 3.0);
    check("cross_entropy d_logits", &logits, &d, f);
    assert!(
        d[v..2 * v].iter().all(|&x| x == 0.0),
        "ignored row has gradient"
    );
}

#[test]
fn embedding_bwd() {
    let mut rng = SmallRng::seed_from_u64(10);
    let (v, c) = (5, 3);
    let ids = [1u32, 4, 1, 0];
    let table = rnd(&mut rng, v * c);
    let r = rnd(&mut rng, ids.len() * c);
    let mut d = vec![0.0; v * c];
    embedding::bwd_acc(&mut d, &ids, &r, c);
    check("embedding d_table", &table, &d, |t| {
        let mut o = vec![0.0; ids.len() * c];
        embedding::fwd(&mut o, &ids, t, c);
        dot(&o, &r)
    });
}

/// The whole schedule in f64: GQA, q/k/v + o + MLP biases, LoRA on all seven projections
/// with non-zero A and B (init false), both modules_to_save, checkpointing on.
#[test]
fn schedule_forward_backward_matches_finite_differences() {
    let be = CpuBackend::<f64>::new();
    let mut cfg = ModelConfig::synthetic_llama(16, 24, 2, 4, 2, 40);
    cfg.qkv_bias = true;
    cfg.o_bias = true;
    cfg.mlp_bias = true;
    let model = Model::random(&be, cfg.clone(), 11, BaseFormat::Dense).unwrap();
    let lcfg = LoraConfig {
        r: 2,
        lora_alpha: 5.0,
        target_modules: TargetModules::AllLinear,
        rank_pattern: vec![("down_proj".into(), 3)],
        init: LoraInit::Random,
        modules_to_save: vec![SavedModule::LmHead, SavedModule::EmbedTokens],
        ..Default::default()
    };
    let src = qlora_train::model::random_source(&cfg, 11).unwrap();
    let w = AdapterWeights::init(&lcfg, &cfg, 12, |m| {
        src.get_f32(match m {
            SavedModule::LmHead => "lm_head.weight",
            SavedModule::EmbedTokens => "model.embed_tokens.weight",
        })
    })
    .unwrap();
    let ids: Vec<u32> = (0..10).map(|i| (i * 7 + 3) % 40).collect();
    let mut labels: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
    labels[3] = -100;
    let batch = Batch::new(ids, labels, 2, 5).unwrap();
    let mut a = Adapter::new(&be, &w);
    a.params = w.data.iter().map(|&x| x as f64).collect();
    let opts = StepOptions {
        checkpointing: true,
        ..Default::default()
    };
    forward_backward(&be, &model, &mut a, &batch, opts).unwrap();
    let analytic = a.grads.clone();
    let x = a.params.clone();
    let mut probe = Adapter::new(&be, &w);
    check("schedule d_adapter", &x, &analytic, |p| {
        probe.params.copy_from_slice(p);
        forward_loss(&be, &model, Some(&probe), &batch)
            .unwrap()
            .mean()
    });
}
