//! Every blocksize 32…4096, odd lengths, tail blocks, all-zero blocks, f16/bf16/f32 inputs,
//! checked against the rule of specs/nf4.md §2 applied element by element (the scalar
//! `codebook::nf4_code`), and dequantization with exactly one rounding to each output dtype.

use half::{bf16, f16};
use qlora_nf4::codebook::{nf4_code, NF4};
use qlora_nf4::quant::{quantize_blockwise, FloatData, BLOCKSIZES};
use qlora_nf4::{Absmax, Dtype, Nf4Error, Nf4Tensor};

/// Deterministic weight-like values with outliers and a zero block in the middle.
fn values(n: usize, seed: u64, zero_block: Option<(usize, usize)>) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            if zero_block.is_some_and(|(a, b)| (a..b).contains(&i)) {
                return 0.0;
            }
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            if s.is_multiple_of(97) {
                u * 3.0
            } else {
                u * 0.05
            }
        })
        .collect()
}

/// The element-by-element rule: absmax per block, reciprocal-multiply (division in a partial
/// tail block), threshold count, high nibble first, padding code 7, all-zero block → 0x77.
fn reference(x: &[f32], bs: usize) -> (Vec<u8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(x.len() + 1);
    let mut absmax = Vec::new();
    for block in x.chunks(bs) {
        let m = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(m);
        for &v in block {
            codes.push(if m == 0.0 {
                7
            } else if block.len() < bs {
                nf4_code(v / m)
            } else {
                nf4_code(v * (1.0 / m))
            });
        }
    }
    if codes.len() % 2 == 1 {
        codes.push(7);
    }
    (
        codes.chunks(2).map(|p| (p[0] << 4) | p[1]).collect(),
        absmax,
    )
}

#[test]
fn every_blocksize_and_length_matches_the_rule() {
    for &bs in &BLOCKSIZES {
        for n in [1, 2, 31, bs - 1, bs, bs + 1, 3 * bs + 17, 5 * bs] {
            let zero = (n >= 3 * bs).then_some((bs, 2 * bs));
            let x = values(n, (bs * 1000 + n) as u64, zero);
            let (packed, absmax) = quantize_blockwise("t", FloatData::F32(&x), bs).unwrap();
            let (want_packed, want_absmax) = reference(&x, bs);
            assert_eq!(packed, want_packed, "blocksize {bs}, n {n}: packed");
            assert_eq!(absmax, want_absmax, "blocksize {bs}, n {n}: absmax");
            if let Some((a, b)) = zero {
                assert!(
                    packed[a / 2..b / 2].iter().all(|&p| p == 0x77),
                    "zero block stores code 7"
                );
                assert_eq!(absmax[1], 0.0);
            }
        }
    }
}

#[test]
fn half_inputs_are_widened_exactly() {
    let x = values(4097, 7, None);
    for (dtype, bytes, widened) in [
        (
            Dtype::BF16,
            x.iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect::<Vec<u8>>(),
            x.iter()
                .map(|v| bf16::from_f32(*v).to_f32())
                .collect::<Vec<f32>>(),
        ),
        (
            Dtype::F16,
            x.iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
            x.iter().map(|v| f16::from_f32(*v).to_f32()).collect(),
        ),
        (
            Dtype::F32,
            x.iter().flat_map(|v| v.to_le_bytes()).collect(),
            x.clone(),
        ),
    ] {
        let from_bytes = quantize_blockwise("t", FloatData::Bytes(dtype, &bytes), 128).unwrap();
        assert_eq!(from_bytes, reference(&widened, 128), "{dtype:?}");
    }
}

#[test]
fn dequantize_rounds_once_to_each_dtype() {
    let x = values(1000, 11, Some((64, 128)));
    for dq in [false, true] {
        let t = Nf4Tensor::quantize("w", &x, &[10, 100], 64, dq, Dtype::BF16).unwrap();
        let scales = t.state.absmax_f32();
        let products: Vec<f32> = (0..x.len())
            .map(|i| {
                let byte = t.packed[i / 2];
                let code = if i % 2 == 0 { byte >> 4 } else { byte & 15 };
                NF4[code as usize] * scales[i / 64]
            })
            .collect();
        assert_eq!(t.dequantize_f32(), products);
        let bf: Vec<bf16> = products.iter().map(|&p| bf16::from_f32(p)).collect();
        assert_eq!(t.dequantize_bf16(), bf);
        let hf: Vec<f16> = products.iter().map(|&p| f16::from_f32(p)).collect();
        assert_eq!(t.dequantize_f16(), hf);
        let mut into = vec![bf16::ZERO; x.len()];
        t.dequantize_into(&mut into).unwrap();
        assert_eq!(into, bf);
        assert!(
            t.dequantize_into(&mut [0f32; 3]).is_err(),
            "wrong output length is an error"
        );
        assert_eq!(matches!(t.state.absmax, Absmax::Double { .. }), dq);
    }
}

#[test]
fn non_finite_values_name_tensor_and_index() {
    for (bad, index) in [
        (f32::NAN, 0usize),
        (f32::INFINITY, 700),
        (f32::NEG_INFINITY, 4096),
    ] {
        let mut x = values(4097, 3, None);
        x[index] = bad;
        let e = Nf4Tensor::quantize(
            "model.layers.3.mlp.up_proj.weight",
            &x,
            &[4097],
            64,
            true,
            Dtype::F32,
        )
        .unwrap_err();
        match &e {
            Nf4Error::NonFinite {
                tensor, index: i, ..
            } => {
                assert_eq!(tensor, "model.layers.3.mlp.up_proj.weight");
                assert_eq!(*i, index);
            }
            other => panic!("unexpected error {other}"),
        }
        assert!(e.to_string().contains(&format!("element {index}")));
    }
}

#[test]
fn unsupported_blocksize_and_bad_shape_are_errors() {
    let x = values(128, 1, None);
    assert!(matches!(
        Nf4Tensor::quantize("w", &x, &[128], 48, true, Dtype::F32),
        Err(Nf4Error::BadBlocksize(48))
    ));
    assert!(matches!(
        Nf4Tensor::quantize("w", &x, &[8192], 8192, true, Dtype::F32),
        Err(Nf4Error::BadBlocksize(8192))
    ));
    let e = Nf4Tensor::quantize("w", &x, &[3, 40], 64, true, Dtype::F32).unwrap_err();
    assert!(e.to_string().contains("does not match 128 elements"), "{e}");
}
