"""tools/preprocess_data.py on small generated scrapes in every input format."""

import bz2
import gzip
import io
import json
import lzma
import os
import tarfile

import numpy as np
import pytest
import zstandard

from megagpt2.data import preprocess as pipeline
from megagpt2.data.indexed import IndexedDataset
from megagpt2.tokenizer import build_tokenizer
from tools import preprocess_data

SYLLABLES = ["ka", "lo", "mi", "ren", "to", "sa", "vel", "du", "ni", "por", "es", "tan", "bri"]


def make_doc(seed: int, words: int = 120) -> str:
    """Deterministic pseudo-English document (two paragraphs) unique to ``seed``."""
    rng = np.random.default_rng(seed)
    tokens = ["".join(rng.choice(SYLLABLES, size=rng.integers(1, 4))) for _ in range(words)]
    half = words // 2
    return " ".join(tokens[:half]).capitalize() + ".\n\n" + " ".join(tokens[half:]).capitalize() + "."


def near_copy(text: str) -> str:
    """Same document with one word replaced (word 5-gram Jaccard about 0.92)."""
    words = text.split(" ")
    words[30] = "zebra"
    return " ".join(words)


def jsonl_bytes(texts) -> bytes:
    return b"".join(json.dumps({"text": t}).encode() + b"\n" for t in texts)


def write_jsonl(path, texts, opener=open):
    with opener(path, "wb") as f:
        f.write(jsonl_bytes(texts))


