"""Input that cannot train is refused before any process group (issue 19.5), and nothing trains
unsaved by default (issue 18.3): plan-level checks, no processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from megagpt2.config import Config, ConfigError, load_config
from megagpt2.config_checks import validate
from megagpt2.training.plan import PlanError, plan_run
from tests.train_utils import ds_config, make_dataset, tiny_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_docs=40)


# -- the DeepSpeed JSON ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra,needle",
    [
        (
            {"wall_clock_breakdwn": False},
            "unknown DeepSpeed key 'wall_clock_breakdwn' (it would be ignored; "
            "DeepSpeed 0.19.8): did you mean wall_clock_breakdown?",
        ),
        ({"zero_optimisation": {"stage": 2}}, "did you mean zero_optimization?"),
        ({"micro_batch_size": 4}, "did you mean train_micro_batch_size_per_gpu?"),
        (
            {"zero_optimization": {"stage": 2, "overlap_com": True}},
            "'zero_optimization.overlap_com' (deepspeed.initialize would refuse it on every rank; DeepSpeed 0.19.8): "
            "did you mean zero_optimization.overlap_comm?",
        ),
        (
            {"activation_checkpointing": {"partition_activation": True}},
            "'activation_checkpointing.partition_activation' (it would be ignored; DeepSpeed 0.19.8): did you mean "
            "activation_checkpointing.partition_activations?",
        ),
        ({"tensorboard": {"enabled": True, "dir": "tb"}}, "valid keys here: enabled, job_name, output_path"),
    ],
)
def test_unknown_deepspeed_keys_are_refused_with_the_closest_one(prefix, extra, needle):
    with pytest.raises(PlanError) as e:
        plan_run(tiny_config(prefix, None), {**ds_config(), **extra}, world_size=1)
    assert needle in str(e.value)


def test_every_typo_is_listed_at_once(prefix):
    ds = {**ds_config(), "steps_per_prnt": 10, "fp16": {"enabled": False, "loss_scal": 0}}
    with pytest.raises(PlanError) as e:
        plan_run(tiny_config(prefix, None), ds, world_size=1)
    assert "'steps_per_prnt'" in str(e.value) and "'fp16.loss_scal'" in str(e.value)


def test_settings_copied_from_deepspeeds_documentation_are_accepted(prefix):
    ds = {
        **ds_config(),
        "wall_clock_breakdown": False,
        "steps_per_print": 100,
        "prescale_gradients": False,
        "flops_profiler": {
            "enabled": False,
            "profile_step": 1,
            "module_depth": -1,
            "top_modules": 1,
            "detailed": True,
            "output_file": None,
        },
        "activation_checkpointing": {
            "partition_activations": False,
            "cpu_checkpointing": False,
            "contiguous_memory_optimization": False,
            "number_checkpoints": None,
            "synchronize_checkpoint_boundary": False,
            "profile": False,
        },
        "comms_logger": {"enabled": False, "verbose": False, "prof_all": True, "debug": False},
        "tensorboard": {"enabled": False, "output_path": "tb/", "job_name": "run"},
        "csv_monitor": {"enabled": False},
        "wandb": {"enabled": False, "project": "p"},
        "fp16": {
            "enabled": False,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "data_types": {"grad_accum_dtype": "fp32"},
        "zero_allow_untested_optimizer": True,
    }
    ds["zero_optimization"].update(
        reduce_bucket_size=5e7, allgather_bucket_size=5e7, reduce_scatter=True, round_robin_gradients=False
    )
    plan_run(tiny_config(prefix, None), ds, world_size=1)
    for name in ("zero0", "zero1", "zero2"):
        plan_run(tiny_config(prefix, None), str(REPO / "configs" / "ds" / f"{name}.json"), world_size=1)


class _Recorder(dict):
    """A dict that records every key looked up in it (also through `in d.keys()` and copies)."""

    def __init__(self, *args, seen=None):
        super().__init__(*args)
        self.seen = set() if seen is None else seen

    def __getitem__(self, k):
        self.seen.add(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        self.seen.add(k)
        return super().get(k, default)

    def __contains__(self, k):
        self.seen.add(k)
        return super().__contains__(k)

    def keys(self):
        outer = self

        class Keys:
            def __contains__(self, k):
                outer.seen.add(k)
                return dict.__contains__(outer, k)

            def __iter__(self):
                return iter(dict.keys(outer))

        return Keys()

    def __copy__(self):
        return _Recorder(dict(self), seen=self.seen)


def test_the_key_tables_are_what_the_installed_deepspeed_reads():
    """ds_keys.py is deepspeed 0.19.8's set of keys; a DeepSpeed upgrade must update it (this test says how)."""
    import deepspeed
    from deepspeed.comm.config import CommsLoggerConfig
    from deepspeed.monitor.config import CometConfig, CSVConfig, TensorBoardConfig, WandbConfig
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from megagpt2 import ds_keys

    assert deepspeed.__version__ == ds_keys.DEEPSPEED_VERSION
    base = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
    top = _Recorder(base)
    DeepSpeedConfig(top)
    conditional = {"sequence_parallel_size"}  # read only without an mpu: check it is a real key
    source = Path(deepspeed.runtime.config.__file__).read_text()
    assert all(f'"{k}"' in source for k in conditional)
    assert top.seen | conditional == ds_keys.TOP_LEVEL, (
        sorted(top.seen - ds_keys.TOP_LEVEL),
        sorted(ds_keys.TOP_LEVEL - top.seen - conditional),
    )
    models = {
        "zero_optimization": DeepSpeedZeroConfig,
        "bf16": DeepSpeedBF16Config,
        "fp16": DeepSpeedFP16Config,
        "comms_logger": CommsLoggerConfig,
        "tensorboard": TensorBoardConfig,
        "csv_monitor": CSVConfig,
        "wandb": WandbConfig,
        "comet": CometConfig,
    }
    for section, model in models.items():
        fields = {n for n in model.model_fields} | {f.alias for f in model.model_fields.values() if f.alias}
        assert model.model_config.get("extra") == "forbid" and section not in ds_keys.READ_WITH_DEFAULTS
        assert fields == ds_keys.SECTIONS[section], (section, sorted(fields ^ ds_keys.SECTIONS[section]))
    for section in ds_keys.READ_WITH_DEFAULTS:
        inner = _Recorder({})
        DeepSpeedConfig(_Recorder({**base, section: inner}))
        assert inner.seen == ds_keys.SECTIONS[section], (section, sorted(inner.seen ^ ds_keys.SECTIONS[section]))
    assert set(ds_keys.SECTIONS) == set(models) | ds_keys.READ_WITH_DEFAULTS


