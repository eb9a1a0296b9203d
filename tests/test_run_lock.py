"""The checkpoint directory's lock: held, released, stale holders on this machine, other hosts, requeues."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from megagpt2.training import lock as L
from megagpt2.training.lock import LOCK_NAME, LockError, LockHeld, RunLock


def write_lock(directory, **fields) -> dict:
    """A lock file as another run would leave it: this process's identity with `fields` changed."""
    info = {**L.identity("0" * 32), **fields}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCK_NAME).write_text(json.dumps(info))
    return info


def age(directory, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(directory / LOCK_NAME, (t, t))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_acquire_writes_the_holder_and_release_removes_it(tmp_path):
    lock = RunLock.acquire(str(tmp_path / "new" / "dir"))  # creates the directory
    info = json.loads((tmp_path / "new" / "dir" / LOCK_NAME).read_text())
    assert info["pid"] == os.getpid() and info["token"] == lock.token and info["host"]
    assert lock.took_over is None and lock.held()
    lock.release()
    assert not (tmp_path / "new" / "dir" / LOCK_NAME).exists()
    lock.release()  # twice is harmless


def test_a_live_holder_on_this_machine_is_refused_with_its_name(tmp_path):
    lock = RunLock.acquire(str(tmp_path))
    try:
        with pytest.raises(LockHeld) as e:
            RunLock.acquire(str(tmp_path))
        msg = str(e.value)
        assert f"checkpoint.dir {tmp_path} is in use by another run: pid {os.getpid()} on this machine" in msg
        assert f"lock file {tmp_path / LOCK_NAME}" in msg and "--checkpoint.dir" in msg
    finally:
        lock.release()


@pytest.mark.parametrize(
    "fields, why",
    [
        (lambda: {"pid": dead_pid()}, "on this machine is gone"),
        (lambda: {"started": 12345.0}, "on this machine is gone"),  # our pid, but another process's start time
    ],
)
def test_a_dead_holder_on_this_machine_is_taken_over_at_once(tmp_path, fields, why):
    write_lock(tmp_path, **fields())
    lock = RunLock.acquire(str(tmp_path))
    assert lock.took_over and why in lock.took_over and f"stale lock {tmp_path / LOCK_NAME}" in lock.took_over
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.token
    assert not list(tmp_path.glob("*.stale-*"))
    lock.release()


def test_another_host_is_judged_by_its_heartbeat(tmp_path):
    write_lock(tmp_path, host="node7", boot_id="another-machine", pid=4242, job="slurm 99")
    with pytest.raises(LockHeld, match=r"pid 4242 on host node7, job slurm 99, since .*last heartbeat \d+ s ago"):
        RunLock.acquire(str(tmp_path))
    age(tmp_path, L.STALE_AFTER_S + 30)
    lock = RunLock.acquire(str(tmp_path))
    assert "no heartbeat for" in lock.took_over and "host node7" in lock.took_over
    lock.release()


def test_the_previous_run_of_a_requeued_slurm_job_is_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    write_lock(tmp_path, host="node7", boot_id="another-machine", job="slurm 77", restart=0)
    with pytest.raises(LockHeld):  # the same run of the same job on another node: still alive
        RunLock.acquire(str(tmp_path))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = RunLock.acquire(str(tmp_path))
    assert "previous run (restart 0) of this Slurm job" in lock.took_over
    lock.release()


def test_another_pid_namespace_on_this_machine_is_judged_by_its_heartbeat(tmp_path):
    write_lock(tmp_path, pid=dead_pid(), pid_namespace=-1)  # a container: its pids are not ours to check
    with pytest.raises(LockHeld):
        RunLock.acquire(str(tmp_path))


def test_an_unreadable_lock_is_held_while_fresh(tmp_path):
    (tmp_path / LOCK_NAME).write_text("{not json")
    with pytest.raises(LockHeld, match="being written or is unreadable"):
        RunLock.acquire(str(tmp_path))
    age(tmp_path, L.STALE_AFTER_S + 1)
    lock = RunLock.acquire(str(tmp_path))
    assert "unreadable and untouched" in lock.took_over
    lock.release()


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    lock = RunLock.acquire(str(tmp_path))
    write_lock(tmp_path, token="f" * 32)  # taken over by another run meanwhile
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == "f" * 32


def test_takeover_gives_back_a_lock_that_changed_since_it_was_judged(tmp_path):
    path = tmp_path / LOCK_NAME
    write_lock(tmp_path, token="a" * 32)
    judged = path.read_bytes()
    write_lock(tmp_path, token="b" * 32)  # another run replaced the stale lock first
    assert not L._remove_stale(path, judged, "c" * 32)
    assert json.loads(path.read_text())["token"] == "b" * 32 and not list(tmp_path.glob("*.stale-*"))
    assert L._remove_stale(path, path.read_bytes(), "c" * 32) and not path.exists()


def test_the_heartbeat_touches_the_lock_and_warns_when_it_is_lost(tmp_path, capfd):
    lock = RunLock.acquire(str(tmp_path), heartbeat=0.05)
    try:
        age(tmp_path, 1000)
        deadline = time.time() + 10
        while time.time() - (tmp_path / LOCK_NAME).stat().st_mtime > 100 and time.time() < deadline:
            time.sleep(0.05)
        assert time.time() - (tmp_path / LOCK_NAME).stat().st_mtime < 100, "no heartbeat"
        write_lock(tmp_path, token="f" * 32)
        lock._thread.join(timeout=10)
        assert not lock._thread.is_alive()
        assert "was removed or taken over by another run" in capfd.readouterr().err
    finally:
        lock.release()


def test_job_ids():
    assert L.job_id({"SLURM_JOB_ID": "12"}) == "slurm 12"
    assert L.job_id({"TORCHELASTIC_RUN_ID": "abc"}) == "torchelastic abc"
    assert L.job_id({}) is None


def test_a_directory_that_cannot_be_written_is_a_lock_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(LockError, match=r"checkpoint.dir .*file/ckpt: cannot create its lock file .*--checkpoint.dir"):
        RunLock.acquire(str(tmp_path / "file" / "ckpt"))
