#!/usr/bin/env python
"""Run a launcher so that SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 reach the training ranks, which
checkpoint and exit; the command then exits 0 (130 after Ctrl-C). See megagpt2/graceful.py.

    python launch/graceful.py deepspeed --num_gpus 8 launch/pretrain_gpt2.py --config configs/gpt2/124m.yaml
    python launch/graceful.py torchrun --standalone --nproc-per-node 8 launch/pretrain_gpt2.py ...
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt2.graceful import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
