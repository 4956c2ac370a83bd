//! `CudaBackend`: the [`Backend`] on one GPU, with the kernels of `qlora-cuda` (design §2).
//!
//! # Precision
//! bf16 activations and compute copies, f32 accumulation inside every kernel and GEMM. What
//! must stay exact or accumulate over steps is f32: the LoRA master weights and their
//! gradients (the adapter arenas, [`Backend::upload_f32`] / [`Backend::zeros_f32`]), and the
//! per-row statistics (rmsnorm rstd, logsumexp). Frozen NF4 weights stay NF4 on the device; the
//! fused linear dequantizes them inside its GEMM tiles, the dequantize-to-scratch + cuBLASLt
//! path into a bf16 scratch (`ops::linear::Dispatch` picks by row count).
//!
//! # Buffers
//! A [`CudaBuf`] is device bytes tagged with a [`Dtype`] and an element count: one handle type
//! holds both dtypes (the trait has one `Buf`). Each op checks the dtype of every buffer it is
//! handed (a mismatch is a typed error, never a reinterpretation), except attention's saved
//! buffer, which this backend defines as a packed f32 block (see
//! [`CudaBackend::attention_saved_len`]).
//!
//! # Errors
//! Op methods return nothing (the trait's contract): the FIRST launch, allocation or argument
//! error is kept (sticky, with the op's name), every later op is skipped while it is pending,
//! and [`Backend::synchronize`] returns it as [`TrainError::Device`]. Buffers that could not be
//! allocated while an error is pending hold no memory; `download` of one gives NaNs (the
//! pending error is what the caller must look at).
//!
//! # Allocation
//! Every buffer the schedule asks for (activations, saved buffers, gradients of activations)
//! goes through ONE private function, `CudaBackend::allocate`; an op's own temporaries
//! (dequantize scratch, bf16 LoRA copies, uploaded ids) through `CudaBackend::temporary`,
//! always from the caching pool. Before the first step the trainer reserves the step arena the
//! memory planner computed ([`CudaBackend::reserve_step_arena`], [`crate::plan`]): one device
//! allocation whose blocks are placed by the same deterministic [`ArenaPlanner`] the planner
//! ran over the same schedule, so the step's buffers land at the planned offsets and fit by
//! construction. What the plan did not model (an eval batch of another shape) takes a free gap
//! or, when none is large enough, the caching pool; those fallbacks are counted
//! ([`CudaBackend::arena_fallbacks`]). Blocks are freed on drop while kernels may still be
//! queued: every op runs on the one main stream, so reuse is stream-ordered, as with the pool.
//!
//! # Limits (typed errors, never wrong results)
//! Attention runs without a KV-cache offset (training and full-sequence evaluation: `Tq = Tk`);
//! generation with a KV cache stays on the CPU backend. LoRA rank ≤ 128 (the lora_proj tile).

mod linear;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use half::bf16;
use qlora_cuda::ops::{
    self, attention as g_attention, cross_entropy as g_ce, elementwise, embedding as g_emb,
    linear::Dispatch, nf4::Nf4Weight, residual, rmsnorm as g_rmsnorm, rope as g_rope,
    swiglu as g_swiglu,
};
use qlora_cuda::{CudaError, Device, Elem, View, ViewMut};

use crate::backend::{AttnDims, Backend, FrozenWeight, LinearDims, LoraArgs, RopeDims};
use crate::cpu::cross_entropy::IGNORE_INDEX;
use crate::error::{Result, TrainError};
use crate::plan::{ArenaPlanner, ARENA_ALIGN};

/// Result of the device-side work of one op.
type CResult<T> = std::result::Result<T, CudaError>;

/// Element type of a [`CudaBuf`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// Activations, frozen dense weights, norms, embeddings (the compute dtype).
    Bf16,
    /// LoRA master weights and gradients, per-row statistics, attention's saved block.
    F32,
    /// Token ids and labels uploaded per call.
    I32,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::Bf16 => 2,
            Dtype::F32 | Dtype::I32 => 4,
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Dtype::Bf16 => "bf16",
            Dtype::F32 => "f32",
            Dtype::I32 => "i32",
        }
    }
}

/// A device buffer of `len` elements of `dtype` (see the module docs).
pub struct CudaBuf {
    /// `len · dtype.size()` bytes from the step arena or the device pool; `None` only when the
    /// allocation failed (the error is pending on the backend).
    mem: Option<Mem>,
    len: usize,
    dtype: Dtype,
}

impl CudaBuf {
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Where a buffer's bytes live.
enum Mem {
    /// Its own allocation from the device's caching pool.
    Pool(qlora_cuda::Buf<u8>),
    /// A block of the step arena, returned to the arena's planner on drop.
    Arena(ArenaBlock),
}

/// Which allocation path a buffer takes (see [`CudaBackend::allocate`] and
/// [`CudaBackend::temporary`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    /// A buffer of the schedule: the step arena when reserved, else the pool.
    Step,
    /// An op's internal temporary: always the pool.
    Temporary,
}

/// One planned device allocation for the buffers of a training step.
struct StepArena {
    /// `(capacity,)` u8 on the device.
    mem: qlora_cuda::Buf<u8>,
    planner: Mutex<ArenaPlanner>,
}

struct ArenaBlock {
    arena: Arc<StepArena>,
    offset: usize,
}

impl Drop for ArenaBlock {
    fn drop(&mut self) {
        let mut p = self.arena.planner.lock().unwrap_or_else(|e| e.into_inner());
        p.free(self.offset);
    }
}

