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
    # the GPT-2 paper's tasks: CBT, generation tasks, and all of Table 3 from a folder of task files
    python tools/evaluate.py cbt --load checkpoints/run --input cbtest_CN_test_2500ex.txt
    python tools/evaluate.py qa --load checkpoints/run --input nq_open.jsonl --num-fewshot 5
    python tools/evaluate.py paper --load checkpoints/run --data-dir gpt2_eval/ --output paper.json
    # lm-evaluation-harness tasks (local task YAMLs, offline), lm-eval's results JSON
    python tools/evaluate.py lm_eval --load checkpoints/run --tasks my_lambada,my_hellaswag \
        --include-path my_tasks/ --batch-size 16 --output results.json

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

from megagpt2.distributed import finish_distributed  # noqa: E402
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
from megagpt2.eval.cbt import evaluate_cbt, read_cbt  # noqa: E402
from megagpt2.eval.gen_tasks import GEN_TASKS, evaluate_generation, task_examples  # noqa: E402
from megagpt2.eval.loading import add_model_args, model_from_args  # noqa: E402
from megagpt2.eval.paper import format_tables, run_paper  # noqa: E402
from megagpt2.eval.ppl import DETOKENIZERS  # noqa: E402

TASKS = ("ppl", "lambada", "multiple_choice", "cbt", "coqa", "summarize", "translate", "qa", "paper", "lm_eval")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    add_model_args(common)
    c = common.add_argument_group("evaluation")
    c.add_argument("--batch-size", type=int, default=8, help="windows or examples per forward pass")
    c.add_argument("--limit", type=int, default=None, help="only the first N examples (lambada, multiple_choice)")
    c.add_argument("--output", default=None, help="write the results here as JSON")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument(
        "--num-fewshot",
        type=int,
        default=None,
        help="k solved examples prepended to each prompt (default 0; lm_eval: the task's own)",
    )
    c.add_argument("--fewshot-pool", default=None, help="file of solved examples (default: the evaluated file)")
    c.add_argument("--fewshot-seed", type=int, default=1234)
    c.add_argument("--fewshot-delimiter", default="\n\n", help="text after each few-shot example")
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="task", required=True)
    ppl = sub.add_parser("ppl", parents=[common], help="sliding-window perplexity of a text file or dataset")
    src = ppl.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="UTF-8 text file")
    src.add_argument("--data-path", help="indexed dataset prefix (.bin/.idx), documents concatenated")
    ppl.add_argument("--window", type=int, default=None, help="tokens per window (default: the model's context)")
    ppl.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: window/2)")
    ppl.add_argument(
        "--detokenize",
        choices=DETOKENIZERS,
        default="none",
        help="undo WikiText / PTB / One Billion Word tokenisation before tokenizing "
        "(words are counted on the original)",
    )
    ppl.add_argument(
        "--no-eod-prefix",
        action="store_true",
        help="do not start the stream with the end-of-document token (the first token is not scored)",
    )
    ppl.add_argument("--max-tokens", type=int, default=None, help="only the first N tokens of the stream")
    for task, what in (
        ("lambada", 'last-word prediction on LAMBADA-format jsonl ({"text": ...})'),
        ("multiple_choice", "jsonl of context + choices + label (HellaSwag-style)"),
    ):
        t = sub.add_parser(task, parents=[common], help=what)
        t.add_argument("--input", required=True, help="jsonl file")
    add_lm_eval_parser(sub, common)
    add_paper_parsers(sub, common)
    args = p.parse_args(argv)
    if args.task != "lm_eval" and args.num_fewshot is None:
        args.num_fewshot = 5 if args.task in ("translate", "qa", "paper") else 0
    if args.batch_size < 1 or (args.num_fewshot or 0) < 0 or (args.limit is not None and args.limit < 1):
        p.error("--batch-size and --limit must be >= 1, --num-fewshot >= 0")
    if args.task == "ppl" and args.num_fewshot:
        p.error(
            "ppl scores a running text: the preceding window already is its context, so there is no "
            "prompt to prepend examples to (--num-fewshot applies to lambada and multiple_choice)"
        )
    return args


