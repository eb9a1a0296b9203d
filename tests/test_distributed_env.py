"""detect_env: every launcher's variables, given as plain dicts (no processes, no Slurm needed)."""

from __future__ import annotations

import shutil

import pytest

from megagpt2.distributed import (
    LaunchEnv,
    LaunchEnvError,
    detect_env,
    expand_hostlist,
    first_slurm_host,
    port_for_job,
    slurm_hostnames,
)


def no_scontrol(nodelist: str) -> list[str]:
    return expand_hostlist(nodelist)


def detect(env: dict, **kw) -> LaunchEnv:
    return detect_env(env, hostnames=kw.pop("hostnames", no_scontrol), **kw)


def srun_task(
    rank: int, ntasks: int, local: int, nodelist: str = "gpu[003-004]", job: str = "4242", **extra: str
) -> dict:
    """What srun puts in one task's environment (the variables detect_env reads)."""
    env = {
        "SLURM_JOB_ID": job,
        "SLURM_PROCID": str(rank),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_STEP_NUM_TASKS": str(ntasks),
        "SLURM_LOCALID": str(local),
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_STEP_NODELIST": nodelist,
    }
    env.update(extra)
    return env


def mpirun_rank(rank: int, size: int, local: int, local_size: int, **extra: str) -> dict:
    env = {
        "OMPI_COMM_WORLD_RANK": str(rank),
        "OMPI_COMM_WORLD_SIZE": str(size),
        "OMPI_COMM_WORLD_LOCAL_RANK": str(local),
        "OMPI_COMM_WORLD_LOCAL_SIZE": str(local_size),
        "PMIX_NAMESPACE": "prterun-host-1234@1",
    }
    env.update(extra)
    return env


