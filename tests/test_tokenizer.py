"""Tokenizer tests: GPT-2 BPE against an independent Hugging Face reference, SentencePiece
training + round trip, tokenizer.json loading, identities and error messages."""

from __future__ import annotations

import argparse
import json
import pickle
import random
from pathlib import Path

import pytest
import tiktoken.load
from tokenizers import Tokenizer as HFLibTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from megagpt2.tokenizer import (
    TOKENIZER_TYPES,
    TokenizerError,
    add_tokenizer_args,
    build_tokenizer,
    check_same_identity,
    tokenizer_from_args,
)
from megagpt2.tokenizer.gpt2_bpe import (
    GPT2_ENCODER_JSON_SHA256,
    GPT2_VOCAB_BPE_SHA256,
    bpe_ranks_from_files,
    default_gpt2_files,
)
from tools import train_tokenizer

VARIED_TEXT = (
    "Hello world! It's a test: we've got 3 cats, they're 'fine', I'm sure you'll see, he'd agree.\n"
    "Numbers 0 1 12 123 1234 12345 3.14159 -42 1e10 0x1F 2024-11-28 $1,000,000.00 50% 1/2\n"
    "Accents: café naïve résumé façade Ångström Øresund Düsseldorf São Paulo señor piñata\n"
    "Decomposed: e\u0301 a\u0308 n\u0303; ligature \ufb01 ; NBSP[\u00a0] ZWSP[\u200b] LS[\u2028]\n"
    "CJK: 日本語のテキストです。中文文本，包括标点符号！한국어 텍스트도 있습니다.\n"
    "Cyrillic: Привет, мир! Greek: Καλημέρα κόσμε. Arabic: مرحبا بالعالم Hebrew: שלום עולם\n"
    "Emoji: 😀 🚀 👍🏽 👩\u200d👩\u200d👧 🇫🇷 ❤️ — “curly quotes” ‘single’ «guillemets» …\n"
    "Whitespace runs:    four spaces,\t\ttwo tabs,\n\n\nthree newlines,  \t \n mixed \r\n CRLF.\n"
    "   leading spaces and trailing spaces   \n"
    "def f(x):\n    return x ** 2  # code with indentation\n\tif x: pass\n"
    "<|endoftext|> appears literally, as does <|startoftext|> and <s></s>.\n"
    "URLs: https://example.com/path?q=1&r=2#frag user@example.org C:\\Windows\\System32\n"
    "Mixed: ABCdef123ghiJKL don't DON'T Don't o'clock rock'n'roll 'tis y'all\n"
    "Math: ∑_{i=1}^{n} x_i² ≤ ∞, ∀ε>0 ∃δ>0; α+β=γ; √2 ≈ 1.414\n"
)


def random_strings(count: int, seed: int = 0) -> list[str]:
    """Short strings of characters and fragments that stress the split regex and byte mapping."""
    rng = random.Random(seed)
    pool = list("abcXYZ éüñ日本語한😀👍🏽 \t\n\r\u00a0\u2028\u200b'sdmtlvre0123456789.,;:!?-_()<>|\"/\\#$")
    pool += ["'s", "'ll", "'ve", "   ", "\n\n", "<|endoftext|>", " the", " world", "e\u0301"]
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 30))) for _ in range(count)]


@pytest.fixture(scope="module")
def gpt2():
    return build_tokenizer("GPT2BPETokenizer")


@pytest.fixture(scope="module")
def hf_gpt2_model():
    """Hugging Face BPE model built from the same files (the independent reference)."""
    vocab, merges = default_gpt2_files()
    return models.BPE.from_file(vocab, merges)


def hf_byte_level(model) -> HFLibTokenizer:
    tok = HFLibTokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


# ---------------------------------------------------------------- GPT-2 BPE


def test_gpt2_known_ids_and_sizes(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.vocab_size == 50257
    assert gpt2.eod == 50256
    assert gpt2.pad is None
    assert gpt2.decode([50256]) == "<|endoftext|>"
    # worker processes may receive the tokenizer pickled (spawn start method)
    assert pickle.loads(pickle.dumps(gpt2)).encode("Hello world") == [15496, 995]


def test_gpt2_matches_hugging_face_reference(gpt2, hf_gpt2_model):
    reference = hf_byte_level(hf_gpt2_model)
    texts = [VARIED_TEXT, VARIED_TEXT * 3] + VARIED_TEXT.split("\n") + random_strings(1500)
    assert sum(map(len, texts)) > 5000
    ours = gpt2.encode_batch(texts)
    theirs = [e.ids for e in reference.encode_batch(texts, add_special_tokens=False)]
    for text, a, b in zip(texts, ours, theirs):
        assert a == b, f"mismatch on {text!r}"
        assert gpt2.encode(text) == a
        assert gpt2.decode(a) == text
    assert reference.decode(ours[0]) == VARIED_TEXT


def test_gpt2_endoftext_in_text_is_ordinary_text(gpt2):
    ids = gpt2.encode("a<|endoftext|>b")
    assert gpt2.eod not in ids
    assert gpt2.decode(ids) == "a<|endoftext|>b"


def test_gpt2_hf_style_files_give_same_tokenizer(tmp_path, gpt2, hf_gpt2_model):
    # vocab.json + merges.txt written by the tokenizers library: the other file style
    vocab_json, merges_txt = hf_gpt2_model.save(str(tmp_path))
    hf_style = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_json, merge_file=merges_txt)
    assert (hf_style.vocab_size, hf_style.eod) == (50257, 50256)
    assert hf_style.encode_batch([VARIED_TEXT]) == gpt2.encode_batch([VARIED_TEXT])
    assert hf_style.identity()["files"].keys() == {"vocab_file", "merge_file"}


