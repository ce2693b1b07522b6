#!/usr/bin/env bash
# Run on a lent H100/H200 from the repository root, with .whl/ carried (bench/gpu_wheels.sh
# fills it; bench/RESULTS.md has the exact device call). Installs the wheels beside the
# machine's own packages, then runs bench/gpu.py; its table, log and JSON land in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 - <<'PY'
import importlib.metadata as m

def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "missing"

names = ("torch", "transformers", "accelerate", "datasets", "pyarrow", "fsspec", "tokenizers", "tiktoken", "jsonargparse")
print("versions:", {n: version(n) for n in names})
if int(version("pyarrow").split(".")[0]) < 24:
    raise SystemExit("pyarrow < 24 is too old for datasets 5.2: refill .whl with bench/gpu_wheels.sh --pyarrow")
PY
set -o pipefail
if [[ "${1:-}" == "--generation" ]]; then  # a second device call: generation and evaluation
  PYTHONUNBUFFERED=1 python3 -m bench.generate --out "$OUT/generate.json" 2>&1 | tee "$OUT/generate.log"
  PYTHONUNBUFFERED=1 python3 -m bench.evaluate --out "$OUT/evaluate.json" 2>&1 | tee "$OUT/evaluate.log"
  exit 0
fi
PYTHONUNBUFFERED=1 python3 -m bench.gpu --out "$OUT/gpu.json" "$@" 2>&1 | tee "$OUT/gpu.log"
