#![allow(clippy::needless_range_loop)] // index loops mirror the math of the references

//! GPU tests (lane C). Every test needs a CUDA device and is ignored ("needs a CUDA
//! device"); run them with `cargo test -p qlora-cuda --test gpu -- --ignored
//! --test-threads=1` (scripts/gpu_suite.sh).
//! Without a device they fail with the typed `NoGpu` reason: they never pass vacuously.
//!
//! Tolerances follow design §4: `|got − ref| ≤ atol + rtol·|ref|` per element, or a per-element
//! bound derived from the precision (written next to each case); each check prints the worst
//! element and the share of the budget it used. References are test-local f64 code computed
//! from exactly the operand values the kernel reads (bf16-rounded where the kernel reads bf16).

use half::bf16;
use qlora_cuda::ops::{
    attention, cross_entropy, embedding, linear, nf4, residual, rmsnorm, rope, swiglu,
};
use qlora_cuda::{Device, Elem};
use qlora_nf4::{Absmax, Dtype, Nf4Tensor, QuantState};
use safetensors::SafeTensors;
use std::path::PathBuf;

/// Unit roundoff of f32, 2^-24 (round to nearest: |fl(x) − x| ≤ 2^-24·|x|).
const U_F32: f64 = 1.0 / (1u64 << 24) as f64;
/// Twice the unit roundoff of bf16 (2^-9 with 8 significand bits): the budget of up to two
/// stores in bf16, e.g. the dequant + cuBLASLt path stores y and then adds the LoRA term
/// with beta = 1 (the fused kernel stores once and uses half of it).
const U_BF16: f64 = 1.0 / 256.0;

fn dev() -> Device {
    Device::open(0).unwrap_or_else(|e| panic!("needs a CUDA device: {e}"))
}

/// Deterministic xorshift64* normal-ish values (sum of 4 uniforms, centred, unit variance).
struct Rng(u64);
impl Rng {
    fn next_u(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545F4914F6CDD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let s: f64 = (0..4).map(|_| self.next_u()).sum::<f64>() - 2.0;
        (s * 3f64.sqrt()) as f32
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
}

/// Host values in T and back to f32 (the exact values the kernel reads).
trait Host: Elem {
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    /// Unit roundoff of one store in this dtype.
    const U: f64;
}
impl Host for f32 {
    fn from_f32(v: f32) -> f32 {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
    const U: f64 = U_F32;
}
impl Host for bf16 {
    fn from_f32(v: f32) -> bf16 {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    const U: f64 = U_BF16;
}
fn to_t<T: Host>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}
fn back<T: Host>(v: &[T]) -> Vec<f64> {
    v.iter().map(|&x| x.to_f32() as f64).collect()
}
fn rounded<T: Host>(v: &[f32]) -> Vec<f64> {
    back(&to_t::<T>(v))
}

/// Per-element check against `bound[i]`; prints the worst element and % of its budget.
fn check(name: &str, got: &[f64], want: &[f64], bound: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let mut worst = (0usize, 0f64, -1f64);
    for i in 0..got.len() {
        assert!(got[i].is_finite(), "{name}: element {i} is {}", got[i]);
        let err = (got[i] - want[i]).abs();
        let share = if bound[i] > 0.0 {
            err / bound[i]
        } else if err == 0.0 {
            0.0
        } else {
            f64::INFINITY
        };
        if share > worst.2 {
            worst = (i, err, share);
        }
    }
    let (i, err, share) = worst;
    eprintln!("{name}: worst element {i}: got {:.6e} want {:.6e} |err| {err:.3e} = {:.1}% of budget {:.3e}", got[i], want[i], 100.0 * share, bound[i]);
    assert!(
        share <= 1.0,
        "{name}: element {i} off by {err:.3e}, budget {:.3e}",
        bound[i]
    );
}
/// The `atol + rtol·|ref|` form.
fn check_tol(name: &str, got: &[f64], want: &[f64], atol: f64, rtol: f64) {
    let bound: Vec<f64> = want.iter().map(|w| atol + rtol * w.abs()).collect();
    check(name, got, want, &bound);
}

// ---------------------------------------------------------------- NF4 vs bitsandbytes vectors

/// The repo's bnb fixtures; `QLORA_REPO_ROOT` overrides the build-time path (the GPU machine
/// runs copied test binaries from another checkout path).
fn fixtures() -> PathBuf {
    let root = std::env::var_os("QLORA_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."));
    root.join("tests/fixtures/bnb")
}

struct Case {
    name: String,
    bf16_input: bool,
    shape: Vec<usize>,
    input: Vec<f32>,
    packed: Vec<u8>,
    absmax: Vec<f32>,
    dequant_bits: Vec<u32>,
    dq_codes: Vec<u8>,
    dq_nested: Vec<f32>,
    dq_offset: f32,
    dq_dequant_bits: Vec<u32>,
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
/// Float tensor as f32 bit patterns (bf16 widened exactly).
fn float_bits(t: &safetensors::tensor::TensorView<'_>) -> Vec<u32> {
    match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::BF16 => t
            .data()
            .chunks_exact(2)
            .map(|c| (u16::from_le_bytes([c[0], c[1]]) as u32) << 16)
            .collect(),
        d => panic!("unexpected dtype {d:?}"),
    }
}

fn cases() -> Vec<Case> {
    let idx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("index.json")).unwrap())
            .unwrap();
    idx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let file = c["file"].as_str().unwrap();
            let bytes = std::fs::read(fixtures().join(file)).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let g = |k: &str| st.tensor(k).unwrap_or_else(|_| panic!("{file}: {k}"));
            let input: Vec<f32> = float_bits(&g("input"))
                .into_iter()
                .map(f32::from_bits)
                .collect();
            Case {
                name: file.to_string(),
                bf16_input: c["dtype"].as_str() == Some("bf16"),
                shape: c["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as usize)
                    .collect(),
                input,
                packed: g("packed").data().to_vec(),
                absmax: f32s(g("absmax_f32").data()),
                dequant_bits: float_bits(&g("dequant")),
                dq_codes: g("dq.absmax_q").data().to_vec(),
                dq_nested: f32s(g("dq.nested_absmax").data()),
                dq_offset: f32s(g("dq.offset").data())[0],
                dq_dequant_bits: float_bits(&g("dq.dequant")),
            }
        })
        .collect()
}

fn tensor(c: &Case, double: bool) -> Nf4Tensor {
    let absmax = if double {
        Absmax::Double {
            codes: c.dq_codes.clone(),
            nested_absmax: c.dq_nested.clone(),
            offset: c.dq_offset,
        }
    } else {
        Absmax::F32(c.absmax.clone())
    };
    Nf4Tensor {
        packed: c.packed.clone(),
        state: QuantState {
            shape: c.shape.clone(),
            blocksize: 64,
            dtype: Dtype::F32,
            absmax,
        },
    }
}