def test_gpt2_merges_without_header_or_final_newline(tmp_path):
    vocab, merges = default_gpt2_files()
    with open(merges, encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines[0].startswith("#version")
    bare = tmp_path / "merges.txt"
    bare.write_text("\n".join(lines[1:]).rstrip("\n"), encoding="utf-8")
    assert bpe_ranks_from_files(vocab, str(bare)) == bpe_ranks_from_files(vocab, merges)


def test_gpt2_ranks_equal_tiktoken_loader(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the local files directly, no cache copy
    vocab, merges = default_gpt2_files()
    ranks, specials = bpe_ranks_from_files(vocab, merges)
    assert ranks == tiktoken.load.data_gym_to_mergeable_bpe_ranks(merges, vocab)
    assert specials == {"<|endoftext|>": 50256}


def test_default_files_are_openai_originals(gpt2):
    identity = gpt2.identity()
    assert identity == {
        "type": "GPT2BPETokenizer",
        "vocab_size": 50257,
        "eod": 50256,
        "files": {"vocab_file": GPT2_ENCODER_JSON_SHA256, "merge_file": GPT2_VOCAB_BPE_SHA256},
    }


# ---------------------------------------------------------------- SentencePiece


def write_corpus(tmp_path) -> str:
    rng = random.Random(1)
    syllables = "ka lo mi nu se ta re po vi da ge hu an ol ir ex qu zy".split()
    words = "the quick brown fox jumps over a lazy dog café naïve über 東京 1234 it's".split()
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    path = tmp_path / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(200):
            lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 20))) for _ in "ab"]
            f.write(json.dumps({"id": i, "body": "\n".join(lines)}) + "\n")
    return str(path)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_train_load_round_trip(tmp_path, capsys, model_type):
    corpus = write_corpus(tmp_path)
    prefix = str(tmp_path / "out" / "spm")
    rc = train_tokenizer.main(
        [
            "--input",
            str(tmp_path / "*.jsonl"),
            "--json-key",
            "body",
            "--vocab-size",
            "320",
            "--model-type",
            model_type,
            "--output-prefix",
            prefix,
            "--num-threads",
            "1",
        ]
    )
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=prefix + ".model")
    assert tok.vocab_size == 320
    assert tok.eod == 2 and tok.decode([tok.eod]) == ""
    text = "  the quick\tfox\n\nüber 東京 ZZ 😀 unseen ∑  "  # unseen chars go through byte fallback
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "a dog"]) == [ids, tok.encode("a dog")]
    with open(corpus, encoding="utf-8") as f:
        first = json.loads(f.readline())["body"]
    assert tok.decode(tok.encode(first)) == first
    assert tok.identity()["files"].keys() == {"tokenizer_model"}
    assert pickle.loads(pickle.dumps(tok)).encode(text) == ids


# ---------------------------------------------------------------- Hugging Face tokenizer.json


def make_wordpiece_json(tmp_path) -> tuple[str, HFLibTokenizer]:
    tok = HFLibTokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "A lazy dog sleeps all day.",
        "Quick thinking wins the day, said the fox!",
    ] * 5
    tok.train_from_iterator(sentences, trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    return path, tok


def test_hf_tokenizer_json_round_trip(tmp_path):
    path, reference = make_wordpiece_json(tmp_path)
    tok = build_tokenizer("HFTokenizer", tokenizer_model=path)
    text = "The lazy fox sleeps, quick dog!"
    ids = tok.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False).ids  # no [CLS]/[SEP] added
    assert tok.encode_batch([text, "dog"]) == [ids, tok.encode("dog")]
    assert tok.decode(ids) == "the lazy fox sleeps, quick dog!"  # lower-cased by BertNormalizer
    assert tok.eod == reference.token_to_id("[SEP]") == 3
    assert tok.pad == reference.token_to_id("[PAD]") == 0
    assert tok.vocab_size == reference.get_vocab_size()
    assert tok.decode([tok.eod]) == "[SEP]"
    assert pickle.loads(pickle.dumps(tok)).encode(text) == ids


