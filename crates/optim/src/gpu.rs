//! The CUDA optimizer: the same update as [`crate::AdamW`] (bit for bit: same chunk table, same
//! scalars, same f64 norm order, IEEE intrinsics in `cuda/adamw.cu`), one `qlr_adamw_step_f32`
//! launch per step over the whole arena, one `qlr_adamw_sumsq_f32` launch before it when
//! clipping is on, and the state arena either in plain device memory or in managed memory paged
//! under a [`PagingPolicy`].
//!
//! Everything runs on the device's main stream (the stream the trainer's forward/backward use),
//! so the update is ordered after the backward that wrote the gradients without extra events;
//! prefetches are queued on the same stream and the step synchronizes once, when it reads back
//! the two words of its report (non-finite count, gradient norm).

use crate::arena::StateLayout;
use crate::cpu::{AdamW, StepReport};
use crate::error::{OptimError, Result};
use crate::launch::update_dims;
use crate::paging::{check_fits, DeviceMemory, PagingPolicy};
use crate::{clip, dynamic_map};
use qlora_cuda::{Args, Buf, Device, Geometry, Managed, View, ViewMut};

const FILE: &str = "adamw.cu";

fn cuda(e: qlora_cuda::CudaError) -> OptimError {
    OptimError::Cuda(e.to_string())
}

/// Where the state arena lives on the GPU side.
enum StateMemory {
    /// Plain device memory (unpaged).
    Device(Buf<u32>),
    /// Unified memory, prefetched to the device for the step and back per the policy.
    Managed(Managed<u32>),
}

/// `cuda/adamw.cu`'s `QlrAdamwState`: device addresses of the six sections.
#[repr(C)]
#[derive(Clone, Copy)]
struct StatePtrs {
    m32: u64,
    v32: u64,
    absmax_m: u64,
    absmax_v: u64,
    m8: u64,
    v8: u64,
}

/// What one GPU step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GpuStepReport {
    pub step: StepReport,
    /// Bytes of device memory the page-out after this step frees for the next forward/backward
    /// (0 when the state stayed resident or is unpaged).
    pub paged_out_bytes: u64,
    /// Whether the state is resident on the device after the step.
    pub resident: bool,
}

/// AdamW on the GPU over a device parameter arena.
pub struct GpuAdamW {
    host: AdamW,
    state: StateMemory,
    policy: PagingPolicy,
    resident: bool,
    /// The chunk table, (n_chunks · 8,) u32 (32-byte `Chunk`s).
    chunks: Buf<u32>,
    /// (512,) f32: the signed then the unsigned dynamic map.
    maps: Buf<f32>,
    /// (n_tensors + 1,) u32: first chunk of each tensor.
    first_chunk: Buf<u32>,
    /// (2 · n_chunks,) u32 = (n_chunks,) f64 per-chunk sums of squares.
    partials: Buf<u32>,
    /// (2,) f32 {clip coefficient, total norm}, written by the sumsq kernel.
    clip: Buf<f32>,
    /// (4,) u32: [0] the sumsq block counter, [2..4] the u64 non-finite count.
    counters: Buf<u32>,
}

impl GpuAdamW {
    /// Bytes of the plain device allocations [`GpuAdamW::new`] makes beside the state arena,
    /// for the memory planner: the chunk table (32 B a chunk), the two dynamic maps (2 × 256
    /// f32), the first chunk of each tensor (`n_tensors + 1` u32), the per-chunk f64 norm
    /// partials, `clip` (2 f32) and `counters` (4 u32). Paged or not, these stay on the device.
    pub fn table_bytes(layout: &crate::ArenaLayout, state: &StateLayout) -> [usize; 6] {
        let n_chunks = crate::arena::chunk_table(layout, state).len();
        [
            // An empty table is uploaded as one word.
            if n_chunks == 0 {
                4
            } else {
                std::mem::size_of::<crate::Chunk>() * n_chunks
            },
            4 * 512,
            4 * (layout.tensors().len() + 1),
            8 * n_chunks.max(1),
            4 * 2,
            4 * 4,
        ]
    }

