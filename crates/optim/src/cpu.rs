//! The CPU optimizer: one call per step over the whole parameter arena (rayon over the chunk
//! table), the reference the CUDA launch is checked against and the optimizer of the CPU
//! trainer.

use crate::adamw::{update_f32, AdamWConfig, StepScalars};
use crate::arena::{
    chunk_table, ArenaLayout, Chunk, StateArena, StateKind, StateLayout, CHUNK32, QBLOCK,
};
use crate::blockwise8::{update_block, BlockState, Maps};
use crate::clip;
use crate::error::{OptimError, Result};
use crate::schedule::LrSchedule;
use rayon::prelude::*;

/// What one step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// 1-based index of the step just taken (PyTorch's `state["step"]`).
    pub step: u64,
    /// Learning rate used.
    pub lr: f64,
    /// Global L2 norm of the gradients before clipping (finite elements), when clipping is on.
    pub grad_norm: Option<f32>,
    /// Factor applied to every gradient element (the clip coefficient; 1 without clipping).
    pub grad_scale: f32,
    /// Gradient elements that were NaN/±inf and left their parameter and state unchanged.
    pub nonfinite: u64,
}

/// AdamW over one flat parameter arena (see the crate docs).
#[derive(Clone, Debug)]
pub struct AdamW {
    config: AdamWConfig,
    layout: ArenaLayout,
    state_layout: StateLayout,
    chunks: Vec<Chunk>,
    state: StateArena,
    maps: Maps,
    steps: u64,
}

enum Job<'a> {
    F32 {
        p: &'a mut [f32],
        g: &'a [f32],
        m: &'a mut [f32],
        v: &'a mut [f32],
    },
    B8 {
        p: &'a mut [f32],
        g: &'a [f32],
        c1: &'a mut [u8],
        c2: &'a mut [u8],
        am: &'a mut f32,
        av: &'a mut f32,
    },
}

/// Splits `rest` (which starts at element `*at` of its arena) at `[offset, offset + n)`.
fn take<'a, T>(rest: &mut &'a mut [T], at: &mut usize, offset: usize, n: usize) -> &'a mut [T] {
    let r = std::mem::take(rest);
    let (_, r) = r.split_at_mut(offset - *at);
    let (x, r) = r.split_at_mut(n);
    *rest = r;
    *at = offset + n;
    x
}

#[inline(always)]
fn run_f32_body(s: &StepScalars, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) -> u64 {
    let mut bad = 0u64;
    for (((p, g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        bad += !update_f32(s, p, m, v, *g) as u64;
    }
    bad
}

/// The same loop compiled with hardware FMA available, so `mul_add` is one instruction instead
/// of a libm `fmaf` call. Results are identical: `mul_add` is a correctly rounded fused
/// multiply-add either way.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn run_f32_fma(s: &StepScalars, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) -> u64 {
    run_f32_body(s, p, g, m, v)
}

fn run_f32(s: &StepScalars, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports the enabled features (checked just above).
        return unsafe { run_f32_fma(s, p, g, m, v) };
    }
    run_f32_body(s, p, g, m, v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn run_block_fma(s: &StepScalars, maps: &Maps, p: &mut [f32], g: &[f32], st: BlockState) -> u64 {
    update_block(s, maps, p, g, st) as u64
}

/// One 8-bit block, with hardware FMA where available (identical results, see `run_f32_fma`).
fn run_block(s: &StepScalars, maps: &Maps, p: &mut [f32], g: &[f32], st: BlockState) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports the enabled features (checked just above).
        return unsafe { run_block_fma(s, maps, p, g, st) };
    }
    update_block(s, maps, p, g, st) as u64
}

impl AdamW {
    /// Zero state for `layout` (the parameter/gradient arenas' layout).
    pub fn new(layout: ArenaLayout, config: AdamWConfig) -> Result<AdamW> {
        config.validate()?;
        let state_layout = StateLayout::new(&layout, &config);
        let chunks = chunk_table(&layout, &state_layout);
        let state = StateArena::zeroed(&state_layout);
        Ok(AdamW {
            config,
            layout,
            state_layout,
            chunks,
            state,
            maps: Maps::default(),
            steps: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }
    /// The parameter/gradient arena layout.
    pub fn layout(&self) -> &ArenaLayout {
        &self.layout
    }
    /// The state arena layout.
    pub fn state_layout(&self) -> &StateLayout {
        &self.state_layout
    }
    /// The chunk table (what `cuda/adamw.cu` walks).
    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }
    /// The state arena.
    pub fn state(&self) -> &StateArena {
        &self.state
    }
    /// The state arena, mutable (the GPU path copies device state back into it).
    pub fn state_mut(&mut self) -> &mut StateArena {
        &mut self.state
    }
    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }
    /// Size of the state arena in bytes.
    pub fn state_bytes(&self) -> usize {
        self.state_layout.total_bytes
    }

