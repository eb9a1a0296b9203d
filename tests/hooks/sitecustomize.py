"""Test hooks for training processes started by real launchers (deepspeed, torchrun, mpirun, srun, sbatch).

Active only where a test puts this directory on PYTHONPATH (Python imports `sitecustomize` at start-up,
so every process a launcher starts gets it without a wrapper script):

  MEGAGPT2_TEST_STEP_SECONDS=S   every training step takes at least S seconds longer, so a test's
                                 signal lands while the run is still going (the losses are unchanged)

The trainer is patched when it is first imported; processes that never import it (the launchers
themselves) are not slowed down or made to import torch.
"""

import importlib.abc
import importlib.util
import os
import sys
import time

_DELAY = float(os.environ.get("MEGAGPT2_TEST_STEP_SECONDS", "0") or 0)
_TARGET = "megagpt2.training.trainer"


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module):
            run(module)
            step = module.Trainer.train_step

            def slow_step(self):
                result = step(self)
                time.sleep(_DELAY)
                return result

            module.Trainer.train_step = slow_step

        loader.exec_module = exec_module
        return spec


if _DELAY > 0:
    sys.meta_path.insert(0, _PatchOnImport())
