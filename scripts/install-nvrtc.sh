#!/usr/bin/env bash
# Install the pinned NVRTC 13.0 wheels into .tools/nvrtc (ignored by git) for lane B:
# compiling every cuda/*.cu for sm_90 without a GPU or a CUDA toolkit.
#
# Why these wheels and pins (design.md §7):
#   nvidia-cuda-nvrtc~=13.0.0    libnvrtc.so.13 (+ builtins); 13.0 emits PTX ISA 9.0, which the
#                                H100's 580 driver accepts (newer NVRTC emits PTX it rejects).
#   nvidia-cuda-runtime~=13.0.0  include/cuda_bf16.h etc.: NVRTC 13 has no built-in bf16 header.
#   nvidia-cuda-crt~=13.0.0      include/crt/*: needed by cuda_bf16.h's host/device macros.
# Idempotent: a second run with the same pins changes nothing. Prints the directories that
# callers put into LD_LIBRARY_PATH (lib) and QLORA_CUDA_INCLUDE (include).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${QLORA_NVRTC_DIR:-$ROOT/.tools/nvrtc}"
PINS=("nvidia-cuda-nvrtc~=13.0.0" "nvidia-cuda-runtime~=13.0.0" "nvidia-cuda-crt~=13.0.0")
STAMP="$DEST/.installed"
PY="${PYTHON:-python3}"

want="$(printf '%s\n' "${PINS[@]}")"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -e "$DEST/nvidia/cu13/lib/libnvrtc.so.13" ]]; then
    echo "install-nvrtc: already installed in $DEST"
else
    if ! command -v "$PY" >/dev/null 2>&1; then
        echo "install-nvrtc: error: $PY not found (set PYTHON=...)" >&2
        exit 2
    fi
    mkdir -p "$DEST"
    # --target installs into a plain folder; --upgrade replaces an older copy in place.
    if ! "$PY" -m pip install --disable-pip-version-check --no-input --quiet \
        --only-binary=:all: --no-deps --upgrade --target "$DEST" "${PINS[@]}"; then
        echo "install-nvrtc: error: pip could not install ${PINS[*]} into $DEST." >&2
        echo "install-nvrtc: is the package registry (PyPI or PIP_INDEX_URL) reachable from here?" >&2
        exit 3
    fi
    printf '%s\n' "${PINS[@]}" >"$STAMP"
fi

LIB="$DEST/nvidia/cu13/lib"
INC="$DEST/nvidia/cu13/include"
for f in "$LIB/libnvrtc.so.13" "$INC/cuda_bf16.h" "$INC/crt/host_defines.h"; do
    if [[ ! -e "$f" ]]; then
        echo "install-nvrtc: error: expected $f after install; the wheel layout changed?" >&2
        exit 4
    fi
done
# cudarc's dynamic loader asks for "libnvrtc.so" among other names; give it the unversioned one.
[[ -e "$LIB/libnvrtc.so" ]] || ln -s libnvrtc.so.13 "$LIB/libnvrtc.so"
echo "install-nvrtc: lib     $LIB"
echo "install-nvrtc: include $INC"
echo "install-nvrtc: use: export LD_LIBRARY_PATH=$LIB:\$LD_LIBRARY_PATH"