def add_lm_eval_parser(sub, common: argparse.ArgumentParser) -> None:
    """`lm_eval`: lm-evaluation-harness tasks on this model (docs/evaluation.md)."""
    le = sub.add_parser("lm_eval", parents=[common], help="lm-evaluation-harness tasks (lm_eval.simple_evaluate)")
    le.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names")
    le.add_argument("--include-path", default=None, help="folder of your own task YAMLs (local data files)")
    le.add_argument("--max-length", type=int, default=None, help="context in tokens (default: the model's)")
    le.add_argument("--max-gen-toks", type=int, default=256, help="generation budget when a task sets none")
    le.add_argument("--seed", type=int, default=1234, help="lm-eval's seeds (few-shot sampling) and ours (sampling)")
    le.add_argument("--log-samples", action="store_true", help="also write every request and response")
    le.add_argument(
        "--bootstrap-iters",
        type=int,
        default=0,
        help="bootstrap resamples for standard errors (lm-eval's CLI uses 100000; 0 = none, fast)",
    )
    le.add_argument(
        "--no-default-tasks",
        action="store_true",
        help="only the tasks of --include-path (never index lm-eval's built-in tasks)",
    )


def add_paper_parsers(sub, common: argparse.ArgumentParser) -> None:
    """The GPT-2 paper's tasks that lm-eval lacks, and `paper` to run them all (docs/evaluation.md)."""
    cbt = sub.add_parser("cbt", parents=[common], help="Children's Book Test file (CBT-CN / CBT-NE)")
    cbt.add_argument("--input", required=True, help="CBT text file (cbtest_CN_test_2500ex.txt layout)")
    cbt.add_argument("--detokenize", choices=DETOKENIZERS, default="cbt", help="undo CBT's PTB-style tokenisation")
    for task, what in (
        ("coqa", "CoQA-style reading comprehension (F1)"),
        ("summarize", "TL;DR: summarization (ROUGE-1/2/L)"),
        ("translate", "'english = french' translation (BLEU)"),
        ("qa", "closed-book 'Q: ... A:' question answering (exact match)"),
    ):
        t = sub.add_parser(task, parents=[common], help=what)
        t.add_argument("--input", required=True, help="jsonl file (formats: docs/evaluation.md)")
        t.add_argument("--seed", type=int, default=1234, help="sampling seed (summarize: top-k 2)")
        t.add_argument("--max-new-tokens", type=int, default=None, help="generation budget (default: the task's)")
        if task == "translate":
            t.add_argument("--direction", choices=("en-fr", "fr-en"), default="en-fr")
    paper = sub.add_parser("paper", parents=[common], help="every GPT-2 paper task with data in --data-dir")
    paper.add_argument("--data-dir", required=True, help="folder with the task files (docs/evaluation.md)")
    paper.add_argument("--tasks", default=None, help="comma-separated subset (default: all present)")
    paper.add_argument("--window", type=int, default=None, help="perplexity window (default: the model's context)")
    paper.add_argument("--stride", type=int, default=None, help="perplexity stride (default: window/2)")
    paper.add_argument("--seed", type=int, default=1234)


def run_cbt(model, tokenizer, args, rank0: bool) -> tuple[dict, dict]:
    examples = read_cbt(args.input)[: args.limit]
    with _bar(sum(len(e.candidates) for e in examples), args, rank0, "seq") as bar:
        metrics = evaluate_cbt(model, tokenizer, examples, args.detokenize, args.batch_size, bar.update)
    return metrics, {"detokenize": args.detokenize, "limit": args.limit}


def run_generation(model, tokenizer, args, rank0: bool) -> tuple[dict, dict]:
    examples = task_examples(
        args.task,
        args.input,
        args.num_fewshot,
        args.fewshot_seed,
        args.fewshot_pool,
        getattr(args, "direction", "en-fr"),
    )[: args.limit]
    with _bar(len(examples), args, rank0, "example") as bar:
        metrics = evaluate_generation(
            args.task, model, tokenizer, examples, args.batch_size, args.seed, args.max_new_tokens, bar.update
        )
    settings = {
        "num_fewshot": args.num_fewshot,
        "fewshot_seed": args.fewshot_seed,
        "seed": args.seed,
        "limit": args.limit,
        "direction": getattr(args, "direction", None),
    }
    return metrics, settings


