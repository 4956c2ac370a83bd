//! GPU kernels (`qlora-cuda`, f32 builds) against the CPU backend (`qlora-train`), which is the
//! reference the GPU path is checked against (design.md §4, lane C). Ignored without a GPU;
//! run with `cargo test --release --test gpu_parity -- --ignored` (scripts/gpu_suite.sh).
//! Without a device these fail with the `NoGpu` reason: they never pass vacuously.
//!
//! Tolerance rule: `|got − ref| ≤ atol + rtol·|ref|` per element, with the worst element and
//! its share of the budget printed. Budgets are derived below from the accumulation length
//! (both sides sum in f32, in different orders: |error| ≤ γ_K·Σ|terms| with γ_K ≈ K·u, and
//! ≈ √K·u in practice); they have not been calibrated on a GPU yet.

use qlora_cuda::ops::{linear, nf4::Nf4Weight, rmsnorm as g_rmsnorm, swiglu as g_swiglu};
use qlora_cuda::Device;
use qlora_nf4::{Dtype, Nf4Tensor};
use qlora_train::backend::{Backend, FrozenWeight, LinearDims, LoraArgs};
use qlora_train::cpu::{rmsnorm, swiglu, CpuBackend};
use qlora_train::lora::{LoraSlot, Proj};

/// f32 unit roundoff.
const U: f64 = 1.0 / (1u64 << 24) as f64;

fn dev() -> Device {
    Device::open(0).unwrap_or_else(|e| panic!("needs a CUDA device: {e}"))
}

fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

