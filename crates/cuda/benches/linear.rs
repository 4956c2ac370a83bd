//! Benchmarks (harness = false; prints tables): the NF4 + LoRA linear on Llama-3-8B shapes —
//! fused kernel vs dequantize + cuBLASLt vs cuBLASLt on plain bf16 weights (the ceiling),
//! forward and backward; causal GQA attention fwd + bwd at T 2048, D 128; NF4 dequantize
//! bandwidth. Weights are random with real shapes (no model download on the GPU machine).
//!
//! Run: `cargo bench -p qlora-cuda --bench linear` (or the stripped binary from
//! scripts/gpu_suite.sh). `QLORA_BENCH_QUICK=1` runs one shape and M ∈ {16, 4096}.
//! TFLOP/s count the base GEMM only (2·M·N·K per direction); the rank-16 LoRA terms add
//! 4·M·R·(N+K) ≈ 1–2 % and are not counted.

use half::bf16;
use qlora_cuda::ops::{attention, linear, nf4};
use qlora_cuda::{blas::GemmShape, Device, Result, Stream, View, ViewMut};
use qlora_nf4::{Dtype, Nf4Tensor};

const SHAPES: [(usize, usize, &str); 4] = [
    (4096, 4096, "q/o 4096→4096"),
    (4096, 1024, "k/v 4096→1024"),
    (4096, 14336, "gate/up 4096→14336"),
    (14336, 4096, "down 14336→4096"),
];
const MS: [usize; 6] = [1, 16, 128, 1024, 4096, 8192];
const R: usize = 16;

/// Median of `iters` timed runs after `warm` untimed ones, in microseconds.
fn time_us(
    dev: &Device,
    warm: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warm {
        f()?;
    }
    let t = dev.timer()?;
    let mut v = Vec::with_capacity(iters);
    for _ in 0..iters {
        t.start(dev.stream())?;
        f()?;
        t.stop(dev.stream())?;
        v.push(t.elapsed_ms()? as f64 * 1000.0);
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(v[v.len() / 2])
}

fn rand_bf16(n: usize, seed: u64, scale: f32) -> Vec<bf16> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale)
        })
        .collect()
}

/// One weight of a benchmarked shape: NF4 on the device, its bf16 dequantization (the plain
/// cuBLASLt baseline), the dequantize path's scratch and random LoRA factors.
struct Weight {
    k: usize,
    n: usize,
    w: nf4::Nf4Weight,
    plain: qlora_cuda::Buf<bf16>,
    scratch: qlora_cuda::Buf<bf16>,
    a: qlora_cuda::Buf<bf16>,
    b: qlora_cuda::Buf<bf16>,
}

fn weight(dev: &Device, k: usize, n: usize) -> Result<Weight> {
    let w32: Vec<f32> = rand_bf16(n * k, 7, 0.05)
        .iter()
        .map(|v| v.to_f32())
        .collect();
    let wq = Nf4Tensor::quantize("w", &w32, &[n, k], 64, true, Dtype::BF16).map_err(|e| {
        qlora_cuda::CudaError::BadArg {
            op: "bench".into(),
            arg: "w".into(),
            msg: e.to_string(),
        }
    })?;
    drop(w32);
    let w = nf4::Nf4Weight::upload(dev, &wq, "w")?;
    let mut plain = dev.alloc::<bf16>(n * k, "plain w")?;
    nf4::dequant_fwd(dev, &mut plain.view_mut(), &w, None)?;
    Ok(Weight {
        k,
        n,
        w,
        plain,
        scratch: dev.alloc::<bf16>(n * k, "scratch")?,
        a: dev.upload(&rand_bf16(R * k, 3, 0.05), "a")?,
        b: dev.upload(&rand_bf16(n * R, 5, 0.05), "b")?,
    })
}

