"""The GPT-2 paper's prompted generation tasks, on jsonl files the user brings.

Each task turns a record into a prompt (exact layouts below, and in docs/evaluation.md),
generates with the KV cache, cuts the output at the task's stop string and scores it:

- coqa (reading comprehension): `{"story", "questions", "answers"}` (CoQA's own records, one
  per line; items are strings or {"input_text": ...}). Every turn is one example; its prompt is
  the story, a blank line, the conversation so far as `Q: q\\nA: a\\n` lines and `Q: question\\nA:`.
  Greedy, stop at a newline; metric: SQuAD/CoQA token F1 (max over the references).
- summarize (CNN/Daily Mail): `{"article", "highlights"}` (or document / summary). Prompt:
  the article, then `\\nTL;DR:`. Top-k 2 sampling (seeded) for 100 tokens; the summary is the
  first 3 generated sentences; metric: ROUGE-1/2/L F1 from the rouge-score package.
- translate (WMT-14 En-Fr): `{"en", "fr"}`. Prompt: k example pairs `source = target\\n` from
  the pool, then `source =`. Greedy, stop at a newline; metric: corpus BLEU from sacrebleu.
- qa (closed-book, Natural Questions): `{"question", "answers"}` (or answer). Prompt: k example
  pairs `Q: question\\nA: answer\\n`, then `Q: question\\nA:`. Greedy, stop at a newline; metric:
  exact match after SQuAD normalisation (lower case, no punctuation or articles).

Few-shot examples come from the file itself (never the example being asked) or a pool file,
drawn per example with a generator seeded by (seed, index), as in tasks.fewshot_prefix.
"""

from __future__ import annotations

import collections
import re
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from ..generation import SamplingConfig, generate
from ..jsonl import iter_json_lines
from ..model import GPT2
from ..tokenizer import Tokenizer
from .tasks import fewshot_prefix

GEN_TASKS = ("coqa", "summarize", "translate", "qa")


@dataclass
class GenExample:
    prompt: str
    references: list[str]
    where: str  # file:line, for messages and the results
    extra: dict = field(default_factory=dict)


# -- reading ------------------------------------------------------------------------------------
def records(path: str) -> list[tuple[int, dict]]:
    """(line, object) per non-blank line; errors name the file and line."""
    out = []
    for n, rec in iter_json_lines(path, "task file"):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        out.append((n, rec))
    if not out:
        raise ValueError(f"{path} has no examples (empty file)")
    return out


def get(rec: dict, names: Sequence[str], where: str, kind: type = str) -> Any:
    """The first of `names` present, checked to be a non-empty `kind` (str or list of str)."""
    for name in names:
        if name in rec:
            value = rec[name]
            if kind is list:
                value = [value] if isinstance(value, str) else value
                if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{where}: field {name!r} must be a string or a non-empty list of strings")
            elif not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: field {name!r} must be a non-empty string")
            return value
    also = f" (also accepted: {', '.join(names[1:])})" if len(names) > 1 else ""
    raise ValueError(f"{where}: missing field {names[0]!r}{also}")


def _text(item: Any, where: str, what: str) -> str:
    if isinstance(item, dict):
        item = item.get("input_text")
    if not isinstance(item, str):
        raise ValueError(f'{where}: each of {what} must be a string or {{"input_text": ...}}')
    return item


def coqa_prompt(story: str, history: Sequence[tuple[str, str]], question: str) -> str:
    turns = "".join(f"Q: {q}\nA: {a}\n" for q, a in history)
    return f"{story.strip()}\n\n{turns}Q: {question}\nA:"


def coqa_examples(path: str) -> list[GenExample]:
    out = []
    for n, rec in records(path):
        where = f"{path}:{n}"
        story = get(rec, ("story", "context"), where)
        qs = [_text(q, where, "questions") for q in get_list(rec, "questions", where)]
        ans = [_text(a, where, "answers") for a in get_list(rec, "answers", where)]
        if len(qs) != len(ans):
            raise ValueError(f"{where}: {len(qs)} questions but {len(ans)} answers")
        extra = rec.get("additional_answers", {})
        for t, (q, a) in enumerate(zip(qs, ans)):
            refs = [a] + [_text(v[t], where, "additional_answers") for v in extra.values() if len(v) > t]
            out.append(GenExample(coqa_prompt(story, list(zip(qs[:t], ans[:t])), q), refs, f"{where} turn {t + 1}"))
    return out


