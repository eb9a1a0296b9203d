"""Pipeline parallelism under the plain DeepSpeed engine (so ZeRO-2 works with TP x PP x DP).

    model, runner = build_stage(cfg, ps)     # this rank's layers and its schedule
    engine = deepspeed.initialize(model=model, ..., mpu=ps)
    runner.attach(engine)
    mean_loss, nonfinite = runner.train_step(engine, data, device, accum, on_nonfinite)

See docs/pipeline.md for the schedules, the tied-embedding protocol and the DeepSpeed behaviour
this relies on.
"""

from __future__ import annotations

from ..config import Config
from ..parallel import ParallelState
from .p2p import build_channels
from .partition import LayoutError, StageLayout, partition
from .runner import PipelineRunner
from .schedules import SCHEDULES, build_schedule, check_layout, simulate, theoretical_bubble
from .stage import PipelineStage


def build_stage(cfg: Config, ps: ParallelState) -> tuple[PipelineStage, PipelineRunner]:
    """This rank's PipelineStage and the runner of its schedule (collective: creates groups)."""
    layout = partition(cfg.model, ps.pp_size, cfg.parallel.virtual_stages, cfg.parallel.partition)
    model = PipelineStage(cfg.model, ps, layout, cfg.parallel.sequence_parallel, seed=cfg.train.seed)
    channels = build_channels(ps, cfg.parallel.timeout_seconds)
    return model, PipelineRunner(cfg, ps, model, channels)


__all__ = ["build_stage", "PipelineStage", "PipelineRunner", "StageLayout", "LayoutError", "partition",
           "SCHEDULES", "build_schedule", "check_layout", "simulate", "theoretical_bubble"]
