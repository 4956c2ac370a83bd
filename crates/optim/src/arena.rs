//! The flat arenas: where each adapter tensor lives in the parameter/gradient arenas
//! ([`ArenaLayout`]), where its optimizer state lives in the one state arena ([`StateLayout`],
//! [`StateArena`]), and the chunk table that both the CPU step and the single CUDA launch walk.
//!
//! The parameter and gradient arenas are owned by the trainer (`crates/train`) and share one
//! [`ArenaLayout`]; elements outside every tensor (alignment padding) are never read or written.
//!
//! State arena, one allocation (bytes), sections in this order, each starting on a
//! [`SECTION_ALIGN`]-byte boundary:
//! ```text
//! m32      (n32,)     f32   first moment of the tensors with f32 state, in tensor order
//! v32      (n32,)     f32   second moment, same indexing
//! absmax_m (nblocks,) f32   per-256-block absmax of the 8-bit first moment
//! absmax_v (nblocks,) f32   per-256-block absmax of the 8-bit second moment
//! m8       (n8,)      u8    signed-dynamic-map codes of the 8-bit first moment
//! v8       (n8,)      u8    unsigned-dynamic-map codes of the 8-bit second moment
//! ```
//! Within m8/v8 every tensor starts on a multiple of [`QBLOCK`] so that block `b` of the
//! sections is block `b − block_offset` of exactly one tensor (a tensor's last block may be
//! partial; its padding codes stay 0 and are never used).

use crate::adamw::{AdamWConfig, StateBits};
use crate::error::{OptimError, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// Elements per 8-bit state block (bitsandbytes' optimizer blocksize).
pub const QBLOCK: usize = 256;
/// Elements per chunk of a tensor with f32 state (one CUDA block of 256 threads × 8).
pub const CHUNK32: usize = 2048;
/// Default alignment of tensors in [`ArenaLayout::packed`], in elements (256 bytes of f32).
pub const ARENA_ALIGN: usize = 64;
/// Alignment of each state-arena section, in bytes.
pub const SECTION_ALIGN: usize = 256;

/// One tensor of the parameter/gradient arenas: elements `[offset, offset + numel)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub offset: usize,
    pub numel: usize,
}

/// Where every trainable tensor lives in the flat parameter (and gradient) arena.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArenaLayout {
    tensors: Vec<TensorSpec>,
    len: usize,
}

fn align_up(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

impl ArenaLayout {
    /// Packs `(name, numel)` in order, each offset rounded up to `align` elements (a power of
    /// two; [`ARENA_ALIGN`] keeps every tensor 256-byte aligned). The arena length is the end of
    /// the last tensor rounded up to `align`.
    pub fn packed<S: Into<String>>(
        tensors: impl IntoIterator<Item = (S, usize)>,
        align: usize,
    ) -> Result<ArenaLayout> {
        if align == 0 || !align.is_power_of_two() {
            return Err(OptimError::BadAlignment { align });
        }
        let mut specs = Vec::new();
        let mut at = 0usize;
        for (name, numel) in tensors {
            let offset = align_up(at, align);
            specs.push(TensorSpec {
                name: name.into(),
                offset,
                numel,
            });
            at = offset + numel;
        }
        let len = align_up(at, align);
        ArenaLayout::from_specs(specs, len)
    }

    /// A layout with explicit offsets (for example the trainer's own). Tensors must be sorted by
    /// offset, non-empty, uniquely named, non-overlapping and inside `len`.
    pub fn from_specs(tensors: Vec<TensorSpec>, len: usize) -> Result<ArenaLayout> {
        let mut names = HashSet::new();
        let mut prev: Option<&TensorSpec> = None;
        for t in &tensors {
            if t.numel == 0 {
                return Err(OptimError::EmptyTensor {
                    name: t.name.clone(),
                });
            }
            if !names.insert(t.name.as_str()) {
                return Err(OptimError::DuplicateTensor {
                    name: t.name.clone(),
                });
            }
            let end = t.offset.saturating_add(t.numel);
            if let Some(p) = prev {
                if t.offset < p.offset + p.numel {
                    return Err(OptimError::Overlap {
                        name: t.name.clone(),
                        offset: t.offset,
                        end,
                        prev: p.name.clone(),
                        prev_end: p.offset + p.numel,
                    });
                }
            }
            if end > len {
                return Err(OptimError::OutOfArena {
                    name: t.name.clone(),
                    end,
                    len,
                });
            }
            prev = Some(t);
        }
        Ok(ArenaLayout { tensors, len })
    }

    /// From `(name, element range)` pairs in arena order, e.g. `qlora_train`'s
    /// `AdapterLayout::tensors()` (unaligned, contiguous offsets are fine).
    pub fn from_ranges<S: Into<String>>(
        tensors: impl IntoIterator<Item = (S, std::ops::Range<usize>)>,
        len: usize,
    ) -> Result<ArenaLayout> {
        let specs = tensors
            .into_iter()
            .map(|(name, r)| TensorSpec {
                name: name.into(),
                offset: r.start,
                numel: r.end.saturating_sub(r.start),
            })
            .collect();
        ArenaLayout::from_specs(specs, len)
    }

    /// The tensors, in arena order.
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }
    /// Arena length in elements (what the trainer allocates for params and grads).
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when the layout holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
    /// Total trainable elements (excluding padding).
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(|t| t.numel).sum()
    }
    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&TensorSpec> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// How one tensor's state is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateKind {
    /// f32 m and v at `m32[state_offset..]`, `v32[state_offset..]`.
    F32,
    /// u8 codes at `m8[state_offset..]`, `v8[state_offset..]`, absmax from `block_offset`.
    Blockwise8,
}

