"""Config: YAML + CLI overrides, typed, validated with messages that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from megagpt2.config import Config, ConfigError, config_from_dict, dump_yaml, load_config
from megagpt2.config_checks import validate

PRESETS = Path(__file__).resolve().parent.parent / "configs" / "gpt2"


@pytest.mark.parametrize(
    "name,shape",
    [("124m", (12, 768, 12)), ("355m", (24, 1024, 16)), ("774m", (36, 1280, 20)), ("1.5b", (48, 1600, 25))],
)
def test_presets_have_the_papers_shapes(name, shape):
    cfg = load_config(str(PRESETS / f"{name}.yaml"))
    validate(cfg)
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head) == shape
    assert cfg.model.n_positions == 1024 and cfg.model.vocab_size == 50257
    assert cfg.model.padded_vocab_size == 50304  # 50257 rounded up to a multiple of 128


def test_tiny_preset_validates():
    validate(load_config(str(PRESETS / "tiny.yaml")))


def test_cli_overrides_win_and_are_typed(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 10\nmodel:\n  dropout: 0.2\n")
    cfg = load_config(
        str(f),
        ["--train.steps=20", "model.attention=torch", "--checkpoint.dir=none", "--parallel.sequence_parallel=true"],
    )
    assert cfg.train.steps == 20 and cfg.model.dropout == 0.2 and cfg.model.attention == "torch"
    assert cfg.checkpoint.dir is None and cfg.parallel.sequence_parallel is True


@pytest.mark.parametrize(
    "override,needle",
    [
        ("--model.n_head=5", "model.n_head=5 must divide model.n_embd"),
        ("--model.n_heads=4", "unknown key model.n_heads"),
        ("--modle.n_head=4", "unknown section 'modle'"),
        ("--train.steps=ten", "train.steps"),
        ("--model.dropout=yes", "model.dropout"),
        ("--parallel.sequence_parallel=maybe", "parallel.sequence_parallel"),
        ("--model.attention=sparse", "model.attention='sparse' is not one of"),
        ("--parallel.tp=3", "not divisible by parallel.tp=3"),
        ("--data.seq_length=4096", "exceeds model.n_positions"),
        ("train.steps", "expected --section.key=value"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=None) as e:
        validate(load_config(None, [override]))
    assert needle in str(e.value)


def test_yaml_errors_name_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(f))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_round_trip_through_dict_and_yaml():
    cfg = load_config(str(PRESETS / "355m.yaml"), ["--optim.lr=1e-4"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    assert "n_layer: 24" in dump_yaml(cfg)
    assert Config() == config_from_dict(Config().to_dict())
