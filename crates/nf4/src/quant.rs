//! Blockwise NF4 quantization, double quantization of the absmax constants, dequantization.
//!
//! The exact rules are specs/nf4.md §2–4; each function below cites the rule it implements.
//! Everything is f32 arithmetic in a fixed order so results are bit-identical to bitsandbytes.

use crate::codebook::{nearest_code, DYNAMIC_SIGNED, NF4, NF4_ZERO_CODE};
use crate::{Dtype, Nf4Error, Result};
use half::{bf16, f16};
use rayon::prelude::*;

/// Defines `fn $name` that runs `$imp` compiled for the widest vector unit the CPU has (checked
/// at run time): AVX-512 (16 f32 lanes), else AVX2 (8), else the x86-64 baseline (SSE2, 4). The
/// hot loops are written to auto-vectorize, so lane count is most of their speed.
macro_rules! simd_dispatch {
    ($(#[$m:meta])* fn $name:ident $(<$g:ident: $bound:path>)? ($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $imp:ident) => {
        $(#[$m])*
        fn $name $(<$g: $bound>)? ($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
                unsafe fn avx512 $(<$g: $bound>)? ($($arg: $ty),*) $(-> $ret)? {
                    $imp($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2 $(<$g: $bound>)? ($($arg: $ty),*) $(-> $ret)? {
                    $imp($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU supports these features (checked just above).
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2 (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $imp($($arg),*)
        }
    };
}

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
            Absmax::Double {
                codes,
                nested_absmax,
                offset,
            } => codes
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
            Absmax::Double {
                codes,
                nested_absmax,
                ..
            } => codes.len() + 4 * nested_absmax.len() + 4 * 16 + 4 * 256 + 4,
        }
    }

    /// Check internal consistency (lengths agree with shape and blocksize).
    pub fn validate(&self, tensor: &str) -> Result<()> {
        check_blocksize(self.blocksize)?;
        let n_blocks = self.n_blocks();
        let bad = |reason: String| {
            Err(Nf4Error::BadTensor {
                tensor: tensor.into(),
                reason,
            })
        };
        match &self.absmax {
            Absmax::F32(a) if a.len() != n_blocks => bad(format!(
                "absmax has {} entries, shape {:?} with blocksize {} needs {n_blocks}",
                a.len(),
                self.shape,
                self.blocksize
            )),
            Absmax::Double {
                codes,
                nested_absmax,
                offset,
            } => {
                if codes.len() != n_blocks {
                    return bad(format!("absmax codes have {} entries, shape {:?} with blocksize {} needs {n_blocks}", codes.len(), self.shape, self.blocksize));
                }
                let n_nested = n_blocks.div_ceil(NESTED_BLOCKSIZE);
                if nested_absmax.len() != n_nested {
                    return bad(format!(
                        "nested_absmax has {} entries, {n_blocks} blocks need {n_nested}",
                        nested_absmax.len()
                    ));
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
        Self::quantize_data(
            name,
            FloatData::F32(x),
            shape,
            blocksize,
            double_quant,
            dtype,
        )
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
        let absmax = if double_quant {
            double_quantize(&absmax)
        } else {
            Absmax::F32(absmax)
        };
        Ok(Nf4Tensor {
            packed,
            state: QuantState {
                shape: shape.to_vec(),
                blocksize,
                dtype,
                absmax,
            },
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.state.shape
    }

    pub fn numel(&self) -> usize {
        self.state.numel()
    }

    /// Dequantize to f32: `w[e] = f32(NF4[code(e)] · absmax[e / blocksize])`, exact.
    pub fn dequantize_f32(&self) -> Vec<f32> {
        self.dequantize_vec()
    }

    /// Dequantize to bf16, rounding the f32 product once (round-to-nearest-even).
    pub fn dequantize_bf16(&self) -> Vec<bf16> {
        self.dequantize_vec()
    }

    /// Dequantize to f16, rounding the f32 product once.
    pub fn dequantize_f16(&self) -> Vec<f16> {
        self.dequantize_vec()
    }

    /// Dequantize into a caller's buffer of exactly `numel` elements (f32, bf16 or f16), so hot
    /// loops (the CPU backend, merge) reuse memory instead of faulting in a new buffer each time.
    pub fn dequantize_into<T: Dequant>(&self, out: &mut [T]) -> Result<()> {
        if out.len() != self.numel() {
            return Err(Nf4Error::BadTensor {
                tensor: String::new(),
                reason: format!(
                    "output has {} elements, tensor {:?} has {}",
                    out.len(),
                    self.shape(),
                    self.numel()
                ),
            });
        }
        // SAFETY: every `T: Dequant` is a plain float type; a `&mut [T]` is a valid
        // `&mut [MaybeUninit<T>]` we only write through.
        let out = unsafe { &mut *(out as *mut [T] as *mut [std::mem::MaybeUninit<T>]) };
        self.dequantize_uninit(out);
        Ok(())
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

    fn dequantize_vec<T: Dequant>(&self) -> Vec<T> {
        let n = self.numel();
        let mut out: Vec<T> = Vec::with_capacity(n);
        advise_huge_pages(out.spare_capacity_mut());
        self.dequantize_uninit(&mut out.spare_capacity_mut()[..n]);
        // SAFETY: dequantize_uninit wrote all n elements.
        unsafe { out.set_len(n) };
        out
    }

    /// Shared dequantization loop: per block a 16-entry table of `NF4[c] · absmax` (the same
    /// f32 products, rounded once, as element by element), then one table look-up per nibble.
    /// Writes every element of `out`.
    fn dequantize_uninit<T: Dequant>(&self, out: &mut [std::mem::MaybeUninit<T>]) {
        let bs = self.state.blocksize;
        let absmax = self.state.absmax_f32();
        out.par_chunks_mut(bs * BLOCKS_PER_TASK)
            .enumerate()
            .for_each(|(t, chunk)| {
                let first_block = t * BLOCKS_PER_TASK;
                let start = first_block * bs; // even: blocksizes are even
                let bytes = &self.packed[start / 2..(start + chunk.len()).div_ceil(2)];
                let scales = &absmax[first_block..first_block + chunk.len().div_ceil(bs)];
                dequantize_task(chunk, bytes, scales, bs);
            });
    }
}

/// Ask the kernel to back a large fresh buffer with transparent huge pages (as PyTorch's CPU
/// allocator does): first-touch page faults otherwise dominate dequantizing into a new buffer.
/// Advice only; failure (no THP, small or misaligned buffer) changes nothing.
fn advise_huge_pages<T>(buf: &mut [std::mem::MaybeUninit<T>]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = buf.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(buf);
        let (a, b) = (start.div_ceil(HUGE) * HUGE, end / HUGE * HUGE);
        if b > a {
            // SAFETY: [a, b) lies inside `buf`'s allocation; MADV_HUGEPAGE changes no contents.
            unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// Output element types of dequantization: f32 (exact), bf16 and f16 (one rounding).
pub trait Dequant: Copy + Send + Sync + 'static {
    fn round(v: f32) -> Self;
}

impl Dequant for f32 {
    #[inline(always)]
    fn round(v: f32) -> f32 {
        v
    }
}

impl Dequant for bf16 {
    #[inline(always)]
    fn round(v: f32) -> bf16 {
        bf16::from_f32(v)
    }
}

impl Dequant for f16 {
    #[inline(always)]
    fn round(v: f32) -> f16 {
        f16::from_f32(v)
    }
}

simd_dispatch! {
    /// Dequantize the blocks of one task.
    fn dequantize_task<T: Dequant>(
        out: &mut [std::mem::MaybeUninit<T>],
        bytes: &[u8],
        scales: &[f32],
        bs: usize
    ) => dequantize_task_impl
}

#[inline(always)]
fn dequantize_task_impl<T: Dequant>(
    out: &mut [std::mem::MaybeUninit<T>],
    bytes: &[u8],
    scales: &[f32],
    bs: usize,
) {
    for ((block, scale), block_bytes) in out.chunks_mut(bs).zip(scales).zip(bytes.chunks(bs / 2)) {
        let lut: [T; 16] = std::array::from_fn(|c| T::round(NF4[c] * scale));
        let mut pairs = block.chunks_exact_mut(2);
        for (pair, &byte) in (&mut pairs).zip(block_bytes) {
            pair[0].write(lut[(byte >> 4) as usize]);
            pair[1].write(lut[(byte & 0x0f) as usize]);
        }
        if let [last] = pairs.into_remainder() {
            last.write(lut[(block_bytes[block_bytes.len() - 1] >> 4) as usize]);
        }
    }
}

/// Blockwise 4-bit quantization (specs/nf4.md §2). Returns (packed, absmax):
/// packed ((n + 1) / 2,) u8, absmax (ceil(n / blocksize),) f32.
pub fn quantize_blockwise(
    name: &str,
    x: FloatData<'_>,
    blocksize: usize,
) -> Result<(Vec<u8>, Vec<f32>)> {
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
            || Scratch {
                vals: vec![0f32; blocksize],
                codes: vec![0i32; blocksize],
            },
            |scratch, (t, (bytes, scales))| {
                let first = t * BLOCKS_PER_TASK * blocksize;
                match quantize_task(x, first, blocksize, scratch, bytes, scales) {
                    Ok(()) => Ok(()),
                    Err(index) => {
                        let value = element(x, index);
                        Err(Nf4Error::NonFinite {
                            tensor: name.into(),
                            index,
                            value,
                        })
                    }
                }
            },
        )?;
    Ok((packed, absmax))
}

/// Per-thread buffers of one block: the widened values and their 4-bit codes.
struct Scratch {
    vals: Vec<f32>,
    codes: Vec<i32>,
}

fn element(x: FloatData<'_>, index: usize) -> f32 {
    let mut v = [0f32];
    x.fill(index, &mut v);
    v[0]
}

simd_dispatch! {
    /// Quantize the blocks of one task (elements `first..` covering `scales.len()` blocks). On a
    /// non-finite input returns the global index of the first one.
    fn quantize_task(
        x: FloatData<'_>,
        first: usize,
        blocksize: usize,
        scratch: &mut Scratch,
        bytes: &mut [u8],
        scales: &mut [f32]
    ) -> std::result::Result<(), usize> => quantize_task_impl
}

#[inline(always)]
fn quantize_task_impl(
    x: FloatData<'_>,
    first: usize,
    blocksize: usize,
    scratch: &mut Scratch,
    bytes: &mut [u8],
    scales: &mut [f32],
) -> std::result::Result<(), usize> {
    let n = x.len();
    for (j, scale) in scales.iter_mut().enumerate() {
        let start = first + j * blocksize;
        let len = blocksize.min(n - start);
        let vals = &mut scratch.vals[..len];
        x.fill(start, vals);
        let out = &mut bytes[j * blocksize / 2..(j * blocksize + len).div_ceil(2)];
        *scale = quantize_block(vals, &mut scratch.codes[..len], len < blocksize, out)
            .map_err(|i| start + i)?;
    }
    Ok(())
}

/// Quantize one block in place into `out` ((len + 1) / 2 bytes) and return its absmax, or the
/// index of the first non-finite value. `partial_tail`: bitsandbytes' CPU path (which made the
/// reference vectors) divides by absmax in a partial tail block instead of multiplying by the
/// reciprocal. `vals` is overwritten with the normalized values.
#[inline(always)]
fn quantize_block(
    vals: &mut [f32],
    codes: &mut [i32],
    partial_tail: bool,
    out: &mut [u8],
) -> std::result::Result<f32, usize> {
    // absmax and the NaN/Inf check on the bit patterns: for finite values |x| orders like its
    // bits, and integer max/or reductions vectorize where float ones (strict order) do not.
    const EXP: u32 = 0x7f80_0000;
    let mut max_bits = [0u32; 8];
    let mut bad = [0u32; 8];
    let mut chunks = vals.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            let b = c[l].to_bits() & 0x7fff_ffff;
            max_bits[l] = max_bits[l].max(b);
            bad[l] |= ((b & EXP) == EXP) as u32;
        }
    }
    for &v in chunks.remainder() {
        let b = v.to_bits() & 0x7fff_ffff;
        max_bits[0] = max_bits[0].max(b);
        bad[0] |= ((b & EXP) == EXP) as u32;
    }
    if bad.iter().any(|&b| b != 0) {
        return Err(vals
            .iter()
            .position(|v| !v.is_finite())
            .expect("a non-finite value"));
    }
    let absmax = f32::from_bits(*max_bits.iter().max().unwrap());
    if absmax == 0.0 {
        // All-zero block: bitsandbytes' CPU reference stores code 7 (0.0) everywhere and absmax
        // 0; its CUDA kernel stores 0x00. Both dequantize to zero; we follow the CPU.
        out.fill(NF4_ZERO_CODE << 4 | NF4_ZERO_CODE);
        return Ok(0.0);
    }
    let recip = 1.0 / absmax;
    // For absmax below ~2^-127 the reciprocal overflows; dividing keeps such blocks meaningful.
    if partial_tail || !recip.is_finite() {
        vals.iter_mut().for_each(|v| *v /= absmax);
    } else {
        vals.iter_mut().for_each(|v| *v *= recip);
    }
    // code = number of thresholds strictly below the value (see codebook::nf4_code), counted
    // threshold by threshold so each pass is one vector compare-and-subtract per 8 values.
    codes.fill(0);
    for t in crate::codebook::NF4_THRESHOLDS {
        for (c, v) in codes.iter_mut().zip(vals.iter()) {
            *c += (*v > t) as i32;
        }
    }
    let mut pairs = codes.chunks_exact(2);
    for (byte, p) in out.iter_mut().zip(&mut pairs) {
        *byte = ((p[0] << 4) | p[1]) as u8;
    }
    if let [last] = pairs.remainder() {
        // Odd total length: the final low nibble is padding holding the code of 0.0.
        out[out.len() - 1] = ((*last as u8) << 4) | NF4_ZERO_CODE;
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
                let v = if partial_tail || !recip.is_finite() {
                    c / m
                } else {
                    c * recip
                };
                *o = nearest_code(&DYNAMIC_SIGNED, v);
            }
            m
        })
        .collect();
    Absmax::Double {
        codes,
        nested_absmax,
        offset,
    }
}

/// The f32 mean torch computes for `absmax.mean()` on a CPU float tensor: `sum(x) / n`, where
/// `sum` is ATen's vectorized cascade sum (aten/src/ATen/native/cpu/SumKernel.cpp,
/// `vectorized_inner_sum` → `row_sum` → `multi_row_sum`), reproduced operation by operation
/// because the double-quant offset must be bit-identical to bitsandbytes'.
pub fn mean_f32(x: &[f32]) -> f32 {
    if x.is_empty() {
        return 0.0;
    }
    torch_sum_f32::<TORCH_VEC_LANES>(x) / (x.len() as f32)
}

/// f32 lanes of ATen's `Vectorized<float>` on the machine that made the reference checkpoints
/// (AVX2 → 8, AVX-512 → 16). Determined by the fixture tests, which check every reference offset.
pub const TORCH_VEC_LANES: usize = 8;

/// ATen's contiguous f32 sum with `W`-lane vectors. With n < W it is a plain left-to-right
/// scalar loop (`scalar_inner_sum` → `row_sum` with scalar loads and 4-way ILP).
pub fn torch_sum_f32<const W: usize>(x: &[f32]) -> f32 {
    if x.len() < W {
        // row_sum with scalar loads: 4 interleaved accumulators over rows of 4.
        let acc = multi_row_sum::<1>(x.len() / 4, |row, k| [x[row * 4 + k]]);
        let mut p = acc;
        for &v in &x[x.len() / 4 * 4..] {
            p[0][0] += v;
        }
        for k in 1..4 {
            p[0][0] += p[k][0];
        }
        return p[0][0];
    }
    let vec_size = x.len() / W;
    let load = |i: usize| -> [f32; W] { std::array::from_fn(|l| x[i * W + l]) };
    // row_sum over vectors: rows of 4 vectors (ILP factor 4).
    let size_ilp = vec_size / 4;
    let mut p = multi_row_sum::<W>(size_ilp, |row, k| load(row * 4 + k));
    for i in size_ilp * 4..vec_size {
        add_lanes(&mut p[0], &load(i));
    }
    for k in 1..4 {
        let pk = p[k];
        add_lanes(&mut p[0], &pk);
    }
    let mut fin = 0f32;
    for &v in &x[vec_size * W..] {
        fin += v;
    }
    for lane in p[0] {
        fin += lane;
    }
    fin
}

fn add_lanes<const W: usize>(a: &mut [f32; W], b: &[f32; W]) {
    for l in 0..W {
        a[l] += b[l];
    }
}

/// ATen's `multi_row_sum<acc, 4>`: four accumulator columns, cascaded over 4 levels every
/// 2^level_power rows so that long sums lose little precision. The index loops mirror the C++
/// loop for loop, which is what makes the rounding sequence reviewable against the source.
#[allow(clippy::needless_range_loop)]
fn multi_row_sum<const W: usize>(
    size: usize,
    row: impl Fn(usize, usize) -> [f32; W],
) -> [[f32; W]; 4] {
    const LEVELS: usize = 4;
    let ceil_log2 = |v: usize| -> usize {
        if v <= 2 {
            1
        } else {
            (usize::BITS - (v - 1).leading_zeros()) as usize
        }
    };
    let level_power = 4usize.max(ceil_log2(size) / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; W]; 4]; LEVELS];
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            for k in 0..4 {
                add_lanes(&mut acc[0][k], &row(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..4 {
                let lower = acc[j - 1][k];
                add_lanes(&mut acc[j][k], &lower);
                acc[j - 1][k] = [0f32; W];
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for k in 0..4 {
            add_lanes(&mut acc[0][k], &row(i, k));
        }
        i += 1;
    }
    for j in 1..LEVELS {
        for k in 0..4 {
            let upper = acc[j][k];
            add_lanes(&mut acc[0][k], &upper);
        }
    }
    acc[0]
}