/// Where one tensor's state is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorState {
    pub kind: StateKind,
    /// Element offset into m32/v32 (F32) or m8/v8 (Blockwise8).
    pub state_offset: usize,
    /// First absmax index (Blockwise8; 0 otherwise).
    pub block_offset: usize,
}

/// Byte range of one state-arena section.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    pub offset: usize,
    pub bytes: usize,
}

/// The state arena's layout for one [`ArenaLayout`] and configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateLayout {
    pub per_tensor: Vec<TensorState>,
    /// Elements with f32 state.
    pub n32: usize,
    /// Elements (including each tensor's tail-block padding) with 8-bit state.
    pub n8: usize,
    /// 8-bit blocks.
    pub nblocks: usize,
    pub m32: Section,
    pub v32: Section,
    pub absmax_m: Section,
    pub absmax_v: Section,
    pub m8: Section,
    pub v8: Section,
    /// Size of the whole state arena in bytes (a multiple of 4).
    pub total_bytes: usize,
}

impl StateLayout {
    /// Decides f32 vs 8-bit per tensor (8-bit only under [`StateBits::Blockwise8`] and at least
    /// `min_8bit_size` elements) and places the sections.
    pub fn new(layout: &ArenaLayout, cfg: &AdamWConfig) -> StateLayout {
        let mut per_tensor = Vec::with_capacity(layout.tensors.len());
        let (mut n32, mut n8, mut nblocks) = (0usize, 0usize, 0usize);
        for t in &layout.tensors {
            if cfg.state_bits == StateBits::Blockwise8 && t.numel >= cfg.min_8bit_size {
                let blocks = t.numel.div_ceil(QBLOCK);
                per_tensor.push(TensorState {
                    kind: StateKind::Blockwise8,
                    state_offset: n8,
                    block_offset: nblocks,
                });
                n8 += blocks * QBLOCK;
                nblocks += blocks;
            } else {
                per_tensor.push(TensorState {
                    kind: StateKind::F32,
                    state_offset: n32,
                    block_offset: 0,
                });
                n32 += t.numel;
            }
        }
        let mut at = 0usize;
        let mut place = |bytes: usize| {
            let s = Section { offset: at, bytes };
            at = align_up(at + bytes, SECTION_ALIGN);
            s
        };
        let m32 = place(n32 * 4);
        let v32 = place(n32 * 4);
        let absmax_m = place(nblocks * 4);
        let absmax_v = place(nblocks * 4);
        let m8 = place(n8);
        let v8 = place(n8);
        StateLayout {
            per_tensor,
            n32,
            n8,
            nblocks,
            m32,
            v32,
            absmax_m,
            absmax_v,
            m8,
            v8,
            total_bytes: at,
        }
    }
}