    /// Moves `host` (fresh or loaded) to the device. `paged`: keep the state in managed memory
    /// under `policy` (refused with [`OptimError::WouldOversubscribe`] when the state does not
    /// fit in free device memory); otherwise plain device memory and `policy` is ignored.
    pub fn new(dev: &Device, host: AdamW, paged: bool, policy: PagingPolicy) -> Result<GpuAdamW> {
        let sl: &StateLayout = host.state_layout();
        let words = sl.total_bytes / 4;
        let src: &[u32] = bytemuck::cast_slice(host.state().bytes());
        let state = if paged {
            let (free, _) = dev.mem_info().map_err(cuda)?;
            check_fits(sl.total_bytes as u64, free as u64)?;
            let mut m = dev
                .alloc_managed::<u32>(words.max(1), "optimizer state arena")
                .map_err(cuda)?;
            m.as_host_slice_mut()[..words].copy_from_slice(src);
            StateMemory::Managed(m)
        } else {
            let mut b = dev
                .zeros::<u32>(words.max(1), "optimizer state arena")
                .map_err(cuda)?;
            dev.copy_in(src, &mut b.slice_mut(0, words)).map_err(cuda)?;
            StateMemory::Device(b)
        };
        let chunk_words: &[u32] = bytemuck::cast_slice(host.chunks());
        let n_chunks = host.chunks().len();
        let chunks = dev
            .upload(
                if chunk_words.is_empty() {
                    &[0]
                } else {
                    chunk_words
                },
                "adamw chunk table",
            )
            .map_err(cuda)?;
        let mut m = dynamic_map::dynamic_signed().to_vec();
        m.extend_from_slice(&dynamic_map::dynamic_unsigned());
        let maps = dev.upload(&m, "adamw dynamic maps").map_err(cuda)?;
        let first = clip::tensor_first_chunk(host.chunks(), host.layout().tensors().len());
        let first_chunk = dev.upload(&first, "adamw first chunk").map_err(cuda)?;
        let partials = dev
            .alloc::<u32>(2 * n_chunks.max(1), "adamw norm partials")
            .map_err(cuda)?;
        let clip = dev.zeros::<f32>(2, "adamw clip").map_err(cuda)?;
        let counters = dev.zeros::<u32>(4, "adamw counters").map_err(cuda)?;
        Ok(GpuAdamW {
            host,
            state,
            policy: if paged { policy } else { PagingPolicy::Never },
            resident: !paged,
            chunks,
            maps,
            first_chunk,
            partials,
            clip,
            counters,
        })
    }

    /// Configuration, layout and step count (the state in it is stale until [`GpuAdamW::to_host`]).
    pub fn host(&self) -> &AdamW {
        &self.host
    }

    /// Bytes of the state arena.
    pub fn state_bytes(&self) -> usize {
        self.host.state_bytes()
    }

    /// Whether the state is on the device now.
    pub fn resident(&self) -> bool {
        self.resident
    }

    fn base(&self) -> u64 {
        match &self.state {
            StateMemory::Device(b) => b.view().device_ptr(),
            StateMemory::Managed(m) => m.view().device_ptr(),
        }
    }

    fn ptrs(&self) -> StatePtrs {
        let b = self.base();
        let sl = self.host.state_layout();
        let at = |s: crate::arena::Section| b + s.offset as u64;
        StatePtrs {
            m32: at(sl.m32),
            v32: at(sl.v32),
            absmax_m: at(sl.absmax_m),
            absmax_v: at(sl.absmax_v),
            m8: at(sl.m8),
            v8: at(sl.v8),
        }
    }

