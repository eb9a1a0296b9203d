"""Build the Chinese demo's data from Debian's fortunes-zh: a pretraining jsonl and a chat set.

    python tools/make_zh_corpus.py --output-dir data/demo_zh --cache-dir .cache/corpus

Source: the ``fortunes-zh`` package (GPL-3.0-or-later; Tang and Song poems, classical sayings,
proverbs and Chinese notes about Debian, about 5,700 entries). Its files are read from, in order:
``--fortunes-dir``; the installed package (``/usr/share/games/fortunes``); an earlier download in
``--cache-dir``; else ``apt-get download fortunes-zh`` (no installation, no root needed; as root
an empty package list is refreshed with ``apt-get update`` first) unpacked with ``dpkg-deb -x``.
Nothing is committed to the repository.

Writes into ``--output-dir``:

    pretrain.jsonl  one {"text", "source"} per entry whose visible characters are mostly Han
                    (colour codes removed; entries that are mostly English or tables are left
                    out), shuffled with --seed
    chat.txt        GPT2-chitchat's format (one utterance per line, dialogues separated by a
                    blank line): the clauses of each poem or saying (entries whose body lines are
                    almost all Han characters and punctuation) as alternating turns, so the
                    "bot" learns to answer a line with the next one (对诗), at most --max-turns
                    turns per dialogue
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Iterator

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt2.tokenizer.wordpiece import is_cjk  # noqa: E402

FILES = ("chinese", "tang300", "song100")
INSTALLED = "/usr/share/games/fortunes"
PACKAGE = "fortunes-zh"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CLAUSE = re.compile(r"[^，。？！；：]+[，。？！；：]+")
_NOT_BODY = ("《", "题目", "作者", "--", "——")


def _has_files(directory: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, name)) for name in FILES)


def _run(cmd: list[str], cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def fetch(cache_dir: str, fortunes_dir: str | None = None) -> str:
    """Directory holding the fortunes-zh files ``chinese``, ``tang300`` and ``song100``."""
    if fortunes_dir is not None:
        if not _has_files(fortunes_dir):
            raise RuntimeError(f"--fortunes-dir {fortunes_dir} lacks one of {', '.join(FILES)}")
        return fortunes_dir
    if _has_files(INSTALLED):
        return INSTALLED
    cache_dir = os.path.abspath(cache_dir)  # apt-get runs inside it
    unpacked = os.path.join(cache_dir, PACKAGE)
    found = os.path.join(unpacked, INSTALLED.lstrip("/"))
    if _has_files(found):
        return found
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(
            f"{PACKAGE} is not installed and apt-get/dpkg-deb are missing: install "
            f"{PACKAGE} or pass --fortunes-dir with its files {', '.join(FILES)}"
        )
    os.makedirs(cache_dir, exist_ok=True)
    result = _run(["apt-get", "download", PACKAGE], cache_dir)
    if result.returncode != 0 and os.geteuid() == 0:  # a fresh machine has no package lists yet
        _run(["apt-get", "update", "-q"], cache_dir)
        result = _run(["apt-get", "download", PACKAGE], cache_dir)
    debs = sorted(glob.glob(os.path.join(cache_dir, f"{PACKAGE}_*.deb")))
    if result.returncode != 0 or not debs:
        raise RuntimeError(
            f"apt-get download {PACKAGE} failed ({result.stderr.strip()[-400:]}); "
            f"run `apt-get update` (as root) or install {PACKAGE}, then retry"
        )
    result = _run(["dpkg-deb", "-x", debs[-1], unpacked], cache_dir)
    if result.returncode != 0 or not _has_files(found):
        raise RuntimeError(f"dpkg-deb -x {debs[-1]} did not give {found}: {result.stderr.strip()[-400:]}")
    return found


def entries(path: str) -> Iterator[str]:
    """Entries of one fortune file (separated by lines holding only %), colour codes removed."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = _ANSI.sub("", f.read())
    for entry in re.split(r"\n%\n", text.replace("\r\n", "\n")):
        entry = entry.strip("\n")
        if entry.strip() and entry.strip() != "%":
            yield entry


def han_share(text: str) -> float:
    """Share of the visible characters that are CJK (Han, CJK punctuation, full-width forms)."""
    visible = [c for c in text if not c.isspace()]
    return sum(map(is_cjk, visible)) / len(visible) if visible else 0.0


def clauses(entry: str) -> list[str]:
    """Clauses (each with its closing punctuation) of a poem or saying; none for other prose
    (an entry with a body line that is not almost all CJK, such as notes about software)."""
    out = []
    for line in entry.split("\n"):
        line = line.strip()
        if not line or line.startswith(_NOT_BODY):
            continue
        if han_share(line) < 0.9:
            return []
        out += _CLAUSE.findall(line)
    return out


def make_zh_corpus(
    output_dir: str,
    cache_dir: str,
    fortunes_dir: str | None = None,
    seed: int = 0,
    min_han: float = 0.5,
    max_turns: int = 8,
) -> dict:
    """Write pretrain.jsonl and chat.txt (module docstring); returns their counts."""
    source = fetch(cache_dir, fortunes_dir)
    docs, dialogues = [], []
    for name in FILES:
        for n, entry in enumerate(entries(os.path.join(source, name))):
            if han_share(entry) < min_han:
                continue
            docs.append(json.dumps({"text": entry, "source": f"{PACKAGE}/{name}#{n}"}, ensure_ascii=False))
            turns = clauses(entry)
            for start in range(0, len(turns) - 1, max_turns):
                if len(turns[start : start + max_turns]) >= 2:
                    dialogues.append(turns[start : start + max_turns])
    if not docs:
        raise RuntimeError(f"no mostly-Chinese entries in {source}")
    rng = np.random.default_rng(seed)
    os.makedirs(output_dir, exist_ok=True)
    pretrain, chat = os.path.join(output_dir, "pretrain.jsonl"), os.path.join(output_dir, "chat.txt")
    _write(pretrain, "".join(docs[i] + "\n" for i in rng.permutation(len(docs))))
    _write(chat, "\n".join("".join(t + "\n" for t in dialogues[i]) for i in rng.permutation(len(dialogues))))
    return {
        "source": source,
        "documents": len(docs),
        "characters": sum(len(json.loads(d)["text"]) for d in docs),
        "dialogues": len(dialogues),
        "pretrain": pretrain,
        "chat": chat,
    }


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True, help="where pretrain.jsonl and chat.txt are written")
    p.add_argument("--cache-dir", required=True, help="where the downloaded package is kept")
    p.add_argument("--fortunes-dir", default=None, help="use the fortunes-zh files in this directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffles")
    p.add_argument(
        "--min-han",
        type=float,
        default=0.5,
        help="keep entries whose visible characters are at least this share CJK (default 0.5)",
    )
    p.add_argument("--max-turns", type=int, default=8, help="turns per chat dialogue at most (default 8)")
    args = p.parse_args(argv)
    if args.max_turns < 2:
        p.error(f"--max-turns must be >= 2, got {args.max_turns}")
    try:
        info = make_zh_corpus(
            args.output_dir, args.cache_dir, args.fortunes_dir, args.seed, args.min_han, args.max_turns
        )
    except (RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"read {info['source']}: wrote {info['documents']:,} documents ({info['characters']:,} characters) "
        f"to {info['pretrain']} and {info['dialogues']:,} dialogues to {info['chat']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