fn dequant_bits<T: Host>(d: &Device, t: &Nf4Tensor) -> Vec<u32> {
    let w = nf4::Nf4Weight::upload(d, t, "w").unwrap();
    let mut out = d.alloc::<T>(w.numel(), "out").unwrap();
    nf4::dequant_fwd(d, &mut out.view_mut(), &w, None).unwrap();
    d.download(&out.view())
        .unwrap()
        .into_iter()
        .map(|v| v.to_f32().to_bits())
        .collect()
}

/// Bit-exact: the fixture's `dequant` (bitsandbytes, in the input dtype) for plain and double
/// quant, through the f32 kernel for f32 cases and the bf16 kernel for bf16 cases; and the f32
/// kernel against qlora_nf4's CPU dequantize_f32 for every case.
#[test]
#[ignore = "needs a CUDA device"]
fn parity_nf4_dequant_fwd() {
    let d = dev();
    for c in cases() {
        for double in [false, true] {
            let t = tensor(&c, double);
            let want = if double {
                &c.dq_dequant_bits
            } else {
                &c.dequant_bits
            };
            let got = if c.bf16_input {
                dequant_bits::<bf16>(&d, &t)
            } else {
                dequant_bits::<f32>(&d, &t)
            };
            let bad = got.iter().zip(want).filter(|(a, b)| a != b).count();
            assert_eq!(
                bad, 0,
                "{} double={double}: {bad} elements differ from bitsandbytes",
                c.name
            );
            let cpu: Vec<u32> = t.dequantize_f32().iter().map(|v| v.to_bits()).collect();
            assert_eq!(
                dequant_bits::<f32>(&d, &t),
                cpu,
                "{} double={double}: f32 kernel vs qlora_nf4",
                c.name
            );
            let cpu16: Vec<u32> = t
                .dequantize_bf16()
                .iter()
                .map(|v| (v.to_bits() as u32) << 16)
                .collect();
            assert_eq!(
                dequant_bits::<bf16>(&d, &t),
                cpu16,
                "{} double={double}: bf16 kernel vs qlora_nf4",
                c.name
            );
        }
        eprintln!("nf4 dequant {}: bit-exact (plain and double quant)", c.name);
    }
}

/// Quantize on the GPU: packed bytes and f32 absmax byte-exact with bitsandbytes; double-quant
/// codes/nested/offset exactly the CPU's (exact nearest) and within ±1 of bitsandbytes' codes.
#[test]
#[ignore = "needs a CUDA device"]
fn parity_nf4_quantize_fwd() {
    let d = dev();
    for c in cases() {
        let run = |double: bool| -> nf4::Nf4Weight {
            if c.bf16_input {
                let x = d.upload(&to_t::<bf16>(&c.input), "x").unwrap();
                nf4::quantize_fwd(&d, &x.view(), &c.shape, 64, double, &c.name).unwrap()
            } else {
                let x = d.upload(&c.input, "x").unwrap();
                nf4::quantize_fwd(&d, &x.view(), &c.shape, 64, double, &c.name).unwrap()
            }
        };
        let plain = nf4::download(&d, &run(false), Dtype::F32).unwrap();
        assert_eq!(plain.packed, c.packed, "{}: packed bytes", c.name);
        let Absmax::F32(a) = &plain.state.absmax else {
            panic!()
        };
        assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            c.absmax.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{}: absmax",
            c.name
        );
        let dq = nf4::download(&d, &run(true), Dtype::F32).unwrap();
        let cpu = Nf4Tensor::quantize(&c.name, &c.input, &c.shape, 64, true, Dtype::F32).unwrap();
        assert_eq!(dq.packed, cpu.packed);
        assert_eq!(
            dq.state.absmax, cpu.state.absmax,
            "{}: double quant vs qlora_nf4",
            c.name
        );
        let Absmax::Double { codes, .. } = &dq.state.absmax else {
            panic!()
        };
        let off = codes
            .iter()
            .zip(&c.dq_codes)
            .filter(|(a, b)| a != b)
            .count();
        assert!(
            codes
                .iter()
                .zip(&c.dq_codes)
                .all(|(a, b)| (*a as i32 - *b as i32).abs() <= 1),
            "{}: nested codes beyond ±1",
            c.name
        );
        eprintln!(
            "nf4 quantize {}: byte-exact; nested codes differing by 1 from bitsandbytes: {off}/{}",
            c.name,
            codes.len()
        );
    }
    // Non-finite input is a typed error naming the tensor.
    let x = d.upload(&[1.0f32, f32::NAN, 0.5, 0.25], "x").unwrap();
    let e = nf4::quantize_fwd(&d, &x.view(), &[4], 32, false, "bad.weight")
        .err()
        .expect("NaN must be refused");
    assert!(e.to_string().contains("bad.weight"), "{e}");
}

// ---------------------------------------------------------------- fused NF4 + LoRA linear

struct LinCase {
    m: usize,
    k: usize,
    n: usize,
    r: usize,
}

/// f64 reference of the LoRA projections us = S·x·Aᵀ and vs = S·dy·B from the exact operands.
fn lora_ref(x: &[f64], a: &[f64], b: &[f64], dy: &[f64], c: &LinCase, s: f64) -> [Vec<f64>; 2] {
    let (m, k, n, r) = (c.m, c.k, c.n, c.r);
    let mut us = vec![0.0; m * r];
    for i in 0..m {
        for j in 0..r {
            us[i * r + j] = s * (0..k).map(|q| x[i * k + q] * a[j * k + q]).sum::<f64>();
        }
    }
    let mut vs = vec![0.0; m * r];
    for i in 0..m {
        for j in 0..r {
            vs[i * r + j] = s * (0..n).map(|q| dy[i * n + q] * b[q * r + j]).sum::<f64>();
        }
    }
    [us, vs]
}

