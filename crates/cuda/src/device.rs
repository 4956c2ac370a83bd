//! The device: context, streams, a caching allocator, managed memory, the NVRTC module cache
//! and the kernel launch path.
//!
//! Memory is raw `CUdeviceptr`s behind typed handles ([`Buf`], [`View`], [`ViewMut`]) rather
//! than cudarc's `CudaSlice`, because the caching pool must outlive and recycle allocations.
//! Pool reuse is ordered by the device's main stream: a buffer dropped after work was queued on
//! it is handed out again only to work queued later on the same stream. Work on another stream
//! must be joined (`Stream::wait_for`) before its buffers are dropped.

use crate::error::{bad_arg, drv, CudaError, NoGpu, Result};
use crate::kernels::{self, HEADERS};
use crate::nvrtc::{self, CompileRequest};
use cudarc::driver::{result, sys, CudaContext, CudaStream};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Element types that live in device buffers.
pub trait Elem: Copy + Default + Send + Sync + 'static {
    /// Kernel-name suffix for the float types (`f32`, `bf16`); others are never a kernel dtype.
    const SUFFIX: &'static str;
}
impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Elem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}
impl Elem for u8 {
    const SUFFIX: &'static str = "u8";
}
impl Elem for i32 {
    const SUFFIX: &'static str = "i32";
}
impl Elem for u32 {
    const SUFFIX: &'static str = "u32";
}

/// Launch geometry: grid, block and dynamic shared memory bytes. Computed by pure functions
/// in each op module (tested on the CPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub smem: u32,
}

