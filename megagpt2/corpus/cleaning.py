"""Document cleaning: ONE definition of what happens to text before it is tokenized.

The same settings (a preset plus per-stage flags, see ``add_cleaning_args``) drive
tools/preprocess_data.py, tools/train_tokenizer.py and the fine-tuning readers, so the tokenizer,
the pretraining data and the chat data see the same text. ``clean_text`` is the text half (what a
document becomes); ``DocumentStages`` adds the per-document decisions (drop or keep) and the dedup
fingerprints; ``DuplicateIndex`` decides duplicates in input order.

Stages, in order (cheapest filters before the costly ones):

    nul              remove NUL characters (always on: no text means NUL; it breaks C tools)
    fix_unicode      ftfy repair of mojibake, HTML entities, control characters
    whitespace       unify line ends, trim lines, collapse runs of spaces and of blank lines
    empty            nothing but whitespace left (always on)
    too_short        fewer than ``min_chars`` characters
    non_alpha        more than ``max_non_alpha`` of the non-space characters are not letters
    duplicate        exact repeat of an earlier document (up to case and whitespace)
    near_duplicate   MinHash-LSH Jaccard similarity >= threshold with a kept document

Invalid UTF-8 is repaired where bytes are decoded (the readers): each invalid sequence becomes
U+FFFD. The default (preset ``none``) is lossless: NUL removal and that repair, both counted in
the report, and nothing else, so ``decode(encode(text)) == text`` for any valid UTF-8 text without
NUL. Preset ``web`` is the WebText-style pipeline (``PRESETS``).

The work is split so it parallelises and stays deterministic: ``DocumentStages`` does everything
that depends on one document alone and runs in worker processes; ``DuplicateIndex`` decides
duplicates in input order in the main process. Filters look at the first (primary) field; text
stages apply to every field.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import string
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

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
# ftfy's repairs without its two rewrites of correct text: curly quotes stay curly and
# full-width characters (CJK punctuation such as ，？：（）) stay full-width.
FTFY_CONFIG = ftfy.TextFixerConfig(uncurl_quotes=False, fix_character_width=False, explain=False)


@dataclass
class CleaningConfig:
    """Which optional stages run, with their thresholds. The defaults are preset ``none``."""

    fix_unicode: bool = False
    normalize_whitespace: bool = False
    min_chars: int = 0  # 0 = off
    max_non_alpha: float = 1.0  # 1.0 = off
    dedup: bool = False
    near_dedup: bool = False
    near_dedup_threshold: float = 0.8
    shingle: str = "word"  # word | char
    shingle_size: int = 5
    num_perm: int = 128


PRESETS: dict[str, CleaningConfig] = {
    "none": CleaningConfig(),
    "web": CleaningConfig(
        fix_unicode=True, normalize_whitespace=True, min_chars=200, max_non_alpha=0.5, dedup=True, near_dedup=True
    ),
}


def cleaning_preset(name: str) -> CleaningConfig:
    """A fresh copy of preset ``name``; ValueError naming the presets when there is none."""
    if name not in PRESETS:
        raise ValueError(f"unknown cleaning preset {name!r}; presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


def describe_cleaning(config: CleaningConfig) -> list[str]:
    """What ``config`` does to documents, one line per stage that acts (for --help and reports)."""
    lines = ["remove NUL characters; invalid UTF-8 sequences become U+FFFD (always)"]
    if config.fix_unicode:
        lines.append(
            "repair mojibake, HTML entities and control characters with ftfy "
            "(curly quotes and full-width characters are kept)"
        )
    if config.normalize_whitespace:
        lines.append(
            "CRLF and CR to LF; every run of spaces/tabs (any Unicode space) to one space; "
            "lines and the document trimmed (removes code indentation); at most one blank "
            "line in a row"
        )
    lines.append("drop documents that are empty or only whitespace (always)")
    if config.min_chars > 0:
        lines.append(f"drop documents shorter than {config.min_chars} characters")
    if config.max_non_alpha < 1.0:
        lines.append(f"drop documents whose non-space characters are more than {config.max_non_alpha:g} non-letters")
    if config.dedup:
        lines.append("drop exact repeats of an earlier document (compared case-folded, whitespace collapsed)")
    if config.near_dedup:
        lines.append(
            f"drop near-duplicates: MinHash LSH, Jaccard >= {config.near_dedup_threshold:g} "
            f"on {config.shingle} {config.shingle_size}-grams, {config.num_perm} permutations"
        )
    return lines


def remove_nul(text: str) -> str:
    """``text`` without NUL characters (a no-op scan when there are none)."""
    return text.replace("\x00", "") if "\x00" in text else text


def fix_unicode(text: str) -> str:
    """Exactly ``ftfy.fix_text(text, FTFY_CONFIG)``, skipping the lines ftfy cannot change.

    ftfy fixes text line by line and costs ~50 us per line even when there is nothing to fix.
    On a line of printable ASCII (plus CR) without ``&`` the only ftfy fixer that acts is the
    line-break one (CR LF and lone CR become LF), so only the other lines go through ftfy (tests
    check equality with ftfy.fix_text). As in ftfy, once a line contains ``<``, HTML entities
    are no longer unescaped in the lines after it.
    """
    if not _FTFY_CANDIDATE.search(text):
        return _fix_line_breaks(text)
    config = FTFY_CONFIG
    out, pos = [], 0
    while pos < len(text):
        end = text.find("\n", pos) + 1 or len(text)
        end = min(end, pos + config.max_decode_length)
        segment = text[pos:end]
        if config.unescape_html == "auto" and "<" in segment:
            config = config._replace(unescape_html=False)
        out.append(
            ftfy.fix_and_explain(segment, config)[0] if _FTFY_CANDIDATE.search(segment) else _fix_line_breaks(segment)
        )
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


TextStage = Callable[[str], str]


def text_stages(config: CleaningConfig) -> list[tuple[str, TextStage]]:
    """(name, function) of the text stages ``config`` turns on, in the order they run."""
    stages: list[tuple[str, TextStage]] = [("nul", remove_nul)]
    if config.fix_unicode:
        stages.append(("fix_unicode", fix_unicode))
    if config.normalize_whitespace:
        stages.append(("whitespace", normalize_whitespace))
    return stages


def clean_text(text: str, config: CleaningConfig | str = "none") -> str:
    """``text`` after the text stages of ``config`` (a CleaningConfig or a preset name).

    This is what every consumer (preprocessing, tokenizer training, fine-tuning readers) applies
    to each text, so they all see the same characters. Filters and dedup are document decisions
    and live in ``DocumentStages`` / ``clean_documents``.
    """
    for _, fn in text_stages(cleaning_preset(config) if isinstance(config, str) else config):
        text = fn(text)
    return text


class DocumentStages:
    """The per-document stages (no state across documents); keeps CPU seconds per stage and
    the counts of repairs (``repairs``: documents and characters with NUL removed)."""

    def __init__(self, config: CleaningConfig) -> None:
        self.config = config
        self.stages = text_stages(config)
        self.hasher = MinHasher(config.num_perm, config.shingle, config.shingle_size) if config.near_dedup else None
        self.seconds = {name: 0.0 for name, _ in self.stages}
        self.seconds.update(filters=0.0, dedup_key=0.0, minhash=0.0)
        self.repairs: Counter = Counter()

    def _timed(self, stage: str, fn, *args):
        start = time.process_time()
        result = fn(*args)
        self.seconds[stage] += time.process_time() - start
        return result

    def process(self, fields: dict[str, str]) -> Processed:
        cfg = self.config
        nul = sum(v.count("\x00") for v in fields.values() if "\x00" in v)
        if nul:
            self.repairs.update(nul_documents=1, nul_characters=nul)
        for name, fn in self.stages:
            fields = self._timed(name, _map_fields, fn, fields)
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
        self._lsh = LSHIndex(config.near_dedup_threshold, config.num_perm) if config.near_dedup else None
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


def clean_documents(texts: Iterable[str], config: CleaningConfig | str = "none") -> Iterator[str]:
    """The texts that survive every stage of ``config``, cleaned, in order.

    The in-process form of what preprocessing does to a stream of single-field documents (same
    stages, same duplicate decisions); tools/train_tokenizer.py reads its corpus through it.
    """
    config = cleaning_preset(config) if isinstance(config, str) else config
    stages, duplicates = DocumentStages(config), DuplicateIndex(config)
    for text in texts:
        done = stages.process({"text": text})
        if done.fields is not None and duplicates.check(done) is None:
            yield done.fields["text"]


# -- command-line flags (one set, shared by every tool that reads a corpus) -------------------


def cleaning_help() -> str:
    """Exactly what each preset does, from PRESETS (shown by --help; docs/data.md says the same)."""
    lines = []
    for name, config in PRESETS.items():
        title = "lossless, the default" if name == "none" else "WebText-style"
        lines.append(f"--clean {name} ({title}), in order:")
        lines += [f"  - {line}" for line in describe_cleaning(config)]
    lines.append("A stage flag overrides the preset, e.g. --clean web --no-near-dedup.")
    return "\n".join(lines)


def add_cleaning_args(parser: argparse.ArgumentParser) -> None:
    """--clean PRESET plus one flag per stage (each overrides the preset); see docs/data.md."""
    g = parser.add_argument_group("cleaning", cleaning_help())
    g.add_argument("--clean", choices=tuple(PRESETS), default="none", help="cleaning preset (default: none = lossless)")
    g.add_argument(
        "--no-clean",
        dest="clean",
        action="store_const",
        const="none",
        help="same as --clean none (the default; kept for old scripts)",
    )
    flag = argparse.BooleanOptionalAction
    g.add_argument(
        "--fix-unicode",
        action=flag,
        default=None,
        help="repair mojibake and HTML entities with ftfy, keeping curly quotes and full-width characters (web: on)",
    )
    g.add_argument(
        "--normalize-whitespace",
        action=flag,
        default=None,
        help="CRLF to LF, runs of spaces to one, trim lines (strips indentation!), at most one blank line (web: on)",
    )
    g.add_argument(
        "--min-chars",
        type=int,
        default=None,
        help="drop documents shorter than this many characters (0 = off; web: 200)",
    )
    g.add_argument(
        "--max-non-alpha",
        type=float,
        default=None,
        help="drop documents whose non-space characters are more than this fraction non-letters (1.0 = off; web: 0.5)",
    )
    g.add_argument(
        "--dedup", action=flag, default=None, help="drop exact repeats (case-folded, whitespace collapsed; web: on)"
    )
    g.add_argument("--near-dedup", action=flag, default=None, help="drop near-duplicates with MinHash LSH (web: on)")
    g.add_argument(
        "--near-dedup-threshold",
        type=float,
        default=None,
        help="Jaccard similarity at which a document is a near-duplicate (default 0.8)",
    )
    g.add_argument(
        "--shingle",
        choices=("word", "char"),
        default=None,
        help="near-dedup shingles: word n-grams or character k-grams (default word)",
    )
    g.add_argument("--shingle-size", type=int, default=None, help="n of the n-grams (default 5)")
    g.add_argument("--num-perm", type=int, default=None, help="MinHash permutations (default 128)")


def cleaning_from_args(args: argparse.Namespace) -> CleaningConfig:
    """The preset named by --clean with every stage flag that was given applied on top."""
    config = cleaning_preset(args.clean)
    for name in (
        "fix_unicode",
        "normalize_whitespace",
        "min_chars",
        "max_non_alpha",
        "dedup",
        "near_dedup",
        "near_dedup_threshold",
        "shingle",
        "shingle_size",
        "num_perm",
    ):
        value = getattr(args, name, None)
        if value is not None:
            setattr(config, name, value)
    return config