    fn check_arena(&self, what: &'static str, got: usize) -> Result<()> {
        if got != self.layout.len() {
            return Err(OptimError::ArenaLength {
                step: self.steps + 1,
                what,
                got,
                want: self.layout.len(),
            });
        }
        Ok(())
    }

    /// The gradient scale and pre-clip norm of the next step (global clipping, one reduction).
    pub fn clip_scale(&self, grads: &[f32]) -> Result<(Option<f32>, f32)> {
        self.check_arena("gradient", grads.len())?;
        Ok(match self.config.max_grad_norm {
            None => (None, 1.0),
            Some(max) => {
                let sums = clip::chunk_sumsq(&self.chunks, grads);
                let n = clip::total_norm(&self.chunks, &sums, self.layout.tensors().len());
                (Some(n), clip::clip_coef(n, max))
            }
        })
    }

    /// Global L2 norm of `grads` (finite elements), as the clipping computes it; for logging
    /// when clipping is off.
    pub fn grad_norm(&self, grads: &[f32]) -> Result<f32> {
        self.check_arena("gradient", grads.len())?;
        let sums = clip::chunk_sumsq(&self.chunks, grads);
        Ok(clip::total_norm(
            &self.chunks,
            &sums,
            self.layout.tensors().len(),
        ))
    }

