"""Children's Book Test (CBT-CN common nouns, CBT-NE named entities), as GPT-2 evaluated it.

File format (the CBT release, e.g. cbtest_CN_test_2500ex.txt): each example is 20 numbered
context lines `1 sentence` ... `20 sentence`, then `21 query with XXXXX<TAB>answer<TAB><TAB>c1|c2|...|c10`,
then a blank line. Sentences are PTB-style tokenized; `detokenize="cbt"` (the default) turns
them back into ordinary text (`` `` `` / `''` to `"`, ` ,` to `,`, ` n't` to `n't`).

Scoring (the CBT paper's language-model protocol, GPT-2's): fill the blank with each candidate
and pick the candidate whose completed text (context + query) is most probable. The context is
the same for every candidate, so p(context + query) = p(context) p(query | context) and the
argmax only needs the query given the context: that is what is scored (the context is cut
from the left when it does not fit the window; `truncated` counts those).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..model import GPT2
from ..tokenizer import Tokenizer
from .ppl import detokenize
from .scoring import score_continuations

BLANK = "XXXXX"


@dataclass
class CBTExample:
    context: list[str]  # the 20 sentences, as in the file
    query: str  # with the XXXXX blank
    answer: str
    candidates: list[str]
    line: int  # line of the query in the file (for messages)


def read_cbt(path: str) -> list[CBTExample]:
    """Examples of a CBT file; a malformed query line is named by file and line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"CBT file {path} does not exist")
    out, context = [], []
    for n, raw in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        number, _, rest = line.partition(" ")
        if not number.isdigit():
            raise ValueError(f"{path}:{n}: expected a numbered CBT line ('1 sentence ...'), got {raw[:60]!r}")
        if "\t" not in rest:
            context = [] if number == "1" else context
            context.append(rest)
            continue
        fields = rest.split("\t")
        if len(fields) < 4 or not fields[1] or not fields[3]:
            raise ValueError(
                f"{path}:{n}: a query line needs 'query<TAB>answer<TAB><TAB>c1|c2|...'; "
                f"missing the {'answer' if len(fields) < 2 or not fields[1] else 'candidates'} field"
            )
        query, answer, candidates = fields[0], fields[1], [c for c in fields[3].split("|") if c]
        if BLANK not in query:
            raise ValueError(f"{path}:{n}: the query has no {BLANK} blank")
        if answer not in candidates:
            raise ValueError(f"{path}:{n}: the answer {answer!r} is not among the candidates")
        out.append(CBTExample(context, query, answer, candidates, n))
        context = []
    if not out:
        raise ValueError(f"{path} has no CBT examples (no query lines with a TAB-separated answer)")
    return out


def cbt_texts(ex: CBTExample, style: str = "cbt") -> tuple[str, list[str]]:
    """(context text, the query completed with each candidate), detokenized."""
    context = detokenize(" ".join(ex.context), style)
    return context, [" " + detokenize(ex.query.replace(BLANK, c), style) for c in ex.candidates]


def evaluate_cbt(
    model: GPT2,
    tokenizer: Tokenizer,
    examples: list[CBTExample],
    style: str = "cbt",
    batch_size: int = 8,
    progress: Optional[Callable[[int], None]] = None,
) -> dict:
    """accuracy, n, truncated; `chosen` is each example's picked candidate."""
    pairs, owner = [], []
    for i, ex in enumerate(examples):
        context, completions = cbt_texts(ex, style)
        ctx_ids = [tokenizer.eod] + tokenizer.encode(context)  # the text is a document: it starts after an eod
        for text in completions:
            pairs.append((ctx_ids, tokenizer.encode(text)))
            owner.append(i)
    scores = score_continuations(model, pairs, tokenizer.eod, batch_size, progress=progress)
    best: list[tuple[float, int]] = [(float("inf"), -1)] * len(examples)
    seen = [0] * len(examples)
    for s, i in zip(scores, owner):
        if s.nll < best[i][0]:
            best[i] = (s.nll, seen[i])
        seen[i] += 1
    chosen = [ex.candidates[j] for ex, (_, j) in zip(examples, best)]
    hits = sum(c == ex.answer for c, ex in zip(chosen, examples))
    return {
        "n": len(examples),
        "accuracy": hits / len(examples),
        "truncated": sum(s.truncated for s in scores),
        "chosen": chosen,
    }
