"""launch/mpirun.sh's own checks. Training under it, stopped by SIGTERM and resumed exactly, is in
tests/test_stop_signals.py (the chain of local launchers)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.launch_utils import launcher_env

REPO = Path(__file__).resolve().parents[1]


def test_mpirun_script_needs_the_separator():
    out = subprocess.run(
        [str(REPO / "launch" / "mpirun.sh"), "-np", "2"], env=launcher_env(), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "put -- between" in out.stderr
