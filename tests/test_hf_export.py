"""`tools/convert_checkpoint.py --to hf` writes a complete folder: transformers' AutoTokenizer and
AutoModelForCausalLM read it with nothing else, encode as megagpt2 does, and greedy `generate`
gives the tokens tools/generate.py gives."""

from __future__ import annotations

import json

import pytest
import torch

from megagpt2.interop.hf_tokenizer import PROBES, check_tokenizer_export
from tools import convert_checkpoint
from tools import generate as generate_tool


def test_folder_is_complete(trained):
    from pathlib import Path

    hf = Path(trained["hf"])
    names = {p.name for p in hf.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
    } <= names
    eod = trained["tok"].eod
    assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] == eod
    assert json.loads((hf / "config.json").read_text())["eos_token_id"] == eod
    assert (hf / "merges.txt").read_text().startswith("#version")


def test_autotokenizer_encodes_as_megagpt2(trained):
    from transformers import AutoTokenizer

    hf, tok = AutoTokenizer.from_pretrained(trained["hf"]), trained["tok"]
    for text in PROBES + ("a <|endoftext|> inside text",):
        assert hf(text)["input_ids"] == tok.encode(text)
        assert hf.decode(tok.encode(text)) == text
    assert hf.eos_token_id == hf.bos_token_id == tok.eod
    assert check_tokenizer_export(tok, trained["hf"]) is None


def test_transformers_generate_equals_tools_generate(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = ["Q: what is the apple?\nA:", "apple river stone = pomme", "The music"]
    out = tmp_path / "gen.jsonl"
    flags = [x for p in prompts for x in ("--prompt", p)]
    assert (
        generate_tool.main(
            [
                "--load",
                trained["ckpt"],
                "--greedy",
                "--max-new-tokens",
                "12",
                "--batch-size",
                "2",
                "--output",
                str(out),
                *flags,
            ]
        )
        == 0
    )
    ours = [json.loads(x)["tokens"] for x in out.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(trained["hf"])
    model = AutoModelForCausalLM.from_pretrained(trained["hf"]).eval()
    for prompt, want in zip(prompts, ours):
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            got = model.generate(**ids, do_sample=False, max_new_tokens=12)  # stops at generation_config's eos
        assert got[0, ids["input_ids"].shape[1] :].tolist() == want
    assert len({tuple(t) for t in ours}) == 3 and any(len(set(t)) > 2 for t in ours)  # not one token repeated
    assert any(t[-1] == trained["tok"].eod and len(t) < 12 for t in ours)  # both stopped at the end of document


def _wordpiece_json(path) -> str:
    """A BERT-style tokenizer.json: WordPiece with the [CLS] ... [SEP] post-processor."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    texts = ["the apple river, stone music!", "中文 的 句子 。", "garden window silver"] * 20
    tk.train_from_iterator(texts, trainer)
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tk.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tiny_bert_ckpt(tmp_path_factory):
    from megagpt2.checkpoint.reshard import default_sharding, write_converted
    from megagpt2.config import Config
    from megagpt2.model import GPT2
    from megagpt2.parallel import ProcessGroups
    from megagpt2.tokenizer import build_tokenizer

    tmp = tmp_path_factory.mktemp("bert")
    tok = build_tokenizer("HFTokenizer", tokenizer_model=_wordpiece_json(tmp / "tokenizer.json"))
    cfg = Config()
    cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head, cfg.model.n_positions = 1, 16, 2, 32
    cfg.model.vocab_size = tok.vocab_size
    cfg.tokenizer.tokenizer_type, cfg.tokenizer.tokenizer_model = "HFTokenizer", str(tmp / "tokenizer.json")
    model = GPT2(cfg.model, ProcessGroups.single(), seed=0)
    full = {k: v.detach() for k, v in model.state_dict().items()}
    meta = {"config": cfg.to_dict(), "tokenizer": tok.identity(), "step": 1}
    write_converted(full, default_sharding(full), meta, str(tmp / "ckpt"), tp=1)
    return tmp, tok


def test_hf_tokenizer_json_export_adds_no_cls_sep(tiny_bert_ckpt, capsys):
    from transformers import AutoTokenizer

    tmp, tok = tiny_bert_ckpt
    assert convert_checkpoint.main(["--input", str(tmp / "ckpt"), "--output", str(tmp / "hf"), "--to", "hf"]) == 0
    assert "warning" not in capsys.readouterr().err
    hf = AutoTokenizer.from_pretrained(str(tmp / "hf"))
    for text in ("the apple river, stone!", "中文的句子。", "a [SEP] inside"):
        assert hf(text)["input_ids"] == tok.encode(text)
        assert hf.cls_token_id is None or hf.cls_token_id not in hf(text)["input_ids"][:1]
    assert hf.eos_token == "[SEP]" and hf.pad_token == "[PAD]" and hf.unk_token == "[UNK]"
    assert json.loads((tmp / "hf" / "generation_config.json").read_text())["eos_token_id"] == tok.eod


def test_export_refuses_a_tokenizer_of_another_vocabulary(tiny_bert_ckpt, tmp_path, capsys):
    tmp, _ = tiny_bert_ckpt
    assert (
        convert_checkpoint.main(
            [
                "--input",
                str(tmp / "ckpt"),
                "--output",
                str(tmp_path / "x"),
                "--to",
                "hf",
                "--tokenizer-type",
                "GPT2BPETokenizer",
            ]
        )
        == 2
    )
    assert "tokenizer does not match" in capsys.readouterr().err


def test_sentencepiece_export_encodes_as_megagpt2(tmp_path):
    """A SentencePiece BPE model as tools/train_tokenizer.py trains it (identity normalisation,
    whitespace kept, byte fallback): tokenizer.model plus a tokenizer.json that agrees."""
    import random

    import sentencepiece
    from transformers import AutoTokenizer

    from megagpt2.interop.hf_tokenizer import save_hf_tokenizer
    from megagpt2.tokenizer import build_tokenizer
    from tests.eval_fixtures import WORDS

    rng = random.Random(0)
    (tmp_path / "c.txt").write_text(
        "".join(" ".join(rng.choice(WORDS) for _ in range(8)) + "  and\tthen.\n" for _ in range(2000))
    )
    sentencepiece.SentencePieceTrainer.Train(
        input=str(tmp_path / "c.txt"),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=290,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
    )
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "sp.model"))
    save_hf_tokenizer(tok, str(tmp_path / "hf"), 64)
    assert (tmp_path / "hf" / "tokenizer.model").is_file()
    assert check_tokenizer_export(tok, str(tmp_path / "hf"), PROBES + ("  two leading", "end  ", "x</s>y")) is None
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf.eos_token_id == tok.eod and hf.decode(tok.encode(PROBES[1])) == PROBES[1]
