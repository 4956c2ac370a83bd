//! [`PlanBackend`]: a dry-run [`Backend`] whose ops do no math. Its buffers hold no data: each
//! is a length and, while recording, an offset in an [`ArenaPlanner`] (freed on drop), so
//! running the real schedule on it yields the exact arena the schedule needs, with every
//! buffer's role at the peak.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use super::arena::ArenaPlanner;
use crate::backend::{AttnDims, Backend, FrozenWeight, LinearDims, LoraArgs, RopeDims};
use crate::error::Result;

/// Alignment of every arena buffer, bytes (cuBLASLt and vectorized kernels want ≥ 16; 256
/// keeps each buffer on its own cache-line/sector boundary).
pub const ARENA_ALIGN: usize = 256;

/// What a buffer of the step arena is for (decided by the first op that writes it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Written by a forward op (incl. recompute): saved set, layer working set, layer inputs,
    /// the rope table.
    Activation,
    /// Written first by a backward op: gradients of activations (`d_h`, the `Scratch` set).
    Scratch,
    /// The logits and log-sum-exp of the loss (what a chunked lm_head + CE keeps per chunk).
    Loss,
}

/// The buffer layouts of the backend being planned for, where they differ between backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `CpuBackend`: attention saves the probabilities `(B, H, Tq, Tk)`; the rope table is the
    /// `(P, D)` cos/sin table; every buffer is in the compute dtype.
    Cpu,
    /// `CudaBackend` (crates/train/src/cuda): attention saves a packed f32 block, the
    /// log-sum-exp `(B, H, Tq)` rounded up to 4 elements then the bf16 output two per f32
    /// element (`CudaBackend::attention_saved_len`); the rope table is the `(D/2,)` inverse
    /// frequencies then `(P,)` positions, f32 (`CudaBackend::rope_table`); `zeros_f32` /
    /// `upload_f32` buffers are f32.
    Cuda,
}

impl Layout {
    /// Elements attention saves for `dims` (f32 elements on CUDA, compute dtype on the CPU).
    pub fn attention_saved_len(self, dims: AttnDims) -> usize {
        match self {
            Layout::Cpu => crate::cpu::attention::saved_len(dims),
            Layout::Cuda => {
                let lse = (dims.b * dims.h * dims.tq).div_ceil(4) * 4;
                let o = (dims.b * dims.tq * dims.h * dims.d).div_ceil(2);
                lse + o
            }
        }
    }
    /// `(elements, bytes per element)` of the rope table for `positions`, head dim `d`.
    pub fn rope_table(self, d: usize, positions: usize, elem_bytes: usize) -> (usize, usize) {
        match self {
            Layout::Cpu => (positions * d, elem_bytes),
            Layout::Cuda => (d / 2 + positions, 4),
        }
    }
}

#[derive(Default)]
struct State {
    arena: ArenaPlanner,
    recording: bool,
    next_id: u64,
    /// id → (offset, bytes) of the live arena buffers.
    live: BTreeMap<u64, (usize, usize)>,
    /// First writer's role, by buffer id (kept after the buffer is freed).
    roles: HashMap<u64, Role>,
    /// Ids and block sizes live when the live total reached its maximum.
    peak: Vec<(u64, usize)>,
    peak_phase: Phase,
    phase: Phase,
    allocations: usize,
    /// Block size of every arena buffer ever allocated, by id.
    sizes: HashMap<u64, usize>,
    /// The same allocations through a model of qlora-cuda's caching pool
    /// (`qlora_cuda::device::pool_class` size classes, one free list per class, nothing
    /// returned to the driver): live class by id, free blocks by class, bytes held.
    pool_live: HashMap<u64, usize>,
    pool_free: HashMap<usize, usize>,
    pool_held: usize,
}

/// Where in the step the schedule is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    #[default]
    Forward,
    /// After the cross-entropy forward, before any layer's backward.
    Loss,
    Backward,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Loss => "loss",
            Phase::Backward => "backward",
        }
    }
}

/// A dry-run buffer: a length and, when allocated while recording, an arena offset.
pub struct PlanBuf {
    id: u64,
    len: usize,
    offset: Option<usize>,
    state: Arc<Mutex<State>>,
}

impl PlanBuf {
    /// Arena offset (bytes) when the buffer was allocated while recording and is not empty.
    pub fn offset(&self) -> Option<usize> {
        self.offset
    }
}