# -- how much data ----------------------------------------------------------------------------------
def test_a_dataset_smaller_than_one_global_batch_is_refused_unless_allowed(tmp_path):
    small = make_dataset(tmp_path, n_docs=2, seed=3)  # 2 documents of 10-120 tokens; 1 in the training split
    with pytest.raises(PlanError) as e:
        plan_run(tiny_config(small, None, data={"split": "1,0,0"}), ds_config(micro=16), world_size=1)
    msg = str(e.value)
    assert "one step needs 257 (global batch 16 x data.seq_length 16 + 1)" in msg
    assert "set data.allow_repeat_in_batch=true to train on it anyway" in msg
    plan = plan_run(
        tiny_config(small, None, data={"split": "1,0,0", "allow_repeat_in_batch": True}),
        ds_config(micro=16),
        world_size=1,
    )
    assert any("times over" in n for n in plan.notes)


def test_many_epochs_warn_with_how_many(prefix):
    from megagpt2.data.blending import split_ranges
    from megagpt2.data.indexed import IndexedDataset

    indexed = IndexedDataset(prefix)
    start, end = split_ranges(len(indexed), "90,10,0")[0]
    train_tokens = int(indexed.sizes[start:end].sum())
    plan = plan_run(tiny_config(prefix, None, steps=100), ds_config(micro=8), world_size=1)
    epochs = 100 * 8 * 16 / train_tokens
    warning = [n for n in plan.notes if n.startswith("warning:")]
    assert warning == [
        f"warning: the run reads the training split of {prefix} {epochs:,.1f} times over "
        f"({train_tokens:,} tokens; train.steps 100 x global batch 8 x seq 16): expect it to be "
        f"memorised"
    ]
    assert epochs > 4
    quiet = plan_run(tiny_config(prefix, None, steps=2), ds_config(micro=8), world_size=1)
    assert not [n for n in quiet.notes if n.startswith("warning:")]


def test_an_empty_training_split_is_refused(prefix):
    with pytest.raises(PlanError, match="data.split='0,1,0' leaves no training tokens \\(0 of 40 documents"):
        plan_run(tiny_config(prefix, None, data={"split": "0,1,0"}), ds_config(), world_size=1)


