//! ggml tensor types and their dequantization to f32.
//!
//! Each `dequantize_*` reproduces llama.cpp's reference `dequantize_row_*` (ggml-quants.c)
//! operation for operation: the same f16→f32 widening of the block scales, the same products in
//! the same order, in f32, with no fused multiply-add (the reference is plain C `a*b + c`
//! compiled without FMA contraction on its portable path). The block layouts are those of
//! ggml-common.h; they are restated above each function.

use half::{bf16, f16};
use rayon::prelude::*;

/// A ggml tensor element type, as stored in a GGUF tensor-info entry (`enum ggml_type`).
/// Variants keep ggml's spelling (`Q4_K`) so they read the same as llama.cpp's type names.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
    /// Any other type id: known to ggml (named by [`GgmlType::name`]) but not dequantized here.
    Other(u32),
}

/// Elements per super-block of the k-quants (`QK_K` in ggml-common.h).
pub const QK_K: usize = 256;
/// Elements per block of Q4_0, Q4_1 and Q8_0 (`QK4_0 = QK4_1 = QK8_0 = 32`).
pub const QK: usize = 32;

impl GgmlType {
    /// The type of a ggml type id.
    pub fn from_id(id: u32) -> GgmlType {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            30 => GgmlType::BF16,
            other => GgmlType::Other(other),
        }
    }

    /// The ggml type id written in GGUF files.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
            GgmlType::Other(id) => id,
        }
    }

    /// ggml's name of the type (`GGML_TYPE_<name>`), also for the types we refuse, so that the
    /// refusal says which type the file uses.
    pub fn name(self) -> String {
        let name = match self.id() {
            0 => "F32",
            1 => "F16",
            2 => "Q4_0",
            3 => "Q4_1",
            4 => "Q4_2 (removed from ggml)",
            5 => "Q4_3 (removed from ggml)",
            6 => "Q5_0",
            7 => "Q5_1",
            8 => "Q8_0",
            9 => "Q8_1",
            10 => "Q2_K",
            11 => "Q3_K",
            12 => "Q4_K",
            13 => "Q5_K",
            14 => "Q6_K",
            15 => "Q8_K",
            16 => "IQ2_XXS",
            17 => "IQ2_XS",
            18 => "IQ3_XXS",
            19 => "IQ1_S",
            20 => "IQ4_NL",
            21 => "IQ3_S",
            22 => "IQ2_S",
            23 => "IQ4_XS",
            24 => "I8",
            25 => "I16",
            26 => "I32",
            27 => "I64",
            28 => "F64",
            29 => "IQ1_M",
            30 => "BF16",
            31 => "Q4_0_4_4 (removed from ggml)",
            32 => "Q4_0_4_8 (removed from ggml)",
            33 => "Q4_0_8_8 (removed from ggml)",
            34 => "TQ1_0",
            35 => "TQ2_0",
            36 => "IQ4_NL_4_4 (removed from ggml)",
            37 => "IQ4_NL_4_8 (removed from ggml)",
            38 => "IQ4_NL_8_8 (removed from ggml)",
            39 => "MXFP4",
            40 => "NVFP4",
            41 => "Q1_0",
            42 => "Q2_0",
            id => return format!("unknown type id {id}"),
        };
        name.to_string()
    }

    /// `(elements per block, bytes per block)` of the supported types; `None` for the others.
    ///
    /// Byte counts from ggml-common.h:
    /// - Q4_0: f16 d, 16 nibble bytes = 18; Q4_1: f16 d, f16 m, 16 nibble bytes = 20;
    /// - Q8_0: f16 d, 32 i8 = 34;
    /// - Q4_K: f16 d, f16 dmin, 12 scale bytes, 128 nibble bytes = 144;
    /// - Q5_K: as Q4_K plus 32 high-bit bytes = 176;
    /// - Q6_K: 128 ql, 64 qh, 16 i8 scales, f16 d = 210.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        match self {
            GgmlType::F32 => Some((1, 4)),
            GgmlType::F16 | GgmlType::BF16 => Some((1, 2)),
            GgmlType::Q4_0 => Some((QK, 18)),
            GgmlType::Q4_1 => Some((QK, 20)),
            GgmlType::Q8_0 => Some((QK, 34)),
            GgmlType::Q4_K => Some((QK_K, 144)),
            GgmlType::Q5_K => Some((QK_K, 176)),
            GgmlType::Q6_K => Some((QK_K, 210)),
            GgmlType::Other(_) => None,
        }
    }

    /// Bytes taken by `n` elements, `None` for unsupported types or when `n` is not a whole
    /// number of blocks.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let (be, bb) = self.block_layout()?;
        if !n.is_multiple_of(be as u64) {
            return None;
        }
        (n / be as u64).checked_mul(bb as u64)
    }
}

/// Why a raw buffer could not be dequantized (the caller adds file and tensor names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DequantError {
    Unsupported(GgmlType),
    /// `n` elements is not a whole number of blocks of the type.
    PartialBlock {
        n: usize,
        block: usize,
    },
    /// The source buffer length does not match `n` elements of the type.
    WrongSize {
        expected: usize,
        got: usize,
    },
}

impl std::fmt::Display for DequantError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DequantError::Unsupported(t) => write!(f, "ggml type {} is not supported", t.name()),
            DequantError::PartialBlock { n, block } => {
                write!(
                    f,
                    "{n} elements is not a whole number of {block}-element blocks"
                )
            }
            DequantError::WrongSize { expected, got } => {
                write!(f, "expected {expected} bytes of data, got {got}")
            }
        }
    }
}

