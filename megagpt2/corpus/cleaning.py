"""Document cleaning for preprocessing: repair, normalise, filter, deduplicate.

Stages run in this order, each switchable, cheapest filters before the costly ones:

    fix_unicode      ftfy repair of mojibake, HTML entities, control characters
    whitespace       unify line ends, trim lines, collapse runs of spaces and of blank lines
    empty            nothing left (always on)
    too_short        fewer than ``min_chars`` characters
    non_alpha        more than ``max_non_alpha`` of the non-space characters are not letters
    duplicate        exact repeat of an earlier document (up to case and whitespace)
    near_duplicate   MinHash-LSH Jaccard similarity >= threshold with a kept document

The work is split in two so it parallelises and stays deterministic: ``DocumentStages`` does
everything that depends on one document alone (repairs, filters, the dedup fingerprints) and
runs in worker processes; ``DuplicateIndex`` decides duplicates in input order in the main
process. Filters look at the first (primary) field; repairs apply to every field.
"""

from __future__ import annotations

import re
import string
import time
from dataclasses import dataclass

import ftfy
import numpy as np

from megagpt2.corpus.dedup import LSHIndex, MinHasher, dedup_key

DROP_REASONS = ("malformed", "empty", "too_short", "non_alpha", "duplicate", "near_duplicate")

_HSPACE = re.compile(r"[^\S\n]+")  # whitespace other than newline
_BLANK_LINES = re.compile(r"\n{3,}")
_NOT_LETTER = re.compile(r"[\W\d_]+")  # what remains after deleting these is the letters
_SPACE = re.compile(r"\s+")
_ASCII_LETTERS = string.ascii_letters.encode()
_ASCII_SPACE = string.whitespace.encode()
# A line ftfy may change beyond its line-break fix: anything but printable ASCII, tab, CR, LF;
# or an HTML entity.
_FTFY_CANDIDATE = re.compile(r"[^\t\n\r\x20-\x7e]|&")


@dataclass
class CleaningConfig:
    """Which stages run, with their thresholds (the defaults are the tool's defaults)."""

    fix_unicode: bool = True
    normalize_whitespace: bool = True
    min_chars: int = 0  # 0 = off
    max_non_alpha: float = 1.0  # 1.0 = off
    dedup: bool = True
    near_dedup: bool = False
    near_dedup_threshold: float = 0.8
    shingle: str = "word"  # word | char
    shingle_size: int = 5
    num_perm: int = 128


def fix_unicode(text: str) -> str:
    """Exactly ``ftfy.fix_text(text)``, skipping the lines ftfy cannot change.

    ftfy fixes text line by line and costs ~50 us per line even when there is nothing to fix.
    On a line of printable ASCII (plus CR) without ``&`` the only ftfy fixer that acts is the
    line-break one (CR LF and lone CR become LF), so only the other lines go through ftfy (tests
    check equality with ftfy.fix_text). As in ftfy, once a line contains ``<``, HTML entities
    are no longer unescaped in the lines after it.
    """
    if not _FTFY_CANDIDATE.search(text):
        return _fix_line_breaks(text)
    config = ftfy.TextFixerConfig(explain=False)
    out, pos = [], 0
    while pos < len(text):
        end = text.find("\n", pos) + 1 or len(text)
        end = min(end, pos + config.max_decode_length)
        segment = text[pos:end]
        if config.unescape_html == "auto" and "<" in segment:
            config = config._replace(unescape_html=False)
        out.append(ftfy.fix_and_explain(segment, config)[0]
                   if _FTFY_CANDIDATE.search(segment) else _fix_line_breaks(segment))
        pos = end
    return "".join(out)


def _fix_line_breaks(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def normalize_whitespace(text: str) -> str:
    """\\r\\n and \\r -> \\n; runs of spaces/tabs -> one space; lines trimmed; <= 1 blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _HSPACE.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def non_alpha_fraction(text: str) -> float:
    """Fraction of non-whitespace characters that are not letters (digits, symbols, ...)."""
    if text.isascii():  # bytes.translate deletes in C, ~10x faster than the regex path
        raw = text.encode("ascii")
        visible = len(raw.translate(None, _ASCII_SPACE))
        letters = len(raw) - len(raw.translate(None, _ASCII_LETTERS))
    else:
        visible = len(_SPACE.sub("", text))
        letters = len(_NOT_LETTER.sub("", text))
    return 1.0 - letters / visible if visible else 0.0


@dataclass
class Processed:
    """One document after ``DocumentStages``: cleaned fields or the reason it was dropped."""

    fields: dict[str, str] | None
    reason: str | None = None
    key: bytes | None = None  # exact-dedup fingerprint
    signature: np.ndarray | None = None  # (num_perm,) uint32 MinHash


class DocumentStages:
    """The per-document stages (no state across documents); keeps CPU seconds per stage."""

    def __init__(self, config: CleaningConfig) -> None:
        self.config = config
        self.hasher = (MinHasher(config.num_perm, config.shingle, config.shingle_size)
                       if config.near_dedup else None)
        self.seconds = {"fix_unicode": 0.0, "whitespace": 0.0, "filters": 0.0, "dedup_key": 0.0,
                        "minhash": 0.0}

    def _timed(self, stage: str, fn, *args):
        start = time.process_time()
        result = fn(*args)
        self.seconds[stage] += time.process_time() - start
        return result

    def process(self, fields: dict[str, str]) -> Processed:
        cfg = self.config
        if cfg.fix_unicode:
            fields = self._timed("fix_unicode", _map_fields, fix_unicode, fields)
        if cfg.normalize_whitespace:
            fields = self._timed("whitespace", _map_fields, normalize_whitespace, fields)
        text = next(iter(fields.values()))
        reason = self._timed("filters", self._filter, text)
        if reason:
            return Processed(None, reason)
        key = self._timed("dedup_key", dedup_key, text) if cfg.dedup else None
        sig = self._timed("minhash", self.hasher.signature, text) if self.hasher else None
        return Processed(fields, None, key, sig)

    def _filter(self, text: str) -> str | None:
        if not text.strip():
            return "empty"
        if len(text) < self.config.min_chars:
            return "too_short"
        if self.config.max_non_alpha < 1.0 and non_alpha_fraction(text) > self.config.max_non_alpha:
            return "non_alpha"
        return None


def _map_fields(fn, fields: dict[str, str]) -> dict[str, str]:
    return {k: fn(v) if v else v for k, v in fields.items()}


class DuplicateIndex:
    """Exact and near-duplicate decisions, in input order (first occurrence is kept)."""

    def __init__(self, config: CleaningConfig) -> None:
        self._keys: set[bytes] | None = set() if config.dedup else None
        self._lsh = (LSHIndex(config.near_dedup_threshold, config.num_perm)
                     if config.near_dedup else None)
        self.seconds = {"dedup": 0.0, "near_dedup": 0.0}

    def check(self, doc: Processed) -> str | None:
        """Drop reason for a document that passed the per-document stages, or None to keep it."""
        if self._keys is not None:
            start = time.process_time()
            repeat = doc.key in self._keys
            self._keys.add(doc.key)
            self.seconds["dedup"] += time.process_time() - start
            if repeat:
                return "duplicate"
        if self._lsh is not None:
            start = time.process_time()
            near = self._lsh.seen(doc.signature)
            self.seconds["near_dedup"] += time.process_time() - start
            if near:
                return "near_duplicate"
        return None
