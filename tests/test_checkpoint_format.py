"""The layout-free checkpoint format, in one process: slice geometry, resharding reads between any
TP x ZeRO split, our safetensors writer, the tensor index, and save -> load of a real model and
optimizer (ZeRO-0 keeps the torch optimizer on the parameters, as the fake engine here does)."""

from __future__ import annotations

import itertools
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from megagpt2.checkpoint.files import CheckpointError, OpenFiles, file_bytes, write_safetensors
from megagpt2.checkpoint.geometry import shard_runs
from megagpt2.checkpoint.index import build_index, coverage_problem, read_into
from megagpt2.parallel.layers import shard
from tests.ckpt_utils import FakeEngine, optimizer_state, save_fake

SPLITS = [((12, 8), 0, 3), ((12, 8), 1, 1), ((24,), 0, 1), ((6, 4, 4), 1, 2), ((12, 8), None, 1)]


def _expand(runs) -> np.ndarray:
    return (
        np.concatenate([np.arange(s, s + n) for s, n in zip(runs.start, runs.length)])
        if len(runs.length)
        else np.zeros(0, dtype=np.int64)
    )


@pytest.mark.parametrize("shape,dim,stride", SPLITS)
def test_runs_are_where_shard_puts_the_elements(shape, dim, stride):
    full = torch.arange(math.prod(shape)).view(shape)
    rng = np.random.default_rng(0)
    for tp in (1, 2, 4):
        if dim is not None and shape[dim] % (stride * tp):
            continue
        for t in range(tp):
            local = (full if dim is None else shard(full, dim, t, tp, stride)).reshape(-1)
            for _ in range(20):
                a = int(rng.integers(0, local.numel()))
                b = int(rng.integers(a, local.numel() + 1))
                runs = shard_runs(shape, dim, stride, t, tp, a, b - a)
                assert torch.equal(full.reshape(-1)[torch.from_numpy(_expand(runs))], local[a:b])
                assert np.array_equal(np.cumsum(runs.length) - runs.length, runs.offset)


def _pieces(full: torch.Tensor, dim, stride, tp: int, dp: int):
    """What ranks of a (tp, dp) ZeRO layout own: TP shard t, flat range d of dp (uneven)."""
    for t in range(tp):
        local = (full if dim is None or tp == 1 else shard(full, dim, t, tp, stride)).reshape(-1)
        cuts = np.linspace(0, local.numel(), dp + 1).astype(int)
        cuts[1:-1] += np.arange(1, dp) % 2  # ZeRO partitions do not follow parameter boundaries
        for d in range(dp):
            yield t, int(cuts[d]), int(cuts[d + 1] - cuts[d]), local[cuts[d] : cuts[d + 1]]


@pytest.mark.parametrize("shape,dim,stride", SPLITS)
def test_any_tp_x_zero_split_reads_what_any_other_wrote(tmp_path, shape, dim, stride):
    full = torch.randn(shape)
    sizes = [tp for tp in (1, 2, 4) if dim is None or shape[dim] % (stride * tp) == 0]
    for tp_w, dp_w in itertools.product(sizes, (1, 3)):
        d = tmp_path / f"w{tp_w}{dp_w}"
        d.mkdir()
        per_rank = []
        T = tp_w if dim is not None else 1
        for i, (t, start, n, piece) in enumerate(_pieces(full, dim, stride, T, dp_w)):
            rel = f"rank_{i:05d}.safetensors"
            write_safetensors(d / rel, {"w/master": piece.clone()})
            per_rank.append(
                (
                    rel,
                    [
                        {
                            "name": "w",
                            "shape": list(shape),
                            "dim": dim,
                            "stride": stride,
                            "tp": [t, T],
                            "start": start,
                            "numel": n,
                            "step": 3,
                            "keys": ["master"],
                            "dtype": {"master": "float32"},
                        }
                    ],
                )
            )
        entry = build_index(per_rank)["w"]
        files = OpenFiles(d)
        for tp_r, dp_r in itertools.product(sizes, (1, 2)):
            T_r = tp_r if dim is not None else 1
            for t, start, n, want in _pieces(full, dim, stride, T_r, dp_r):
                got = torch.empty(n)
                read_into(files, "w", entry, "master", (t, T_r), start, got)
                assert torch.equal(got, want), (tp_w, dp_w, tp_r, dp_r, t, start)


