"""Generation: KV cache == recomputation, batched left-padded == one at a time, sampling filters,
stop conditions, tools/generate.py (prompts, files, chat loop, errors) and tp=2 == tp=1."""

from __future__ import annotations

import io
import json

import pytest
import torch

from megagpt2.config import ModelConfig
from megagpt2.generation import SamplingConfig, filter_logits, generate, left_pad
from megagpt2.model import GPT2
from megagpt2.parallel import ProcessGroups
from tests.dist_utils import free_port, run_distributed
from tools import generate as generate_tool

PROMPTS = [[5, 17, 3], [40, 41, 42, 43, 44, 45, 46], [9], [60, 2, 60, 2, 60]]


def tiny_model(attention: str = "torch", vocab: int = 97, n_positions: int = 48, seed: int = 0) -> GPT2:
    cfg = ModelConfig(
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_positions=n_positions,
        vocab_size=vocab,
        make_vocab_size_divisible_by=32,
        dropout=0.0,
        attn_dropout=0.0,
        attention=attention,
        kernels="torch",
    )
    model = GPT2(cfg, ProcessGroups.single(), seed=seed)
    with torch.no_grad():  # sharper distributions: greedy paths vary, sampling is not uniform noise
        model.wte.weight.mul_(8.0)
    return model.eval()


@pytest.mark.parametrize("attention", ["torch", "flash", "fused_softmax"])
def test_kv_cache_equals_recomputation(attention):
    model = tiny_model(attention)
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0)
    cached, lc = generate(model, PROMPTS, cfg, pad_id=0, return_logits=True)
    plain, lp = generate(model, PROMPTS, cfg, pad_id=0, return_logits=True, use_cache=False)
    assert cached == plain
    assert len(set(map(tuple, cached))) > 1  # the rows really differ
    assert (lc - lp).abs().max().item() < 1e-5
    sampled = SamplingConfig(max_new_tokens=12, temperature=0.9, top_k=20, seed=3)
    assert generate(model, PROMPTS, sampled) == generate(model, PROMPTS, sampled, use_cache=False)


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(max_new_tokens=10, temperature=0.0),
        SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7),
        SamplingConfig(max_new_tokens=10, temperature=0.7, top_k=5, repetition_penalty=1.3, seed=1),
    ],
)
def test_batched_left_padded_equals_one_at_a_time(cfg):
    model = tiny_model("flash")
    batched, logits = generate(model, PROMPTS, cfg, pad_id=0, return_logits=True)
    for i, p in enumerate(PROMPTS):
        alone, la = generate(model, [p], cfg, pad_id=0, return_logits=True, seeds=[cfg.seed + i])
        assert alone[0] == batched[i], i
        assert (la[0] - logits[i, : la.shape[1]]).abs().max().item() < 1e-5


def test_pad_id_does_not_matter():
    model = tiny_model()
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.0)
    assert generate(model, PROMPTS, cfg, pad_id=0) == generate(model, PROMPTS, cfg, pad_id=61)


def test_stop_token_and_stop_fn():
    model = tiny_model()
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.0)
    free = generate(model, PROMPTS, cfg)
    stop = free[1][3]
    cfg.stop_token = stop
    rows = generate(model, PROMPTS, cfg)
    for r, f in zip(rows, free):
        expected = f[: f.index(stop) + 1] if stop in f else f
        assert r == expected
    cfg.stop_token = None
    rows = generate(model, PROMPTS, cfg, stop_fn=lambda row, toks: row == 0 and len(toks) == 2)
    assert rows[0] == free[0][:2] and rows[1:] == free[1:]


