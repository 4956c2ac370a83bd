//! Launch geometry of `cuda/adamw.cu`, as pure functions (tested on the CPU).
//!
//! Both kernels are persistent: `grid` blocks of [`THREADS`] threads walk the chunk table with a
//! grid stride (block `b` takes chunks `b, b + grid, …`), so the two 1 KiB code books are loaded
//! into shared memory once per block rather than once per chunk, and one launch covers any
//! arena. Within a 32-bit chunk thread `x` owns elements `x, x + 256, …, x + 7·256` (coalesced);
//! in an 8-bit chunk (one 256-block) thread `x` owns element `x`.

use crate::arena::{CHUNK32, QBLOCK};

/// Threads per block of both kernels.
pub const THREADS: u32 = 256;
/// f32 elements per thread in a 32-bit chunk.
pub const PER_THREAD_32: u32 = (CHUNK32 / THREADS as usize) as u32;
/// Resident blocks per SM the grid is sized for (the kernels use < 3 KiB of shared memory and
/// 256 threads; 4 blocks fill 1024 threads of an SM on sm_90's 2048 with room to spare).
pub const BLOCKS_PER_SM: u32 = 4;

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    pub grid: u32,
    pub block: u32,
    pub shared_bytes: u32,
}

/// Shared memory of the update kernel: two 256-entry f32 code books and 2 × 32 f32 of
/// block-reduction scratch (allocated statically in the kernel; reported for the occupancy
/// check, dynamic shared memory is 0).
pub const UPDATE_STATIC_SMEM: u32 = 2 * 256 * 4 + 2 * 32 * 4;

/// Geometry of the update (and of the gradient-norm) kernel for `n_chunks` chunks on a device
/// with `sm_count` SMs. `None` when there is nothing to do (no launch at all).
pub fn update_dims(n_chunks: usize, sm_count: u32) -> Option<LaunchDims> {
    if n_chunks == 0 {
        return None;
    }
    let cap = (sm_count.max(1) as u64 * BLOCKS_PER_SM as u64).min(i32::MAX as u64);
    let grid = (n_chunks as u64).min(cap) as u32;
    Some(LaunchDims {
        grid,
        block: THREADS,
        shared_bytes: 0,
    })
}

/// The chunks block `b` of a `grid`-block launch processes.
pub fn chunks_of_block(b: u32, grid: u32, n_chunks: usize) -> impl Iterator<Item = usize> {
    (b as usize..n_chunks).step_by(grid as usize)
}

/// Element (within its chunk) of thread `x`'s `k`-th value in a chunk of `kind` (0: 32-bit,
/// 1: 8-bit); `None` past the chunk's length `len`.
pub fn element_of(kind: u32, x: u32, k: u32, len: u32) -> Option<u32> {
    let e = if kind == 0 {
        (k < PER_THREAD_32).then_some(k * THREADS + x)?
    } else {
        (k == 0 && (x as usize) < QBLOCK).then_some(x)?
    };
    (e < len).then_some(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_is_capped_and_covers_every_chunk_once() {
        assert_eq!(update_dims(0, 132), None);
        let d = update_dims(10, 132).unwrap();
        assert_eq!((d.grid, d.block), (10, 256));
        let d = update_dims(1_000_000, 132).unwrap();
        assert_eq!(d.grid, 132 * BLOCKS_PER_SM);
        assert_eq!(update_dims(5, 0).unwrap().grid, 4);
        for (n, sm) in [(1usize, 132u32), (529, 132), (20_000, 132), (7, 1)] {
            let d = update_dims(n, sm).unwrap();
            let mut seen = vec![0u8; n];
            for b in 0..d.grid {
                for c in chunks_of_block(b, d.grid, n) {
                    seen[c] += 1;
                }
            }
            assert!(seen.iter().all(|&s| s == 1), "n={n} sm={sm}");
        }
    }

    #[test]
    fn kernel_argument_structs_have_the_cuda_layout() {
        // cuda/adamw.cu: QlrAdamwScalars is 12 four-byte fields, QlrAdamwChunk two u64 and four
        // u32; both are passed/read as raw bytes.
        assert_eq!(std::mem::size_of::<crate::StepScalars>(), 48);
        assert_eq!(std::mem::align_of::<crate::StepScalars>(), 4);
        assert_eq!(std::mem::size_of::<crate::Chunk>(), 32);
        assert_eq!(std::mem::align_of::<crate::Chunk>(), 8);
        let src = include_str!("../../../cuda/adamw.cu");
        assert!(src.contains("unsigned long long param_offset, state_offset;"));
        assert!(src.contains("unsigned len, kind, block, tensor;"));
        assert!(src.contains(
            "float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt, wd_factor;"
        ));
    }

    #[test]
    fn threads_cover_each_chunk_element_once() {
        for (kind, len) in [
            (0u32, 2048u32),
            (0, 1),
            (0, 1999),
            (1, 256),
            (1, 1),
            (1, 77),
        ] {
            let mut seen = vec![0u8; len as usize];
            for x in 0..THREADS {
                for k in 0..PER_THREAD_32 {
                    if let Some(e) = element_of(kind, x, k, len) {
                        seen[e as usize] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&s| s == 1), "kind {kind} len {len}");
        }
        // consecutive threads touch consecutive elements (coalesced)
        assert_eq!(element_of(0, 5, 3, 2048), Some(3 * 256 + 5));
    }
}
