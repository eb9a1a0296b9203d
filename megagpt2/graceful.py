"""Run a launcher so that SIGTERM, SIGINT and SIGUSR1 reach every training rank, and exit as one process
would: the launcher's code (0 after a clean stop), 130 after Ctrl-C.

    python launch/graceful.py deepspeed --num_gpus 8 launch/pretrain_gpt2.py --config configs/gpt2/124m.yaml
    python launch/graceful.py torchrun --standalone --nproc-per-node 8 launch/pretrain_gpt2.py ...
    python launch/graceful.py srun --kill-on-bad-exit=1 python launch/pretrain_gpt2.py ...   # inside salloc
    launch/mpirun.sh -np 8 -- ...                                                             # runs mpirun through it

What the launchers do by themselves with a signal sent to them (measured: deepspeed 0.19.8, torch 2.13,
OpenMPI 5.0, Slurm 22.05):
  deepspeed  SIGTERM, SIGINT, SIGUSR1 end the runner at once (exit 143, 130, 138); the ranks are not
             signalled (they notice the runner is gone and checkpoint: megagpt2.launchers)
  torchrun   SIGTERM, SIGINT reach the ranks, which are SIGKILLed 30 s later; torchrun exits 1.
             SIGUSR1 ends torchrun alone
  mpirun     SIGTERM, SIGINT kill the ranks within a second (exit 1); SIGUSR1 is forwarded
  srun       SIGTERM kills the tasks at once; one SIGINT only prints their state, two kill them;
             SIGUSR1 is forwarded

What this wrapper does:
  deepspeed, torchrun, anything else: the launcher runs in its own process group, so a terminal's
    Ctrl-C reaches this wrapper only, and no signal is sent to it. Each rank writes its pid into a
    private directory named by $MEGAGPT2_RANK_PIDS when it starts; every signal is sent to those
    processes directly (also to ranks that register after it arrived). They finish the step, save and
    exit 0; the launcher then ends normally. Ranks on other nodes have no access to the directory:
    across nodes use Slurm, or mpirun.
  mpirun, srun: they forward SIGUSR1 to every rank on every node, and no other stop signal safely, so
    the wrapper sends SIGUSR1 for all three (and prints which signal it received).
  A second Ctrl-C goes to the ranks as well, which then exit at once (under mpirun and srun the
  launcher gets SIGTERM instead, which kills the ranks); a third kills the launcher's process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from .launchers import RANK_PIDS_ENV, launcher_name

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
USR1_FORWARDERS = ("mpirun", "srun")  # launcher_name()s that forward SIGUSR1 to every rank


class Forwarder:
    """Delivers the signals this process received to the ranks of one running launcher."""

    def __init__(self, pids_dir: Optional[Path]):
        self.pids_dir = pids_dir
        self.proc: Optional[subprocess.Popen] = None  # set once started; signals before that wait for it
        self.received: list[int] = []  # appended by the signal handler, in order
        self.delivered: dict[int, int] = {}  # rank pid -> how many of `received` it got
        self.handled = 0  # how many of `received` were acted on (messages, the launcher's signals)

    def on_signal(self, signum, frame) -> None:
        self.received.append(signum)

    def interrupts(self, upto: Optional[int] = None) -> int:
        return sum(1 for s in self.received[:upto] if s == signal.SIGINT)

    def step(self) -> None:
        """Act on new signals; send pending ones to ranks that registered since."""
        while self.proc is not None and self.handled < len(self.received):
            self._announce(self.handled)
            self.handled += 1
        if self.pids_dir is not None:
            self._to_ranks()

    def _announce(self, i: int) -> None:
        sig, n_int = self.received[i], self.interrupts(i + 1)
        name = signal.Signals(sig).name
        if n_int >= 3 and sig == signal.SIGINT:
            _say("third SIGINT: killing the launcher's process group")
            self._kill_all()
        elif self.pids_dir is None and sig == signal.SIGINT and n_int == 2:
            _say("second SIGINT: sending SIGTERM to the launcher, which ends the ranks now")
            self._launcher().send_signal(signal.SIGTERM)
        elif self.pids_dir is None:
            _say(
                f"got {name}: sending SIGUSR1 to the launcher, which forwards it to every rank; they finish "
                f"the step, save a checkpoint and exit"
            )
            self._launcher().send_signal(signal.SIGUSR1)
        else:
            then = "exit at once" if n_int == 2 and sig == signal.SIGINT else "finish the step, save and exit"
            _say(f"got {name}: passing it to the training ranks ({len(self._rank_pids())} so far); they {then}")

    def _launcher(self) -> subprocess.Popen:
        assert self.proc is not None
        return self.proc

    def _rank_pids(self) -> list[int]:
        assert self.pids_dir is not None
        return sorted(int(p.name) for p in self.pids_dir.iterdir() if p.name.isdigit())

    def _to_ranks(self) -> None:
        for pid in self._rank_pids():
            done = self.delivered.get(pid, 0)
            for sig in self.received[done : self.handled]:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break  # that rank has ended
            self.delivered[pid] = self.handled

    def _kill_all(self) -> None:
        try:
            os.killpg(self._launcher().pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.pids_dir is not None:
            for pid in self._rank_pids():  # torchrun puts each rank in a session of its own
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _say(text: str) -> None:
    print(f"megagpt2 (graceful): {text}", file=sys.stderr, flush=True)


def run(command: Sequence[str], poll_s: float = 0.1) -> int:
    """Start `command`, forward stop signals until it ends; its exit code (130 after Ctrl-C)."""
    direct = launcher_name(command) not in USR1_FORWARDERS
    with tempfile.TemporaryDirectory(prefix="megagpt2-ranks-") as tmp:
        env = dict(os.environ)
        env.pop(RANK_PIDS_ENV, None)  # an enclosing wrapper's directory is not ours
        if direct:
            env[RANK_PIDS_ENV] = tmp
        fwd = Forwarder(Path(tmp) if direct else None)
        previous = {sig: signal.signal(sig, fwd.on_signal) for sig in STOP_SIGNALS}
        try:
            try:
                # Own process group: a terminal's Ctrl-C reaches only this process. No stdin: a
                # background process group reading the terminal would be stopped (SIGTTIN).
                proc = fwd.proc = subprocess.Popen(
                    list(command), env=env, stdin=subprocess.DEVNULL, preexec_fn=os.setpgrp
                )
            except OSError as e:
                _say(f"cannot start {command[0]!r}: {e}")
                return 127
            while proc.poll() is None:
                fwd.step()
                time.sleep(poll_s)
            fwd.step()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    rc = proc.returncode
    if fwd.interrupts():
        return 130
    return 128 - rc if rc < 0 else rc


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":
        args = args[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    return run(args)