/// Median µs at M rows of: fused fwd, dequant+cuBLASLt fwd, plain bf16 cuBLASLt fwd, and the
/// same three backward.
fn time_linear(dev: &Device, wt: &mut Weight, m: usize) -> Result<[f64; 6]> {
    let (k, n) = (wt.k, wt.n);
    let Weight {
        w,
        plain,
        scratch,
        a,
        b,
        ..
    } = wt;
    let x = dev.upload(&rand_bf16(m * k, 11, 1.0), "x")?;
    let dy = dev.upload(&rand_bf16(m * n, 13, 1.0), "dy")?;
    let mut y = dev.alloc::<bf16>(m * n, "y")?;
    let mut us = dev.alloc::<bf16>(m * R, "us")?;
    let mut vs = dev.alloc::<bf16>(m * R, "vs")?;
    let mut dx = dev.alloc::<bf16>(m * k, "dx")?;
    let mut da = dev.zeros::<f32>(R * k, "da")?;
    let mut db = dev.zeros::<f32>(n * R, "db")?;
    let d = linear::LinearDims {
        m,
        k,
        n,
        r: R,
        scale: 2.0,
    };
    let flops = 2.0 * (m * n * k) as f64;
    let iters = if flops > 1e11 { 5 } else { 20 };
    // Fused and dequantize + cuBLASLt through the dispatcher with the path forced (a crossover
    // above every M picks fused, 0 picks dequantize): one call site per direction, both paths.
    let fused = linear::Dispatch {
        crossover_m: usize::MAX,
    };
    let deq = linear::Dispatch { crossover_m: 0 };
    let mut fwd_us = |disp: linear::Dispatch| {
        time_us(dev, 2, iters, || {
            disp.fwd(
                dev,
                &mut y.view_mut(),
                &mut us.view_mut(),
                Some(&mut scratch.view_mut()),
                &x.view(),
                &x.view(),
                w,
                &a.view(),
                &b.view(),
                d,
            )
            .map(|_| ())
        })
    };
    let (f_fwd, q_fwd) = (fwd_us(fused)?, fwd_us(deq)?);
    let p_fwd = time_us(dev, 2, iters, || {
        dev.with_blas(|bl| {
            bl.gemm(
                dev,
                &mut y.view_mut(),
                &x.view(),
                &plain.view(),
                GemmShape {
                    m,
                    n,
                    k,
                    a_trans: false,
                    b_trans: true,
                },
                1.0,
                0.0,
            )
        })
    })?;
    let mut bwd_us = |disp: linear::Dispatch| {
        time_us(dev, 2, iters, || {
            disp.bwd(
                dev,
                &mut dx.view_mut(),
                &mut da.view_mut(),
                &mut db.view_mut(),
                &mut vs.view_mut(),
                Some(&mut scratch.view_mut()),
                &dy.view(),
                &x.view(),
                &us.view(),
                w,
                &a.view(),
                &b.view(),
                d,
                false,
            )
            .map(|_| ())
        })
    };
    let (f_bwd, q_bwd) = (bwd_us(fused)?, bwd_us(deq)?);
    let p_bwd = time_us(dev, 2, iters, || {
        dev.with_blas(|bl| {
            bl.gemm(
                dev,
                &mut dx.view_mut(),
                &dy.view(),
                &plain.view(),
                GemmShape {
                    m,
                    n: k,
                    k: n,
                    a_trans: false,
                    b_trans: false,
                },
                1.0,
                0.0,
            )
        })
    })?;
    Ok([f_fwd, q_fwd, p_fwd, f_bwd, q_bwd, p_bwd])
}

fn bench_linear(dev: &Device, shapes: &[(usize, usize, &str)], ms: &[usize]) -> Result<()> {
    println!("\n## NF4+LoRA linear, r {R}, bf16 (µs, TFLOP/s of the base GEMM)");
    println!("| shape | M | dir | fused µs | fused TF/s | deq+Lt µs | deq+Lt TF/s | bf16 Lt µs | bf16 Lt TF/s | fused/bf16 | deq/fused |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for &(k, n, name) in shapes {
        let mut wt = weight(dev, k, n)?;
        for &m in ms {
            let [f_fwd, q_fwd, p_fwd, f_bwd, q_bwd, p_bwd] = time_linear(dev, &mut wt, m)?;
            let flops = 2.0 * (m * n * k) as f64;
            // Rows where the fused path runs a skinny kernel (ops::linear::skinny_*_applies).
            let d = linear::LinearDims {
                m,
                k,
                n,
                r: R,
                scale: 2.0,
            };
            let fwd = match linear::skinny_fwd_applies(true, &d, 64, 0) {
                true => "fwd (skinny)",
                false => "fwd",
            };
            let bwd = match linear::skinny_bwd_applies(true, &d, 64, 0) {
                true => "bwd (skinny)",
                false => "bwd",
            };
            for (dir, f, q, p) in [(fwd, f_fwd, q_fwd, p_fwd), (bwd, f_bwd, q_bwd, p_bwd)] {
                let tf = |us: f64| flops / us / 1e6;
                println!("| {name} | {m} | {dir} | {f:.1} | {:.1} | {q:.1} | {:.1} | {p:.1} | {:.1} | {:.2} | {:.2} |", tf(f), tf(q), tf(p), p / f, q / f);
            }
        }
    }
    Ok(())
}