/// Ceil division for geometry math.
pub const fn cdiv(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

/// Size class of a pooled allocation: powers of two from 512 B to 2 MiB, then multiples of
/// 2 MiB. Bounds waste at 2x for small buffers and at 2 MiB for large ones: the large ones are
/// resident weights (Llama projections' NF4 codes are whole multiples of 2 MiB; power-of-two
/// classes rounded 28 MiB up to 32) and the step arena, each allocated once.
pub fn pool_class(bytes: usize) -> usize {
    const BIG: usize = 2 << 20;
    let b = bytes.max(1);
    if b <= BIG {
        b.next_power_of_two().max(512)
    } else {
        b.div_ceil(2 << 20) * (2 << 20)
    }
}

/// The on-disk kernel cache key: SHA-256 over the source, its headers, the arch, the exact
/// NVRTC options and the NVRTC version; lowercase hex.
pub fn cache_key(
    source: &str,
    headers: &[(&str, &str)],
    arch: &str,
    options: &[String],
    nvrtc_version: (i32, i32),
) -> String {
    let mut h = Sha256::new();
    let mut field = |tag: &str, s: &[u8]| {
        // Length-prefixed fields so that moving bytes between fields changes the key.
        h.update(tag.as_bytes());
        h.update((s.len() as u64).to_le_bytes());
        h.update(s);
    };
    field("src", source.as_bytes());
    for (n, t) in headers {
        field("hname", n.as_bytes());
        field("htext", t.as_bytes());
    }
    field("arch", arch.as_bytes());
    for o in options {
        field("opt", o.as_bytes());
    }
    field(
        "nvrtc",
        format!("{}.{}", nvrtc_version.0, nvrtc_version.1).as_bytes(),
    );
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Where compiled kernels are cached: `$QLORA_KERNEL_CACHE`, else `$XDG_CACHE_HOME/qlora/kernels`,
/// else `$HOME/.cache/qlora/kernels`; None disables the disk cache.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("QLORA_KERNEL_CACHE") {
        return (!p.is_empty()).then(|| PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(p).join("qlora/kernels"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/qlora/kernels"))
}

struct PoolInner {
    free: HashMap<usize, Vec<sys::CUdeviceptr>>,
    cached_bytes: usize,
    live_bytes: usize,
}

struct Pool {
    ctx: Arc<CudaContext>,
    inner: Mutex<PoolInner>,
    /// `QLORA_POOL_EXACT=1`: each block is exactly its buffer's size (no size classes), so
    /// that an allocation's end is the buffer's end for the checkers that only see driver
    /// allocations: compute-sanitizer's memcheck on a GPU, the emulator's guard zones
    /// (cuda/emu/README.md). Costs reuse; for checking runs, not for training.
    exact: bool,
}

impl Pool {
    fn take(&self, bytes: usize, what: &str) -> Result<(sys::CUdeviceptr, usize)> {
        // An empty buffer holds no block (class 0, null pointer: the copies and fills of
        // `Device` skip zero-length views); a 512-byte block per empty buffer would be memory
        // no plan accounts for.
        if bytes == 0 {
            return Ok((0, 0));
        }
        let class = if self.exact { bytes } else { pool_class(bytes) };
        {
            let mut p = self.inner.lock().expect("pool lock");
            if let Some(ptr) = p.free.get_mut(&class).and_then(Vec::pop) {
                p.cached_bytes -= class;
                p.live_bytes += class;
                return Ok((ptr, class));
            }
        }
        self.ctx.bind_to_thread().map_err(drv("cuCtxSetCurrent"))?;
        // SAFETY: plain allocation in the bound context.
        let ptr = match unsafe { result::malloc_sync(class) } {
            Ok(p) => p,
            Err(_) => {
                // Out of memory: give the cache back to the driver and retry once.
                self.trim();
                unsafe { result::malloc_sync(class) }.map_err(|e| CudaError::Alloc {
                    what: what.into(),
                    bytes: class,
                    msg: format!("{e:?}"),
                })?
            }
        };
        self.inner.lock().expect("pool lock").live_bytes += class;
        Ok((ptr, class))
    }

    fn give(&self, ptr: sys::CUdeviceptr, class: usize) {
        if class == 0 {
            return;
        }
        let mut p = self.inner.lock().expect("pool lock");
        p.live_bytes -= class;
        p.cached_bytes += class;
        p.free.entry(class).or_default().push(ptr);
    }

    fn trim(&self) {
        let mut p = self.inner.lock().expect("pool lock");
        if self.ctx.bind_to_thread().is_err() {
            return;
        }
        for (_, v) in p.free.drain() {
            for ptr in v {
                // SAFETY: pointers in the free list are owned by the pool and unused.
                let _ = unsafe { result::free_sync(ptr) };
            }
        }
        p.cached_bytes = 0;
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.trim();
    }
}

/// An owned device allocation of `len` elements of T from the caching pool.
pub struct Buf<T: Elem> {
    ptr: sys::CUdeviceptr,
    len: usize,
    class: usize,
    pool: Arc<Pool>,
    _t: PhantomData<T>,
}

// SAFETY: a device pointer is plain data; all access goes through the driver.
unsafe impl<T: Elem> Send for Buf<T> {}
unsafe impl<T: Elem> Sync for Buf<T> {}

impl<T: Elem> Drop for Buf<T> {
    fn drop(&mut self) {
        self.pool.give(self.ptr, self.class);
    }
}

/// A borrowed, read-only range of device elements.
#[derive(Clone, Copy, Debug)]
pub struct View<'a, T> {
    pub(crate) ptr: sys::CUdeviceptr,
    pub(crate) len: usize,
    _t: PhantomData<&'a T>,
}

/// A borrowed, writable range of device elements.
#[derive(Debug)]
pub struct ViewMut<'a, T> {
    pub(crate) ptr: sys::CUdeviceptr,
    pub(crate) len: usize,
    _t: PhantomData<&'a mut T>,
}

impl<T: Elem> Buf<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn view(&self) -> View<'_, T> {
        View {
            ptr: self.ptr,
            len: self.len,
            _t: PhantomData,
        }
    }
    pub fn view_mut(&mut self) -> ViewMut<'_, T> {
        ViewMut {
            ptr: self.ptr,
            len: self.len,
            _t: PhantomData,
        }
    }
    /// Elements `start..start + len`; panics when out of range (a programming error, not input).
    pub fn slice(&self, start: usize, len: usize) -> View<'_, T> {
        self.view().slice(start, len)
    }
    /// A writable range of a buffer shared by several owners that each hold a disjoint
    /// range (a sub-allocating arena): `ViewMut` carries only a device address, so this is
    /// about the kernels' data races, not Rust aliasing.
    ///
    /// # Safety
    /// No other view of an overlapping range may be written, or read by queued work that is
    /// not stream-ordered before the writes through this view.
    pub unsafe fn slice_mut_shared(&self, start: usize, len: usize) -> ViewMut<'_, T> {
        assert!(
            start + len <= self.len,
            "slice {start}+{len} of {}",
            self.len
        );
        ViewMut {
            ptr: self.ptr + (start * std::mem::size_of::<T>()) as u64,
            len,
            _t: PhantomData,
        }
    }
    pub fn slice_mut(&mut self, start: usize, len: usize) -> ViewMut<'_, T> {
        // SAFETY: `&mut self` is the only owner's exclusive borrow: no other view can exist.
        unsafe { self.slice_mut_shared(start, len) }
    }
}

