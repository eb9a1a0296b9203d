"""Nothing trains unsaved: a run whose config never names checkpoint.dir saves into the directory
it prints (runs/<config file name>, under the working directory); resumed, it keeps each step
once in metrics.jsonl; its step line shows tokens, elapsed time and ETA (issue 18.3, 18.8)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from megagpt2.checkpoint.store import find_latest
from tests.dist_utils import dist_env, free_port
from tests.launch_utils import REPO, read_metrics
from tests.train_utils import ds_config, make_dataset, tiny_config


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_docs=60)


def _train(cwd, *args: str) -> subprocess.CompletedProcess:
    """The entry as one process started in `cwd`."""
    env = {**os.environ, **dist_env(0, 1, free_port()), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "pretrain_gpt2.py"),
            "--config",
            "exp.yaml",
            "--deepspeed_config",
            "ds.json",
            *args,
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_a_run_without_checkpoint_flags_saves_where_it_says(tmp_path, prefix):
    cfg = tiny_config(prefix, None, steps=3, checkpoint={"interval": 2}, logging={"plot": True})
    doc = cfg.to_dict()
    del doc["checkpoint"]["dir"]  # as in a user's YAML file that never mentions it
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(doc))
    (tmp_path / "ds.json").write_text(json.dumps(ds_config(stage=2, micro=4)))
    first = _train(tmp_path)
    run_dir = tmp_path / "runs" / "exp"
    assert f"run directory: {os.path.join('runs', 'exp')} ({run_dir}): checkpoints, metrics.jsonl" in first.stdout
    assert find_latest(str(run_dir)) == "step_00000003"
    assert (run_dir / "loss.png").stat().st_size > 0 and len(read_metrics(run_dir)) == 3
    # 4 samples x 16 tokens per step; the last step's ETA is 0
    assert re.search(r"step +3/3 \|.* \| 192 tokens \| \d+s elapsed \| ETA 0s$", first.stdout, re.M), first.stdout

    # again from step 2, on to step 4: step 3 is trained again and recorded once
    again = _train(tmp_path, "--checkpoint.tag=step_00000002", "--train.steps=4")
    assert "metrics.jsonl: dropped 1 record(s) of steps after step_00000002" in again.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert not (REPO / "runs" / "exp").exists()