/// The dispatcher's crossover, measured (`ops::linear::Dispatch`, `QLORA_LINEAR_CROSSOVER`):
/// per shape, the largest M at which the fused kernel's forward + backward is still faster
/// than dequantize + cuBLASLt, over a grid around bitsandbytes' 32–64.
fn bench_crossover(dev: &Device, shapes: &[(usize, usize, &str)]) -> Result<()> {
    const GRID: [usize; 10] = [8, 16, 24, 32, 48, 64, 96, 128, 192, 256];
    println!("\n## Fused vs dequantize + cuBLASLt crossover, fwd + bwd µs (r {R}, bf16)");
    println!("| shape | M: fused / deq+Lt … | fused faster up to M |");
    println!("|---|---|---|");
    let mut all = Vec::new();
    for &(k, n, name) in shapes {
        let mut wt = weight(dev, k, n)?;
        let mut cells = Vec::new();
        // The end of the grid's prefix on which fused wins (0: dequantize wins from M 8).
        let (mut crossover, mut fused_wins) = (0, true);
        for m in GRID {
            let t = time_linear(dev, &mut wt, m)?;
            let (fused, deq) = (t[0] + t[3], t[1] + t[4]);
            cells.push(format!("{m}: {fused:.0}/{deq:.0}"));
            fused_wins &= fused <= deq;
            if fused_wins {
                crossover = m;
            }
        }
        all.push(crossover);
        println!("| {name} | {} | {crossover} |", cells.join(", "));
    }
    let min = all.iter().copied().min().unwrap_or(0);
    println!(
        "dispatch: fused up to M {min} on every shape (Dispatch::default() uses {}; \
         QLORA_LINEAR_CROSSOVER={min} sets it)",
        linear::Dispatch::default().crossover_m
    );
    Ok(())
}