impl Drop for PlanBuf {
    fn drop(&mut self) {
        if let Some(off) = self.offset {
            let mut st = lock(&self.state);
            st.arena.free(off);
            st.live.remove(&self.id);
            if let Some(class) = st.pool_live.remove(&self.id) {
                *st.pool_free.entry(class).or_insert(0) += 1;
            }
        }
    }
}

/// A frozen weight's shape; no data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanFrozen {
    pub out_features: usize,
    pub in_features: usize,
}

/// The dry-run backend. `elem_bytes` is the compute dtype's size (2 for bf16, 4 for f32).
pub struct PlanBackend {
    elem_bytes: usize,
    layout: Layout,
    state: Arc<Mutex<State>>,
}

fn lock(s: &Arc<Mutex<State>>) -> MutexGuard<'_, State> {
    // A panic while the lock is held leaves the plain bookkeeping consistent enough to read.
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sizes and roles of the step arena after a recorded run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArenaReport {
    /// Arena bytes the recorded sequence needs (offsets included).
    pub high_water: usize,
    /// Largest live total; `high_water − peak_live` is fragmentation.
    pub peak_live: usize,
    /// Bytes by role of the buffers live at `peak_live`.
    pub activations: usize,
    pub scratch: usize,
    pub loss: usize,
    pub peak_phase: Phase,
    /// Buffers allocated in the arena.
    pub allocations: usize,
    /// Bytes qlora-cuda's caching pool holds after the step when it serves exactly these
    /// allocations in this order (size-class rounding, per-class reuse only).
    pub pool_held: usize,
    /// Block bytes of every buffer with the loss role (the schedule's logits and lse, live
    /// together), whether or not they are live at the peak.
    pub loss_working_set: usize,
}