    /// The scalars of the next step at learning rate `lr`.
    pub fn next_scalars(&self, lr: f64, grad_scale: f32) -> Result<StepScalars> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(OptimError::InvalidLr {
                step: self.steps + 1,
                lr,
            });
        }
        Ok(StepScalars::new(
            &self.config,
            self.steps + 1,
            lr,
            grad_scale,
        ))
    }

    /// One AdamW step over the whole arena at learning rate `lr`: `params` and `grads` are the
    /// flat arenas of [`AdamW::layout`] (length `layout.len()`, padding ignored).
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f64) -> Result<StepReport> {
        self.check_arena("parameter", params.len())?;
        let (grad_norm, grad_scale) = self.clip_scale(grads)?;
        let s = self.next_scalars(lr, grad_scale)?;
        let nonfinite = self.apply(params, grads, &s);
        self.steps += 1;
        Ok(StepReport {
            step: self.steps,
            lr,
            grad_norm,
            grad_scale,
            nonfinite,
        })
    }

    /// [`AdamW::step`] at `schedule.lr(config.lr, steps())`.
    pub fn step_scheduled(
        &mut self,
        params: &mut [f32],
        grads: &[f32],
        schedule: &LrSchedule,
    ) -> Result<StepReport> {
        let lr = schedule.lr(self.config.lr, self.steps);
        self.step(params, grads, lr)
    }

    /// Marks a step as taken without running it on the CPU (the GPU path ran it and copied the
    /// state back).
    pub fn advance(&mut self) {
        self.steps += 1;
    }

    fn apply(&mut self, params: &mut [f32], grads: &[f32], s: &StepScalars) -> u64 {
        let AdamW {
            layout,
            state_layout,
            state,
            maps,
            ..
        } = self;
        let sec = state.sections(state_layout);
        let (mut p_rest, mut p_at) = (params, 0usize);
        let (mut m_rest, mut v_rest, mut s32_at, mut v32_at) = (sec.m32, sec.v32, 0usize, 0usize);
        let (mut c1_rest, mut c2_rest, mut c1_at, mut c2_at) = (sec.m8, sec.v8, 0usize, 0usize);
        let (mut am_rest, mut av_rest, mut am_at, mut av_at) =
            (sec.absmax_m, sec.absmax_v, 0usize, 0usize);
        let mut jobs = Vec::new();
        for (t, ts) in layout.tensors().iter().zip(&state_layout.per_tensor) {
            let p = take(&mut p_rest, &mut p_at, t.offset, t.numel);
            let g = &grads[t.offset..t.offset + t.numel];
            match ts.kind {
                StateKind::F32 => {
                    let m = take(&mut m_rest, &mut s32_at, ts.state_offset, t.numel);
                    let v = take(&mut v_rest, &mut v32_at, ts.state_offset, t.numel);
                    for (((p, g), m), v) in p
                        .chunks_mut(CHUNK32)
                        .zip(g.chunks(CHUNK32))
                        .zip(m.chunks_mut(CHUNK32))
                        .zip(v.chunks_mut(CHUNK32))
                    {
                        jobs.push(Job::F32 { p, g, m, v });
                    }
                }
                StateKind::Blockwise8 => {
                    let nb = t.numel.div_ceil(QBLOCK);
                    let c1 = take(&mut c1_rest, &mut c1_at, ts.state_offset, nb * QBLOCK);
                    let c2 = take(&mut c2_rest, &mut c2_at, ts.state_offset, nb * QBLOCK);
                    let am = take(&mut am_rest, &mut am_at, ts.block_offset, nb);
                    let av = take(&mut av_rest, &mut av_at, ts.block_offset, nb);
                    for (((((p, g), c1), c2), am), av) in p
                        .chunks_mut(QBLOCK)
                        .zip(g.chunks(QBLOCK))
                        .zip(c1.chunks_mut(QBLOCK))
                        .zip(c2.chunks_mut(QBLOCK))
                        .zip(am.iter_mut())
                        .zip(av.iter_mut())
                    {
                        let n = p.len();
                        jobs.push(Job::B8 {
                            p,
                            g,
                            c1: &mut c1[..n],
                            c2: &mut c2[..n],
                            am,
                            av,
                        });
                    }
                }
            }
        }
        let maps = &*maps;
        jobs.into_par_iter()
            .map(|job| match job {
                Job::F32 { p, g, m, v } => run_f32(s, p, g, m, v),
                Job::B8 {
                    p,
                    g,
                    c1,
                    c2,
                    am,
                    av,
                } => {
                    let st = BlockState {
                        c1,
                        c2,
                        absmax_m: am,
                        absmax_v: av,
                    };
                    run_block(s, maps, p, g, st)
                }
            })
            .sum()
    }

    /// The (dequantized) first and second moments of tensor `name`, for inspection and tests.
    pub fn moments(&self, name: &str) -> Option<(Vec<f32>, Vec<f32>)> {
        let i = self.layout.tensors().iter().position(|t| t.name == name)?;
        let t = &self.layout.tensors()[i];
        let ts = &self.state_layout.per_tensor[i];
        let sl = &self.state_layout;
        let bytes = self.state.bytes();
        let f32s = |sec: crate::arena::Section| -> &[f32] {
            bytemuck::cast_slice(&bytes[sec.offset..sec.offset + sec.bytes])
        };
        Some(match ts.kind {
            StateKind::F32 => {
                let r = ts.state_offset..ts.state_offset + t.numel;
                (f32s(sl.m32)[r.clone()].to_vec(), f32s(sl.v32)[r].to_vec())
            }
            StateKind::Blockwise8 => {
                let c1 = &bytes[sl.m8.offset + ts.state_offset..][..t.numel];
                let c2 = &bytes[sl.v8.offset + ts.state_offset..][..t.numel];
                let am = &f32s(sl.absmax_m)[ts.block_offset..];
                let av = &f32s(sl.absmax_v)[ts.block_offset..];
                let m = (0..t.numel)
                    .map(|e| self.maps.signed[c1[e] as usize] * am[e / QBLOCK])
                    .collect();
                let v = (0..t.numel)
                    .map(|e| self.maps.unsigned[c2[e] as usize] * av[e / QBLOCK])
                    .collect();
                (m, v)
            }
        })
    }

    /// Reassembles an optimizer from saved parts (used by `state_io`).
    pub(crate) fn from_parts(
        layout: ArenaLayout,
        config: AdamWConfig,
        state: StateArena,
        steps: u64,
    ) -> Result<AdamW> {
        let mut a = AdamW::new(layout, config)?;
        a.state = state;
        a.steps = steps;
        Ok(a)
    }
}
