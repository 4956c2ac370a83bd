//! Fixture helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

/// `tests/fixtures/<rel>` of the workspace.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
}

/// Every tensor of a safetensors file: name → (shape, values as f64; ints converted).
pub fn read_all(rel: &str) -> std::collections::HashMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(fixture(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let b = v.data();
            let vals: Vec<f64> = match v.dtype() {
                Dtype::F32 => b
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::I64 => b
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::BF16 => b
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
                    .collect(),
                d => panic!("{rel}/{name}: unexpected dtype {d:?}"),
            };
            (name, (v.shape().to_vec(), vals))
        })
        .collect()
}

/// max |a − b|, asserting equal lengths.
pub fn max_abs(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
}

/// max |Δ| / max |ref|.
pub fn norm_err(got: &[f32], want: &[f64]) -> f64 {
    let m = want.iter().fold(0.0f64, |a, &b| a.max(b.abs()));
    max_abs(got, want) / m
}