/// One unit of work of the update: a run of at most [`CHUNK32`] elements of one f32-state
/// tensor, or exactly one [`QBLOCK`] block of one 8-bit tensor. `repr(C)`: uploaded as-is for
/// `cuda/adamw.cu` (`QlrAdamwChunk`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Chunk {
    /// First element in the parameter/gradient arenas.
    pub param_offset: u64,
    /// First element in m32/v32 (kind 0) or m8/v8 (kind 1).
    pub state_offset: u64,
    /// Valid elements (≤ CHUNK32 or ≤ QBLOCK).
    pub len: u32,
    /// 0: f32 state; 1: blockwise 8-bit.
    pub kind: u32,
    /// Absmax index (kind 1), else 0.
    pub block: u32,
    /// Index of the tensor in the layout (for the per-tensor gradient norms).
    pub tensor: u32,
}

/// The chunk table, in arena order (so chunks of one tensor are contiguous).
pub fn chunk_table(layout: &ArenaLayout, state: &StateLayout) -> Vec<Chunk> {
    let mut out = Vec::new();
    for (i, (t, s)) in layout.tensors.iter().zip(&state.per_tensor).enumerate() {
        let (step, kind) = match s.kind {
            StateKind::F32 => (CHUNK32, 0u32),
            StateKind::Blockwise8 => (QBLOCK, 1u32),
        };
        let mut k = 0usize;
        while k < t.numel {
            let len = step.min(t.numel - k);
            out.push(Chunk {
                param_offset: (t.offset + k) as u64,
                state_offset: (s.state_offset + k) as u64,
                len: len as u32,
                kind,
                block: if kind == 1 {
                    (s.block_offset + k / QBLOCK) as u32
                } else {
                    0
                },
                tensor: i as u32,
            });
            k += step;
        }
    }
    out
}

/// The state arena: one flat, 4-byte-aligned buffer of [`StateLayout::total_bytes`] bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct StateArena {
    words: Vec<u32>,
}

/// Mutable typed views of the sections of a [`StateArena`].
pub struct StateSections<'a> {
    pub m32: &'a mut [f32],
    pub v32: &'a mut [f32],
    pub absmax_m: &'a mut [f32],
    pub absmax_v: &'a mut [f32],
    pub m8: &'a mut [u8],
    pub v8: &'a mut [u8],
}

impl StateArena {
    /// Zero state: m = v = 0 and, in 8-bit, codes 0 with absmax 0 (bitsandbytes' init: every
    /// code dequantizes to ±0).
    pub fn zeroed(layout: &StateLayout) -> StateArena {
        StateArena {
            words: vec![0u32; layout.total_bytes / 4],
        }
    }