# -- host lists -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node7", ["node7"]),
        ("gpu[003-005,007]", ["gpu003", "gpu004", "gpu005", "gpu007"]),
        ("gpu[003-005,007],cpu1", ["gpu003", "gpu004", "gpu005", "gpu007", "cpu1"]),
        ("a1,b[1-2]", ["a1", "b1", "b2"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("node-[09-10].cluster", ["node-09.cluster", "node-10.cluster"]),
    ],
)
def test_expand_hostlist(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts
    assert first_slurm_host(nodelist) == hosts[0]


@pytest.mark.parametrize("bad", ["gpu[1-", "gpu[a-b]", "gpu[5-3]", "a,,b", "gpu[[1]]", ""])
def test_expand_hostlist_rejects_malformed_lists(bad):
    with pytest.raises(LaunchEnvError, match="cannot parse Slurm node list"):
        expand_hostlist(bad)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol (Slurm client) not installed")
def test_scontrol_and_parser_agree():
    nodelist = "gpu[003-005,007],rack[1-2]-n[01-02],c1"
    assert slurm_hostnames(nodelist) == expand_hostlist(nodelist)


def test_slurm_hostnames_falls_back_to_the_parser(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert slurm_hostnames("x[1-2]") == ["x1", "x2"]


# -- sources ----------------------------------------------------------------------------------------


def test_torchrun_and_deepspeed_launcher_variables():
    env = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert detect(env) == LaunchEnv(5, 16, 1, "10.0.0.1", 29500, "env")


def test_srun_one_task_per_rank():
    env = srun_task(9, 16, 1)
    e = detect(env)
    assert (e.rank, e.world_size, e.local_rank, e.source) == (9, 16, 1, "slurm")
    assert e.master_addr == "gpu003"  # the first host runs task 0
    assert e.master_port == port_for_job("4242") == detect(srun_task(0, 16, 0)).master_port


def test_srun_prefers_the_step_nodelist_and_exported_master():
    env = srun_task(1, 2, 1, nodelist="gpu[001-008]", SLURM_STEP_NODELIST="gpu[005-006]")
    assert detect(env).master_addr == "gpu005"
    env.update(MASTER_ADDR="10.1.1.1", MASTER_PORT="23456")
    assert (detect(env).master_addr, detect(env).master_port) == ("10.1.1.1", 23456)


def test_srun_uses_the_hostnames_function():
    seen = []

    def hostnames(nodelist):
        seen.append(nodelist)
        return ["resolved-first", "second"]

    assert detect(srun_task(1, 2, 1), hostnames=hostnames).master_addr == "resolved-first"
    assert seen == ["gpu[003-004]"]


def test_job_ports_differ_between_jobs_and_avoid_ephemeral_range():
    ports = {port_for_job(str(j)) for j in range(1000, 1100)}
    assert len(ports) == 100
    assert all(15000 <= p < 32768 for p in ports)
    assert 15000 <= port_for_job("prterun-host-1@1") < 32768


def test_openmpi_one_node_uses_loopback():
    e = detect(mpirun_rank(1, 2, 1, 2))
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.source) == (1, 2, 1, "127.0.0.1", "openmpi")
    assert e.master_port == detect(mpirun_rank(0, 2, 0, 2)).master_port  # every rank derives the same port


def test_openmpi_multi_node_needs_master_addr():
    with pytest.raises(LaunchEnvError, match="MASTER_ADDR is not set"):
        detect(mpirun_rank(3, 16, 3, 8))
    e = detect(mpirun_rank(3, 16, 3, 8, MASTER_ADDR="node1", MASTER_PORT="29600"))
    assert (e.master_addr, e.master_port) == ("node1", 29600)


def test_mpirun_inside_a_slurm_batch_script():
    # The ranks inherit the batch script's SLURM_* (no step); mpirun's numbering is the one to use.
    env = dict(
        mpirun_rank(3, 4, 3, 4),
        SLURM_JOB_ID="7",
        SLURM_PROCID="0",
        SLURM_NTASKS="4",
        SLURM_LOCALID="0",
        SLURM_JOB_NODELIST="n[1-2]",
    )
    e = detect(env)
    assert (e.rank, e.world_size, e.local_rank, e.source) == (3, 4, 3, "openmpi")


def test_env_wins_over_slurm_when_a_per_node_launcher_started_us():
    # srun started one torchrun per node; torchrun numbers the ranks, its rendezvous decides the order.
    env = srun_task(
        0,
        2,
        0,
        RANK="9",
        WORLD_SIZE="16",
        LOCAL_RANK="1",
        MASTER_ADDR="gpu003",
        MASTER_PORT="1234",
        TORCHELASTIC_RUN_ID="77",
    )
    assert (detect(env).rank, detect(env).source) == (9, "env")
    env.update(WORLD_SIZE="2", RANK="1")  # --nproc-per-node=1: same world size, rendezvous order may differ
    assert detect(env).rank == 1


def test_deepspeed_local_launcher_inside_a_batch_script():
    # The batch shell has SLURM_PROCID=0 and no step; deepspeed's launcher set RANK/CROSS_RANK.
    env = {
        "SLURM_JOB_ID": "5",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_LOCALID": "0",
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }
    assert detect(env).rank == 1
    assert detect(dict(env, CROSS_RANK="0")).rank == 1


def test_single_process_when_nothing_is_set():
    e = detect({})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.source) == (0, 1, 0, "127.0.0.1", "single")
    assert 0 < e.master_port < 65536


# -- errors -----------------------------------------------------------------------------------------


def test_nothing_found_is_an_error_when_single_process_is_not_allowed():
    with pytest.raises(LaunchEnvError, match="no launcher environment found.*deepspeed, torchrun, srun or mpirun"):
        detect({}, single_process_ok=False)
    # a lone SLURM_NTASKS (an salloc shell) is no launcher either
    with pytest.raises(LaunchEnvError, match="no launcher environment found"):
        detect({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "1"}, single_process_ok=False)


def test_rank_without_world_size():
    with pytest.raises(LaunchEnvError, match="only one of RANK and WORLD_SIZE"):
        detect({"RANK": "0"})
    with pytest.raises(LaunchEnvError, match="only one of RANK and WORLD_SIZE"):
        detect({"WORLD_SIZE": "2"})


