"""The training entry with test hooks that kill this process with SIGKILL at a chosen moment.

KILL_AFTER_SAVE_STEP=N   after the checkpoint of step N is complete (every rank)
KILL_BEFORE_COMPLETE_STEP=N   while saving step N, after the data files, before COMPLETE (rank 0)
FIRST_FORMAT=1   save checkpoints in the first format (DeepSpeed .pt files; tests/first_format.py)
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt2.checkpoint import store as C  # noqa: E402
from megagpt2.training import main  # noqa: E402
from megagpt2.training import trainer as T  # noqa: E402

after = int(os.environ.get("KILL_AFTER_SAVE_STEP", "0"))
before_complete = int(os.environ.get("KILL_BEFORE_COMPLETE_STEP", "0"))

if after:
    _save = T.Trainer.save

    def save(self):
        tag = _save(self)
        if self.step == after:
            os.kill(os.getpid(), signal.SIGKILL)
        return tag

    T.Trainer.save = save

if before_complete:
    _write = C._write_atomic

    def write(path, text):
        if path.name == "COMPLETE" and path.parent.name == C.tag_for(before_complete):
            os.kill(os.getpid(), signal.SIGKILL)
        _write(path, text)

    C._write_atomic = write

if os.environ.get("FIRST_FORMAT") == "1":
    from tests.first_format import save_first_format  # noqa: E402

    C.save = save_first_format

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