impl<'a, T: Elem> View<'a, T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn slice(&self, start: usize, len: usize) -> View<'a, T> {
        assert!(
            start + len <= self.len,
            "slice {start}+{len} of {}",
            self.len
        );
        View {
            ptr: self.ptr + (start * std::mem::size_of::<T>()) as u64,
            len,
            _t: PhantomData,
        }
    }
    /// Raw device address (for kernel arguments).
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
    /// The same bytes as elements of `U` (`len·size_of::<T>() / size_of::<U>()` of them): a
    /// buffer the caller packs with several dtypes, e.g. an f32 statistics block followed by
    /// bf16 rows. Panics when the address or byte length is not a multiple of `U`'s size (a
    /// programming error, not input).
    pub fn cast<U: Elem>(self) -> View<'a, U> {
        let (bytes, su) = (
            self.len * std::mem::size_of::<T>(),
            std::mem::size_of::<U>(),
        );
        assert!(
            bytes.is_multiple_of(su) && self.ptr.is_multiple_of(su as u64),
            "cast of {bytes} bytes at {:#x} to {}",
            self.ptr,
            U::SUFFIX
        );
        View {
            ptr: self.ptr,
            len: bytes / su,
            _t: PhantomData,
        }
    }
    /// The null view (an absent optional input).
    pub fn null() -> View<'static, T> {
        View {
            ptr: 0,
            len: 0,
            _t: PhantomData,
        }
    }
}

impl<'a, T: Elem> ViewMut<'a, T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
    /// Reborrow read-only.
    pub fn as_view(&self) -> View<'_, T> {
        View {
            ptr: self.ptr,
            len: self.len,
            _t: PhantomData,
        }
    }
    /// Reborrow writable.
    pub fn reborrow(&mut self) -> ViewMut<'_, T> {
        ViewMut {
            ptr: self.ptr,
            len: self.len,
            _t: PhantomData,
        }
    }
    /// The same bytes as elements of `U`, writable (see [`View::cast`]).
    pub fn cast<U: Elem>(self) -> ViewMut<'a, U> {
        let (bytes, su) = (
            self.len * std::mem::size_of::<T>(),
            std::mem::size_of::<U>(),
        );
        assert!(
            bytes.is_multiple_of(su) && self.ptr.is_multiple_of(su as u64),
            "cast of {bytes} bytes at {:#x} to {}",
            self.ptr,
            U::SUFFIX
        );
        ViewMut {
            ptr: self.ptr,
            len: bytes / su,
            _t: PhantomData,
        }
    }
    /// A writable and a read-only handle over the SAME elements, for launchers whose kernel
    /// documents that its output may alias an input (rope `y`/`x`, rmsnorm `dx`/`dy`, …).
    /// Only pass the pair to such a launcher.
    pub fn in_place(&mut self) -> (ViewMut<'_, T>, View<'_, T>) {
        (
            ViewMut {
                ptr: self.ptr,
                len: self.len,
                _t: PhantomData,
            },
            View {
                ptr: self.ptr,
                len: self.len,
                _t: PhantomData,
            },
        )
    }
    /// Two disjoint writable halves `..mid` and `mid..` (e.g. the A and B gradients of one
    /// LoRA slot in the gradient arena); panics when `mid > len` (a programming error).
    pub fn split_at_mut(self, mid: usize) -> (ViewMut<'a, T>, ViewMut<'a, T>) {
        assert!(mid <= self.len, "split at {mid} of {}", self.len);
        let sz = std::mem::size_of::<T>() as u64;
        (
            ViewMut {
                ptr: self.ptr,
                len: mid,
                _t: PhantomData,
            },
            ViewMut {
                ptr: self.ptr + mid as u64 * sz,
                len: self.len - mid,
                _t: PhantomData,
            },
        )
    }
    /// Elements `start..start + len`, writable; panics when out of range (a programming error).
    pub fn slice_mut(&mut self, start: usize, len: usize) -> ViewMut<'_, T> {
        assert!(
            start + len <= self.len,
            "slice {start}+{len} of {}",
            self.len
        );
        ViewMut {
            ptr: self.ptr + (start * std::mem::size_of::<T>()) as u64,
            len,
            _t: PhantomData,
        }
    }
}

/// Managed (unified) memory for the optimizer's paged state: the driver migrates pages between
/// host and device on demand; prefetch explicitly (never oversubscribe the card).
pub struct Managed<T: Elem> {
    ptr: sys::CUdeviceptr,
    len: usize,
    ctx: Arc<CudaContext>,
    _t: PhantomData<T>,
}
// SAFETY: as for Buf.
unsafe impl<T: Elem> Send for Managed<T> {}
unsafe impl<T: Elem> Sync for Managed<T> {}

