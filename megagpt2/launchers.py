"""Which processes are launchers, and whether the ones that started this rank are still there.

    name = launcher_name(["python", "/venv/bin/deepspeed", "--num_gpus", "8", "train.py"])  # "deepspeed"
    watch = LauncherWatch.of_this_process()    # deepspeed's runner and its per-node launcher, say
    gone = watch.gone()                       # None, or the first of them that exited

Why: `deepspeed`'s runner has no signal handler. A SIGTERM, SIGINT or SIGUSR1 sent to it (what `kill`,
a terminal or a scheduler signalling the job's top process do) ends the runner and nothing else: its
per-node launcher and the ranks train on unattended. The ranks cannot be told, but they can notice:
each rank remembers the launcher processes above it (up to the first process that is not one) and the
training loop checks once per step that they still run; when one is gone the rank stops the way a
SIGTERM would make it (finish the step, checkpoint, exit). The same covers torchrun killed by SIGUSR1
and any launcher that crashes. Process identity is (pid, start time), so a reused pid is not mistaken
for the launcher.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

# Programs that are launchers by themselves (basename of argv[0]).
PROGRAMS = {
    "mpirun": "mpirun",
    "mpiexec": "mpirun",
    "prterun": "mpirun",
    "prted": "mpirun",
    "orterun": "mpirun",
    "orted": "mpirun",
    "prte": "mpirun",
    "srun": "srun",
    "torchrun": "torchrun",
    "deepspeed": "deepspeed",
}
# Scripts run by an interpreter (python, bash): console scripts and our own wrappers.
SCRIPTS = {
    "deepspeed": "deepspeed",
    "torchrun": "torchrun",
    "graceful.py": "launch/graceful.py",
    "mpirun.sh": "launch/mpirun.sh",
}
# python -m <module>
MODULES = {
    "deepspeed.launcher.runner": "deepspeed",
    "deepspeed.launcher.launch": "deepspeed.launcher.launch",
    "torch.distributed.run": "torchrun",
    "torch.distributed.launch": "torchrun",
    "megagpt2.graceful": "launch/graceful.py",
}
# Set by launch/graceful.py for the processes it starts: a directory where each rank leaves its pid.
RANK_PIDS_ENV = "MEGAGPT2_RANK_PIDS"
_INTERPRETER_OPTIONS_WITH_VALUE = {"-X", "-W", "-Q", "-o", "-O"}  # python -X dev / -W error, bash -o pipefail


def launcher_name(argv: Sequence[str]) -> Optional[str]:
    """The launcher a command line runs ("deepspeed", "torchrun", "mpirun", "srun", ...), or None."""
    if not argv:
        return None
    prog = os.path.basename(argv[0])
    if prog in PROGRAMS:
        return PROGRAMS[prog]
    if not (prog.startswith("python") or prog in ("bash", "sh", "dash")):
        return None
    args = list(argv[1:])
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-m":
            return MODULES.get(args[i + 1]) if i + 1 < len(args) else None
        if a == "-c":
            return None
        if a in _INTERPRETER_OPTIONS_WITH_VALUE:
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        return SCRIPTS.get(os.path.basename(a))
    return None


@dataclass(frozen=True)
class Launcher:
    pid: int
    started: float  # psutil create_time: with the pid, the identity of the process
    name: str

    def describe(self) -> str:
        return f"launcher {self.name} (pid {self.pid})"


class LauncherWatch:
    """The launcher processes above this one; `gone()` says whether one of them has exited."""

    def __init__(self, launchers: Sequence[Launcher]):
        self.launchers = list(launchers)

    @classmethod
    def of_this_process(cls, max_depth: int = 8) -> "LauncherWatch":
        """Walk up from the parent while the processes are launchers (none: nothing to watch)."""
        import psutil

        found: list[Launcher] = []
        try:
            proc = psutil.Process(os.getpid()).parent()
            while proc is not None and len(found) < max_depth:
                name = launcher_name(proc.cmdline())
                if name is None:
                    break
                found.append(Launcher(proc.pid, proc.create_time(), name))
                proc = proc.parent()
        except (psutil.Error, OSError):
            pass  # a parent we may not inspect (another user's, gone already): watch what we found
        return cls(found)

    def gone(self) -> Optional[Launcher]:
        """The first watched launcher that no longer runs (exited, a zombie, or its pid reused)."""
        import psutil

        for launcher in self.launchers:
            try:
                proc = psutil.Process(launcher.pid)
                alive = abs(proc.create_time() - launcher.started) < 0.5 and proc.status() != psutil.STATUS_ZOMBIE
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                alive = False
            except psutil.Error:
                alive = True  # cannot tell (permissions): never stop a run on a guess
            if not alive:
                return launcher
        return None
