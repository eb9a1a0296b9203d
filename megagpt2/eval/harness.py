"""`tools/evaluate.py lm_eval`: lm-evaluation-harness tasks through `lm_eval.simple_evaluate`.

Offline by default: HF_DATASETS_OFFLINE and HF_HUB_OFFLINE are set to 1 unless already set, so
tasks read local files (task YAMLs with `dataset_path: json` and `data_files`, found through
--include-path). The results file is lm-eval's own results JSON (its `results` dict has keys
such as `acc,none`), written by rank 0.
"""

from __future__ import annotations

import difflib
import json
import os
from typing import Any, Optional, Sequence


def _offline() -> None:
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ.setdefault(var, "1")


def task_manager(include_path: Optional[str], tasks: Sequence[str] = (), defaults: bool = True):
    """lm-eval's TaskManager for `tasks`: the --include-path folder alone when it defines all of
    them (indexing lm-eval's ~14,000 built-in task files takes seconds to minutes), else the
    folder plus the built-in tasks (unless defaults=False). Unknown names raise ValueError
    listing the tasks of the folder and the closest known names."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.isdir(include_path):
        raise FileNotFoundError(f"--include-path {include_path} is not a directory of task YAML files")
    local = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if local is not None and not _missing(tasks, local):
        return local
    manager = TaskManager(include_path=include_path) if defaults else local
    missing = _missing(tasks, manager) if manager is not None else list(tasks)
    if missing:
        known = manager.all_tasks if manager is not None else []
        mine = local.all_tasks if local is not None else []
        close = sorted({m for n in missing for m in difflib.get_close_matches(n, known, n=5, cutoff=0.6)})
        msg = f"unknown lm-eval task(s) {', '.join(missing)}."
        msg += (
            f" Tasks in {include_path}: {', '.join(mine) or 'none'}."
            if include_path
            else " No --include-path was given for local task YAMLs."
        )
        if close:
            msg += f" Closest known tasks: {', '.join(close)}."
        if defaults:
            msg += f" lm-eval knows {len(known)} tasks, groups and tags (TaskManager().all_tasks lists them)."
        raise ValueError(msg)
    return manager


def _missing(tasks: Sequence[str], manager) -> list[str]:
    known = set(manager.all_tasks)
    return [n for n in tasks if n not in known and not manager.match_tasks([n])]


def run_lm_eval(
    lm,
    tasks: Sequence[str],
    include_path: Optional[str] = None,
    num_fewshot: Optional[int] = None,
    limit: Optional[float] = None,
    seed: int = 1234,
    log_samples: bool = False,
    defaults: bool = True,
    bootstrap_iters: int = 0,
) -> Optional[dict]:
    """lm-eval's results dict (None on ranks other than 0)."""
    _offline()
    from lm_eval.evaluator import simple_evaluate

    manager = task_manager(include_path, tasks, defaults)
    results = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        bootstrap_iters=bootstrap_iters,
    )
    return dict(results) if results is not None else None


def write_results(results: dict, path: str) -> None:
    """lm-eval's results JSON (its serializer turns numpy values and the like into JSON)."""
    from lm_eval.utils import handle_non_serializable

    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)


def results_table(results: dict) -> str:
    """lm-eval's own markdown table of the results."""
    from lm_eval.utils import make_table

    return make_table(results)


def main_lm_eval(args: Any) -> int:
    """The `lm_eval` subcommand (args from tools/evaluate.py)."""
    from .lm_eval import MegaGPT2LM
    from .loading import model_from_args

    model, tokenizer, _, groups = model_from_args(args)
    lm = MegaGPT2LM(  # register_model hides the signature from the type checker
        model,  # pyright: ignore[reportCallIssue]
        tokenizer,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_gen_toks=args.max_gen_toks,
        seed=args.seed,
        progress=not args.no_progress,
    )
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = run_lm_eval(
        lm,
        tasks,
        args.include_path,
        args.num_fewshot,
        args.limit,
        args.seed,
        args.log_samples,
        not args.no_default_tasks,
        args.bootstrap_iters,
    )
    if groups.layout.rank == 0 and results is not None:
        results.setdefault("config", {})["model_args"] = f"load={args.load},tp={args.tp},dtype={args.dtype}"
        print(results_table(results))
        if args.output:
            write_results(results, args.output)
            print(f"results written to {args.output}")
    return 0