impl<T: Elem> Managed<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn view(&self) -> View<'_, T> {
        View {
            ptr: self.ptr,
            len: self.len,
            _t: PhantomData,
        }
    }
    pub fn view_mut(&mut self) -> ViewMut<'_, T> {
        ViewMut {
            ptr: self.ptr,
            len: self.len,
            _t: PhantomData,
        }
    }
    /// Host access. The caller must have synchronized every stream that touched it.
    pub fn as_host_slice(&self) -> &[T] {
        // SAFETY: managed memory is host-addressable; len elements were allocated.
        unsafe { std::slice::from_raw_parts(self.ptr as *const T, self.len) }
    }
    pub fn as_host_slice_mut(&mut self) -> &mut [T] {
        // SAFETY: as above, exclusive borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut T, self.len) }
    }
    fn prefetch(&self, loc: sys::CUmemLocation, stream: &Stream) -> Result<()> {
        self.ctx.bind_to_thread().map_err(drv("cuCtxSetCurrent"))?;
        let bytes = self.len * std::mem::size_of::<T>();
        // SAFETY: the range is this allocation.
        unsafe { result::mem_prefetch_async(self.ptr, bytes, loc, stream.raw()) }
            .map_err(drv("cuMemPrefetchAsync"))
    }
    /// Queue migration of all pages to the device on `stream`.
    pub fn prefetch_to_device(&self, stream: &Stream) -> Result<()> {
        let id = self.ctx.ordinal() as i32;
        self.prefetch(
            sys::CUmemLocation {
                type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                id,
            },
            stream,
        )
    }
    /// Queue migration of all pages to host memory on `stream` (frees device memory).
    pub fn prefetch_to_host(&self, stream: &Stream) -> Result<()> {
        self.prefetch(
            sys::CUmemLocation {
                type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST,
                id: 0,
            },
            stream,
        )
    }
}

