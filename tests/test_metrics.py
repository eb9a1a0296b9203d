"""The run's curves come from metrics.jsonl after a resume (checkpoints keep no copy of them)."""

from __future__ import annotations

import json
import math

from megagpt2.training.metrics import Scalars


def test_restore_reads_the_curves_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 0, "valid_loss": 9.0}] + [
        {"step": s, "loss": 10.0 - s, "lr": 1e-3, "grad_norm": 1.0, "consumed_samples": 8 * s} for s in (1, 2, 3)
    ]
    records += [{"step": 4, "loss": 6.5}, {"step": 3, "loss": 6.9}]  # a crash after step 4, resumed from 3
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n" + '{"step": 5, "lo')  # torn last line
    s = Scalars(None, enabled=True)
    s.restore(path, up_to_step=3)
    assert s.history["train/loss"] == [(1, 9.0), (2, 8.0), (3, 6.9)]  # the last record of a step wins
    assert s.history["valid/loss"] == [(0, 9.0)] and s.history["valid/ppl"] == [(0, math.exp(9.0))]
    s.add("train/loss", 6.0, 4)  # the resumed run goes on from there
    assert s.history["train/loss"][-2:] == [(3, 6.9), (4, 6.0)]


def test_other_ranks_keep_no_curves(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    s = Scalars(None, enabled=False)
    s.restore(tmp_path / "metrics.jsonl", up_to_step=1)
    assert s.history == {}


def test_a_resume_truncates_what_its_checkpoint_does_not_cover(tmp_path):
    from megagpt2.training.metrics import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 0, "valid_loss": 9.0},
        {"step": 1, "loss": 8.0},
        {"step": 2, "loss": 7.0},
        {"step": 2, "valid_loss": 7.5},
        {"step": 3, "loss": 6.0},
        {"step": 4, "loss": 5.0},
        {"step": 3, "loss": 6.1},
    ]  # an older resume from step 2 that kept steps 3-4 of the crashed run
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    assert truncate_metrics(path, up_to_step=3) == 3  # step 4, the torn line, the first step 3
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:4] + [rows[6]]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # written aside, then renamed
    assert truncate_metrics(path, up_to_step=3) == 0 and truncate_metrics(tmp_path / "none.jsonl", 3) == 0


def test_the_step_line_counts_tokens_time_and_eta(monkeypatch):
    from megagpt2.training import metrics
    from megagpt2.training.metrics import RunClock, count, duration

    assert [duration(s) for s in (4.4, 65, 3599, 7380, 90000)] == ["4s", "1m05s", "59m59s", "2h03m", "1d01h"]
    assert [count(n) for n in (950, 12_345, 4_560_000, 1.2e9, 3e13)] == ["950", "12.3k", "4.56M", "1.2B", "30T"]
    now = [1000.0]
    monkeypatch.setattr(metrics.time, "time", lambda: now[0])
    clock = RunClock(last_step=110)
    clock.begin()
    now[0] += 30.0  # the first step pays for allocation and compilation
    clock.tick(11)  # a resumed run: its first step is step 11
    assert clock.progress(11, 2048) == "2.05k tokens | 30s elapsed | ETA 49m30s"  # 99 steps x 30 s: all it knows
    now[0] += 20.0
    clock.tick(12)
    now[0] += 20.0
    clock.tick(13)
    assert clock.progress(13, 3_000_000) == "3M tokens | 1m10s elapsed | ETA 32m20s"  # 97 steps x 20 s
