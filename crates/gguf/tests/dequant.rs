//! Test vectors for every supported ggml type: hand-made blocks whose values are derived by
//! hand below from the block layouts of ggml-common.h and the formulas of llama.cpp's
//! `dequantize_row_*`. All chosen scales are exact f16 values and every product is exact in
//! f32, so the expected values (computed in f64 from the derivation, then rounded once) are
//! bit-exact references, compared with `==` on the bits.

use qlora_gguf::dequant::{dequantize, scale_min_k4, DequantError, GgmlType};

fn assert_bits_eq(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let w = *w as f32;
        assert_eq!(
            g.to_bits(),
            w.to_bits(),
            "{what}: element {i}: got {g}, want {w}"
        );
    }
}

// f16 bit patterns used below (sign | 5-bit exponent, bias 15 | 10-bit mantissa):
// 0x3C00 = 1.0, 0x3800 = 0.5, 0x3400 = 0.25, 0x4000 = 2.0, 0xBC00 = -1.0,
// 0x2E66 = 2^-4 · (1 + 0x266/1024) = 0.0999755859375.
const F16_1: [u8; 2] = 0x3C00u16.to_le_bytes();
const F16_HALF: [u8; 2] = 0x3800u16.to_le_bytes();
const F16_QUARTER: [u8; 2] = 0x3400u16.to_le_bytes();
const F16_2: [u8; 2] = 0x4000u16.to_le_bytes();
const F16_M1: [u8; 2] = 0xBC00u16.to_le_bytes();
const F16_0_1: [u8; 2] = 0x2E66u16.to_le_bytes();
const F16_0_1_VALUE: f64 = 0.0999755859375;

#[test]
fn f32_f16_bf16_are_exact_widenings() {
    // F32: the little-endian bytes of 1.5, -0.0 and the smallest subnormal 2^-149.
    let vals = [1.5f32, -0.0, f32::from_bits(1)];
    let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let got = dequantize(GgmlType::F32, &bytes, 3).unwrap();
    assert_eq!(got[0], 1.5);
    assert_eq!(got[1].to_bits(), (-0.0f32).to_bits());
    assert_eq!(got[2].to_bits(), 1);

    // F16: 0x3C00 = 1.0; 0xC000 = -2.0; 0x7BFF = (2 − 2^-10)·2^15 = 65504 (largest finite);
    // 0x0001 = 2^-24 (smallest subnormal); 0x7C00 = +inf.
    let h: Vec<u8> = [0x3C00u16, 0xC000, 0x7BFF, 0x0001, 0x7C00]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let got = dequantize(GgmlType::F16, &h, 5).unwrap();
    assert_bits_eq(&got[..4], &[1.0, -2.0, 65504.0, 2f64.powi(-24)], "F16");
    assert_eq!(got[4], f32::INFINITY);

    // BF16 is the top half of an f32: 0x3F80 → 0x3F800000 = 1.0; 0x4049 → 0x40490000 =
    // 2·(1 + 0x49/128) = 3.140625; 0xC2F7 → -(2^6)·(1 + 0x77/128) = -123.5; 0xFF80 → -inf.
    let b: Vec<u8> = [0x3F80u16, 0x4049, 0xC2F7, 0xFF80]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let got = dequantize(GgmlType::BF16, &b, 4).unwrap();
    assert_bits_eq(&got[..3], &[1.0, 3.140625, -123.5], "BF16");
    assert_eq!(got[3], f32::NEG_INFINITY);
}

#[test]
fn q8_0_block() {
    // block_q8_0 = f16 d | i8 qs[32]; y[j] = qs[j]·d.
    // Block 0: d = 0.25, qs[j] = j − 16 except qs[0] = −128 and qs[31] = 127
    //   → y = (j − 16)/4, y[0] = −32, y[31] = 31.75.
    // Block 1: d = 0.0999755859375, qs[j] = 3 → every y = 0.2999267578125 (exact: 11-bit
    //   mantissa × 2 bits).
    let mut b = Vec::new();
    b.extend_from_slice(&F16_QUARTER);
    for j in 0..32i32 {
        let q = match j {
            0 => -128,
            31 => 127,
            _ => j - 16,
        };
        b.push(q as i8 as u8);
    }
    b.extend_from_slice(&F16_0_1);
    b.extend(std::iter::repeat_n(3u8, 32));
    let mut want: Vec<f64> = (0..32).map(|j| (j as f64 - 16.0) / 4.0).collect();
    want[0] = -32.0;
    want[31] = 31.75;
    want.extend(std::iter::repeat_n(3.0 * F16_0_1_VALUE, 32));
    assert_bits_eq(&dequantize(GgmlType::Q8_0, &b, 64).unwrap(), &want, "Q8_0");
}