/// `acc_dx`: the backward adds into a `dx` that already holds values (`qlr_linear_bwd_acc_*`
/// and cuBLASLt with beta 1) instead of overwriting it.
fn run_linear<T: Host>(d: &Device, c: &LinCase, fused: bool, acc_dx: bool, seed: u64) {
    let mut rng = Rng(seed);
    let (m, k, n, r) = (c.m, c.k, c.n, c.r);
    let s = 2.0f32; // alpha/r = 32/16
    let w32 = rng.vec(n * k, 0.05);
    let wq = Nf4Tensor::quantize("w", &w32, &[n, k], 64, true, Dtype::BF16).unwrap();
    // The operand the kernel reads: the f32 product for f32, rounded once to bf16 for bf16.
    let wv: Vec<f64> = if T::U == U_F32 {
        wq.dequantize_f32().iter().map(|&v| v as f64).collect()
    } else {
        wq.dequantize_bf16()
            .iter()
            .map(|v| v.to_f32() as f64)
            .collect()
    };
    let (x32, a32, b32, dy32) = (
        rng.vec(m * k, 1.0),
        rng.vec(r * k, 0.05),
        rng.vec(n * r, 0.05),
        rng.vec(m * n, 1.0),
    );
    let (x, a, b, dy) = (
        rounded::<T>(&x32),
        rounded::<T>(&a32),
        rounded::<T>(&b32),
        rounded::<T>(&dy32),
    );
    let [us_ref, vs_ref] = lora_ref(&x, &a, &b, &dy, c, s as f64);
    let dx0_32 = if acc_dx {
        rng.vec(m * k, 1.0)
    } else {
        vec![0.0; m * k]
    };
    let dx0 = rounded::<T>(&dx0_32);

    let w = nf4::Nf4Weight::upload(d, &wq, "w").unwrap();
    let xd = d.upload(&to_t::<T>(&x32), "x").unwrap();
    let ad = d.upload(&to_t::<T>(&a32), "a").unwrap();
    let bd = d.upload(&to_t::<T>(&b32), "b").unwrap();
    let dyd = d.upload(&to_t::<T>(&dy32), "dy").unwrap();
    let mut y = d.alloc::<T>(m * n, "y").unwrap();
    let mut us = d.alloc::<T>(m * r, "us").unwrap();
    let mut vs = d.alloc::<T>(m * r, "vs").unwrap();
    let mut dx = if acc_dx {
        d.upload(&to_t::<T>(&dx0_32), "dx").unwrap()
    } else {
        d.alloc::<T>(m * k, "dx").unwrap()
    };
    let mut da = d.zeros::<f32>(r * k, "da").unwrap();
    let mut db = d.zeros::<f32>(n * r, "db").unwrap();
    let dims = linear::LinearDims {
        m,
        k,
        n,
        r,
        scale: s,
    };
    // Both paths through the dispatcher with the path forced (a crossover above every M picks
    // the fused kernels, 0 picks dequantize + cuBLASLt), checked against the path it reports.
    let (disp, want) = if fused {
        (usize::MAX, linear::LinearPath::Fused)
    } else {
        (0, linear::LinearPath::DequantBlas)
    };
    let disp = linear::Dispatch { crossover_m: disp };
    let mut scratch = d.alloc::<T>(n * k, "scratch").unwrap();
    let path = disp
        .fwd(
            d,
            &mut y.view_mut(),
            &mut us.view_mut(),
            Some(&mut scratch.view_mut()),
            &xd.view(),
            &xd.view(),
            &w,
            &ad.view(),
            &bd.view(),
            dims,
        )
        .unwrap();
    assert_eq!(path, want, "forward path");
    let path = disp
        .bwd(
            d,
            &mut dx.view_mut(),
            &mut da.view_mut(),
            &mut db.view_mut(),
            &mut vs.view_mut(),
            Some(&mut scratch.view_mut()),
            &dyd.view(),
            &xd.view(),
            &us.view(),
            &w,
            &ad.view(),
            &bd.view(),
            dims,
            acc_dx,
        )
        .unwrap();
    assert_eq!(path, want, "backward path");
    let tag = format!(
        "linear {}{} {} m{m} k{k} n{n} r{r}",
        if fused { "fused" } else { "dequant+blas" },
        if acc_dx { " acc_dx" } else { "" },
        T::SUFFIX
    );
    // us, vs: one f32 dot product then one rounding to T: |err| ≤ U_T·|ref| + 2·K·u32·S·Σ|x·a|
    // (K·u32 is the worst-case f32 summation bound; the factor 2 covers the scale multiply).
    let us_got = back(&d.download(&us.view()).unwrap());
    let us_abs: Vec<f64> = (0..m * r)
        .map(|i| {
            s as f64
                * (0..k)
                    .map(|q| (x[i / r * k + q] * a[i % r * k + q]).abs())
                    .sum::<f64>()
        })
        .collect();
    let bound: Vec<f64> = us_ref
        .iter()
        .zip(&us_abs)
        .map(|(v, sa)| T::U * v.abs() + 2.0 * k as f64 * U_F32 * sa)
        .collect();
    check(&format!("{tag} us"), &us_got, &us_ref, &bound);
    let vs_got = back(&d.download(&vs.view()).unwrap());
    let vs_abs: Vec<f64> = (0..m * r)
        .map(|i| {
            s as f64
                * (0..n)
                    .map(|q| (dy[i / r * n + q] * b[q * r + i % r]).abs())
                    .sum::<f64>()
        })
        .collect();
    let bound: Vec<f64> = vs_ref
        .iter()
        .zip(&vs_abs)
        .map(|(v, sa)| T::U * v.abs() + 2.0 * n as f64 * U_F32 * sa)
        .collect();
    check(&format!("{tag} vs"), &vs_got, &vs_ref, &bound);
    // The GPU's us/vs (rounded to T) are what the second GEMM term reads; the reference uses
    // them too, so the bound below only has to cover accumulation and the final store:
    // y_i = Σ_k x·w + Σ_r us·B:  |err| ≤ U_T·|y| + K'·u32·Σ|terms| with K' = K + R (worst case).
    let us_t = us_got.clone();
    let vs_t = vs_got.clone();
    // The dequantize + cuBLASLt path writes the base product to y (rounded to T) and then adds
    // the LoRA GEMM with beta = 1 (a second rounding, as PEFT's `base(x) + lora(x)`): its bound
    // has U_T·|base| more. The fused kernel adds the LoRA term before its single store.
    let twice = if fused { 0.0 } else { T::U };
    let mut y_ref = vec![0.0; m * n];
    let mut y_abs = vec![0.0; m * n];
    let mut y_base = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0;
            let mut aa = 0.0;
            for q in 0..k {
                acc += x[i * k + q] * wv[j * k + q];
                aa += (x[i * k + q] * wv[j * k + q]).abs();
            }
            y_base[i * n + j] = acc;
            for q in 0..r {
                acc += us_t[i * r + q] * b[j * r + q];
                aa += (us_t[i * r + q] * b[j * r + q]).abs();
            }
            y_ref[i * n + j] = acc;
            y_abs[i * n + j] = aa;
        }
    }
    let bound: Vec<f64> = (0..m * n)
        .map(|i| {
            T::U * y_ref[i].abs() + twice * y_base[i].abs() + (k + r) as f64 * U_F32 * y_abs[i]
        })
        .collect();
    check(
        &format!("{tag} y"),
        &back(&d.download(&y.view()).unwrap()),
        &y_ref,
        &bound,
    );
    // dx = dx0 + dy·W + vs·A (dx0 = 0 unless acc_dx), same bound with K' = N + R + 1.
    let mut dx_ref = vec![0.0; m * k];
    let mut dx_abs = vec![0.0; m * k];
    let mut dx_base = vec![0.0; m * k];
    for i in 0..m {
        for j in 0..k {
            let mut acc = dx0[i * k + j];
            let mut aa = dx0[i * k + j].abs();
            for q in 0..n {
                acc += dy[i * n + q] * wv[q * k + j];
                aa += (dy[i * n + q] * wv[q * k + j]).abs();
            }
            // dx = dy·W rounded, then + vs·A (beta = 1) on the dequantize path, as y above.
            dx_base[i * k + j] = acc;
            for q in 0..r {
                acc += vs_t[i * r + q] * a[q * k + j];
                aa += (vs_t[i * r + q] * a[q * k + j]).abs();
            }
            dx_ref[i * k + j] = acc;
            dx_abs[i * k + j] = aa;
        }
    }
    let bound: Vec<f64> = (0..m * k)
        .map(|i| {
            T::U * dx_ref[i].abs()
                + twice * dx_base[i].abs()
                + (n + r + 1) as f64 * U_F32 * dx_abs[i]
        })
        .collect();
    check(
        &format!("{tag} dx"),
        &back(&d.download(&dx.view()).unwrap()),
        &dx_ref,
        &bound,
    );
    // dA = vsᵀ·x, dB = dyᵀ·us in f32 (no output rounding to T): |err| ≤ M·u32·Σ|terms| + u32·|ref|.
    let mut da_ref = vec![0.0; r * k];
    let mut da_abs = vec![0.0; r * k];
    for j in 0..r {
        for q in 0..k {
            for i in 0..m {
                da_ref[j * k + q] += vs_t[i * r + j] * x[i * k + q];
                da_abs[j * k + q] += (vs_t[i * r + j] * x[i * k + q]).abs();
            }
        }
    }
    let bound: Vec<f64> = da_ref
        .iter()
        .zip(&da_abs)
        .map(|(v, sa)| U_F32 * v.abs() + m as f64 * U_F32 * sa)
        .collect();
    check(
        &format!("{tag} d_lora_a"),
        &back(&d.download(&da.view()).unwrap()),
        &da_ref,
        &bound,
    );
    let mut db_ref = vec![0.0; n * r];
    let mut db_abs = vec![0.0; n * r];
    for q in 0..n {
        for j in 0..r {
            for i in 0..m {
                db_ref[q * r + j] += dy[i * n + q] * us_t[i * r + j];
                db_abs[q * r + j] += (dy[i * n + q] * us_t[i * r + j]).abs();
            }
        }
    }
    let bound: Vec<f64> = db_ref
        .iter()
        .zip(&db_abs)
        .map(|(v, sa)| U_F32 * v.abs() + m as f64 * U_F32 * sa)
        .collect();
    check(
        &format!("{tag} d_lora_b"),
        &back(&d.download(&db.view()).unwrap()),
        &db_ref,
        &bound,
    );
    // The frozen base is untouched: its packed bytes and scales read back identical.
    let after = nf4::download(d, &w, Dtype::BF16).unwrap();
    assert_eq!(after.packed, wq.packed, "{tag}: NF4 bytes changed");
    assert_eq!(
        after.state.absmax, wq.state.absmax,
        "{tag}: NF4 scales changed"
    );
}

