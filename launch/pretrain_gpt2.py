#!/usr/bin/env python
"""Pretrain GPT-2: a thin entry around megagpt2.training.main.

    deepspeed --num_gpus 2 launch/pretrain_gpt2.py --deepspeed_config configs/ds/zero2.json \
        --config configs/gpt2/tiny.yaml --train.steps=100

Also runs under torchrun, srun (one task per rank), mpirun, or as a single process.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt2.training import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
