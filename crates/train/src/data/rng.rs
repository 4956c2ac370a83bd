//! SplitMix64: the data pipeline's only source of randomness.
//!
//! Why not the `rand` crate: its algorithms and `gen_range` reduction may change between
//! versions, and a checkpoint must reproduce the same order on any platform and build. SplitMix64
//! (Steele, Lea & Flood 2014, the generator Java's `SplittableRandom` and the xoshiro seeding
//! routine use) is 3 lines, passes BigCrush, and its whole state is one `u64` that a checkpoint
//! stores as a JSON number.

use serde::{Deserialize, Serialize};

/// Golden-ratio increment of SplitMix64 (2^64 / φ, odd).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitMix64 {
    pub state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform integer in `0..n` (n > 0) without modulo bias: draws falling in the final
    /// incomplete copy of `0..n` inside `0..2^64` are rejected (at most one retry in 2 on
    /// average for the worst n, ~never for small n).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "SplitMix64::below(0)");
        // 2^64 mod n, computed without overflow as (2^64 - n) mod n.
        let threshold = n.wrapping_neg() % n;
        loop {
            let x = self.next_u64();
            if x >= threshold {
                return x % n;
            }
        }
    }

    /// Fisher–Yates (Durstenfeld) shuffle: every permutation equally likely.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }

    /// An independent stream for another purpose (eval split vs epoch shuffles), so changing
    /// one does not change the other: a seed derived by one SplitMix64 step of `seed ^ salt`.
    pub fn derived(seed: u64, salt: u64) -> Self {
        Self::new(Self::new(seed ^ salt).next_u64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference outputs of the published SplitMix64 (Vigna's `splitmix64.c`, seed 1234567),
    /// as quoted in many ports' test suites.
    #[test]
    fn matches_reference_sequence() {
        let mut r = SplitMix64::new(1234567);
        let want = [
            6457827717110365317u64,
            3203168211198807973,
            9817491932198370423,
            4593380528125082431,
            16408922859458223821,
        ];
        for w in want {
            assert_eq!(r.next_u64(), w);
        }
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut r = SplitMix64::new(7);
        let mut counts = [0usize; 6];
        for _ in 0..60_000 {
            counts[r.below(6) as usize] += 1;
        }
        // Each bucket expects 10 000 with sd ≈ 91; 600 is > 6 sd.
        for c in counts {
            assert!((9_400..10_600).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn shuffle_is_a_permutation_and_reproducible() {
        let mut a: Vec<u32> = (0..100).collect();
        let mut b = a.clone();
        SplitMix64::new(42).shuffle(&mut a);
        SplitMix64::new(42).shuffle(&mut b);
        assert_eq!(a, b);
        assert_ne!(a, (0..100).collect::<Vec<_>>());
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    }
}