fn bad(op: &str, arg: &str, msg: impl Into<String>) -> CudaError {
    CudaError::BadArg {
        op: op.into(),
        arg: arg.into(),
        msg: msg.into(),
    }
}

/// The whole buffer as raw bytes.
fn raw<'a>(b: &'a CudaBuf, op: &str, arg: &str) -> CResult<View<'a, u8>> {
    let bytes = b.len * b.dtype.size();
    match b.mem.as_ref() {
        Some(Mem::Pool(m)) => Ok(m.view().slice(0, bytes)),
        Some(Mem::Arena(a)) => Ok(a.arena.mem.slice(a.offset, bytes)),
        None => Err(bad(op, arg, "holds no memory (its allocation failed)")),
    }
}
fn raw_mut<'a>(b: &'a mut CudaBuf, op: &str, arg: &str) -> CResult<ViewMut<'a, u8>> {
    let bytes = b.len * b.dtype.size();
    match b.mem.as_mut() {
        Some(Mem::Pool(m)) => Ok(m.slice_mut(0, bytes)),
        Some(Mem::Arena(a)) => {
            // SAFETY: the arena's planner hands out disjoint live blocks and this block is
            // owned by `b`, borrowed mutably here; freed blocks are reused only by work queued
            // later on the same stream.
            Ok(unsafe { a.arena.mem.slice_mut_shared(a.offset, bytes) })
        }
        None => Err(bad(op, arg, "holds no memory (its allocation failed)")),
    }
}
fn check_dtype<T: Elem>(b: &CudaBuf, op: &str, arg: &str) -> CResult<()> {
    if b.dtype.suffix() != T::SUFFIX {
        return Err(bad(
            op,
            arg,
            format!("is {}, the op needs {}", b.dtype.suffix(), T::SUFFIX),
        ));
    }
    Ok(())
}
/// Typed read-only view of the whole buffer (its dtype must be `T`).
fn view<'a, T: Elem>(b: &'a CudaBuf, op: &str, arg: &str) -> CResult<View<'a, T>> {
    check_dtype::<T>(b, op, arg)?;
    Ok(raw(b, op, arg)?.cast::<T>())
}
/// Typed writable view of the whole buffer (its dtype must be `T`).
fn view_mut<'a, T: Elem>(b: &'a mut CudaBuf, op: &str, arg: &str) -> CResult<ViewMut<'a, T>> {
    check_dtype::<T>(b, op, arg)?;
    Ok(raw_mut(b, op, arg)?.cast::<T>())
}
/// Elements `off..off+len` of a buffer of `T`, checked against its length.
fn slice<'a, T: Elem>(
    b: &'a CudaBuf,
    off: usize,
    len: usize,
    op: &str,
    arg: &str,
) -> CResult<View<'a, T>> {
    if off + len > b.len {
        return Err(bad(
            op,
            arg,
            format!("range {off}+{len} outside its {} elements", b.len),
        ));
    }
    Ok(view::<T>(b, op, arg)?.slice(off, len))
}

/// A frozen base linear on the device, `(out, in)` row-major.
pub enum CudaFrozen {
    /// NF4 codes and (double-quantized) scales, as loaded: never modified, never widened.
    Nf4 {
        w: Nf4Weight,
        /// The QuantState dtype (what dequantization produces; kept for downloads).
        dtype: qlora_nf4::Dtype,
    },
    /// Unquantized (`lm_head`, a dense base): `(out·in,)` bf16.
    Dense { w: CudaBuf, out: usize, inp: usize },
}

impl CudaFrozen {
    /// The NF4 weight as the CPU type, read back from the device (checkpoint hashing, merging).
    pub fn download_nf4(&self, be: &CudaBackend) -> Result<Option<qlora_nf4::Nf4Tensor>> {
        match self {
            CudaFrozen::Nf4 { w, dtype } => ops::nf4::download(&be.dev, w, *dtype)
                .map(Some)
                .map_err(|e| device_err("nf4::download", e)),
            CudaFrozen::Dense { .. } => Ok(None),
        }
    }
    /// `(out, in)`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            CudaFrozen::Nf4 { w, .. } => (w.shape[0], w.shape[1]),
            CudaFrozen::Dense { out, inp, .. } => (*out, *inp),
        }
    }
    /// Device bytes: NF4 codes + scales, or the bf16 matrix.
    pub fn device_bytes(&self) -> usize {
        match self {
            CudaFrozen::Nf4 { w, .. } => {
                let scales = match &w.scales {
                    ops::nf4::Nf4Scales::F32(a) => 4 * a.len(),
                    ops::nf4::Nf4Scales::Double { codes, nested, .. } => {
                        codes.len() + 4 * nested.len()
                    }
                };
                w.packed.len() + scales
            }
            CudaFrozen::Dense { w, .. } => 2 * w.len,
        }
    }
}

fn device_err(op: &str, e: CudaError) -> TrainError {
    TrainError::Device {
        op: op.to_string(),
        msg: e.to_string(),
    }
}

/// The CUDA backend (see the module docs).
pub struct CudaBackend {
    dev: Arc<Device>,
    dispatch: Dispatch,
    /// The first error since the last `synchronize` (sticky: later ops are skipped).
    error: Mutex<Option<TrainError>>,
    /// The planned step arena, once reserved.
    arena: Mutex<Option<Arc<StepArena>>>,
    /// Allocations the arena could not place (served by the pool instead).
    arena_fallbacks: AtomicUsize,
}

