#!/usr/bin/env bash
# One GPU check for the fused kernels: CUDA tests, then the kernel and model benchmarks, figures
# under $OUT.
# Budget: under 8 minutes on one H200 (tests ~2 min, benchmarks ~4 min; each step has a timeout
# so a hang cannot eat the machine's time). Run from anywhere inside the checkout:
#   OUT=/some/dir benchmarks/gpu_check.sh
# Uses `python3` on PATH, else `python` (override with PYTHON=...); it needs torch, triton and
# pytest, nothing else (no deepspeed). Each step's status goes to $OUT/summary.txt, its output
# to $OUT/<step>.txt, the figures to $OUT/bench_*.json.
# The step limits add up to 550 s, under the device tool's 600 s per command. The run ends by
# printing $OUT/RESULTS.md (benchmarks/gpu_report.py): all figures, each target MET or MISSED.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_check_out}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # compiled kernels, not the CPU interpreter

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' 2>&1
} | tee "$SUMMARY"

step() {  # step NAME TIMEOUT_S CMD... : run, tee output to $OUT/NAME.txt, record the exit code
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "$name: rc=$rc (${limit}s limit, took $((SECONDS - start))s)" | tee -a "$SUMMARY"
}

if "$PY" -c 'import pytest' 2>/dev/null; then
  step cuda_tests 150 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_kernels_cuda.py tests/test_attention_core.py
else
  echo "cuda_tests: skipped, pytest is not installed for $PY" | tee -a "$SUMMARY"
fi

step bench_fp16_ln 40 "$PY" benchmarks/bench_kernels.py --dtype fp16 --compile none \
  --kernels layernorm --hidden 1600 --out "$OUT/bench_kernels_fp16.json"
# End to end: GPT-2 124M forward+backward with each kernels x attention choice (~1 min).
step bench_model 120 "$PY" benchmarks/bench_model.py --config configs/gpt2/124m.yaml \
  --micro-batch 8 --out "$OUT/bench_model_124m.json"
# torch.compile baselines only at the largest hidden size: compiling every shape costs minutes.
step bench_bf16 240 "$PY" benchmarks/bench_kernels.py --dtype bf16 --compile largest --sweep \
  --out "$OUT/bench_kernels_bf16.json"

echo "done in ${SECONDS}s" | tee -a "$SUMMARY"
# Last: every figure in one Markdown page with the targets judged ($OUT/RESULTS.md; commit it
# under benchmarks/results/).
"$PY" benchmarks/gpu_report.py "$OUT"
