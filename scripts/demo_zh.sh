#!/usr/bin/env bash
# The Chinese demo, GPT2-Chinese and GPT2-chitchat end to end on real text available offline
# (Debian's fortunes-zh: Tang and Song poems, classical sayings; GPL-3.0-or-later, fetched with
# apt-get at run time, never committed):
#   1. a BERT-style WordPiece vocabulary (one token per Han character) -> tokenizer.json + vocab.txt
#   2. preprocess in GPT2-Chinese's layout: [MASK] document [CLS], newlines as [SEP]
#   3. pretrain the tiny GPT-2 a few minutes with ZeRO-2 on 2 CPU ranks (or every GPU)
#   4. fine-tune on a chitchat-format dialogue set (poem lines answering poem lines), in
#      GPT2-chitchat's layout [CLS] u1 [SEP] u2 [SEP] ...
#   5. print a Chinese sample (at the end of pretraining) and a one-turn chat reply
# Extra arguments go to the pretraining run, e.g. `bash scripts/demo_zh.sh --train.steps=400`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
data=data/demo_zh
vocab_txt=$data/tok/vocab.txt
prefix=$data/zh
if [ ! -f "$data/chat.txt" ]; then
  $PY tools/make_zh_corpus.py --output-dir "$data" --cache-dir .cache/corpus
fi
if [ ! -f "$vocab_txt" ]; then
  $PY tools/train_tokenizer.py --type wordpiece --input "$data/pretrain.jsonl" --vocab-size 8000 \
    --output-dir "$data/tok"
fi
# The same layout flags go to preprocessing and training (quoted: [MASK] is a shell pattern).
tokenizer=(--tokenizer.tokenizer_type=BertWordPieceLowerCase "--tokenizer.vocab_file=$vocab_txt")
gpt2_chinese=('--tokenizer.bos_token=[MASK]' '--tokenizer.eod_token=[CLS]' '--tokenizer.newline_token=[SEP]')
if [ ! -f "${prefix}_text_document.idx" ]; then
  # The default cleaning is lossless: full-width punctuation (，：) stays as it is.
  $PY tools/preprocess_data.py --input "$data/pretrain.jsonl" --output-prefix "$prefix" --workers 2 \
    --tokenizer-type BertWordPieceLowerCase --vocab-file "$vocab_txt" \
    --prepend-bos --append-eod --bos-token '[MASK]' --eod-token '[CLS]' --newline-token '[SEP]'
fi
vocab_size=$(wc -l < "$vocab_txt")
run_dir=runs/demo_zh-$(date +%Y%m%d-%H%M%S)
# a free port, so a job already holding DeepSpeed's default 29500 does not stop the demo
port=$($PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  launcher=(.venv/bin/deepspeed --master_port "$port")                 # every local GPU
else
  launcher=(.venv/bin/deepspeed --master_port "$port" --num_gpus 2)    # 2 CPU ranks on gloo
fi
common=(--deepspeed_config configs/ds/zero2.json --config configs/gpt2/tiny.yaml
        "--model.vocab_size=$vocab_size" "${tokenizer[@]}")

echo "[demo_zh] pretraining on ${prefix}_text_document (GPT2-Chinese layout)"
"${launcher[@]}" launch/pretrain_gpt2.py "${common[@]}" "${gpt2_chinese[@]}" \
  "--data.path=${prefix}_text_document" --train.steps=200 --train.eval_interval=50 \
  --checkpoint.dir="$run_dir/pretrain" --checkpoint.interval=0 --logging.sample_prompt=春风 "$@"

echo "[demo_zh] fine-tuning on $data/chat.txt (GPT2-chitchat format and layout)"
"${launcher[@]}" launch/pretrain_gpt2.py "${common[@]}" '--tokenizer.bos_token=[CLS]' \
  --train.init_from="$run_dir/pretrain" --data.format=chitchat --data.path="$data/chat.txt" \
  --data.seq_length=64 --data.split=98,2,0 --optim.lr=1e-3 --optim.min_lr=1e-4 --optim.warmup_steps=10 \
  --train.steps=60 --train.eval_interval=30 --checkpoint.dir="$run_dir/chat" --checkpoint.interval=0 \
  --logging.sample_prompt=

$PY - "$run_dir" <<'EOF'
import json, sys
for stage in ("pretrain", "chat"):
    rows = [json.loads(line) for line in open(f"{sys.argv[1]}/{stage}/metrics.jsonl")]
    valid = [r["valid_loss"] for r in rows if "valid_loss" in r]
    print(f"[demo_zh] {stage} validation loss: {' -> '.join(f'{v:.3f}' for v in valid)}")
EOF
echo "[demo_zh] a one-turn chat with the fine-tuned model (chitchat's interact.py settings, repetition"
echo "[demo_zh] penalty 1.2); the user says 床前明月光，"
echo "床前明月光，" | $PY tools/generate.py --load "$run_dir/chat" --interactive --history-turns 3 \
  --top-k 8 --max-new-tokens 25 --repetition-penalty 1.2
echo
echo "[demo_zh] checkpoints, metrics.jsonl and loss.png are in $run_dir/{pretrain,chat}"
