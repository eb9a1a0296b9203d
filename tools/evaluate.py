#!/usr/bin/env python
"""Zero- and few-shot evaluation of a megagpt2 checkpoint or a Hugging Face GPT-2 directory.

    # perplexity of a text file (WikiText-style detokenized), window 1024, stride 512
    python tools/evaluate.py ppl --load checkpoints/run --input wiki.test.raw --detokenize wikitext --stride 512
    # perplexity of a preprocessed dataset (.bin/.idx prefix; its tokenizer sidecar must match the model's)
    python tools/evaluate.py ppl --load checkpoints/run --data-path data/owt_text_document --max-tokens 1000000
    # LAMBADA last-word accuracy and perplexity
    python tools/evaluate.py lambada --load hf_gpt2 --input lambada_test.jsonl --output lambada.json
    # HellaSwag-style multiple choice, 5-shot from a pool
    python tools/evaluate.py multiple_choice --load checkpoints/run --input val.jsonl \\
        --num-fewshot 5 --fewshot-pool train.jsonl --fewshot-seed 1234
    # tensor parallel: one rank per shard
    torchrun --nproc_per_node 2 tools/evaluate.py lambada --load checkpoints/run --tp 2 --input lambada_test.jsonl

Prints a table and writes the results as JSON (--output). docs/evaluation.md says what each
number measures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt2.eval import (  # noqa: E402
    ModelLoadError,
    count_words,
    detokenize,
    evaluate_lambada,
    evaluate_multiple_choice,
    lambada_examples,
    mc_examples,
    pool_texts,
    ppl_metrics,
    read_indexed,
    read_text,
    sliding_windows,
    stream_nll,
)
from megagpt2.eval.loading import add_model_args, model_from_args  # noqa: E402

TASKS = ("ppl", "lambada", "multiple_choice")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    add_model_args(common)
    c = common.add_argument_group("evaluation")
    c.add_argument("--batch-size", type=int, default=8, help="windows or examples per forward pass")
    c.add_argument("--limit", type=int, default=None, help="only the first N examples (lambada, multiple_choice)")
    c.add_argument("--output", default=None, help="write the results here as JSON")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("--num-fewshot", type=int, default=0, help="k solved examples prepended to each prompt")
    c.add_argument("--fewshot-pool", default=None, help="file of solved examples (default: the evaluated file)")
    c.add_argument("--fewshot-seed", type=int, default=1234)
    c.add_argument("--fewshot-delimiter", default="\n\n", help="text after each few-shot example")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task", required=True)
    ppl = sub.add_parser("ppl", parents=[common], help="sliding-window perplexity of a text file or dataset")
    src = ppl.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="UTF-8 text file")
    src.add_argument("--data-path", help="indexed dataset prefix (.bin/.idx), documents concatenated")
    ppl.add_argument("--window", type=int, default=None, help="tokens per window (default: the model's context)")
    ppl.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: window/2)")
    ppl.add_argument("--detokenize", choices=("none", "wikitext", "ptb"), default="none",
                     help="undo WikiText/PTB tokenisation before tokenizing (words are counted before)")
    ppl.add_argument("--no-eod-prefix", action="store_true",
                     help="do not start the stream with the end-of-document token (the first token is not scored)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="only the first N tokens of the stream")
    for task, what in (("lambada", "last-word prediction on LAMBADA-format jsonl ({\"text\": ...})"),
                       ("multiple_choice", "jsonl of context + choices + label (HellaSwag-style)")):
        t = sub.add_parser(task, parents=[common], help=what)
        t.add_argument("--input", required=True, help="jsonl file")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.num_fewshot < 0 or (args.limit is not None and args.limit < 1):
        p.error("--batch-size and --limit must be >= 1, --num-fewshot >= 0")
    if args.task == "ppl" and args.num_fewshot:
        p.error("ppl scores a running text: the preceding window already is its context, so there is no "
                "prompt to prepend examples to (--num-fewshot applies to lambada and multiple_choice)")
    return args


def _bar(total: int, args, rank0: bool, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, disable=args.no_progress or not rank0, file=sys.stderr, dynamic_ncols=True)


def run_ppl(model, tokenizer, args, rank0: bool) -> tuple[dict, dict]:
    window = args.window or model.cfg.n_positions
    stride = args.stride or max(window // 2, 1)
    words = n_bytes = None
    if args.input:
        original = read_text(args.input)
        text = detokenize(original, args.detokenize)
        words, n_bytes = count_words(original), len(text.encode("utf-8"))
        stream = tokenizer.encode(text)
    else:
        stream = read_indexed(args.data_path, args.max_tokens).tolist()
    if args.max_tokens is not None:
        stream = stream[:args.max_tokens]
        words = n_bytes = None  # a cut stream no longer covers the whole text
    if not args.no_eod_prefix:
        stream = [tokenizer.eod] + list(stream)
    n_windows = len(sliding_windows(len(stream), window, stride))
    with _bar(n_windows, args, rank0, "window") as bar:
        nll, tokens = stream_nll(model, stream, window, stride, args.batch_size, tokenizer.eod, bar.update)
    settings = {"window": window, "stride": stride, "windows": n_windows, "eod_prefix": not args.no_eod_prefix,
                "detokenize": args.detokenize}
    return ppl_metrics(nll, tokens, words, n_bytes), settings


def run_choice_task(model, tokenizer, args, rank0: bool) -> tuple[dict, dict]:
    read = lambada_examples if args.task == "lambada" else mc_examples
    examples = read(args.input)[:args.limit]
    pool = pool_texts(args.task, args.fewshot_pool) if args.fewshot_pool else None
    total = len(examples) if args.task == "lambada" else sum(len(ch) for _, ch, _ in examples)
    fn = evaluate_lambada if args.task == "lambada" else evaluate_multiple_choice
    with _bar(total, args, rank0, "seq") as bar:
        metrics = fn(model, tokenizer, examples, pool, args.num_fewshot, args.fewshot_seed,
                     args.fewshot_delimiter, args.batch_size, bar.update)
    settings = {"num_fewshot": args.num_fewshot, "fewshot_pool": args.fewshot_pool or args.input,
                "fewshot_seed": args.fewshot_seed, "limit": args.limit}
    return metrics, settings


def table(task: str, metrics: dict) -> str:
    """Two aligned columns, one metric per row."""
    rows = [(k, f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    w = max(len(k) for k, _ in rows)
    line = "-" * (w + 3 + max(len(v) for _, v in rows))
    return "\n".join([task, line] + [f"{k:<{w}} | {v}" for k, v in rows] + [line])


def dataset_tokenizer(args, model, tokenizer, meta: dict):
    """ppl --data-path: the tokens were written by the dataset's tokenizer (its sidecar), so that
    is the one to use when nothing pins the model's (no flags, no identity in the checkpoint);
    otherwise the two must be the same, or the run is refused naming both."""
    from megagpt2.data.sidecar import read_dataset_tokenizer
    from megagpt2.eval.loading import check_tokenizer

    sidecar = read_dataset_tokenizer(args.data_path)
    if sidecar is None:
        return tokenizer
    flags = any(getattr(args, k) is not None for k in ("tokenizer_type", "vocab_file", "merge_file",
                                                        "tokenizer_model", "eod_token"))
    if not flags and not meta.get("tokenizer"):
        own = sidecar.build()
        check_tokenizer(meta, own, model.cfg.vocab_size, args.load)
        return own
    sidecar.check(tokenizer, "the --tokenizer-* flags" if flags else f"the model {args.load}")
    return tokenizer


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    try:
        model, tokenizer, meta, ps = model_from_args(args)
        if args.task == "ppl" and args.data_path:
            tokenizer = dataset_tokenizer(args, model, tokenizer, meta)
        rank0 = ps.rank == 0
        run = run_ppl if args.task == "ppl" else run_choice_task
        metrics, settings = run(model, tokenizer, args, rank0)
    except (ModelLoadError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {"task": args.task, "load": args.load, "input": args.input or args.data_path, "metrics": metrics,
              "settings": {**settings, "batch_size": args.batch_size, "dtype": args.dtype, "tp": args.tp},
              "tokenizer": tokenizer.identity()["type"], "step": meta.get("step"),
              "seconds": round(time.time() - t0, 3)}
    if rank0:
        print(table(args.task, metrics))
        if args.output:
            with open(args.output, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
            print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
