#!/usr/bin/env bash
# Lane C (design.md §4–5): run qlora-cuda's GPU tests and benches on the GPU machine, which
# has CUDA 13.0 in /usr/local/cuda but no Rust and no network.
#
#   Here (build machine):   bash scripts/gpu_suite.sh build [DEST]
#       Builds release test binaries of qlora-cuda, qlora-optim and the top-level suite (GPU vs
#       CPU-backend parity) and the `linear` and `adamw` benches, copies them stripped
#       into DEST (default: <repo>/gpu, ignored by git). The device tool sends the checkout the
#       session started in: DEST must be inside THAT checkout (e.g. the lead's main repo).
#   There (device machine, from the repo root, with `carry: ["gpu"]`):
#       bash scripts/gpu_suite.sh run
#       Runs every #[ignore]d GPU test one at a time, then the benches; one log per binary in
#       $QLORA_GPU_LOG, $OUT or gpu/logs (more than the 8 files the device tool returns from
#       $OUT: on the device machine use `all` below, which packs them).
#   No argument (a machine with both Rust and a GPU, e.g. scripts/test.sh lane C):
#       bash scripts/gpu_suite.sh      = build into gpu/, then run.
#
# The benchmark against transformers + PEFT + bitsandbytes (scripts/bench_compare.sh) needs
# the stripped `qlora` (~11 MiB) and bitsandbytes (the GPU machine has torch, transformers and
# peft but no bitsandbytes and no network), in gpu-bench/ (ignored by git):
#   Here:   bash scripts/gpu_suite.sh build-bench
#       release `qlora` → gpu-bench/bin/qlora; the pinned bitsandbytes wheel unpacked into
#       gpu-bench/pydeps with only the CUDA 13.0 library (the wheel's 128 MiB are mostly
#       libraries for other CUDA and ROCm versions; 4 MiB remain). Prints the total size.
#   There, with carry ["gpu-bench"] (or ["gpu", "gpu-bench"]: both fit one call's 64 MiB):
#       bash scripts/gpu_suite.sh bench [bench_compare args]
#   `all` (carry ["gpu", "gpu-bench"]): `run`, then `bench` at T 2048, then ncu over the quick
#       linear bench, within one device call; logs → $OUT/gpu-logs.tgz + $OUT/summary.txt.
#   `sanitize` (carry ["gpu"], a second call): compute-sanitizer memcheck, racecheck, synccheck
#       and initcheck over the kernel test binaries; logs → $OUT/sanitize.tgz.
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
        # package_id: "path+file:///dir#name@version" ("#version" when name is the dir name).
        pid = m["package_id"]
        frag = pid.rsplit("#", 1)[-1]
        pkg = frag.split("@")[0] if "@" in frag else pid.split("#")[0].rstrip("/").rsplit("/", 1)[-1]
        print(pkg + "." + m["target"]["name"] + " " + m["executable"])')
    [[ ${#tests[@]} -gt 0 ]] || { echo "gpu_suite: no test binaries built" >&2; exit 1; }
    # Named package.target: qlora-cuda and qlora-optim both have a tests/gpu.rs, and under the
    # bare target name one binary overwrote the other (only one of them ever travelled).
    rm -f "$DEST"/test-*
    for t in "${tests[@]}"; do
        name="${t%% *}"; exe="${t#* }"
        cp "$exe" "$DEST/test-$name"
        strip "$DEST/test-$name" 2>/dev/null || true
    done
    n=$(find "$DEST" -maxdepth 1 -name 'test-*' | wc -l)
    [[ $n -eq ${#tests[@]} ]] || { echo "gpu_suite: ${#tests[@]} test binaries but $n files: a name collides" >&2; exit 1; }
    # bench_exe PACKAGE BENCH: the release bench binary → $DEST/bench-BENCH, stripped.
    bench_exe() {
        local exe
        exe="$(cargo bench -p "$1" --bench "$2" --no-run --message-format=json 2>/dev/null |
            python3 -c 'import sys, json
for l in sys.stdin:
    try: m = json.loads(l)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"): print(m["executable"])' | tail -1)"
        cp "$exe" "$DEST/bench-$2"
        strip "$DEST/bench-$2" 2>/dev/null || true
    }
    bench_exe qlora-cuda linear
    # The optimizer bench (issue 6): CPU rows always, GPU rows where Device::open succeeds.
    bench_exe qlora-optim adamw
    cp "$ROOT/scripts/gpu_suite.sh" "$DEST/gpu_suite.sh"
    du -sh "$DEST"
    ls -la "$DEST"
    echo "gpu_suite: now call the device tool with carry [\"gpu\"] and: bash gpu/gpu_suite.sh run"
    ;;
run)
    # Runs from the repo root on the device machine.
    cd "$(pwd)"
    LOG="${QLORA_GPU_LOG:-${OUT:-gpu/logs}}"
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
        # A kernel that deadlocks would hang the whole device call: each binary gets
        # ${QLORA_GPU_TEST_TIMEOUT:-300} s (the whole suite runs in well under that on an H100).
        # --nocapture: each parity check prints its worst element and % of budget.
        if ! timeout "${QLORA_GPU_TEST_TIMEOUT:-300}" "$t" --ignored --test-threads=1 --nocapture \
            --skip exhaustive_select_form_equals_literal 2>&1 | tee "$LOG/$name.log"; then status=1; fi
    done
    echo "=== bench-linear"
    gpu/bench-linear 2>&1 | tee "$LOG/bench-linear.log" || status=1
    echo "=== bench-adamw"
    gpu/bench-adamw --steps 20 2>&1 | tee "$LOG/bench-adamw.log" || status=1
    exit $status
    ;;
build-bench)
    DEST="$ROOT/gpu-bench"
    rm -rf "$DEST"
    mkdir -p "$DEST/bin" "$DEST/pydeps"
    cd "$ROOT"
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
    cargo build --release -p qlora-cli
    cp "$CARGO_TARGET_DIR/release/qlora" "$DEST/bin/qlora"
    strip "$DEST/bin/qlora" 2>/dev/null || true
    # bitsandbytes 0.50.2: ships libbitsandbytes_cuda130.so (CUDA 13.0, the H100 driver 580)
    # beside cuda118…cuda132 and ROCm builds, picked by torch.version.cuda (2.11.0+cu130
    # there); requires torch >= 2.4. py3-none-manylinux_2_24_x86_64: one wheel for every
    # CPython >= 3.10. A wheel is a zip: unpacked, it imports from PYTHONPATH as installed.
    wheels="$(mktemp -d)"
    python3 -m pip download "bitsandbytes==$BNB_VERSION" --no-deps --only-binary=:all: \
        --platform manylinux_2_24_x86_64 --python-version 3.12 -d "$wheels"
    python3 -c 'import re, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
z.extractall(sys.argv[2], [n for n in z.namelist()
    if not re.search(r"libbitsandbytes_(?!cuda130\.so$|cpu\.so$)", n)])' \
        "$wheels"/bitsandbytes-*.whl "$DEST/pydeps"
    rm -rf "$wheels"
    ls "$DEST"/pydeps/bitsandbytes/libbitsandbytes_*
    du -sh "$DEST/bin" "$DEST/pydeps"
    total=$(du -sb "$DEST" | cut -f1)
    echo "gpu_suite: $total bytes; device call with carry [\"gpu-bench\"]: bash scripts/gpu_suite.sh bench"
    ;;
bench)
    # On the device machine: qlora vs transformers + PEFT + bitsandbytes, side by side.
    cd "$(pwd)"
    shift
    LOG="${QLORA_GPU_LOG:-${OUT:-gpu/logs}}"
    mkdir -p "$LOG"
    nvidia-smi 2>&1 | tee "$LOG/nvidia-smi-bench.log" || true
    QLORA="$(pwd)/gpu-bench/bin/qlora" exec bash scripts/bench_compare.sh "$@"
    ;;
all)
    # On the device machine, carry ["gpu", "gpu-bench"]: everything one GPU session needs, in
    # one call under the device tool's 10-minute limit: the GPU tests and the linear/adamw
    # benches (`run`), the side-by-side at T 2048 (`bench`), then an ncu pass over the quick
    # linear bench while time remains. Each part gets what is left of a ${QLORA_GPU_BUDGET:-560} s
    # budget. The device tool returns at most 8 files from $OUT: every log goes into
    # $OUT/gpu-logs.tgz, and $OUT/summary.txt holds what to read first (also printed).
    cd "$(pwd)"
    start=$(date +%s)
    budget="${QLORA_GPU_BUDGET:-560}"
    left() { echo $((budget - ($(date +%s) - start))); }
    export QLORA_GPU_LOG=/tmp/qlora-gpu-logs
    rm -rf "$QLORA_GPU_LOG"
    mkdir -p "$QLORA_GPU_LOG"
    summary="$QLORA_GPU_LOG/summary.txt"
    part() {  # part NAME SHARE_OF_WHAT_IS_LEFT(%) CMD...
        local name="$1" share="$2"
        shift 2
        local t=$(($(left) * share / 100))
        if ((t < 20)); then
            echo "=== $name: skipped, $(left) s left" | tee -a "$summary"
            return
        fi
        local s0=$(date +%s) rc=0
        timeout "$t" "$@" >"$QLORA_GPU_LOG/$name.out" 2>&1 || rc=$?
        echo "=== $name: rc $rc after $(($(date +%s) - s0)) s (limit $t s)" | tee -a "$summary"
    }
    QLORA_GPU_TEST_TIMEOUT=120 part suite 55 bash gpu/gpu_suite.sh run
    part compare 80 bash scripts/gpu_suite.sh bench --seq-lens 2048 --steps 3
    if command -v ncu >/dev/null; then
        QLORA_BENCH_QUICK=1 part ncu 90 ncu --kernel-name regex:qlr_ --launch-count 24 \
            --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
            --section LaunchStats gpu/bench-linear
    else
        echo "=== ncu: not installed" | tee -a "$summary"
    fi
    {
        echo "--- tests"
        grep -hE "^=== |^test result|^test .*FAILED|panicked at" "$QLORA_GPU_LOG/suite.out" || true
        echo "--- worst elements"
        # Highest share of the budget last (numeric: "9.7%" < "89.2%").
        grep -hE "worst element" "$QLORA_GPU_LOG"/test-*.log |
            sed -nE 's/.* ([0-9.]+)% of (its )?budget.*/\1\t&/p' | sort -g | cut -f2- | tail -15 || true
        echo "--- benches"
        grep -hE "^\||^#|^adamw|GPU" "$QLORA_GPU_LOG"/bench-linear.log "$QLORA_GPU_LOG"/bench-adamw.log || true
        echo "--- side by side"
        cat "$QLORA_GPU_LOG"/compare-*.txt 2>/dev/null || true
    } >>"$summary"
    if [[ -n "${OUT:-}" ]]; then
        tar czf "$OUT/gpu-logs.tgz" -C "$QLORA_GPU_LOG" .
        cp "$summary" "$OUT/summary.txt"
    fi
    cat "$summary"
    ;;
sanitize)
    # On the device machine, carry ["gpu"]: compute-sanitizer over the kernel tests (qlora-cuda's
    # parity tests, the optimizer's, the top-level f32/bf16 parity). memcheck: out-of-bounds and
    # misaligned accesses, with QLORA_POOL_EXACT=1 so that every buffer is its own allocation and
    # memcheck sees its real end; racecheck: shared-memory hazards between threads (what the
    # emulator's two schedules cannot show on real hardware); synccheck: barrier misuse;
    # initcheck: reads of device memory never written. Each (tool, binary) pair gets a share of
    # what is left of ${QLORA_GPU_BUDGET:-560} s. Logs → $OUT/sanitize.tgz, summary printed.
    cd "$(pwd)"
    export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
    export QLORA_CUDA_INCLUDE="${QLORA_CUDA_INCLUDE:-/usr/local/cuda/include}"
    export QLORA_REPO_ROOT="$(pwd)"
    export QLORA_KERNEL_CACHE="${QLORA_KERNEL_CACHE:-/tmp/qlora-kernels}"
    export QLORA_POOL_EXACT=1
    sanitizer="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
    [[ -x "$sanitizer" ]] || { echo "gpu_suite: compute-sanitizer not found" >&2; exit 1; }
    LOG=/tmp/qlora-sanitize
    rm -rf "$LOG"
    mkdir -p "$LOG"
    start=$(date +%s)
    budget="${QLORA_GPU_BUDGET:-560}"
    bins=(gpu/test-qlora-cuda.gpu gpu/test-qlora-suite.gpu_parity gpu/test-qlora-optim.gpu)
    tools=(memcheck racecheck synccheck initcheck)
    runs=$((${#bins[@]} * ${#tools[@]}))
    for tool in "${tools[@]}"; do
        for b in "${bins[@]}"; do
            left=$((budget - ($(date +%s) - start)))
            t=$((left / runs))
            runs=$((runs - 1))
            name="$tool-$(basename "$b")"
            if ((t < 15)); then
                echo "=== $name: skipped, $left s left" | tee -a "$LOG/summary.txt"
                continue
            fi
            s0=$(date +%s) rc=0
            timeout "$t" "$sanitizer" --tool "$tool" --print-limit 20 "$b" --ignored --test-threads=1 \
                >"$LOG/$name.log" 2>&1 || rc=$?
            { echo "=== $name: rc $rc after $(($(date +%s) - s0)) s (limit $t s)"
              grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|^test result" "$LOG/$name.log" || true; } |
                tee -a "$LOG/summary.txt"
        done
    done
    if [[ -n "${OUT:-}" ]]; then
        tar czf "$OUT/sanitize.tgz" -C "$LOG" .
        cp "$LOG/summary.txt" "$OUT/sanitize-summary.txt"
    fi
    ;;
local)
    bash "$ROOT/scripts/gpu_suite.sh" build "$ROOT/gpu"
    cd "$ROOT"
    exec bash "$ROOT/scripts/gpu_suite.sh" run
    ;;
*)
    echo "usage: $0 [build [DEST] | run | build-bench | bench [ARGS] | all]" >&2
    exit 2
    ;;
esac