#[test]
fn q4_0_block() {
    // block_q4_0 = f16 d | u8 qs[16]; y[j] = ((qs[j] & 15) − 8)·d, y[j+16] = ((qs[j] >> 4) − 8)·d.
    // d = 2, qs[j] = j | (15 − j) << 4  →  y[j] = (j − 8)·2,  y[j + 16] = (15 − j − 8)·2 = (7 − j)·2.
    let mut b = F16_2.to_vec();
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let mut want: Vec<f64> = (0..16).map(|j| (j as f64 - 8.0) * 2.0).collect();
    want.extend((0..16).map(|j| (7.0 - j as f64) * 2.0));
    assert_bits_eq(&dequantize(GgmlType::Q4_0, &b, 32).unwrap(), &want, "Q4_0");
}

#[test]
fn q4_1_block() {
    // block_q4_1 = f16 d | f16 m | u8 qs[16]; y[j] = (qs[j] & 15)·d + m, y[j+16] = (qs[j] >> 4)·d + m.
    // Block 0: d = 0.5, m = −1, qs[j] = j | (15 − j) << 4 → y[j] = j/2 − 1, y[j+16] = (15 − j)/2 − 1.
    // Block 1: d = 0.0999755859375, m = 1, qs[j] = 0xF0 | (j & 15) → y[j] = j·d + 1, y[j+16] = 15·d + 1
    //   (products exact; the sum rounds once in f32, as the reference's `x*d + m`).
    let mut b = F16_HALF.to_vec();
    b.extend_from_slice(&F16_M1);
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    b.extend_from_slice(&F16_0_1);
    b.extend_from_slice(&F16_1);
    b.extend((0..16u8).map(|j| 0xF0 | j));
    let mut want: Vec<f64> = (0..16).map(|j| j as f64 / 2.0 - 1.0).collect();
    want.extend((0..16).map(|j| (15 - j) as f64 / 2.0 - 1.0));
    // Round the product exactly like f32 (it is exact), then the sum once.
    let d = F16_0_1_VALUE as f32;
    want.extend((0..16).map(|j| ((j as f32 * d) + 1.0) as f64));
    want.extend((0..16).map(|_| ((15.0 * d) + 1.0) as f64));
    assert_bits_eq(&dequantize(GgmlType::Q4_1, &b, 64).unwrap(), &want, "Q4_1");
}

#[test]
fn k_quant_scale_unpacking_literal_bytes() {
    // The 12 scale bytes of Q4_K/Q5_K hold 8 six-bit scales `sc` and 8 six-bit mins `m`:
    //   j < 4 : sc[j] = q[j] & 63,         m[j] = q[j+4] & 63
    //   j >= 4: sc[j] = (q[j+4] & 15) | (q[j−4] >> 6) << 4,  m[j] = (q[j+4] >> 4) | (q[j] >> 6) << 4
    // With q = [0xC1, 0x42, 0x03, 0x84, 0x45, 0x06, 0xC7, 0x08, 0x9A, 0xBC, 0xDE, 0xF0]:
    //   sc[0] = 0xC1 & 63 = 1,  m[0] = 0x45 & 63 = 5
    //   sc[1] = 0x42 & 63 = 2,  m[1] = 0x06 & 63 = 6
    //   sc[3] = 0x84 & 63 = 4,  m[3] = 0x08 & 63 = 8
    //   sc[4] = (0x9A & 15) | (0xC1 >> 6) << 4 = 10 | 3 << 4 = 58;  m[4] = (0x9A >> 4) | (0x45 >> 6) << 4 = 9 | 1 << 4 = 25
    //   sc[6] = (0xDE & 15) | (0x03 >> 6) << 4 = 14;                m[6] = (0xDE >> 4) | (0xC7 >> 6) << 4 = 13 | 3 << 4 = 61
    //   sc[7] = (0xF0 & 15) | (0x84 >> 6) << 4 = 0 | 2 << 4 = 32;   m[7] = (0xF0 >> 4) | (0x08 >> 6) << 4 = 15
    let q = [
        0xC1, 0x42, 0x03, 0x84, 0x45, 0x06, 0xC7, 0x08, 0x9A, 0xBC, 0xDE, 0xF0,
    ];
    assert_eq!(scale_min_k4(0, &q), (1, 5));
    assert_eq!(scale_min_k4(1, &q), (2, 6));
    assert_eq!(scale_min_k4(3, &q), (4, 8));
    assert_eq!(scale_min_k4(4, &q), (58, 25));
    assert_eq!(scale_min_k4(6, &q), (14, 61));
    assert_eq!(scale_min_k4(7, &q), (32, 15));
}

