"""Build tiny datasets and run the real Trainer on gloo ranks, for training-level parity tests.

    prefix = make_dataset(tmp_path)
    cfg = tiny_config(prefix, tmp_path / "ckpt", steps=5)
    ds = ds_config(stage=2, micro=4, accum=1)
    losses = run_distributed(train_worker, 2, args=(cfg.to_dict(), ds, {"tp": 1, "pp": 1}))

`train_worker` plans the run (every check the entry makes), builds the process groups and runs
Trainer.train() with it; it returns the per-step records and final parameters.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import numpy as np

from megagpt2.config import Config, config_from_dict

VOCAB = 50257  # the default GPT-2 tokenizer's size (the Trainer checks the model against it)


def make_dataset(directory: Path, n_docs: int = 300, seed: int = 0, max_token: int = 400) -> str:
    """A random-token MMIDIDX dataset; returns its prefix."""
    from megagpt2.data import IndexedDatasetBuilder

    directory.mkdir(parents=True, exist_ok=True)
    prefix = str(directory / "rand_text_document")
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for _ in range(n_docs):
        n = int(rng.integers(10, 120))
        # A learnable pattern (each token mostly predicts the next) so the loss actually falls.
        start = int(rng.integers(0, max_token))
        doc = (start + np.arange(n) * 7 + (rng.random(n) < 0.1) * rng.integers(0, 50, n)) % max_token
        builder.add_document(doc.astype(np.uint16))
    builder.finalize(prefix + ".idx")
    return prefix


def tiny_config(data_prefix: str, ckpt_dir: Optional[Path], steps: int = 5, **sections: dict) -> Config:
    """A 2-layer, 32-wide model on seq 16 with dropout off; `sections` update fields."""
    cfg = Config()
    cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head, cfg.model.n_positions = 2, 32, 4, 32
    cfg.model.dropout = cfg.model.attn_dropout = 0.0
    cfg.model.attention, cfg.model.kernels = "torch", "torch"
    cfg.data.path, cfg.data.seq_length, cfg.data.split = data_prefix, 16, "90,10,0"
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps = 3e-3, 3e-4, 2
    cfg.train.steps, cfg.train.eval_interval, cfg.train.eval_steps = steps, 0, 1
    cfg.checkpoint.dir = str(ckpt_dir) if ckpt_dir else None
    cfg.logging.interval, cfg.logging.plot, cfg.logging.sample_prompt = 1, False, ""
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def ds_config(stage: int = 2, micro: int = 4, accum: int = 1, clip: float = 1.0, bf16: bool = False) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage, "overlap_comm": stage == 2, "contiguous_gradients": stage == 2},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
    }


def make_trainer(rank: int, world: int, cfg_dict: dict, ds: dict, layout: dict, timeout: float = 60.0):
    """Plan the run for this rank (as the entry does), build its process groups and the Trainer.

    `layout` sets parallel.* fields (tp, pp, schedule, virtual_stages, ...)."""
    import torch

    from megagpt2.parallel import build_process_groups
    from megagpt2.training.plan import plan_run
    from megagpt2.training.trainer import Trainer

    cfg = config_from_dict(copy.deepcopy(cfg_dict))
    for k, v in layout.items():
        setattr(cfg.parallel, k, v)
    plan = plan_run(cfg, ds, world, rank)
    return Trainer(plan, build_process_groups(plan.layout, timeout), torch.device("cpu"))


def data_state(cfg: Config, layout, micro: int, global_batch: int):
    """The trainer's data for `cfg` on `layout` (as Trainer builds it), for workers without a Trainer."""
    from megagpt2.training.data import build_data

    return build_data(
        cfg.data,
        layout,
        micro,
        global_batch,
        None,
        seed=cfg.train.seed,
        train_samples=cfg.train.steps * global_batch,
        valid_samples=0,
        eval_steps=cfg.train.eval_steps,
    )


def train_worker(
    rank: int, world: int, cfg_dict: dict, ds: dict, layout: dict, return_params: bool = True, patch=None
) -> dict[str, Any]:
    """Run Trainer.train() on this rank; return records and (gathered by the caller) params.

    `patch(trainer)`, a module-level function, may alter the trainer before it runs."""
    trainer = make_trainer(rank, world, cfg_dict, ds, layout)
    records: list[dict] = []
    original = trainer._record

    def record(**values):
        records.append({"step": trainer.step, **values})
        original(**values)

    trainer._record = record
    if patch is not None:
        patch(trainer)
    trainer.train()
    lay = trainer.layout
    out: dict[str, Any] = {"records": records, "ps": (lay.tp_rank, lay.pp_rank, lay.dp_rank)}
    if return_params:
        out["params"] = {
            n: (p.detach().clone(), getattr(p, "tp_dim", None), getattr(p, "tp_stride", 1))
            for n, p in trainer.model.named_parameters()
        }
        out["engine_optimizer_bytes"] = optimizer_state_bytes(trainer.engine)
    return out


def optimizer_state_bytes(engine) -> int:
    """Bytes of optimizer state (Adam moments and fp32 master partitions) held by this rank."""
    import torch

    opt = engine.optimizer
    seen, total = set(), 0
    inner = getattr(opt, "optimizer", opt)
    for state in inner.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                total += v.numel() * v.element_size()
    return total


def losses(result: dict) -> list[float]:
    return [r["loss"] for r in result["records"] if "loss" in r]


def gathered_params(results: list[dict]) -> dict:
    """Full parameters from every rank's shards (one data-parallel replica: dp_rank 0)."""
    from megagpt2.parallel.layers import unshard

    by_name: dict[str, dict[int, Any]] = {}
    meta: dict[str, tuple] = {}
    for r in results:
        tp_rank, _, dp_rank = r["ps"]
        if dp_rank != 0:
            continue
        for name, (t, dim, stride) in r["params"].items():
            by_name.setdefault(name, {})[tp_rank] = t
            meta[name] = (dim, stride)
    out = {}
    for name, pieces in by_name.items():
        dim, stride = meta[name]
        ordered = [pieces[k] for k in sorted(pieces)]
        out[name] = ordered[0] if dim is None else unshard(ordered, dim, stride)
    return out
