//! The crate's typed errors. Every variant names what it is about (kernel, file, buffer, op).

use std::path::PathBuf;

/// Why no GPU can be used. `Device::open` returns these instead of panicking.
#[derive(Debug, thiserror::Error)]
pub enum NoGpu {
    #[error(
        "the CUDA driver library (libcuda.so) cannot be loaded: no NVIDIA driver on this machine"
    )]
    NoDriver,
    #[error("the NVRTC library (libnvrtc.so.13) cannot be loaded; set LD_LIBRARY_PATH to its folder (or QLORA_NVRTC_DIR to a `pip install --target` folder, see scripts/install-nvrtc.sh)")]
    NoNvrtc,
    #[error("the cuBLAS/cuBLASLt libraries (libcublas.so.13, libcublasLt.so.13) cannot be loaded; set LD_LIBRARY_PATH")]
    NoCublas,
    #[error("the CUDA driver failed to initialise: {0}")]
    Init(String),
    #[error("the NVIDIA driver supports CUDA {found_major}.{found_minor}; qlora's bindings need CUDA 13.0 or newer (driver 580+)")]
    OldDriver { found_major: i32, found_minor: i32 },
    #[error("no CUDA device with ordinal {ordinal} (the driver sees {count})")]
    NoDevice { ordinal: usize, count: usize },
    #[error("device {ordinal} has compute capability {major}.{minor}; qlora's kernels need 8.0 or newer (bf16 mma.sync)")]
    TooOld {
        ordinal: usize,
        major: i32,
        minor: i32,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error(transparent)]
    NoGpu(#[from] NoGpu),
    #[error("CUDA driver call failed in {op}: {msg}")]
    Driver { op: String, msg: String },
    #[error("NVRTC failed to compile {file} for {arch}:\n{log}")]
    Compile {
        file: String,
        arch: String,
        log: String,
    },
    #[error("NVRTC call {call} failed for {file}: {msg}")]
    Nvrtc {
        file: String,
        call: String,
        msg: String,
    },
    #[error("kernel {entry} not found in the compiled module of {file}")]
    MissingEntry { file: String, entry: String },
    #[error("kernel cache {path}: {msg}")]
    Cache { path: PathBuf, msg: String },
    #[error("cuBLASLt call {op} failed: {msg}")]
    Blas { op: String, msg: String },
    #[error("{op}: bad argument {arg}: {msg}")]
    BadArg {
        op: String,
        arg: String,
        msg: String,
    },
    #[error("{op}: tensor {tensor} has a non-finite value ({count} block(s) affected)")]
    NonFinite {
        op: String,
        tensor: String,
        count: i32,
    },
    #[error("allocation of {bytes} bytes ({what}) failed: {msg}")]
    Alloc {
        what: String,
        bytes: usize,
        msg: String,
    },
}

pub type Result<T> = std::result::Result<T, CudaError>;

/// Shorthand for a `BadArg` error.
pub(crate) fn bad_arg(op: &str, arg: &str, msg: impl Into<String>) -> CudaError {
    CudaError::BadArg {
        op: op.into(),
        arg: arg.into(),
        msg: msg.into(),
    }
}

/// Wraps a cudarc driver error with the name of the call site.
pub(crate) fn drv(op: &str) -> impl FnOnce(cudarc::driver::DriverError) -> CudaError + '_ {
    move |e| CudaError::Driver {
        op: op.into(),
        msg: format!("{e:?}"),
    }
}
