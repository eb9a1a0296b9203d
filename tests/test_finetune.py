"""Fine-tuning data: the loss mask covers exactly the response tokens, truncation keeps the
response, epochs and splits; and a few Trainer steps from a Hugging Face directory
(train.init_from) on a tiny dialogue set lower the response loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megagpt2.data.finetune import build_finetune_datasets, chat_prompt, encode_dialogue
from megagpt2.tokenizer import build_tokenizer

DIALOGUES = [
    ["hello there", "hi! how are you?", "fine, and you?", "great, thanks"],
    ["what is your name", "I am a bot"],
    ["do you like tea", "yes, green tea", "why"],  # the last user turn has no answer: dropped
    ["good morning", "morning! sleep well?"],
    ["tell me a joke", "why did the cat sit on the mat"],
    ["bye", "see you soon"],
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _all_items(ds) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


def test_mask_covers_exactly_the_responses(tmp_path, tok):
    path = _write(tmp_path / "d.jsonl", DIALOGUES)
    train, valid = build_finetune_datasets(path, "dialogue", tok, 40, "100,0,0", 1, 6, 0)
    assert valid is None
    eod = tok.eod
    seen = set()
    for item in _all_items(train)[: len(DIALOGUES)]:
        t, m = item["tokens"], item["loss_mask"]
        assert t.shape == m.shape == (41,) and t.dtype == np.int64
        # find the dialogue: the first user turn follows the leading separator
        d = next(d for d in DIALOGUES if t[1 : 1 + len(tok.encode(d[0]))].tolist() == tok.encode(d[0]))
        seen.add(d[0])
        turns = d[: len(d) - len(d) % 2]
        expect_t, expect_m = [eod], [0]
        for i, u in enumerate(turns):
            expect_t += tok.encode(u) + [eod]
            expect_m += [i % 2] * (len(tok.encode(u)) + 1)
        n = len(expect_t)
        assert t[:n].tolist() == expect_t and m[:n].tolist() == expect_m
        assert (t[n:] == eod).all() and (m[n:] == 0).all()  # padding: end-of-document, no loss
        bots = "".join(u + "<|endoftext|>" for u in turns[1::2])
        assert tok.decode(t[m == 1].tolist()) == bots
    assert len(seen) == len(DIALOGUES)


def test_trainer_batch_masks_response_targets(tmp_path, tok):
    from megagpt2.data.sampler import collate_tokens
    from megagpt2.training.data import split_batch

    path = _write(
        tmp_path / "i.jsonl",
        [{"instruction": "Say hi", "response": "hi"}, {"prompt": "Add", "input": "2 and 3", "output": "5"}],
    )
    train, _ = build_finetune_datasets(path, "instruction", tok, 16, "1,0,0", 0, 2, 0)
    x, y, mask = split_batch(collate_tokens(_all_items(train)), torch.device("cpu"))
    assert mask.shape == y.shape == (2, 16)
    got = sorted(tok.decode(y[r][mask[r] == 1].tolist()) for r in range(2))
    assert got == ["5<|endoftext|>", "hi<|endoftext|>"]
    prompts = sorted(tok.decode(x[r][: len(tok.encode("Add\n\n2 and 3")) + 2].tolist()) for r in range(2))
    assert prompts[0].startswith("<|endoftext|>Add\n\n2 and 3<|endoftext|>")


def test_truncation_keeps_the_response(tmp_path, tok):
    long_user = " ".join(["word"] * 40)
    long_bot = " ".join(["reply"] * 40)
    path = _write(tmp_path / "t.jsonl", [[long_user, "short answer"], ["q", long_bot]])
    train, _ = build_finetune_datasets(path, "dialogue", tok, 16, "1,0,0", 0, 2, 0)
    items = {tok.decode(it["tokens"][it["loss_mask"] == 1].tolist()): it for it in _all_items(train)}
    short = items["short answer<|endoftext|>"]  # context cut from the left, response whole
    assert short["tokens"][-1] == tok.eod and short["loss_mask"][0] == 0
    assert tok.decode(short["tokens"].tolist()).endswith(" word<|endoftext|>short answer<|endoftext|>")
    cut = next(it for k, it in items.items() if k.startswith("reply"))  # response cut on the right
    assert cut["tokens"][0] == tok.eod and cut["loss_mask"].tolist() == [0] + [1] * 16
    assert cut["tokens"][1:].tolist() == tok.encode(long_bot)[:16]


def test_epochs_split_and_determinism(tmp_path, tok):
    rows = [[f"question {i}", f"answer {i}"] for i in range(10)]
    path = _write(tmp_path / "e.jsonl", rows)
    train, valid = build_finetune_datasets(path, "dialogue", tok, 12, "60,40,0", 3, 25, 5)
    assert len(train) >= 25 and len(train) % 6 == 0 and len(valid) >= 5 and len(valid) % 4 == 0
    key = [tuple(it["tokens"].tolist()) for it in _all_items(train)]
    epochs = [key[i : i + 6] for i in range(0, len(key), 6)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)  # each epoch: every example once
    assert len(set(map(tuple, epochs))) > 1  # reshuffled per epoch
    assert not set(epochs[0]) & {tuple(it["tokens"].tolist()) for it in _all_items(valid)}
    again, _ = build_finetune_datasets(path, "dialogue", tok, 12, "60,40,0", 3, 25, 5)
    assert [tuple(it["tokens"].tolist()) for it in _all_items(again)] == key


def test_chat_prompt_matches_the_training_layout(tok):
    turns = [tok.encode(u) for u in DIALOGUES[0][:3]]
    full, _, _ = encode_dialogue(turns, tok.eod)
    assert chat_prompt(turns, tok.eod, 100) == full
    # too small for everything: keep the newest turns, starting with a user turn
    assert chat_prompt(turns, tok.eod, len(turns[2]) + 3) == [tok.eod] + turns[2] + [tok.eod]
    with pytest.raises(ValueError, match="does not fit"):
        chat_prompt(turns, tok.eod, 2)


def test_bad_files(tmp_path, tok):
    build = lambda p, fmt="dialogue": build_finetune_datasets(str(p), fmt, tok, 16, "1,0,0", 0, 4, 0)  # noqa: E731
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build(tmp_path / "missing.jsonl")
    (tmp_path / "a.jsonl").write_text('["a", "b"]\n["a", oops]\n')
    with pytest.raises(ValueError, match="a.jsonl:2: not valid JSON"):
        build(tmp_path / "a.jsonl")
    (tmp_path / "b.jsonl").write_text('{"user": "a"}\n')
    with pytest.raises(ValueError, match="JSON list of strings"):
        build(tmp_path / "b.jsonl")
    with pytest.raises(ValueError, match="instruction"):
        build(tmp_path / "b.jsonl", "instruction")
    (tmp_path / "c.jsonl").write_text('["only one"]\n')
    with pytest.warns(UserWarning, match="fewer than two"), pytest.raises(ValueError, match="no usable"):
        build(tmp_path / "c.jsonl")


# -- the real Trainer -----------------------------------------------------------------------------
def _response_loss(model, train, n: int) -> float:
    """Mean loss over the response targets of the first n samples."""
    tokens = torch.from_numpy(np.stack([train[i]["tokens"] for i in range(n)]))
    mask = torch.from_numpy(np.stack([train[i]["loss_mask"] for i in range(n)]))[:, 1:]
    with torch.no_grad():
        return float(model(tokens[:, :-1], tokens[:, 1:], mask))


def test_finetune_from_hf_dir_lowers_response_loss(tmp_path, tok):
    from megagpt2.interop import save_hf_dir
    from megagpt2.model import GPT2
    from megagpt2.parallel import ProcessGroups
    from tests.dist_utils import run_distributed
    from tests.train_utils import ds_config, losses, tiny_config, train_worker

    path = _write(tmp_path / "chat.jsonl", DIALOGUES * 2)
    cfg = tiny_config(
        path,
        tmp_path / "ckpt",
        steps=8,
        data={"format": "dialogue", "split": "1,0,0"},
        optim={"lr": 1e-2, "min_lr": 1e-3},
    )
    start = GPT2(cfg.model, ProcessGroups.single(), seed=42).eval()
    save_hf_dir({k: v.detach() for k, v in start.state_dict().items()}, cfg.model, str(tmp_path / "hf"))
    cfg.train.init_from = str(tmp_path / "hf")
    result = run_distributed(train_worker, 1, args=(cfg.to_dict(), ds_config(stage=2, micro=4), {"tp": 1}))[0]
    curve = losses(result)
    assert curve[-1] < curve[0] - 0.5, curve
    train, _ = build_finetune_datasets(path, "dialogue", tok, cfg.data.seq_length, "1,0,0", cfg.train.seed, 32, 0)
    before = _response_loss(start, train, 12)
    assert abs(curve[0] - _response_loss(start, train, 4)) < 1e-4  # step 1 started from the HF weights
    tuned = GPT2(cfg.model, ProcessGroups.single()).eval()
    tuned.load_state_dict({n: p for n, (p, _, _) in result["params"].items()}, strict=True)
    after = _response_loss(tuned, train, 12)
    assert after < before - 0.5
    # the fine-tuned checkpoint serves the inference tools (tokenizer from its stored config)
    from megagpt2.eval import load_model
    from tools import generate as generate_tool

    loaded, _, meta = load_model(str(tmp_path / "ckpt"))
    assert meta["step"] == 8 and abs(_response_loss(loaded, train, 12) - after) < 1e-6
    out = tmp_path / "reply.jsonl"
    assert (
        generate_tool.main(
            [
                "--load",
                str(tmp_path / "ckpt"),
                "--prompt",
                "hello there",
                "--greedy",
                "--max-new-tokens",
                "4",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert out.read_text().count("\n") == 1