def get_list(rec: dict, name: str, where: str) -> list:
    if name not in rec:
        raise ValueError(f"{where}: missing field {name!r}")
    if not isinstance(rec[name], list) or not rec[name]:
        raise ValueError(f"{where}: field {name!r} must be a non-empty list")
    return rec[name]


def summarize_prompt(article: str) -> str:
    return f"{article.strip()}\nTL;DR:"


def summarize_examples(path: str) -> list[GenExample]:
    out = []
    for n, rec in records(path):
        where = f"{path}:{n}"
        article = get(rec, ("article", "document", "text"), where)
        refs = get(rec, ("highlights", "summary", "reference"), where, list)
        out.append(GenExample(summarize_prompt(article), ["\n".join(refs)], where))
    return out


def solved_pairs(path: str, src: Sequence[str], tgt: Sequence[str]) -> list[tuple[str, list[str], str]]:
    """(source, references, file:line) per record; src / tgt: accepted field names."""
    out = []
    for n, rec in records(path):
        where = f"{path}:{n}"
        out.append((get(rec, src, where), get(rec, tgt, where, list), where))
    return out


def pair_examples(
    rows: list[tuple[str, list[str], str]], fmt: Callable[[str, str], str], pool: Optional[list[str]], k: int, seed: int
) -> list[GenExample]:
    """translate / qa: `fmt(source, target)` is one solved pair; the prompt is k of them, each on
    its own line(s), then `fmt(source, "")` without its trailing space."""
    own = pool is None
    demos = [fmt(s, r[0]) + "\n" for s, r, _ in rows] if own else pool
    return [
        GenExample(
            fewshot_prefix(demos, k, seed, i, i if own else None, delimiter="") + fmt(s, "").rstrip(), refs, where
        )
        for i, (s, refs, where) in enumerate(rows)
    ]


def translate_format(source: str, target: str) -> str:
    return f"{source} = {target}"


def qa_format(question: str, answer: str) -> str:
    return f"Q: {question}\nA: {answer}"


