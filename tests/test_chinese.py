"""GPT2-Chinese / GPT2-chitchat support: WordPiece training on Chinese text (one token per Han
character, round trip), BERT vocab.txt under Megatron's names == transformers' BertTokenizerFast,
Chinese-readable decoding, the layout tokens ([MASK] ... [CLS], newline = [SEP]) through
preprocessing and inspection, chitchat text == jsonl dialogue samples, the demo corpus builder."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from megagpt2.config import ConfigError, load_config
from megagpt2.config_checks import validate
from megagpt2.data.finetune import build_finetune_datasets
from megagpt2.data.indexed import IndexedDataset
from megagpt2.tokenizer import TokenizerError, build_tokenizer
from megagpt2.tokenizer.wordpiece import is_cjk, join_wordpieces
from tools import inspect_dataset, make_zh_corpus, preprocess_data, train_tokenizer

# Public-domain poems and mixed Chinese/English/number lines, written as the decoder writes them
# (lower-case English, no spaces next to CJK characters).
POEMS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "红豆生南国，春来发几枝。愿君多采撷，此物最相思。",
    "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。",
    "《静夜思》李白，《春晓》孟浩然。",
]
MIXED = [
    "我在2024年读了3本书，最喜欢《三体》。",
    "他说：“你好！”然后用python写了100行代码。",
    'gpt-2 has 1,500 million parameters, and it\'s 3.14 times "better" (they say).',
    "价格是$25，折扣50%，时间12:30。",
]
FIXTURE = POEMS + MIXED


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    """tools/train_tokenizer.py --type wordpiece on the fixture: (dir, HFTokenizer of tokenizer.json)."""
    root = tmp_path_factory.mktemp("wp")
    corpus = root / "zh.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in FIXTURE * 3), encoding="utf-8"
    )
    assert (
        train_tokenizer.main(
            [
                "--type",
                "wordpiece",
                "--input",
                str(corpus),
                "--vocab-size",
                "400",
                "--output-dir",
                str(root / "tok"),
                "--quiet",
            ]
        )
        == 0
    )
    return root / "tok", build_tokenizer("HFTokenizer", tokenizer_model=str(root / "tok" / "tokenizer.json"))


def test_wordpiece_gives_one_token_per_han_character_and_round_trips(wordpiece):
    out, tok = wordpiece
    vocab = (out / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(vocab) == tok.vocab_size
    for text in POEMS:
        ids = tok.encode(text)
        assert [vocab[i] for i in ids] == list(text)  # each character, punctuation too, is one token
        assert tok.unk not in ids
    for text in FIXTURE:
        assert tok.decode(tok.encode(text)) == text
    # the same vocabulary read from vocab.txt gives the same ids
    bert = build_tokenizer("BertWordPieceLowerCase", vocab_file=str(out / "vocab.txt"))
    assert [bert.encode(t) for t in FIXTURE] == [tok.encode(t) for t in FIXTURE]
    assert (bert.eod, bert.pad, bert.unk) == (tok.eod, tok.pad, tok.unk) == (3, 0, 1)


def test_decoding_writes_chinese_without_spaces(wordpiece):
    _, tok = wordpiece
    text = POEMS[0] + MIXED[0]
    library = tok.backend.decode(tok.encode(text))
    assert re.search(r"[\u4e00-\u9fff] [\u4e00-\u9fff]", library)  # what the usual decoder writes
    ours = tok.decode(tok.encode(text))
    assert ours == text and not re.search(r"[\u4e00-\u9fff] [\u4e00-\u9fff]", ours)
    # special tokens: kept by default, dropped for people
    ids = [tok.token_id("[CLS]", "test")] + tok.encode("春眠不觉晓") + [tok.eod]
    assert tok.decode(ids) == "[CLS]春眠不觉晓[SEP]"
    assert tok.decode(ids, skip_special_tokens=True) == "春眠不觉晓"
    assert tok.decode(tok.encode("They  SAY 明月, 故乡 3.14")) == "they say明月,故乡3.14"  # the normalisation


def test_join_wordpieces_rules():
    cases = [
        (["今", "天", "天", "气"], "今天天气"),
        (["play", "##ing", "with", "gpt", "-", "2"], "playing with gpt-2"),
        (["3", ".", "14", "and", "1", ",", "000", "at", "12", ":", "30", "."], "3.14 and 1,000 at 12:30."),
        (["i", "'", "m", "(", "ok", ")", "!"], "i'm (ok)!"),
        (["he", "said", '"', "hi", '"', "to", "me"], 'he said "hi" to me'),
        (["用", "python", "写", "代", "码", "，", "ok", "？"], "用python写代码，ok？"),
        (["##s", "a"], "s a"),  # a window that starts inside a word
    ]
    for tokens, text in cases:
        assert join_wordpieces(tokens) == text, tokens
    assert is_cjk("中") and is_cjk("，") and is_cjk("。") and not is_cjk("a") and not is_cjk(",")


def test_bert_vocab_txt_equals_transformers_bert_tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    corpus = tmp_path / "cased.txt"
    corpus.write_text(
        "\n".join(FIXTURE + ["Hello HELLO hello Café CAFÉ résumé Beijing 北京 München"]) * 3, encoding="utf-8"
    )
    assert (
        train_tokenizer.main(
            [
                "--type",
                "wordpiece",
                "--no-lowercase",
                "--input",
                str(corpus),
                "--vocab-size",
                "500",
                "--output-dir",
                str(tmp_path / "tok"),
                "--quiet",
            ]
        )
        == 0
    )
    vocab = str(tmp_path / "tok" / "vocab.txt")
    texts = ["Hello HELLO Café résumé 北京München", "  床前\t明月光 \n Beijing!", MIXED[1], MIXED[2]]
    got = {}
    for name, lower in (("BertWordPieceLowerCase", True), ("BertWordPieceCase", False)):
        ours = build_tokenizer(name, vocab_file=vocab)
        reference = BertTokenizerFast(vocab=vocab, do_lower_case=lower)
        got[name] = [ours.encode(t) for t in texts]
        assert got[name] == [reference(t, add_special_tokens=False)["input_ids"] for t in texts], name
        assert ours.identity()["type"] == name and ours.eod == reference.sep_token_id
    assert got["BertWordPieceLowerCase"] != got["BertWordPieceCase"]  # the names really differ


def test_layout_tokens_names_and_errors(wordpiece):
    out, tok = wordpiece
    vocab = str(out / "vocab.txt")
    zh = build_tokenizer(
        "BertWordPieceLowerCase", vocab_file=vocab, bos_token="[MASK]", eod_token="[CLS]", newline_token="[SEP]"
    )
    assert (zh.bos, zh.eod, zh.newline) == (4, 2, 3)
    text = "《静夜思》\n床前明月光，\n\n疑是地上霜。"
    ids = zh.encode(text)
    assert ids.count(3) == 3 and zh.encode_batch([text, "明月"]) == [ids, zh.encode("明月")]
    assert zh.decode(ids) == text and zh.decode([4] + ids + [2], skip_special_tokens=True) == text
    assert zh.identity()["bos"] == 4 and zh.identity()["newline"] == 3 and "bos" not in tok.identity()
    assert zh.encode("[CLS]床前")[0] == zh.token_id("[CLS]", "x")  # a prompt may start with [CLS]
    alias = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(out / "tokenizer.json"))
    assert alias.encode(text) == tok.encode(text) and alias.identity() == tok.identity()
    with pytest.raises(TokenizerError, match=r"newline-token '\[SEP\]' is also the end-of-document"):
        build_tokenizer("BertWordPieceLowerCase", vocab_file=vocab, newline_token="[SEP]")
    with pytest.raises(TokenizerError, match=r"'<s>' \(--bos-token\) is not a token"):
        build_tokenizer("BertWordPieceCase", vocab_file=vocab, bos_token="<s>")
    with pytest.raises(TokenizerError, match="BertWordPieceCase does not read --tokenizer-model"):
        build_tokenizer("BertWordPieceCase", vocab_file=vocab, tokenizer_model=vocab)
    with pytest.raises(TokenizerError, match=r"is JSON, not a BERT vocab\.txt"):
        build_tokenizer("BertWordPieceLowerCase", vocab_file=str(out / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="required: pass it with --vocab-file"):
        build_tokenizer("BertWordPieceLowerCase")


def test_config_takes_the_new_names_without_quotes():
    cfg = load_config(
        None,
        [
            "--tokenizer.tokenizer_type=BertWordPieceLowerCase",
            "--tokenizer.bos_token=[MASK]",
            "--tokenizer.eod_token=[CLS]",
            "--tokenizer.newline_token=[SEP]",
            "--data.format=chitchat",
            "--model.n_positions=64",
            "--data.seq_length=64",
        ],
    )
    validate(cfg)
    assert (cfg.tokenizer.bos_token, cfg.tokenizer.eod_token, cfg.tokenizer.newline_token) == (
        "[MASK]",
        "[CLS]",
        "[SEP]",
    )
    for name in ("HuggingFaceTokenizer", "BertWordPieceCase"):
        validate(
            load_config(None, [f"--tokenizer.tokenizer_type={name}", "--model.n_positions=64", "--data.seq_length=64"])
        )
    with pytest.raises(ConfigError, match="data.format='chit' is not one of"):
        validate(load_config(None, ["--data.format=chit"]))


def test_chitchat_text_equals_jsonl_dialogue(tmp_path, wordpiece):
    out, _ = wordpiece
    tok = build_tokenizer("BertWordPieceLowerCase", vocab_file=str(out / "vocab.txt"), bos_token="[CLS]")
    dialogues = [[c + "，" for c in p.split("，")[:3]] for p in POEMS] + [["你好", "你好！"], ["只有一句"]]
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dialogues), encoding="utf-8"
    )
    # chitchat's train.txt: a line per utterance, a blank line between dialogues (CRLF here)
    (tmp_path / "train.txt").write_bytes("\r\n\r\n".join("\r\n".join(d) for d in dialogues).encode("utf-8"))
    with pytest.warns(UserWarning, match="skipped 1 dialogue"):
        a = build_finetune_datasets(str(tmp_path / "d.jsonl"), "dialogue", tok, 24, "4,1,0", 7, 20, 4)
    with pytest.warns(UserWarning, match="skipped 1 dialogue"):
        b = build_finetune_datasets(str(tmp_path / "train.txt"), "chitchat", tok, 24, "4,1,0", 7, 20, 4)
    for x, y in zip(a, b):
        assert len(x) == len(y) > 0
        for i in range(len(x)):
            assert np.array_equal(x[i]["tokens"], y[i]["tokens"]) and np.array_equal(
                x[i]["loss_mask"], y[i]["loss_mask"]
            )
    # GPT2-chitchat's layout: [CLS] u1 [SEP] u2 [SEP] ..., loss on the replies and their [SEP]
    sample = next(b[0][i] for i in range(len(b[0])) if tok.decode(b[0][i]["tokens"][1:3]) == "你好")
    cls, sep = tok.token_id("[CLS]", "x"), tok.eod
    n = 1 + 2 + 1 + 3 + 1
    assert sample["tokens"][:n].tolist() == [cls] + tok.encode("你好") + [sep] + tok.encode("你好！") + [sep]
    assert sample["loss_mask"][:n].tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and sample["loss_mask"][n:].sum() == 0


def test_preprocess_and_inspect_in_gpt2_chinese_layout(tmp_path, wordpiece, capsys):
    out, _ = wordpiece
    corpus = tmp_path / "zh.jsonl"
    docs = ["《静夜思》\n" + POEMS[0], "《春晓》\n" + POEMS[1]]
    corpus.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    flags = [
        "--tokenizer-type",
        "BertWordPieceLowerCase",
        "--vocab-file",
        str(out / "vocab.txt"),
        "--bos-token",
        "[MASK]",
        "--eod-token",
        "[CLS]",
        "--newline-token",
        "[SEP]",
    ]
    prefix = str(tmp_path / "zh")
    assert (
        preprocess_data.main(
            [
                "--input",
                str(corpus),
                "--output-prefix",
                prefix,
                "--append-eod",
                "--prepend-bos",
                "--no-fix-unicode",
                "--no-progress",
                "--no-dedup",
            ]
            + flags
        )
        == 0
    )
    ds = IndexedDataset(prefix + "_text_document")
    first = ds.document(0).tolist()
    assert first[0] == 4 and first[-1] == 2 and first.count(3) == 1  # [MASK] ... [CLS], newline = [SEP]
    capsys.readouterr()
    assert inspect_dataset.main(["--prefix", prefix + "_text_document", "--doc", "0", "--doc", "1"] + flags) == 0
    printed = capsys.readouterr().out
    assert docs[0] in printed and docs[1] in printed and "[CLS]" not in printed
    assert inspect_dataset.main(["--prefix", prefix + "_text_document", "--doc", "0", "--show-special"] + flags) == 0
    assert "[MASK]《静夜思》\n床前" in capsys.readouterr().out
    assert (
        preprocess_data.main(
            [
                "--input",
                str(corpus),
                "--output-prefix",
                prefix + "x",
                "--prepend-bos",
                "--tokenizer-type",
                "BertWordPieceLowerCase",
                "--vocab-file",
                str(out / "vocab.txt"),
            ]
        )
        == 1
    )  # --prepend-bos without --bos-token


def test_train_tokenizer_wordpiece_flag_errors(tmp_path, capsys):
    corpus = tmp_path / "t.txt"
    corpus.write_text(POEMS[0], encoding="utf-8")
    for extra in (
        ["--output-prefix", str(tmp_path / "p")],
        ["--output-dir", str(tmp_path / "d"), "--model-type", "unigram"],
    ):
        with pytest.raises(SystemExit) as info:
            train_tokenizer.main(["--type", "wordpiece", "--input", str(corpus)] + extra)
        assert info.value.code == 2
    err = capsys.readouterr().err
    assert "give --output-dir" in err and "--model-type: SentencePiece option" in err


def test_make_zh_corpus_from_fortune_files(tmp_path):
    src = tmp_path / "fortunes"
    src.mkdir()
    tang = "\x1b[32m《静夜思》\x1b[m\n\x1b[33m作者：李白\x1b[m\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n%\n"
    (src / "tang300").write_text(tang, encoding="utf-8")
    (src / "song100").write_text("题目:《春晓》\n春眠不觉晓，处处闻啼鸟。\n%\n", encoding="utf-8")
    (src / "chinese").write_text(
        "Use apt-get install foo to install foo on Debian.\n%\n狗咬穿烂的，人舔穿好的。\n    --《谚语》\n%\n",
        encoding="utf-8",
    )
    info = make_zh_corpus.make_zh_corpus(str(tmp_path / "out"), str(tmp_path / "cache"), str(src), max_turns=2)
    assert info["documents"] == 3  # the English entry is left out
    texts = {json.loads(line)["text"] for line in (tmp_path / "out" / "pretrain.jsonl").open(encoding="utf-8")}
    assert "《静夜思》\n作者：李白\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。" in texts
    from megagpt2.data.finetune import read_chitchat

    chats = read_chitchat(str(tmp_path / "out" / "chat.txt"))
    assert sorted(chats) == sorted(
        [
            ["床前明月光，", "疑是地上霜。"],
            ["举头望明月，", "低头思故乡。"],
            ["春眠不觉晓，", "处处闻啼鸟。"],
            ["狗咬穿烂的，", "人舔穿好的。"],
        ]
    )
    assert (
        make_zh_corpus.main(
            ["--output-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), "--fortunes-dir", str(tmp_path)]
        )
        == 1
    )