impl PlanBackend {
    pub fn new(elem_bytes: usize, layout: Layout) -> PlanBackend {
        PlanBackend {
            elem_bytes,
            layout,
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    /// From now on, buffers are placed in a fresh arena (before: resident, not planned).
    pub fn start_recording(&self) {
        let mut st = lock(&self.state);
        *st = State {
            recording: true,
            next_id: st.next_id,
            ..State::default()
        };
    }

    /// Stop recording and report the arena.
    pub fn finish(&self) -> ArenaReport {
        let mut st = lock(&self.state);
        st.recording = false;
        let mut by = [0usize; 3];
        for &(id, bytes) in &st.peak {
            let i = match st.roles.get(&id).copied().unwrap_or(Role::Activation) {
                Role::Activation => 0,
                Role::Scratch => 1,
                Role::Loss => 2,
            };
            by[i] += bytes;
        }
        ArenaReport {
            high_water: st.arena.high_water(),
            peak_live: st.arena.peak_live(),
            activations: by[0],
            scratch: by[1],
            loss: by[2],
            peak_phase: st.peak_phase,
            allocations: st.allocations,
            pool_held: st.pool_held,
            loss_working_set: st
                .roles
                .iter()
                .filter(|(_, &r)| r == Role::Loss)
                .filter_map(|(id, _)| st.sizes.get(id))
                .sum(),
        }
    }

    /// `len` elements of `elem` bytes.
    fn alloc(&self, len: usize, elem: usize) -> PlanBuf {
        let mut st = lock(&self.state);
        let id = st.next_id;
        st.next_id += 1;
        let offset = (st.recording && len > 0).then(|| {
            let before = st.arena.peak_live();
            let off = st.arena.alloc(len * elem, ARENA_ALIGN);
            let size = st.arena.size_of(off).unwrap_or(0);
            st.live.insert(id, (off, size));
            st.sizes.insert(id, size);
            let class = qlora_cuda::device::pool_class(len * elem);
            match st.pool_free.get_mut(&class) {
                Some(n) if *n > 0 => *n -= 1,
                _ => st.pool_held += class,
            }
            st.pool_live.insert(id, class);
            st.allocations += 1;
            if st.arena.peak_live() > before {
                st.peak = st.live.iter().map(|(&i, &(_, b))| (i, b)).collect();
                st.peak_phase = st.phase;
            }
            off
        });
        PlanBuf {
            id,
            len,
            offset,
            state: Arc::clone(&self.state),
        }
    }

    /// The first writer of `b` decides its role.
    fn wrote(&self, b: &PlanBuf, role: Role) {
        lock(&self.state).roles.entry(b.id).or_insert(role);
    }
    fn bwd(&self, outs: &[&PlanBuf]) {
        let mut st = lock(&self.state);
        st.phase = Phase::Backward;
        for b in outs {
            st.roles.entry(b.id).or_insert(Role::Scratch);
        }
    }
}

impl Backend for PlanBackend {
    type Buf = PlanBuf;
    type Frozen = PlanFrozen;

    fn name(&self) -> String {
        format!("plan ({}-byte elements)", self.elem_bytes)
    }
    fn zeros(&self, n: usize) -> PlanBuf {
        self.alloc(n, self.elem_bytes)
    }
    fn upload(&self, host: &[f32]) -> PlanBuf {
        self.alloc(host.len(), self.elem_bytes)
    }
    fn zeros_f32(&self, n: usize) -> PlanBuf {
        self.alloc(n, 4)
    }
    fn upload_f32(&self, host: &[f32]) -> PlanBuf {
        self.alloc(host.len(), 4)
    }
    fn rope_table(&self, inv_freq: &[f64], positions: usize) -> PlanBuf {
        let (len, elem) = self
            .layout
            .rope_table(2 * inv_freq.len(), positions, self.elem_bytes);
        let b = self.alloc(len, elem);
        self.wrote(&b, Role::Activation);
        b
    }
    /// A dry-run buffer holds no values: zeros of its length.
    fn download(&self, buf: &PlanBuf) -> Vec<f32> {
        vec![0.0; buf.len]
    }
    fn len(&self, buf: &PlanBuf) -> usize {
        buf.len
    }
    fn frozen(&self, _name: &str, _w: FrozenWeight, out: usize, inp: usize) -> Result<PlanFrozen> {
        Ok(PlanFrozen {
            out_features: out,
            in_features: inp,
        })
    }
    /// Shapes only: nothing is quantized.
    #[allow(clippy::too_many_arguments)]
    fn quantize_frozen(
        &self,
        _name: &str,
        _data: Vec<f32>,
        out: usize,
        inp: usize,
        _qb: usize,
        _double_quant: bool,
        _dtype: qlora_nf4::Dtype,
    ) -> Result<PlanFrozen> {
        Ok(PlanFrozen {
            out_features: out,
            in_features: inp,
        })
    }
    /// A dry-run weight holds no values: zeros of its shape.
    fn frozen_to_f32(&self, w: &PlanFrozen) -> Vec<f32> {
        vec![0.0; w.out_features * w.in_features]
    }
    fn copy(&self, dst: &mut PlanBuf, _: usize, _: &PlanBuf, _: usize, _: usize) {
        self.wrote(dst, Role::Activation);
    }
    fn zero(&self, dst: &mut PlanBuf) {
        self.wrote(dst, Role::Activation);
    }
    fn add_acc(&self, dst: &mut PlanBuf, _: &PlanBuf) {
        self.wrote(dst, Role::Activation);
    }
    fn embedding_fwd(&self, out: &mut PlanBuf, _: &[u32], _: &PlanBuf, _: usize, _: usize) {
        self.wrote(out, Role::Activation);
    }
    /// As the backend planned for: `CudaBackend` keeps the table on the host.
    fn embedding_on_host(&self) -> bool {
        self.layout == Layout::Cuda
    }
    fn embedding_fwd_host(&self, out: &mut PlanBuf, _: &[u32], _: &[f32], _: usize) {
        self.wrote(out, Role::Activation);
    }
    fn embedding_bwd_acc(&self, d: &mut PlanBuf, _: usize, _: &[u32], _: &PlanBuf, _: usize) {
        self.bwd(&[d]);
    }
    fn rmsnorm_fwd(
        &self,
        out: &mut PlanBuf,
        rstd: &mut PlanBuf,
        _: &PlanBuf,
        _: &PlanBuf,
        _: usize,
        _: f64,
    ) {
        self.wrote(out, Role::Activation);
        self.wrote(rstd, Role::Activation);
    }
    fn rmsnorm_bwd(
        &self,
        d_x: &mut PlanBuf,
        _: &PlanBuf,
        _: &PlanBuf,
        _: &PlanBuf,
        _: &PlanBuf,
        _: usize,
    ) {
        self.bwd(&[d_x]);
    }
    fn rope_fwd(&self, x: &mut PlanBuf, _: &PlanBuf, _: RopeDims) {
        self.wrote(x, Role::Activation);
    }
    fn rope_bwd(&self, d_x: &mut PlanBuf, _: &PlanBuf, _: RopeDims) {
        self.bwd(&[d_x]);
    }
    fn attention_saved_len(&self, dims: AttnDims) -> usize {
        self.layout.attention_saved_len(dims)
    }
    fn attention_fwd(
        &self,
        out: &mut PlanBuf,
        saved: &mut PlanBuf,
        _: &PlanBuf,
        _: &PlanBuf,
        _: &PlanBuf,
        _: AttnDims,
    ) {
        self.wrote(out, Role::Activation);
        self.wrote(saved, Role::Activation);
    }
    fn attention_bwd(
        &self,
        d_q: &mut PlanBuf,
        d_k: &mut PlanBuf,
        d_v: &mut PlanBuf,
        _: &PlanBuf,
        _: &PlanBuf,
        _: &PlanBuf,
        _: &PlanBuf,
        _: &PlanBuf,
        _: AttnDims,
    ) {
        self.bwd(&[d_q, d_k, d_v]);
    }
    fn swiglu_fwd(&self, out: &mut PlanBuf, _: &PlanBuf, _: &PlanBuf) {
        self.wrote(out, Role::Activation);
    }
    fn swiglu_bwd(
        &self,
        d_gate: &mut PlanBuf,
        d_up: &mut PlanBuf,
        _: &PlanBuf,
        _: &PlanBuf,
        _: &PlanBuf,
    ) {
        self.bwd(&[d_gate, d_up]);
    }
    fn nf4_lora_linear_fwd(
        &self,
        y: &mut PlanBuf,
        u: Option<&mut PlanBuf>,
        _: &PlanBuf,
        _: &PlanFrozen,
        _: Option<&PlanBuf>,
        _: Option<(&PlanBuf, LoraArgs<'_>)>,
        _: LinearDims,
    ) {
        self.wrote(y, Role::Activation);
        if let Some(u) = u {
            self.wrote(u, Role::Activation);
        }
    }
    fn nf4_lora_linear_bwd(
        &self,
        d_x: Option<&mut PlanBuf>,
        _: bool,
        grads: Option<&mut PlanBuf>,
        _: &PlanBuf,
        _: &PlanBuf,
        _: Option<&PlanBuf>,
        _: &PlanFrozen,
        _: Option<(&PlanBuf, LoraArgs<'_>)>,
        _: LinearDims,
    ) {
        let mut outs = Vec::new();
        if let Some(d) = d_x.as_deref() {
            outs.push(d);
        }
        if let Some(g) = grads.as_deref() {
            outs.push(g);
        }
        self.bwd(&outs);
    }
    fn dense_linear_fwd(&self, y: &mut PlanBuf, _: &PlanBuf, _: &PlanBuf, _: usize, _: LinearDims) {
        self.wrote(y, Role::Activation);
    }
    fn dense_linear_bwd(
        &self,
        d_x: &mut PlanBuf,
        grads: &mut PlanBuf,
        _: &PlanBuf,
        _: &PlanBuf,
        _: &PlanBuf,
        _: usize,
        _: LinearDims,
    ) {
        self.bwd(&[d_x, grads]);
    }
    /// Marks `logits` and `lse` as the loss working set; returns a zero loss over the
    /// non-ignored targets (the count is exact, the sum is not computed).
    fn cross_entropy_fwd(
        &self,
        lse: &mut PlanBuf,
        logits: &PlanBuf,
        targets: &[i32],
        _: usize,
    ) -> (f64, usize) {
        let mut st = lock(&self.state);
        st.roles.insert(lse.id, Role::Loss);
        st.roles.insert(logits.id, Role::Loss);
        st.phase = Phase::Loss;
        let count = targets
            .iter()
            .filter(|&&t| t != crate::cpu::cross_entropy::IGNORE_INDEX)
            .count();
        (0.0, count)
    }
    fn cross_entropy_bwd(&self, logits: &mut PlanBuf, _: &PlanBuf, _: &[i32], _: usize, _: f64) {
        self.wrote(logits, Role::Loss);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_model_rounds_to_classes_and_reuses_within_a_class() {
        let be = PlanBackend::new(4, Layout::Cpu);
        be.start_recording();
        let a = be.zeros(250); // 1000 B → 1024-byte class
        drop(a);
        let b = be.zeros(150); // 600 B → the cached 1024-byte block
        let c = be.zeros(750); // 3000 B → a new 4096-byte block
        drop((b, c));
        let d = be.zeros(100); // 400 B → 512-byte class: new
        drop(d);
        let r = be.finish();
        assert_eq!(r.pool_held, 1024 + 4096 + 512);
        // The exact arena: 1024 (reused for 600 → 768), then 768 + 3072 at most live.
        assert_eq!(r.peak_live, 768 + 3072);
        assert_eq!(r.high_water, 768 + 3072);
        assert_eq!(r.allocations, 4);
    }
}