def xz_tar(members: dict) -> bytes:
    """An xz-compressed tar holding ``members`` (name -> text), as in OpenWebText."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text in members.items():
            data = text.encode() if isinstance(text, str) else text
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return lzma.compress(buf.getvalue())


def write_owt_tar(path, members: dict):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def run(tmp_path, inputs, *flags, name="out"):
    prefix = str(tmp_path / name)
    argv = ["--input", *map(str, inputs), "--output-prefix", prefix, "--no-progress", *flags]
    assert preprocess_data.main(argv) == 0
    report = json.load(open(prefix + "_report.json"))
    return report, IndexedDataset(prefix + "_text_document")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("GPT2BPETokenizer")


def decoded(ds, tokenizer):
    return [tokenizer.decode(ds.document(d).tolist()) for d in range(ds.num_documents)]


COMPRESSORS = {
    "jsonl": open,
    "jsonl.gz": gzip.open,
    "jsonl.zst": zstandard.open,
    "jsonl.xz": lzma.open,
    "jsonl.bz2": bz2.open,
}


@pytest.mark.parametrize("ext", list(COMPRESSORS))
def test_jsonl_formats(tmp_path, tokenizer, ext):
    texts = [make_doc(i) for i in range(5)]
    path = tmp_path / f"scrape.{ext}"
    write_jsonl(str(path), texts, COMPRESSORS[ext])
    report, ds = run(tmp_path, [path])
    assert report["documents_read"] == 5 and report["documents_kept"] == 5
    assert decoded(ds, tokenizer) == texts
    assert ds.dtype == np.uint16


def test_txt_directory_and_owt_tar(tmp_path, tokenizer):
    docs = tmp_path / "pages" / "sub"
    docs.mkdir(parents=True)
    (docs / "b.txt").write_text(make_doc(1))
    (docs / "a.txt").write_text(make_doc(0))
    (docs / "notes.md").write_text("not a document")  # unsupported names in a directory: skipped
    (docs / "bad.txt").write_bytes(b"caf\xe9 \xff broken")  # bad UTF-8: repaired, counted
    tar = tmp_path / "owt.tar"
    write_owt_tar(
        str(tar),
        {
            "openwebtext/urlsf_00-1_data.xz": xz_tar({"0001.txt": make_doc(2), "0002.txt": make_doc(3)}),
            "openwebtext/urlsf_00-2_data.xz": b"\xfd7zXZ\x00garbage",  # unreadable member
            "openwebtext/urlsf_00-3_data.xz": xz_tar({"0003.txt": make_doc(4)}),
        },
    )
    report, ds = run(tmp_path, [tmp_path / "pages", tar])
    # Directory in sorted path order (a, b, bad), then the archive members in order.
    docs = [make_doc(i) for i in range(5)]
    assert decoded(ds, tokenizer) == docs[:2] + ["caf\ufffd \ufffd broken"] + docs[2:]
    assert report["documents_read"] == 7
    assert report["dropped"]["malformed"] == 1
    assert report["repairs"]["invalid_utf8_documents"] == 1
    assert report["repairs"]["invalid_utf8_sequences"] == 2


def test_every_drop_reason_counted(tmp_path, tokenizer, caplog):
    keep = [make_doc(i) for i in range(6)]
    lines = jsonl_bytes(keep[:3])
    lines += json.dumps({"text": "  " + keep[0].upper().replace(" ", "   ") + "\n"}).encode() + b"\n"
    lines += jsonl_bytes([near_copy(keep[1])])
    lines += b'{"text": "unterminated\n'  # malformed JSON
    lines += b'{"text": "bad \xff\xfe utf8 here"}\n'  # bad UTF-8
    lines += b'{"title": "no text field"}\n'  # missing key
    lines += b'["not", "an", "object"]\n'
    lines += jsonl_bytes(["", "   \n\t ", "Too short.", "1234 5678 90 -- $$$ %%% 42 ### 17 !!! ***"])
    lines += jsonl_bytes(keep[3:])
    (tmp_path / "a.jsonl").write_bytes(lines)
    gz_docs = [make_doc(10 + i) for i in range(40)]
    truncated = gzip.compress(jsonl_bytes(gz_docs))
    (tmp_path / "b.jsonl.gz").write_bytes(truncated[: len(truncated) // 2])
    report, ds = run(
        tmp_path,
        [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"],
        "--min-chars",
        "20",
        "--max-non-alpha",
        "0.5",
        "--dedup",
        "--near-dedup",
    )
    gz_lines = report["documents_read"] - 16 - 1  # a.jsonl has 16 records, then one gz error
    assert gz_lines >= 2
    # The bad UTF-8 line is repaired ("bad \ufffd\ufffd utf8 here", 19 characters), then too short.
    assert report["dropped"] == {
        "malformed": 4,
        "empty": 2,
        "too_short": 2,
        "non_alpha": 1,
        "duplicate": 1,
        "near_duplicate": 1,
    }
    assert report["repairs"]["invalid_utf8_documents"] == 1
    assert report["documents_kept"] == 6 + gz_lines
    assert decoded(ds, tokenizer) == keep + gz_docs[:gz_lines]
    assert "a.jsonl:6: invalid JSON" in caplog.text
    assert "a.jsonl:7: 2 invalid UTF-8 sequence(s) replaced" in caplog.text
    assert "b.jsonl.gz" in caplog.text and "unreadable file after line" in caplog.text
    assert report["tokens_written"]["text"] == ds.num_tokens


def test_same_output_for_any_worker_count(tmp_path):
    texts = [make_doc(i, words=60) for i in range(120)] + [make_doc(3, words=60)]
    write_jsonl(str(tmp_path / "in.jsonl"), texts)
    outputs = []
    for workers in (1, 3):
        run(
            tmp_path,
            [tmp_path / "in.jsonl"],
            "--workers",
            str(workers),
            "--chunk-bytes",
            "2000",
            "--append-eod",
            "--dedup",
            name=f"w{workers}",
        )
        outputs.append([open(tmp_path / f"w{workers}_text_document{ext}", "rb").read() for ext in (".bin", ".idx")])
    assert outputs[0] == outputs[1]
    ds = IndexedDataset(str(tmp_path / "w3_text_document"))
    assert ds.num_documents == 120 and all(ds[i][-1] == 50256 for i in range(120))


def _sigterm_is_default(chunk) -> bool:  # stands in for process_chunk inside the pool's workers
    import signal

    return signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_pool_workers_die_on_sigterm_whatever_the_caller_installed(monkeypatch, tokenizer):
    """The pool ends its workers with SIGTERM. A caller's handler that does not exit (a trainer's
    stop request once stayed installed in the test process) was inherited through fork, the
    workers survived and the pool waited for them forever (4 of 11 runs hung)."""
    import signal

    from megagpt2.corpus.cleaning import CleaningConfig

    previous = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        monkeypatch.setattr(pipeline, "process_chunk", _sigterm_is_default)
        settings = ({}, True, "<u2", CleaningConfig(), False)
        results = list(pipeline._ordered_results(iter([[{}]] * 12), 3, settings, tokenizer))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert results == [True] * 12


def test_cleaning_switches(tmp_path, tokenizer):
    texts = ["The caf\u00c3\u00a9 is open   today.\r\n\r\n\r\n\r\nCome in.", "Repeat me please.", "repeat   ME please."]
    write_jsonl(str(tmp_path / "in.jsonl"), texts)
    report, ds = run(
        tmp_path, [tmp_path / "in.jsonl"], "--clean", "web", "--min-chars", "0", "--max-non-alpha", "1", name="clean"
    )
    assert decoded(ds, tokenizer) == ["The caf\u00e9 is open today.\n\nCome in.", "Repeat me please."]
    assert report["dropped"]["duplicate"] == 1 and report["clean"] == "web"
    assert {"read", "nul", "fix_unicode", "whitespace", "filters", "dedup_key", "tokenize", "dedup", "write"} <= set(
        report["stage_cpu_seconds"]
    )
    for flags in ((), ("--no-clean",), ("--clean", "web", "--no-clean")):
        report, ds = run(tmp_path, [tmp_path / "in.jsonl"], *flags, name="raw")
        assert decoded(ds, tokenizer) == texts and report["documents_kept"] == 3
    _, ds = run(
        tmp_path,
        [tmp_path / "in.jsonl"],
        "--clean",
        "web",
        "--no-dedup",
        "--no-near-dedup",
        "--no-fix-unicode",
        "--min-chars",
        "0",
        name="nd",
    )
    assert decoded(ds, tokenizer)[0] == "The caf\u00c3\u00a9 is open today.\n\nCome in."
    assert ds.num_documents == 3
    _, ds = run(tmp_path, [tmp_path / "in.jsonl"], "--dedup", name="dedup_only")
    assert decoded(ds, tokenizer) == texts[:2]  # one stage alone; the text itself untouched


def test_near_dedup_removes_planted_and_keeps_distinct(tmp_path):
    distinct = [make_doc(100 + i) for i in range(40)]
    planted = [near_copy(distinct[i]) for i in range(0, 40, 4)]
    write_jsonl(str(tmp_path / "in.jsonl"), distinct + planted)
    for shingle, size in (("word", "5"), ("char", "8")):
        report, ds = run(
            tmp_path,
            [tmp_path / "in.jsonl"],
            "--near-dedup",
            "--shingle",
            shingle,
            "--shingle-size",
            size,
            name=shingle,
        )
        assert report["dropped"]["near_duplicate"] == 10
        assert ds.num_documents == 40


def test_multiple_json_keys(tmp_path, tokenizer):
    rows = [{"text": make_doc(1), "title": "First"}, {"text": make_doc(2)}, {"text": make_doc(1), "title": "Dup"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(tmp_path, [tmp_path / "in.jsonl"], "--json-keys", "text", "title", "--dedup")
    titles = IndexedDataset(str(tmp_path / "out_title_document"))
    assert decoded(titles, tokenizer) == ["First", ""]  # aligned with the text documents


def test_interrupted_run_keeps_previous_output(tmp_path, monkeypatch):
    write_jsonl(str(tmp_path / "in.jsonl"), [make_doc(i) for i in range(20)])
    run(tmp_path, [tmp_path / "in.jsonl"])
    before = open(tmp_path / "out_text_document.bin", "rb").read()
    calls, original = [], pipeline.process_chunk

    def dying(chunk):  # Ctrl-C while the second chunk is being tokenized
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(chunk)

    monkeypatch.setattr(pipeline, "process_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        preprocess_data.main(
            [
                "--input",
                str(tmp_path / "in.jsonl"),
                "--output-prefix",
                str(tmp_path / "out"),
                "--chunk-bytes",
                "100",
                "--no-dedup",
            ]
        )
    assert len(calls) == 2
    assert open(tmp_path / "out_text_document.bin", "rb").read() == before
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_bad_arguments_fail_with_a_message(tmp_path, caplog):
    assert (
        preprocess_data.main(["--input", str(tmp_path / "missing*.jsonl"), "--output-prefix", str(tmp_path / "o")]) == 1
    )
    assert "matches no file" in caplog.text
    (tmp_path / "x.csv").write_text("a,b")
    assert preprocess_data.main(["--input", str(tmp_path / "x.csv"), "--output-prefix", str(tmp_path / "o")]) == 1
    assert "unsupported file type" in caplog.text
    assert not list(tmp_path.glob("o_*"))
