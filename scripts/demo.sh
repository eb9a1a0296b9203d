#!/usr/bin/env bash
# The embedded default job: real English text -> WebText-style jsonl scrape -> .bin/.idx ->
# train the tiny GPT-2 with ZeRO-2 on 2 CPU ranks (or every GPU when CUDA is there) for a few
# minutes -> checkpoint, loss plot and a generated sample. Extra arguments go to the trainer,
# e.g. `bash scripts/demo.sh --train.steps=100`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
prefix=data/demo/corpus
if [ ! -f "${prefix}_text_document.idx" ]; then
  mkdir -p data/demo
  $PY tools/make_demo_corpus.py --output data/demo/scrape.jsonl --cache-dir .cache/corpus
  $PY tools/preprocess_data.py --input data/demo/scrape.jsonl --output-prefix "$prefix" --workers 2 --append-eod
fi
run_dir=runs/demo-$(date +%Y%m%d-%H%M%S)
# graceful.py: Ctrl-C makes the ranks checkpoint and the demo exit 130 (bare deepspeed would not wait)
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  launcher=($PY launch/graceful.py .venv/bin/deepspeed)                 # every local GPU
else
  launcher=($PY launch/graceful.py .venv/bin/deepspeed --num_gpus 2)    # 2 CPU ranks on gloo
fi
"${launcher[@]}" launch/pretrain_gpt2.py --deepspeed_config configs/ds/zero2.json \
  --config configs/gpt2/tiny.yaml --data.path="${prefix}_text_document" \
  --checkpoint.dir="$run_dir" --logging.tensorboard_dir="$run_dir/tensorboard" --logging.sample_prompt="ROMEO:" "$@"
echo "[demo] checkpoint, metrics.jsonl and loss.png are in $run_dir"