    /// The raw bytes (for saving and for the device copy).
    pub fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.words)
    }

    /// The raw bytes, mutable (for loading and the device copy back).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.words)
    }

    /// Typed views of every section.
    pub fn sections<'a>(&'a mut self, layout: &StateLayout) -> StateSections<'a> {
        let bytes: &'a mut [u8] = bytemuck::cast_slice_mut(&mut self.words);
        // Sections are in increasing offset order; carve them front to back.
        let (_, rest) = bytes.split_at_mut(layout.m32.offset);
        let (m32, rest) = rest.split_at_mut(layout.m32.bytes);
        let (_, rest) = rest.split_at_mut(layout.v32.offset - layout.m32.offset - layout.m32.bytes);
        let (v32, rest) = rest.split_at_mut(layout.v32.bytes);
        let (_, rest) =
            rest.split_at_mut(layout.absmax_m.offset - layout.v32.offset - layout.v32.bytes);
        let (am, rest) = rest.split_at_mut(layout.absmax_m.bytes);
        let (_, rest) = rest
            .split_at_mut(layout.absmax_v.offset - layout.absmax_m.offset - layout.absmax_m.bytes);
        let (av, rest) = rest.split_at_mut(layout.absmax_v.bytes);
        let (_, rest) =
            rest.split_at_mut(layout.m8.offset - layout.absmax_v.offset - layout.absmax_v.bytes);
        let (m8, rest) = rest.split_at_mut(layout.m8.bytes);
        let (_, rest) = rest.split_at_mut(layout.v8.offset - layout.m8.offset - layout.m8.bytes);
        let (v8, _) = rest.split_at_mut(layout.v8.bytes);
        StateSections {
            m32: bytemuck::cast_slice_mut(m32),
            v32: bytemuck::cast_slice_mut(v32),
            absmax_m: bytemuck::cast_slice_mut(am),
            absmax_v: bytemuck::cast_slice_mut(av),
            m8,
            v8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_offsets_are_aligned_and_ordered() {
        let l = ArenaLayout::packed([("a", 1usize), ("b", 4097), ("c", 64)], 64).unwrap();
        let o: Vec<_> = l.tensors().iter().map(|t| t.offset).collect();
        assert_eq!(o, vec![0, 64, 64 + 4160]);
        assert_eq!(l.len(), 64 + 4160 + 64);
        assert_eq!(l.numel(), 1 + 4097 + 64);
    }

    #[test]
    fn from_ranges_keeps_unaligned_offsets() {
        let l = ArenaLayout::from_ranges([("a", 0..3usize), ("b", 3..10)], 10).unwrap();
        assert_eq!(l.tensors()[1].offset, 3);
        assert_eq!(l.numel(), 10);
        assert!(ArenaLayout::from_ranges([("a", 0..3usize), ("b", 2..10)], 10).is_err());
    }

    #[test]
    fn bad_layouts_are_typed_errors_naming_the_tensor() {
        let e = ArenaLayout::packed([("a", 0usize)], 64).unwrap_err();
        assert!(e.to_string().contains("`a`"));
        let e = ArenaLayout::packed([("a", 1usize), ("a", 2)], 64).unwrap_err();
        assert!(matches!(e, OptimError::DuplicateTensor { .. }));
        let specs = vec![
            TensorSpec {
                name: "x".into(),
                offset: 0,
                numel: 10,
            },
            TensorSpec {
                name: "y".into(),
                offset: 5,
                numel: 10,
            },
        ];
        let e = ArenaLayout::from_specs(specs.clone(), 100).unwrap_err();
        assert!(matches!(e, OptimError::Overlap { .. }), "{e}");
        let e = ArenaLayout::from_specs(specs[..1].to_vec(), 9).unwrap_err();
        assert!(matches!(e, OptimError::OutOfArena { .. }));
        assert!(matches!(
            ArenaLayout::packed([("a", 1usize)], 3),
            Err(OptimError::BadAlignment { align: 3 })
        ));
    }

    #[test]
    fn state_layout_and_chunks_cover_every_element_once() {
        let l = ArenaLayout::packed(
            [
                ("small", 4095usize),
                ("big", 4097),
                ("one", 1),
                ("mid", 5000),
            ],
            64,
        )
        .unwrap();
        let cfg = AdamWConfig {
            state_bits: StateBits::Blockwise8,
            ..Default::default()
        };
        let s = StateLayout::new(&l, &cfg);
        let kinds: Vec<_> = s.per_tensor.iter().map(|t| t.kind).collect();
        use StateKind::*;
        assert_eq!(kinds, vec![F32, Blockwise8, F32, Blockwise8]);
        assert_eq!(s.n32, 4096);
        assert_eq!(s.nblocks, 17 + 20);
        assert_eq!(s.n8, 37 * 256);
        assert_eq!(s.total_bytes % SECTION_ALIGN, 0);
        let chunks = chunk_table(&l, &s);
        let mut seen = vec![0u8; l.len()];
        for c in &chunks {
            for e in c.param_offset..c.param_offset + c.len as u64 {
                seen[e as usize] += 1;
            }
            if c.kind == 1 {
                assert_eq!(c.state_offset as usize % QBLOCK, 0);
                assert_eq!(c.state_offset as usize / QBLOCK, c.block as usize);
            }
        }
        for t in l.tensors() {
            assert!(seen[t.offset..t.offset + t.numel].iter().all(|&x| x == 1));
        }
        assert_eq!(seen.iter().map(|&x| x as usize).sum::<usize>(), l.numel());
        // the 4097 tensor has 17 blocks, the last with one element
        let big: Vec<_> = chunks.iter().filter(|c| c.tensor == 1).collect();
        assert_eq!(big.len(), 17);
        assert_eq!(big[16].len, 1);
    }

    #[test]
    fn sections_have_the_declared_sizes() {
        let l = ArenaLayout::packed([("a", 100usize), ("b", 5000)], 64).unwrap();
        let cfg = AdamWConfig {
            state_bits: StateBits::Blockwise8,
            ..Default::default()
        };
        let s = StateLayout::new(&l, &cfg);
        let mut a = StateArena::zeroed(&s);
        let v = a.sections(&s);
        assert_eq!(v.m32.len(), 100);
        assert_eq!(v.v32.len(), 100);
        assert_eq!(v.absmax_m.len(), 20);
        assert_eq!(v.absmax_v.len(), 20);
        assert_eq!(v.m8.len(), 5120);
        assert_eq!(v.v8.len(), 5120);
    }
}