/// Together these reach every tile-loader path of `cuda/linear.cu` in both directions:
/// the pipelined fast path (fwd k-contiguous: case 2; bwd column-contiguous: case 3),
/// the plain 16-code paths (cases 1 and 2 where K or N is not a multiple of 32) and the
/// scalar fallback (case 4: K % 16 != 0). In bf16, case 3 (M 1) runs the skinny kernels in
/// both directions, so its tiled bf16 backward fast path is covered by SKINNY_CASES[1] (M 33);
/// cases 1 and 4 (K % 128 != 0, M > 16) keep the tiled kernels at few rows.
const LIN_CASES: [LinCase; 4] = [
    // Tails everywhere: M, N and K not multiples of the tiles (K a multiple of 16 only).
    LinCase {
        m: 37,
        k: 208,
        n: 80,
        r: 16,
    },
    // More than one tile in each direction, rank 8.
    LinCase {
        m: 130,
        k: 256,
        n: 136,
        r: 8,
    },
    // A single row (decode-like).
    LinCase {
        m: 1,
        k: 512,
        n: 64,
        r: 16,
    },
    // K not a multiple of 16, odd rank.
    LinCase {
        m: 20,
        k: 72,
        n: 48,
        r: 5,
    },
];

#[test]
#[ignore = "needs a CUDA device"]
fn parity_linear_fused_f32() {
    let d = dev();
    for (i, c) in LIN_CASES.iter().enumerate() {
        run_linear::<f32>(&d, c, true, false, 11 + i as u64);
    }
    // Accumulating into dx: a tiled case and a scalar-fallback case.
    for i in [1, 3] {
        run_linear::<f32>(&d, &LIN_CASES[i], true, true, 11 + 50 + i as u64);
    }
}
#[test]
#[ignore = "needs a CUDA device"]
fn parity_linear_fused_bf16() {
    let d = dev();
    for (i, c) in LIN_CASES.iter().enumerate() {
        run_linear::<bf16>(&d, c, true, false, 21 + i as u64);
    }
    // Accumulating into dx: a tiled case and a scalar-fallback case.
    for i in [1, 3] {
        run_linear::<bf16>(&d, &LIN_CASES[i], true, true, 21 + 50 + i as u64);
    }
}
/// The skinny bf16 kernels: forward (`qlr_linear_fwd_skinny_bf16`: M ≤ 64, K % 128 == 0) in
/// each of its m-tile counts (1, 2 and 4; M 33 pads 3 tiles to 4), and backward
/// (`qlr_linear_bwd(_acc)_skinny_bf16`: M ≤ 16, K % 8 == 0, N even). Between them: N not a
/// multiple of the forward's 32-column blocks or of 8, K not a multiple of the backward's
/// 64-column blocks, more 128-wide K chunks than forward warps (K 1280), fewer 16-row N chunks
/// than backward warps (N 40, 64) and more than its 16 warps × 4 in flight (N 1100, with a
/// ragged last chunk), ranks 16, 8 and 5 (the LoRA term pads R to 16). The other direction of
/// each case runs the tiled kernel.
const SKINNY_CASES: [LinCase; 6] = [
    LinCase {
        m: 16,
        k: 384,
        n: 40,
        r: 16,
    },
    LinCase {
        m: 33,
        k: 256,
        n: 96,
        r: 8,
    },
    LinCase {
        m: 64,
        k: 128,
        n: 36,
        r: 5,
    },
    LinCase {
        m: 7,
        k: 1280,
        n: 64,
        r: 16,
    },
    LinCase {
        m: 5,
        k: 72,
        n: 38,
        r: 5,
    },
    LinCase {
        m: 3,
        k: 64,
        n: 1100,
        r: 8,
    },
];
#[test]
#[ignore = "needs a CUDA device"]
fn parity_linear_fused_skinny_bf16() {
    let d = dev();
    let (mut fwd, mut bwd) = (0, 0);
    for (i, c) in SKINNY_CASES.iter().enumerate() {
        let dims = linear::LinearDims {
            m: c.m,
            k: c.k,
            n: c.n,
            r: c.r,
            scale: 2.0,
        };
        fwd += linear::skinny_fwd_applies(true, &dims, 64, 0) as usize;
        bwd += linear::skinny_bwd_applies(true, &dims, 64, 0) as usize;
        run_linear::<bf16>(&d, c, true, false, 71 + i as u64);
    }
    assert_eq!((fwd, bwd), (4, 4), "cases per skinny kernel");
    // Accumulating into dx through the skinny backward.
    for i in [0, 5] {
        run_linear::<bf16>(&d, &SKINNY_CASES[i], true, true, 71 + 50 + i as u64);
    }
}
#[test]
#[ignore = "needs a CUDA device"]
fn parity_linear_dequant_blas_f32() {
    let d = dev();
    for (i, c) in LIN_CASES.iter().enumerate() {
        run_linear::<f32>(&d, c, false, false, 31 + i as u64);
    }
    // Accumulating into dx: a tiled case and a scalar-fallback case.
    for i in [1, 3] {
        run_linear::<f32>(&d, &LIN_CASES[i], false, true, 31 + 50 + i as u64);
    }
}
#[test]
#[ignore = "needs a CUDA device"]
fn parity_linear_dequant_blas_bf16() {
    let d = dev();
    for (i, c) in LIN_CASES.iter().enumerate() {
        run_linear::<bf16>(&d, c, false, false, 41 + i as u64);
    }
    // Accumulating into dx: a tiled case and a scalar-fallback case.
    for i in [1, 3] {
        run_linear::<bf16>(&d, &LIN_CASES[i], false, true, 41 + 50 + i as u64);
    }
}

