//! CUDA device layer and kernels.
