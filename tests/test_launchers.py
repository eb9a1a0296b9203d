"""Stop requests without training: launcher detection, the launcher watch, a rank's signal handling and
launch/graceful.py, with small stand-in processes (no torch: each test takes about a second)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from megagpt2.launchers import Launcher, LauncherWatch, launcher_name
from tests.launch_utils import REPO, launcher_env

# A stand-in rank: the entry's Signals, a "step" every 0.05 s, the loop's stop rule and exit code
# (POLL=0: a step that never ends).
RANK = textwrap.dedent(r"""
    import os, sys, time
    from megagpt2.training.signals import Signals
    s = Signals()
    say = lambda text: os.write(1, (text + "\n").encode())  # one write: ranks share the pipe
    say(f"ready {os.getpid()}")
    deadline, poll = time.time() + 30, os.environ.get("POLL") != "0"
    while time.time() < deadline and not (poll and s.code()):
        time.sleep(0.05)
    code = s.code()
    say(f"stopped {os.getpid()} {s.describe(code) if code else 'never'}")
    sys.exit(s.exit_code(code))
""")
# A stand-in launcher that forwards nothing (like deepspeed's runner): starts N ranks, waits for them,
# exits 1 if any failed, and reports any signal that reaches it.
LAUNCHER = textwrap.dedent("""
    import signal, subprocess, sys
    def seen(n, f):
        print("launcher got", signal.Signals(n).name, flush=True)
    for n in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(n, seen)
    ranks = [subprocess.Popen([sys.executable, sys.argv[1]]) for _ in range(int(sys.argv[2]))]
    sys.exit(max(p.wait() for p in ranks) and 1)
""")
# A stand-in mpirun: forwards SIGUSR1 to its ranks; SIGTERM kills them.
MPIRUN = textwrap.dedent("""
    import signal, subprocess, sys
    ranks = [subprocess.Popen([sys.executable, sys.argv[1]]) for _ in range(2)]
    def usr1(n, f):
        print("mpirun got SIGUSR1", flush=True)
        [p.send_signal(signal.SIGUSR1) for p in ranks]
    def term(n, f):
        print("mpirun got SIGTERM", flush=True)
        [p.kill() for p in ranks]
    signal.signal(signal.SIGUSR1, usr1)
    signal.signal(signal.SIGTERM, term)
    sys.exit(max(p.wait() for p in ranks) and 1)