@pytest.mark.parametrize(
    "fmt,text,needle",
    [
        ("dialogue", "", "holds no dialogue examples (expected one JSON example per line with at least two utterances"),
        ("dialogue", "\n  \n", "holds no dialogue examples"),
        ("dialogue", '["only the user"]\n', "holds no dialogue examples"),
        ("instruction", "", "holds no instruction examples (expected one JSON example per line;"),
        ("chitchat", "\n\n", "holds no chitchat examples (expected GPT2-chitchat text"),
        ("dialogue", '["a", "b"]\n{"x": 1}\n', "chats:2: a dialogue line must be a JSON list of strings"),
        (
            "dialogue",
            '["a", "b"]\n["c", "d"]\n',
            "2 training examples but a global batch takes 4: every step would repeat examples",
        ),
    ],
)
def test_finetuning_files_that_cannot_train_are_refused(tmp_path, fmt, text, needle):
    path = tmp_path / "chats"
    path.write_text(text)
    with pytest.raises(PlanError) as e:
        plan_run(tiny_config(str(path), None, data={"format": fmt, "split": "1,0,0"}), ds_config(micro=4), world_size=1)
    assert needle in str(e.value)


# -- where a run saves ------------------------------------------------------------------------------
def test_checkpoint_dir_defaults_to_a_run_directory(tmp_path):
    assert Config().checkpoint.dir == "auto"
    yaml_file = tmp_path / "my-run.yaml"
    yaml_file.write_text("train:\n  steps: 3\n")
    assert load_config(str(yaml_file)).checkpoint.dir == str(Path("runs") / "my-run")
    assert load_config(str(REPO / "configs" / "gpt2" / "124m.yaml")).checkpoint.dir == str(Path("runs") / "124m")
    assert load_config(None).checkpoint.dir == str(Path("runs") / "default")
    assert load_config(str(yaml_file), ["--checkpoint.dir=none"]).checkpoint.dir is None
    assert load_config(str(yaml_file), ["--checkpoint.dir=ck/a"]).checkpoint.dir == "ck/a"
    # a fine-tune or a run from other weights started with the same file must not resume this one
    assert load_config(str(yaml_file), ["--data.format=dialogue"]).checkpoint.dir == "runs/my-run-dialogue"
    assert load_config(str(yaml_file), ["--train.init_from=hf/gpt2/"]).checkpoint.dir == "runs/my-run-from-gpt2"
    assert (
        load_config(
            str(yaml_file), ["--data.format=chitchat", "--train.init_from=runs/my-run/step_00000400"]
        ).checkpoint.dir
        == "runs/my-run-chitchat-from-my-run-step_00000400"
    )
    yaml_file.write_text("checkpoint:\n  dir: null\n")
    assert load_config(str(yaml_file)).checkpoint.dir is None
    cfg = Config()
    cfg.checkpoint.dir = " "
    with pytest.raises(ConfigError, match="checkpoint.dir is empty: give a directory, auto"):
        validate(cfg)


