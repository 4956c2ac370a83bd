//! Blockwise NF4 quantization, double quantization of the absmax constants, dequantization.
//!
//! The exact rules are specs/nf4.md §2–4; each function below cites the rule it implements.
//! Everything is f32 arithmetic in a fixed order so results are bit-identical to bitsandbytes.

use crate::codebook::{nearest_code, nf4_code, DYNAMIC_SIGNED, NF4, NF4_ZERO_CODE};
use crate::{Dtype, Nf4Error, Result};
use half::{bf16, f16};
use rayon::prelude::*;

/// QB2: block size of the double quantization of the absmax vector.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The blocksizes bitsandbytes accepts for 4-bit quantization.
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Blocks handed to one rayon task: large enough to amortise scheduling, small enough that a
/// single big tensor still spreads over all threads.
const BLOCKS_PER_TASK: usize = 512;

pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if BLOCKSIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(Nf4Error::BadBlocksize(blocksize))
    }
}

/// Borrowed little-endian float data of a tensor, widened to f32 block by block on use so that
/// quantizing a bf16 checkpoint never materialises an f32 copy of a whole tensor.
#[derive(Clone, Copy)]
pub enum FloatData<'a> {
    F32(&'a [f32]),
    /// Raw little-endian bytes of f32/bf16/f16 values (e.g. straight from a memory map, which
    /// gives no alignment guarantee).
    Bytes(Dtype, &'a [u8]),
}

impl FloatData<'_> {
    pub fn len(&self) -> usize {
        match self {
            FloatData::F32(x) => x.len(),
            FloatData::Bytes(d, b) => b.len() / d.size(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Widen elements `start..start + out.len()` into `out` (exact for bf16/f16).
    fn fill(&self, start: usize, out: &mut [f32]) {
        match *self {
            FloatData::F32(x) => out.copy_from_slice(&x[start..start + out.len()]),
            FloatData::Bytes(Dtype::F32, b) => {
                for (o, c) in out.iter_mut().zip(b[start * 4..].chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            FloatData::Bytes(Dtype::BF16, b) => {
                for (o, c) in out.iter_mut().zip(b[start * 2..].chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
            FloatData::Bytes(Dtype::F16, b) => {
                for (o, c) in out.iter_mut().zip(b[start * 2..].chunks_exact(2)) {
                    *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
            FloatData::Bytes(d, _) => unreachable!("FloatData built with non-float dtype {d:?}"),
        }
    }
}

/// How the per-block scales are stored.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    /// (n_blocks,) f32: no double quantization.
    F32(Vec<f32>),
    /// Double quantization (specs/nf4.md §3).
    Double {
        /// (n_blocks,) u8 codes into [`DYNAMIC_SIGNED`].
        codes: Vec<u8>,
        /// (ceil(n_blocks / 256),) f32: max |absmax − offset| of each nested block.
        nested_absmax: Vec<f32>,
        /// mean of the original absmax vector, f32.
        offset: f32,
    },
}

/// Everything needed to dequantize a packed NF4 tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantState {
    /// Logical shape, e.g. `[out, in]` of a Linear weight.
    pub shape: Vec<usize>,
    /// QB: elements per absmax block.
    pub blocksize: usize,
    /// The original weight dtype, which is also the dtype dequantization produces.
    pub dtype: Dtype,
    pub absmax: Absmax,
}

impl QuantState {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn n_blocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize)
    }

    /// The per-block f32 scale; with double quantization reconstructed as specs/nf4.md §4:
    /// `f32(f32(map[q] · nested_absmax[b / 256]) + offset)`, two roundings, no FMA.
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::F32(a) => a.clone(),
            Absmax::Double { codes, nested_absmax, offset } => codes
                .iter()
                .enumerate()
                .map(|(b, &q)| {
                    let scaled = DYNAMIC_SIGNED[q as usize] * nested_absmax[b / NESTED_BLOCKSIZE];
                    scaled + offset
                })
                .collect(),
        }
    }

    /// Storage bytes of the quantization constants (absmax and nested tables, not the codes).
    pub fn constant_bytes(&self) -> usize {
        match &self.absmax {
            Absmax::F32(a) => 4 * a.len() + 4 * 16,
            Absmax::Double { codes, nested_absmax, .. } => {
                codes.len() + 4 * nested_absmax.len() + 4 * 16 + 4 * 256 + 4
            }
        }
    }

    /// Check internal consistency (lengths agree with shape and blocksize).
    pub fn validate(&self, tensor: &str) -> Result<()> {
        check_blocksize(self.blocksize)?;
        let n_blocks = self.n_blocks();
        let bad = |reason: String| Err(Nf4Error::BadTensor { tensor: tensor.into(), reason });
        match &self.absmax {
            Absmax::F32(a) if a.len() != n_blocks => {
                bad(format!("absmax has {} entries, shape {:?} with blocksize {} needs {n_blocks}", a.len(), self.shape, self.blocksize))
            }
            Absmax::Double { codes, nested_absmax, offset } => {
                if codes.len() != n_blocks {
                    return bad(format!("absmax codes have {} entries, shape {:?} with blocksize {} needs {n_blocks}", codes.len(), self.shape, self.blocksize));
                }
                let n_nested = n_blocks.div_ceil(NESTED_BLOCKSIZE);
                if nested_absmax.len() != n_nested {
                    return bad(format!("nested_absmax has {} entries, {n_blocks} blocks need {n_nested}", nested_absmax.len()));
                }
                if !offset.is_finite() || nested_absmax.iter().any(|v| !v.is_finite()) {
                    return bad("non-finite double-quantization constants".into());
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// A packed NF4 tensor and its quantization state.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Tensor {
    /// ((n + 1) / 2,) u8: `byte[k] = code[2k] << 4 | code[2k + 1]`; odd n pads with code 7.
    pub packed: Vec<u8>,
    pub state: QuantState,
}

impl Nf4Tensor {
    /// Quantize f32 values (see [`Nf4Tensor::quantize_data`]).
    pub fn quantize(
        name: &str,
        x: &[f32],
        shape: &[usize],
        blocksize: usize,
        double_quant: bool,
        dtype: Dtype,
    ) -> Result<Nf4Tensor> {
        Self::quantize_data(name, FloatData::F32(x), shape, blocksize, double_quant, dtype)
    }

    /// Quantize a tensor blockwise to NF4 (specs/nf4.md §2), optionally double-quantizing the
    /// absmax vector (§3). `name` is used in errors only: NaN/Inf is refused with its index
    /// (bitsandbytes silently writes garbage there).
    pub fn quantize_data(
        name: &str,
        x: FloatData<'_>,
        shape: &[usize],
        blocksize: usize,
        double_quant: bool,
        dtype: Dtype,
    ) -> Result<Nf4Tensor> {
        check_blocksize(blocksize)?;
        let n = x.len();
        if shape.iter().product::<usize>() != n {
            return Err(Nf4Error::BadTensor {
                tensor: name.into(),
                reason: format!("shape {shape:?} does not match {n} elements"),
            });
        }
        let (packed, absmax) = quantize_blockwise(name, x, blocksize)?;
        let absmax = if double_quant { double_quantize(&absmax) } else { Absmax::F32(absmax) };
        Ok(Nf4Tensor { packed, state: QuantState { shape: shape.to_vec(), blocksize, dtype, absmax } })
    }

    pub fn shape(&self) -> &[usize] {
        &self.state.shape
    }

    pub fn numel(&self) -> usize {
        self.state.numel()
    }

    /// Dequantize to f32: `w[e] = f32(NF4[code(e)] · absmax[e / blocksize])`, exact.
    pub fn dequantize_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.dequantize_into(&mut out, |v| v);
        out
    }

    /// Dequantize to bf16, rounding the f32 product once (round-to-nearest-even).
    pub fn dequantize_bf16(&self) -> Vec<bf16> {
        let mut out = vec![bf16::ZERO; self.numel()];
        self.dequantize_into(&mut out, bf16::from_f32);
        out
    }

    /// Dequantize to f16, rounding the f32 product once.
    pub fn dequantize_f16(&self) -> Vec<f16> {
        let mut out = vec![f16::ZERO; self.numel()];
        self.dequantize_into(&mut out, f16::from_f32);
        out
    }

    /// Dequantize to `dtype` (f32, bf16 or f16) as little-endian bytes.
    pub fn dequantize_bytes(&self, dtype: Dtype) -> Result<Vec<u8>> {
        Ok(match dtype {
            Dtype::F32 => bytemuck::cast_slice(&self.dequantize_f32()).to_vec(),
            Dtype::BF16 => bytemuck::cast_slice(&self.dequantize_bf16()).to_vec(),
            Dtype::F16 => bytemuck::cast_slice(&self.dequantize_f16()).to_vec(),
            other => {
                return Err(Nf4Error::BadTensor {
                    tensor: String::new(),
                    reason: format!("cannot dequantize to {}", other.torch_name()),
                })
            }
        })
    }

    /// Shared dequantization loop: per block a 16-entry table of `NF4[c] · absmax` (the same
    /// f32 products as element by element), then one table look-up per nibble.
    fn dequantize_into<T: Copy + Send + Sync>(&self, out: &mut [T], round: impl Fn(f32) -> T + Sync) {
        let bs = self.state.blocksize;
        let n = out.len();
        let absmax = self.state.absmax_f32();
        let task = bs * BLOCKS_PER_TASK;
        out.par_chunks_mut(task).enumerate().for_each(|(t, chunk)| {
            let first_block = t * BLOCKS_PER_TASK;
            for (j, block) in chunk.chunks_mut(bs).enumerate() {
                let scale = absmax[first_block + j];
                let lut: [T; 16] = std::array::from_fn(|c| round(NF4[c] * scale));
                let start = (first_block + j) * bs; // always even: blocksizes are even
                let bytes = &self.packed[start / 2..(start + block.len()).div_ceil(2)];
                let mut pairs = block.chunks_exact_mut(2);
                for (pair, &byte) in (&mut pairs).zip(bytes) {
                    pair[0] = lut[(byte >> 4) as usize];
                    pair[1] = lut[(byte & 0x0f) as usize];
                }
                if let [last] = pairs.into_remainder() {
                    *last = lut[(bytes[bytes.len() - 1] >> 4) as usize];
                }
            }
        });
        debug_assert_eq!(n, self.numel());
    }
}

/// Blockwise 4-bit quantization (specs/nf4.md §2). Returns (packed, absmax):
/// packed ((n + 1) / 2,) u8, absmax (ceil(n / blocksize),) f32.
pub fn quantize_blockwise(name: &str, x: FloatData<'_>, blocksize: usize) -> Result<(Vec<u8>, Vec<f32>)> {
    check_blocksize(blocksize)?;
    let n = x.len();
    let n_blocks = n.div_ceil(blocksize);
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; n_blocks];
    let task_bytes = blocksize / 2 * BLOCKS_PER_TASK;
    packed
        .par_chunks_mut(task_bytes)
        .zip(absmax.par_chunks_mut(BLOCKS_PER_TASK))
        .enumerate()
        .try_for_each_init(
            || vec![0f32; blocksize],
            |buf, (t, (bytes, scales))| {
                let first_block = t * BLOCKS_PER_TASK;
                for (j, scale) in scales.iter_mut().enumerate() {
                    let start = (first_block + j) * blocksize;
                    let len = blocksize.min(n - start);
                    let vals = &mut buf[..len];
                    x.fill(start, vals);
                    let block_bytes = &mut bytes[j * blocksize / 2..(j * blocksize + len).div_ceil(2)];
                    *scale = quantize_block(name, start, vals, len < blocksize, block_bytes)?;
                }
                Ok(())
            },
        )?;
    Ok((packed, absmax))
}

/// Quantize one block into `out` ((len + 1) / 2 bytes) and return its absmax.
/// `partial_tail`: bitsandbytes' CPU path (which made the reference vectors) divides by absmax
/// in a partial tail block instead of multiplying by the reciprocal.
#[inline]
fn quantize_block(name: &str, start: usize, vals: &[f32], partial_tail: bool, out: &mut [u8]) -> Result<f32> {
    // `v * 0` is NaN exactly for NaN and ±Inf, so one vectorizable sum finds any bad element.
    let mut absmax = 0f32;
    let mut poison = 0f32;
    for &v in vals {
        absmax = absmax.max(v.abs());
        poison += v * 0.0;
    }
    if poison.is_nan() {
        let (i, &value) = vals.iter().enumerate().find(|(_, v)| !v.is_finite()).expect("poisoned block has a non-finite value");
        return Err(Nf4Error::NonFinite { tensor: name.into(), index: start + i, value });
    }
    if absmax == 0.0 {
        // All-zero block: bitsandbytes' CPU reference stores code 7 (0.0) everywhere and absmax
        // 0; its CUDA kernel stores 0x00. Both dequantize to zero; we follow the CPU.
        out.fill(NF4_ZERO_CODE << 4 | NF4_ZERO_CODE);
        return Ok(0.0);
    }
    let recip = 1.0 / absmax;
    // For absmax below ~2^-127 the reciprocal overflows; dividing keeps such blocks meaningful.
    let divide = partial_tail || !recip.is_finite();
    let code = |v: f32| if divide { nf4_code(v / absmax) } else { nf4_code(v * recip) };
    let mut pairs = vals.chunks_exact(2);
    for (byte, p) in out.iter_mut().zip(&mut pairs) {
        *byte = code(p[0]) << 4 | code(p[1]);
    }
    if let [last] = pairs.remainder() {
        // Odd total length: the final low nibble is padding holding the code of 0.0.
        out[out.len() - 1] = code(*last) << 4 | NF4_ZERO_CODE;
    }
    Ok(absmax)
}

/// Double quantization of the absmax vector (specs/nf4.md §3): subtract the f32 mean, then
/// 8-bit blockwise quantization (blocks of 256) against the signed dynamic map with exact
/// nearest rounding (bitsandbytes' CPU path is approximately nearest: ±1 code on ~0.5 %).
pub fn double_quantize(absmax: &[f32]) -> Absmax {
    let offset = mean_f32(absmax);
    let mut codes = vec![0u8; absmax.len()];
    let nested_absmax: Vec<f32> = absmax
        .chunks(NESTED_BLOCKSIZE)
        .zip(codes.chunks_mut(NESTED_BLOCKSIZE))
        .map(|(block, out)| {
            let centred: Vec<f32> = block.iter().map(|a| a - offset).collect();
            let m = centred.iter().fold(0f32, |m, c| m.max(c.abs()));
            if m == 0.0 {
                // Every absmax of this nested block equals the mean (e.g. a one-block tensor).
                // Any code reconstructs `±0 + offset = offset` exactly; bitsandbytes' 0/0 = NaN
                // picks code 0, so we store 0 too and stay byte-identical.
                out.fill(0);
                return 0.0;
            }
            let recip = 1.0 / m;
            let partial_tail = block.len() < NESTED_BLOCKSIZE;
            for (o, c) in out.iter_mut().zip(&centred) {
                let v = if partial_tail || !recip.is_finite() { c / m } else { c * recip };
                *o = nearest_code(&DYNAMIC_SIGNED, v);
            }
            m
        })
        .collect();
    Absmax::Double { codes, nested_absmax, offset }
}

/// The f32 mean torch computes for `absmax.mean()` on a CPU float tensor. The sum is
/// accumulated in f64 and rounded once, then divided in f32; see the tests for the check
/// against every bitsandbytes reference vector.
pub fn mean_f32(x: &[f32]) -> f32 {
    if x.is_empty() {
        return 0.0;
    }
    let sum: f64 = x.iter().map(|&v| v as f64).sum();
    (sum as f32) / (x.len() as f32)
}
