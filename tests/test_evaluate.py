"""Evaluation: sliding-window perplexity, LAMBADA and multiple choice equal an independent
computation with transformers' GPT2LMHeadModel on the exported model; windows score every token
once; few-shot prompts are seeded; bad inputs give clear errors."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F

from megagpt2.config import Config
from megagpt2.eval import fewshot_prefix, load_model, sliding_windows, stream_nll
from megagpt2.model import GPT2
from megagpt2.parallel import ProcessGroups
from tools import evaluate as evaluate_tool

WORDS = (
    "apple river stone music garden window silver morning winter candle forest letter quiet "
    "bright journey ocean mountain paper yellow whisper"
).split()
REL = 1e-4


def tiny_gpt2(vocab: int = 50257, n_positions: int = 64, seed: int = 3) -> GPT2:
    cfg = Config().model
    cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions, cfg.vocab_size = 2, 32, 4, n_positions, vocab
    cfg.dropout = cfg.attn_dropout = 0.0
    model = GPT2(cfg, ProcessGroups.single(), seed=seed)
    with torch.no_grad():  # peaky predictions, so scoring the wrong token would show
        model.wte.weight.mul_(5.0)
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An exported model, transformers' copy of it, the GPT-2 tokenizer and data files."""
    from transformers import GPT2LMHeadModel

    from megagpt2.interop import save_hf_dir
    from megagpt2.tokenizer import build_tokenizer

    tmp = tmp_path_factory.mktemp("eval")
    model = tiny_gpt2()
    save_hf_dir({k: v.detach() for k, v in model.state_dict().items()}, model.cfg, str(tmp / "hf"))
    hf = GPT2LMHeadModel.from_pretrained(str(tmp / "hf")).eval()
    tok = build_tokenizer()
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))) + "." for _ in range(30))
    (tmp / "text.txt").write_text(text)
    lambada = _lambada_texts(model, tok, rng)
    (tmp / "lambada.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lambada))
    mc = [
        {
            "ctx": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))),
            "endings": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(3)],
            "label": rng.randrange(3),
        }
        for _ in range(8)
    ]
    (tmp / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    return {"tmp": tmp, "model": model, "hf": hf, "tok": tok, "text": text, "lambada": lambada, "mc": mc}


def _lambada_texts(model, tok, rng) -> list[str]:
    """Half the targets are the model's own greedy next word (so accuracy is not trivially 0)."""
    out, hits = [], 0
    while len(out) < 12:
        ctx = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        if len(out) % 2:
            out.append(ctx + " " + rng.choice(WORDS))
            continue
        with torch.no_grad():
            t = int(model(torch.tensor([tok.encode(ctx)]))[0, -1].argmax())
        word = tok.decode([t])
        if re.fullmatch(r" [A-Za-z]{2,}", word) and tok.encode(word) == [t]:
            out.append(ctx + word)
            hits += 1
    assert hits == 6
    return out


def _run(task: str, tmp, *args: str) -> dict:
    out = tmp / f"{task}.json"
    assert evaluate_tool.main([task, "--no-progress", "--output", str(out), *args]) == 0
    return json.loads(out.read_text())["metrics"]


# -- references computed with transformers ------------------------------------------------------
@torch.no_grad()
def hf_sliding_nll(hf, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """Hugging Face's documented loop: windows of window+1 tokens every `stride`; score targets
    not scored by an earlier window."""
    total, count, scored_until = 0.0, 0, 1  # targets are positions >= 1
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + window + 1, len(ids))
        chunk = torch.tensor([ids[begin:end]])
        logits = hf(chunk[:, :-1]).logits[0]
        nll = F.cross_entropy(logits, chunk[0, 1:], reduction="none").double()
        positions = torch.arange(begin + 1, end)
        keep = positions >= scored_until
        total += float(nll[keep].sum())
        count += int(keep.sum())
        scored_until = end
        if end == len(ids):
            break
    return total, count


@torch.no_grad()
def hf_continuation(hf, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([ctx + cont])
    logp = hf(ids[:, :-1]).logits[0].log_softmax(-1)[len(ctx) - 1 :]  # rows predicting cont
    target = torch.tensor(cont)
    return -float(logp.gather(1, target[:, None]).double().sum()), bool((logp.argmax(-1) == target).all())


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * abs(b)


@pytest.mark.parametrize("stride", [32, 12])
def test_ppl_equals_transformers(setup, stride):
    tmp, tok = setup["tmp"], setup["tok"]
    got = _run(
        "ppl",
        tmp,
        "--load",
        str(tmp / "hf"),
        "--input",
        str(tmp / "text.txt"),
        "--window",
        "32",
        "--stride",
        str(stride),
        "--batch-size",
        "3",
    )
    ids = [tok.eod] + tok.encode(setup["text"])
    nll, n = hf_sliding_nll(setup["hf"], ids, 32, stride)
    assert got["tokens"] == n == len(ids) - 1
    assert _close(got["token_ppl"], math.exp(nll / n))
    words = len(setup["text"].split())
    assert got["words"] == words and _close(got["word_ppl"], math.exp(nll / words))


def test_lambada_equals_transformers(setup):
    tmp, tok, hf = setup["tmp"], setup["tok"], setup["hf"]
    got = _run("lambada", tmp, "--load", str(tmp / "hf"), "--input", str(tmp / "lambada.jsonl"), "--batch-size", "5")
    nlls, hits, n_tok = [], [], 0
    for text in setup["lambada"]:
        ctx, word = text.rsplit(" ", 1)
        cont = tok.encode(" " + word)
        nll, ok = hf_continuation(hf, tok.encode(ctx), cont)
        nlls.append(nll)
        hits.append(ok)
        n_tok += len(cont)
    assert 0 < got["accuracy"] < 1 and got["accuracy"] == sum(hits) / len(hits)
    assert _close(got["ppl"], math.exp(sum(nlls) / len(nlls)))
    assert _close(got["token_ppl"], math.exp(sum(nlls) / n_tok))


def test_lambada_fewshot_equals_transformers(setup):
    tmp, tok, hf = setup["tmp"], setup["tok"], setup["hf"]
    got = _run(
        "lambada",
        tmp,
        "--load",
        str(tmp / "hf"),
        "--input",
        str(tmp / "lambada.jsonl"),
        "--num-fewshot",
        "2",
        "--fewshot-seed",
        "9",
    )
    texts = setup["lambada"]
    nlls = []
    for i, text in enumerate(texts):
        ctx, word = text.rsplit(" ", 1)
        prefix = fewshot_prefix(texts, 2, 9, i, i)
        assert text not in prefix.split("\n\n") and prefix.count("\n\n") == 2
        nlls.append(hf_continuation(hf, tok.encode(prefix + ctx), tok.encode(" " + word))[0])
    assert got["num_fewshot"] == 2 and _close(got["ppl"], math.exp(sum(nlls) / len(nlls)))


def test_multiple_choice_equals_transformers(setup):
    tmp, tok, hf = setup["tmp"], setup["tok"], setup["hf"]
    got = _run("multiple_choice", tmp, "--load", str(tmp / "hf"), "--input", str(tmp / "mc.jsonl"))
    acc = acc_norm = 0
    for ex in setup["mc"]:
        scores = []
        for ending in ex["endings"]:
            nll, _ = hf_continuation(hf, tok.encode(ex["ctx"]), tok.encode(" " + ending))
            scores.append((-nll, -nll / len((" " + ending).encode())))
        acc += max(range(3), key=lambda j: scores[j][0]) == ex["label"]
        acc_norm += max(range(3), key=lambda j: scores[j][1]) == ex["label"]
    assert got["acc"] == acc / len(setup["mc"]) and got["acc_norm"] == acc_norm / len(setup["mc"])
    assert got["choices_scored"] == 3 * len(setup["mc"])


# -- windows ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,window,stride", [(2, 4, 4), (10, 4, 4), (11, 4, 1), (100, 16, 5), (97, 16, 16), (5, 16, 3)])
def test_sliding_windows_score_every_token_once(n, window, stride):
    scored = []
    for k, (b, e, m) in enumerate(sliding_windows(n, window, stride)):
        assert b == k * stride and 0 < e - b <= window and 1 <= m <= e - b
        targets = list(range(b + 1, e + 1))[-m:]
        scored += targets
        if k > 0:  # every scored target has at least window - stride + 1 tokens of context
            assert min(t - b for t in targets) >= min(window - stride + 1, e - b)
    assert sorted(scored) == list(range(1, n)) == sorted(set(scored))


def test_stride_equal_to_window_is_plain_chunking(setup):
    model, tok = setup["model"], setup["tok"]
    stream = [tok.eod] + tok.encode(setup["text"])
    W = 16
    nll, n = stream_nll(model, stream, W, W, batch_size=4)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(stream) - 1, W):  # chunk k: inputs s[kW:(k+1)W] -> targets shifted by one
            x = torch.tensor([stream[b : b + W]])
            y = torch.tensor([stream[b + 1 : b + W + 1]])
            x = x[:, : y.shape[1]]
            total += float(model(x, y)) * y.shape[1]
            count += y.shape[1]
    assert n == count == len(stream) - 1
    assert abs(nll - total) <= 1e-6 * total


def test_indexed_dataset_ppl_equals_text_ppl(setup, tmp_path):
    import numpy as np

    from megagpt2.data import IndexedDatasetBuilder

    tmp, tok = setup["tmp"], setup["tok"]
    builder = IndexedDatasetBuilder(str(tmp_path / "d.bin"), np.uint16)
    builder.add_document(np.array(tok.encode(setup["text"]), dtype=np.uint16))
    builder.finalize(str(tmp_path / "d.idx"))
    common = ["--load", str(tmp / "hf"), "--window", "32", "--stride", "12"]
    from_text = _run("ppl", tmp, *common, "--input", str(tmp / "text.txt"))
    from_data = _run("ppl", tmp, *common, "--data-path", str(tmp_path / "d"))
    assert from_data["tokens"] == from_text["tokens"] and "words" not in from_data
    assert abs(from_data["token_ppl"] - from_text["token_ppl"]) <= 1e-9 * from_text["token_ppl"]


def test_detokenizers():
    from megagpt2.eval import detokenize

    assert (
        detokenize("the 1 @,@ 000 @-@ year plan , he said ( again ) .", "wikitext")
        == "the 1,000-year plan, he said (again) ."
    )
    assert detokenize("it 's not there , is n't it", "ptb") == "it's not there, isn't it"
    with pytest.raises(ValueError, match="unknown detokenizer"):
        detokenize("x", "klingon")


def test_fewshot_prefix_is_seeded_and_excludes_the_example():
    pool = [f"ex{i}" for i in range(10)]
    a = fewshot_prefix(pool, 3, seed=1, index=4, exclude=4)
    assert a == fewshot_prefix(pool, 3, seed=1, index=4, exclude=4)
    assert "ex4" not in a.split("\n\n") and a.count("\n\n") == 3
    assert len({fewshot_prefix(pool, 3, seed=s, index=4, exclude=4) for s in range(8)}) > 1
    assert fewshot_prefix(pool, 0, 1, 0, 0) == ""
    with pytest.raises(ValueError, match="pool"):
        fewshot_prefix(pool[:3], 3, seed=1, index=0, exclude=0)


# -- loading megagpt2 checkpoints and bad input ---------------------------------------------------
def _converted(setup, tmp, tokenizer_identity: dict, tp: int = 2) -> str:
    from megagpt2.checkpoint.reshard import default_sharding, write_converted

    model = setup["model"]
    full = {k: v.detach() for k, v in model.state_dict().items()}
    cfg = Config()
    cfg.model = model.cfg
    meta = {"config": cfg.to_dict(), "tokenizer": tokenizer_identity, "step": 7}
    write_converted(full, default_sharding(full), meta, str(tmp), tp)
    return str(tmp)


def test_megagpt2_checkpoint_loads_with_its_tokenizer(setup, tmp_path):
    path = _converted(setup, tmp_path / "ckpt", setup["tok"].identity(), tp=2)
    model, tok, meta = load_model(path)
    assert meta["step"] == 7 and tok.identity() == setup["tok"].identity()
    x = torch.tensor([tok.encode("a quiet morning by the river")])
    with torch.no_grad():
        assert (model(x) - setup["hf"](x).logits).abs().max() < 1e-5


def test_bad_inputs_give_clear_errors(setup, tmp_path, capsys):
    from megagpt2.interop import save_hf_dir

    tmp = setup["tmp"]
    load = ["--load", str(tmp / "hf")]

    def fails(argv, message):
        assert evaluate_tool.main(argv) == 2
        assert message in capsys.readouterr().err

    fails(["lambada", *load, "--input", str(tmp_path / "missing.jsonl")], "does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a fine line"}\n{"text": broken\n')
    fails(["lambada", *load, "--input", str(bad)], "bad.jsonl:2: not valid JSON")
    bad.write_text('{"story": "no text field"}\n')
    fails(["lambada", *load, "--input", str(bad)], "missing field 'text'")
    bad.write_text('{"ctx": "c", "endings": ["a", "b"], "label": 5}\n')
    fails(["multiple_choice", *load, "--input", str(bad)], "label 5 is outside 0..1")
    (tmp_path / "empty.txt").write_text("  \n")
    fails(["ppl", *load, "--input", str(tmp_path / "empty.txt")], "is empty")
    fails(["ppl", *load, "--data-path", str(tmp_path / "nodata")], "no indexed dataset")
    fails(["ppl", "--load", str(tmp_path / "nothing"), "--input", str(tmp / "text.txt")], "does not exist")
    with pytest.raises(SystemExit):
        evaluate_tool.main(["ppl", *load, "--input", str(tmp / "text.txt"), "--num-fewshot", "2"])
    # a model of another vocabulary
    other = tiny_gpt2(vocab=1000, n_positions=32)
    save_hf_dir({k: v.detach() for k, v in other.state_dict().items()}, other.cfg, str(tmp_path / "v1000"))
    fails(
        ["lambada", "--load", str(tmp_path / "v1000"), "--input", str(tmp / "lambada.jsonl")],
        "vocabulary of 1000 tokens",
    )
    # a megagpt2 checkpoint given a tokenizer other than the one it recorded
    other_tok = dict(setup["tok"].identity(), files={"vocab_file": "0" * 64, "merge_file": "1" * 64})
    ckpt = _converted(setup, tmp_path / "ckpt_other", other_tok, tp=1)
    fails(["lambada", "--load", ckpt, "--input", str(tmp / "lambada.jsonl")], "tokenizer does not match")
