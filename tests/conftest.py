"""Test-wide settings: one intra-op thread per process (tests start many ranks on few cores)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.eval_fixtures"]  # the tiny trained model shared by evaluation and export tests
