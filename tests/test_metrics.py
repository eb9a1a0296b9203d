"""The run's curves come from metrics.jsonl after a resume (checkpoints keep no copy of them)."""

from __future__ import annotations

import json
import math

from megagpt2.training.metrics import Scalars


def test_restore_reads_the_curves_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 0, "valid_loss": 9.0}] + [
        {"step": s, "loss": 10.0 - s, "lr": 1e-3, "grad_norm": 1.0, "consumed_samples": 8 * s} for s in (1, 2, 3)]
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
