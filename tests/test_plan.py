"""The run plan: every config/launch mistake fails before any process group, fast, once, exit 2."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megagpt2.config import ConfigError, config_from_dict, load_config
from megagpt2.training.cli import habit_hint, parse_args
from megagpt2.training.plan import PlanError, plan_run
from tests.train_utils import ds_config, make_dataset, tiny_config

REPO = Path(__file__).resolve().parent.parent
DS = ds_config(stage=2, micro=4, accum=2)


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_docs=40)


def _cfg(prefix, *overrides: str):
    """tiny_config with `section.key=value` overrides (typed as YAML, as on the command line)."""
    doc = tiny_config(prefix, None).to_dict()
    for item in overrides:
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".")
        doc[section][key] = yaml.safe_load(value)
    return config_from_dict(doc)


def test_a_good_run_plans_its_layout_batch_split_and_tokenizer(prefix):
    plan = plan_run(_cfg(prefix, "parallel.pp=2", "model.n_layer=4"), DS, world_size=4, rank=3)
    assert (plan.layout.tp, plan.layout.pp, plan.layout.dp, plan.layout.pp_rank, plan.layout.dp_rank) == (1, 2, 2, 1, 1)
    assert (plan.micro_batch, plan.grad_accum, plan.global_batch) == (4, 2, 16)
    assert plan.split.pieces == ((0, 1), (2, 3)) and plan.tokenizer.vocab_size == 50257


@pytest.mark.parametrize(
    "overrides,world,ds,needle",
    [
        (
            ["parallel.tp=2", "parallel.pp=2"],
            6,
            DS,
            "world size 6 is not divisible by parallel.tp x parallel.pp = 2 x 2",
        ),
        (
            [],
            2,
            {**DS, "train_batch_size": 12},
            "train_batch_size=12 but train_micro_batch_size_per_gpu x "
            "gradient_accumulation_steps x data-parallel size = 4 x 2 x 2 = 16",
        ),
        (
            ["parallel.pp=2", "model.n_layer=3"],
            2,
            DS,
            "model.n_layer=3 is not divisible by parallel.pp x "
            "parallel.virtual_stages = 2; change one of them or use "
            "parallel.partition=parameters",
        ),
        (
            ["parallel.pp=4", "model.n_layer=4"],
            4,
            DS,
            "parallel.schedule=1f1b needs at least parallel.pp=4 "
            "micro-batches per step, got gradient_accumulation_steps=2",
        ),
        (["parallel.pp=2", "model.n_layer=4"], 2, ds_config(stage=3, accum=2), "supports ZeRO stages 0-2"),
        (["parallel.virtual_stages=2", "parallel.schedule=interleaved"], 1, DS, "it needs parallel.pp > 1"),
        (
            ["model.vocab_size=1000"],
            1,
            DS,
            "has 50,257 ids but model.vocab_size=1,000: if model.vocab_size is right, the tokenizer is the wrong one",
        ),
        (["data.split=1,x"], 1, DS, "data.split: split '1,x' must be comma-separated numbers"),
        ([], 1, {**DS, "optimizer": {"type": "Adam"}}, "must not define optimizer/scheduler"),
        ([], 1, {**DS, "bf16": {"enabled": "yes"}}, 'bf16.enabled must be true, false or "auto"'),
    ],
)
def test_each_mistake_is_one_message_naming_the_fix(prefix, overrides, world, ds, needle):
    with pytest.raises(PlanError) as e:
        plan_run(_cfg(prefix, *overrides), ds, world_size=world)
    assert needle in str(e.value)


def test_the_pipeline_split_has_one_rule(prefix):
    """What partition() builds, the plan accepts (6 layers over 4 stages balance by parameters)."""
    plan = plan_run(
        _cfg(prefix, "parallel.pp=4", "model.n_layer=6", "parallel.partition=parameters"),
        ds_config(accum=4),
        world_size=4,
    )
    assert sum(len(p) for p in plan.split.pieces) == 6 and min(len(p) for p in plan.split.pieces) >= 1


def test_data_paths_resolve_against_the_working_directory(prefix, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PlanError) as e:
        plan_run(_cfg(prefix, "data.path=data/owt"), DS, world_size=1)
    msg = str(e.value)
    assert f"no dataset at data/owt ({tmp_path / 'data' / 'owt'})" in msg and "data/owt.bin and data/owt.idx" in msg
    stem = prefix[: -len("_text_document")]
    with pytest.raises(PlanError, match=f"did you mean data.path={stem}_text_document"):
        plan_run(_cfg(prefix, f"data.path={stem}"), DS, world_size=1)
    with pytest.raises(PlanError, match=f"drop the extension: data.path={prefix}$"):
        plan_run(_cfg(prefix, f"data.path={prefix}.bin"), DS, world_size=1)
    with pytest.raises(PlanError, match="does not exist: data.format=dialogue reads one .jsonl file"):
        plan_run(_cfg(prefix, "data.format=dialogue", "data.path=chats.jsonl"), DS, world_size=1)
    with pytest.raises(PlanError, match=f"train.init_from=hf/124m \\({tmp_path / 'hf' / '124m'}\\) does not exist"):
        plan_run(_cfg(prefix, "train.init_from=hf/124m"), DS, world_size=1)


def test_a_broken_index_is_refused_by_name(prefix, tmp_path):
    bad = tmp_path / "bad_text_document"
    Path(str(bad) + ".bin").write_bytes(b"")
    Path(str(bad) + ".idx").write_bytes(b"not an index")
    with pytest.raises(PlanError, match="bad_text_document.idx: file is 12 bytes, shorter than the 34-byte header"):
        plan_run(_cfg(prefix, f"data.path=0.5 {prefix} 0.5 {bad}"), DS, world_size=1)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--data-path", "data/owt"], "--data-path is Megatron-LM's flag; here it is --data.path=data/owt"),
        (["--micro-batch-size=4"], "train_micro_batch_size_per_gpu is set in the DeepSpeed JSON"),
        (["--global-batch-size", "512"], "train_batch_size is set in the DeepSpeed JSON"),
        (["--tensor-model-parallel-size", "2"], "here it is --parallel.tp=2"),
        (["--pipeline-model-parallel-size=4"], "here it is --parallel.pp=4"),
        (["--lr", "6e-4"], "here it is --optim.lr=6e-4"),
        (["--train-iters", "100"], "here it is --train.steps=100"),
        (["--save", "ck"], "here it is --checkpoint.dir=ck"),
        (["--load", "ck"], "--checkpoint.dir=ck (resuming from it is automatic"),
        (["--max_iters=100"], "--max_iters is nanoGPT's flag; here it is --train.steps=100"),
        (["--n_layer=4"], "config keys take their section: --model.n_layer=4"),
        (["--train.stepz=3"], "unknown key train.stepz (did you mean train.steps?)"),
        (["--bogus"], "unrecognised argument '--bogus'"),
    ],
)
def test_flags_typed_by_habit_name_our_equivalent(argv, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, parse_args(argv)[1])
    assert needle in str(e.value)


def test_overrides_take_both_spellings():
    _, overrides = parse_args(["--config", "x.yaml", "--train.steps", "7", "--parallel.tp=2"])
    assert overrides == ["train.steps=7", "parallel.tp=2"]
    assert habit_hint("--train.steps=3", None) is None


# -- the entry, as users start it ----------------------------------------------------------------
_PROBE = (
    "import sys; from megagpt2.training import main; rc = main(sys.argv[1:]); "
    "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(rc)"
)


def timed_run(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """(result, CPU seconds, wall seconds) of `cmd`. CPU time (user + system) is what the limits
    are checked on: it does not depend on how loaded the machine is; the wall time is reported."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def _entry(args: list[str], cwd: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run the training entry in a fresh process; (result, CPU seconds)."""
    full = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if "RANK" not in env else ():
        full.pop(var, None)
    r, cpu, _ = timed_run([sys.executable, "-c", _PROBE, *args], cwd, full)
    return r, cpu


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--data.path=nowhere/owt"], "no dataset at nowhere/owt ("),
        (["--model.vocab_size=1000"], "has 50,257 ids but model.vocab_size=1,000"),
        (["@world:2", "--parallel.pp=2", "--model.n_layer=3"], "model.n_layer=3 is not divisible by parallel.pp"),
        (["--parallel.pp=2"], "world size 1 is not divisible by parallel.tp x parallel.pp = 1 x 2"),
        (["@ds:train_batch_size=12"], "train_batch_size=12 but train_micro_batch_size_per_gpu"),
        (["@ds:wall_clock_breakdwn=0"], "unknown DeepSpeed key 'wall_clock_breakdwn'"),
        (["--train.stepz=3"], "unknown key train.stepz"),
        (["--data-path", "data/owt"], "here it is --data.path=data/owt"),
    ],
)
def test_entry_mistakes_exit_2_within_5_s_before_any_process_group(prefix, tmp_path, args, needle):
    import json

    from tests.launch_utils import write_run_files

    ds, env, args = dict(DS), {}, list(args)
    if args and args[0].startswith("@ds:"):  # a DeepSpeed JSON setting
        key, value = args.pop(0)[4:].split("=")
        ds[key] = int(value)
    if args and args[0].startswith("@world:"):  # rank 0 of a launcher's world (it fails before meeting the others)
        env = {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": args.pop(0)[7:],
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29999",
        }
    cfg_path, ds_path = write_run_files(tmp_path, tiny_config(prefix, None), ds)
    assert json.loads(ds_path.read_text())["train_micro_batch_size_per_gpu"] == 4
    r, seconds = _entry(["--config", str(cfg_path), "--deepspeed_config", str(ds_path), *args], tmp_path, **env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert seconds < 5.0, seconds  # CPU seconds: well under one on an idle machine
    assert needle in r.stderr and r.stderr.count("error:") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "no torch" in r.stdout  # nothing past the plan ran: no torch, so no process group


def test_only_the_first_rank_prints(prefix, tmp_path):
    from tests.launch_utils import write_run_files

    cfg_path, ds_path = write_run_files(tmp_path, tiny_config(prefix, None), DS)
    args = ["--config", str(cfg_path), "--deepspeed_config", str(ds_path), "--data.path=nowhere/owt"]
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    first, _ = _entry(args, tmp_path, RANK="0", LOCAL_RANK="0", **env)
    second, _ = _entry(args, tmp_path, RANK="1", LOCAL_RANK="1", **env)
    assert first.returncode == second.returncode == 2
    assert "no dataset at nowhere/owt" in first.stderr and second.stderr == ""


# -- --help ----------------------------------------------------------------------------------------
def test_help_lists_every_key_with_type_and_default_quickly(tmp_path):
    from megagpt2.training.cli import describe_fields

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r, cpu, wall = timed_run([sys.executable, str(REPO / "launch" / "pretrain_gpt2.py"), "--help"], tmp_path, env)
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())  # help text wraps descriptions
    assert "--data.path=str " in out and "(default: '')" in out
    assert "--parallel.tp=int tensor-parallel size (default: 1)" in out
    assert (
        "--checkpoint.dir=str|none checkpoints, metrics.jsonl, loss.png; auto: runs/<YAML file stem>...; none: "
        "no saving (default: auto)" in out
    )
    assert "--model.attention=flash|fused_softmax|torch" in out
    rows = describe_fields()
    assert len(rows) > 50 and all(doc for _, _, _, doc in rows), [k for k, _, _, doc in rows if not doc]
    for dotted, _, _, _ in rows:  # every key is listed
        assert f"--{dotted}=" in out, dotted
    assert cpu < 2.0, (cpu, wall)


@pytest.mark.parametrize(
    "tool",
    [
        "convert_checkpoint",
        "inspect_dataset",
        "make_demo_corpus",
        "merge_datasets",
        "preprocess_data",
        "train_tokenizer",
    ],
)
def test_tool_help_is_quick(tool, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r, cpu, wall = timed_run([sys.executable, str(REPO / "tools" / f"{tool}.py"), "--help"], tmp_path, env)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr
    assert cpu < 2.0, (cpu, wall)