// ---------------------------------------------------------------- elementwise and row ops

fn rmsnorm_case<T: Host>(d: &Device) {
    let (rows, c, eps) = (33usize, 320usize, 1e-5f32);
    let mut rng = Rng(5);
    let (x32, g32, dy32) = (
        rng.vec(rows * c, 1.0),
        rng.vec(c, 1.0),
        rng.vec(rows * c, 1.0),
    );
    let (x, g, dy) = (rounded::<T>(&x32), rounded::<T>(&g32), rounded::<T>(&dy32));
    let (xd, gd, dyd) = (
        d.upload(&to_t::<T>(&x32), "x").unwrap(),
        d.upload(&to_t::<T>(&g32), "g").unwrap(),
        d.upload(&to_t::<T>(&dy32), "dy").unwrap(),
    );
    let mut y = d.alloc::<T>(rows * c, "y").unwrap();
    let mut rstd = d.alloc::<f32>(rows, "rstd").unwrap();
    let mut dx = d.alloc::<T>(rows * c, "dx").unwrap();
    rmsnorm::fwd(
        d,
        &mut y.view_mut(),
        &mut rstd.view_mut(),
        &xd.view(),
        &gd.view(),
        rows,
        c,
        eps,
        None,
    )
    .unwrap();
    rmsnorm::bwd(
        d,
        &mut dx.view_mut(),
        &dyd.view(),
        &xd.view(),
        &rstd.view(),
        &gd.view(),
        rows,
        c,
        None,
    )
    .unwrap();
    let (mut y_ref, mut dx_ref, mut rs_ref) =
        (vec![0.0; rows * c], vec![0.0; rows * c], vec![0.0; rows]);
    for i in 0..rows {
        let xr = &x[i * c..(i + 1) * c];
        let rs = 1.0 / (xr.iter().map(|v| v * v).sum::<f64>() / c as f64 + eps as f64).sqrt();
        rs_ref[i] = rs;
        let mean: f64 = (0..c)
            .map(|j| dy[i * c + j] * g[j] * xr[j] * rs)
            .sum::<f64>()
            / c as f64;
        for j in 0..c {
            y_ref[i * c + j] = xr[j] * rs * g[j];
            dx_ref[i * c + j] = rs * (dy[i * c + j] * g[j] - xr[j] * rs * mean);
        }
    }
    // f32 math over C = 320 terms then one store in T: rtol = U_T + C·u32 (summation, worst
    // case), atol = C·u32 for the cancellation in dx's bracket (terms are O(1)).
    let (atol, rtol) = (c as f64 * U_F32 * 4.0, T::U + c as f64 * U_F32);
    check_tol(
        &format!("rmsnorm rstd {}", T::SUFFIX),
        &back(&d.download(&rstd.view()).unwrap()),
        &rs_ref,
        0.0,
        c as f64 * U_F32,
    );
    check_tol(
        &format!("rmsnorm fwd {}", T::SUFFIX),
        &back(&d.download(&y.view()).unwrap()),
        &y_ref,
        atol,
        rtol,
    );
    check_tol(
        &format!("rmsnorm bwd {}", T::SUFFIX),
        &back(&d.download(&dx.view()).unwrap()),
        &dx_ref,
        atol,
        rtol,
    );
}
#[test]
#[ignore = "needs a CUDA device"]
fn parity_rmsnorm_f32() {
    rmsnorm_case::<f32>(&dev());
}
#[test]
#[ignore = "needs a CUDA device"]
fn parity_rmsnorm_bf16() {
    rmsnorm_case::<bf16>(&dev());
}

fn rope_case<T: Host>(d: &Device) {
    let (rows, heads, dd) = (40usize, 3usize, 16usize);
    let mut rng = Rng(7);
    let x32 = rng.vec(rows * heads * dd, 1.0);
    let x = rounded::<T>(&x32);
    let pos: Vec<i32> = (0..rows as i32).map(|p| p * 37 % 2048).collect();
    let f = rope::inv_freq(
        500000.0,
        dd,
        Some(rope::Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }),
    );
    let (xd, pd, fd) = (
        d.upload(&to_t::<T>(&x32), "x").unwrap(),
        d.upload(&pos, "pos").unwrap(),
        d.upload(&f, "f").unwrap(),
    );
    let mut y = d.alloc::<T>(x.len(), "y").unwrap();
    let mut back_ = d.alloc::<T>(x.len(), "dx").unwrap();
    rope::fwd(
        d,
        &mut y.view_mut(),
        &xd.view(),
        &pd.view(),
        &fd.view(),
        rows,
        heads,
        dd,
        None,
    )
    .unwrap();
    rope::bwd(
        d,
        &mut back_.view_mut(),
        &xd.view(),
        &pd.view(),
        &fd.view(),
        rows,
        heads,
        dd,
        None,
    )
    .unwrap();
    let (mut y_ref, mut b_ref) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    for rw in 0..rows {
        for h in 0..heads {
            let base = (rw * heads + h) * dd;
            for i in 0..dd / 2 {
                // The kernel's angle is the f32 product pos·inv_freq (as transformers); sin/cos in f64.
                let th = (pos[rw] as f32 * f[i]) as f64;
                let (s, c) = th.sin_cos();
                let (a, b) = (x[base + i], x[base + i + dd / 2]);
                y_ref[base + i] = a * c - b * s;
                y_ref[base + i + dd / 2] = b * c + a * s;
                b_ref[base + i] = a * c + b * s;
                b_ref[base + i + dd / 2] = b * c - a * s;
            }
        }
    }
    // Two products and a sum of O(1) values, precise sincosf (≤ 2 ulp), one store in T.
    let (atol, rtol) = (8.0 * U_F32, T::U + 4.0 * U_F32);
    check_tol(
        &format!("rope fwd {}", T::SUFFIX),
        &back(&d.download(&y.view()).unwrap()),
        &y_ref,
        atol,
        rtol,
    );
    check_tol(
        &format!("rope bwd {}", T::SUFFIX),
        &back(&d.download(&back_.view()).unwrap()),
        &b_ref,
        atol,
        rtol,
    );
}
#[test]
#[ignore = "needs a CUDA device"]
fn parity_rope_f32() {
    rope_case::<f32>(&dev());
}
#[test]
#[ignore = "needs a CUDA device"]
fn parity_rope_bf16() {
    rope_case::<bf16>(&dev());
}

