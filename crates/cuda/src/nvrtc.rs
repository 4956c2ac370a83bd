//! NVRTC: finding the library, compiling one `cuda/*.cu` to CUBIN for a given arch (so ptxas
//! runs and its errors surface), and reading ptxas' resource report.
//!
//! The same function serves the runtime module cache (`Device`) and the GPU-less lane B test,
//! so what CI compiles is exactly what the device loads.

use crate::error::{CudaError, Result};
use cudarc::nvrtc::sys;
use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

/// Where `pip install --target DIR nvidia-cuda-nvrtc` puts things (CUDA 13 wheels).
pub const WHEEL_LIB: &str = "nvidia/cu13/lib";
pub const WHEEL_INCLUDE: &str = "nvidia/cu13/include";

/// Load NVRTC (and its builtins library, which NVRTC itself `dlopen`s by soname) from a
/// `pip install --target` folder by absolute path, so that cudarc's later `dlopen("libnvrtc.so.13")`
/// finds the already-loaded object by its soname without `LD_LIBRARY_PATH` (glibc reads that
/// variable only at process start). The handles are leaked on purpose: the libraries must stay
/// loaded for the life of the process. Returns false when the files are not there or fail to load.
pub fn preload_from_dir(dir: &Path) -> bool {
    let lib = dir.join(WHEEL_LIB);
    let builtins = lib.join("libnvrtc-builtins.so.13.0");
    let nvrtc = lib.join("libnvrtc.so.13");
    if !builtins.exists() || !nvrtc.exists() {
        return false;
    }
    // SAFETY: loading NVIDIA's shared libraries runs only their (side-effect free) initializers.
    unsafe {
        for p in [builtins, nvrtc] {
            match libloading::Library::new(&p) {
                Ok(l) => std::mem::forget(l),
                Err(_) => return false,
            }
        }
    }
    true
}

/// Is NVRTC loadable now? (cudarc panics on first use when it is not; ask this first.)
pub fn is_available() -> bool {
    // SAFETY: only tries to dlopen the candidates.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's (major, minor) version.
pub fn version() -> Result<(i32, i32)> {
    let (mut a, mut b) = (0, 0);
    // SAFETY: out-pointers to locals.
    let r = unsafe { sys::nvrtcVersion(&mut a, &mut b) };
    check(r, "nvrtcVersion", "-")?;
    Ok((a, b))
}

/// Folders holding `cuda_bf16.h` (NVRTC 13 has no built-in copy): `$QLORA_CUDA_INCLUDE`,
/// `$QLORA_NVRTC_DIR/nvidia/cu13/include`, `$CUDA_PATH/include`, `/usr/local/cuda/include`;
/// the ones that exist, in that order.
pub fn default_include_dirs() -> Vec<PathBuf> {
    let mut c = Vec::new();
    if let Some(p) = std::env::var_os("QLORA_CUDA_INCLUDE") {
        c.push(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("QLORA_NVRTC_DIR") {
        c.push(PathBuf::from(p).join(WHEEL_INCLUDE));
    }
    if let Some(p) = std::env::var_os("CUDA_PATH") {
        c.push(PathBuf::from(p).join("include"));
    }
    c.push(PathBuf::from("/usr/local/cuda/include"));
    c.retain(|d| d.join("cuda_bf16.h").exists());
    c
}

/// One compilation: a source file plus the in-memory headers it may `#include "…"`.
#[derive(Clone, Debug)]
pub struct CompileRequest<'a> {
    /// File name used in diagnostics, e.g. `nf4.cu`.
    pub file: &'a str,
    pub source: &'a str,
    /// (include name, text), e.g. `("common.cuh", …)`.
    pub headers: &'a [(&'a str, &'a str)],
    /// Real architecture, e.g. `sm_90`; a real arch makes NVRTC run ptxas and emit CUBIN.
    pub arch: String,
    pub include_dirs: Vec<PathBuf>,
    /// Ask ptxas for its per-kernel resource report (registers, spills) in the log.
    pub ptxas_verbose: bool,
}

impl CompileRequest<'_> {
    /// The exact option strings passed to NVRTC. They are part of the kernel cache key.
    pub fn options(&self) -> Vec<String> {
        let mut o = vec![
            format!("--gpu-architecture={}", self.arch),
            "--std=c++17".to_string(),
            // Kernels rely on explicit __fmul_rn/__fadd_rn where exactness matters; contraction
            // elsewhere is fine and faster.
            "--fmad=true".to_string(),
            "-default-device".to_string(),
            "--diag-suppress=550,177".to_string(),
        ];
        if self.ptxas_verbose {
            o.push("--ptxas-options=-v".to_string());
        }
        for d in &self.include_dirs {
            o.push(format!("-I{}", d.display()));
        }
        o
    }
}

/// CUBIN plus the full NVRTC/ptxas log.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
}

