"""A tiny GPT-2 trained on Chinese text in GPT2-Chinese's layout generates only Chinese-vocabulary
tokens through tools/generate.py: [UNK] is banned by default (and does appear with --allow-unk),
the output has no spaces between Han characters, and a chat prompt in chitchat's layout starts
with [CLS]."""

from __future__ import annotations

import io
import json

import pytest
import torch

from megagpt2.config import ModelConfig
from megagpt2.generation import SamplingConfig, filter_logits
from megagpt2.model import GPT2
from megagpt2.parallel import ProcessGroups
from megagpt2.tokenizer import build_tokenizer
from megagpt2.tokenizer.wordpiece import is_cjk, train_wordpiece
from tools import generate as generate_tool

POEMS = [
    "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
    "春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。",
    "白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。",
    "红豆生南国，春来发几枝。\n愿君多采撷，此物最相思。",
    "千山鸟飞绝，万径人踪灭。\n孤舟蓑笠翁，独钓寒江雪。",
]
LAYOUT = {"bos_token": "[MASK]", "eod_token": "[CLS]", "newline_token": "[SEP]"}  # GPT2-Chinese's


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(HF dir, tokenizer.json path): a 2-layer model trained on the poems, where a third of the
    characters are outside the vocabulary, so [UNK] is a likely next token."""
    from megagpt2.interop import save_hf_dir

    root = tmp_path_factory.mktemp("zhgen")
    backend = train_wordpiece(POEMS, 200, limit_alphabet=60)  # the rarest characters become [UNK]
    backend.save(str(root / "tokenizer.json"))
    tok = build_tokenizer("HFTokenizer", tokenizer_model=str(root / "tokenizer.json"), **LAYOUT)
    stream = [i for p in POEMS * 4 for i in [tok.bos] + tok.encode(p) + [tok.eod]]
    assert 0.2 < stream.count(tok.unk) / len(stream) < 0.5
    cfg = ModelConfig(
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_positions=32,
        vocab_size=tok.vocab_size,
        make_vocab_size_divisible_by=32,
        dropout=0.0,
        attn_dropout=0.0,
        kernels="torch",
    )
    torch.manual_seed(0)
    model = GPT2(cfg, ProcessGroups.single(), seed=0)
    data = torch.tensor(stream)
    windows = torch.stack([data[i : i + 17] for i in range(0, len(data) - 17, 3)])  # (N, 17)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _step in range(80):
        batch = windows[torch.randint(len(windows), (16,))]
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 2.0, loss.item()  # it learned the poems
    save_hf_dir({k: v.detach() for k, v in model.state_dict().items()}, cfg, str(root / "hf"))
    return root / "hf", str(root / "tokenizer.json")


def _generate(trained, tmp_path, *extra: str) -> list[dict]:
    hf, tok_json = trained
    out = tmp_path / "out.jsonl"
    flags = [
        "--tokenizer-type",
        "HFTokenizer",
        "--tokenizer-model",
        tok_json,
        "--bos-token",
        "[MASK]",
        "--eod-token",
        "[CLS]",
        "--newline-token",
        "[SEP]",
    ]
    prompts = ["床前", "春眠", "白日", "红豆", "千山", "举头", "夜来", "孤舟"]
    args = ["--load", str(hf), "--max-new-tokens", "24", "--temperature", "1.3", "--output", str(out)]
    assert generate_tool.main(args + flags + [a for p in prompts for a in ("--prompt", p)] + list(extra)) == 0
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_generates_only_chinese_vocabulary_tokens_with_unk_banned(trained, tmp_path):
    tok = build_tokenizer("HFTokenizer", tokenizer_model=trained[1], **LAYOUT)
    rows = _generate(trained, tmp_path)
    allowed = {tok.newline, tok.eod}
    tokens = [t for row in rows for t in row["tokens"]]
    assert len(tokens) > 40 and tok.unk not in tokens and tok.pad not in tokens
    for t in tokens:
        piece = tok.backend.id_to_token(t)
        assert t in allowed or (len(piece) == 1 and is_cjk(piece)), piece
    for row in rows:
        assert " " not in row["completion"] and "[" not in row["completion"]
    unbanned = [t for row in _generate(trained, tmp_path, "--allow-unk") for t in row["tokens"]]
    assert tok.unk in unbanned  # the ban is what kept it out


def test_chat_prompt_in_chitchat_layout_starts_with_cls(trained, monkeypatch, capsys):
    hf, tok_json = trained
    tok = build_tokenizer("HFTokenizer", tokenizer_model=tok_json, bos_token="[CLS]")
    seen = []
    real = generate_tool.generate

    def spy(model, prompts, cfg, **kw):
        seen.append((prompts[0], cfg.banned_tokens))
        return real(model, prompts, cfg, **kw)

    monkeypatch.setattr(generate_tool, "generate", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("床前明月光，\n"))
    assert (
        generate_tool.main(
            [
                "--load",
                str(hf),
                "--interactive",
                "--top-k",
                "8",
                "--max-new-tokens",
                "8",
                "--tokenizer-type",
                "HFTokenizer",
                "--tokenizer-model",
                tok_json,
                "--bos-token",
                "[CLS]",
                "--ban-token",
                "[MASK]",
            ]
        )
        == 0
    )
    prompt, banned = seen[0]
    assert prompt == [tok.bos] + tok.encode("床前明月光，") + [tok.eod]  # [CLS] u1 [SEP]
    assert set(banned) == {tok.unk, tok.pad, tok.bos, tok.token_id("[MASK]", "x")}  # [CLS] starts dialogues only
    reply = capsys.readouterr().out.split("bot> ")[1]
    assert not any(c == " " for c in reply.strip())


def test_filter_logits_bans_tokens_for_greedy_and_sampling():
    logits = torch.tensor([[5.0, 1.0, 0.5, 0.1], [0.0, 9.0, 0.0, 0.0]])
    cfg = SamplingConfig(temperature=0.0, banned_tokens=(0, 1))
    out = filter_logits(logits, cfg)
    assert torch.isinf(out[:, :2]).all() and out.argmax(-1).tolist() == [2, 2]
    assert torch.isfinite(out[:, 2:]).all()
    with pytest.raises(ValueError, match="banned_tokens"):
        SamplingConfig(banned_tokens=(-1,)).validate()