impl CudaBackend {
    /// Opens GPU 0. Never panics: no driver, no NVRTC/cuBLAS, no device or a too old one is
    /// [`TrainError::NoDevice`] with the reason.
    pub fn new() -> Result<CudaBackend> {
        let dev = Device::open(0).map_err(|e| TrainError::NoDevice(e.to_string()))?;
        Ok(CudaBackend::with_device(Arc::new(dev)))
    }

    /// On an already open device (shared with the optimizer and tests).
    pub fn with_device(dev: Arc<Device>) -> CudaBackend {
        CudaBackend {
            dev,
            dispatch: Dispatch::default(),
            error: Mutex::new(None),
            arena: Mutex::new(None),
            arena_fallbacks: AtomicUsize::new(0),
        }
    }

    /// Reserve the step arena: one device allocation of `bytes` (the planner's
    /// `arena_high_water`; the step's buffers replay its offsets exactly) from which every later
    /// [`Backend::zeros`]/[`Backend::upload`] is placed while it has room. Call it after the
    /// model and the adapter are resident (they are not step buffers) and before the first
    /// step. Reserving again replaces the arena (its live blocks keep the old one alive).
    pub fn reserve_step_arena(&self, bytes: usize) -> Result<()> {
        let mem = self
            .dev
            .alloc::<u8>(bytes.max(1), "step arena")
            .map_err(|e| TrainError::Device {
                op: "reserve_step_arena".into(),
                msg: e.to_string(),
            })?;
        *self.arena.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(StepArena {
            mem,
            planner: Mutex::new(ArenaPlanner::new()),
        }));
        Ok(())
    }

    /// Bytes of the reserved step arena (0 without one) and its high-water mark so far.
    pub fn step_arena_usage(&self) -> (usize, usize) {
        match &*self.arena.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(a) => (
                a.mem.len(),
                a.planner
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .high_water(),
            ),
            None => (0, 0),
        }
    }

    /// Allocations that did not fit the step arena and came from the caching pool.
    pub fn arena_fallbacks(&self) -> usize {
        self.arena_fallbacks.load(Ordering::Relaxed)
    }

    /// A block of `bytes` from the step arena, if one is reserved and has room.
    fn arena_block(&self, bytes: usize) -> Option<ArenaBlock> {
        let arena = self
            .arena
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        let offset = {
            let mut p = arena.planner.lock().unwrap_or_else(|e| e.into_inner());
            let off = p.alloc(bytes, ARENA_ALIGN);
            if off + bytes > arena.mem.len() {
                p.free(off);
                self.arena_fallbacks.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            off
        };
        Some(ArenaBlock { arena, offset })
    }

    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    /// Whether an error is pending (ops are being skipped).
    fn failed(&self) -> bool {
        self.error.lock().expect("error lock").is_some()
    }

    /// Records `e` unless an earlier error is pending (the first one wins).
    fn fail(&self, op: &str, e: CudaError) {
        let mut g = self.error.lock().expect("error lock");
        if g.is_none() {
            *g = Some(device_err(op, e));
        }
    }

    /// Runs the device work of op `op` unless an error is pending; keeps its error.
    fn run(&self, op: &str, f: impl FnOnce() -> CResult<()>) {
        if self.failed() {
            return;
        }
        if let Err(e) = f() {
            self.fail(op, e);
        }
    }

    /// THE allocation path of the buffers the schedule asks for (`zeros`, `upload`,
    /// `rope_table`: activations, saved buffers, gradients of activations): `len` elements of
    /// `dtype`, zero-filled when `zero` (queued on the main stream): a block of the step arena
    /// when one is reserved and has room, else the caching pool.
    fn allocate(&self, dtype: Dtype, len: usize, zero: bool, what: &str) -> CResult<CudaBuf> {
        self.allocate_in(Place::Step, dtype, len, zero, what)
    }

    /// An op's own temporary (`(len,)` of `dtype`, not zeroed), dropped before the op returns:
    /// dequantize scratch, bf16 copies of LoRA A/B, `vs`, uploaded ids and labels, ... Always
    /// from the caching pool, never the step arena: the planner replays only the schedule's
    /// buffers through its `ArenaPlanner`, so one temporary placed in an arena gap would move
    /// every later offset and the step would no longer fit the plan by construction (seen
    /// under the emulator: a 2-layer step used 4.09 MB of a planned 3.72 MB). The planner
    /// counts these as pool blocks (`MemoryPlan::workspace`).
    fn temporary(&self, dtype: Dtype, len: usize, what: &str) -> CResult<CudaBuf> {
        self.allocate_in(Place::Temporary, dtype, len, false, what)
    }

    fn allocate_in(
        &self,
        place: Place,
        dtype: Dtype,
        len: usize,
        zero: bool,
        what: &str,
    ) -> CResult<CudaBuf> {
        let bytes = len * dtype.size();
        let block = (place == Place::Step && bytes > 0)
            .then(|| self.arena_block(bytes))
            .flatten();
        let mem = match block {
            Some(block) => Mem::Arena(block),
            None => Mem::Pool(self.dev.alloc::<u8>(bytes, what)?),
        };
        let mut b = CudaBuf {
            mem: Some(mem),
            len,
            dtype,
        };
        if zero {
            self.dev.memset_zero(&mut raw_mut(&mut b, what, "zeros")?)?;
        }
        Ok(b)
    }

    /// [`CudaBackend::allocate`] for the trait's infallible constructors: on failure the error
    /// becomes the pending one and the buffer holds no memory.
    fn alloc_or_fail(&self, dtype: Dtype, len: usize, zero: bool, what: &str) -> CudaBuf {
        if !self.failed() {
            match self.allocate(dtype, len, zero, what) {
                Ok(b) => return b,
                Err(e) => self.fail(what, e),
            }
        }
        CudaBuf {
            mem: None,
            len,
            dtype,
        }
    }

    /// Host values into a new buffer of `dtype` (f32 → bf16 rounds to nearest even).
    fn upload_as(&self, dtype: Dtype, host: &[f32], what: &str) -> CudaBuf {
        let mut b = self.alloc_or_fail(dtype, host.len(), false, what);
        self.run(what, || match dtype {
            Dtype::Bf16 => {
                let h: Vec<bf16> = host.iter().map(|&x| bf16::from_f32(x)).collect();
                self.dev
                    .copy_in(&h, &mut view_mut::<bf16>(&mut b, what, "dst")?)
            }
            Dtype::F32 => self
                .dev
                .copy_in(host, &mut view_mut::<f32>(&mut b, what, "dst")?),
            Dtype::I32 => Err(bad(what, "dtype", "i32 buffers are uploaded from ids")),
        });
        b
    }

    /// Token ids / labels `(n,)` i32 into a scratch buffer (checked by the schedule).
    fn upload_i32(&self, host: &[i32], what: &str) -> CResult<CudaBuf> {
        let mut b = self.temporary(Dtype::I32, host.len(), what)?;
        self.dev
            .copy_in(host, &mut view_mut::<i32>(&mut b, what, "dst")?)?;
        Ok(b)
    }

    /// `(len,)` bf16 copy of f32 elements `off..off+len` of `src` (LoRA master weights → the
    /// compute dtype; one rounding).
    fn to_bf16(&self, src: &CudaBuf, off: usize, len: usize, op: &str) -> CResult<CudaBuf> {
        let s = slice::<f32>(src, off, len, op, "params")?;
        let mut d = self.temporary(Dtype::Bf16, len, op)?;
        elementwise::cast(
            &self.dev,
            &mut view_mut::<bf16>(&mut d, op, "cast")?,
            &s,
            None,
        )?;
        Ok(d)
    }

    /// The saved block's lse element count, after checking its dtype and length.
    fn check_attn_saved(op: &str, saved: &CudaBuf, dims: AttnDims) -> CResult<usize> {
        let (lse_n, o_n) = Self::attn_saved_parts(dims);
        check_dtype::<f32>(saved, op, "saved")?;
        if saved.len != lse_n + o_n {
            return Err(bad(
                op,
                "saved",
                format!(
                    "{} elements, attention_saved_len is {}",
                    saved.len,
                    lse_n + o_n
                ),
            ));
        }
        Ok(lse_n)
    }

    /// Elements of attention's saved block, in f32 units: `lse (B·H·T)` f32 padded to 16 bytes,
    /// then a bf16 copy of the output `o (B·T, H·D)` (its backward needs `rowsum(dO ⊙ O)` and
    /// the trait hands it only q, k, v).
    fn attn_saved_parts(dims: AttnDims) -> (usize, usize) {
        let lse = (dims.b * dims.h * dims.tq).div_ceil(4) * 4;
        let o = (dims.b * dims.tq * dims.h * dims.d).div_ceil(2);
        (lse, o)
    }

    fn attn_dims(op: &str, dims: AttnDims) -> CResult<g_attention::AttnDims> {
        if dims.tq != dims.tk || dims.kv_rows != dims.tq {
            return Err(bad(
                op,
                "dims",
                format!(
                    "attention with a KV-cache offset (Tq {}, Tk {}, kv rows {}) is not \
                     implemented on the GPU; generate on the CPU backend",
                    dims.tq, dims.tk, dims.kv_rows
                ),
            ));
        }
        Ok(g_attention::AttnDims {
            b: dims.b,
            t: dims.tq,
            h: dims.h,
            hkv: dims.hkv,
            d: dims.d,
        })
    }
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Frozen = CudaFrozen;

    fn name(&self) -> String {
        format!("cuda-bf16 ({})", self.dev.name())
    }

    fn synchronize(&self) -> Result<()> {
        let sync = self.dev.synchronize();
        if let Some(e) = self.error.lock().expect("error lock").take() {
            return Err(e);
        }
        sync.map_err(|e| device_err("synchronize", e))
    }

    fn zeros(&self, n: usize) -> CudaBuf {
        self.alloc_or_fail(Dtype::Bf16, n, true, "zeros")
    }
    fn zeros_f32(&self, n: usize) -> CudaBuf {
        self.alloc_or_fail(Dtype::F32, n, true, "zeros_f32")
    }
    fn upload(&self, host: &[f32]) -> CudaBuf {
        self.upload_as(Dtype::Bf16, host, "upload")
    }
    fn upload_f32(&self, host: &[f32]) -> CudaBuf {
        self.upload_as(Dtype::F32, host, "upload_f32")
    }
    /// `(D/2 + P,)` f32: the inverse frequencies as f32 (what the CPU table multiplies by),
    /// then the positions `0..P` as i32 bit patterns (the kernel's per-row `pos`).
    fn rope_table(&self, inv_freq: &[f64], positions: usize) -> CudaBuf {
        let half = inv_freq.len();
        let mut b = self.alloc_or_fail(Dtype::F32, half + positions, false, "rope_table");
        self.run("rope_table", || {
            let mut host: Vec<f32> = inv_freq.iter().map(|&f| f as f32).collect();
            host.extend((0..positions).map(|p| f32::from_bits(p as u32)));
            self.dev
                .copy_in(&host, &mut view_mut::<f32>(&mut b, "rope_table", "dst")?)
        });
        b
    }
    fn download(&self, buf: &CudaBuf) -> Vec<f32> {
        if self.failed() || buf.mem.is_none() {
            return vec![f32::NAN; buf.len];
        }
        let r = (|| -> CResult<Vec<f32>> {
            match buf.dtype {
                Dtype::Bf16 => Ok(self
                    .dev
                    .download(&view::<bf16>(buf, "download", "buf")?)?
                    .into_iter()
                    .map(f32::from)
                    .collect()),
                Dtype::F32 => self.dev.download(&view::<f32>(buf, "download", "buf")?),
                Dtype::I32 => Ok(self
                    .dev
                    .download(&view::<i32>(buf, "download", "buf")?)?
                    .into_iter()
                    .map(|x| x as f32)
                    .collect()),
            }
        })();
        r.unwrap_or_else(|e| {
            self.fail("download", e);
            vec![f32::NAN; buf.len]
        })
    }
    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len
    }

    fn frozen(&self, name: &str, w: FrozenWeight, out: usize, inp: usize) -> Result<CudaFrozen> {
        match w {
            FrozenWeight::Nf4(t) => {
                if t.shape() != [out, inp] {
                    return Err(TrainError::tensor(
                        "<model>",
                        name,
                        format!("NF4 shape {:?}, expected [{out}, {inp}]", t.shape()),
                    ));
                }
                let w =
                    Nf4Weight::upload(&self.dev, &t, name).map_err(|e| device_err("frozen", e))?;
                Ok(CudaFrozen::Nf4 {
                    w,
                    dtype: t.state.dtype,
                })
            }
            FrozenWeight::Dense(v) => {
                if v.len() != out * inp {
                    return Err(TrainError::tensor(
                        "<model>",
                        name,
                        format!("{} elements, expected {out}×{inp}", v.len()),
                    ));
                }
                let w = self.upload_as(Dtype::Bf16, &v, "frozen");
                self.synchronize()?;
                Ok(CudaFrozen::Dense { w, out, inp })
            }
        }
    }
    /// Quantize-on-load on the GPU: the f32 weight is uploaded to a scratch and quantized by
    /// `ops::nf4::quantize_fwd` (byte-exact with the host's `Nf4Tensor::quantize` for the
    /// codes and f32 scales; its parity test allows ±1 on the double-quant codes, specs/nf4.md
    /// §3), so only the NF4 bytes ever stay on the device.
    fn quantize_frozen(
        &self,
        name: &str,
        data: Vec<f32>,
        out: usize,
        inp: usize,
        qb: usize,
        double_quant: bool,
        dtype: qlora_nf4::Dtype,
    ) -> Result<CudaFrozen> {
        if data.len() != out * inp {
            return Err(TrainError::tensor(
                "<model>",
                name,
                format!("{} elements, expected {out}×{inp}", data.len()),
            ));
        }
        let q = (|| -> CResult<Nf4Weight> {
            let mut x = self.temporary(Dtype::F32, data.len(), "quantize_frozen")?;
            self.dev
                .copy_in(&data, &mut view_mut::<f32>(&mut x, "quantize_frozen", "w")?)?;
            ops::nf4::quantize_fwd(
                &self.dev,
                &view::<f32>(&x, "quantize_frozen", "w")?,
                &[out, inp],
                qb,
                double_quant,
                name,
            )
        })();
        let w = q.map_err(|e| device_err("quantize_frozen", e))?;
        Ok(CudaFrozen::Nf4 { w, dtype })
    }
    fn frozen_to_f32(&self, w: &CudaFrozen) -> Vec<f32> {
        match w {
            CudaFrozen::Dense { w, .. } => self.download(w),
            CudaFrozen::Nf4 { w: nw, .. } => match w.download_nf4(self) {
                Ok(Some(t)) => t.dequantize_f32(),
                Ok(None) => unreachable!("an NF4 frozen weight downloads as NF4"),
                Err(e) => {
                    let mut g = self.error.lock().expect("error lock");
                    if g.is_none() {
                        *g = Some(e);
                    }
                    vec![f32::NAN; nw.numel()]
                }
            },
        }
    }

    fn copy(&self, dst: &mut CudaBuf, dst_off: usize, src: &CudaBuf, src_off: usize, n: usize) {
        const OP: &str = "copy";
        self.run(OP, || {
            if dst.dtype != src.dtype {
                return Err(bad(
                    OP,
                    "src",
                    format!("{} into {}", src.dtype.suffix(), dst.dtype.suffix()),
                ));
            }
            let sz = src.dtype.size();
            if src_off + n > src.len || dst_off + n > dst.len {
                return Err(bad(
                    OP,
                    "range",
                    format!(
                        "{n} elements from {src_off} of {} into {dst_off} of {}",
                        src.len, dst.len
                    ),
                ));
            }
            let s = raw(src, OP, "src")?.slice(src_off * sz, n * sz);
            let mut d = raw_mut(dst, OP, "dst")?;
            self.dev.copy(&s, &mut d.slice_mut(dst_off * sz, n * sz))
        })
    }
    fn zero(&self, dst: &mut CudaBuf) {
        self.run("zero", || {
            self.dev.memset_zero(&mut raw_mut(dst, "zero", "dst")?)
        })
    }
    fn add_acc(&self, dst: &mut CudaBuf, src: &CudaBuf) {
        const OP: &str = "add_acc";
        self.run(OP, || match dst.dtype {
            Dtype::Bf16 => residual::bwd_acc(
                &self.dev,
                &mut view_mut::<bf16>(dst, OP, "dst")?,
                &view::<bf16>(src, OP, "src")?,
                None,
            ),
            _ => residual::bwd_acc(
                &self.dev,
                &mut view_mut::<f32>(dst, OP, "dst")?,
                &view::<f32>(src, OP, "src")?,
                None,
            ),
        })
    }

    /// The input embedding stays on the host: a step reads N of its V rows.
    fn embedding_on_host(&self) -> bool {
        true
    }
    /// Gather the N rows on the host, round them to bf16 there (as the table's upload would
    /// have), one copy into `out (N, C)` bf16. `(N·C)` bf16 crosses the bus per step — 16 MiB
    /// at Llama 3's N 2048, C 4096 — instead of 1 GiB of table held on the device.
    fn embedding_fwd_host(&self, out: &mut CudaBuf, ids: &[u32], table: &[f32], c: usize) {
        const OP: &str = "embedding_fwd_host";
        self.run(OP, || {
            let rows = crate::model::gather_rows(table, ids, c, bf16::from_f32).map_err(|id| {
                bad(
                    OP,
                    "ids",
                    format!("token id {id} is outside the embedding table"),
                )
            })?;
            self.dev
                .copy_in(&rows, &mut view_mut::<bf16>(out, OP, "out")?)
        });
    }
    fn embedding_fwd(
        &self,
        out: &mut CudaBuf,
        ids: &[u32],
        table: &CudaBuf,
        table_off: usize,
        c: usize,
    ) {
        const OP: &str = "embedding_fwd";
        self.run(OP, || {
            let ids_i: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
            let idb = self.upload_i32(&ids_i, OP)?;
            let idv = view::<i32>(&idb, OP, "ids")?;
            let v = table.len.saturating_sub(table_off) / c.max(1);
            match table.dtype {
                Dtype::Bf16 => g_emb::fwd(
                    &self.dev,
                    &mut view_mut::<bf16>(out, OP, "out")?,
                    &idv,
                    &slice::<bf16>(table, table_off, v * c, OP, "table")?,
                    v,
                    c,
                    None,
                ),
                // The trainable (modules_to_save) copy is f32 in the adapter arena: gather the
                // f32 rows, then round them once to the bf16 activations.
                _ => {
                    let mut rows = self.temporary(Dtype::F32, ids.len() * c, OP)?;
                    g_emb::fwd(
                        &self.dev,
                        &mut view_mut::<f32>(&mut rows, OP, "rows")?,
                        &idv,
                        &slice::<f32>(table, table_off, v * c, OP, "table")?,
                        v,
                        c,
                        None,
                    )?;
                    elementwise::cast(
                        &self.dev,
                        &mut view_mut::<bf16>(out, OP, "out")?,
                        &view::<f32>(&rows, OP, "rows")?,
                        None,
                    )
                }
            }
        })
    }
    fn embedding_bwd_acc(
        &self,
        d_table: &mut CudaBuf,
        off: usize,
        ids: &[u32],
        d_out: &CudaBuf,
        c: usize,
    ) {
        const OP: &str = "embedding_bwd_acc";
        self.run(OP, || {
            let ids_i: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
            let idb = self.upload_i32(&ids_i, OP)?;
            let v = d_table.len.saturating_sub(off) / c.max(1);
            let mut dt = view_mut::<f32>(d_table, OP, "d_table")?;
            g_emb::bwd_acc(
                &self.dev,
                &mut dt.slice_mut(off, v * c),
                &view::<i32>(&idb, OP, "ids")?,
                &view::<bf16>(d_out, OP, "d_out")?,
                v,
                c,
                None,
            )
        })
    }

    fn rmsnorm_fwd(
        &self,
        out: &mut CudaBuf,
        rstd: &mut CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        c: usize,
        eps: f64,
    ) {
        const OP: &str = "rmsnorm_fwd";
        self.run(OP, || {
            g_rmsnorm::fwd(
                &self.dev,
                &mut view_mut::<bf16>(out, OP, "out")?,
                &mut view_mut::<f32>(rstd, OP, "rstd")?,
                &view::<bf16>(x, OP, "x")?,
                &view::<bf16>(w, OP, "w")?,
                x.len / c.max(1),
                c,
                eps as f32,
                None,
            )
        })
    }
    fn rmsnorm_bwd(
        &self,
        d_x: &mut CudaBuf,
        d_out: &CudaBuf,
        x: &CudaBuf,
        rstd: &CudaBuf,
        w: &CudaBuf,
        c: usize,
    ) {
        const OP: &str = "rmsnorm_bwd";
        self.run(OP, || {
            g_rmsnorm::bwd(
                &self.dev,
                &mut view_mut::<bf16>(d_x, OP, "d_x")?,
                &view::<bf16>(d_out, OP, "d_out")?,
                &view::<bf16>(x, OP, "x")?,
                &view::<f32>(rstd, OP, "rstd")?,
                &view::<bf16>(w, OP, "w")?,
                x.len / c.max(1),
                c,
                None,
            )
        })
    }

    fn rope_fwd(&self, x: &mut CudaBuf, table: &CudaBuf, dims: RopeDims) {
        self.rope(x, table, dims, false)
    }
    fn rope_bwd(&self, d_x: &mut CudaBuf, table: &CudaBuf, dims: RopeDims) {
        self.rope(d_x, table, dims, true)
    }

    fn attention_saved_len(&self, dims: AttnDims) -> usize {
        let (lse, o) = Self::attn_saved_parts(dims);
        lse + o
    }
    fn attention_fwd(
        &self,
        out: &mut CudaBuf,
        saved: &mut CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        dims: AttnDims,
    ) {
        const OP: &str = "attention_fwd";
        self.run(OP, || {
            let a = Self::attn_dims(OP, dims)?;
            let lse_n = Self::check_attn_saved(OP, saved, dims)?;
            let nq = dims.b * dims.tq * dims.h * dims.d;
            let (lse_part, o_part) = raw_mut(saved, OP, "saved")?.split_at_mut(4 * lse_n);
            let mut lse = lse_part.cast::<f32>();
            let mut lse = lse.slice_mut(0, dims.b * dims.h * dims.tq);
            let mut o_saved = o_part.cast::<bf16>();
            let mut o = view_mut::<bf16>(out, OP, "out")?;
            g_attention::fwd(
                &self.dev,
                &mut o,
                &mut lse,
                &view::<bf16>(q, OP, "q")?,
                &view::<bf16>(k, OP, "k")?,
                &view::<bf16>(v, OP, "v")?,
                a,
                None,
            )?;
            self.dev.copy(&o.as_view(), &mut o_saved.slice_mut(0, nq))
        })
    }
    fn attention_bwd(
        &self,
        d_q: &mut CudaBuf,
        d_k: &mut CudaBuf,
        d_v: &mut CudaBuf,
        d_out: &CudaBuf,
        saved: &CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        dims: AttnDims,
    ) {
        const OP: &str = "attention_bwd";
        self.run(OP, || {
            let a = Self::attn_dims(OP, dims)?;
            let lse_n = Self::check_attn_saved(OP, saved, dims)?;
            let rows = dims.b * dims.h * dims.tq;
            let nq = dims.b * dims.tq * dims.h * dims.d;
            let bytes = raw(saved, OP, "saved")?;
            let lse = bytes.slice(0, 4 * lse_n).cast::<f32>().slice(0, rows);
            let o = bytes
                .slice(4 * lse_n, bytes.len() - 4 * lse_n)
                .cast::<bf16>()
                .slice(0, nq);
            let mut delta = self.temporary(Dtype::F32, rows, OP)?;
            g_attention::bwd(
                &self.dev,
                &mut view_mut::<bf16>(d_q, OP, "d_q")?,
                &mut view_mut::<bf16>(d_k, OP, "d_k")?,
                &mut view_mut::<bf16>(d_v, OP, "d_v")?,
                &mut view_mut::<f32>(&mut delta, OP, "delta")?,
                &view::<bf16>(d_out, OP, "d_out")?,
                &o,
                &lse,
                &view::<bf16>(q, OP, "q")?,
                &view::<bf16>(k, OP, "k")?,
                &view::<bf16>(v, OP, "v")?,
                a,
                None,
            )
        })
    }

    fn swiglu_fwd(&self, out: &mut CudaBuf, gate: &CudaBuf, up: &CudaBuf) {
        const OP: &str = "swiglu_fwd";
        self.run(OP, || {
            g_swiglu::fwd(
                &self.dev,
                &mut view_mut::<bf16>(out, OP, "out")?,
                &view::<bf16>(gate, OP, "gate")?,
                &view::<bf16>(up, OP, "up")?,
                None,
            )
        })
    }
    fn swiglu_bwd(
        &self,
        d_gate: &mut CudaBuf,
        d_up: &mut CudaBuf,
        d_out: &CudaBuf,
        gate: &CudaBuf,
        up: &CudaBuf,
    ) {
        const OP: &str = "swiglu_bwd";
        self.run(OP, || {
            g_swiglu::bwd(
                &self.dev,
                &mut view_mut::<bf16>(d_gate, OP, "d_gate")?,
                &mut view_mut::<bf16>(d_up, OP, "d_up")?,
                &view::<bf16>(d_out, OP, "d_out")?,
                &view::<bf16>(gate, OP, "gate")?,
                &view::<bf16>(up, OP, "up")?,
                None,
            )
        })
    }

    fn nf4_lora_linear_fwd(
        &self,
        y: &mut CudaBuf,
        u: Option<&mut CudaBuf>,
        x: &CudaBuf,
        w: &CudaFrozen,
        bias: Option<&CudaBuf>,
        lora: Option<(&CudaBuf, LoraArgs<'_>)>,
        dims: LinearDims,
    ) {
        self.run("nf4_lora_linear_fwd", || {
            self.linear_fwd(y, u, x, w, bias, lora, dims)
        })
    }
    fn nf4_lora_linear_bwd(
        &self,
        d_x: Option<&mut CudaBuf>,
        acc_dx: bool,
        grads: Option<&mut CudaBuf>,
        d_y: &CudaBuf,
        x: &CudaBuf,
        u: Option<&CudaBuf>,
        w: &CudaFrozen,
        lora: Option<(&CudaBuf, LoraArgs<'_>)>,
        dims: LinearDims,
    ) {
        self.run("nf4_lora_linear_bwd", || {
            self.linear_bwd(d_x, acc_dx, grads, d_y, x, u, w, lora, dims)
        })
    }

    fn dense_linear_fwd(
        &self,
        y: &mut CudaBuf,
        x: &CudaBuf,
        params: &CudaBuf,
        w_off: usize,
        dims: LinearDims,
    ) {
        self.run("dense_linear_fwd", || {
            self.dense_fwd(y, x, params, w_off, dims)
        })
    }
    fn dense_linear_bwd(
        &self,
        d_x: &mut CudaBuf,
        grads: &mut CudaBuf,
        d_y: &CudaBuf,
        x: &CudaBuf,
        params: &CudaBuf,
        w_off: usize,
        dims: LinearDims,
    ) {
        self.run("dense_linear_bwd", || {
            self.dense_bwd(d_x, grads, d_y, x, params, w_off, dims)
        })
    }

    /// Waits for the device (the per-row losses are read back and summed in f64 on the host,
    /// in row order, as the CPU backend sums them).
    fn cross_entropy_fwd(
        &self,
        lse: &mut CudaBuf,
        logits: &CudaBuf,
        targets: &[i32],
        v: usize,
    ) -> (f64, usize) {
        const OP: &str = "cross_entropy_fwd";
        let count = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
        let mut sum = f64::NAN;
        self.run(OP, || {
            let lab = self.upload_i32(targets, OP)?;
            let mut loss = self.temporary(Dtype::F32, targets.len(), OP)?;
            g_ce::fwd(
                &self.dev,
                &mut view_mut::<f32>(&mut loss, OP, "loss")?,
                &mut view_mut::<f32>(lse, OP, "lse")?,
                &view::<bf16>(logits, OP, "logits")?,
                &view::<i32>(&lab, OP, "targets")?,
                v,
            )?;
            let host = self.dev.download(&view::<f32>(&loss, OP, "loss")?)?;
            // Ignored rows are 0 in `loss`; sum like the CPU: each row's loss widened to f64.
            sum = host.iter().map(|&l| l as f64).sum();
            Ok(())
        });
        (sum, count)
    }
    fn cross_entropy_bwd(
        &self,
        logits_to_d: &mut CudaBuf,
        lse: &CudaBuf,
        targets: &[i32],
        v: usize,
        scale: f64,
    ) {
        const OP: &str = "cross_entropy_bwd";
        self.run(OP, || {
            let lab = self.upload_i32(targets, OP)?;
            g_ce::bwd(
                &self.dev,
                &mut view_mut::<bf16>(logits_to_d, OP, "logits")?,
                &view::<f32>(lse, OP, "lse")?,
                &view::<i32>(&lab, OP, "targets")?,
                v,
                scale as f32,
            )
        })
    }
}

impl CudaBackend {
    /// The adapter arenas as the optimizer takes them: `params` writable, `grads` read-only,
    /// both f32 (the `Adapter` allocates them with `upload_f32` / `zeros_f32`).
    pub fn f32_views<'a>(
        &self,
        params: &'a mut CudaBuf,
        grads: &'a CudaBuf,
        op: &str,
    ) -> Result<(ViewMut<'a, f32>, View<'a, f32>)> {
        let p = view_mut::<f32>(params, op, "params").map_err(|e| device_err(op, e))?;
        let g = view::<f32>(grads, op, "grads").map_err(|e| device_err(op, e))?;
        Ok((p, g))
    }

    /// NaN/Inf elements of an f32 buffer (waits for the device; reports a pending error).
    pub fn nonfinite_count(&self, buf: &CudaBuf, op: &str) -> Result<usize> {
        self.synchronize()?;
        let v = view::<f32>(buf, op, "buf").map_err(|e| device_err(op, e))?;
        elementwise::nonfinite_count(&self.dev, &v, None).map_err(|e| device_err(op, e))
    }

    /// RoPE in place over `x (B·T, heads·D)`, one launch per sequence: row `t` of sequence `b`
    /// sits at position `pos_offset + t`, read from the table's position block.
    fn rope(&self, x: &mut CudaBuf, table: &CudaBuf, dims: RopeDims, bwd: bool) {
        let op = if bwd { "rope_bwd" } else { "rope_fwd" };
        self.run(op, || {
            let RopeDims {
                b,
                t,
                heads,
                d,
                pos_offset,
            } = dims;
            let half = d / 2;
            let inv = slice::<f32>(table, 0, half, op, "table")?;
            let pos =
                slice::<f32>(table, half + pos_offset, t, op, "table positions")?.cast::<i32>();
            let per = t * heads * d;
            let mut xv = view_mut::<bf16>(x, op, "x")?;
            if xv.len() != b * per {
                return Err(bad(
                    op,
                    "x",
                    format!("{} elements, dims need {}", xv.len(), b * per),
                ));
            }
            for bi in 0..b {
                let mut seq = xv.slice_mut(bi * per, per);
                let (mut y, xin) = seq.in_place();
                if bwd {
                    g_rope::bwd(&self.dev, &mut y, &xin, &pos, &inv, t, heads, d, None)?;
                } else {
                    g_rope::fwd(&self.dev, &mut y, &xin, &pos, &inv, t, heads, d, None)?;
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a usable GPU (this crate's CI), opening gives the typed reason, never a panic;
    /// with one it opens.
    #[test]
    fn new_is_a_typed_error_without_a_gpu() {
        match CudaBackend::new() {
            Ok(be) => assert!(be.name().starts_with("cuda-bf16")),
            Err(TrainError::NoDevice(why)) => assert!(!why.is_empty()),
            Err(e) => panic!("unexpected error kind: {e}"),
        }
    }

    #[test]
    fn attention_saved_block_holds_lse_then_o() {
        let d = AttnDims {
            b: 2,
            tq: 5,
            tk: 5,
            kv_rows: 5,
            h: 3,
            hkv: 1,
            d: 8,
        };
        let (lse, o) = CudaBackend::attn_saved_parts(d);
        // lse: 2·3·5 = 30 f32, padded to 32 (16-byte aligned start of o); o: 2·5·3·8 bf16 = 120 f32.
        assert_eq!((lse, o), (32, 120));
    }
}
