//! Lane B: compile every `cuda/*.cu` for sm_90 through NVRTC (ptxas runs, so bad inline asm,
//! arch errors and register overflow fail here), check that every entry point each file
//! declares in its `// entries:` header exists (and no undeclared `qlr_` entry does), and
//! compare ptxas' registers/spills per kernel with the snapshot `kernels.registers.json`.
//!
//! NVRTC comes from `scripts/install-nvrtc.sh` (`.tools/nvrtc` at the repo root, or
//! `$QLORA_NVRTC_DIR`), or from `LD_LIBRARY_PATH`. Without it: fails when `CI=true`, else skips
//! with a message. `QLORA_UPDATE_REGISTERS=1` rewrites the snapshot instead of comparing.

use qlora_cuda::nvrtc::{self, CompileRequest, KernelStats, WHEEL_INCLUDE};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const ARCH: &str = "sm_90";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

fn snapshot_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels.registers.json")
}

/// Makes NVRTC loadable and returns the include folders, or None (after the CI check).
fn setup() -> Option<Vec<PathBuf>> {
    let wheel = std::env::var_os("QLORA_NVRTC_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".tools/nvrtc"));
    nvrtc::preload_from_dir(&wheel);
    let mut includes = vec![wheel.join(WHEEL_INCLUDE)];
    includes.extend(nvrtc::default_include_dirs());
    includes.retain(|d| d.join("cuda_bf16.h").exists());
    includes.dedup();
    let ok = nvrtc::is_available() && !includes.is_empty();
    if !ok {
        let msg = format!(
            "lane B: NVRTC 13.0 or the CUDA headers not found (looked in {} and LD_LIBRARY_PATH); run `bash scripts/install-nvrtc.sh`",
            wheel.display()
        );
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg} (CI=true: this lane must run)");
        }
        eprintln!("SKIPPED: {msg}");
        return None;
    }
    Some(includes)
}

fn kernel_files(dir: &Path) -> (Vec<PathBuf>, Vec<(String, String)>) {
    let mut cu = Vec::new();
    let mut headers = Vec::new();
    for e in std::fs::read_dir(dir).expect("read cuda/") {
        let p = e.expect("dir entry").path();
        match p.extension().and_then(|x| x.to_str()) {
            Some("cu") => cu.push(p),
            Some("cuh") | Some("h") => headers.push((
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).expect("read header"),
            )),
            _ => {}
        }
    }
    cu.sort();
    (cu, headers)
}

/// The snapshot: one kernel per line (`"file/entry": {...}`) so that a change reads as a
/// one-line diff in review and merges of different files' kernels do not conflict.
fn stats_json(all: &BTreeMap<String, BTreeMap<String, KernelStats>>) -> String {
    let (major, minor) = nvrtc::version().expect("nvrtc version");
    let mut lines = vec![format!(
        "  \"_\": {{\"arch\": \"{ARCH}\", \"nvrtc\": \"{major}.{minor}\"}}"
    )];
    for (file, ks) in all {
        for (k, s) in ks {
            lines.push(format!(
                "  \"{file}/{k}\": {{\"registers\": {}, \"stack_bytes\": {}, \"spill_stores\": {}, \"spill_loads\": {}, \"smem_bytes\": {}}}",
                s.registers, s.stack_bytes, s.spill_stores, s.spill_loads, s.smem_bytes
            ));
        }
    }
    let text = format!("{{\n{}\n}}\n", lines.join(",\n"));
    serde_json::from_str::<serde_json::Value>(&text).expect("snapshot is valid JSON");
    text
}

#[test]
fn lane_b_every_kernel_compiles_for_sm90() {
    let Some(includes) = setup() else { return };
    let dir = repo_root().join("cuda");
    let (files, headers) = kernel_files(&dir);
    assert!(!files.is_empty(), "no cuda/*.cu found in {}", dir.display());
    let hdrs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let mut failures = Vec::new();
    let mut all = BTreeMap::new();
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let source = std::fs::read_to_string(f).expect("read kernel");
        let req = CompileRequest {
            file: &name,
            source: &source,
            headers: &hdrs,
            arch: ARCH.into(),
            include_dirs: includes.clone(),
            ptxas_verbose: true,
        };
        let t = std::time::Instant::now();
        match nvrtc::compile_cubin(&req) {
            Err(e) => failures.push(format!("{name}: {e}")),
            Ok(c) => {
                let stats = nvrtc::parse_ptxas(&c.log);
                let declared = nvrtc::manifest_entries(&source);
                if declared.is_empty() {
                    failures.push(format!("{name}: no `// entries:` line in its header"));
                }
                for e in &declared {
                    if !stats.contains_key(e) {
                        failures.push(format!("{name}: declared entry {e} was not compiled (missing or not extern \"C\")"));
                    }
                }
                for k in stats.keys() {
                    if !declared.contains(k) {
                        failures.push(format!(
                            "{name}: entry {k} is compiled but not declared in `// entries:`"
                        ));
                    }
                }
                for (k, s) in &stats {
                    eprintln!(
                        "lane B: {name:>16} {k:<40} {:>3} regs {:>5} B smem {:>4} B stack {:>4}/{:<4} B spill st/ld",
                        s.registers, s.smem_bytes, s.stack_bytes, s.spill_stores, s.spill_loads
                    );
                }
                eprintln!(
                    "lane B: {name} compiled in {:.2} s ({} bytes CUBIN)",
                    t.elapsed().as_secs_f64(),
                    c.cubin.len()
                );
                all.insert(name, stats);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "lane B failures:\n{}",
        failures.join("\n")
    );

    let now = stats_json(&all);
    let path = snapshot_path();
    if std::env::var("QLORA_UPDATE_REGISTERS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &now).expect("write snapshot");
        eprintln!("lane B: wrote {}", path.display());
        return;
    }
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    if old != now {
        let diff = line_diff(&old, &now);
        panic!(
            "registers/spills changed against {} (review, then regenerate with QLORA_UPDATE_REGISTERS=1):\n{diff}",
            path.display()
        );
    }
}

/// A minimal line diff: lines only in the old (-) or only in the new (+) snapshot.
fn line_diff(old: &str, new: &str) -> String {
    let o: Vec<&str> = old.lines().collect();
    let n: Vec<&str> = new.lines().collect();
    let mut out = String::new();
    for l in &o {
        if !n.contains(l) {
            out += &format!("- {l}\n");
        }
    }
    for l in &n {
        if !o.contains(l) {
            out += &format!("+ {l}\n");
        }
    }
    out
}