def test_our_safetensors_open_with_the_library_and_record_size_and_crc(tmp_path):
    from safetensors.torch import load_file

    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.arange(7),
        "c": torch.randn(11).to(torch.bfloat16),
        "d": torch.zeros(0),
    }
    rec = write_safetensors(tmp_path / "x.safetensors", tensors, {"what": "test"})
    data = (tmp_path / "x.safetensors").read_bytes()
    assert rec == {"bytes": len(data), "crc32": zlib.crc32(data)} and len(data) == file_bytes(tensors, {"what": "test"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())


def test_coverage_problems_name_the_tensor_and_the_elements():
    def entry(*ranges, tp=1):
        return {
            "shape": [4, 6],
            "tp_dim": 0,
            "tp_stride": 1,
            "pieces": [{"file": f"f{i}", "tp": [t, tp], "flat": [a, n]} for i, (t, a, n) in enumerate(ranges)],
        }

    assert coverage_problem("w", entry((0, 0, 24))) is None
    assert (
        coverage_problem("w", entry((0, 0, 10), (0, 12, 12)))
        == "tensor w: elements [10, 12) of TP shard 0/1 are in no file (missing slice)"
    )
    assert "are in both f0 and f1" in coverage_problem("w", entry((0, 0, 13), (0, 12, 12)))
    assert "elements [0, 12) of TP shard 1/2 are in no file" in coverage_problem("w", entry((0, 0, 12), tp=2))
    with pytest.raises(CheckpointError, match="inconsistent checkpoint: tensor w"):
        build_index(
            [
                (
                    "f0",
                    [
                        {
                            "name": "w",
                            "shape": [4, 6],
                            "dim": 0,
                            "stride": 1,
                            "tp": [0, 1],
                            "start": 0,
                            "numel": 20,
                            "step": 1,
                            "keys": ["master"],
                            "dtype": {"master": "float32"},
                        }
                    ],
                )
            ]
        )


# -- a real model and optimizer, saved and loaded in this process ---------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    engine = FakeEngine()
    engine.train(2)
    save_fake(engine, root, 2)
    engine.train(1)
    save_fake(engine, root, 3)
    return root, engine, optimizer_state(engine)


def test_a_checkpoint_is_json_and_safetensors_only(saved):
    root, _, _ = saved
    files = sorted(
        str(f.relative_to(root / "step_00000003")) for f in (root / "step_00000003").rglob("*") if f.is_file()
    )
    assert files == ["COMPLETE", "megagpt2.json", "rng/rank_00000.safetensors", "tensors/rank_00000.safetensors"]
    complete = json.loads((root / "step_00000003" / "COMPLETE").read_text())
    assert sorted(complete["files"]) == [f for f in files if f != "COMPLETE"]


def test_resume_restores_the_exact_state_without_unpickling_anything(saved, monkeypatch):
    import pickle

    from megagpt2.checkpoint.reshard import read_weights
    from megagpt2.checkpoint.resume import load_tensors, restore_extras
    from megagpt2.checkpoint.verify import read_meta, verify
    from megagpt2.parallel import ParallelLayout

    root, engine, want = saved

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint of the layout-free format was unpickled")

    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    path = root / "step_00000003"
    assert verify(path) is None
    fresh = FakeEngine(seed=7)
    meta = read_meta(path)
    load_tensors(fresh, ParallelLayout(), path, meta)
    restore_extras(fresh, meta)
    got = optimizer_state(fresh)
    for name, tensors in want.items():
        for k, v in tensors.items():
            assert torch.equal(got[name][k], v), (name, k)
    assert fresh.lr_scheduler.last_epoch == 3 and fresh.global_steps == 3
    assert [g["lr"] for g in fresh.optimizer.param_groups] == [g["lr"] for g in engine.optimizer.param_groups]
    _, full = read_weights(str(root))
    assert all(torch.equal(full[n], p) for n, p in engine.module.named_parameters())


@pytest.mark.slow
def test_bench_checkpoint_prints_both_formats(monkeypatch, capsys):
    """Smoke test of benchmarks/bench_checkpoint.py with the tiny shape (figures are never asserted)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_checkpoint  # the spawned ranks import it by this name too

    assert bench_checkpoint.main(["--shapes", "tiny", "--repeat", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    native = next(line for line in lines if "deepspeed (native)" in line).split()
    ours = next(line for line in lines if "megagpt2 (layout-free)" in line).split()
    assert float(native[-3]) > 0 and float(ours[2]) > 0
    assert float(ours[4]) < float(native[-1])  # fewer bytes: no second copy of the weights


def test_the_fp16_loss_scale_carries_over():
    """The dynamic loss scaler's state (scale, iteration, last overflow, hysteresis) is saved as JSON
    and restored into a fresh engine's scaler."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from megagpt2.checkpoint.resume import restore_extras
    from megagpt2.checkpoint.store import engine_extras

    def fp16_engine():
        engine = FakeEngine()
        engine.fp16_enabled = lambda: True
        engine.optimizer.loss_scaler = DynamicLossScaler(
            init_scale=2.0**16, scale_window=100, min_scale=1, delayed_shift=2, consecutive_hysteresis=False
        )
        return engine

    a, b = fp16_engine(), fp16_engine()
    s = a.optimizer.loss_scaler
    s.cur_scale, s.cur_iter, s.last_overflow_iter, s.cur_hysteresis = 2.0**11, 1234, 1100, 1
    extras = json.loads(json.dumps(engine_extras(a)))
    restore_extras(b, extras)
    t = b.optimizer.loss_scaler
    assert (t.cur_scale, t.cur_iter, t.last_overflow_iter, t.cur_hysteresis) == (2.0**11, 1234, 1100, 1)
    assert t.scale_window == 100 and t.delayed_shift == 2