fn check(r: sys::nvrtcResult, call: &str, file: &str) -> Result<()> {
    if r == sys::nvrtcResult::NVRTC_SUCCESS {
        return Ok(());
    }
    // SAFETY: nvrtcGetErrorString returns a static C string.
    let msg = unsafe { CStr::from_ptr(sys::nvrtcGetErrorString(r)) }
        .to_string_lossy()
        .into_owned();
    Err(CudaError::Nvrtc {
        file: file.into(),
        call: call.into(),
        msg,
    })
}

fn cstring(s: &str, what: &str, file: &str) -> Result<CString> {
    CString::new(s).map_err(|_| CudaError::Nvrtc {
        file: file.into(),
        call: what.into(),
        msg: "interior NUL byte".into(),
    })
}

/// Compile to CUBIN. A compile error returns `CudaError::Compile` with the whole log.
/// Call [`is_available`] first: cudarc panics when the library is missing.
pub fn compile_cubin(req: &CompileRequest<'_>) -> Result<Compiled> {
    let file = req.file;
    let src = cstring(req.source, "source", file)?;
    let name = cstring(file, "name", file)?;
    let hdr_src: Vec<CString> = req
        .headers
        .iter()
        .map(|(_, s)| cstring(s, "header", file))
        .collect::<Result<_>>()?;
    let hdr_names: Vec<CString> = req
        .headers
        .iter()
        .map(|(n, _)| cstring(n, "header name", file))
        .collect::<Result<_>>()?;
    let hdr_src_p: Vec<*const std::ffi::c_char> = hdr_src.iter().map(|c| c.as_ptr()).collect();
    let hdr_names_p: Vec<*const std::ffi::c_char> = hdr_names.iter().map(|c| c.as_ptr()).collect();
    let opts: Vec<CString> = req
        .options()
        .iter()
        .map(|o| cstring(o, "option", file))
        .collect::<Result<_>>()?;
    let opts_p: Vec<*const std::ffi::c_char> = opts.iter().map(|c| c.as_ptr()).collect();

    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer refers to a CString alive until the end of this function; the
    // program is destroyed on every path below.
    unsafe {
        check(
            sys::nvrtcCreateProgram(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                hdr_src_p.len() as i32,
                hdr_src_p.as_ptr(),
                hdr_names_p.as_ptr(),
            ),
            "nvrtcCreateProgram",
            file,
        )?;
        let compiled = sys::nvrtcCompileProgram(prog, opts_p.len() as i32, opts_p.as_ptr());
        let log = program_log(prog, file);
        let out = match (compiled, log) {
            (sys::nvrtcResult::NVRTC_SUCCESS, Ok(log)) => {
                cubin(prog, file).map(|cubin| Compiled { cubin, log })
            }
            (sys::nvrtcResult::NVRTC_SUCCESS, Err(e)) => Err(e),
            (_, log) => Err(CudaError::Compile {
                file: file.into(),
                arch: req.arch.clone(),
                log: log.unwrap_or_else(|e| format!("(no log: {e})")),
            }),
        };
        sys::nvrtcDestroyProgram(&mut prog);
        out
    }
}

unsafe fn program_log(prog: sys::nvrtcProgram, file: &str) -> Result<String> {
    let mut n = 0usize;
    check(
        sys::nvrtcGetProgramLogSize(prog, &mut n),
        "nvrtcGetProgramLogSize",
        file,
    )?;
    let mut buf = vec![0u8; n.max(1)];
    check(
        sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr().cast()),
        "nvrtcGetProgramLog",
        file,
    )?;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