fn bench_attention(dev: &Device) -> Result<()> {
    println!("\n## Causal GQA attention, bf16 (B 1, H 32, Hkv 8, D 128)");
    println!("| kernels | T | fwd µs | fwd TF/s | bwd µs | bwd TF/s | fwd+bwd TF/s |");
    println!("|---|---|---|---|---|---|---|");
    for t in [512usize, 2048] {
        let a = attention::AttnDims {
            b: 1,
            t,
            h: 32,
            hkv: 8,
            d: 128,
        };
        let (nq, nk) = (t * 32 * 128, t * 8 * 128);
        let q = dev.upload(&rand_bf16(nq, 1, 1.0), "q")?;
        let k = dev.upload(&rand_bf16(nk, 2, 1.0), "k")?;
        let v = dev.upload(&rand_bf16(nk, 3, 1.0), "v")?;
        let dout = dev.upload(&rand_bf16(nq, 4, 1.0), "dout")?;
        let mut o = dev.alloc::<bf16>(nq, "o")?;
        let mut lse = dev.alloc::<f32>(32 * t, "lse")?;
        let (mut dq, mut dk, mut dv) = (
            dev.alloc::<bf16>(nq, "dq")?,
            dev.alloc::<bf16>(nk, "dk")?,
            dev.alloc::<bf16>(nk, "dv")?,
        );
        let mut delta = dev.alloc::<f32>(32 * t, "delta")?;
        type Fwd = fn(
            &Device,
            &mut ViewMut<'_, bf16>,
            &mut ViewMut<'_, f32>,
            &View<'_, bf16>,
            &View<'_, bf16>,
            &View<'_, bf16>,
            attention::AttnDims,
            Option<&Stream>,
        ) -> Result<()>;
        type Bwd = fn(
            &Device,
            &mut ViewMut<'_, bf16>,
            &mut ViewMut<'_, bf16>,
            &mut ViewMut<'_, bf16>,
            &mut ViewMut<'_, f32>,
            &View<'_, bf16>,
            &View<'_, bf16>,
            &View<'_, f32>,
            &View<'_, bf16>,
            &View<'_, bf16>,
            &View<'_, bf16>,
            attention::AttnDims,
            Option<&Stream>,
        ) -> Result<()>;
        let paths: [(&str, Fwd, Bwd); 2] = [
            ("mma", attention::fwd::<bf16>, attention::bwd::<bf16>),
            (
                "simt",
                attention::fwd_simt::<bf16>,
                attention::bwd_simt::<bf16>,
            ),
        ];
        for (name, fwd, bwd) in paths {
            let f = time_us(dev, 2, 10, || {
                fwd(
                    dev,
                    &mut o.view_mut(),
                    &mut lse.view_mut(),
                    &q.view(),
                    &k.view(),
                    &v.view(),
                    a,
                    None,
                )
            })?;
            let b = time_us(dev, 2, 10, || {
                bwd(
                    dev,
                    &mut dq.view_mut(),
                    &mut dk.view_mut(),
                    &mut dv.view_mut(),
                    &mut delta.view_mut(),
                    &dout.view(),
                    &o.view(),
                    &lse.view(),
                    &q.view(),
                    &k.view(),
                    &v.view(),
                    a,
                    None,
                )
            })?;
            // FLOP convention of the FlashAttention benchmarks: fwd 4·B·H·D·T²/2 causal, bwd 2.5× fwd.
            let ff = attention::fwd_flops(&a);
            println!(
                "| {name} | {t} | {f:.1} | {:.1} | {b:.1} | {:.1} | {:.1} |",
                ff / f / 1e6,
                2.5 * ff / b / 1e6,
                3.5 * ff / (f + b) / 1e6
            );
        }
    }
    Ok(())
}

fn bench_dequant(dev: &Device) -> Result<()> {
    println!("\n## NF4 dequantize → bf16 (double quant, QB 64)");
    println!("| weight | µs | GB/s moved |");
    println!("|---|---|---|");
    for (n, k) in [(14336usize, 4096usize), (4096, 4096)] {
        let w32: Vec<f32> = rand_bf16(n * k, 9, 0.05)
            .iter()
            .map(|v| v.to_f32())
            .collect();
        let wq = Nf4Tensor::quantize("w", &w32, &[n, k], 64, true, Dtype::BF16).map_err(|e| {
            qlora_cuda::CudaError::BadArg {
                op: "bench".into(),
                arg: "w".into(),
                msg: e.to_string(),
            }
        })?;
        let w = nf4::Nf4Weight::upload(dev, &wq, "w")?;
        let mut out = dev.alloc::<bf16>(n * k, "out")?;
        let t = time_us(dev, 3, 20, || {
            nf4::dequant_fwd(dev, &mut out.view_mut(), &w, None)
        })?;
        // Bytes: packed n/2 + codes n/64 + bf16 output 2n (nested scales negligible).
        let bytes = (n * k) as f64 * (0.5 + 1.0 / 64.0 + 2.0);
        println!("| {n}×{k} | {t:.1} | {:.0} |", bytes / t / 1e3);
    }
    Ok(())
}

fn main() {
    let dev = match Device::open(0) {
        Ok(d) => d,
        Err(e) => {
            println!("qlora-cuda bench: no GPU, nothing measured ({e})");
            return;
        }
    };
    println!(
        "# qlora-cuda benchmarks on {} ({}, {} SMs)",
        dev.name(),
        dev.arch(),
        dev.sm_count()
    );
    let quick = std::env::var("QLORA_BENCH_QUICK").is_ok_and(|v| v == "1");
    let (shapes, ms): (&[_], &[usize]) = if quick {
        (&SHAPES[..1], &[16, 4096])
    } else {
        (&SHAPES, &MS)
    };
    let run = || -> Result<()> {
        bench_dequant(&dev)?;
        bench_linear(&dev, shapes, ms)?;
        bench_crossover(&dev, shapes)?;
        bench_attention(&dev)
    };
    if let Err(e) = run() {
        eprintln!("bench failed: {e}");
        std::process::exit(1);
    }
}
