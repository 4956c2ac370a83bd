#!/usr/bin/env bash
# Lane C (design.md §4–5): run qlora-cuda's GPU tests and benches on the GPU machine, which
# has CUDA 13.0 in /usr/local/cuda but no Rust and no network.
#
#   Here (build machine):   bash scripts/gpu_suite.sh build [DEST]
#       Builds release test binaries of qlora-cuda, qlora-optim and the top-level suite (GPU vs
#       CPU-backend parity) and the `linear` bench, copies them stripped
#       into DEST (default: <repo>/gpu, ignored by git). The device tool sends the checkout the
#       session started in: DEST must be inside THAT checkout (e.g. the lead's main repo).
#   There (device machine, from the repo root, with `carry: ["gpu"]`):
#       bash scripts/gpu_suite.sh run
#       Runs every #[ignore]d GPU test one at a time, then the benches; logs go to $OUT
#       (the device tool's return folder) or gpu/logs.
#   No argument (a machine with both Rust and a GPU, e.g. scripts/test.sh lane C):
#       bash scripts/gpu_suite.sh      = build into gpu/, then run.
#
# The benchmark against transformers + PEFT + bitsandbytes (scripts/bench_compare.sh) travels
# separately, in gpu-bench/ (ignored by git): the bitsandbytes wheel (41 MiB) plus the stripped
# `qlora` (~11 MiB) fit one device call, but not together with the test binaries of gpu/.
#   Here:   bash scripts/gpu_suite.sh build-bench
#       release `qlora` → gpu-bench/bin/qlora (stripped); `pip download` of the pinned
#       bitsandbytes manylinux x86_64 wheel → gpu-bench/wheels/ (the GPU machine has torch,
#       transformers and peft but no bitsandbytes and no network). Prints the total size.
#   There, one call with carry ["gpu-bench"] when that total is under 64 MiB:
#       bash scripts/gpu_suite.sh install-wheels && bash scripts/gpu_suite.sh bench
#   or, if it is not, two calls on the same warm machine (each under 64 MiB):
#       1. carry ["gpu-bench/wheels"]:  bash scripts/gpu_suite.sh install-wheels
#          (pip install --no-index into .tools/pydeps, which stays on the warm machine)
#       2. carry ["gpu-bench/bin"]:     bash scripts/gpu_suite.sh bench [bench_compare args]
#   `bench` runs llama3-8b at T 2048 and 4096 (B 1, r 16, all linear, checkpointing) for both
#   and prints them side by side; raw outputs land in $OUT.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cmd="${1:-local}"
# The bitsandbytes of the baseline (scripts/hf_bench.py); also the version crates/nf4 is
# bit-exact with.
BNB_VERSION=0.50.2

