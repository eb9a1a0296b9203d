"""The sbatch scripts on a real one-node Slurm cluster: 2 CPU ranks (gloo), the tiny model, a few steps.

Checks that each launch variant (the three batch scripts, and srun run interactively through
launch/graceful.py) stops on a SIGTERM to its top process with a checkpoint at the step it reached and
a clean exit, and that the next variant resumes from it exactly (its losses equal an unbroken run's);
that a signal to the ranks checkpoints and ends the job cleanly; and that the time-limit warning (USR1
to the batch script) checkpoints, requeues the job and the requeued run resumes. Skipped, with the
reason, only where Slurm is not installed (.ci/install_slurm.sh installs it).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch_utils import ENDLESS, STOP_STEPS, read_metrics, slow_steps, start_ranks, wait_all
from tests.slurm_cluster import SlurmCluster, missing_slurm

REPO = Path(__file__).resolve().parents[1]
WHY_NOT = missing_slurm()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")

JOB_TIMEOUT = 180  # seconds; generous: other test runs may share the 2 cores
CPU_JOB = ["--gpus-per-node=0", "--time=15"]
PER_RANK = ["--ntasks-per-node=2", "--cpus-per-task=1"]  # srun and deepspeed variants: a task per rank
PER_NODE = ["--ntasks-per-node=1", "--cpus-per-task=2"]  # torchrun variant: a task per node
STEPS = STOP_STEPS  # the unbroken reference run's steps


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


@pytest.fixture
def files(stop_files) -> dict[str, Path]:
    """A random-token dataset, the tiny config (micro batch 4 x 2 ranks) and its DeepSpeed JSON."""
    return stop_files


def submit(
    cluster: SlurmCluster,
    files: dict,
    script: str,
    ckpt: Path,
    steps: int,
    layout=PER_RANK,
    env: dict | None = None,
    extra: tuple | list = (),
) -> int:
    args = [
        *CPU_JOB,
        *layout,
        f"--output={files['dir']}/%x-%j.out",
        f"launch/slurm/{script}",
        "--config",
        str(files["config"]),
        "--deepspeed_config",
        str(files["ds"]),
        f"--train.steps={steps}",
        f"--checkpoint.dir={ckpt}",
        *extra,
    ]
    return cluster.sbatch(args, cwd=REPO, env={"PYTHON": sys.executable, **(env or {})})


def job_log(cluster: SlurmCluster, job: int) -> str:
    path = Path(cluster.job(job)["StdOut"])
    return path.read_text(errors="replace") if path.exists() else f"(no log at {path})"


def finish(cluster: SlurmCluster, job: int, state: str = "COMPLETED") -> str:
    """Wait for the job; assert its final state and exit code; return its log."""
    info = cluster.wait(job, timeout=JOB_TIMEOUT)
    log = job_log(cluster, job)
    want_code = "0:0" if state == "COMPLETED" else None
    assert info["JobState"] == state and (want_code is None or info["ExitCode"] == want_code), (
        f"job {job}: {info['JobState']} exit {info['ExitCode']}\n{log[-4000:]}\n{cluster.logs(10)}"
    )
    return log


def steps_recorded(ckpt: Path) -> list[int]:
    """Steps rank 0 wrote to metrics.jsonl, in order (across runs)."""
    path = ckpt / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in lines if "loss" in r]


def latest(ckpt: Path) -> int:
    tag = (ckpt / "latest").read_text().strip()
    assert (ckpt / tag / "COMPLETE").is_file(), f"{tag} is not complete"
    return int(tag.split("_")[1])


def wait_for_steps(cluster: SlurmCluster, job: int, ckpt: Path, at_least: int) -> None:
    deadline = time.time() + JOB_TIMEOUT
    while len(steps_recorded(ckpt)) < at_least:
        state = cluster.job(job)["JobState"]
        assert state in ("PENDING", "RUNNING", "REQUEUED"), f"job {job} is {state}:\n{job_log(cluster, job)[-3000:]}"
        assert time.time() < deadline, f"job {job}: fewer than {at_least} steps after {JOB_TIMEOUT} s"
        time.sleep(0.5)


@pytest.fixture
def reference(stop_reference) -> dict[int, float]:
    """step -> loss of an unbroken 2-rank run of STEPS steps (started directly, without Slurm)."""
    return stop_reference


def segment_losses(ckpt: Path, after: int) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(ckpt) if "loss" in r and r["step"] > after}


def check_segment(name: str, log: str, ckpt: Path, stop: int, reason: str, reference: dict) -> int:
    """The run stopped at the step it reached, resumed from `stop`, and matched the unbroken run."""
    new_stop = latest(ckpt)
    assert f"stopping at step {new_stop} ({reason})" in log, f"{name}:\n{log[-4000:]}"
    assert stop == 0 or f"resumed from {ckpt / f'step_{stop:08d}'}" in log, f"{name}:\n{log[-4000:]}"
    assert new_stop < STEPS, f"{name}: stopped at {new_stop}, past the reference run (machine too slow?)"
    losses = segment_losses(ckpt, stop)
    assert sorted(losses) == list(range(stop + 1, new_stop + 1)), f"{name}: steps {sorted(losses)}"
    for step, loss in losses.items():
        assert loss == reference[step], f"{name}: step {step} loss {loss} != unbroken run's {reference[step]}"
    return new_stop


# (script, task layout, environment, what its log shows of the launcher it used)
VARIANTS = [
    ("pretrain_gpt2.sbatch", PER_RANK, {}, "megagpt2: srun --kill-on-bad-exit=1"),
    ("pretrain_gpt2_deepspeed.sbatch", PER_RANK, {}, "--launcher slurm"),
    ("pretrain_gpt2_torchrun.sbatch", PER_NODE, {"NPROC_PER_NODE": "2"}, "torch.distributed.run"),
]


def test_each_variant_stops_on_sigterm_and_the_next_resumes_exactly(cluster, files, reference, tmp_path):
    ckpt, stop, slow = tmp_path / "ckpt", 0, slow_steps(0.5)
    for script, layout, env, launcher in VARIANTS:
        job = submit(cluster, files, script, ckpt, steps=ENDLESS, layout=layout, env={**slow, **env})
        wait_for_steps(cluster, job, ckpt, at_least=stop + 2)
        cluster.run(["scancel", "--batch", "--signal=TERM", str(job)])  # the job's top process: the script
        log = finish(cluster, job)
        assert launcher in log and "megagpt2: job" in log and "rendezvous" in log, log[-3000:]  # the header
        assert "world 2 = tp 1 x pp 1 x dp 2" in log, log[-3000:]
        assert "megagpt2: batch script got SIGTERM" in log and "requeueing" not in log, log[-3000:]
        stop = check_segment(script, log, ckpt, stop, "SIGTERM", reference)

    # srun run by hand (inside salloc, say): srun turns a SIGTERM into SIGKILL for its tasks, so it runs
    # under launch/graceful.py, which sends srun SIGUSR1 (forwarded to every task) instead.
    cmd = [
        sys.executable,
        "launch/graceful.py",
        "srun",
        "-n",
        "2",
        "--gpus-per-node=0",
        "--kill-on-bad-exit=1",
        sys.executable,
        "-u",
        "launch/pretrain_gpt2.py",
        "--config",
        str(files["config"]),
        "--deepspeed_config",
        str(files["ds"]),
        f"--train.steps={ENDLESS}",
        f"--checkpoint.dir={ckpt}",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env={**cluster.env, **slow}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + JOB_TIMEOUT
        while len(steps_recorded(ckpt)) < stop + 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=JOB_TIMEOUT)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "got SIGTERM: sending SIGUSR1" in out, out[-4000:]
    stop = check_segment("graceful.py srun", out, ckpt, stop, "SIGUSR1", reference)

    assert wait_all(
        start_ranks(2, files["config"], files["ds"], args=(f"--checkpoint.dir={ckpt}",), log_dir=tmp_path),
        timeout=JOB_TIMEOUT,
    ) == [0, 0]
    rest = segment_losses(ckpt, stop)
    assert sorted(rest) == list(range(stop + 1, STEPS + 1))
    assert all(loss == reference[step] for step, loss in rest.items()), (rest, reference)


def wait_for_restarts(cluster: SlurmCluster, job: int, restarts: int) -> None:
    deadline = time.time() + JOB_TIMEOUT
    while int(cluster.job(job).get("Restarts", "0")) < restarts:
        assert time.time() < deadline, f"job {job} was not requeued:\n{job_log(cluster, job)[-3000:]}"
        time.sleep(0.5)


def test_signals_checkpoint_then_requeue_resumes(cluster, files, tmp_path):
    ckpt = tmp_path / "ckpt"
    job = submit(cluster, files, "pretrain_gpt2.sbatch", ckpt, steps=2000)
    wait_for_steps(cluster, job, ckpt, at_least=3)

    # SIGTERM to the ranks (what preemption and scancel send): checkpoint at the step reached, exit 0.
    cluster.run(["scancel", "--signal=TERM", str(job)])
    log = finish(cluster, job)
    first_stop = latest(ckpt)
    assert steps_recorded(ckpt) == list(range(1, first_stop + 1))  # saved at the step it had reached
    assert f"stopping at step {first_stop} (SIGTERM)" in log and "requeueing" not in log

    # The rerun (here `scontrol requeue`, as Slurm does after a preemption) resumes from that checkpoint.
    cluster.run(["scontrol", "requeue", str(job)])
    wait_for_restarts(cluster, job, 1)
    wait_for_steps(cluster, job, ckpt, at_least=first_stop + 3)
    assert steps_recorded(ckpt)[: first_stop + 1] == list(range(1, first_stop + 2)), "did not resume at latest + 1"

    # The time-limit warning (--signal=B:USR1@600 sends USR1 to the batch script): checkpoint, then the
    # script requeues the job itself.
    cluster.run(["scancel", "--batch", "--signal=USR1", str(job)])
    wait_for_restarts(cluster, job, 2)
    second_stop = latest(ckpt)
    cluster.run(["scancel", str(job)])  # before the third run starts (Slurm delays requeued jobs)
    log = job_log(cluster, job)
    assert second_stop >= first_stop + 3
    assert steps_recorded(ckpt)[:second_stop] == list(range(1, second_stop + 1))
    assert "run 2 on" in log and f"resumed from {ckpt / f'step_{first_stop:08d}'}" in log
    assert "got SIGUSR1" in log and f"stopping at step {second_stop} (SIGUSR1)" in log
    assert "requeueing job" in log


def test_a_failing_rank_fails_the_job(cluster, files, tmp_path):
    # A config the validator rejects: every rank exits 2 before any process group exists.
    job = submit(cluster, files, "pretrain_gpt2.sbatch", tmp_path / "ckpt", steps=4, extra=["--model.n_head=5"])
    log = finish(cluster, job, state="FAILED")
    # 2 from the ranks, or 143 when srun's --kill-on-bad-exit stopped the second rank first
    assert cluster.job(job)["ExitCode"] in ("2:0", "143:0"), log[-3000:]
    assert "error: invalid config" in log and "model.n_head=5 must divide" in log


DETECT = (
    "from megagpt2.distributed import detect_env; e = detect_env(); print('ENV', e.rank, e.world_size, "
    "e.local_rank, e.master_addr, e.master_port, e.source)"
)


def test_detect_env_under_real_srun_and_batch_script(cluster, files):
    out = cluster.run(
        ["srun", "-n", "2", "--gpus-per-node=0", sys.executable, "-c", DETECT], cwd=REPO, timeout=JOB_TIMEOUT
    ).stdout
    rows = sorted(line.split()[1:] for line in out.splitlines() if line.startswith("ENV"))
    assert [r[:3] for r in rows] == [["0", "2", "0"], ["1", "2", "1"]], out
    assert {r[3] for r in rows} == {cluster.node} and len({r[4] for r in rows}) == 1  # same rendezvous
    assert {r[5] for r in rows} == {"slurm"}

    # The batch script itself (no srun) with 2 tasks: a clear error instead of a rank waiting forever.
    job = cluster.sbatch(
        [
            "-n",
            "2",
            "--gpus-per-node=0",
            f"--output={files['dir']}/nosrun-%j.out",
            f'--wrap={sys.executable} -c "{DETECT}"',
        ],
        cwd=REPO,
    )
    info = cluster.wait(job, timeout=JOB_TIMEOUT)
    log = job_log(cluster, job)
    assert info["JobState"] == "FAILED" and "not started by srun" in log, log[-3000:]