fn swiglu_residual_case<T: Host>(d: &Device) {
    let n = 5000usize;
    let mut rng = Rng(9);
    let (e32, g32, dh32) = (rng.vec(n, 2.0), rng.vec(n, 1.0), rng.vec(n, 1.0));
    let (e, g, dh) = (rounded::<T>(&e32), rounded::<T>(&g32), rounded::<T>(&dh32));
    let (ed, gd, dhd) = (
        d.upload(&to_t::<T>(&e32), "e").unwrap(),
        d.upload(&to_t::<T>(&g32), "g").unwrap(),
        d.upload(&to_t::<T>(&dh32), "dh").unwrap(),
    );
    let mut h = d.alloc::<T>(n, "h").unwrap();
    let mut de = d.alloc::<T>(n, "de").unwrap();
    let mut dg = d.alloc::<T>(n, "dg").unwrap();
    swiglu::fwd(d, &mut h.view_mut(), &ed.view(), &gd.view(), None).unwrap();
    swiglu::bwd(
        d,
        &mut de.view_mut(),
        &mut dg.view_mut(),
        &dhd.view(),
        &ed.view(),
        &gd.view(),
        None,
    )
    .unwrap();
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let h_ref: Vec<f64> = (0..n).map(|i| e[i] * sig(e[i]) * g[i]).collect();
    let de_ref: Vec<f64> = (0..n)
        .map(|i| dh[i] * g[i] * sig(e[i]) * (1.0 + e[i] * (1.0 - sig(e[i]))))
        .collect();
    let dg_ref: Vec<f64> = (0..n).map(|i| dh[i] * e[i] * sig(e[i])).collect();
    // expf ≤ 2 ulp, a division and ≤ 5 products: 16·u32 relative, plus the store in T.
    let (atol, rtol) = (1e-30, T::U + 16.0 * U_F32);
    check_tol(
        &format!("swiglu fwd {}", T::SUFFIX),
        &back(&d.download(&h.view()).unwrap()),
        &h_ref,
        atol,
        rtol,
    );
    check_tol(
        &format!("swiglu bwd de {}", T::SUFFIX),
        &back(&d.download(&de.view()).unwrap()),
        &de_ref,
        16.0 * U_F32,
        rtol,
    );
    check_tol(
        &format!("swiglu bwd dg {}", T::SUFFIX),
        &back(&d.download(&dg.view()).unwrap()),
        &dg_ref,
        atol,
        rtol,
    );
    // residual: y = e + g (one f32 add, exact for bf16 inputs, then one store): rtol = U_T.
    let mut y = d.alloc::<T>(n, "y").unwrap();
    residual::fwd(d, &mut y.view_mut(), &ed.view(), &gd.view(), None).unwrap();
    let y_ref: Vec<f64> = (0..n).map(|i| e[i] + g[i]).collect();
    check_tol(
        &format!("residual fwd {}", T::SUFFIX),
        &back(&d.download(&y.view()).unwrap()),
        &y_ref,
        0.0,
        T::U,
    );
    residual::bwd_acc(d, &mut y.view_mut(), &dhd.view(), None).unwrap();
    let got = back(&d.download(&y.view()).unwrap());
    let y_t = rounded::<T>(&y_ref.iter().map(|&v| v as f32).collect::<Vec<_>>());
    let acc_ref: Vec<f64> = (0..n).map(|i| y_t[i] + dh[i]).collect();
    check_tol(
        &format!("residual bwd_acc {}", T::SUFFIX),
        &got,
        &acc_ref,
        0.0,
        T::U,
    );
}
#[test]
#[ignore = "needs a CUDA device"]
fn parity_swiglu_residual_f32() {
    swiglu_residual_case::<f32>(&dev());
}
#[test]
#[ignore = "needs a CUDA device"]
fn parity_swiglu_residual_bf16() {
    swiglu_residual_case::<bf16>(&dev());
}

fn embedding_case<T: Host>(d: &Device) {
    let (v, c) = (50usize, 40usize);
    let mut rng = Rng(3);
    let t32 = rng.vec(v * c, 1.0);
    let ids: Vec<i32> = vec![3, 7, 3, 49, 0, 3];
    let (td, idd) = (
        d.upload(&to_t::<T>(&t32), "table").unwrap(),
        d.upload(&ids, "ids").unwrap(),
    );
    let mut out = d.alloc::<T>(ids.len() * c, "out").unwrap();
    embedding::fwd(d, &mut out.view_mut(), &idd.view(), &td.view(), v, c, None).unwrap();
    let t = rounded::<T>(&t32);
    let want: Vec<f64> = ids
        .iter()
        .flat_map(|&i| t[i as usize * c..(i as usize + 1) * c].to_vec())
        .collect();
    check_tol(
        &format!("embedding fwd {}", T::SUFFIX),
        &back(&d.download(&out.view()).unwrap()),
        &want,
        0.0,
        0.0,
    );
    let dout32 = rng.vec(ids.len() * c, 1.0);
    let dout = rounded::<T>(&dout32);
    let dod = d.upload(&to_t::<T>(&dout32), "dout").unwrap();
    let mut dt = d.zeros::<f32>(v * c, "dt").unwrap();
    embedding::bwd_acc(d, &mut dt.view_mut(), &idd.view(), &dod.view(), v, c, None).unwrap();
    let mut dt_ref = vec![0.0; v * c];
    let mut dt_abs = vec![0.0; v * c];
    for (r, &i) in ids.iter().enumerate() {
        for j in 0..c {
            dt_ref[i as usize * c + j] += dout[r * c + j];
            dt_abs[i as usize * c + j] += dout[r * c + j].abs();
        }
    }
    // Token 3 repeats 3 times: 3 f32 atomic additions in any order, |err| ≤ 2·u32·Σ|terms|
    // (relative to Σ|terms|, not to |sum|: the terms have both signs; the CPU emulator found a
    // cancelling element at 107 % of a budget relative to |sum|).
    let bound: Vec<f64> = dt_abs.iter().map(|a| 2.0 * U_F32 * a).collect();
    check(
        &format!("embedding bwd_acc {}", T::SUFFIX),
        &back(&d.download(&dt.view()).unwrap()),
        &dt_ref,
        &bound,
    );
    let bad = d.upload(&[1i32, 50], "ids").unwrap();
    let mut out2 = d.alloc::<T>(2 * c, "out").unwrap();
    assert!(
        embedding::fwd(d, &mut out2.view_mut(), &bad.view(), &td.view(), v, c, None).is_err(),
        "id 50 of a 50-token vocabulary must be refused"
    );
}
#[test]
#[ignore = "needs a CUDA device"]
fn parity_embedding_f32() {
    embedding_case::<f32>(&dev());
}
#[test]
#[ignore = "needs a CUDA device"]
fn parity_embedding_bf16() {
    embedding_case::<bf16>(&dev());
}

