"""Preprocessing keeps the text unless asked: the lossless default, the presets doing what their
docs say, one cleaning for tokenizer training, pretraining data and chat data, and progress."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from megagpt2.corpus import progress as progress_mod
from megagpt2.corpus.cleaning import PRESETS, clean_documents, clean_text, cleaning_preset, describe_cleaning
from megagpt2.corpus.readers import InputPosition, iter_records
from megagpt2.data.finetune import read_turns
from megagpt2.data.indexed import IndexedDataset
from megagpt2.tokenizer import build_tokenizer
from tests.test_preprocess import make_doc, near_copy, write_jsonl
from tests.tokenizer_files import byte_level_tokenizer_json
from tools import preprocess_data, train_tokenizer

CODE = (
    'def mean(xs):\n    """Average of xs."""\n    if not xs:\n\t\treturn 0.0   \n'
    "    return sum(xs) / len(xs)\n\n\n\n# trailing spaces   \n"
)
CJK = "中文标点，问号？冒号：（括号）“引号”。全角空格　结束\r\n第二行\r\n"
MIXED = "curly \u2018quotes\u2019 \u2014 dash, \ufb01 ligature, caf\u00c3\u00a9 &amp; <b>x</b>\r\n\r\n\r\n  end  "
PROSE = " ".join(["The quick brown fox jumps over the lazy dog near the river bank"] * 5)


def preprocess(tmp_path: Path, inputs: list, *flags: str, name: str = "out") -> tuple[dict, IndexedDataset]:
    prefix = str(tmp_path / name)
    argv = ["--input", *map(str, inputs), "--output-prefix", prefix, "--no-progress", *flags]
    assert preprocess_data.main(argv) == 0
    return json.loads(Path(prefix + "_report.json").read_text()), IndexedDataset(prefix + "_text_document")


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory) -> str:
    return byte_level_tokenizer_json(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.mark.parametrize("kind", ["gpt2", "tokenizer.json"])
def test_default_round_trip_is_byte_for_byte(tmp_path, hf_json, kind):
    (tmp_path / "code.txt").write_bytes(CODE.encode())
    (tmp_path / "cjk.txt").write_bytes(CJK.encode())  # CRLF stays CRLF: files are read as bytes
    write_jsonl(str(tmp_path / "more.jsonl"), [MIXED, CODE + CJK])
    flags = [] if kind == "gpt2" else ["--tokenizer-type", "HFTokenizer", "--tokenizer-model", hf_json]
    tok = build_tokenizer(*(("HFTokenizer", None, None, hf_json) if flags else ()))
    report, ds = preprocess(
        tmp_path, [tmp_path / "code.txt", tmp_path / "cjk.txt", tmp_path / "more.jsonl"], "--append-eod", *flags
    )
    want = [CODE, CJK, MIXED, CODE + CJK]
    assert ds.num_documents == len(want)
    for d, text in enumerate(want):
        ids = ds.document(d).tolist()
        assert ids[-1] == tok.eod and ids[:-1] == tok.encode(text)
        assert tok.decode(ids[:-1]).encode("utf-8") == text.encode("utf-8")
    assert report["tokens_written"]["text"] == sum(len(tok.encode(t)) + 1 for t in want)
    assert not any(report["dropped"].values()) and not any(report["repairs"].values())
    assert report["clean"] == "none" and report["cleaning"] == vars(cleaning_preset("none"))


def test_nul_and_invalid_utf8_are_repaired_and_counted(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "nul\u0000 in json\u0000"}) + "\n" + json.dumps({"text": "  \n\t"}) + "\n"
    )
    (tmp_path / "b.txt").write_bytes(b"latin-1 caf\xe9, stray \xff\xfe and a NUL\x00.")
    report, ds = preprocess(tmp_path, [tmp_path / "a.jsonl", tmp_path / "b.txt"])
    tok = build_tokenizer()
    assert [tok.decode(ds.document(d).tolist()) for d in range(ds.num_documents)] == [
        "nul in json",
        "latin-1 caf\ufffd, stray \ufffd\ufffd and a NUL.",
    ]
    assert report["repairs"] == {
        "invalid_utf8_documents": 1,
        "invalid_utf8_sequences": 3,
        "nul_documents": 2,
        "nul_characters": 3,
    }
    assert report["dropped"]["empty"] == 1 and report["documents_kept"] == 2


def web_documents() -> tuple[list[str], list[str | None]]:
    """Inputs aimed at each documented stage of --clean web, with what web must make of them
    (None = dropped)."""
    mojibake = (
        "Mojibake caf\u00c3\u00a9 &amp; bell\x07 \u201ccurly\u201d \u4e2d\u6587\uff0c\uff1f\uff1a\uff08\uff09\n" + PROSE
    )
    spaces = "Lines:\r\n    indented   code\t\tand tabs\u3000ideographic\r\n\r\n\r\n\r\nnext\x00 para   \n" + PROSE
    long = make_doc(7)
    docs = [
        mojibake,
        spaces,
        "Too short, under 200 characters.",
        "1234 5678 %%% ### !!! 42 " * 12,
        "   \n\t ",
        long,
        "  " + long.upper().replace(" ", "   ") + "\n",
        near_copy(long),
    ]
    want = [
        "Mojibake caf\u00e9 & bell \u201ccurly\u201d \u4e2d\u6587\uff0c\uff1f\uff1a\uff08\uff09\n" + PROSE,
        "Lines:\nindented code and tabs ideographic\n\nnext para\n" + PROSE,
        None,
        None,
        None,
        long,
        None,
        None,
    ]
    return docs, want


def test_web_preset_does_what_its_docs_say(tmp_path):
    docs, want = web_documents()
    write_jsonl(str(tmp_path / "web.jsonl"), docs)
    report, ds = preprocess(tmp_path, [tmp_path / "web.jsonl"], "--clean", "web")
    tok = build_tokenizer()
    assert [tok.decode(ds.document(d).tolist()) for d in range(ds.num_documents)] == [w for w in want if w]
    assert report["dropped"] == {
        "malformed": 0,
        "empty": 1,
        "too_short": 1,
        "non_alpha": 1,
        "duplicate": 1,
        "near_duplicate": 1,
    }
    assert report["repairs"]["nul_characters"] == 1
    # --clean none on the same input: only the NUL goes, and the whitespace-only document.
    report, ds = preprocess(tmp_path, [tmp_path / "web.jsonl"], name="none")
    assert [tok.decode(ds.document(d).tolist()) for d in range(ds.num_documents)] == [
        d.replace("\x00", "") for d in docs if d.strip()
    ]


def test_docs_and_help_list_exactly_what_each_preset_does(capsys):
    docs = " ".join((Path(__file__).parent.parent / "docs" / "data.md").read_text().split())
    with pytest.raises(SystemExit):
        preprocess_data.main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for name, config in PRESETS.items():
        for line in describe_cleaning(config):
            assert line in docs, f"docs/data.md lacks the {name} stage {line!r}"
            assert line in shown, f"--help lacks the {name} stage {line!r}"


def test_fine_tuning_config_names_the_same_presets():
    import typing

    from megagpt2.config import Clean, Config, ConfigError
    from megagpt2.config_checks import validate

    assert typing.get_args(Clean) == tuple(PRESETS)
    cfg = Config()
    cfg.data.clean = "webtext"
    with pytest.raises(ConfigError, match="data.clean='webtext' is not one of none, web"):
        validate(cfg)


def test_tokenizer_pretraining_and_chat_data_see_the_same_text(tmp_path):
    docs, _ = web_documents()
    path = tmp_path / "web.jsonl"
    write_jsonl(str(path), docs)
    flags = ["--clean", "web", "--no-near-dedup", "--min-chars", "10"]
    pre = preprocess_data.cleaning_from_args(
        preprocess_data.build_parser().parse_args(["--input", str(path), "--output-prefix", "x", *flags])
    )
    args = train_tokenizer.parse_args(["--input", str(path), "--output-prefix", str(tmp_path / "spm"), *flags])
    assert args.cleaning == pre  # one set of flags, one meaning
    expected = list(clean_documents(docs, pre))
    _, ds = preprocess(tmp_path, [path], *flags)
    tok = build_tokenizer()
    assert [tok.decode(ds.document(d).tolist()) for d in range(ds.num_documents)] == expected
    stream = train_tokenizer.SentenceStream(args.files, "auto", "text", True, args.cleaning)
    assert list(stream) == [line for doc in expected for line in doc.split("\n") if line.strip()]
    dialogue = tmp_path / "chat.jsonl"
    dialogue.write_text(json.dumps(docs[:2]) + "\n")
    assert read_turns(str(dialogue), "dialogue", "web") == [[clean_text(d, "web") for d in docs[:2]]]
    assert read_turns(str(dialogue), "dialogue") == [[d.replace("\x00", "") for d in docs[:2]]]


def test_progress_bar_shows_elapsed_eta_and_counts(tmp_path, capsys, caplog, monkeypatch):
    write_jsonl(str(tmp_path / "in.jsonl"), [make_doc(i) for i in range(30)])
    prefix = str(tmp_path / "p")
    assert preprocess_data.main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", prefix, "--progress"]) == 0
    err = capsys.readouterr().err
    assert re.search(
        r"preprocess 100%\|.*\| [\d.]+kB/[\d.]+kB \[\d\d:\d\d<\d\d:\d\d, [\d.]+[kMG]?B/s, "  # rate: any unit
        r"30 docs, 30 kept, [\d.]+k tokens\]",
        err,
    ), err
    # Without a terminal: a log line with the same figures (every LOG_SECONDS; 0 here).
    monkeypatch.setattr(progress_mod, "LOG_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="preprocess_data"):
        assert preprocess_data.main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", prefix]) == 0
    assert re.search(
        r"read [\d.]+ of [\d.]+ MB \(100%\), 30 docs, 30 kept, [\d.]+k tokens, "
        r"elapsed \d\d:\d\d, ETA 00:00, [\d.]+ MB/s",
        caplog.text,
    ), caplog.text


def test_input_position_follows_compressed_bytes(tmp_path):
    import gzip

    write_jsonl(str(tmp_path / "a.jsonl.gz"), [make_doc(i) for i in range(200)], gzip.open)
    path = str(tmp_path / "a.jsonl.gz")
    position = InputPosition([path])
    seen = [position.bytes_read for _ in iter_records([path], ["text"], position)]
    assert seen[0] < seen[-1] <= position.total and seen == sorted(seen)
    assert position.bytes_read == position.total  # file finished