""")


@pytest.fixture
def scripts(tmp_path) -> dict[str, Path]:
    out = {}
    for name, text in (("rank.py", RANK), ("launcher.py", LAUNCHER), ("mpirun", "#!" + sys.executable + MPIRUN)):
        (tmp_path / name).write_text(text)
        out[name] = tmp_path / name
    out["mpirun"].chmod(0o755)
    return out


def start(cmd: list, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=REPO, env=launcher_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def stopped(out: str, reason: str) -> int:
    """How many stand-in ranks stopped for `reason`."""
    return len(re.findall(rf"^stopped \d+ {re.escape(reason)}$", out, re.M))


def wait_ready(proc: subprocess.Popen, ranks: int) -> list[str]:
    """Lines up to the `ranks`-th "ready" (the ranks have installed their handlers)."""
    lines: list[str] = []
    while sum(line.startswith("ready") for line in lines) < ranks:
        line = proc.stdout.readline()
        assert line, f"ended before {ranks} ranks were ready:\n{''.join(lines)}"
        lines.append(line)
    return lines


@pytest.mark.parametrize(
    "argv, name",
    [
        (["/venv/bin/python", "/venv/bin/deepspeed", "--num_gpus", "8", "train.py"], "deepspeed"),
        (
            ["python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=x", "train.py"],
            "deepspeed.launcher.launch",
        ),
        (["/usr/bin/python3.11", "-m", "deepspeed.launcher.runner", "--launcher", "slurm"], "deepspeed"),
        (["python", "/venv/bin/torchrun", "--standalone", "train.py"], "torchrun"),
        (["python3", "-X", "dev", "-m", "torch.distributed.run", "train.py"], "torchrun"),
        (["/opt/openmpi/bin/prterun", "-np", "2", "python"], "mpirun"),
        (["srun", "-n", "2", "python"], "srun"),
        (["python", "launch/graceful.py", "deepspeed"], "launch/graceful.py"),
        (["/bin/bash", "launch/mpirun.sh", "-np", "2"], "launch/mpirun.sh"),
        (["python", "launch/pretrain_gpt2.py", "--config", "x"], None),
        (["python", "-m", "pytest", "-q"], None),
        (["python", "-c", "import deepspeed"], None),
        (["/bin/bash"], None),
        (["slurmstepd: [7.0]"], None),
        ([], None),
    ],
)
def test_launcher_name(argv, name):
    assert launcher_name(argv) == name


def test_the_watch_sees_a_launcher_exit_become_a_zombie_or_its_pid_reused():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = Launcher(proc.pid, psutil.Process(proc.pid).create_time(), "deepspeed")
        watch = LauncherWatch([me])
        assert watch.gone() is None
        proc.kill()
        deadline = time.time() + 10
        while watch.gone() is None and time.time() < deadline:  # a zombie until reaped: gone already
            time.sleep(0.05)
        assert watch.gone() == me and me.describe() == f"launcher deepspeed (pid {proc.pid})"
    finally:
        proc.kill()
        proc.wait()
    assert watch.gone() == me  # reaped
    assert LauncherWatch([Launcher(os.getpid(), 1.0, "torchrun")]).gone() is not None  # another process's pid


def test_a_rank_finds_the_launchers_above_it(tmp_path):
    # Named like the console script: `python <venv>/bin/torchrun ...` is what a launcher looks like.
    (tmp_path / "torchrun").write_text("import subprocess, sys\nsys.exit(subprocess.call(sys.argv[1:]))\n")
    probe = (
        "from megagpt2.launchers import LauncherWatch; "
        "print([(x.name, x.pid) for x in LauncherWatch.of_this_process().launchers])"
    )
    out = subprocess.run(
        [sys.executable, str(tmp_path / "torchrun"), sys.executable, "-c", probe],
        cwd=REPO,
        env=launcher_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.startswith("[('torchrun', ") and out.stdout.count("(") == 1, out  # pytest is no launcher


@pytest.mark.parametrize(
    "signals, code, reason",
    [
        ([signal.SIGTERM], 0, "SIGTERM"),
        ([signal.SIGUSR1], 0, "SIGUSR1"),
        ([signal.SIGINT], 130, "SIGINT"),
        ([signal.SIGTERM, signal.SIGTERM], 0, "SIGTERM"),  # Slurm and our batch script both send it
    ],
)
def test_a_rank_stops_on_each_signal_with_its_exit_code(scripts, signals, code, reason):
    proc = start([sys.executable, str(scripts["rank.py"])])
    wait_ready(proc, 1)
    for sig in signals:
        proc.send_signal(sig)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == code and f"stopped {proc.pid} {reason}" in out, out
    assert f"got {reason}: finishing this step, then checkpointing and stopping" in out


def test_a_second_ctrl_c_exits_at_once(scripts):
    proc = start([sys.executable, str(scripts["rank.py"])], POLL="0")
    wait_ready(proc, 1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130 and "second SIGINT: exiting now without a checkpoint" in out, out


def test_a_rank_stops_when_its_launcher_dies(scripts, tmp_path):
    (tmp_path / "deepspeed").write_text(LAUNCHER)  # a runner named like deepspeed's, killed like it is
    proc = start([sys.executable, str(tmp_path / "deepspeed"), str(scripts["rank.py"]), "2"])
    lines = wait_ready(proc, 2)
    proc.kill()
    out = "".join(lines) + proc.communicate(timeout=60)[0]  # the ranks hold the pipe until they exit
    assert out.count("stopped") == 2 and out.count(f"launcher deepspeed (pid {proc.pid}) exited") == 2, out


def test_graceful_sends_each_signal_to_the_ranks_never_to_the_launcher(scripts):
    for sig, code in ((signal.SIGTERM, 0), (signal.SIGINT, 130), (signal.SIGUSR1, 0)):
        name = signal.Signals(sig).name
        proc = start(
            [
                sys.executable,
                "launch/graceful.py",
                sys.executable,
                str(scripts["launcher.py"]),
                str(scripts["rank.py"]),
                "2",
            ]
        )
        wait_ready(proc, 2)
        proc.send_signal(sig)
        out = proc.communicate(timeout=60)[0]
        assert proc.returncode == code, (name, out)
        assert stopped(out, name) == 2, (name, out)  # each rank, with the signal as its reason
        assert "launcher got" not in out and f"got {name}: passing it to the training ranks" in out


def test_graceful_delivers_a_signal_to_ranks_that_register_after_it(scripts):
    proc = start(
        [
            sys.executable,
            "launch/graceful.py",
            sys.executable,
            str(scripts["launcher.py"]),
            str(scripts["rank.py"]),
            "2",
        ]
    )
    time.sleep(0.3)  # the wrapper is up (its handlers come first), the ranks are still starting
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and stopped(out, "SIGTERM") == 2, out


def test_graceful_turns_every_signal_into_sigusr1_for_mpirun(scripts):
    proc = start([sys.executable, "launch/graceful.py", str(scripts["mpirun"]), str(scripts["rank.py"])])
    wait_ready(proc, 2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and stopped(out, "SIGUSR1") == 2, out
    assert "got SIGTERM: sending SIGUSR1 to the launcher" in out

    proc = start([sys.executable, "launch/graceful.py", str(scripts["mpirun"]), str(scripts["rank.py"])], POLL="0")
    wait_ready(proc, 2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)  # the second Ctrl-C: SIGTERM to mpirun, which ends the ranks
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130 and "mpirun got SIGTERM" in out, out


def test_graceful_reports_a_command_that_cannot_start():
    from megagpt2.graceful import main

    assert main(["/nonexistent/launcher", "x"]) == 127
    assert main([]) == 2
