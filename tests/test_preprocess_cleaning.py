"""Unit tests of the cleaning stages and near-duplicate detection."""

import ftfy
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megagpt2.corpus.cleaning import (
    FTFY_CONFIG,
    CleaningConfig,
    DocumentStages,
    DuplicateIndex,
    fix_unicode,
    non_alpha_fraction,
    normalize_whitespace,
)
from megagpt2.corpus.dedup import LSHIndex, MinHasher, dedup_key, lsh_params

TRICKY = [
    "plain ascii line\nand another",
    "The caf\u00c3\u00a9 is open",  # mojibake
    "Tom &amp; Jerry &lt;3\nsecond &amp; line",
    "<b>bold</b> &amp; stays escaped\nlater &amp; too",  # '<' switches HTML unescaping off
    "first &amp; line\n<p>then markup</p>\nthen &amp; again",
    "windows\r\nline ends\r\n",
    "ctrl\x00chars\x07 and \x1b[31mred\x1b[0m",
    "ligature \ufb01nd and fullwidth \uff21\uff22",
    "curly \u2018quotes\u2019 \u2014 dash",
    "",
    "\n\n\n",
    "no newline at end &amp;",
]


@pytest.mark.parametrize("text", TRICKY)
def test_fix_unicode_equals_ftfy(text):
    assert fix_unicode(text) == ftfy.fix_text(text, FTFY_CONFIG)


_ALPHABET = st.sampled_from(list("ab <>&;\n\r\t\x00\x1bé\u00c3\u00a9\u2019\ufb01") + ["&amp;", "&lt;"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_ALPHABET, max_size=40).map("".join))
def test_fix_unicode_equals_ftfy_on_random_text(text):
    assert fix_unicode(text) == ftfy.fix_text(text, FTFY_CONFIG)


def test_normalize_whitespace():
    assert normalize_whitespace(" a \t b \r\n\r\n\r\n\n c  \rd ") == "a b\n\nc\nd"
    assert normalize_whitespace("x\u00a0\u00a0y") == "x y"  # non-breaking spaces too


@pytest.mark.parametrize(
    "text,expected", [("abc 123 !!", 5 / 8), ("", 0.0), ("   ", 0.0), ("only letters", 0.0), ("12 34", 1.0)]
)
def test_non_alpha_fraction(text, expected):
    assert non_alpha_fraction(text) == pytest.approx(expected)
    # The non-ASCII path (regex) agrees with the ASCII fast path.
    assert non_alpha_fraction(text + " é") == pytest.approx(
        1 - (len([c for c in text if c.isalpha()]) + 1) / (len(text.replace(" ", "")) + 1)
    )


def test_dedup_key_ignores_case_and_whitespace():
    assert dedup_key("Hello  World\n") == dedup_key("hello world")
    assert dedup_key("hello world") != dedup_key("hello worlds")


def test_stages_and_index_drop_reasons():
    config = CleaningConfig(min_chars=10, max_non_alpha=0.5, dedup=True, near_dedup=True)
    stages, index = DocumentStages(config), DuplicateIndex(config)
    base = " ".join(f"word{i % 7}x{i}" for i in range(200))
    near = base.replace("word3x10 ", "changed ")
    docs = ["", "short", "1 2 3 4 5 6 7 8 9 0 ## !!", base, base.upper(), near, base + " tail"]
    reasons = []
    for text in docs:
        done = stages.process({"text": text})
        reasons.append(done.reason or index.check(done))
    assert reasons == ["empty", "too_short", "non_alpha", None, "duplicate", "near_duplicate", "near_duplicate"]
    assert all(v >= 0 for v in stages.seconds.values()) and stages.seconds["minhash"] > 0


@pytest.mark.parametrize("shingle,size", [("word", 5), ("char", 5), ("word", 1)])
def test_minhash_estimates_jaccard(shingle, size):
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(5000)]
    words = list(rng.choice(vocab, size=400))
    hasher = MinHasher(256, shingle, size)
    other = words[:300] + list(rng.choice(vocab, size=100))

    def grams(ws):
        text = " ".join(ws)
        return (
            {tuple(ws[i : i + size]) for i in range(len(ws) - size + 1)}
            if shingle == "word"
            else {text[i : i + size] for i in range(len(text) - size + 1)}
        )

    a, b = grams(words), grams(other)
    true = len(a & b) / len(a | b)
    estimate = np.mean(hasher.signature(" ".join(words)) == hasher.signature(" ".join(other)))
    assert abs(estimate - true) < 0.1


def test_lsh_index_keeps_distinct_and_catches_near_copies():
    rng = np.random.default_rng(1)
    vocab = [f"v{i}" for i in range(20000)]
    hasher, index = MinHasher(), LSHIndex(0.8)
    docs = [list(rng.choice(vocab, size=300)) for _ in range(200)]
    assert not any(index.seen(hasher.signature(" ".join(d))) for d in docs)
    copies = []
    for d in docs[:50]:
        c = list(d)
        c[int(rng.integers(0, 300))] = "edited"
        copies.append(c)
    assert all(index.seen(hasher.signature(" ".join(c))) for c in copies)
    assert lsh_params(0.8, 128) == (index.bands, index.rows)