/// Pack 8 six-bit scales and mins into the 12 bytes, inverting the layout written above.
fn pack_scales(sc: [u8; 8], m: [u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..4 {
        q[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        q[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        q[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4);
    }
    q
}

const SC: [u8; 8] = [1, 2, 3, 4, 17, 33, 50, 63];
const MN: [u8; 8] = [0, 1, 2, 3, 20, 40, 5, 63];

#[test]
fn q4_k_block() {
    // block_q4_K = f16 d | f16 dmin | u8 scales[12] | u8 qs[128]. Chunk c (0..4) of 64 values
    // uses qs[32c..32c+32]: y[64c + l] = d·sc[2c]·(qs & 15) − dmin·m[2c],
    // y[64c + 32 + l] = d·sc[2c+1]·(qs >> 4) − dmin·m[2c+1].
    // d = 1, dmin = 0.5, sc/m = SC/MN above, qs[32c + l] = (l % 16) | (15 − l % 16) << 4.
    // E.g. chunk 2 uses sub-blocks 4 and 5; its high-nibble half starts at 128 + 32 = 160:
    //   y[163] = 1·sc[5]·(15 − 3) − 0.5·m[5] = 33·12 − 20 = 376.
    let mut b = F16_1.to_vec();
    b.extend_from_slice(&F16_HALF);
    b.extend_from_slice(&pack_scales(SC, MN));
    for _c in 0..4 {
        b.extend((0..32u8).map(|l| (l % 16) | ((15 - l % 16) << 4)));
    }
    assert_eq!(b.len(), 144);
    let mut want = vec![0f64; 256];
    for c in 0..4 {
        for l in 0..32 {
            let lo = (l % 16) as f64;
            let hi = (15 - l % 16) as f64;
            want[64 * c + l] = SC[2 * c] as f64 * lo - 0.5 * MN[2 * c] as f64;
            want[64 * c + 32 + l] = SC[2 * c + 1] as f64 * hi - 0.5 * MN[2 * c + 1] as f64;
        }
    }
    assert_eq!(want[163], 376.0);
    assert_bits_eq(&dequantize(GgmlType::Q4_K, &b, 256).unwrap(), &want, "Q4_K");
}

#[test]
fn q5_k_block() {
    // block_q5_K = f16 d | f16 dmin | u8 scales[12] | u8 qh[32] | u8 qs[128]. As Q4_K with a
    // fifth bit: in chunk c, the low-nibble value of element l gets +16 when qh[l] has bit 2c,
    // the high-nibble value when qh[l] has bit 2c+1.
    // d = 0.25, dmin = 1, SC/MN, qs[32c + l] = l % 16 | (l / 2 % 16) << 4, qh[l] = l·7 mod 256.
    // E.g. c = 1, l = 5: qh[5] = 35 = 0b00100011, bit 2 clear, bit 3 clear →
    //   y[64 + 5] = 0.25·sc[2]·5 − m[2] = 0.25·3·5 − 2 = 1.75;
    //   y[64 + 32 + 5] = 0.25·sc[3]·(5/2 = 2) − m[3] = 0.25·4·2 − 3 = −1.
    // c = 0, l = 5: bits 0 and 1 set → y[5] = 0.25·1·(5 + 16) − 0 = 5.25,
    //   y[37] = 0.25·2·(2 + 16) − 1 = 8.
    let mut b = F16_QUARTER.to_vec();
    b.extend_from_slice(&F16_1);
    b.extend_from_slice(&pack_scales(SC, MN));
    let qh: Vec<u8> = (0..32u32).map(|l| (l * 7 % 256) as u8).collect();
    b.extend_from_slice(&qh);
    for _c in 0..4 {
        b.extend((0..32u8).map(|l| (l % 16) | ((l / 2 % 16) << 4)));
    }
    assert_eq!(b.len(), 176);
    let mut want = vec![0f64; 256];
    for c in 0..4 {
        for l in 0..32 {
            let h1 = if qh[l] & (1 << (2 * c)) != 0 {
                16.0
            } else {
                0.0
            };
            let h2 = if qh[l] & (2 << (2 * c)) != 0 {
                16.0
            } else {
                0.0
            };
            let lo = (l % 16) as f64 + h1;
            let hi = (l / 2 % 16) as f64 + h2;
            want[64 * c + l] = 0.25 * SC[2 * c] as f64 * lo - MN[2 * c] as f64;
            want[64 * c + 32 + l] = 0.25 * SC[2 * c + 1] as f64 * hi - MN[2 * c + 1] as f64;
        }
    }
    assert_eq!(want[69], 1.75);
    assert_eq!(want[96 + 5], -1.0);
    assert_eq!(want[5], 5.25);
    assert_eq!(want[37], 8.0);
    assert_bits_eq(&dequantize(GgmlType::Q5_K, &b, 256).unwrap(), &want, "Q5_K");
}

#[test]
fn q6_k_block() {
    // block_q6_K = u8 ql[128] | u8 qh[64] | i8 scales[16] | f16 d. Half h (0, 1) of 128 values
    // uses ql[64h..], qh[32h..], scales[8h..]; for l < 32 with is = l / 16:
    //   y[128h + l]      = d·sc[is]    ·((ql[l]    & 15 | (qh[l]      & 3) << 4) − 32)
    //   y[128h + l + 32] = d·sc[is + 2]·((ql[l+32] & 15 | (qh[l] >> 2 & 3) << 4) − 32)
    //   y[128h + l + 64] = d·sc[is + 4]·((ql[l]    >> 4 | (qh[l] >> 4 & 3) << 4) − 32)
    //   y[128h + l + 96] = d·sc[is + 6]·((ql[l+32] >> 4 | (qh[l] >> 6 & 3) << 4) − 32)
    // d = 0.5; scales[k] = k − 8 for k < 16 except scales[15] = −128 (i8 extreme) and
    // scales[0] = 127; ql[i] = i mod 256 (as byte), qh[i] = 255 − 3i (mod 256).
    // E.g. h = 0, l = 1: ql[1] = 1, qh[1] = 252 = 0b11_11_11_00 →
    //   q1 = 1 | 0 << 4 = 1 → y[1] = 0.5·127·(1 − 32) = −1968.5.
    let ql: Vec<u8> = (0..128u32).map(|i| i as u8).collect();
    let qh: Vec<u8> = (0..64u32).map(|i| (255 - 3 * i) as u8).collect();
    let mut sc: Vec<i8> = (0..16).map(|k| k as i8 - 8).collect();
    sc[0] = 127;
    sc[15] = -128;
    let mut b = ql.clone();
    b.extend_from_slice(&qh);
    b.extend(sc.iter().map(|&s| s as u8));
    b.extend_from_slice(&F16_HALF);
    assert_eq!(b.len(), 210);
    let mut want = vec![0f64; 256];
    for h in 0..2 {
        let (ql, qh, sc) = (&ql[64 * h..], &qh[32 * h..], &sc[8 * h..]);
        for l in 0..32 {
            let is = l / 16;
            let q = |v: u8| v as f64 - 32.0;
            let q1 = q((ql[l] & 15) | ((qh[l] & 3) << 4));
            let q2 = q((ql[l + 32] & 15) | ((qh[l] >> 2 & 3) << 4));
            let q3 = q((ql[l] >> 4) | ((qh[l] >> 4 & 3) << 4));
            let q4 = q((ql[l + 32] >> 4) | ((qh[l] >> 6 & 3) << 4));
            want[128 * h + l] = 0.5 * sc[is] as f64 * q1;
            want[128 * h + l + 32] = 0.5 * sc[is + 2] as f64 * q2;
            want[128 * h + l + 64] = 0.5 * sc[is + 4] as f64 * q3;
            want[128 * h + l + 96] = 0.5 * sc[is + 6] as f64 * q4;
        }
    }
    assert_eq!(want[1], -1968.5);
    assert_bits_eq(&dequantize(GgmlType::Q6_K, &b, 256).unwrap(), &want, "Q6_K");
}

#[test]
fn many_blocks_split_across_threads_keep_order() {
    // 300 Q8_0 blocks (9600 elements, more than one 4096-element parallel run, and not a
    // multiple of it): block i has d = 1 and qs[j] = (i + j) mod 128 → y[32i + j] = (i + j) mod 128.
    let mut b = Vec::new();
    for i in 0..300usize {
        b.extend_from_slice(&F16_1);
        b.extend((0..32).map(|j| ((i + j) % 128) as u8));
    }
    let want: Vec<f64> = (0..9600)
        .map(|k| ((k / 32 + k % 32) % 128) as f64)
        .collect();
    assert_bits_eq(
        &dequantize(GgmlType::Q8_0, &b, 9600).unwrap(),
        &want,
        "Q8_0 x300",
    );
}

#[test]
fn bad_sizes_and_types_are_errors() {
    assert_eq!(
        dequantize(GgmlType::Q4_0, &[0u8; 18], 16),
        Err(DequantError::PartialBlock { n: 16, block: 32 })
    );
    assert_eq!(
        dequantize(GgmlType::Q6_K, &[0u8; 209], 256),
        Err(DequantError::WrongSize {
            expected: 210,
            got: 209
        })
    );
    let q2k = GgmlType::from_id(10);
    assert_eq!(q2k.name(), "Q2_K");
    let err = dequantize(q2k, &[0u8; 84], 256).unwrap_err();
    assert!(err.to_string().contains("Q2_K"), "{err}");
}