impl<T: Elem> Drop for Managed<T> {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: owned allocation; the context is alive (we hold an Arc).
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// A CUDA stream.
#[derive(Clone)]
pub struct Stream(Arc<CudaStream>);

impl Stream {
    pub fn raw(&self) -> sys::CUstream {
        self.0.cu_stream()
    }
    pub fn synchronize(&self) -> Result<()> {
        self.0.synchronize().map_err(drv("cuStreamSynchronize"))
    }
    /// Make this stream wait for everything queued so far on `other`.
    pub fn wait_for(&self, other: &Stream) -> Result<()> {
        self.0.join(&other.0).map_err(drv("cuStreamWaitEvent"))
    }
}

/// A timing event pair for benchmarks.
pub struct Timer {
    start: cudarc::driver::CudaEvent,
    end: cudarc::driver::CudaEvent,
}
impl Timer {
    pub fn start(&self, s: &Stream) -> Result<()> {
        self.start.record(&s.0).map_err(drv("cuEventRecord"))
    }
    pub fn stop(&self, s: &Stream) -> Result<()> {
        self.end.record(&s.0).map_err(drv("cuEventRecord"))
    }
    /// Milliseconds between start and stop (waits for stop).
    pub fn elapsed_ms(&self) -> Result<f32> {
        self.end.synchronize().map_err(drv("cuEventSynchronize"))?;
        self.start
            .elapsed_ms(&self.end)
            .map_err(drv("cuEventElapsedTime"))
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Func(sys::CUfunction);
// SAFETY: CUfunction handles are usable from any thread with the context bound.
unsafe impl Send for Func {}
unsafe impl Sync for Func {}

struct Module(sys::CUmodule);
// SAFETY: as for Func.
unsafe impl Send for Module {}

/// Kernel arguments, each copied into 8-byte aligned storage whose address is stable until the
/// launch (cuLaunchKernel copies the values).
#[derive(Default)]
pub struct Args {
    slots: Vec<Box<[u64]>>,
}
impl Args {
    pub fn new() -> Self {
        Self::default()
    }
    /// Push one argument by value (a scalar, a device address or a `#[repr(C)]` struct).
    pub fn arg<A: Copy>(mut self, v: A) -> Self {
        let words = std::mem::size_of::<A>().div_ceil(8).max(1);
        let mut b = vec![0u64; words].into_boxed_slice();
        // SAFETY: b has room for A, is 8-aligned (>= align of every kernel argument type).
        unsafe { std::ptr::write_unaligned(b.as_mut_ptr() as *mut A, v) };
        self.slots.push(b);
        self
    }
    pub fn ptr<T>(self, v: &View<'_, T>) -> Self {
        self.arg(v.ptr)
    }
    pub fn ptr_mut<T>(self, v: &ViewMut<'_, T>) -> Self {
        self.arg(v.ptr)
    }
    fn pointers(&mut self) -> Vec<*mut c_void> {
        self.slots
            .iter_mut()
            .map(|b| b.as_mut_ptr() as *mut c_void)
            .collect()
    }
}

/// An open GPU: everything kernels need.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Stream,
    pool: Arc<Pool>,
    cc: (i32, i32),
    sm_count: u32,
    name: String,
    include_dirs: Vec<PathBuf>,
    cache_dir: Option<PathBuf>,
    modules: Mutex<HashMap<String, Module>>,
    funcs: Mutex<HashMap<String, Func>>,
    /// Kernel files other crates embed (e.g. the optimizer's `cuda/adamw.cu`).
    extra: Mutex<Vec<kernels::KernelSource>>,
    blas: Mutex<Option<crate::blas::BlasLt>>,
    dyn_map: Mutex<Option<Arc<Buf<f32>>>>,
}

impl Device {
    /// Open device `ordinal`. Never panics: a missing driver, NVRTC or cuBLAS library, no
    /// device or a too old one give `Err(CudaError::NoGpu(..))`.
    pub fn open(ordinal: usize) -> Result<Device> {
        // SAFETY: each probe only tries to dlopen the candidate library names.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(NoGpu::NoDriver.into());
        }
        if let Some(dir) = std::env::var_os("QLORA_NVRTC_DIR") {
            nvrtc::preload_from_dir(Path::new(&dir));
        }
        if !nvrtc::is_available() {
            return Err(NoGpu::NoNvrtc.into());
        }
        if !unsafe {
            cudarc::cublas::sys::is_culib_present() && cudarc::cublaslt::sys::is_culib_present()
        } {
            return Err(NoGpu::NoCublas.into());
        }
        // The bindings are generated for CUDA 13.0 (design §2): with an older driver some entry
        // points are missing and cudarc would panic on first use, so refuse it here.
        let mut version = 0i32;
        // SAFETY: out-pointer to a local; cuDriverGetVersion needs no initialisation.
        let r = unsafe { sys::cuDriverGetVersion(&mut version) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(NoGpu::Init(format!("cuDriverGetVersion: {r:?}")).into());
        }
        if version < 13000 {
            return Err(NoGpu::OldDriver {
                found_major: version / 1000,
                found_minor: version % 1000 / 10,
            }
            .into());
        }
        result::init().map_err(|e| NoGpu::Init(format!("{e:?}")))?;
        let count =
            result::device::get_count().map_err(|e| NoGpu::Init(format!("{e:?}")))? as usize;
        if ordinal >= count {
            return Err(NoGpu::NoDevice { ordinal, count }.into());
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| NoGpu::Init(format!("{e:?}")))?;
        let cc = ctx
            .compute_capability()
            .map_err(drv("cuDeviceGetAttribute"))?;
        if cc.0 < 8 {
            return Err(NoGpu::TooOld {
                ordinal,
                major: cc.0,
                minor: cc.1,
            }
            .into());
        }
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(drv("cuDeviceGetAttribute"))? as u32;
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let stream = Stream(ctx.new_stream().map_err(drv("cuStreamCreate"))?);
        let pool = Arc::new(Pool {
            ctx: ctx.clone(),
            inner: Mutex::new(PoolInner {
                free: HashMap::new(),
                cached_bytes: 0,
                live_bytes: 0,
            }),
            exact: std::env::var_os("QLORA_POOL_EXACT").is_some_and(|v| v == "1"),
        });
        Ok(Device {
            ctx,
            stream,
            pool,
            cc,
            sm_count,
            name,
            include_dirs: nvrtc::default_include_dirs(),
            cache_dir: default_cache_dir(),
            modules: Mutex::new(HashMap::new()),
            funcs: Mutex::new(HashMap::new()),
            extra: Mutex::new(Vec::new()),
            blas: Mutex::new(None),
            dyn_map: Mutex::new(None),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }
    /// `sm_90` on an H100.
    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.cc.0, self.cc.1)
    }
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }
    /// The main stream every launcher uses unless given another.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }
    pub fn new_stream(&self) -> Result<Stream> {
        Ok(Stream(
            self.ctx.new_stream().map_err(drv("cuStreamCreate"))?,
        ))
    }
    pub fn timer(&self) -> Result<Timer> {
        let f = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        Ok(Timer {
            start: self.ctx.new_event(f).map_err(drv("cuEventCreate"))?,
            end: self.ctx.new_event(f).map_err(drv("cuEventCreate"))?,
        })
    }
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize()
    }
    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(drv("cuMemGetInfo"))
    }
    /// (live, cached) bytes held by the pool.
    pub fn pool_bytes(&self) -> (usize, usize) {
        let p = self.pool.inner.lock().expect("pool lock");
        (p.live_bytes, p.cached_bytes)
    }
    /// Return cached (free) pool memory to the driver.
    pub fn trim_pool(&self) {
        self.pool.trim();
    }

    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(drv("cuCtxSetCurrent"))
    }

    /// Uninitialised buffer of `len` elements (`what` names it in errors).
    pub fn alloc<T: Elem>(&self, len: usize, what: &str) -> Result<Buf<T>> {
        let (ptr, class) = self.pool.take(len * std::mem::size_of::<T>(), what)?;
        Ok(Buf {
            ptr,
            len,
            class,
            pool: self.pool.clone(),
            _t: PhantomData,
        })
    }
    /// Zero-filled buffer (the fill is queued on the main stream).
    pub fn zeros<T: Elem>(&self, len: usize, what: &str) -> Result<Buf<T>> {
        let mut b = self.alloc::<T>(len, what)?;
        self.memset_zero(&mut b.view_mut())?;
        Ok(b)
    }
    pub fn memset_zero<T: Elem>(&self, v: &mut ViewMut<'_, T>) -> Result<()> {
        // Empty buffers hold no pool block (null pointer): nothing to fill, no driver call.
        if v.len == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the view is inside a live allocation.
        unsafe {
            result::memset_d8_async(
                v.ptr,
                0,
                v.len * std::mem::size_of::<T>(),
                self.stream.raw(),
            )
        }
        .map_err(drv("cuMemsetD8Async"))
    }
    /// Upload (synchronous with respect to the host slice).
    pub fn upload<T: Elem>(&self, host: &[T], what: &str) -> Result<Buf<T>> {
        let mut b = self.alloc::<T>(host.len(), what)?;
        self.copy_in(host, &mut b.view_mut())?;
        Ok(b)
    }
    pub fn copy_in<T: Elem>(&self, host: &[T], dst: &mut ViewMut<'_, T>) -> Result<()> {
        if host.len() != dst.len {
            return Err(bad_arg(
                "copy_in",
                "host",
                format!("{} elements into a view of {}", host.len(), dst.len),
            ));
        }
        if host.is_empty() {
            return Ok(());
        }
        self.bind()?;
        self.stream.synchronize()?;
        // SAFETY: sizes checked; synchronous copy.
        unsafe { result::memcpy_htod_sync(dst.ptr, host) }.map_err(drv("cuMemcpyHtoD"))
    }
    /// Download after waiting for the main stream.
    pub fn download<T: Elem>(&self, v: &View<'_, T>) -> Result<Vec<T>> {
        self.bind()?;
        self.stream.synchronize()?;
        let mut out = vec![T::default(); v.len];
        if out.is_empty() {
            return Ok(out);
        }
        // SAFETY: sizes match; synchronous copy.
        unsafe { result::memcpy_dtoh_sync(&mut out, v.ptr) }.map_err(drv("cuMemcpyDtoH"))?;
        Ok(out)
    }
    /// Device-to-device copy on the main stream.
    pub fn copy<T: Elem>(&self, src: &View<'_, T>, dst: &mut ViewMut<'_, T>) -> Result<()> {
        if src.len != dst.len {
            return Err(bad_arg(
                "copy",
                "dst",
                format!("{} elements into a view of {}", src.len, dst.len),
            ));
        }
        if src.len == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both views are live and the same size.
        unsafe {
            result::memcpy_dtod_async(
                dst.ptr,
                src.ptr,
                src.len * std::mem::size_of::<T>(),
                self.stream.raw(),
            )
        }
        .map_err(drv("cuMemcpyDtoDAsync"))
    }
    /// Managed allocation, zero-initialised on the host (never more than the card has free:
    /// the caller plans the size; paging is explicit prefetching, not oversubscription).
    pub fn alloc_managed<T: Elem>(&self, len: usize, what: &str) -> Result<Managed<T>> {
        self.bind()?;
        let bytes = (len * std::mem::size_of::<T>()).max(1);
        // SAFETY: plain managed allocation in the bound context.
        let ptr =
            unsafe { result::malloc_managed(bytes, sys::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL) }
                .map_err(|e| CudaError::Alloc {
                    what: what.into(),
                    bytes,
                    msg: format!("{e:?}"),
                })?;
        let mut m = Managed {
            ptr,
            len,
            ctx: self.ctx.clone(),
            _t: PhantomData,
        };
        m.as_host_slice_mut().fill(T::default());
        Ok(m)
    }

    /// The signed dynamic map (256 f32) on the device, uploaded once (double-quant scales).
    pub fn dynamic_map(&self) -> Result<Arc<Buf<f32>>> {
        let mut g = self.dyn_map.lock().expect("dyn map lock");
        if let Some(b) = g.as_ref() {
            return Ok(b.clone());
        }
        let b = Arc::new(self.upload(&qlora_nf4::codebook::DYNAMIC_SIGNED, "nf4 dynamic map")?);
        *g = Some(b.clone());
        Ok(b)
    }

    /// Run `f` with the cuBLASLt handle (created on first use).
    pub fn with_blas<R>(&self, f: impl FnOnce(&mut crate::blas::BlasLt) -> Result<R>) -> Result<R> {
        let mut g = self.blas.lock().expect("blas lock");
        if g.is_none() {
            *g = Some(crate::blas::BlasLt::new(self)?);
        }
        f(g.as_mut().expect("set above"))
    }

    /// Make a kernel file that another crate embeds (`include_str!` of `cuda/<file>`) launchable
    /// through [`Device::launch`]; it may `#include "common.cuh"`. Registering a file name
    /// this crate already embeds, or one registered before, keeps the first source.
    pub fn register_source(&self, src: kernels::KernelSource) {
        let mut extra = self.extra.lock().expect("extra lock");
        if kernels::source(src.file).is_none() && !extra.iter().any(|s| s.file == src.file) {
            extra.push(src);
        }
    }

    /// Compile (or fetch from the disk cache) one kernel file for this device's arch and load it.
    fn module(&self, file: &str) -> Result<sys::CUmodule> {
        let mut mods = self.modules.lock().expect("module lock");
        if let Some(m) = mods.get(file) {
            return Ok(m.0);
        }
        let extra = self.extra.lock().expect("extra lock");
        let src = kernels::source(file)
            .or_else(|| extra.iter().find(|s| s.file == file))
            .copied()
            .ok_or_else(|| {
                bad_arg(
                    "module",
                    "file",
                    format!("no embedded or registered kernel source {file}"),
                )
            })?;
        drop(extra);
        let req = CompileRequest {
            file,
            source: src.source,
            headers: HEADERS,
            arch: self.arch(),
            include_dirs: self.include_dirs.clone(),
            ptxas_verbose: false,
        };
        let key = cache_key(
            src.source,
            HEADERS,
            &req.arch,
            &req.options(),
            nvrtc::version()?,
        );
        let cached = self.cache_dir.as_ref().map(|d| {
            d.join(format!(
                "{}-{}.cubin",
                file.trim_end_matches(".cu"),
                &key[..24]
            ))
        });
        let cubin = match cached.as_ref().and_then(|p| std::fs::read(p).ok()) {
            Some(c) => c,
            None => {
                let c = nvrtc::compile_cubin(&req)?.cubin;
                if let Some(p) = &cached {
                    write_atomic(p, &c)?;
                }
                c
            }
        };
        self.bind()?;
        // SAFETY: a CUBIN image NVRTC produced for this arch; the driver copies it.
        let m = unsafe { result::module::load_data(cubin.as_ptr() as *const c_void) }
            .map_err(drv("cuModuleLoadData"))?;
        mods.insert(file.to_string(), Module(m));
        Ok(m)
    }

    /// The entry `entry` of kernel file `file`.
    pub(crate) fn func(&self, file: &str, entry: &str) -> Result<Func> {
        let key = format!("{file}/{entry}");
        if let Some(f) = self.funcs.lock().expect("func lock").get(&key) {
            return Ok(*f);
        }
        let m = self.module(file)?;
        let name = CString::new(entry).map_err(|_| bad_arg("func", "entry", entry))?;
        // SAFETY: module is loaded and alive for the device's lifetime.
        let f = unsafe { result::module::get_function(m, name) }.map_err(|_| {
            CudaError::MissingEntry {
                file: file.into(),
                entry: entry.into(),
            }
        })?;
        let f = Func(f);
        self.funcs.lock().expect("func lock").insert(key, f);
        Ok(f)
    }

    /// Compile every embedded kernel file now (so the first training step does not pay for it).
    pub fn warm_up(&self) -> Result<()> {
        for s in kernels::SOURCES {
            self.module(s.file)?;
        }
        Ok(())
    }

    /// Launch `entry` of `file` with `geo` on `stream` (the main stream when None).
    pub fn launch(
        &self,
        file: &str,
        entry: &str,
        geo: Geometry,
        args: Args,
        stream: Option<&Stream>,
    ) -> Result<()> {
        let f = self.func(file, entry)?;
        self.bind()?;
        if geo.smem > 48 * 1024 {
            // SAFETY: raising the dynamic shared memory limit of a loaded function.
            unsafe {
                result::function::set_function_attribute(
                    f.0,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    geo.smem as i32,
                )
            }
            .map_err(drv("cuFuncSetAttribute"))?;
        }
        let mut args = args;
        let mut params = args.pointers();
        let s = stream.unwrap_or(&self.stream).raw();
        // SAFETY: the launcher passes exactly the kernel's parameter list (checked by each op's
        // GPU test); device pointers come from live views.
        unsafe { result::launch_kernel(f.0, geo.grid, geo.block, geo.smem, s, &mut params) }
            .map_err(|e| CudaError::Driver {
                op: format!("launch {entry}"),
                msg: format!("{e:?}"),
            })
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
        *self.blas.lock().expect("blas lock") = None;
        if self.ctx.bind_to_thread().is_ok() {
            for (_, m) in self.modules.lock().expect("module lock").drain() {
                // SAFETY: no launches are in flight after the synchronize above.
                let _ = unsafe { result::module::unload(m.0) };
            }
        }
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let err = |e: std::io::Error| CudaError::Cache {
        path: path.into(),
        msg: e.to_string(),
    };
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(err)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, data).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_without_gpu_is_a_typed_error_not_a_panic() {
        // On a machine with a GPU this opens it; on CI (no driver) it must be NoGpu.
        match Device::open(0) {
            Ok(d) => assert!(d.compute_capability().0 >= 8),
            Err(CudaError::NoGpu(e)) => eprintln!("no GPU, as expected here: {e}"),
            Err(e) => panic!("unexpected error kind: {e}"),
        }
        // An absurd ordinal is always an error, never a panic.
        assert!(Device::open(1 << 20).is_err());
    }

    #[test]
    fn cache_key_depends_on_every_field() {
        let o = vec!["--gpu-architecture=sm_90".to_string()];
        let k = cache_key("src", &[("a.cuh", "x")], "sm_90", &o, (13, 0));
        assert_eq!(k.len(), 64);
        assert_eq!(k, cache_key("src", &[("a.cuh", "x")], "sm_90", &o, (13, 0)));
        assert_ne!(
            k,
            cache_key("src2", &[("a.cuh", "x")], "sm_90", &o, (13, 0))
        );
        assert_ne!(k, cache_key("src", &[("a.cuh", "y")], "sm_90", &o, (13, 0)));
        assert_ne!(k, cache_key("src", &[("a.cuh", "x")], "sm_80", &o, (13, 0)));
        assert_ne!(
            k,
            cache_key("src", &[("a.cuh", "x")], "sm_90", &[], (13, 0))
        );
        assert_ne!(k, cache_key("src", &[("a.cuh", "x")], "sm_90", &o, (13, 1)));
        // Moving bytes between fields changes the key (length prefixes).
        assert_ne!(
            cache_key("ab", &[("c", "")], "sm_90", &o, (13, 0)),
            cache_key("a", &[("bc", "")], "sm_90", &o, (13, 0))
        );
    }

    #[test]
    fn pool_classes() {
        assert_eq!(pool_class(0), 512);
        assert_eq!(pool_class(1), 512);
        assert_eq!(pool_class(513), 1024);
        assert_eq!(pool_class(2 << 20), 2 << 20);
        assert_eq!(pool_class((2 << 20) + 1), 4 << 20);
        // Llama-3-8B gate/up/down NF4 codes: 14336·4096/2 bytes = 28 MiB, held exactly.
        assert_eq!(pool_class(14336 * 4096 / 2), 28 << 20);
        assert_eq!(pool_class((28 << 20) + 1), 30 << 20);
        for b in [1usize, 700, 5000, 1 << 20, (100 << 20) + 3] {
            assert!(pool_class(b) >= b);
        }
    }

    #[test]
    fn args_are_aligned_and_sized() {
        #[derive(Clone, Copy)]
        #[repr(C)]
        struct S {
            a: u64,
            b: f32,
            c: i32,
            d: u64,
        }
        let mut a = Args::new().arg(1u64).arg(2.5f32).arg(S {
            a: 1,
            b: 2.0,
            c: 3,
            d: 4,
        });
        let p = a.pointers();
        assert_eq!(p.len(), 3);
        for q in &p {
            assert_eq!(*q as usize % 8, 0);
        }
        // SAFETY: reading back what was written.
        unsafe {
            assert_eq!(*(p[1] as *const f32), 2.5);
            assert_eq!((*(p[2] as *const S)).d, 4);
        }
    }
}
