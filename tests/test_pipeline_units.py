"""Pipeline pieces without processes: partitioning, schedule orders, layout errors."""

from __future__ import annotations

import pytest

from megagpt2.config import ConfigError, ModelConfig, load_config
from megagpt2.pipeline import PartitionError, build_schedule, check_layout, partition, simulate, theoretical_bubble
from megagpt2.pipeline.partition import block_parameters, edge_costs
from megagpt2.pipeline.schedules import Op
from megagpt2.training.plan import plan_run


def test_uniform_partition_and_virtual_stage_placement():
    layout = partition(ModelConfig(n_layer=8), pp=2, virtual=2)
    assert layout.pieces == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert layout.chunks(0) == [[0, 1], [4, 5]] and layout.chunks(1) == [[2, 3], [6, 7]]
    assert layout.layers(1) == [2, 3, 6, 7]
    assert layout.owner(5) == (0, 1) and layout.owner(7) == (1, 1)


def test_parameter_partition_balances_embedding_and_head():
    cfg = ModelConfig(n_layer=12, n_embd=64, vocab_size=1000, n_positions=128)
    layout = partition(cfg, pp=4, method="parameters")
    sizes = [len(p) for p in layout.pieces]
    assert sum(sizes) == 12 and min(sizes) >= 1
    first, last = edge_costs(cfg)
    b = block_parameters(cfg)
    loads = [n * b for n in sizes]
    loads[0] += first
    loads[-1] += last
    # The embedding (V C + P C) and head (V C) stages get fewer blocks than the middle ones ...
    assert sizes[0] < sizes[1] and sizes[-1] < sizes[2]
    # ... and no contiguous split does better (brute force over all cut points).
    import itertools

    best = min(
        max(sum(x) for x in _loads(cuts, b, first, last, 12)) for cuts in itertools.combinations(range(1, 12), 3)
    )
    assert max(loads) == best


def _loads(cuts, b, first, last, n):
    bounds = [0, *cuts, n]
    out = [[(bounds[i + 1] - bounds[i]) * b] for i in range(len(bounds) - 1)]
    out[0].append(first)
    out[-1].append(last)
    return out


def test_layout_errors_name_the_fix():
    with pytest.raises(PartitionError, match="not divisible by parallel.pp x parallel.virtual_stages = 4"):
        partition(ModelConfig(n_layer=6), pp=2, virtual=2)
    with pytest.raises(PartitionError, match="fewer than"):
        partition(ModelConfig(n_layer=2), pp=4, method="parameters")
    with pytest.raises(ConfigError, match="at least parallel.pp=4 micro-batches"):
        check_layout("1f1b", pp=4, virtual=1, micro_batches=3)
    with pytest.raises(ConfigError, match="multiple of parallel.pp=2"):
        check_layout("interleaved", pp=2, virtual=2, micro_batches=3)
    with pytest.raises(ConfigError, match="needs parallel.schedule=interleaved"):
        check_layout("1f1b", pp=2, virtual=2, micro_batches=4)
    check_layout("gpipe", pp=4, virtual=1, micro_batches=1)  # GPipe / none run any m
    cfg = load_config(None, ["--model.n_layer=6", "--parallel.pp=4"])  # the run plan applies the same rule
    with pytest.raises(ConfigError, match="not divisible by parallel.pp"):
        plan_run(cfg, {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 4}, world_size=4)


def test_1f1b_order():
    assert build_schedule("1f1b", m=4, p=2, rank=0) == [
        Op("F", 0, 0),
        Op("F", 1, 0),
        Op("B", 0, 0),
        Op("F", 2, 0),
        Op("B", 1, 0),
        Op("F", 3, 0),
        Op("B", 2, 0),
        Op("B", 3, 0),
    ]
    assert build_schedule("1f1b", m=4, p=2, rank=1)[:4] == [Op("F", 0, 0), Op("B", 0, 0), Op("F", 1, 0), Op("B", 1, 0)]


def test_interleaved_runs_every_chunk_of_every_micro_batch_once():
    for p, v, m in [(2, 2, 4), (4, 2, 8), (3, 3, 6)]:
        for rank in range(p):
            ops = build_schedule("interleaved", m, p, rank, v)
            assert sorted(ops) == sorted(Op(k, i, c) for k in "FB" for i in range(m) for c in range(v))
            for i in range(m):  # backward of a micro-batch's chunk after its forward
                for c in range(v):
                    assert ops.index(Op("B", i, c)) > ops.index(Op("F", i, c))
            assert ops[-1].kind == "B" and ops[-1].chunk == 0  # where the optimizer steps


@pytest.mark.parametrize("schedule", ["none", "gpipe", "1f1b", "interleaved"])
def test_schedules_never_deadlock_and_bubbles_match_theory(schedule):
    """Simulated with forward 1, backward 2 time units per chunk; FIFO order of messages checked too."""
    for p in (2, 3, 4):
        for m in (p, 2 * p, 3 * p):
            for v in (1, 2, 3) if schedule == "interleaved" else (1,):
                makespan = simulate(schedule, m, p, v)
                busy = 3.0 * m * v  # per rank: m micro-batches x v chunks x (1 + 2)
                bubble = 1 - busy / makespan
                expected = (p - 1) / p if schedule == "none" else theoretical_bubble(m, p, v)
                assert abs(bubble - expected) < 1e-9, (schedule, p, m, v, bubble, expected)


def test_surrogate_backward_passes_the_received_gradient_through_the_loss_scale():
    """fp16: engine.backward multiplies the surrogate by the loss scale S again; the surrogate
    divides by S so the stage output still receives exactly the (already scaled) gradient."""
    import torch

    from megagpt2.pipeline.executor import _InjectGrad

    out = torch.randn(2, 3, 4, requires_grad=True)
    g = torch.randn(2, 3, 4)
    for scale in (1.0, 256.0):
        out.grad = None
        (_InjectGrad.apply(out, g, scale) * scale).backward()
        assert torch.equal(out.grad, g)


def test_bench_pipeline_prints_every_schedule(monkeypatch, capsys):
    """Smoke test with a tiny model (figures are printed, never asserted on)."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_pipeline  # the spawned ranks import it by this name too

    assert (
        bench_pipeline.main(
            [
                "--n-layer",
                "4",
                "--n-embd",
                "32",
                "--seq",
                "16",
                "--micro",
                "2",
                "--micro-batches",
                "2",
                "--steps",
                "1",
                "--warmup",
                "0",
            ]
        )
        == 0
    )
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    table = {r[0]: r[1:] for r in rows if r and r[0] in ("none", "gpipe", "1f1b", "interleaved")}
    assert sorted(table) == ["1f1b", "gpipe", "interleaved", "none"]
    assert all(len(v) == 4 and float(v[0]) > 0 for v in table.values())
