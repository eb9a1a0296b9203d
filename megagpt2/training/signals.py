"""Stop requests from the scheduler, remembered until the training loop can act on them."""

from __future__ import annotations

import signal
from typing import Optional


class Signals:
    """SIGTERM/SIGUSR1 (Slurm's warning before the time limit) set a flag the loop polls.

    Installed as early as possible (training.main does it before any setup), so a signal that
    arrives during start-up is remembered instead of killing the rank."""

    def __init__(self):
        self.received: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum
