//! The paging policy of the state arena (CUDA unified memory), as pure decisions the GPU
//! launcher follows and the CPU tests check.
//!
//! Each step on the GPU: if the arena is paged out, prefetch it to the device on the update
//! stream, run the (one) update launch, and — when [`PagingPolicy::page_out`] says so — prefetch
//! it back to the host on the same stream, then synchronize once. Forward and backward of the
//! next step then have the arena's bytes of device memory. Eviction by the driver is never
//! relied upon: before any prefetch to the device the launcher checks [`check_fits`], so
//! managed memory is never oversubscribed (that can hang the GPU).

use crate::error::{OptimError, Result};
use serde::{Deserialize, Serialize};

/// When to page the state arena back to the host after a step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PagingPolicy {
    /// Every step (the state never occupies device memory during forward/backward).
    Always,
    /// When the memory pressure of the next forward/backward exceeds `N` bytes: pressure =
    /// bytes it will need beyond what is free with the state resident. `AboveBytes(0)` pages
    /// exactly when the state would otherwise not fit.
    AboveBytes(u64),
    /// Never (the state stays on the device; plain device memory behaviour).
    #[default]
    Never,
}

/// Device memory as `cuMemGetInfo` reports it, with the state arena resident.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceMemory {
    pub free: u64,
    pub total: u64,
}

impl PagingPolicy {
    /// Parses `always`, `never` or `above:N` (bytes; suffixes K, M, G of 1024).
    pub fn parse(s: &str) -> Result<PagingPolicy> {
        let bad = || OptimError::InvalidConfig {
            key: "paging",
            value: s.to_string(),
            why: "expected always, never or above:N[K|M|G]",
        };
        match s {
            "always" => Ok(PagingPolicy::Always),
            "never" => Ok(PagingPolicy::Never),
            _ => {
                let n = s.strip_prefix("above:").ok_or_else(bad)?;
                let (digits, mul) = match n.chars().last() {
                    Some('K') => (&n[..n.len() - 1], 1u64 << 10),
                    Some('M') => (&n[..n.len() - 1], 1 << 20),
                    Some('G') => (&n[..n.len() - 1], 1 << 30),
                    _ => (n, 1),
                };
                let v: u64 = digits.parse().map_err(|_| bad())?;
                Ok(PagingPolicy::AboveBytes(
                    v.checked_mul(mul).ok_or_else(bad)?,
                ))
            }
        }
    }

    /// Whether to page the state out after this step, given the device memory now (state
    /// resident) and the bytes the next forward/backward will allocate (`next_need`, from the
    /// trainer's memory planner).
    pub fn page_out(&self, mem: DeviceMemory, next_need: u64) -> bool {
        match *self {
            PagingPolicy::Always => true,
            PagingPolicy::Never => false,
            PagingPolicy::AboveBytes(n) => next_need.saturating_sub(mem.free) > n,
        }
    }
}

/// Safety margin kept free when prefetching the state to the device (driver and allocator
/// slack), in bytes.
pub const PREFETCH_MARGIN: u64 = 64 << 20;

/// Refuses a prefetch of `state_bytes` to the device unless they fit in the free memory minus
/// [`PREFETCH_MARGIN`].
pub fn check_fits(state_bytes: u64, free: u64) -> Result<()> {
    match state_bytes.checked_add(PREFETCH_MARGIN) {
        Some(needed) if needed <= free => Ok(()),
        _ => Err(OptimError::WouldOversubscribe {
            needed: state_bytes.saturating_add(PREFETCH_MARGIN),
            free,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_decide() {
        assert_eq!(PagingPolicy::parse("always").unwrap(), PagingPolicy::Always);
        assert_eq!(PagingPolicy::parse("never").unwrap(), PagingPolicy::Never);
        assert_eq!(
            PagingPolicy::parse("above:2G").unwrap(),
            PagingPolicy::AboveBytes(2 << 30)
        );
        assert_eq!(
            PagingPolicy::parse("above:123").unwrap(),
            PagingPolicy::AboveBytes(123)
        );
        for bad in [
            "sometimes",
            "above:",
            "above:x",
            "above:99999999999999999999G",
        ] {
            let e = PagingPolicy::parse(bad).unwrap_err().to_string();
            assert!(e.contains("paging") && e.contains(bad), "{e}");
        }
        let mem = DeviceMemory {
            free: 10 << 30,
            total: 80 << 30,
        };
        assert!(PagingPolicy::Always.page_out(mem, 0));
        assert!(!PagingPolicy::Never.page_out(mem, u64::MAX));
        // needs 12 GiB with 10 free: pressure 2 GiB
        assert!(PagingPolicy::AboveBytes(0).page_out(mem, 12 << 30));
        assert!(PagingPolicy::AboveBytes(1 << 30).page_out(mem, 12 << 30));
        assert!(!PagingPolicy::AboveBytes(3 << 30).page_out(mem, 12 << 30));
        assert!(!PagingPolicy::AboveBytes(0).page_out(mem, 9 << 30));
    }

    #[test]
    fn never_oversubscribe() {
        assert!(check_fits(1 << 30, 2 << 30).is_ok());
        let e = check_fits(2 << 30, 2 << 30).unwrap_err();
        assert!(matches!(e, OptimError::WouldOversubscribe { .. }));
        assert!(check_fits(u64::MAX, u64::MAX).is_err());
    }
}
