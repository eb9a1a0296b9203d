"""benchmarks/bench_train.py on CPU at a tiny shape: every implementation runs, from the same
weights and tokens (their first losses agree), a failing row is an error row, a shape that does
not fit is skipped, and main() leaves no process group or signal handler behind. Figures are not
asserted on."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
import torch

from tests.kernel_checks import load_benchmark

ROWS = "plain:eager,hf:eager,megagpt2:torch:flash:eager"
ARGS = [
    "--device",
    "cpu",
    "--models",
    "tiny",
    "--seq",
    "16",
    "--micro-batch",
    "2",
    "--warmup",
    "0",
    "--iters",
    "5",
    "--no-compile",
    "--rows",
    ROWS,
]


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    bench = load_benchmark("bench_train")
    out = tmp_path_factory.mktemp("bench") / "train.json"
    env_before = dict(os.environ)
    handlers_before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    assert bench.main(ARGS + ["--out", str(out)]) == 0
    assert not torch.distributed.is_initialized() and dict(os.environ) == env_before
    # A Trainer built in code leaves the process's signal handlers alone (the entry installs its own).
    assert {sig: signal.getsignal(sig) for sig in handlers_before} == handlers_before
    return json.loads(out.read_text())


def test_every_implementation_runs_from_the_same_start(figures):
    rows = {r["row"]: r for r in figures["rows"]}
    assert set(rows) == set(ROWS.split(","))
    for r in rows.values():
        assert "error" not in r, r
        assert r["ms"] > 0 and len(r["ms_all"]) == 5 and r["tokens_per_s"] > 0 and r["tflops"] > 0
        assert r["peak_gib"] > 0 and r["mfu"] > 0
    losses = [r["loss"] for r in rows.values()]
    # Same weights and tokens; the plain reference keeps the padded vocabulary in its softmax
    # (nanoGPT does), which moves its loss by log(50304 / 50257) ~ 1e-3.
    assert max(losses) - min(losses) < 2e-3, losses
    megagpt2 = [r["loss"] for k, r in rows.items() if k.startswith(("megagpt2", "hf"))]
    assert max(megagpt2) - min(megagpt2) < 1e-5, megagpt2
    assert figures["meta"]["peak_tflops"] > 0  # the CPU's fp32 matmul peak, measured


def test_failing_row_is_an_error_row_and_big_shapes_are_skipped(tmp_path, monkeypatch):
    bench = load_benchmark("bench_train")

    def broken(*a, **k):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(bench, "hf_row", broken)
    out = tmp_path / "t.json"
    assert bench.main(ARGS[:-1] + ["plain:eager,hf:eager", "--out", str(out)]) == 0
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["hf:eager"]["error"] == "RuntimeError: simulated failure" and "ms" in rows["plain:eager"]
    assert "FAILED: RuntimeError" in bench.format_table(json.loads(out.read_text()))
    monkeypatch.setattr(bench, "fits", lambda *a: (False, "needs about 99 GiB (estimate), 1 GiB free"))
    assert bench.main(ARGS + ["--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["skipped"].startswith("needs about 99 GiB") for r in rows)


def test_plain_reference_matches_megagpt2_model():
    """The plain GPT-2 loads megagpt2's weights and computes the same function (same vocabulary)."""
    bench = load_benchmark("bench_train")
    from megagpt2.config import ModelConfig
    from megagpt2.model import GPT2
    from megagpt2.parallel import ProcessGroups

    cfg = ModelConfig(
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_positions=16,
        vocab_size=128,
        make_vocab_size_divisible_by=64,
        dropout=0.0,
        attn_dropout=0.0,
        kernels="torch",
    )
    ours = GPT2(cfg, ProcessGroups.single())
    plain = bench.PlainGPT(bench.PlainConfig(2, 4, 32, 16, 128))
    plain.load_state_dict(ours.state_dict())
    x, y = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))
    assert abs(plain(x, y).item() - ours(x, y).item()) < 1e-5


def test_profile_step_runs_zero2_over_two_ranks(monkeypatch, capsys):
    """benchmarks/profile_step.py --ranks 2 (it used to be refused: its trainer planned for one rank).
    Counts, not times, are asserted: two ZeRO-2 ranks communicate every step, and the printed
    figures are rank 0's."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import profile_step  # the spawned ranks import it by this name too

    args = ["--ranks", "2", "--steps", "1", "--warmup", "1", "--seq", "16", "--micro-batch", "1"]
    assert profile_step.main(args) == 0
    out = capsys.readouterr().out
    assert "megagpt2 trainer step, ZeRO-2, 2 rank(s)" in out and "plain:eager" not in out
    collectives = re.search(r"allocations \([\d.]+ MiB\), (\d+) collectives", out)
    assert collectives and int(collectives.group(1)) > 0, out
