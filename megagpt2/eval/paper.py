"""`tools/evaluate.py paper`: every GPT-2 paper task whose data is in a folder, in Table 3's layout.

File names looked for in --data-dir (the user brings the data; docs/evaluation.md says where
each comes from and its format):

    lambada.jsonl          LAMBADA test ({"text": ...} per line)
    cbt_cn.txt, cbt_ne.txt CBT test files (cbtest_CN_test_2500ex.txt, cbtest_NE_test_2500ex.txt)
    wikitext2.txt          wiki.test.tokens of WikiText-2    (word perplexity, wikitext detokenizer)
    ptb.txt                ptb.test.txt                       (word perplexity, ptb detokenizer)
    enwik8.txt             enwik8 test bytes (UTF-8 text)     (bits per byte)
    text8.txt              text8 test characters              (bits per character)
    wikitext103.txt        wiki.test.tokens of WikiText-103  (word perplexity, wikitext detokenizer)
    lm1b.txt               One Billion Word test sentences    (word perplexity, lm1b detokenizer)
    coqa.jsonl             CoQA records                       (F1)
    cnn_dailymail.jsonl    CNN/Daily Mail articles            (ROUGE-1/2/L, TL;DR:)
    wmt14_en_fr.jsonl      WMT-14 {"en", "fr"} pairs          (BLEU both directions)
    natural_questions.jsonl {"question", "answers"}           (exact match)
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional

from .cbt import evaluate_cbt, read_cbt
from .gen_tasks import evaluate_generation, task_examples
from .ppl import count_words, detokenize, ppl_metrics, read_text, sliding_windows, stream_nll
from .tasks import evaluate_lambada, lambada_examples

# task -> (file, kind, detokenizer or generation direction)
PAPER_TASKS: dict[str, tuple[str, str, str]] = {
    "lambada": ("lambada.jsonl", "lambada", ""),
    "cbt_cn": ("cbt_cn.txt", "cbt", "cbt"),
    "cbt_ne": ("cbt_ne.txt", "cbt", "cbt"),
    "wikitext2": ("wikitext2.txt", "ppl", "wikitext"),
    "ptb": ("ptb.txt", "ppl", "ptb"),
    "enwik8": ("enwik8.txt", "ppl", "none"),
    "text8": ("text8.txt", "ppl", "none"),
    "wikitext103": ("wikitext103.txt", "ppl", "wikitext"),
    "lm1b": ("lm1b.txt", "ppl", "lm1b"),
    "coqa": ("coqa.jsonl", "coqa", ""),
    "summarize": ("cnn_dailymail.jsonl", "summarize", ""),
    "translate_en_fr": ("wmt14_en_fr.jsonl", "translate", "en-fr"),
    "translate_fr_en": ("wmt14_en_fr.jsonl", "translate", "fr-en"),
    "qa": ("natural_questions.jsonl", "qa", ""),
}

# Table 3 column -> (task, metric, scale)
TABLE3 = [
    ("LAMBADA (PPL)", "lambada", "ppl", 1),
    ("LAMBADA (ACC)", "lambada", "accuracy", 100),
    ("CBT-CN (ACC)", "cbt_cn", "accuracy", 100),
    ("CBT-NE (ACC)", "cbt_ne", "accuracy", 100),
    ("WikiText2 (PPL)", "wikitext2", "word_ppl", 1),
    ("PTB (PPL)", "ptb", "word_ppl", 1),
    ("enwik8 (BPB)", "enwik8", "bits_per_byte", 1),
    ("text8 (BPC)", "text8", "bits_per_char", 1),
    ("WikiText103 (PPL)", "wikitext103", "word_ppl", 1),
    ("1BW (PPL)", "lm1b", "word_ppl", 1),
]
GENERATION = [
    ("CoQA (F1)", "coqa", "f1"),
    ("TL;DR ROUGE-1", "summarize", "rouge1"),
    ("TL;DR ROUGE-2", "summarize", "rouge2"),
    ("TL;DR ROUGE-L", "summarize", "rougeL"),
    ("En>Fr (BLEU)", "translate_en_fr", "bleu"),
    ("Fr>En (BLEU)", "translate_fr_en", "bleu"),
    ("NQ (EM %)", "qa", "exact_match"),
]
# Radford et al. 2019, Table 3 (zero-shot)
PAPER_ROWS = {
    "SOTA": [99.8, 59.23, 85.7, 82.3, 39.14, 46.54, 0.99, 1.08, 18.3, 21.8],
    "GPT-2 117M": [35.13, 45.99, 87.65, 83.4, 29.41, 65.85, 1.16, 1.17, 37.50, 75.20],
    "GPT-2 345M": [15.60, 55.48, 92.35, 87.1, 22.76, 47.33, 1.01, 1.06, 26.37, 55.72],
    "GPT-2 762M": [10.87, 60.12, 93.45, 88.0, 19.93, 40.31, 0.97, 1.02, 22.05, 44.575],
    "GPT-2 1542M": [8.63, 63.24, 93.30, 89.05, 18.34, 35.76, 0.93, 0.98, 17.48, 42.16],
}


def text_ppl(
    model,
    tokenizer,
    path: str,
    style: str,
    window: Optional[int] = None,
    stride: Optional[int] = None,
    batch_size: int = 8,
    progress: Optional[Callable[[int], None]] = None,
) -> dict:
    """Sliding-window perplexity of a text file, with word, byte and character normalisers of the
    original text (the stream starts with the end-of-document token)."""
    window = window or model.cfg.n_positions
    stride = stride or max(window // 2, 1)
    original = read_text(path)
    text = detokenize(original, style)
    stream = [tokenizer.eod] + tokenizer.encode(text)
    nll, tokens = stream_nll(model, stream, window, stride, batch_size, tokenizer.eod, progress)
    out = ppl_metrics(nll, tokens, count_words(original), len(text.encode("utf-8")), len(text))
    out.update(
        window=window, stride=stride, windows=len(sliding_windows(len(stream), window, stride)), detokenize=style
    )
    return out


def run_task(name: str, model, tokenizer, path: str, opts: dict) -> dict:
    """One paper task on its file; opts: batch_size, num_fewshot, seed, limit, window, stride."""
    _, kind, extra = PAPER_TASKS[name]
    bs, limit = opts.get("batch_size", 8), opts.get("limit")
    if kind == "lambada":
        return evaluate_lambada(model, tokenizer, lambada_examples(path)[:limit], batch_size=bs)
    if kind == "cbt":
        out = evaluate_cbt(model, tokenizer, read_cbt(path)[:limit], extra, bs)
        out.pop("chosen")
        return out
    if kind == "ppl":
        return text_ppl(model, tokenizer, path, extra, opts.get("window"), opts.get("stride"), bs)
    examples = task_examples(
        kind, path, opts.get("num_fewshot", 5), opts.get("seed", 1234), direction=extra or "en-fr"
    )[:limit]
    out = evaluate_generation(kind, model, tokenizer, examples, bs, opts.get("seed", 1234))
    out["examples"] = out["examples"][: opts.get("keep_examples", 20)]
    return out


def run_paper(
    model,
    tokenizer,
    data_dir: str,
    tasks: Optional[list[str]] = None,
    opts: Optional[dict] = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Every task (of `tasks`, default all) whose file is in data_dir; missing ones are listed."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data-dir {data_dir} is not a directory")
    unknown = [t for t in tasks or [] if t not in PAPER_TASKS]
    if unknown:
        raise ValueError(f"unknown paper task(s) {', '.join(unknown)}; known: {', '.join(PAPER_TASKS)}")
    results: dict[str, Any] = {}
    missing = []
    for name in tasks or list(PAPER_TASKS):
        path = os.path.join(data_dir, PAPER_TASKS[name][0])
        if not os.path.isfile(path):
            missing.append(f"{name} ({PAPER_TASKS[name][0]})")
            continue
        log(f"[paper] {name}: {path}")
        results[name] = run_task(name, model, tokenizer, path, opts or {})
    if not results:
        raise FileNotFoundError(f"no task data in {data_dir}: looked for {', '.join(missing)}")
    return {
        "tasks": results,
        "missing": missing,
        "table3": _row(results, TABLE3),
        "generation": _row(results, [(c, t, m, 1) for c, t, m in GENERATION]),
    }


def _row(results: dict, columns) -> dict:
    return {col: results[t][m] * scale if t in results and m in results[t] else None for col, t, m, scale in columns}


def format_tables(report: dict, model_name: str = "this model") -> str:
    """Table 3 (paper rows for reference, then ours) and the generation tasks, as text."""
    lines = ["GPT-2 paper Table 3 layout (zero-shot; PPL lower is better, ACC in %)"]
    lines += _grid(
        [c for c, *_ in TABLE3], {**{k: v for k, v in PAPER_ROWS.items()}, model_name: list(report["table3"].values())}
    )
    gen = report["generation"]
    if any(v is not None for v in gen.values()):
        lines += ["", "Generation tasks"] + _grid(list(gen), {model_name: list(gen.values())})
    if report["missing"]:
        lines += ["", f"not run (no file): {', '.join(report['missing'])}"]
    return "\n".join(lines)


def _grid(columns: list[str], rows: dict[str, list]) -> list[str]:
    def cell(v) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"

    name_w = max(len(n) for n in rows)
    widths = [max(len(c), 6) for c in columns]
    head = " " * name_w + " | " + " | ".join(c.rjust(w) for c, w in zip(columns, widths))
    body = [
        n.ljust(name_w) + " | " + " | ".join(cell(v).rjust(w) for v, w in zip(vals, widths)) for n, vals in rows.items()
    ]
    return [head, "-" * len(head)] + body
