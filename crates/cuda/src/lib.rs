//! CUDA device layer, NVRTC-compiled kernels and their typed launchers.
//!
//! Everything compiles without CUDA installed: cudarc loads the driver, NVRTC and cuBLASLt
//! dynamically, and [`Device::open`] returns a typed [`NoGpu`] error (never a panic) where any
//! of them is missing. Kernel sources live in the top-level `cuda/` folder, are embedded with
//! `include_str!` ([`kernels::SOURCES`]) and compiled by NVRTC for the device's arch on first
//! use, with an on-disk CUBIN cache keyed by (source, headers, arch, options, NVRTC version).
//! CI's lane B compiles each for sm_90 without a GPU (`tests/lane_b.rs`, `scripts/lane-b.sh`).
//!
//! Layout of the API:
//! - [`Device`]: `open`, streams ([`Stream`]), [`Timer`](device::Timer), the caching pool
//!   (`alloc`, `zeros`, `upload`, `download`, `copy`, `memset_zero`), managed memory
//!   (`alloc_managed` → [`Managed`] with `prefetch_to_device/host`), `launch` of any embedded or
//!   [registered](Device::register_source) kernel file, and cuBLASLt ([`blas`], via `with_blas`).
//! - [`Buf`] owns device memory; [`View`]/[`ViewMut`] borrow ranges of it and are what the
//!   launchers take.
//! - [`ops`]: one module per kernel file, each with `fwd`/`bwd` launchers (argument order:
//!   outputs, saved-for-backward, inputs, weights, dims, stream) and pure geometry functions.
//!   f32 and bf16 (`half::bf16`) instantiations of every op.

pub mod blas;
pub mod device;
pub mod error;
pub mod kernels;
pub mod nvrtc;
pub mod ops;

pub use device::{Args, Buf, Device, Elem, Geometry, Managed, Stream, View, ViewMut};
pub use error::{CudaError, NoGpu, Result};
