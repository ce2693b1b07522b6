#!/usr/bin/env bash
# Run on a lent H100/H200 from the repository root, with .whl/ carried (bench/gpu_wheels.sh fills
# it; bench/RESULTS.md has the exact device call). Installs the wheels beside the machine's own
# packages, picks the datasets release the machine's pyarrow can run, then runs bench/gpu.py with
# the arguments given; gpu.json (every result, written after each configuration) and gpu.log land
# in $OUT. Nothing here stops the call early: without a usable datasets the rows that need it are
# skipped with the reason, and the generation rows still run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
exec 3>&1 4>&2 > >(tee -a "$OUT/gpu.log") 2>&1
tee_pid=$!
export PYTHONUNBUFFERED=1
started=$(date +%s)
SITE=${SITE:-/tmp/site}
export PYTHONPATH=$SITE

install() {  # install WHEEL...: into $SITE, in front of the machine's own packages
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@" \
    2>&1 | grep -v "^WARNING: Target directory" || true
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader || true
if compgen -G ".whl/*.whl" >/dev/null; then
  install .whl/*.whl
else
  echo "gpu.sh: no .whl/ carried: only what the machine has (run bench/gpu_wheels.sh here, carry .whl)"
fi
# datasets 5.2 needs pyarrow >= 24, 4.8 >= 21; the machine's pyarrow (or a carried one) decides.
pyarrow=$(python3 -c "import importlib.metadata as m; print(m.version('pyarrow'))" 2>/dev/null || echo 0)
major=${pyarrow%%.*}
if ((major >= 24)) && compgen -G ".whl/datasets5/*.whl" >/dev/null; then
  install .whl/datasets5/*.whl
elif ((major >= 21)) && compgen -G ".whl/datasets4/*.whl" >/dev/null; then
  echo "gpu.sh: pyarrow $pyarrow is older than datasets 5.2 needs (24): using datasets 4.8.5"
  install .whl/datasets4/*.whl
fi
# The real test: can the data stage import? If not, gpu.py skips the rows that need it.
if ! why=$(python3 -c "import datasets, hftextgen.data, hftextgen.train" 2>&1); then
  export BENCH_NO_DATASETS="pyarrow $pyarrow; $(echo "$why" | tail -1); fix: bench/gpu_wheels.sh --pyarrow"
  echo "gpu.sh: the data stage cannot import: $BENCH_NO_DATASETS"
fi
python3 - <<'PY'
import importlib.metadata as m

def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "missing"

names = ("torch", "triton", "transformers", "accelerate", "datasets", "pyarrow", "fsspec", "tokenizers", "tiktoken",
         "jsonargparse", "evaluate", "liger-kernel", "regex", "huggingface_hub", "numpy")
print("versions:", {n: version(n) for n in names}, flush=True)
PY
echo "gpu.sh: setup took $(($(date +%s) - started)) s"
python3 -m bench.gpu --out "$OUT/gpu.json" "$@"
code=$?
echo "gpu.sh: bench.gpu exited with $code after $(($(date +%s) - started)) s in all"
exec 1>&3 2>&4 3>&- 4>&-  # close tee's input, and let it finish writing the log
wait "$tee_pid"
exit $code