def test_filter_logits():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, -1.0]])
    top2 = filter_logits(logits, SamplingConfig(top_k=2))
    assert torch.isfinite(top2).tolist() == [[True, True, False, False, False]]
    p = logits.softmax(-1)[0]
    top_p = filter_logits(logits, SamplingConfig(top_p=float(p[0] + p[1]) - 1e-4))
    assert torch.isfinite(top_p).tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, SamplingConfig(top_p=float(p[0]) / 2))).sum() == 1
    seen = torch.tensor([[True, False, False, False, True]])
    pen = filter_logits(logits, SamplingConfig(repetition_penalty=2.0), seen)
    assert pen.tolist() == [[2.0, 3.0, 2.0, 1.0, -2.0]]  # positive logits divided, negative multiplied
    assert torch.allclose(filter_logits(logits, SamplingConfig(temperature=0.5)), logits * 2)


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    from megagpt2.generation import pick

    gen = torch.Generator().manual_seed(0)
    draws = [int(pick(logits, SamplingConfig(), [gen])[0]) for _ in range(2000)]
    freq = [draws.count(k) / len(draws) for k in range(3)]
    assert abs(freq[0] - 0.7) < 0.04 and abs(freq[2] - 0.1) < 0.03


def test_bad_requests_raise_clearly():
    model = tiny_model()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        left_pad([[1], []], 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="exceeds the context"):
        generate(model, [[1] * 40], SamplingConfig(max_new_tokens=10))
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], SamplingConfig(top_p=0.0))


# -- the tool ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny GPT-2-vocabulary model exported to a Hugging Face directory."""
    from megagpt2.interop import save_hf_dir

    model = tiny_model("flash", vocab=50257, n_positions=64, seed=1)
    out = tmp_path_factory.mktemp("gen") / "hf"
    save_hf_dir({k: v.detach() for k, v in model.state_dict().items()}, model.cfg, str(out))
    return out


def _tool_lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_tool_batched_file_equals_single_prompts(hf_dir, tmp_path):
    prompts = ["The history of", "A cat sat on the mat and then", "Hello"]
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(prompts) + "\n")
    common = ["--load", str(hf_dir), "--max-new-tokens", "6", "--temperature", "0.8", "--top-k", "50", "--seed", "5"]
    assert (
        generate_tool.main(
            common + ["--prompt-file", str(pf), "--batch-size", "3", "--output", str(tmp_path / "all.jsonl")]
        )
        == 0
    )
    together = _tool_lines(tmp_path / "all.jsonl")
    assert [r["prompt"] for r in together] == prompts
    # row i uses seed + i, so prompt i alone with seed 5 + i gives the same text
    for i, p in enumerate(prompts):
        one = [
            "--load",
            str(hf_dir),
            "--max-new-tokens",
            "6",
            "--temperature",
            "0.8",
            "--top-k",
            "50",
            "--seed",
            str(5 + i),
            "--prompt",
            p,
            "--output",
            str(tmp_path / "one.jsonl"),
        ]
        assert generate_tool.main(one) == 0
        assert _tool_lines(tmp_path / "one.jsonl")[0]["tokens"] == together[i]["tokens"]


def test_tool_stop_string_is_cut(hf_dir, tmp_path):
    out = tmp_path / "o.jsonl"
    args = [
        "--load",
        str(hf_dir),
        "--prompt",
        "Once upon a time",
        "--greedy",
        "--max-new-tokens",
        "12",
        "--no-stop-at-eod",
        "--output",
        str(out),
    ]
    assert generate_tool.main(args) == 0
    full = _tool_lines(out)[0]["completion"]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop and generate_tool.main(args + ["--stop", stop]) == 0
    cut = _tool_lines(out)[0]
    assert cut["completion"] == full[: full.index(stop)]
    assert len(cut["tokens"]) < 12  # generation stopped early, not just trimmed


