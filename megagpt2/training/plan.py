"""The run plan: every check of a training run, done once, before any process group exists.

    plan = plan_run(cfg, "configs/ds/zero2.json", world_size=8, rank=r)   # or PlanError

Nothing here talks to another process or imports torch, so a mistake fails in well under a
second with one message (the entry prints it on the first rank only and exits 2). Checks run
cheapest first and stop at the first group that fails:

  1. the config's fields and their combinations (config_checks.validate);
  2. the layout (world size over tp x pp), the DeepSpeed JSON (keys DeepSpeed has) and its batch sizes for that
     data-parallel size, the pipeline split and schedule: the same `partition` the stages are
     built from and the same `check_layout` the schedule runs;
  3. the files: every data prefix has a readable .bin/.idx pair (or the fine-tuning jsonl
     exists), data.split parses, train.init_from exists (and is not inside checkpoint.dir, whose
     checkpoint would be resumed instead); paths in messages are absolute, as
     resolved from the directory the run was started in;
  4. the tokenizer (megagpt2.data.run_tokenizer): the explicit one, else the dataset's sidecar,
     else train.init_from's; it builds, agrees with every source and fits model.vocab_size;
  5. the amount of data (data_size.py): a training split smaller than one global batch, or an
     empty one, is refused; one the run reads more than a few times over is a warning.

The plan keeps what it built (layout, typed DeepSpeed config, pipeline split, tokenizer) so the
run uses exactly what was checked, and `notes`: what the first rank prints at the start (where
the run saves, the warnings).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

from ..config import Config, ConfigError, resolve_run_dir
from ..config_checks import validate
from ..ds_config import DeepSpeedConfig, DSConfigError
from ..parallel import ParallelLayout, ParallelLayoutError
from ..pipeline import StageLayout, check_layout, partition
from ..tokenizer import Tokenizer, TokenizerError
from .data_size import data_size_checks

if TYPE_CHECKING:
    from ..data.run_tokenizer import ResolvedTokenizer


class PlanError(ConfigError):
    """The run cannot start as configured; the message says what to change."""


@dataclass(frozen=True)
class RunPlan:
    """A checked run: the config and everything derived from it for one rank."""

    cfg: Config
    ds: DeepSpeedConfig
    layout: ParallelLayout  # this rank's place in the grid
    split: Optional[StageLayout]  # blocks per virtual stage; None without pipelining
    tokenizer: Tokenizer
    tokenizer_summary: str = ""  # which tokenizer and where it came from, for the log
    notes: tuple[str, ...] = ()  # printed at the start by the first rank: where the run saves, warnings

    @property
    def micro_batch(self) -> int:
        return self.ds.micro_batch

    @property
    def grad_accum(self) -> int:
        return self.ds.grad_accum

    @property
    def global_batch(self) -> int:
        return self.ds.global_batch


def plan_run(cfg: Config, ds: Union[str, dict[str, Any]], world_size: int, rank: int = 0) -> RunPlan:
    """Check `cfg` and the DeepSpeed config (a JSON path or its dict) for `world_size` ranks."""
    resolve_run_dir(cfg)  # a config built in code: runs/default
    _raise_if(_config_errors(cfg))
    layout, ds_cfg, split, errors = _layout(cfg, ds, world_size, rank)
    _raise_if(errors)
    _raise_if(data_errors(cfg) + _init_from_errors(cfg))
    resolved, errors = _tokenizer(cfg)
    _raise_if(errors)
    assert layout is not None and ds_cfg is not None and resolved is not None
    errors, warnings = data_size_checks(cfg, ds_cfg.global_batch)
    _raise_if(errors)
    notes = (run_dir_note(cfg),) + tuple(f"warning: {w}" for w in warnings)
    return RunPlan(cfg, ds_cfg, layout, split, resolved.tokenizer, resolved.summary(), notes)


def run_dir_note(cfg: Config) -> str:
    """Where the run writes (or that it writes nothing), for the first lines of the log."""
    path = cfg.checkpoint.dir
    if path is None:
        return "checkpoint.dir=none: nothing is saved (no checkpoints, metrics.jsonl or loss.png)"
    resume = "; its newest checkpoint, if any, is resumed" if cfg.checkpoint.resume else ""
    return f"run directory: {_where(path)}: checkpoints, metrics.jsonl and loss.png go here{resume}"


def _raise_if(errors: list[str]) -> None:
    if len(errors) == 1:
        raise PlanError(errors[0])
    if errors:
        raise PlanError("the run cannot start:\n  " + "\n  ".join(errors))


def _config_errors(cfg: Config) -> list[str]:
    try:
        validate(cfg)
    except ConfigError as e:
        return [str(e)]
    return []


def _layout(cfg: Config, ds: Union[str, dict[str, Any]], world_size: int, rank: int):
    """(layout, DeepSpeed config, pipeline split, errors): the chain that needs the world size."""
    par = cfg.parallel
    try:
        layout = ParallelLayout.for_world(world_size, par.tp, par.pp, par.virtual_stages, rank)
    except ParallelLayoutError as e:
        return None, None, None, [str(e)]
    try:
        ds_cfg = (
            DeepSpeedConfig.read(ds, layout.dp) if isinstance(ds, str) else DeepSpeedConfig.from_dict(ds, layout.dp)
        )
    except DSConfigError as e:
        return layout, None, None, [str(e)]
    return layout, ds_cfg, *_pipeline(cfg, ds_cfg)


def _pipeline(cfg: Config, ds: DeepSpeedConfig) -> tuple[Optional[StageLayout], list[str]]:
    """The pipeline split and schedule: the rules the stages and the executor apply."""
    par = cfg.parallel
    if par.pp == 1:
        if par.virtual_stages > 1:
            return None, [
                f"parallel.virtual_stages={par.virtual_stages} splits pipeline stages into chunks: "
                f"it needs parallel.pp > 1"
            ]
        return None, []
    errors = []
    try:
        split = partition(cfg.model, par.pp, par.virtual_stages, par.partition)
    except ConfigError as e:
        split, errors = None, [str(e)]
    try:
        check_layout(par.schedule, par.pp, par.virtual_stages, ds.grad_accum)
    except ConfigError as e:
        errors.append(str(e))
    if ds.zero_stage > 2:
        errors.append(
            f"{ds.source}: pipeline parallelism supports ZeRO stages 0-2 (ZeRO-3 partitions the "
            f"parameters the stages exchange); set zero_optimization.stage <= 2"
        )
    return split, errors


def _where(path: str) -> str:
    """A path as the user typed it, and where that is from the working directory."""
    full = os.path.abspath(path)
    return path if full == path else f"{path} ({full})"


def data_errors(cfg: Config) -> list[str]:
    """Every training data file exists and reads as what data.format says it is."""
    from ..data.blending import parse_data_path, parse_split

    data = cfg.data
    if not data.path.strip():
        return [
            "data.path is empty: point it at a preprocessed prefix (tools/preprocess_data.py writes "
            '<prefix>.bin and <prefix>.idx) or a blend "0.7 prefixA 0.3 prefixB"'
        ]
    errors = []
    try:
        parse_split(data.split)
    except ValueError as e:
        errors.append(f"data.split: {e}")
    if data.format != "pretrain":
        if not os.path.isfile(data.path):
            errors.append(
                f"data.path={_where(data.path)} does not exist: data.format={data.format} reads "
                f"one .jsonl file (docs/finetuning.md)"
            )
        return errors
    try:
        blend = parse_data_path(data.path)
    except ValueError as e:
        return errors + [f"data.path: {e}"]
    return errors + [e for _, prefix in blend for e in _prefix_errors(prefix)]


def _prefix_errors(prefix: str) -> list[str]:
    from ..data.indexed import IndexedDataset, IndexedDatasetError

    if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
        hint = "give the prefix tools/preprocess_data.py wrote (without .bin/.idx)"
        stem, ext = os.path.splitext(prefix)
        if ext in (".bin", ".idx") and os.path.isfile(stem + ".idx"):
            hint = f"drop the extension: data.path={stem}"
        elif os.path.isfile(prefix + "_text_document.idx"):
            hint = f"did you mean data.path={prefix}_text_document?"
        missing = [e for e in (".bin", ".idx") if not os.path.isfile(prefix + e)]
        return [
            f"data.path: no dataset at {_where(prefix)}: {' and '.join(prefix + e for e in missing)} not found; {hint}"
        ]
    try:
        IndexedDataset(prefix)
    except IndexedDatasetError as e:
        return [f"data.path: {e}"]
    return []


def _init_from_errors(cfg: Config) -> list[str]:
    path, run_dir = cfg.train.init_from, cfg.checkpoint.dir
    if path and not os.path.exists(path):
        return [
            f"train.init_from={_where(path)} does not exist: give a megagpt2 checkpoint directory or a "
            f"Hugging Face GPT-2 directory"
        ]
    if (
        path
        and run_dir
        and os.path.commonpath([os.path.abspath(path), os.path.abspath(run_dir)]) == os.path.abspath(run_dir)
    ):
        return [
            f"train.init_from={_where(path)} is inside checkpoint.dir={run_dir}: the run would resume the "
            f"checkpoint there (optimizer, step and data position) instead of starting from its weights; "
            f"give this run its own checkpoint.dir"
        ]
    return []


def _tokenizer(cfg: Config) -> tuple[Optional[ResolvedTokenizer], list[str]]:
    """The run's tokenizer (explicit, else the dataset's, else train.init_from's, else GPT-2 BPE),
    checked against every dataset sidecar, train.init_from and model.vocab_size. `cfg.tokenizer`
    becomes what was used, so checkpoints record the real tokenizer."""
    from ..data.run_tokenizer import check_model_vocab, resolve_tokenizer

    try:
        resolved = resolve_tokenizer(cfg.tokenizer, cfg.data, cfg.train.init_from)
        check_model_vocab(resolved, cfg.model.vocab_size, cfg.train.init_from)
    except TokenizerError as e:
        return None, [str(e)]
    cfg.tokenizer = resolved.config
    return resolved, []
