"""Test-wide settings (one intra-op thread per process: tests start many ranks on few cores), the
fixtures several test modules share, and a guard that no test leaves a run directory in the
repository."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.eval_fixtures"]  # the tiny trained model shared by evaluation and export tests

_RUNS = Path(__file__).resolve().parent.parent / "runs"


@pytest.fixture(scope="session")
def source_222(tmp_path_factory):
    """(tp, pp, dp) = (2, 2, 2), 1f1b, ZeRO-2, 7 steps with a checkpoint after every step, trained
    once for every test that needs a real checkpoint of a 3-D layout (tests/ckpt_utils.py)."""
    from tests.ckpt_utils import train_source_222

    return train_source_222(tmp_path_factory.mktemp("src222"))


@pytest.fixture(scope="session")
def stop_files(tmp_path_factory) -> dict:
    """Dataset, tiny config and DeepSpeed JSON of the stop-signal tests (tests/launch_utils.py)."""
    from tests.launch_utils import write_stop_files

    return write_stop_files(tmp_path_factory.mktemp("stop"))


@pytest.fixture(scope="session")
def stop_reference(stop_files) -> dict:
    """step -> loss of one unbroken 2-rank run of `stop_files`, which every stopped-and-resumed run
    of tests/test_stop_signals.py and tests/test_slurm.py must match."""
    from tests.launch_utils import reference_losses

    return reference_losses(stop_files)


def _run_dirs() -> set[str]:
    return {p.name for p in _RUNS.iterdir()} if _RUNS.is_dir() else set()


@pytest.fixture(scope="session", autouse=True)
def _no_run_directory_in_the_repository():
    """A run whose config names no checkpoint.dir saves to runs/<config name> under its working
    directory: every test must give one under its tmp directory (or none, which saves nothing)."""
    before = _run_dirs()
    yield
    added = _run_dirs() - before
    assert not added, f"tests wrote run directories into the repository: {sorted(_RUNS / n for n in added)}"
