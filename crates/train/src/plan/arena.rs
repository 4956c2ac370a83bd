//! [`ArenaPlanner`]: a deterministic offset allocator over one contiguous arena.
//!
//! The memory planner (the parent module) runs the real schedule on a dry-run backend whose
//! buffers take their offsets from this allocator; a device backend that replays the same
//! allocate/free sequence through another `ArenaPlanner` gets the same offsets and therefore
//! fits in an arena of [`ArenaPlanner::high_water`] bytes, by construction. Nothing here depends
//! on timing or addresses: the offsets are a pure function of the sequence of calls.
//!
//! Policy: best fit among the free blocks (smallest block that holds the request, lowest
//! offset on ties), otherwise the arena grows at its top. Freed blocks coalesce with their
//! neighbours, and a free block that reaches the top shrinks the top, so a stack-like
//! allocation pattern (the schedule's) reuses the same bytes layer after layer.

use std::collections::{BTreeMap, HashMap};

/// A deterministic best-fit offset allocator (bytes).
#[derive(Clone, Debug, Default)]
pub struct ArenaPlanner {
    /// offset → bytes of every free block below `top`, coalesced (no two touch).
    free: BTreeMap<usize, usize>,
    /// offset → bytes of every live allocation.
    live: HashMap<usize, usize>,
    /// End of the highest block in use or free-but-not-at-top.
    top: usize,
    high_water: usize,
    live_bytes: usize,
    peak_live: usize,
}

fn align_up(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

impl ArenaPlanner {
    pub fn new() -> ArenaPlanner {
        ArenaPlanner::default()
    }

    /// Reserve `bytes` (> 0) at an offset that is a multiple of `align` (a power of two); the
    /// block is `bytes` rounded up to `align`. Returns the offset.
    pub fn alloc(&mut self, bytes: usize, align: usize) -> usize {
        assert!(
            align.is_power_of_two(),
            "ArenaPlanner::alloc: align {align}"
        );
        let size = align_up(bytes.max(1), align);
        // Best fit: the smallest free block whose aligned start leaves room for `size`.
        let best = self
            .free
            .iter()
            .filter_map(|(&off, &len)| {
                let start = align_up(off, align);
                (start + size <= off + len).then_some((len, off, start))
            })
            .min();
        let start = match best {
            Some((len, off, start)) => {
                self.free.remove(&off);
                if start > off {
                    self.free.insert(off, start - off);
                }
                let end = start + size;
                if end < off + len {
                    self.free.insert(end, off + len - end);
                }
                start
            }
            None => {
                // Grow at the top, starting inside a free block that reaches the top if any
                // (it cannot hold `size`, but its bytes are reused).
                let base = match self.free.iter().next_back() {
                    Some((&off, &len)) if off + len == self.top => {
                        self.free.remove(&off);
                        off
                    }
                    _ => self.top,
                };
                let start = align_up(base, align);
                if start > base {
                    self.free.insert(base, start - base);
                }
                self.top = start + size;
                self.high_water = self.high_water.max(self.top);
                start
            }
        };
        self.live.insert(start, size);
        self.live_bytes += size;
        self.peak_live = self.peak_live.max(self.live_bytes);
        start
    }

    /// Release the block at `offset`; returns its size, or `None` if no live block starts there.
    pub fn free(&mut self, offset: usize) -> Option<usize> {
        let size = self.live.remove(&offset)?;
        self.live_bytes -= size;
        let (mut start, mut end) = (offset, offset + size);
        if let Some((&p, &plen)) = self.free.range(..start).next_back() {
            if p + plen == start {
                self.free.remove(&p);
                start = p;
            }
        }
        if let Some(nlen) = self.free.remove(&end) {
            end += nlen;
        }
        if end == self.top {
            self.top = start;
        } else {
            self.free.insert(start, end - start);
        }
        Some(size)
    }

    /// Arena bytes needed so far: the highest end of any block ever allocated.
    pub fn high_water(&self) -> usize {
        self.high_water
    }
    /// Largest sum of live (aligned) block sizes so far; `high_water - peak_live` is what
    /// fragmentation cost.
    pub fn peak_live(&self) -> usize {
        self.peak_live
    }
    /// Bytes of the live blocks now.
    pub fn live_bytes(&self) -> usize {
        self.live_bytes
    }
    /// The block size of a live allocation.
    pub fn size_of(&self, offset: usize) -> Option<usize> {
        self.live.get(&offset).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_pattern_reuses_bytes() {
        let mut a = ArenaPlanner::new();
        let x = a.alloc(100, 256);
        assert_eq!(x, 0);
        let y = a.alloc(300, 256);
        assert_eq!(y, 256);
        a.free(y);
        // The freed top block shrinks the top: the next request starts at the same place.
        let z = a.alloc(512, 256);
        assert_eq!(z, 256);
        assert_eq!(a.high_water(), 768);
        assert_eq!(a.live_bytes(), 768);
    }

    #[test]
    fn best_fit_and_coalescing() {
        let mut a = ArenaPlanner::new();
        let b0 = a.alloc(256, 256); // [0, 256)
        let b1 = a.alloc(1024, 256); // [256, 1280)
        let b2 = a.alloc(256, 256); // [1280, 1536)
        let b3 = a.alloc(512, 256); // [1536, 2048)
        let _b4 = a.alloc(256, 256); // [2048, 2304) keeps the top busy
        a.free(b1);
        a.free(b3);
        // 512 fits both holes; best fit takes the 512-byte hole at 1536.
        assert_eq!(a.alloc(512, 256), 1536);
        // Freeing b0 and b2 coalesces [0, 256) + [256, 1280) + [1280, 1536).
        a.free(b0);
        a.free(b2);
        assert_eq!(a.alloc(1536, 256), 0);
        assert_eq!(a.high_water(), 2304);
        assert_eq!(a.free(12345), None);
    }

    #[test]
    fn grows_through_a_free_block_at_the_top() {
        let mut a = ArenaPlanner::new();
        let b0 = a.alloc(256, 256);
        let b1 = a.alloc(256, 256);
        let _b2 = a.alloc(256, 256);
        a.free(b1);
        // [256, 512) is free but not at the top; a 1024-byte request goes to the top.
        assert_eq!(a.alloc(1024, 256), 768);
        a.free(b0);
        // Most ever live: b0, b2 and the 1024-byte block (b1 was already free).
        assert_eq!(a.peak_live(), 2 * 256 + 1024);
    }

    #[test]
    fn deterministic_replay() {
        let run = || {
            let mut a = ArenaPlanner::new();
            let mut offs = Vec::new();
            let mut live = Vec::new();
            for i in 0..200usize {
                let o = a.alloc((i * 7919) % 5000 + 1, 256);
                offs.push(o);
                live.push(o);
                if i % 3 == 0 {
                    let k = (i * 31) % live.len();
                    a.free(live.swap_remove(k));
                }
            }
            (offs, a.high_water())
        };
        assert_eq!(run(), run());
    }
}