/// Dequantize `n` elements of type `ty` stored in `src` (little-endian, ggml block layout) to
/// f32. Blocks are independent, so they are split over rayon threads in runs of whole blocks.
pub fn dequantize(ty: GgmlType, src: &[u8], n: usize) -> Result<Vec<f32>, DequantError> {
    let (be, bb) = ty.block_layout().ok_or(DequantError::Unsupported(ty))?;
    if !n.is_multiple_of(be) {
        return Err(DequantError::PartialBlock { n, block: be });
    }
    let expected = n / be * bb;
    if src.len() != expected {
        return Err(DequantError::WrongSize {
            expected,
            got: src.len(),
        });
    }
    let block_fn: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, y| y[0] = f16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::BF16 => |b, y| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => dequantize_block_q4_0,
        GgmlType::Q4_1 => dequantize_block_q4_1,
        GgmlType::Q8_0 => dequantize_block_q8_0,
        GgmlType::Q4_K => dequantize_block_q4_k,
        GgmlType::Q5_K => dequantize_block_q5_k,
        GgmlType::Q6_K => dequantize_block_q6_k,
        GgmlType::Other(_) => return Err(DequantError::Unsupported(ty)),
    };
    let mut out = vec![0f32; n];
    // Runs of 4096 elements (a multiple of every block size) amortise rayon's per-task cost.
    let run = 4096usize.max(be);
    out.par_chunks_mut(run)
        .zip(src.par_chunks(run / be * bb))
        .for_each(|(y, x)| {
            for (yb, xb) in y.chunks_exact_mut(be).zip(x.chunks_exact(bb)) {
                block_fn(xb, yb);
            }
        });
    Ok(out)
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    // GGML_FP16_TO_FP32 is exact: every f16 is representable in f32.
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// block_q4_0 (18 bytes): `f16 d; u8 qs[16]`. Element j (j < 16) is the low nibble of qs[j],
/// element j + 16 the high nibble; value = (q − 8)·d.
pub fn dequantize_block_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..QK / 2 {
        let x0 = (qs[j] & 0x0F) as i32 - 8;
        let x1 = (qs[j] >> 4) as i32 - 8;
        y[j] = x0 as f32 * d;
        y[j + QK / 2] = x1 as f32 * d;
    }
}

/// block_q4_1 (20 bytes): `f16 d; f16 m; u8 qs[16]`, nibbles as Q4_0; value = q·d + m.
pub fn dequantize_block_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..QK / 2 {
        let x0 = (qs[j] & 0x0F) as f32;
        let x1 = (qs[j] >> 4) as f32;
        y[j] = x0 * d + m;
        y[j + QK / 2] = x1 * d + m;
    }
}

/// block_q8_0 (34 bytes): `f16 d; i8 qs[32]`; value = q·d.
pub fn dequantize_block_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..QK {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8) packed in the 12
/// `scales` bytes of Q4_K/Q5_K. Sub-blocks 0..4 use the low 6 bits of bytes j and j+4; sub-blocks
/// 4..8 take their low 4 bits from byte j+4 (low/high nibble) and their top 2 bits from the top
/// bits of bytes j−4 (scale) and j (min).
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// block_q4_K (144 bytes): `f16 d; f16 dmin; u8 scales[12]; u8 qs[128]`. 8 sub-blocks of 32;
/// each 64-element chunk c uses 32 bytes of qs: the low nibbles are sub-block 2c, the high
/// nibbles sub-block 2c+1. value = (d·sc)·q − (dmin·m).
pub fn dequantize_block_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for c in 0..QK_K / 64 {
        let q = &qs[32 * c..32 * c + 32];
        let (sc, m) = scale_min_k4(2 * c, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * c + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        let y = &mut y[64 * c..64 * c + 64];
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0xF) as f32 - m1;
            y[32 + l] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// block_q5_K (176 bytes): `f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]`. As Q4_K
/// plus a fifth bit: for chunk c, element l of the low-nibble sub-block adds 16 if bit 2c of
/// qh[l] is set, the high-nibble sub-block if bit 2c+1 is set.
pub fn dequantize_block_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for c in 0..QK_K / 64 {
        let ql = &qs[32 * c..32 * c + 32];
        let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
        let (sc, m) = scale_min_k4(2 * c, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * c + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        let y = &mut y[64 * c..64 * c + 64];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((ql[l] & 0xF) + h1) as f32 - m1;
            y[32 + l] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
        }
    }
}

/// block_q6_K (210 bytes): `u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d`. Two halves of 128
/// elements; half h uses ql[64h..64h+64], qh[32h..32h+32], scales[8h..8h+8]. For l < 32:
///   q1 = (ql[l] & 15)    | ((qh[l] >> 0) & 3) << 4   → element l       (scale is = l/16)
///   q2 = (ql[l+32] & 15) | ((qh[l] >> 2) & 3) << 4   → element l + 32  (scale is + 2)
///   q3 = (ql[l] >> 4)    | ((qh[l] >> 4) & 3) << 4   → element l + 64  (scale is + 4)
///   q4 = (ql[l+32] >> 4) | ((qh[l] >> 6) & 3) << 4   → element l + 96  (scale is + 6)
/// value = (d·scale)·(q − 32), evaluated left to right as the reference `d * sc[is] * q`.
pub fn dequantize_block_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for h in 0..QK_K / 128 {
        let ql = &b[64 * h..64 * h + 64];
        let qh = &b[128 + 32 * h..128 + 32 * h + 32];
        let sc = &b[192 + 8 * h..192 + 8 * h + 8];
        let y = &mut y[128 * h..128 * h + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| (sc[is + k] as i8) as f32;
            y[l] = d * s(0) * q1 as f32;
            y[l + 32] = d * s(2) * q2 as f32;
            y[l + 64] = d * s(4) * q3 as f32;
            y[l + 96] = d * s(6) * q4 as f32;
        }
    }
}
