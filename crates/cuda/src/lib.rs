//! CUDA device layer, NVRTC-compiled kernels and their typed launchers.
//!
//! Everything compiles without CUDA installed: cudarc loads the driver, NVRTC and cuBLASLt
//! dynamically, and [`Device::open`] returns a typed [`NoGpu`] error (never a panic) where any
//! of them is missing. Kernel sources live in the top-level `cuda/` folder; CI's lane B
//! compiles each for sm_90 through NVRTC (`tests/lane_b.rs`).

pub mod blas;
pub mod device;
pub mod error;
pub mod kernels;
pub mod nvrtc;
pub mod ops;

pub use device::{Args, Buf, Device, Elem, Geometry, Managed, Stream, View, ViewMut};
pub use error::{CudaError, NoGpu, Result};