def test_hf_tokenizer_declared_eod_and_missing_eod(tmp_path):
    path, reference = make_wordpiece_json(tmp_path)
    assert build_tokenizer("HFTokenizer", tokenizer_model=path, eod_token="[CLS]").eod == 2
    with pytest.raises(TokenizerError, match=r"no end-of-document token.*--eod-token"):
        build_tokenizer("HFTokenizer", tokenizer_model=path, eod_token="<nope>")


# ---------------------------------------------------------------- args, identity, errors


def test_tokenizer_from_args_and_identity_check(tmp_path):
    parser = argparse.ArgumentParser()
    add_tokenizer_args(parser)
    path, _ = make_wordpiece_json(tmp_path)
    args = parser.parse_args(["--tokenizer-type", "HFTokenizer", "--tokenizer-model", path])
    tok = tokenizer_from_args(args)
    saved = tok.identity()
    check_same_identity(saved, tokenizer_from_args(args).identity())  # same files: accepted
    changed = dict(saved, vocab_size=saved["vocab_size"] + 1)
    with pytest.raises(TokenizerError, match=r"vocab_size: checkpoint has \d+, now \d+"):
        check_same_identity(changed, saved)


def test_unknown_type_lists_valid_types():
    with pytest.raises(TokenizerError) as info:
        build_tokenizer("BertTokenizer")
    assert "'BertTokenizer'" in str(info.value)
    assert all(name in str(info.value) for name in TOKENIZER_TYPES)


def test_gpt2_file_errors(tmp_path):
    vocab, merges = default_gpt2_files()
    with pytest.raises(TokenizerError, match="without --vocab-file"):
        build_tokenizer("GPT2BPETokenizer", merge_file=merges)
    with pytest.raises(TokenizerError, match="without --merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab)
    missing = str(tmp_path / "nope.json")
    with pytest.raises(TokenizerError, match=r"not found: '.*nope\.json' \(given by --vocab"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=missing, merge_file=merges)
    with pytest.raises(TokenizerError, match="swap"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=merges, merge_file=vocab)
    with pytest.raises(TokenizerError, match="does not read --tokenizer-model"):
        build_tokenizer("GPT2BPETokenizer", tokenizer_model=vocab)
    with pytest.raises(TokenizerError, match=r"cannot decode id 50257 at position 1"):
        build_tokenizer().decode([1, 50257])


def test_model_file_errors(tmp_path):
    with pytest.raises(TokenizerError, match="required: pass it with --tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer")
    with pytest.raises(TokenizerError, match="HFTokenizer does not read --vocab-file"):
        build_tokenizer("HFTokenizer", vocab_file="tokenizer.json")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="is not a SentencePiece model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(junk))
    vocab, _ = default_gpt2_files()
    with pytest.raises(TokenizerError, match="plain vocabulary.*GPT2BPETokenizer"):
        build_tokenizer("HFTokenizer", tokenizer_model=vocab)


def test_train_tokenizer_reads_compressed_inputs(tmp_path):
    """Every supported compression yields the same sentences as the plain file, jsonl and text."""
    from megagpt2.corpus.readers import open_compressed

    corpus = write_corpus(tmp_path)
    raw = Path(corpus).read_bytes()
    text = tmp_path / "plain.txt"
    text.write_text(VARIED_TEXT, encoding="utf-8")
    want_json = list(train_tokenizer.SentenceStream([corpus], "auto", "body", quiet=True))
    want_text = list(train_tokenizer.SentenceStream([str(text)], "auto", "body", quiet=True))
    assert want_json and want_text
    for ext in (".gz", ".bz2", ".xz", ".zst"):
        for src, data, want in ((corpus, raw, want_json), (str(text), text.read_bytes(), want_text)):
            packed = str(tmp_path / (Path(src).name + ext))
            with open_compressed(packed, "wb") as f:
                f.write(data)
            got = list(train_tokenizer.SentenceStream([packed], "auto", "body", quiet=True))
            assert got == want, packed


def test_train_tokenizer_errors(tmp_path, capsys):
    prefix = str(tmp_path / "spm")
    with pytest.raises(SystemExit) as info:
        train_tokenizer.main(["--input", str(tmp_path / "*.txt"), "--output-prefix", prefix])
    assert info.value.code == 2
    assert "matches no file" in capsys.readouterr().err
    corpus = write_corpus(tmp_path)
    with pytest.raises(SystemExit, match=r"corpus\.jsonl:1: no field 'text'.*--json-key"):
        train_tokenizer.main(["--input", corpus, "--output-prefix", prefix, "--quiet"])
    with pytest.raises(SystemExit, match=r"(?s)Vocabulary size too high.*--vocab-size"):
        train_tokenizer.main(
            ["--input", corpus, "--json-key", "body", "--vocab-size", "5000", "--output-prefix", prefix, "--quiet"]
        )
