//! NF4 on the device: upload, dequantize (bit-exact with `qlora_nf4`), quantize-on-load.
//! Kernels: `cuda/nf4.cu`.

use super::{check_float, check_len_mut, entry};
use crate::device::{cdiv, Args, Buf, Device, Elem, Geometry, Stream, View, ViewMut};
use crate::error::{bad_arg, CudaError, Result};
use qlora_nf4::{Absmax, Nf4Tensor};

const FILE: &str = "nf4.cu";

/// Per-block scales of a device NF4 tensor.
pub enum Nf4Scales {
    /// (n_blocks,) f32.
    F32(Buf<f32>),
    /// Double quant: (n_blocks,) u8 codes, (ceil(n_blocks/256),) f32 nested absmax, f32 offset.
    Double {
        codes: Buf<u8>,
        nested: Buf<f32>,
        offset: f32,
    },
}

/// A frozen NF4 weight on the device; `shape` is the logical `[out, in]` (any rank allowed for
/// dequantize; linear ops need rank 2).
pub struct Nf4Weight {
    /// ((n + 1) / 2,) u8, first element in the high nibble.
    pub packed: Buf<u8>,
    pub scales: Nf4Scales,
    pub shape: Vec<usize>,
    /// QB.
    pub blocksize: usize,
}

/// Kernel-side view of an NF4 tensor; mirrors `struct QlrNf4` in cuda/common.cuh (48 bytes,
/// checked there by static_assert and here below).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Nf4Arg {
    pub packed: u64,
    pub absmax: u64,
    pub codes: u64,
    pub nested: u64,
    pub dyn_map: u64,
    pub offset: f32,
    pub blocksize: i32,
}
const _: () = assert!(std::mem::size_of::<Nf4Arg>() == 48);

impl Nf4Weight {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn n_blocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize)
    }

    /// Upload a CPU tensor (`name` is used in errors).
    pub fn upload(dev: &Device, t: &Nf4Tensor, name: &str) -> Result<Nf4Weight> {
        let n: usize = t.state.shape.iter().product();
        // Scale-table lengths, blocksize and finite constants: the kernels index them unchecked.
        t.state
            .validate(name)
            .map_err(|e| bad_arg("nf4::upload", name, e.to_string()))?;
        if t.packed.len() != n.div_ceil(2)
            || !t.state.blocksize.is_multiple_of(16)
            || t.state.blocksize == 0
        {
            return Err(bad_arg(
                "nf4::upload",
                name,
                "packed length or blocksize inconsistent with the shape",
            ));
        }
        let scales = match &t.state.absmax {
            Absmax::F32(a) => Nf4Scales::F32(dev.upload(a, name)?),
            Absmax::Double {
                codes,
                nested_absmax,
                offset,
            } => Nf4Scales::Double {
                codes: dev.upload(codes, name)?,
                nested: dev.upload(nested_absmax, name)?,
                offset: *offset,
            },
        };
        Ok(Nf4Weight {
            packed: dev.upload(&t.packed, name)?,
            scales,
            shape: t.state.shape.clone(),
            blocksize: t.state.blocksize,
        })
    }

    /// The kernel argument (the dynamic map is the device's shared copy).
    pub fn arg(&self, dyn_map: &View<'_, f32>) -> Nf4Arg {
        let (absmax, codes, nested, offset) = match &self.scales {
            Nf4Scales::F32(a) => (a.view().device_ptr(), 0, 0, 0.0),
            Nf4Scales::Double {
                codes,
                nested,
                offset,
            } => (
                0,
                codes.view().device_ptr(),
                nested.view().device_ptr(),
                *offset,
            ),
        };
        Nf4Arg {
            packed: self.packed.view().device_ptr(),
            absmax,
            codes,
            nested,
            dyn_map: dyn_map.device_ptr(),
            offset,
            blocksize: self.blocksize as i32,
        }
    }
}

/// dequant: one thread per 16 elements (8 packed bytes), 256 threads per block.
pub fn dequant_geometry(n: usize) -> Geometry {
    Geometry {
        grid: (cdiv(cdiv(n, 16), 256).max(1) as u32, 1, 1),
        block: (256, 1, 1),
        smem: 0,
    }
}
/// quantize: one warp per QB block, 8 warps per block.
pub fn quantize_geometry(n_blocks: usize) -> Geometry {
    Geometry {
        grid: (cdiv(n_blocks, 8).max(1) as u32, 1, 1),
        block: (256, 1, 1),
        smem: 0,
    }
}
/// double quant: one 256-thread block per nested block of 256 scales.
pub fn double_quant_geometry(n_blocks: usize) -> Geometry {
    Geometry {
        grid: (cdiv(n_blocks, 256).max(1) as u32, 1, 1),
        block: (256, 1, 1),
        smem: 0,
    }
}

