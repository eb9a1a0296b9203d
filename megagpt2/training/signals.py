"""Stop requests (signals, a launcher that went away), remembered until the training loop acts on them.

The loop asks `Signals.code()` once per step; the ranks agree on the highest code (an all-reduce
MAX), finish the step, save a checkpoint and exit with `exit_code(...)`:

  SIGTERM  kill, scancel, preemption, a launcher shutting down   checkpoint, exit 0
  SIGUSR1  Slurm's warning before the time limit                 checkpoint, exit 0
  SIGINT   Ctrl-C                                                checkpoint, exit 130 (as an interrupted
           command does); a SIGINT while a stop is already pending exits at once with 130, unsaved
  launcher gone  the deepspeed runner / torchrun above this rank exited (megagpt2.launchers): checkpoint, exit 0
  time limit     train.max_minutes (the trainer's own clock)         checkpoint, exit 0

Handlers are installed first thing in the entry, so a signal during start-up is kept, not fatal, and
stay until the process exits: a late one (a launcher's own SIGTERM after the batch script's) must not
turn a clean exit into a kill.
Under launch/graceful.py (which reports 130 after Ctrl-C itself) a rank registers its pid with the
wrapper and exits 0 after any clean stop, so launchers that treat a non-zero rank as a failure stay quiet.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Callable, Optional

from ..launchers import RANK_PIDS_ENV, Launcher, LauncherWatch

# Stop codes; the ranks agree on the maximum, so SIGINT (exit 130) wins over the others.
NONE, TIME_LIMIT, LAUNCHER_GONE, SIGUSR1, SIGTERM, SIGINT = range(6)
_OF_SIGNAL = {signal.SIGUSR1: SIGUSR1, signal.SIGTERM: SIGTERM, signal.SIGINT: SIGINT}
_NAMES = {
    TIME_LIMIT: "time limit",
    LAUNCHER_GONE: "launcher gone",
    SIGUSR1: "SIGUSR1",
    SIGTERM: "SIGTERM",
    SIGINT: "SIGINT",
}


class Signals:
    """SIGTERM / SIGUSR1 / SIGINT handlers and the launcher watch of this rank.

    install=False builds the object without touching the process's handlers (tests, tools)."""

    def __init__(self, install: bool = True, watch: Optional[LauncherWatch] = None):
        self.received: Optional[int] = None  # the first stop signal (signal number)
        self.first_rank = _first_rank_from_env()  # who prints; the entry corrects it once the rank is known
        self.on_exit_now: list[Callable[[], None]] = []  # run before a second Ctrl-C ends the process
        self.under_wrapper = bool(os.environ.get(RANK_PIDS_ENV))
        self.gone: Optional[Launcher] = None
        if install:
            for sig in _OF_SIGNAL:
                signal.signal(sig, self._handle)
            self._register_with_wrapper()
        self.watch = watch if watch is not None else (LauncherWatch.of_this_process() if install else LauncherWatch([]))

    def code(self) -> int:
        """This rank's reason to stop now (NONE, LAUNCHER_GONE or a signal's code)."""
        if self.received is not None:
            return _OF_SIGNAL[signal.Signals(self.received)]
        if self.gone is None:
            self.gone = self.watch.gone()
        return LAUNCHER_GONE if self.gone is not None else NONE

    def describe(self, code: int) -> str:
        """The reason for the log line: "SIGTERM", "time limit", "launcher deepspeed (pid 8123) exited"."""
        if code == LAUNCHER_GONE and self.gone is not None:
            return f"{self.gone.describe()} exited"
        if code == LAUNCHER_GONE:
            return "a rank's launcher exited"
        return _NAMES[code]

    def exit_code(self, code: int) -> int:
        """0 after a clean stop; 130 after Ctrl-C unless launch/graceful.py reports that itself."""
        return 130 if code == SIGINT and not self.under_wrapper else 0

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            self._exit_now()
        if self.received is None:
            self.received = signum
            name = signal.Signals(signum).name
            more = " (Ctrl-C again exits at once, without saving)" if signum == signal.SIGINT else ""
            self._say(f"megagpt2: got {name}: finishing this step, then checkpointing and stopping{more}\n")

    def _exit_now(self) -> None:
        self._say("megagpt2: second SIGINT: exiting now without a checkpoint\n")
        for cleanup in self.on_exit_now:
            try:
                cleanup()
            except Exception:
                pass  # exiting regardless
        os._exit(130)

    def _say(self, text: str) -> None:
        if self.first_rank:
            try:
                os.write(2, text.encode())  # not print(): a handler may interrupt a print in progress
            except OSError:
                pass

    def _register_with_wrapper(self) -> None:
        directory = os.environ.get(RANK_PIDS_ENV)
        if not directory:
            return
        try:
            (Path(directory) / str(os.getpid())).write_text("")
        except OSError:
            pass  # a rank on another node: the wrapper's directory is not here (see launch/graceful.py)


def _first_rank_from_env() -> bool:
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "0") != "0":
            return False
    return True