def test_the_plan_says_where_the_run_saves(prefix, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(prefix, None)
    cfg.checkpoint.dir = "auto"  # a config built in code, never loaded from a file
    plan = plan_run(cfg, ds_config(), world_size=1)
    assert plan.cfg.checkpoint.dir == str(Path("runs") / "default")
    assert plan.notes[0] == (
        f"run directory: runs/default ({tmp_path / 'runs' / 'default'}): checkpoints, "
        f"metrics.jsonl and loss.png go here; its newest checkpoint, if any, is resumed"
    )
    off = plan_run(tiny_config(prefix, None), ds_config(), world_size=1)
    assert off.notes[0] == "checkpoint.dir=none: nothing is saved (no checkpoints, metrics.jsonl or loss.png)"
    assert not (tmp_path / "runs").exists()  # planning creates nothing
    (tmp_path / "runs" / "a" / "step_00000004").mkdir(parents=True)
    own = tiny_config(prefix, tmp_path / "runs" / "a", train={"init_from": "runs/a/step_00000004"})
    with pytest.raises(PlanError, match="train.init_from=runs/a/step_00000004 .* is inside checkpoint.dir="):
        plan_run(own, ds_config(), world_size=1)


def test_presets_and_slurm_scripts_save_by_default():
    for preset in sorted((REPO / "configs" / "gpt2").glob("*.yaml")):
        cfg = load_config(str(preset))
        assert cfg.checkpoint.dir == str(Path("runs") / preset.stem), preset
        assert cfg.logging.sample_prompt == "", preset  # no pretraining prompt leaks into a fine-tune
    for script in (REPO / "launch" / "slurm").glob("*.sbatch"):
        assert "checkpoint.dir=none" not in script.read_text()


def test_max_skipped_steps_must_be_positive():
    cfg = Config()
    cfg.train.max_skipped_steps = 0
    with pytest.raises(ConfigError, match="train.max_skipped_steps must be >= 1 \\(a run must not skip"):
        validate(cfg)


# -- preprocessing that would write nothing -----------------------------------------------------------
@pytest.mark.parametrize(
    "content,needle",
    [
        ("", "no input records: "),
        ('{"text": 1}\nnot json\n', "every document was dropped (2 read: 2 malformed;"),
        ('{"text": ""}\n', "every document was dropped (1 read: 1 empty;"),
    ],
)
def test_preprocessing_with_no_output_fails_saying_why(tmp_path, caplog, content, needle):
    from tools import preprocess_data

    src = tmp_path / "scrape.jsonl"
    src.write_text(content)
    out = tmp_path / "out" / "ds"
    rc = preprocess_data.main(["--input", str(src), "--output-prefix", str(out), "--no-progress"])
    assert rc == 1
    assert needle in caplog.text and "nothing was written" in caplog.text, caplog.text
    assert not list((tmp_path / "out").iterdir())  # no dataset, no sidecar, no report


# -- non-finite steps ---------------------------------------------------------------------------------
def test_skipping_non_finite_steps_stops_after_max_skipped_in_a_row():
    from megagpt2.pipeline.executor import NonFiniteError, NonfiniteGuard, StepResult

    nan = StepResult(float("nan"), None, 1e-3, True)
    good = StepResult(2.0, 1.0, 1e-3, False)
    guard = NonfiniteGuard("skip", max_skipped=3)
    assert (
        guard.check(1, nan, True) == "step 1: loss nan / grad norm None is not finite: update skipped "
        "(1 in a row, the run stops at 3)"
    )
    assert guard.check(2, nan, True) is not None and guard.check(3, good, False) is None  # a good step resets
    assert guard.check(4, nan, True) and guard.check(5, nan, True)
    with pytest.raises(NonFiniteError) as e:
        guard.check(6, nan, True)
    assert (
        "3 non-finite steps in a row (steps 4-6) reached train.max_skipped_steps=3; stopping without a "
        "checkpoint of this step. The run has diverged: resume from a checkpoint of before step 4" in str(e.value)
    )
    with pytest.raises(NonFiniteError, match="step 7: loss nan / grad norm None is not finite; stopping"):
        NonfiniteGuard("stop", 3).check(7, nan, True)


def test_an_fp16_loss_scale_overflow_is_not_a_non_finite_step():
    from megagpt2.pipeline.executor import classify

    inf = float("inf")
    assert classify(True, inf, fp16=True) == (False, True)  # DeepSpeed skipped it and halved the scale
    assert classify(True, inf, fp16=False) == (True, False)  # bf16 / fp32: the gradients really are inf
    assert classify(False, inf, fp16=True) == (True, False)  # a NaN loss is never an overflow
    assert classify(True, 1.0, fp16=True) == classify(True, None, fp16=False) == (False, False)


# -- the end-of-run sample ------------------------------------------------------------------------------
def test_the_sample_prompt_takes_the_runs_layout(capsys):
    from megagpt2.config import ModelConfig
    from megagpt2.model import GPT2
    from megagpt2.parallel import ParallelLayout, ProcessGroups
    from megagpt2.tokenizer import build_tokenizer
    from megagpt2.training.metrics import print_sample, prompt_ids

    tok = build_tokenizer()
    hello = tok.encode("hello there")
    assert prompt_ids(tok, "hello there", chat=True, max_tokens=64) == [tok.eod] + hello + [tok.eod]  # user turn
    assert prompt_ids(tok, "hello there", chat=False, max_tokens=64) == hello  # a document start
    assert len(prompt_ids(tok, "word " * 100, chat=True, max_tokens=16)) == 16  # the newest tokens that fit
    cfg = ModelConfig(n_layer=1, n_embd=16, n_head=2, n_positions=32, attention="torch", kernels="torch")
    model = GPT2(cfg, ProcessGroups.single(), seed=0).eval()
    layout = ParallelLayout.for_world(1, 1, 1, 1, 0)
    import torch

    print_sample(model, tok, "hello there", layout, torch.device("cpu"), max_new_tokens=3, chat_format="dialogue")
    assert capsys.readouterr().out.startswith("sample (dialogue layout): user: hello there | reply: ")
    print_sample(model, tok, "ROMEO:", layout, torch.device("cpu"), max_new_tokens=3)
    assert capsys.readouterr().out.startswith("sample: ROMEO:")
