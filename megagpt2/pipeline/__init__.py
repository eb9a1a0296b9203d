"""Pipeline parallelism under the plain DeepSpeed engine (so ZeRO-2 works with TP x PP x DP).

    partition.py  which blocks each stage owns (StageLayout)       no torch: the run plan uses it
    schedules.py  the order of forward/backward passes per rank    no torch: the run plan uses it
    stage.py      PipelineStage: this rank's modules, one chunk per forward
    p2p.py        activation and gradient messages between stages
    tied.py       the embedding shared by the first and the last stage
    executor.py   StepExecutor: one optimizer step for every layout (pp=1 is the `none` schedule)

    model = PipelineStage(cfg.model, groups, split, cfg.parallel.sequence_parallel, seed)
    engine = deepspeed.initialize(model=model, ..., mpu=groups)
    executor = StepExecutor(engine, model, groups, cfg.parallel, cfg.train.on_nonfinite)
    result = executor.train_step(micro_batches)

See docs/pipeline.md for the schedules, the tied-embedding protocol and the DeepSpeed behaviour
this relies on. Only the torch-free modules are imported here.
"""

from .partition import PartitionError, StageLayout, partition
from .schedules import SCHEDULES, build_schedule, check_layout, simulate, theoretical_bubble

__all__ = [
    "PartitionError",
    "StageLayout",
    "partition",
    "SCHEDULES",
    "build_schedule",
    "check_layout",
    "simulate",
    "theoretical_bubble",
]
