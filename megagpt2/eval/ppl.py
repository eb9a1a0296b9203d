"""Perplexity of a long token stream with a sliding window.

The stream s[0..N-1] is read in windows of W input tokens that start every S tokens (S <= W).
Window k feeds s[kS : kS+W] and predicts s[kS+1 : kS+W+1]; it scores only the targets no
earlier window scored (the last S of them; all W for the first window). So every token from
s[1] on is scored exactly once, each with between W-S+1 and W tokens of context; S = W is the
plain chunked computation (the way training reads data), S < W gives later tokens more context
(at W/S times the cost). By default the stream starts with the end-of-document token, so the
text's first token is scored too.

Reported: token-level perplexity exp(NLL / scored tokens), and for text inputs the perplexity
normalised by the original text's whitespace-separated word count, exp(NLL / words), which is
how the GPT-2 paper reports WikiText and PTB (tokenizer-independent), plus bits per byte.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..model import GPT2
from .scoring import IGNORE, batched, right_pad, token_nll


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) per window: inputs s[begin:end], targets s[begin+1:end+1], of which
    the last n_scored are scored. Every target position 1..n_tokens-1 is scored exactly once."""
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 1 and 1 <= stride <= window, got window={window}, stride={stride}")
    if n_tokens < 2:
        raise ValueError(f"perplexity needs at least 2 tokens (one to predict), got {n_tokens}")
    out, scored_to, begin = [], 0, 0
    while scored_to < n_tokens - 1:
        end = min(begin + window, n_tokens - 1)
        out.append((begin, end, end - scored_to))
        scored_to = end
        begin += stride
    return out


@torch.no_grad()
def stream_nll(
    model: GPT2,
    stream: Sequence[int],
    window: int,
    stride: int,
    batch_size: int = 4,
    pad: int = 0,
    progress: Optional[Callable[[int], None]] = None,
) -> tuple[float, int]:
    """(summed NLL in nats, number of scored tokens) over the stream (see module docstring)."""
    if window > model.cfg.n_positions:
        raise ValueError(f"window {window} exceeds the model's context of {model.cfg.n_positions} tokens")
    s = np.asarray(stream, dtype=np.int64)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for group in batched(sliding_windows(len(s), window, stride), batch_size):
        inputs = right_pad([s[b:e].tolist() for b, e, _ in group], pad)  # (B, <=W)
        targets = torch.full_like(inputs, IGNORE)
        for row, (b, e, n) in enumerate(group):
            L = e - b
            targets[row, L - n : L] = torch.from_numpy(s[e - n + 1 : e + 1])
        nll, _ = token_nll(model, inputs.to(device), targets.to(device))
        total += float(nll.sum())
        count += sum(n for _, _, n in group)
        if progress is not None:
            progress(len(group))
    return total, count


def ppl_metrics(
    nll: float, tokens: int, words: Optional[int] = None, n_bytes: Optional[int] = None, chars: Optional[int] = None
) -> dict:
    """Token perplexity and, when the original text is known, word perplexity, bits per byte
    (enwik8-style) and bits per character (text8-style): the summed NLL in bits over the count."""
    out = {"tokens": tokens, "nll": nll, "token_ppl": math.exp(nll / tokens)}
    if words:
        out.update(words=words, word_ppl=math.exp(nll / words))
    if n_bytes:
        out.update(bytes=n_bytes, bits_per_byte=nll / (math.log(2) * n_bytes))
    if chars:
        out.update(chars=chars, bits_per_char=nll / (math.log(2) * chars))
    return out


def read_text(path: str) -> str:
    """A UTF-8 text file, refused clearly when missing, undecodable or empty."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"evaluation file {path} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text ({e}); convert it, or pass a tokenized dataset with --data-path"
        ) from e
    if not text.strip():
        raise ValueError(f"{path} is empty: nothing to evaluate")
    return text


def read_indexed(prefix: str, max_tokens: Optional[int] = None) -> np.ndarray:
    """The documents of an indexed dataset (.bin/.idx) concatenated, in order, as int64."""
    from ..data import IndexedDataset

    if not (Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file()):
        raise FileNotFoundError(
            f"no indexed dataset at {prefix} (expected {prefix}.bin and {prefix}.idx; "
            f"give the prefix without the extension)"
        )
    ds = IndexedDataset(prefix)
    parts, n = [], 0
    for i in range(len(ds)):
        doc = np.asarray(ds[i], dtype=np.int64)
        parts.append(doc)
        n += len(doc)
        if max_tokens is not None and n >= max_tokens:
            break
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return stream[:max_tokens] if max_tokens is not None else stream


# Undo the tokenisation of WikiText / PTB files (" @-@ ", " , ", " n't" ...) so the model sees
# ordinary text, as the GPT-2 paper did; word counts always come from the original file.
_WIKITEXT = [
    (" @-@ ", "-"),
    (" @,@ ", ","),
    (" @.@ ", "."),
    (" : ", ": "),
    (" ; ", "; "),
    (" . ", ". "),
    (" ! ", "! "),
    (" ? ", "? "),
    (" , ", ", "),
    (" 's", "'s"),
    (" n't", "n't"),
    ("( ", "("),
    (" )", ")"),
    ("[ ", "["),
    (" ]", "]"),
    ("= = = =", "===="),
    ("= = =", "==="),
    ("= =", "=="),
]
_PTB = [
    (" 's", "'s"),
    (" n't", "n't"),
    (" 're", "'re"),
    (" 've", "'ve"),
    (" 'll", "'ll"),
    (" 'm", "'m"),
    (" 'd", "'d"),
    (" , ", ", "),
    (" . ", ". "),
    (" ; ", "; "),
    (" : ", ": "),
]
# One Billion Word and CBT: PTB-style contractions plus punctuation split off at line ends, and
# CBT's `` '' quotes
_LM1B = _PTB + [(" ? ", "? "), (" ! ", "! "), ("( ", "("), (" )", ")"), (" $ ", " $")]
_CBT = _LM1B + [("`` ", '"'), (" ''", '"'), ("``", '"'), ("''", '"')]
_STYLES = {"wikitext": _WIKITEXT, "ptb": _PTB, "lm1b": _LM1B, "cbt": _CBT}
DETOKENIZERS = ("none", *_STYLES)


def detokenize(text: str, style: str) -> str:
    """style: none | wikitext | ptb | lm1b | cbt."""
    if style == "none":
        return text
    rules = _STYLES.get(style)
    if rules is None:
        raise ValueError(f"unknown detokenizer {style!r}; use one of {', '.join(DETOKENIZERS)}")
    for a, b in rules:
        text = text.replace(a, b)
    if style == "wikitext":
        text = re.sub(r'" ([^"\n]*?) "', r'"\1"', text)  # " quoted " -> "quoted"
    if style in ("lm1b", "cbt"):
        text = re.sub(r" ([.,;:!?])(?=\s|$)", r"\1", text, flags=re.M)  # "end ." -> "end."
    return text


def count_words(text: str) -> int:
    """Whitespace-separated words (the normaliser of word-level perplexity)."""
    return len(text.split())