unsafe fn cubin(prog: sys::nvrtcProgram, file: &str) -> Result<Vec<u8>> {
    let mut n = 0usize;
    check(
        sys::nvrtcGetCUBINSize(prog, &mut n),
        "nvrtcGetCUBINSize",
        file,
    )?;
    let mut buf = vec![0u8; n];
    check(
        sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast()),
        "nvrtcGetCUBIN",
        file,
    )?;
    Ok(buf)
}

/// ptxas' report for one entry point.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    pub registers: u32,
    pub stack_bytes: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    /// Static shared memory in bytes (0 when ptxas does not print it).
    pub smem_bytes: u32,
}

/// Parse `--ptxas-options=-v` output into per-entry stats, keyed by the (unmangled for
/// `extern "C"`) entry name. Lines look like:
/// ```text
/// ptxas info    : Compiling entry function 'qlr_x' for 'sm_90'
/// ptxas info    : Function properties for qlr_x
/// ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 10 registers, used 1 barriers, 64 bytes smem
/// ```
pub fn parse_ptxas(log: &str) -> BTreeMap<String, KernelStats> {
    fn num_before(s: &str, unit: &str) -> Option<u32> {
        let i = s.find(unit)?;
        s[..i]
            .trim_end()
            .rsplit(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    }
    let mut out = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            out.insert(name.clone(), KernelStats::default());
            current = Some(name);
        } else if let Some(name) = &current {
            let s = out.get_mut(name).expect("inserted above");
            if line.contains("bytes stack frame") {
                s.stack_bytes = num_before(line, "bytes stack frame").unwrap_or(0);
                s.spill_stores = num_before(line, "bytes spill stores").unwrap_or(0);
                s.spill_loads = num_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used ") && line.contains(" registers") {
                s.registers = num_before(line, " registers").unwrap_or(0);
                s.smem_bytes = num_before(line, " bytes smem").unwrap_or(0);
                current = None;
            }
        }
    }
    out
}

/// Entry points a kernel file declares in its header: every `// entries: a b c` line.
pub fn manifest_entries(source: &str) -> Vec<String> {
    source
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("// entries:"))
        .flat_map(|l| l.split_whitespace().map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_report() {
        let log = "t.cu(4): warning\nptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function '_Z1kIfEvPT_' for 'sm_90'\n\
ptxas info    : Function properties for _Z1kIfEvPT_\n\
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 8 registers, used 0 barriers\n\
ptxas info    : Compiling entry function 'qlr_a_fwd_bf16' for 'sm_90'\n\
ptxas info    : Function properties for qlr_a_fwd_bf16\n\
ptxas         .     24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 255 registers, used 1 barriers, 4160 bytes smem, 400 bytes cmem[0]\n";
        let s = parse_ptxas(log);
        assert_eq!(s.len(), 2);
        assert_eq!(
            s["_Z1kIfEvPT_"],
            KernelStats {
                registers: 8,
                ..Default::default()
            }
        );
        assert_eq!(
            s["qlr_a_fwd_bf16"],
            KernelStats {
                registers: 255,
                stack_bytes: 24,
                spill_stores: 8,
                spill_loads: 12,
                smem_bytes: 4160
            }
        );
    }

    #[test]
    fn reads_manifest_lines() {
        let src = "// x.cu: blah\n// entries: qlr_a_fwd_f32 qlr_a_fwd_bf16\n  // entries: qlr_b\nint x;\n";
        assert_eq!(
            manifest_entries(src),
            ["qlr_a_fwd_f32", "qlr_a_fwd_bf16", "qlr_b"]
        );
    }

    #[test]
    fn options_carry_arch_and_includes() {
        let r = CompileRequest {
            file: "a.cu",
            source: "",
            headers: &[],
            arch: "sm_90".into(),
            include_dirs: vec![PathBuf::from("/inc")],
            ptxas_verbose: true,
        };
        let o = r.options();
        assert!(o.contains(&"--gpu-architecture=sm_90".to_string()));
        assert!(o.contains(&"--ptxas-options=-v".to_string()));
        assert!(o.contains(&"-I/inc".to_string()));
    }
}