def run_paper_tasks(model, tokenizer, args, rank0: bool) -> tuple[dict, dict]:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    opts = {
        "batch_size": args.batch_size,
        "num_fewshot": args.num_fewshot,
        "seed": args.seed,
        "limit": args.limit,
        "window": args.window,
        "stride": args.stride,
    }
    report = run_paper(model, tokenizer, args.data_dir, tasks, opts, log=print if rank0 else (lambda _: None))
    if rank0:
        print(format_tables(report, os.path.basename(os.path.normpath(args.load))))
    return report, {"data_dir": args.data_dir, **opts}


def _bar(total: int, args, rank0: bool, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, disable=args.no_progress or not rank0, file=sys.stderr, dynamic_ncols=True)


def run_ppl(model, tokenizer, args, rank0: bool) -> tuple[dict, dict]:
    window = args.window or model.cfg.n_positions
    stride = args.stride or max(window // 2, 1)
    words = n_bytes = chars = None
    if args.input:
        original = read_text(args.input)
        text = detokenize(original, args.detokenize)
        words, n_bytes, chars = count_words(original), len(text.encode("utf-8")), len(text)
        stream = tokenizer.encode(text)
    else:
        stream = read_indexed(args.data_path, args.max_tokens).tolist()
    if args.max_tokens is not None:
        stream = stream[: args.max_tokens]
        words = n_bytes = chars = None  # a cut stream no longer covers the whole text
    if not args.no_eod_prefix:
        stream = [tokenizer.eod] + list(stream)
    n_windows = len(sliding_windows(len(stream), window, stride))
    with _bar(n_windows, args, rank0, "window") as bar:
        nll, tokens = stream_nll(model, stream, window, stride, args.batch_size, tokenizer.eod, bar.update)
    settings = {
        "window": window,
        "stride": stride,
        "windows": n_windows,
        "eod_prefix": not args.no_eod_prefix,
        "detokenize": args.detokenize,
    }
    return ppl_metrics(nll, tokens, words, n_bytes, chars), settings


def run_choice_task(model, tokenizer, args, rank0: bool) -> tuple[dict, dict]:
    read = lambada_examples if args.task == "lambada" else mc_examples
    examples = read(args.input)[: args.limit]
    pool = pool_texts(args.task, args.fewshot_pool) if args.fewshot_pool else None
    total = len(examples) if args.task == "lambada" else sum(len(ch) for _, ch, _ in examples)
    fn = evaluate_lambada if args.task == "lambada" else evaluate_multiple_choice
    with _bar(total, args, rank0, "seq") as bar:
        metrics = fn(
            model,
            tokenizer,
            examples,
            pool,
            args.num_fewshot,
            args.fewshot_seed,
            args.fewshot_delimiter,
            args.batch_size,
            bar.update,
        )
    settings = {
        "num_fewshot": args.num_fewshot,
        "fewshot_pool": args.fewshot_pool or args.input,
        "fewshot_seed": args.fewshot_seed,
        "limit": args.limit,
    }
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
    flags = any(
        getattr(args, k) is not None
        for k in ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model", "eod_token")
    )
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
        if args.task == "lm_eval":
            from megagpt2.eval.harness import main_lm_eval

            code = main_lm_eval(args)
            finish_distributed()
            return code
        model, tokenizer, meta, groups = model_from_args(args)
        if args.task == "ppl" and args.data_path:
            tokenizer = dataset_tokenizer(args, model, tokenizer, meta)
        rank0 = groups.layout.rank == 0
        run = {"ppl": run_ppl, "cbt": run_cbt, "paper": run_paper_tasks}.get(args.task)
        run = run or (run_generation if args.task in GEN_TASKS else run_choice_task)
        metrics, settings = run(model, tokenizer, args, rank0)
    except (ModelLoadError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    source = getattr(args, "input", None) or getattr(args, "data_path", None) or getattr(args, "data_dir", None)
    result = {
        "task": args.task,
        "load": args.load,
        "input": source,
        "metrics": metrics,
        "settings": {**settings, "batch_size": args.batch_size, "dtype": args.dtype, "tp": args.tp},
        "tokenizer": tokenizer.identity()["type"],
        "step": meta.get("step"),
        "seconds": round(time.time() - t0, 3),
    }
    if rank0:
        if args.task != "paper":
            print(table(args.task, {k: v for k, v in metrics.items() if k not in ("examples", "chosen")}))
        if args.output:
            with open(args.output, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
            print(f"results written to {args.output}")
    finish_distributed()  # with --tp under torchrun: every rank done, then the groups end
    return 0


if __name__ == "__main__":
    sys.exit(main())