    /// One step at learning rate `lr` over the device arenas `params` and `grads` (length
    /// `layout.len()`). `next_need`: bytes the next forward/backward will allocate (for
    /// [`PagingPolicy::AboveBytes`]). Synchronizes the main stream once.
    pub fn step(
        &mut self,
        dev: &Device,
        params: &mut ViewMut<'_, f32>,
        grads: &View<'_, f32>,
        lr: f64,
        next_need: u64,
    ) -> Result<GpuStepReport> {
        let want = self.host.layout().len();
        let step = self.host.steps() + 1;
        for (what, got) in [("parameter", params.len()), ("gradient", grads.len())] {
            if got != want {
                return Err(OptimError::ArenaLength {
                    step,
                    what,
                    got,
                    want,
                });
            }
        }
        let s = self.host.next_scalars(lr, 1.0)?;
        let stream = dev.stream();
        let bytes = self.state_bytes() as u64;
        if let (StateMemory::Managed(m), false) = (&self.state, self.resident) {
            let (free, _) = dev.mem_info().map_err(cuda)?;
            check_fits(bytes, free as u64)?;
            m.prefetch_to_device(stream).map_err(cuda)?;
            self.resident = true;
        }
        let n_chunks = self.host.chunks().len();
        let clipping = self.host.config().max_grad_norm;
        if let Some(dims) = update_dims(n_chunks, dev.sm_count()) {
            let geo = Geometry {
                grid: (dims.grid, 1, 1),
                block: (dims.block, 1, 1),
                smem: dims.shared_bytes,
            };
            if let Some(max_norm) = clipping {
                let args = Args::new()
                    .arg(self.partials.view().device_ptr())
                    .arg(self.clip.view().device_ptr())
                    .arg(self.counters.view().device_ptr())
                    .ptr(grads)
                    .arg(self.chunks.view().device_ptr())
                    .arg(self.first_chunk.view().device_ptr())
                    .arg(max_norm as f32)
                    .arg(n_chunks as i32)
                    .arg(self.host.layout().tensors().len() as i32);
                dev.launch(FILE, "qlr_adamw_sumsq_f32", geo, args, None)
                    .map_err(cuda)?;
            }
            let clip_ptr = if clipping.is_some() {
                self.clip.view().device_ptr()
            } else {
                0u64
            };
            let args = Args::new()
                .ptr_mut(params)
                .arg(self.ptrs())
                .arg(self.counters.view().device_ptr() + 8)
                .ptr(grads)
                .arg(self.chunks.view().device_ptr())
                .arg(self.maps.view().device_ptr())
                .arg(clip_ptr)
                .arg(s)
                .arg(n_chunks as i32);
            dev.launch(FILE, "qlr_adamw_step_f32", geo, args, None)
                .map_err(cuda)?;
        }
        let mut paged_out = 0u64;
        if let StateMemory::Managed(m) = &self.state {
            let (free, total) = dev.mem_info().map_err(cuda)?;
            let mem = DeviceMemory {
                free: free as u64,
                total: total as u64,
            };
            if self.policy.page_out(mem, next_need) {
                m.prefetch_to_host(stream).map_err(cuda)?;
                self.resident = false;
                paged_out = bytes;
            }
        }
        // The one synchronization of the step (download waits for the stream).
        let counters = dev.download(&self.counters.view()).map_err(cuda)?;
        let nonfinite = counters[2] as u64 | (counters[3] as u64) << 32;
        let (grad_norm, grad_scale) = if clipping.is_some() {
            let c = dev.download(&self.clip.view()).map_err(cuda)?;
            (Some(c[1]), c[0])
        } else {
            (None, 1.0)
        };
        let mut cnt = self.counters.slice_mut(2, 2);
        dev.memset_zero(&mut cnt).map_err(cuda)?;
        self.host.advance();
        Ok(GpuStepReport {
            step: StepReport {
                step: self.host.steps(),
                lr,
                grad_norm,
                grad_scale,
                nonfinite,
            },
            paged_out_bytes: paged_out,
            resident: self.resident,
        })
    }

    /// Copies the device state into the host optimizer (for `save`, inspection or the CPU
    /// comparison) and returns it.
    pub fn to_host(&mut self, dev: &Device) -> Result<&AdamW> {
        let words = self.state_bytes() / 4;
        dev.synchronize().map_err(cuda)?;
        let data: Vec<u32> = match &self.state {
            StateMemory::Device(b) => dev.download(&b.slice(0, words)).map_err(cuda)?,
            StateMemory::Managed(m) => m.as_host_slice()[..words].to_vec(),
        };
        self.host
            .state_mut()
            .bytes_mut()
            .copy_from_slice(bytemuck::cast_slice(&data));
        Ok(&self.host)
    }
}
