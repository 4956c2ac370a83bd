//! The kernel sources, embedded at build time (`include_str!` of the top-level `cuda/` folder),
//! and the in-memory headers each file may `#include "…"`.

/// One `cuda/*.cu` translation unit.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    /// File name under `cuda/`, e.g. `nf4.cu`.
    pub file: &'static str,
    pub source: &'static str,
}

macro_rules! src {
    ($f:literal) => {
        KernelSource {
            file: $f,
            source: include_str!(concat!("../../../cuda/", $f)),
        }
    };
}

/// Headers passed to NVRTC as in-memory includes.
pub const HEADERS: &[(&str, &str)] = &[("common.cuh", include_str!("../../../cuda/common.cuh"))];

/// Every kernel file this crate launches from. (The lane B test compiles every `cuda/*.cu` on
/// disk, including files other crates launch, e.g. the optimizer's.)
pub const SOURCES: &[KernelSource] = &[src!("nf4.cu")];

/// The embedded source of `file`.
pub fn source(file: &str) -> Option<&'static KernelSource> {
    SOURCES.iter().find(|s| s.file == file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvrtc::manifest_entries;

    #[test]
    fn every_source_declares_its_entries_with_the_naming_rule() {
        for s in SOURCES {
            let entries = manifest_entries(s.source);
            assert!(!entries.is_empty(), "{} has no `// entries:` line", s.file);
            let stem = s.file.trim_end_matches(".cu");
            for e in &entries {
                assert!(
                    e.starts_with("qlr_"),
                    "{}: entry {e} must start with qlr_",
                    s.file
                );
                assert!(
                    e.ends_with("_f32") || e.ends_with("_bf16") || e.ends_with("_u8"),
                    "{}: entry {e} must end with its dtype",
                    s.file
                );
                assert!(
                    e.contains(&format!("qlr_{}", stem.split('_').next().unwrap_or(stem))),
                    "{}: entry {e} should be named after its file",
                    s.file
                );
                assert!(
                    s.source.contains(&format!(" {e}(")),
                    "{}: declared entry {e} is not defined",
                    s.file
                );
            }
        }
    }
}