/// `out = deq(w)` as T (f32: exact product; bf16: one rounding). `out` must be 16-byte aligned
/// (any `Buf` is; a slice must start at a multiple of 16 bytes).
pub fn dequant_fwd<T: Elem>(
    dev: &Device,
    out: &mut ViewMut<'_, T>,
    w: &Nf4Weight,
    stream: Option<&Stream>,
) -> Result<()> {
    const OP: &str = "nf4::dequant_fwd";
    check_float::<T>(OP)?;
    let n = w.numel();
    check_len_mut(OP, "out", out, n)?;
    if !out.device_ptr().is_multiple_of(16) {
        return Err(bad_arg(OP, "out", "must be 16-byte aligned"));
    }
    let map = dev.dynamic_map()?;
    let args = Args::new()
        .ptr_mut(out)
        .arg(w.arg(&map.view()))
        .arg(n as i64);
    dev.launch(
        FILE,
        &entry::<T>("qlr_nf4_dequant_fwd"),
        dequant_geometry(n),
        args,
        stream,
    )
}

/// Quantize-on-load: `x` (any dtype the kernels take) → NF4 with blocksize `qb`, optionally
/// double-quantized. Byte-exact with `Nf4Tensor::quantize` for the packed codes and f32 scales;
/// the nested offset is computed on the host with `qlora_nf4::quant::mean_f32` (same f64 sum).
/// Non-finite input gives `CudaError::NonFinite` naming `name`.
pub fn quantize_fwd<T: Elem>(
    dev: &Device,
    x: &View<'_, T>,
    shape: &[usize],
    qb: usize,
    double_quant: bool,
    name: &str,
) -> Result<Nf4Weight> {
    const OP: &str = "nf4::quantize_fwd";
    check_float::<T>(OP)?;
    let n: usize = shape.iter().product();
    if x.len() != n {
        return Err(bad_arg(
            OP,
            name,
            format!("has {} elements, shape {shape:?} needs {n}", x.len()),
        ));
    }
    qlora_nf4::quant::check_blocksize(qb).map_err(|e| bad_arg(OP, "blocksize", e.to_string()))?;
    let n_blocks = n.div_ceil(qb);
    let mut packed = dev.alloc::<u8>(n.div_ceil(2), name)?;
    let mut absmax = dev.alloc::<f32>(n_blocks, name)?;
    let mut bad = dev.zeros::<i32>(1, "nf4 quantize flag")?;
    let args = Args::new()
        .ptr_mut(&packed.view_mut())
        .ptr_mut(&absmax.view_mut())
        .ptr_mut(&bad.view_mut())
        .ptr(x)
        .arg(n as i64)
        .arg(qb as i32);
    dev.launch(
        FILE,
        &entry::<T>("qlr_nf4_quantize_fwd"),
        quantize_geometry(n_blocks),
        args,
        None,
    )?;
    let count = dev.download(&bad.view())?[0];
    if count != 0 {
        return Err(CudaError::NonFinite {
            op: OP.into(),
            tensor: name.into(),
            count,
        });
    }
    let scales = if double_quant {
        let host = dev.download(&absmax.view())?;
        let offset = qlora_nf4::quant::mean_f32(&host);
        let mut codes = dev.alloc::<u8>(n_blocks, name)?;
        let mut nested = dev.alloc::<f32>(n_blocks.div_ceil(256), name)?;
        let map = dev.dynamic_map()?;
        let args = Args::new()
            .ptr_mut(&codes.view_mut())
            .ptr_mut(&nested.view_mut())
            .ptr(&absmax.view())
            .ptr(&map.view())
            .arg(offset)
            .arg(n_blocks as i64);
        dev.launch(
            FILE,
            "qlr_nf4_double_quant_fwd_f32",
            double_quant_geometry(n_blocks),
            args,
            None,
        )?;
        Nf4Scales::Double {
            codes,
            nested,
            offset,
        }
    } else {
        Nf4Scales::F32(absmax)
    };
    Ok(Nf4Weight {
        packed,
        scales,
        shape: shape.to_vec(),
        blocksize: qb,
    })
}

/// Download a device NF4 tensor into the CPU type (for checkpoints and tests).
pub fn download(dev: &Device, w: &Nf4Weight, dtype: qlora_nf4::Dtype) -> Result<Nf4Tensor> {
    let absmax = match &w.scales {
        Nf4Scales::F32(a) => Absmax::F32(dev.download(&a.view())?),
        Nf4Scales::Double {
            codes,
            nested,
            offset,
        } => Absmax::Double {
            codes: dev.download(&codes.view())?,
            nested_absmax: dev.download(&nested.view())?,
            offset: *offset,
        },
    };
    Ok(Nf4Tensor {
        packed: dev.download(&w.packed.view())?,
        state: qlora_nf4::QuantState {
            shape: w.shape.clone(),
            blocksize: w.blocksize,
            dtype,
            absmax,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dequant_covers_every_element_once() {
        for n in [1usize, 15, 16, 17, 4096, 4097, 4096 * 14336] {
            let g = dequant_geometry(n);
            let threads = g.grid.0 as usize * g.block.0 as usize;
            assert!(threads * 16 >= n, "n {n}");
            assert!(
                (threads - 256) * 16 < n.max(1),
                "at most one partly idle block for n {n}"
            );
        }
    }

    #[test]
    fn quantize_has_one_warp_per_block() {
        for nb in [1usize, 7, 8, 9, 1000] {
            let g = quantize_geometry(nb);
            assert!(g.grid.0 as usize * 8 >= nb);
            assert!((g.grid.0 as usize - 1) * 8 < nb);
            let g = double_quant_geometry(nb);
            assert_eq!(g.grid.0 as usize, nb.div_ceil(256));
        }
    }
}
