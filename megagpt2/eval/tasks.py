"""Zero- and few-shot tasks scored by log-likelihood: LAMBADA and multiple choice.

LAMBADA (jsonl, one {"text": ...} per line): the target is the last whitespace-separated word;
the context is everything before the whitespace in front of it, and the continuation is that
whitespace plus the word (" word": GPT-2's BPE keeps the space with the word). Context and
continuation are tokenized separately. Accuracy counts an example correct when every target token
is the argmax given the true prefix; perplexity is exp(mean NLL of the whole target word) over
examples (the figure the GPT-2 paper reports), token_ppl normalises by target tokens instead.

Multiple choice (jsonl, HellaSwag-style): {"context"|"ctx"|"query"|"question": str,
"choices"|"endings"|"options": [str, ...], "label"|"gold"|"answer": int}. Each choice is scored
as a continuation of the context (joined by a space unless either side already has one):
`acc` takes the highest total log-likelihood, `acc_norm` the highest per UTF-8 byte of the
continuation (lm-evaluation-harness's normalisation, independent of the tokenizer).

Few-shot (GPT-3 style): k solved examples from a pool (default: the evaluated file itself,
never the example being scored), drawn with a generator seeded by (seed, example index), are
prepended to the context, each followed by a delimiter ("\\n\\n" by default). A context that does
not fit the model's window loses tokens from the left (counted as `truncated`).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..jsonl import iter_json_lines
from ..model import GPT2
from ..tokenizer import Tokenizer
from .scoring import score_continuations


def read_jsonl(path: str) -> list[dict]:
    """Objects of a jsonl file; blank lines skipped; errors name the file and line."""
    records = []
    for n, rec in iter_json_lines(path, "evaluation file"):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    if not records:
        raise ValueError(f"{path} has no examples (empty file)")
    return records


def _field(rec: dict, names: Sequence[str], where: str) -> Any:
    for name in names:
        if name in rec:
            return rec[name]
    raise ValueError(f"{where}: missing field {names[0]!r} (also accepted: {', '.join(names[1:]) or 'none'})")


def lambada_examples(path: str) -> list[tuple[str, str]]:
    """(context, continuation) per line of a LAMBADA-format jsonl."""
    out = []
    for n, rec in enumerate(read_jsonl(path), 1):
        text = _field(rec, ("text",), f"{path}: example {n}")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f'{path}: example {n}: "text" must be a non-empty string')
        text = text.rstrip()
        m = re.search(r"\s+\S+$", text)
        if m is None or not text[: m.start()].strip():  # a single word: no context
            out.append(("", text.strip()))
        else:
            out.append((text[: m.start()], text[m.start() :]))
    return out


def mc_examples(path: str) -> list[tuple[str, list[str], int]]:
    """(context, choices, label) per line of a multiple-choice jsonl."""
    out = []
    for n, rec in enumerate(read_jsonl(path), 1):
        where = f"{path}: example {n}"
        ctx = _field(rec, ("context", "ctx", "query", "question"), where)
        choices = _field(rec, ("choices", "endings", "options"), where)
        label = _field(rec, ("label", "gold", "answer"), where)
        if not isinstance(ctx, str):
            raise ValueError(f"{where}: the context must be a string")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{where}: choices must be a list of at least 2 non-empty strings")
        try:
            label = int(label)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: label must be an integer index, got {label!r}") from None
        if not 0 <= label < len(choices):
            raise ValueError(f"{where}: label {label} is outside 0..{len(choices) - 1}")
        out.append((ctx, choices, label))
    return out


def join_continuation(context: str, choice: str) -> str:
    """The text scored after `context`: the choice, with a separating space when neither has one."""
    if not context or context[-1].isspace() or choice[0].isspace():
        return choice
    return " " + choice


def fewshot_prefix(
    pool: Sequence[str], k: int, seed: int, index: int, exclude: Optional[int], delimiter: str = "\n\n"
) -> str:
    """k pool texts (never pool[exclude]) chosen by a generator seeded with (seed, index)."""
    if k <= 0:
        return ""
    n = len(pool) - (exclude is not None)
    if n < k:
        raise ValueError(f"{k}-shot needs at least {k} pool examples besides the one scored; the pool has {n}")
    rng = np.random.default_rng([seed, index])
    picks = [int(j) for j in rng.choice(n, size=k, replace=False)]
    if exclude is not None:
        picks = [j + 1 if j >= exclude else j for j in picks]  # skip the example itself
    return "".join(pool[j] + delimiter for j in picks)


def _context_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """Tokens of a context; an empty context is the end-of-document token (a document start)."""
    return tokenizer.encode(text) if text else [tokenizer.eod]


def evaluate_lambada(
    model: GPT2,
    tokenizer: Tokenizer,
    examples: Sequence[tuple[str, str]],
    pool: Optional[Sequence[str]] = None,
    k: int = 0,
    seed: int = 1234,
    delimiter: str = "\n\n",
    batch_size: int = 8,
    progress: Optional[Callable[[int], None]] = None,
) -> dict:
    """accuracy, ppl (per target word), token_ppl, n, truncated (see module docstring)."""
    own = pool is None
    pool = [c + t for c, t in examples] if own else pool
    pairs = []
    for i, (ctx, cont) in enumerate(examples):
        prefix = fewshot_prefix(pool, k, seed, i, i if own else None, delimiter)
        pairs.append((_context_ids(tokenizer, prefix + ctx), tokenizer.encode(cont)))
    scores = score_continuations(model, pairs, tokenizer.eod, batch_size, progress=progress)
    nll = sum(s.nll for s in scores)
    tokens = sum(s.n_tokens for s in scores)
    return {
        "n": len(scores),
        "accuracy": sum(s.greedy for s in scores) / len(scores),
        "ppl": math.exp(nll / len(scores)),
        "token_ppl": math.exp(nll / tokens),
        "target_tokens": tokens,
        "truncated": sum(s.truncated for s in scores),
        "num_fewshot": k,
    }


def evaluate_multiple_choice(
    model: GPT2,
    tokenizer: Tokenizer,
    examples: Sequence[tuple[str, list[str], int]],
    pool: Optional[Sequence[str]] = None,
    k: int = 0,
    seed: int = 1234,
    delimiter: str = "\n\n",
    batch_size: int = 8,
    progress: Optional[Callable[[int], None]] = None,
) -> dict:
    """acc (total log-likelihood), acc_norm (per byte), n, truncated."""
    own = pool is None
    pool = [c + join_continuation(c, ch[y]) for c, ch, y in examples] if own else pool
    pairs, owner, n_bytes = [], [], []
    for i, (ctx, choices, _) in enumerate(examples):
        prefix = fewshot_prefix(pool, k, seed, i, i if own else None, delimiter)
        ctx_ids = _context_ids(tokenizer, prefix + ctx)
        for choice in choices:
            cont = join_continuation(ctx, choice)
            pairs.append((ctx_ids, tokenizer.encode(cont)))
            owner.append(i)
            n_bytes.append(len(cont.encode("utf-8")))
    scores = score_continuations(model, pairs, tokenizer.eod, batch_size, progress=progress)
    per_ex: list[list[tuple[float, float]]] = [[] for _ in examples]
    for s, i, nb in zip(scores, owner, n_bytes):
        per_ex[i].append((-s.nll, -s.nll / nb))
    acc = sum(int(np.argmax([t for t, _ in ll])) == y for ll, (_, _, y) in zip(per_ex, examples))
    acc_norm = sum(int(np.argmax([b for _, b in ll])) == y for ll, (_, _, y) in zip(per_ex, examples))
    n = len(examples)
    return {
        "n": n,
        "acc": acc / n,
        "acc_norm": acc_norm / n,
        "choices_scored": len(pairs),
        "truncated": sum(s.truncated for s in scores),
        "num_fewshot": k,
    }


def pool_texts(task: str, path: str) -> list[str]:
    """Solved examples of a task's file, as few-shot demonstrations."""
    if task == "lambada":
        return [c + t for c, t in lambada_examples(path)]
    return [c + join_continuation(c, ch[y]) for c, ch, y in mc_examples(path)]