/// Per-element check; `atol[i]` lets a bound depend on the element (Σ|terms| of its sum).
fn check(what: &str, got: &[f32], want: &[f32], atol: impl Fn(usize) -> f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (mut worst, mut at) = (0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let budget = atol(i) + rtol * (w as f64).abs();
        // A zero budget asks for equality (0/0 would be NaN and pass every comparison).
        let diff = (g as f64 - w as f64).abs();
        let used = if diff == 0.0 { 0.0 } else { diff / budget };
        assert!(
            used <= 1.0,
            "{what}[{i}]: got {g:e}, reference {w:e}, {:.0}% of the budget",
            used * 100.0
        );
        if used > worst {
            (worst, at) = (used, i);
        }
    }
    eprintln!(
        "{what}: worst element {at} at {:.1}% of its budget",
        worst * 100.0
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn rmsnorm_fwd_bwd_f32() {
    let dev = dev();
    let (rows, c, eps) = (96usize, 1024usize, 1e-5f32);
    let (x, g, dy) = (
        values(rows * c, 1, 2.0),
        values(c, 2, 1.0),
        values(rows * c, 3, 1.0),
    );
    let (mut y, mut rstd) = (vec![0f32; rows * c], vec![0f32; rows]);
    rmsnorm::fwd(&mut y, &mut rstd, &x, &g, c, eps as f64);
    let mut dx = vec![0f32; rows * c];
    rmsnorm::bwd(&mut dx, &dy, &x, &rstd, &g, c);

    let (xd, gd, dyd) = (
        dev.upload(&x, "x").unwrap(),
        dev.upload(&g, "g").unwrap(),
        dev.upload(&dy, "dy").unwrap(),
    );
    let mut yd = dev.zeros::<f32>(rows * c, "y").unwrap();
    let mut rd = dev.zeros::<f32>(rows, "rstd").unwrap();
    g_rmsnorm::fwd(
        &dev,
        &mut yd.view_mut(),
        &mut rd.view_mut(),
        &xd.view(),
        &gd.view(),
        rows,
        c,
        eps,
        None,
    )
    .unwrap();
    let mut dxd = dev.zeros::<f32>(rows * c, "dx").unwrap();
    g_rmsnorm::bwd(
        &dev,
        &mut dxd.view_mut(),
        &dyd.view(),
        &xd.view(),
        &rd.view(),
        &gd.view(),
        rows,
        c,
        None,
    )
    .unwrap();

    // rstd: a C-term sum of squares, then rsqrt (≤ 2 ulp on the GPU): rel ≤ (√C/2 + 2)·u, ×8 margin.
    let rel = 8.0 * ((c as f64).sqrt() / 2.0 + 2.0) * U;
    check(
        "rmsnorm::fwd rstd",
        &dev.download(&rd.view()).unwrap(),
        &rstd,
        |_| 0.0,
        rel,
    );
    check(
        "rmsnorm::fwd y",
        &dev.download(&yd.view()).unwrap(),
        &y,
        |_| 1e-7,
        rel + 4.0 * U,
    );
    // dx = rstd·(g·dy − x·rstd²·mean(g·dy·x)): a second C-term sum whose size is |x|·|g dy|·rstd³.
    let atol = |i: usize| {
        let r = i / c;
        let s: f64 = (0..c)
            .map(|k| (x[r * c + k] * g[k] * dy[r * c + k]).abs() as f64)
            .sum::<f64>()
            / c as f64;
        8.0 * (c as f64).sqrt() * U * (rstd[r] as f64).powi(3) * (x[i].abs() as f64) * s + 1e-7
    };
    check(
        "rmsnorm::bwd dx",
        &dev.download(&dxd.view()).unwrap(),
        &dx,
        atol,
        2.0 * rel,
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn swiglu_fwd_bwd_f32() {
    let dev = dev();
    let n = 1 << 16;
    let (e, g, dh) = (values(n, 4, 6.0), values(n, 5, 2.0), values(n, 6, 1.0));
    let mut h = vec![0f32; n];
    swiglu::fwd(&mut h, &e, &g);
    let (mut de, mut dg) = (vec![0f32; n], vec![0f32; n]);
    swiglu::bwd(&mut de, &mut dg, &dh, &e, &g);

    let (ed, gd, dhd) = (
        dev.upload(&e, "e").unwrap(),
        dev.upload(&g, "g").unwrap(),
        dev.upload(&dh, "dh").unwrap(),
    );
    let mut hd = dev.zeros::<f32>(n, "h").unwrap();
    g_swiglu::fwd(&dev, &mut hd.view_mut(), &ed.view(), &gd.view(), None).unwrap();
    let (mut ded, mut dgd) = (
        dev.zeros::<f32>(n, "de").unwrap(),
        dev.zeros::<f32>(n, "dg").unwrap(),
    );
    g_swiglu::bwd(
        &dev,
        &mut ded.view_mut(),
        &mut dgd.view_mut(),
        &dhd.view(),
        &ed.view(),
        &gd.view(),
        None,
    )
    .unwrap();
    // Elementwise: expf is within 2 ulp on the GPU, then a handful of roundings: 16 u relative.
    // The σ'(e) term of de cancels near e ≈ −1.28, so an absolute floor scaled by |dh·g|.
    let rel = 16.0 * U;
    check(
        "swiglu::fwd",
        &dev.download(&hd.view()).unwrap(),
        &h,
        |_| 1e-30,
        rel,
    );
    check(
        "swiglu::bwd de",
        &dev.download(&ded.view()).unwrap(),
        &de,
        |i| 16.0 * U * (dh[i] * g[i]).abs() as f64,
        rel,
    );
    check(
        "swiglu::bwd dg",
        &dev.download(&dgd.view()).unwrap(),
        &dg,
        |_| 1e-30,
        rel,
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn nf4_lora_linear_fwd_bwd_f32() {
    let dev = dev();
    // M rows, K in, N out, rank R; odd M to exercise the tile edges.
    let (m, k, n, r) = (37usize, 256usize, 192usize, 16usize);
    let scale = 2.0f32;
    let w = values(n * k, 7, 0.05);
    let t = Nf4Tensor::quantize("w", &w, &[n, k], 64, true, Dtype::F32).unwrap();
    let deq = t.dequantize_f32();
    let (x, a, b, dy) = (
        values(m * k, 8, 1.0),
        values(r * k, 9, 0.1),
        values(n * r, 10, 0.1),
        values(m * n, 11, 1.0),
    );

    // CPU backend: A and B live in an adapter arena at the slot's offsets.
    let be = CpuBackend::<f32>::new();
    let slot = LoraSlot {
        layer: 0,
        proj: Proj::Q,
        r,
        in_features: k,
        out_features: n,
        scale: scale as f64,
        a_offset: 0,
        b_offset: r * k,
    };
    let params: Vec<f32> = a.iter().chain(&b).copied().collect();
    let frozen = be.frozen("w", FrozenWeight::Nf4(t.clone()), n, k).unwrap();
    let dims = LinearDims {
        n: m,
        in_features: k,
        out_features: n,
    };
    let lora = LoraArgs {
        slot: &slot,
        dropout: None,
    };
    let (mut y, mut u) = (vec![0f32; m * n], vec![0f32; m * r]);
    be.nf4_lora_linear_fwd(
        &mut y,
        Some(&mut u),
        &x,
        &frozen,
        None,
        Some((&params, lora)),
        dims,
    );
    let (mut dx, mut grads) = (vec![0f32; m * k], vec![0f32; params.len()]);
    be.nf4_lora_linear_bwd(
        Some(&mut dx),
        false,
        Some(&mut grads),
        &dy,
        &x,
        Some(&u),
        &frozen,
        Some((&params, lora)),
        dims,
    );

    // GPU: the fused kernel (f32 build) and its backward.
    let wd = Nf4Weight::upload(&dev, &t, "w").unwrap();
    let (xd, ad, bd, dyd) = (
        dev.upload(&x, "x").unwrap(),
        dev.upload(&a, "A").unwrap(),
        dev.upload(&b, "B").unwrap(),
        dev.upload(&dy, "dy").unwrap(),
    );
    let gd = linear::LinearDims { m, k, n, r, scale };
    let (mut yd, mut usd) = (
        dev.zeros::<f32>(m * n, "y").unwrap(),
        dev.zeros::<f32>(m * r, "us").unwrap(),
    );
    linear::fwd(
        &dev,
        &mut yd.view_mut(),
        &mut usd.view_mut(),
        &xd.view(),
        &xd.view(),
        &wd,
        &ad.view(),
        &bd.view(),
        gd,
        None,
    )
    .unwrap();
    let mut dxd = dev.zeros::<f32>(m * k, "dx").unwrap();
    let (mut dad, mut dbd) = (
        dev.zeros::<f32>(r * k, "dA").unwrap(),
        dev.zeros::<f32>(n * r, "dB").unwrap(),
    );
    let mut vsd = dev.zeros::<f32>(m * r, "vs").unwrap();
    linear::bwd(
        &dev,
        &mut dxd.view_mut(),
        &mut dad.view_mut(),
        &mut dbd.view_mut(),
        &mut vsd.view_mut(),
        &dyd.view(),
        &xd.view(),
        &usd.view(),
        &wd,
        &ad.view(),
        &bd.view(),
        gd,
        false,
        None,
    )
    .unwrap();

    // Bounds: each output is a K-term (or N-, M-term) f32 dot product plus the LoRA term;
    // reassociation error ≤ 8·√len·u·Σ|terms| (Σ|terms| computed here in f64).
    let sum_abs = |len: usize, f: &dyn Fn(usize) -> f64| (0..len).map(f).sum::<f64>();
    let bound = |len: usize, s: f64| 8.0 * (len as f64).sqrt() * U * s + 1e-7;
    let ua: Vec<f64> = (0..m * r)
        .map(|i| sum_abs(k, &|q| (x[i / r * k + q] * a[i % r * k + q]).abs() as f64))
        .collect();
    let y_atol = |i: usize| {
        let (row, col) = (i / n, i % n);
        let base = sum_abs(k, &|q| (x[row * k + q] * deq[col * k + q]).abs() as f64);
        let lora = sum_abs(r, &|j| ua[row * r + j] * b[col * r + j].abs() as f64) * scale as f64;
        bound(k, base + lora)
    };
    check(
        "linear::fwd y",
        &dev.download(&yd.view()).unwrap(),
        &y,
        y_atol,
        0.0,
    );
    let dx_atol = |i: usize| {
        let (row, col) = (i / k, i % k);
        let base = sum_abs(n, &|o| (dy[row * n + o] * deq[o * k + col]).abs() as f64);
        bound(n, base) * 2.0
    };
    check(
        "linear::bwd dx",
        &dev.download(&dxd.view()).unwrap(),
        &dx,
        dx_atol,
        1e-5,
    );
    // dA, dB: M-term sums of products of the saved activations; f32 atomics on the GPU.
    let (ga, gb) = grads.split_at(r * k);
    let mag = |v: &[f32]| v.iter().fold(0f32, |a, x| a.max(x.abs())) as f64;
    check(
        "linear::bwd dA",
        &dev.download(&dad.view()).unwrap(),
        ga,
        |_| bound(m * n, mag(ga) * m as f64),
        1e-5,
    );
    check(
        "linear::bwd dB",
        &dev.download(&dbd.view()).unwrap(),
        gb,
        |_| bound(m * k, mag(gb) * m as f64),
        1e-5,
    );
}

/// The f32 instantiations of `cuda/elementwise.cu` (the bf16 backend launches only the bf16
/// ones and the f32 ← bf16 cast): the bf16 → f32 cast, LoRA dropout forward and backward
/// against the CPU backend's mask (`cpu::dropout_scale`), and the bias add. Odd lengths reach
/// the grid-stride tails.
#[test]
#[ignore = "needs a CUDA device"]
fn elementwise_f32() {
    use half::bf16;
    use qlora_cuda::ops::elementwise;
    use qlora_train::cpu::dropout_scale;
    let dev = dev();
    let n = 10_007;
    // Cast bf16 → f32: exact.
    let xb: Vec<bf16> = values(n, 11, 3.0)
        .iter()
        .map(|&v| bf16::from_f32(v))
        .collect();
    let xbd = dev.upload(&xb, "x bf16").unwrap();
    let mut yd = dev.zeros::<f32>(n, "y").unwrap();
    elementwise::cast(&dev, &mut yd.view_mut(), &xbd.view(), None).unwrap();
    let want: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
    check(
        "cast bf16→f32",
        &dev.download(&yd.view()).unwrap(),
        &want,
        |_| 0.0,
        0.0,
    );

    // Dropout forward: x · m(i), one f32 product, the same on both sides: exact.
    let (seed, p) = (0x5EED_u64, 0.1);
    let x = values(n, 12, 2.0);
    let xd = dev.upload(&x, "x").unwrap();
    elementwise::dropout_fwd(&dev, &mut yd.view_mut(), &xd.view(), seed, p, None).unwrap();
    let m: Vec<f32> = (0..n).map(|i| dropout_scale::<f32>(seed, i, p)).collect();
    let want: Vec<f32> = x.iter().zip(&m).map(|(x, m)| x * m).collect();
    let got = dev.download(&yd.view()).unwrap();
    check("dropout_fwd f32", &got, &want, |_| 0.0, 0.0);
    let dropped = m.iter().filter(|&&m| m == 0.0).count();
    assert!(
        dropped > 0 && dropped < n / 5,
        "{dropped} of {n} dropped at p {p}"
    );

    // Dropout backward into y: y + t·m, which the GPU may contract into one fma: one rounding
    // of |t·m| more than the CPU's two-step sum at most.
    let (y0, t) = (values(n, 13, 1.0), values(n, 14, 1.0));
    let mut y0d = dev.upload(&y0, "y0").unwrap();
    let td = dev.upload(&t, "t").unwrap();
    elementwise::dropout_bwd_acc(&dev, &mut y0d.view_mut(), &td.view(), seed, p, None).unwrap();
    let want: Vec<f32> = (0..n).map(|i| y0[i] + t[i] * m[i]).collect();
    check(
        "dropout_bwd_acc f32",
        &dev.download(&y0d.view()).unwrap(),
        &want,
        |i| U * (t[i] * m[i]).abs() as f64,
        U,
    );

    // Bias over rows: one f32 add each: exact.
    let (rows, c) = (37, 129);
    let (y, b) = (values(rows * c, 15, 1.0), values(c, 16, 0.5));
    let mut ybd = dev.upload(&y, "y").unwrap();
    let bd = dev.upload(&b, "b").unwrap();
    elementwise::bias_fwd(&dev, &mut ybd.view_mut(), &bd.view(), rows, None).unwrap();
    let want: Vec<f32> = (0..rows * c).map(|i| y[i] + b[i % c]).collect();
    check(
        "bias_fwd f32",
        &dev.download(&ybd.view()).unwrap(),
        &want,
        |_| 0.0,
        0.0,
    );
}
