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

/// Every `cuda/*.cu` (a test below checks the folder and this list agree). Other crates launch
/// theirs by file name through `Device::launch`, e.g. qlora-optim's `adamw.cu`.
pub const SOURCES: &[KernelSource] = &[
    // Launched by qlora-optim (`Device::launch("adamw.cu", …)`); embedded here like every cuda/*.cu.
    src!("adamw.cu"),
    src!("attention.cu"),
    src!("cross_entropy.cu"),
    src!("elementwise.cu"),
    src!("embedding.cu"),
    src!("linear.cu"),
    src!("nf4.cu"),
    src!("residual.cu"),
    src!("rmsnorm.cu"),
    src!("rope.cu"),
    src!("swiglu.cu"),
];

/// The embedded source of `file`.
pub fn source(file: &str) -> Option<&'static KernelSource> {
    SOURCES.iter().find(|s| s.file == file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvrtc::manifest_entries;

    #[test]
    fn every_cuda_file_is_embedded() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cuda");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .expect("cuda/ folder")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".cu"))
            .collect();
        on_disk.sort();
        let mut embedded: Vec<String> = SOURCES.iter().map(|s| s.file.to_string()).collect();
        embedded.sort();
        assert_eq!(
            on_disk, embedded,
            "add new cuda/*.cu files to kernels::SOURCES"
        );
    }

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
                // Defined literally, or by a macro pasting the dtype (`qlr_x_fwd_##S(`).
                let macro_stem = e
                    .rsplit_once('_')
                    .map(|(a, _)| format!(" {a}_##S("))
                    .unwrap_or_default();
                assert!(
                    s.source.contains(&format!("{e}(")) || s.source.contains(&macro_stem),
                    "{}: declared entry {e} is not defined",
                    s.file
                );
            }
        }
    }
}
