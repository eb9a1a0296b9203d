"""The training entry with tp=2 x pp=2 x dp=2 under `deepspeed --num_gpus 8` on CPU ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megagpt2.checkpoint.store import find_latest
from tests.launch_utils import REPO, read_metrics, train_losses, write_run_files
from tests.train_utils import make_dataset, tiny_config

BIN = Path(sys.executable).parent
ZERO2 = REPO / "configs" / "ds" / "zero2.json"


def _deepspeed(tmp: Path, cfg_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        "8",
        str(REPO / "launch" / "pretrain_gpt2.py"),
        "--deepspeed_config",
        str(ZERO2),
        "--config",
        str(cfg_path),
        "--parallel.pp=2",
        "--parallel.tp=2",
        *overrides,
    ]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_deepspeed_launcher_tp2_pp2_dp2_with_zero2_json(tmp_path):
    prefix = make_dataset(tmp_path / "data")
    cfg = tiny_config(
        prefix, tmp_path / "ckpt", steps=3, model={"n_layer": 4}, train={"eval_interval": 2, "eval_steps": 1}
    )
    cfg_path, _ = write_run_files(tmp_path, cfg, {})
    accum = json.loads(ZERO2.read_text()).get("gradient_accumulation_steps", 1)
    # 1F1B needs at least pp micro-batches per step; GPipe runs any number.
    schedule = "1f1b" if accum >= 2 else "gpipe"
    r = _deepspeed(tmp_path, cfg_path, f"--parallel.schedule={schedule}")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "world 8 = tp 2 x pp 2 x dp 2" in r.stdout
    assert find_latest(str(tmp_path / "ckpt")) == "step_00000003"
    losses = train_losses(tmp_path / "ckpt")
    assert sorted(losses) == [1, 2, 3] and losses[3] < losses[1]
    assert len([m for m in read_metrics(tmp_path / "ckpt") if "valid_loss" in m]) == 3  # steps 0, 2, 3
    if accum < 2:  # and the default schedule says why it cannot run this config, before any step
        bad = _deepspeed(tmp_path, cfg_path, "--parallel.schedule=1f1b", f"--checkpoint.dir={tmp_path / 'bad'}")
        assert bad.returncode != 0
        assert "needs at least parallel.pp=2 micro-batches per step" in bad.stdout + bad.stderr
        assert not (tmp_path / "bad" / "metrics.jsonl").exists()
