#!/usr/bin/env bash
# `qlora bench` next to the transformers + PEFT + bitsandbytes baseline (scripts/hf_bench.py),
# same shape, seq, batch, rank, all-linear targets, checkpointing on, on the same GPU, one
# after the other in separate processes. Prints both side by side with the ratio, and writes
# every raw output to $QLORA_GPU_LOG, else $OUT (the device tool's return folder), else gpu/logs.
#
# On the GPU machine, from the repo root, with gpu-bench/ carried (`gpu_suite.sh build-bench`):
#   bash scripts/bench_compare.sh [--shape llama3-8b] [--seq-lens "2048 4096"] \
#       [--batch-size 1] [--rank 16] [--warmup 2] [--steps 5]
# Environment: QLORA (default gpu/qlora), PYTHON (default python3).
set -euo pipefail

shape=llama3-8b
seq_lens="2048 4096"
batch=1
rank=16
warmup=2
steps=5
while [[ $# -gt 0 ]]; do
    case "$1" in
    --shape) shape="$2"; shift 2 ;;
    --seq-lens) seq_lens="$2"; shift 2 ;;
    --batch-size) batch="$2"; shift 2 ;;
    --rank) rank="$2"; shift 2 ;;
    --warmup) warmup="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    -h|--help) sed -n 2,13p "$0"; exit 0 ;;
    *) echo "bench_compare: unknown argument $1" >&2; exit 2 ;;
    esac
done

QLORA="${QLORA:-gpu/qlora}"
PYTHON="${PYTHON:-python3}"
LOG="${QLORA_GPU_LOG:-${OUT:-gpu/logs}}"
mkdir -p "$LOG"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export QLORA_CUDA_INCLUDE="${QLORA_CUDA_INCLUDE:-/usr/local/cuda/include}"
export QLORA_KERNEL_CACHE="${QLORA_KERNEL_CACHE:-/tmp/qlora-kernels}"
# bitsandbytes unpacked by `gpu_suite.sh build-bench` (no network there).
export PYTHONPATH="$(pwd)/gpu-bench/pydeps${PYTHONPATH:+:$PYTHONPATH}"

status=0
for T in $seq_lens; do
    tag="$shape-T$T-B$batch-r$rank"
    echo "=== qlora bench $tag"
    if ! "$QLORA" bench --device cuda --shape "$shape" --seq-len "$T" --batch-size "$batch" \
        --rank "$rank" --warmup "$warmup" --steps "$steps" --json \
        >"$LOG/qlora-$tag.json" 2>"$LOG/qlora-$tag.err"; then
        echo "qlora bench failed:"; cat "$LOG/qlora-$tag.err"; status=1
    fi
    echo "=== hf_bench $tag"
    if ! "$PYTHON" scripts/hf_bench.py --shape "$shape" --seq-len "$T" --batch-size "$batch" \
        --rank "$rank" --warmup "$warmup" --steps "$steps" 2>&1 | tee "$LOG/hf-$tag.log"; then
        status=1
    fi
    grep '^HF_BENCH_JSON ' "$LOG/hf-$tag.log" | tail -1 | cut -d' ' -f2- >"$LOG/hf-$tag.json" || true
    "$PYTHON" - "$LOG/qlora-$tag.json" "$LOG/hf-$tag.json" "$tag" <<'EOF' | tee "$LOG/compare-$tag.txt"
import json, sys
def load(p):
    try:
        with open(p) as f:
            return json.loads(f.read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None
q, h, tag = load(sys.argv[1]), load(sys.argv[2]), sys.argv[3]
gib = lambda b: "-" if b is None else f"{b / 2**30:.2f} GiB"
num = lambda x, f: "-" if x is None else format(x, f)
g = lambda d, k: None if d is None else d.get(k)
print(f"--- {tag}")
print(f"{'':28} {'qlora':>16} {'HF+PEFT+bnb':>16} {'ratio':>8}")
for label, qk, hk, fmt, better_high in [
    ("tokens/s", "tokens_per_s", "tokens_per_s", ".1f", True),
    ("ms/step", "ms_per_step", "ms_per_step", ".2f", False),
]:
    qv, hv = g(q, qk), g(h, hk)
    ratio = (qv / hv if better_high else hv / qv) if qv and hv else None
    print(f"{label:28} {num(qv, fmt):>16} {num(hv, fmt):>16} {num(ratio, '.2f'):>8}x")
print(f"{'peak memory (measured)':28} {gib(g(q, 'measured_peak_bytes')):>16} "
      f"{gib(g(h, 'max_memory_allocated')):>16}   (HF: torch max_memory_allocated)")
print(f"{'':28} {'':>16} {gib(g(h, 'max_memory_reserved')):>16}   (HF: max_memory_reserved)")
print(f"{'':28} {'':>16} {gib(g(h, 'device_used_after')):>16}   (HF: cudaMemGetInfo used)")
print(f"{'peak memory (planned)':28} {gib(g(q, 'planned_peak_bytes')):>16}")
if q and q.get("measured_peak_source"):
    print(f"qlora peak measured as: {q['measured_peak_source']}")
if q and q.get("mfu") is not None:
    print(f"qlora MFU {100 * q['mfu']:.1f}% of {q['peak_tflops']} TFLOP/s ({q['mfu_convention']})")
if q and q.get("profile"):
    tot = q.get("profiled_ms_per_step") or 1.0
    print("qlora profile (ms/step, synchronize after every op):")
    for r in q["profile"]:
        print(f"  {r['class']:<10} {r['ms_per_step']:>10.3f}  {100 * r['ms_per_step'] / tot:5.1f}%")
EOF
done
exit $status