fn cross_entropy_case<T: Host>(d: &Device) {
    let (rows, c, v, chunk) = (21usize, 64usize, 300usize, 8usize);
    let mut rng = Rng(13);
    let (h32, w32) = (rng.vec(rows * c, 1.0), rng.vec(v * c, 0.2));
    let labels: Vec<i32> = (0..rows as i32)
        .map(|i| {
            if i % 5 == 4 {
                -100
            } else {
                (i * 31) % v as i32
            }
        })
        .collect();
    let n_valid = labels.iter().filter(|&&l| l >= 0).count();
    let scale = 1.0 / n_valid as f32;
    let (hd, wd, ld) = (
        d.upload(&to_t::<T>(&h32), "h").unwrap(),
        d.upload(&to_t::<T>(&w32), "w").unwrap(),
        d.upload(&labels, "labels").unwrap(),
    );
    let mut loss = d.alloc::<f32>(rows, "loss").unwrap();
    let mut dh = d.alloc::<T>(rows * c, "dh").unwrap();
    let mut logits = d.alloc::<T>(chunk * v, "logits").unwrap();
    let mut lse = d.alloc::<f32>(chunk, "lse").unwrap();
    cross_entropy::fused(
        d,
        &mut loss.view_mut(),
        &mut dh.view_mut(),
        &mut logits.view_mut(),
        &mut lse.view_mut(),
        &hd.view(),
        &ld.view(),
        &wd.view(),
        rows,
        c,
        v,
        scale,
    )
    .unwrap();
    let (h, w) = (rounded::<T>(&h32), rounded::<T>(&w32));
    let mut loss_ref = vec![0.0; rows];
    let mut dh_ref = vec![0.0; rows * c];
    for i in 0..rows {
        // The kernel reads logits stored in T: round the f64 logits the same way.
        let z: Vec<f64> = (0..v)
            .map(|j| (0..c).map(|q| h[i * c + q] * w[j * c + q]).sum::<f64>())
            .collect();
        let z = rounded::<T>(&z.iter().map(|&x| x as f32).collect::<Vec<_>>());
        let m = z.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        if labels[i] >= 0 {
            loss_ref[i] = lse - z[labels[i] as usize];
            for j in 0..v {
                let g = scale as f64
                    * ((z[j] - lse).exp() - if j == labels[i] as usize { 1.0 } else { 0.0 });
                for q in 0..c {
                    dh_ref[i * c + q] += g * w[j * c + q];
                }
            }
        }
    }
    // loss: lse over V terms in f32 (V·u32 relative on logits of magnitude ≤ zmax), plus the
    // logits themselves: the GEMM's f32 accumulation (C·u32·Σ|h·w|) can move a logit across a
    // rounding boundary of T that the f64 reference rounds the other way (≤ 2·U_T·zmax).
    let zmax = (0..rows)
        .flat_map(|i| (0..v).map(move |j| (i, j)))
        .map(|(i, j)| {
            (0..c)
                .map(|q| (h[i * c + q] * w[j * c + q]).abs())
                .sum::<f64>()
        })
        .fold(0.0, f64::max);
    let loss_atol = v as f64 * U_F32 * zmax + 2.0 * T::U * zmax + c as f64 * U_F32 * zmax;
    check_tol(
        &format!("cross_entropy loss {}", T::SUFFIX),
        &back(&d.download(&loss.view()).unwrap()),
        &loss_ref,
        loss_atol,
        0.0,
    );
    // dh: the gradient logits are stored in T (U_T relative each) and summed over V in f32:
    // |err| ≤ (U_T + V·u32)·Σ_j |g_j·w_j| ≤ (U_T + V·u32)·scale·2·max|w|·… — bounded here by
    // atol = (U_T + V·u32)·scale·Σ_j|w_jq|·2 (|softmax − onehot| ≤ 1 summed ≤ 2) and rtol U_T.
    let wmax_col: Vec<f64> = (0..c)
        .map(|q| (0..v).map(|j| w[j * c + q].abs()).fold(0.0, f64::max))
        .collect();
    let got = back(&d.download(&dh.view()).unwrap());
    let bound: Vec<f64> = (0..rows * c)
        .map(|i| {
            T::U * dh_ref[i].abs()
                + (T::U + v as f64 * U_F32) * scale as f64 * 2.0 * wmax_col[i % c]
        })
        .collect();
    check(
        &format!("cross_entropy dh {}", T::SUFFIX),
        &got,
        &dh_ref,
        &bound,
    );
}
#[test]
#[ignore = "needs a CUDA device"]
fn parity_cross_entropy_f32() {
    cross_entropy_case::<f32>(&dev());
}
#[test]
#[ignore = "needs a CUDA device"]
fn parity_cross_entropy_bf16() {
    cross_entropy_case::<bf16>(&dev());
}

