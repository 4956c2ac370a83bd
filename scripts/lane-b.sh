#!/usr/bin/env bash
# Lane B (design.md §4): install the pinned NVRTC wheels, then compile every cuda/*.cu for
# sm_90 through NVRTC and compare registers/spills with crates/cuda/kernels.registers.json.
# With CI=true a missing NVRTC fails the lane. QLORA_UPDATE_REGISTERS=1 rewrites the snapshot.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install-nvrtc.sh
# The test preloads NVRTC from .tools/nvrtc by absolute path; LD_LIBRARY_PATH is a fallback.
export LD_LIBRARY_PATH="$ROOT/.tools/nvrtc/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
cargo test -p qlora-cuda --test lane_b -- --nocapture
