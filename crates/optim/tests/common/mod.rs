//! Shared helpers of the integration tests: fixture loading and the tolerance rule of
//! `design.md` §4 (`|got − ref| ≤ atol + rtol·|ref|`, worst element reported as % of budget).
#![allow(dead_code)]

use safetensors::SafeTensors;
use std::path::PathBuf;

pub fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn f32s(st: &SafeTensors, key: &str) -> Vec<f32> {
    let t = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{key}");
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

pub fn f64s(st: &SafeTensors, key: &str) -> Vec<f64> {
    let t = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F64, "{key}");
    t.data()
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Checks `|got − want| ≤ atol + rtol·|want|` element-wise; returns the worst fraction of the
/// budget used (panics, naming `what` and the element, when over budget).
pub fn within(what: &str, got: &[f32], want: &[f32], atol: f64, rtol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let budget = atol + rtol * (w as f64).abs();
        let err = (g as f64 - w as f64).abs();
        assert!(
            err <= budget,
            "{what}[{i}]: got {g:e}, want {w:e}, |err| {err:e} > budget {budget:e}"
        );
        if budget > 0.0 {
            worst = worst.max(err / budget);
        }
    }
    worst
}

/// Small deterministic generator (xorshift64*), uniform in [-1, 1).
pub struct Rng(pub u64);
impl Rng {
    pub fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
}