def test_non_integer_values_name_the_variable():
    with pytest.raises(LaunchEnvError, match="SLURM_PROCID='x' is not an integer"):
        detect(srun_task(0, 2, 0, SLURM_PROCID="x"))


def test_rank_outside_world():
    with pytest.raises(LaunchEnvError, match="rank 4 is outside world size 4"):
        detect({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    with pytest.raises(LaunchEnvError, match="local rank 3 is outside world size 2"):
        detect({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "MASTER_ADDR": "a", "MASTER_PORT": "1"})


def test_exported_rank_disagrees_with_srun():
    env = srun_task(3, 4, 3, RANK="0", WORLD_SIZE="4", MASTER_ADDR="a", MASTER_PORT="1")
    with pytest.raises(LaunchEnvError, match="RANK=0 disagrees with SLURM_PROCID=3"):
        detect(env)
    env.update(RANK="3", LOCAL_RANK="0")
    with pytest.raises(LaunchEnvError, match="LOCAL_RANK=0 disagrees with SLURM_LOCALID=3"):
        detect(env)
    env.update(LOCAL_RANK="3")
    assert detect(env).rank == 3  # consistent values are fine


def test_exported_world_size_smaller_than_srun_tasks():
    env = srun_task(1, 2, 1, RANK="0", WORLD_SIZE="1")  # e.g. left over from a single-process run
    with pytest.raises(LaunchEnvError, match="WORLD_SIZE=1 but the launcher started 2 tasks"):
        detect(env)


def test_exported_rank_disagrees_with_mpirun():
    env = mpirun_rank(1, 2, 1, 2, RANK="0", WORLD_SIZE="2", MASTER_ADDR="a", MASTER_PORT="1")
    with pytest.raises(LaunchEnvError, match="RANK=0 disagrees with OMPI_COMM_WORLD_RANK=1"):
        detect(env)


def test_batch_script_without_srun_is_an_error():
    env = srun_task(0, 8, 0)
    del env["SLURM_STEP_ID"]  # the batch script itself: no step
    with pytest.raises(LaunchEnvError, match="not started by srun.*the other 7 ranks would never come"):
        detect(env)
    env["SLURM_STEP_ID"] = str(0xFFFFFFFB)  # Slurm's id of the batch step
    with pytest.raises(LaunchEnvError, match="not started by srun"):
        detect(env)
    env.update(SLURM_NTASKS="1", SLURM_STEP_NUM_TASKS="1")  # --ntasks=1: one process is right
    assert detect(env).world_size == 1


def test_multi_rank_env_without_master_address():
    with pytest.raises(LaunchEnvError, match="MASTER_ADDR is not set"):
        detect({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"})
    with pytest.raises(LaunchEnvError, match="MASTER_PORT is not set"):
        detect({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a"})
    with pytest.raises(LaunchEnvError, match="MASTER_PORT=70000 is not a TCP port"):
        detect({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "70000"})


# -- devices ----------------------------------------------------------------------------------------


@pytest.fixture
def fake_gpus(monkeypatch):
    """Pretend `n` GPUs are visible; record which one becomes current."""
    import torch

    chosen = []

    def set_count(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda i: chosen.append(i))
        return chosen

    return set_count


def test_pick_device_uses_the_local_rank(fake_gpus):
    from megagpt2.distributed import pick_device

    chosen = fake_gpus(8)
    assert str(pick_device("auto", 5)) == "cuda:5" and chosen == [5]
    assert str(pick_device("cpu", 5)) == "cpu"
    with pytest.raises(RuntimeError, match="local rank 9 but only 8 GPUs visible"):
        pick_device("auto", 9)


def test_pick_device_with_one_gpu_per_task(fake_gpus):
    from megagpt2.distributed import pick_device

    chosen = fake_gpus(1)  # srun --gpus-per-task=1: each task sees only its own GPU
    assert str(pick_device("cuda", 3)) == "cuda:0" and chosen == [0]


def test_pick_device_cuda_requested_without_gpus(fake_gpus):
    from megagpt2.distributed import pick_device

    fake_gpus(0)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        pick_device("cuda", 0)
    assert str(pick_device("auto", 0)) == "cpu"