# -- metrics ------------------------------------------------------------------------------------
def normalize_answer(s: str) -> str:
    """SQuAD / CoQA normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction: str, reference: str) -> float:
    """Token-overlap F1 of the normalised strings (the CoQA / SQuAD definition)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def first_sentences(text: str, n: int = 3) -> str:
    """The first n sentences (split after . ! ? followed by whitespace)."""
    parts = [p for p in re.split(r"(?<=[.!?])\s+", text.strip()) if p]
    return " ".join(parts[:n])


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Mean ROUGE-1/2/L F1 (x100) from the rouge-score package, with its Porter stemmer."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(predictions, references):
        for key, score in scorer.score(r, p).items():
            sums[key] += score.fmeasure
    return {k: 100 * v / len(predictions) for k, v in sums.items()}


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu's corpus BLEU (its default 13a tokenisation); each example may have several references."""
    import sacrebleu

    n_refs = max(len(r) for r in references)
    streams = [[r[j] if j < len(r) else r[0] for r in references] for j in range(n_refs)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


# -- running ------------------------------------------------------------------------------------
@dataclass
class GenSettings:
    """How a task decodes: greedy unless top_k > 0 (then sampled at temperature 1, seeded)."""

    max_new_tokens: int
    top_k: int = 0
    stop: str = "\n"


SETTINGS = {
    "coqa": GenSettings(32),
    "summarize": GenSettings(100, top_k=2, stop=""),
    "translate": GenSettings(64),
    "qa": GenSettings(24),
}


def generate_texts(
    model: GPT2,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    settings: GenSettings,
    batch_size: int = 8,
    seed: int = 0,
    progress: Optional[Callable[[int], None]] = None,
) -> tuple[list[str], int]:
    """(output of each prompt cut before the stop string, number of prompts cut from the left).
    Prompt i samples with seed + i, so outputs do not depend on the batch."""
    budget = model.cfg.n_positions - settings.max_new_tokens
    if budget < 1:
        raise ValueError(
            f"{settings.max_new_tokens} new tokens leave no room for a prompt in the model's "
            f"context of {model.cfg.n_positions} tokens"
        )
    ids = [tokenizer.encode(p) or [tokenizer.eod] for p in prompts]
    truncated = sum(len(x) > budget for x in ids)
    ids = [x[-budget:] for x in ids]
    cfg = SamplingConfig(
        max_new_tokens=settings.max_new_tokens,
        temperature=1.0 if settings.top_k else 0.0,
        top_k=settings.top_k,
        stop_token=tokenizer.eod,
        seed=seed,
    )
    stop = settings.stop

    def stop_fn(row: int, toks: list[int]) -> bool:
        return stop in tokenizer.decode(toks[-64:])

    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list[str] = [""] * len(ids)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        rows = generate(
            model,
            [ids[i] for i in batch],
            cfg,
            pad_id=tokenizer.eod,
            seeds=[seed + i for i in batch],
            stop_fn=stop_fn if stop else None,
        )
        for i, r in zip(batch, rows):
            text = tokenizer.decode(r[: r.index(tokenizer.eod)] if tokenizer.eod in r else r)
            out[i] = text.split(stop)[0] if stop else text
        if progress is not None:
            progress(len(batch))
    return out, truncated


def task_examples(
    task: str, path: str, k: int = 5, seed: int = 1234, pool_path: Optional[str] = None, direction: str = "en-fr"
) -> list[GenExample]:
    """The examples (prompts and references) of one task's file."""
    if task == "coqa":
        return coqa_examples(path)
    if task == "summarize":
        return summarize_examples(path)
    if task == "translate":
        src, tgt = direction.split("-")
        fields, fmt = ((src,), (tgt,)), translate_format
    elif task == "qa":
        fields, fmt = (("question", "query"), ("answers", "answer")), qa_format
    else:
        raise ValueError(f"unknown generation task {task!r}; known: {', '.join(GEN_TASKS)}")
    pool = None
    if pool_path is not None:
        pool = [fmt(s, refs[0]) + "\n" for s, refs, _ in solved_pairs(pool_path, *fields)]
    return pair_examples(solved_pairs(path, *fields), fmt, pool, k, seed)


def score_outputs(task: str, outputs: Sequence[str], examples: Sequence[GenExample]) -> tuple[dict, list]:
    """(task metrics, per-example scores or None) of the generated outputs."""
    if task == "summarize":
        summaries = [first_sentences(o) for o in outputs]
        return rouge(summaries, [e.references[0] for e in examples]), summaries
    answers = [o.strip() for o in outputs]
    if task == "translate":
        return {"bleu": bleu(answers, [e.references for e in examples])}, answers
    if task == "coqa":
        f1 = [max(f1_score(a, r) for r in e.references) for a, e in zip(answers, examples)]
        return {"f1": 100 * sum(f1) / len(f1)}, answers
    em = [exact_match(a, e.references) for a, e in zip(answers, examples)]
    return {"exact_match": 100 * sum(em) / len(em)}, answers


def evaluate_generation(
    task: str,
    model: GPT2,
    tokenizer: Tokenizer,
    examples: Sequence[GenExample],
    batch_size: int = 8,
    seed: int = 0,
    max_new_tokens: Optional[int] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> dict:
    """Metrics, n, truncated and `examples` (prompt, output, scored answer, references)."""
    settings = SETTINGS[task]
    if max_new_tokens is not None:
        settings = GenSettings(max_new_tokens, settings.top_k, settings.stop)
    outputs, truncated = generate_texts(
        model, tokenizer, [e.prompt for e in examples], settings, batch_size, seed, progress
    )
    metrics, answers = score_outputs(task, outputs, examples)
    records_ = [
        {"where": e.where, "prompt": e.prompt, "output": o, "answer": a, "references": e.references}
        for e, o, a in zip(examples, outputs, answers)
    ]
    return {**metrics, "n": len(examples), "truncated": truncated, "examples": records_}