def test_tool_chat_keeps_a_window_of_history(hf_dir, monkeypatch, capsys):
    from megagpt2.tokenizer import build_tokenizer

    tok = build_tokenizer()
    seen = []
    real = generate_tool.generate

    def spy(model, prompts, cfg, **kw):
        seen.append(prompts[0])
        return real(model, prompts, cfg, **kw)

    monkeypatch.setattr(generate_tool, "generate", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi there\nhow are you\nbye now\n/quit\n"))
    assert (
        generate_tool.main(
            [
                "--load",
                str(hf_dir),
                "--interactive",
                "--greedy",
                "--max-new-tokens",
                "5",
                "--history-turns",
                "2",
                "--no-stop-at-eod",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.count("bot>") == 3
    eod = tok.eod
    u1, u2, u3 = (tok.encode(s) for s in ("hi there", "how are you", "bye now"))
    assert seen[0] == [eod] + u1 + [eod]  # the fine-tuning layout: SEP user SEP
    assert seen[1][: len(u1) + 2] == [eod] + u1 + [eod] and seen[1][-len(u2) - 2 :] == [eod] + u2 + [eod]
    # third turn: 2 utterances of history (user 2, bot 2) + the new line; user 1 has left the window
    assert seen[2][: len(u2) + 2] == [eod] + u2 + [eod] and seen[2][-len(u3) - 2 :] == [eod] + u3 + [eod]


def test_tool_errors(hf_dir, tmp_path, capsys):
    assert generate_tool.main(["--load", str(hf_dir), "--prompt", ""]) == 2
    assert "prompt 0 is empty" in capsys.readouterr().err
    assert generate_tool.main(["--load", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert generate_tool.main(["--load", str(hf_dir), "--prompt-file", str(tmp_path / "missing.txt")]) == 2
    assert "prompt file" in capsys.readouterr().err
    # a model of another vocabulary with the GPT-2 tokenizer
    from megagpt2.interop import save_hf_dir

    other = tiny_model(vocab=1000, n_positions=32)
    save_hf_dir({k: v.detach() for k, v in other.state_dict().items()}, other.cfg, str(tmp_path / "v1000"))
    assert generate_tool.main(["--load", str(tmp_path / "v1000"), "--prompt", "x"]) == 2
    assert "vocabulary of 1000 tokens" in capsys.readouterr().err


# -- tensor parallel ----------------------------------------------------------------------------
def _tp_worker(rank, world, hf, out_path, own_port):
    import os

    import torch.distributed as dist

    from megagpt2.eval import load_model, stream_nll

    model, tok, _ = load_model(hf, tp=world)
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.0)
    rows, logits = generate(
        model, [tok.encode("Hello world"), tok.encode("A")], cfg, pad_id=tok.eod, return_logits=True
    )
    nll, n = stream_nll(model, tok.encode("the cat sat on the mat " * 8), window=16, stride=8)
    flags = ["--load", hf, "--tp", str(world), "--prompt", "Hi", "--top-k", "9", "--max-new-tokens", "5"]
    assert generate_tool.main(flags + ["--output", out_path]) == 0
    kept_callers_group = dist.is_initialized()
    # As under torchrun: no group running, the tool starts its own and must end it when done
    # (a two-rank gloo script that leaves its group to interpreter exit aborted in 11 of 40 runs).
    dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(own_port)
    assert generate_tool.main(flags + ["--output", out_path + ".own"]) == 0
    return rows, logits, nll, n, kept_callers_group, dist.is_initialized()


def test_tp2_generation_and_scoring_equal_tp1(hf_dir, tmp_path):
    from megagpt2.eval import load_model, stream_nll

    results = run_distributed(_tp_worker, 2, args=(str(hf_dir), str(tmp_path / "tp2.jsonl"), free_port()))
    model, tok, _ = load_model(str(hf_dir))
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.0)
    rows, logits = generate(
        model, [tok.encode("Hello world"), tok.encode("A")], cfg, pad_id=tok.eod, return_logits=True
    )
    nll, n = stream_nll(model, tok.encode("the cat sat on the mat " * 8), window=16, stride=8)
    for r_rows, r_logits, r_nll, r_n, kept_callers_group, own_group_left in results:
        assert kept_callers_group and not own_group_left
        assert r_rows == rows and r_n == n
        assert (r_logits - logits).abs().max().item() < 1e-5
        assert abs(r_nll - nll) <= 1e-6 * abs(nll)
    assert (
        generate_tool.main(
            [
                "--load",
                str(hf_dir),
                "--prompt",
                "Hi",
                "--top-k",
                "9",
                "--max-new-tokens",
                "5",
                "--output",
                str(tmp_path / "tp1.jsonl"),
            ]
        )
        == 0
    )
    assert _tool_lines(tmp_path / "tp2.jsonl") == _tool_lines(tmp_path / "tp1.jsonl")
    assert _tool_lines(tmp_path / "tp2.jsonl.own") == _tool_lines(tmp_path / "tp1.jsonl")
