//! NF4 blockwise quantization (see `specs/nf4.md` in the design notes).