case "$cmd" in
build)
    DEST="${2:-$ROOT/gpu}"
    mkdir -p "$DEST"
    cd "$ROOT"
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
    # Test binaries (integration tests and unit tests) of qlora-cuda, release profile.
    mapfile -t tests < <(cargo test -p qlora-cuda -p qlora-optim -p qlora-suite --release --no-run --message-format=json 2>/dev/null |
        python3 -c 'import sys, json
for l in sys.stdin:
    try: m = json.loads(l)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"] + " " + m["executable"])')
    [[ ${#tests[@]} -gt 0 ]] || { echo "gpu_suite: no test binaries built" >&2; exit 1; }
    for t in "${tests[@]}"; do
        name="${t%% *}"; exe="${t#* }"
        cp "$exe" "$DEST/test-$name"
        strip "$DEST/test-$name" 2>/dev/null || true
    done
    bench="$(cargo bench -p qlora-cuda --bench linear --no-run --message-format=json 2>/dev/null |
        python3 -c 'import sys, json
for l in sys.stdin:
    try: m = json.loads(l)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"): print(m["executable"])' | tail -1)"
    cp "$bench" "$DEST/bench-linear"
    strip "$DEST/bench-linear" 2>/dev/null || true
    cp "$ROOT/scripts/gpu_suite.sh" "$DEST/gpu_suite.sh"
    du -sh "$DEST"
    ls -la "$DEST"
    echo "gpu_suite: now call the device tool with carry [\"gpu\"] and: bash gpu/gpu_suite.sh run"
    ;;
run)
    # Runs from the repo root on the device machine.
    cd "$(pwd)"
    LOG="${OUT:-gpu/logs}"
    mkdir -p "$LOG"
    export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
    export QLORA_CUDA_INCLUDE="${QLORA_CUDA_INCLUDE:-/usr/local/cuda/include}"
    export QLORA_REPO_ROOT="$(pwd)"
    export QLORA_KERNEL_CACHE="${QLORA_KERNEL_CACHE:-/tmp/qlora-kernels}"
    nvidia-smi 2>&1 | tee "$LOG/nvidia-smi.log" || true
    status=0
    for t in gpu/test-*; do
        name="$(basename "$t")"
        echo "=== $name"
        # --ignored runs exactly the GPU tests; one thread: one device, readable logs.
        # (the exhaustive 2^31 dynamic-map check is CPU-only and long: not part of this lane)
        if ! "$t" --ignored --test-threads=1 --skip exhaustive_select_form_equals_literal 2>&1 | tee "$LOG/$name.log"; then status=1; fi
    done
    echo "=== bench-linear"
    gpu/bench-linear 2>&1 | tee "$LOG/bench-linear.log" || status=1
    exit $status
    ;;
build-bench)
    DEST="$ROOT/gpu-bench"
    mkdir -p "$DEST/bin" "$DEST/wheels"
    cd "$ROOT"
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
    cargo build --release -p qlora-cli
    cp "$CARGO_TARGET_DIR/release/qlora" "$DEST/bin/qlora"
    strip "$DEST/bin/qlora" 2>/dev/null || true
    # bitsandbytes 0.50.2: ships libbitsandbytes_cuda130.so (CUDA 13.0, the H100 driver 580)
    # beside cuda118…cuda128 builds, picked by torch.version.cuda; requires torch >= 2.4.
    # py3-none-manylinux_2_24_x86_64: one wheel for every CPython >= 3.10.
    rm -f "$DEST/wheels/"*.whl
    python3 -m pip download "bitsandbytes==$BNB_VERSION" --no-deps --only-binary=:all: \
        --platform manylinux_2_24_x86_64 --python-version 3.12 -d "$DEST/wheels"
    du -sh "$DEST/bin" "$DEST/wheels"
    total=$(du -sb "$DEST" | cut -f1)
    if (( total < 64 * 1024 * 1024 )); then
        echo "gpu_suite: $total bytes: one device call, carry [\"gpu-bench\"]:"
        echo "    bash scripts/gpu_suite.sh install-wheels && bash scripts/gpu_suite.sh bench"
    else
        echo "gpu_suite: $total bytes exceed the 64 MiB carry limit: two calls on a warm machine:"
        echo "    1. carry [\"gpu-bench/wheels\"]: bash scripts/gpu_suite.sh install-wheels"
        echo "    2. carry [\"gpu-bench/bin\"]:    bash scripts/gpu_suite.sh bench"
    fi
    ;;
install-wheels)
    # On the device machine (no network): install the carried wheel where bench_compare.sh
    # puts it on PYTHONPATH; torch, numpy and packaging are already there (--no-deps).
    cd "$(pwd)"
    ls gpu-bench/wheels/*.whl >/dev/null
    python3 -m pip install --no-index --no-deps --upgrade --target .tools/pydeps gpu-bench/wheels/*.whl
    PYTHONPATH="$(pwd)/.tools/pydeps" python3 -c 'import bitsandbytes as b, torch; print("bitsandbytes", b.__version__, "torch", torch.__version__, "cuda", torch.version.cuda)'
    ;;
bench)
    # On the device machine: qlora vs transformers + PEFT + bitsandbytes, side by side.
    cd "$(pwd)"
    shift
    mkdir -p "${OUT:-gpu/logs}"
    nvidia-smi 2>&1 | tee "${OUT:-gpu/logs}/nvidia-smi-bench.log" || true
    QLORA="$(pwd)/gpu-bench/bin/qlora" exec bash scripts/bench_compare.sh "$@"
    ;;
local)
    bash "$ROOT/scripts/gpu_suite.sh" build "$ROOT/gpu"
    cd "$ROOT"
    exec bash "$ROOT/scripts/gpu_suite.sh" run
    ;;
*)
    echo "usage: $0 [build [DEST] | run | build-bench | install-wheels | bench [ARGS]]" >&2
    exit 2
    ;;
esac