fn attention_case<T: Host>(d: &Device, a: attention::AttnDims, simt: bool) {
    let mut rng = Rng(17);
    let (nq, nk) = (a.b * a.t * a.h * a.d, a.b * a.t * a.hkv * a.d);
    let (q32, k32, v32, do32) = (
        rng.vec(nq, 1.0),
        rng.vec(nk, 1.0),
        rng.vec(nk, 1.0),
        rng.vec(nq, 1.0),
    );
    let (q, k, v, dout) = (
        rounded::<T>(&q32),
        rounded::<T>(&k32),
        rounded::<T>(&v32),
        rounded::<T>(&do32),
    );
    let up = |x: &[f32], n: &str| d.upload(&to_t::<T>(x), n).unwrap();
    let (qd, kd, vd, dod) = (
        up(&q32, "q"),
        up(&k32, "k"),
        up(&v32, "v"),
        up(&do32, "dout"),
    );
    let mut o = d.alloc::<T>(nq, "o").unwrap();
    let mut lse = d.alloc::<f32>(a.b * a.h * a.t, "lse").unwrap();
    let run = if simt {
        attention::fwd_simt::<T>
    } else {
        attention::fwd::<T>
    };
    run(
        d,
        &mut o.view_mut(),
        &mut lse.view_mut(),
        &qd.view(),
        &kd.view(),
        &vd.view(),
        a,
        None,
    )
    .unwrap();
    let (mut dq, mut dk, mut dv) = (
        d.alloc::<T>(nq, "dq").unwrap(),
        d.alloc::<T>(nk, "dk").unwrap(),
        d.alloc::<T>(nk, "dv").unwrap(),
    );
    let mut delta = d.alloc::<f32>(a.b * a.h * a.t, "delta").unwrap();
    let o_view = o.view();
    let run_bwd = if simt {
        attention::bwd_simt::<T>
    } else {
        attention::bwd::<T>
    };
    run_bwd(
        d,
        &mut dq.view_mut(),
        &mut dk.view_mut(),
        &mut dv.view_mut(),
        &mut delta.view_mut(),
        &dod.view(),
        &o_view,
        &lse.view(),
        &qd.view(),
        &kd.view(),
        &vd.view(),
        a,
        None,
    )
    .unwrap();
    // f64 reference (the bwd reference uses the f64 o, not the kernel's rounded o).
    let sc = 1.0 / (a.d as f64).sqrt();
    let g = a.h / a.hkv;
    let qi = |b: usize, t: usize, h: usize| ((b * a.t + t) * a.h + h) * a.d;
    let ki = |b: usize, t: usize, h: usize| ((b * a.t + t) * a.hkv + h) * a.d;
    let (mut o_ref, mut lse_ref) = (vec![0.0; nq], vec![0.0; a.b * a.h * a.t]);
    let (mut dq_ref, mut dk_ref, mut dv_ref) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
    for b in 0..a.b {
        for h in 0..a.h {
            let hk = h / g;
            for i in 0..a.t {
                let s: Vec<f64> = (0..=i)
                    .map(|j| {
                        sc * (0..a.d)
                            .map(|e| q[qi(b, i, h) + e] * k[ki(b, j, hk) + e])
                            .sum::<f64>()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let l: f64 = s.iter().map(|x| (x - m).exp()).sum();
                let p: Vec<f64> = s.iter().map(|x| (x - m).exp() / l).collect();
                lse_ref[(b * a.h + h) * a.t + i] = m + l.ln();
                for e in 0..a.d {
                    o_ref[qi(b, i, h) + e] = (0..=i).map(|j| p[j] * v[ki(b, j, hk) + e]).sum();
                }
                let dp: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..a.d)
                            .map(|e| dout[qi(b, i, h) + e] * v[ki(b, j, hk) + e])
                            .sum()
                    })
                    .collect();
                let delta_i: f64 = (0..a.d)
                    .map(|e| dout[qi(b, i, h) + e] * o_ref[qi(b, i, h) + e])
                    .sum();
                for j in 0..=i {
                    let ds = p[j] * (dp[j] - delta_i);
                    for e in 0..a.d {
                        dq_ref[qi(b, i, h) + e] += sc * ds * k[ki(b, j, hk) + e];
                        dk_ref[ki(b, j, hk) + e] += sc * ds * q[qi(b, i, h) + e];
                        dv_ref[ki(b, j, hk) + e] += p[j] * dout[qi(b, i, h) + e];
                    }
                }
            }
        }
    }
    // (The tensor-core backward also rounds P and dS to bf16 as mma operands: ≤ 2^-9 of
    // Σ_j|ds_j·k_j| etc., inside the bwd atol below for these O(1) inputs.)
    // f32 online softmax over ≤ T keys with D-term dots: relative error ≲ (D + T)·u32 on O(1)
    // values; outputs stored in T. For bwd, the kernel's delta uses the o rounded to T, which
    // moves ds by ≲ U_T·|dO·o|: atol covers that with 4·U_T (inputs are O(1), |dO·o| ≲ √D).
    let path = if !simt && attention::uses_mma(T::SUFFIX == "bf16", a.d) {
        "mma"
    } else {
        "simt"
    };
    let tag = format!(
        "attention {path} B{} T{} H{} Hkv{} D{} {}",
        a.b,
        a.t,
        a.h,
        a.hkv,
        a.d,
        T::SUFFIX
    );
    let acc = (a.d + a.t) as f64 * U_F32;
    // The tensor-core path rounds P to bf16 before P·V: |Σ_j (p̃_j − p_j)·v_j| ≤ 2^-9·max|v|
    // (U_BF16 = 2^-8 gives a 2× margin).
    let vmax = v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let p_round = if path == "mma" { T::U * vmax } else { 0.0 };
    check_tol(
        &format!("{tag} o"),
        &back(&d.download(&o.view()).unwrap()),
        &o_ref,
        4.0 * acc + p_round,
        T::U + acc,
    );
    check_tol(
        &format!("{tag} lse"),
        &back(&d.download(&lse.view()).unwrap()),
        &lse_ref,
        4.0 * acc,
        acc,
    );
    let bwd_atol = 4.0 * (acc + T::U * (a.d as f64).sqrt());
    check_tol(
        &format!("{tag} dq"),
        &back(&d.download(&dq.view()).unwrap()),
        &dq_ref,
        bwd_atol,
        T::U + acc,
    );
    check_tol(
        &format!("{tag} dk"),
        &back(&d.download(&dk.view()).unwrap()),
        &dk_ref,
        bwd_atol,
        T::U + acc,
    );
    check_tol(
        &format!("{tag} dv"),
        &back(&d.download(&dv.view()).unwrap()),
        &dv_ref,
        bwd_atol,
        T::U + acc,
    );
}
const ATT_CASES: [attention::AttnDims; 3] = [
    // GQA (2 query heads per kv head), T not a multiple of any tile, the tiny model's D.
    attention::AttnDims {
        b: 2,
        t: 45,
        h: 4,
        hkv: 2,
        d: 16,
    },
    // Llama's D, more than one key tile of the tensor-core kernel (64) and of the SIMT one (32).
    attention::AttnDims {
        b: 1,
        t: 70,
        h: 2,
        hkv: 1,
        d: 128,
    },
    // D = 64 (a third instance of the tensor-core template), T a multiple of 64.
    attention::AttnDims {
        b: 1,
        t: 128,
        h: 4,
        hkv: 1,
        d: 64,
    },
];
#[test]
#[ignore = "needs a CUDA device"]
fn parity_attention_f32() {
    let d = dev();
    for a in ATT_CASES {
        attention_case::<f32>(&d, a, false);
    }
}
/// bf16 through the tensor-core forward (`fwd`) and through the SIMT forward (`fwd_simt`).
#[test]
#[ignore = "needs a CUDA device"]
fn parity_attention_bf16() {
    let d = dev();
    for a in ATT_CASES {
        attention_case::<bf16>(&d, a, false);
        attention_case::<bf16>(&d, a, true);
    }
}

/// Managed memory round trip with explicit prefetches (the optimizer's paging primitive).
#[test]
#[ignore = "needs a CUDA device"]
fn managed_prefetch_roundtrip() {
    let d = dev();
    let mut m = d.alloc_managed::<f32>(1 << 20, "state").unwrap();
    for (i, v) in m.as_host_slice_mut().iter_mut().enumerate() {
        *v = i as f32;
    }
    m.prefetch_to_device(d.stream()).unwrap();
    let x = d.upload(&vec![1.0f32; 1 << 20], "x").unwrap();
    residual::bwd_acc(&d, &mut m.view_mut(), &x.view(), None).unwrap();
    m.prefetch_to_host(d.stream()).unwrap();
    d.synchronize().unwrap();
    assert!(m
        .as_host_slice()
        .iter()
        .enumerate()
        .all(|(i, &v)| v == i as f32 + 1.0));
}
