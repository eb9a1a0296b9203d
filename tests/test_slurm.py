"""The sbatch scripts on a real one-node Slurm cluster: 2 CPU ranks (gloo), the tiny model, a few steps.

Checks that each launch variant trains and resumes from the previous one's checkpoint, that a signal
checkpoints at the current step and ends the job cleanly, and that the time-limit warning (USR1 to the
batch script) checkpoints, requeues the job and the requeued run resumes. Skipped, with the reason,
only where Slurm is not installed (.ci/install_slurm.sh installs it).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from megagpt2.config import dump_yaml
from tests.slurm_cluster import SlurmCluster, missing_slurm
from tests.train_utils import ds_config, make_dataset, tiny_config

REPO = Path(__file__).resolve().parents[1]
WHY_NOT = missing_slurm()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")

JOB_TIMEOUT = 180  # seconds; generous: other test runs may share the 2 cores
CPU_JOB = ["--gpus-per-node=0", "--time=15"]
PER_RANK = ["--ntasks-per-node=2", "--cpus-per-task=1"]  # srun and deepspeed variants: a task per rank
PER_NODE = ["--ntasks-per-node=1", "--cpus-per-task=2"]  # torchrun variant: a task per node


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A random-token dataset, the tiny config (micro batch 4 x 2 ranks) and its DeepSpeed JSON."""
    d = tmp_path_factory.mktemp("slurm_run")
    prefix = make_dataset(d / "data")
    cfg = tiny_config(prefix, None, steps=4)
    (d / "tiny.yaml").write_text(dump_yaml(cfg))
    (d / "ds.json").write_text(json.dumps(ds_config(stage=2, micro=4)))
    return {"dir": d, "config": d / "tiny.yaml", "ds": d / "ds.json"}


def submit(cluster: SlurmCluster, files: dict, script: str, ckpt: Path, steps: int, layout=PER_RANK,
           env: dict | None = None, extra: tuple | list = ()) -> int:
    args = [*CPU_JOB, *layout, f"--output={files['dir']}/%x-%j.out", f"launch/slurm/{script}",
            "--config", str(files["config"]), "--deepspeed_config", str(files["ds"]), f"--train.steps={steps}",
            f"--checkpoint.dir={ckpt}", *extra]
    return cluster.sbatch(args, cwd=REPO, env={"PYTHON": sys.executable, **(env or {})})


def job_log(cluster: SlurmCluster, job: int) -> str:
    path = Path(cluster.job(job)["StdOut"])
    return path.read_text(errors="replace") if path.exists() else f"(no log at {path})"


def finish(cluster: SlurmCluster, job: int, state: str = "COMPLETED") -> str:
    """Wait for the job; assert its final state and exit code; return its log."""
    info = cluster.wait(job, timeout=JOB_TIMEOUT)
    log = job_log(cluster, job)
    want_code = "0:0" if state == "COMPLETED" else None
    assert info["JobState"] == state and (want_code is None or info["ExitCode"] == want_code), \
        f"job {job}: {info['JobState']} exit {info['ExitCode']}\n{log[-4000:]}\n{cluster.logs(10)}"
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


def test_each_variant_trains_then_the_next_resumes(cluster, files, tmp_path):
    ckpt = tmp_path / "ckpt"
    log = finish(cluster, submit(cluster, files, "pretrain_gpt2.sbatch", ckpt, steps=4))
    assert "megagpt2: job" in log and "rendezvous" in log  # the per-job log header
    assert "world 2 = tp 1 x pp 1 x dp 2" in log
    assert steps_recorded(ckpt) == [1, 2, 3, 4]
    assert latest(ckpt) == 4

    log = finish(cluster, submit(cluster, files, "pretrain_gpt2_deepspeed.sbatch", ckpt, steps=6))
    assert "--launcher slurm" in log and f"resumed from {ckpt / 'step_00000004'}" in log
    assert steps_recorded(ckpt) == [1, 2, 3, 4, 5, 6]  # the resumed run's first step is latest + 1
    assert latest(ckpt) == 6

    log = finish(cluster, submit(cluster, files, "pretrain_gpt2_torchrun.sbatch", ckpt, steps=8, layout=PER_NODE,
                                 env={"NPROC_PER_NODE": "2"}))
    assert "torch.distributed.run" in log and f"resumed from {ckpt / 'step_00000006'}" in log
    assert steps_recorded(ckpt) == list(range(1, 9))
    assert latest(ckpt) == 8


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
    assert f"stopping at step {first_stop} (signal)" in log and "requeueing" not in log

    # The rerun (here `scontrol requeue`, as Slurm does after a preemption) resumes from that checkpoint.
    cluster.run(["scontrol", "requeue", str(job)])
    wait_for_restarts(cluster, job, 1)
    wait_for_steps(cluster, job, ckpt, at_least=first_stop + 3)
    assert steps_recorded(ckpt)[:first_stop + 1] == list(range(1, first_stop + 2)), "did not resume at latest + 1"

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
    assert "got SIGUSR1" in log and f"stopping at step {second_stop} (signal)" in log
    assert "requeueing job" in log


def test_a_failing_rank_fails_the_job(cluster, files, tmp_path):
    # A config the validator rejects: every rank exits 2 before any process group exists.
    job = submit(cluster, files, "pretrain_gpt2.sbatch", tmp_path / "ckpt", steps=4, extra=["--model.n_head=5"])
    log = finish(cluster, job, state="FAILED")
    # 2 from the ranks, or 143 when srun's --kill-on-bad-exit stopped the second rank first
    assert cluster.job(job)["ExitCode"] in ("2:0", "143:0"), log[-3000:]
    assert "error: invalid config" in log and "model.n_head=5 must divide" in log


DETECT = "from megagpt2.distributed import detect_env; e = detect_env(); print('ENV', e.rank, e.world_size, " \
         "e.local_rank, e.master_addr, e.master_port, e.source)"


def test_detect_env_under_real_srun_and_batch_script(cluster, files):
    out = cluster.run(["srun", "-n", "2", "--gpus-per-node=0", sys.executable, "-c", DETECT], cwd=REPO,
                      timeout=JOB_TIMEOUT).stdout
    rows = sorted(line.split()[1:] for line in out.splitlines() if line.startswith("ENV"))
    assert [r[:3] for r in rows] == [["0", "2", "0"], ["1", "2", "1"]], out
    assert {r[3] for r in rows} == {cluster.node} and len({r[4] for r in rows}) == 1  # same rendezvous
    assert {r[5] for r in rows} == {"slurm"}

    # The batch script itself (no srun) with 2 tasks: a clear error instead of a rank waiting forever.
    job = cluster.sbatch(["-n", "2", "--gpus-per-node=0", f"--output={files['dir']}/nosrun-%j.out",
                          f"--wrap={sys.executable} -c \"{DETECT}\""], cwd=REPO)
    info = cluster.wait(job, timeout=JOB_TIMEOUT)
    log = job_log(cluster, job)
    assert info["JobState"] == "FAILED" and "not started by srun" in log, log[-3000:]
