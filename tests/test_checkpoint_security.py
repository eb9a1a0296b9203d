"""No checkpoint file can run code. The layout-free format holds no pickle at all
(tests/test_checkpoint_format.py); the first format's DeepSpeed .pt files and Hugging Face
pytorch_model.bin still do: a pickle built only from callables the loaders allow, reaching `eval`,
is refused on every path that reads one (resume, init_from, convert, evaluate, generate), and
damaged files fail with a message that says what to do."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from megagpt2.checkpoint import CheckpointError, find_latest, safe_torch_load
from megagpt2.checkpoint.legacy import _safe_globals
from tests.launch_utils import start_ranks, wait_all, write_run_files
from tests.train_utils import ds_config, make_dataset, tiny_config


class _Call:
    """Pickles as `f(*args)`: how an attacker chains allowlisted callables."""

    def __init__(self, f, *args):
        self.f, self.args = f, args

    def __reduce__(self):
        return self.f, self.args


def write_payload(path: Path, marker: Path, tensors: dict | None = None) -> None:
    """A torch file whose unpickling writes `marker` using only getattr and torch's own
    `_rebuild_from_type_v2` (which calls the callable it is given): getattr walks from a torch
    function to its module's globals, the builtins dict and `eval`."""
    from torch._tensor import _rebuild_from_type_v2 as rebuild
    from torch._utils import _rebuild_tensor_v2

    globs = _Call(getattr, _rebuild_tensor_v2, "__globals__")
    getitem = _Call(getattr, globs, "__getitem__")
    dict_type = _Call(getattr, globs, "__class__")
    builtins_ = _Call(rebuild, getitem, dict_type, ("__builtins__",), {})
    builtin_fn_type = _Call(getattr, getitem, "__class__")
    eval_ = _Call(rebuild, _Call(getattr, builtins_, "__getitem__"), builtin_fn_type, ("eval",), {})
    code = f"__import__('pathlib').Path({str(marker)!r}).write_text('ran')"
    torch.save(
        {"module": tensors or {"x": torch.zeros(1)}, "payload": _Call(rebuild, eval_, dict_type, (code,), {})},
        str(path),
    )


def test_the_payload_runs_code_under_a_permissive_loader(tmp_path):
    """The payload is real: with getattr allowed (the old allowlist) loading it runs its code."""
    marker = tmp_path / "marker"
    write_payload(tmp_path / "evil.pt", marker)
    with torch.serialization.safe_globals([getattr]):
        try:
            torch.load(tmp_path / "evil.pt", weights_only=True)
        except Exception:
            pass  # the code ran before the rebuild helper failed on its result
    assert marker.read_text() == "ran"


def test_allowlist_holds_only_plain_classes():
    for obj in _safe_globals():
        assert isinstance(obj, type), obj  # no function, builtin or method: nothing that returns attributes
    assert getattr not in _safe_globals()


def test_safe_load_refuses_the_payload(tmp_path):
    marker = tmp_path / "marker"
    write_payload(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError, match="refusing to load .*evil.pt.*tampered"):
        safe_torch_load(str(tmp_path / "evil.pt"))
    assert not marker.exists()


# -- every entry point, on a real checkpoint with one file replaced -----------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step ZeRO-2 run with a first-format checkpoint at each step; returns (run dir, ckpt dir)."""
    tmp = tmp_path_factory.mktemp("sec")
    prefix = make_dataset(tmp / "data")
    cfg = tiny_config(prefix, tmp / "ckpt", steps=2, checkpoint={"interval": 1})
    cfg_path, ds_path = write_run_files(tmp, cfg, ds_config(stage=2, micro=4))
    assert wait_all(start_ranks(1, cfg_path, ds_path, {"FIRST_FORMAT": "1"}, log_dir=tmp)) == [0]
    assert find_latest(str(tmp / "ckpt")) == "step_00000002"
    return tmp, tmp / "ckpt"


def _poisoned_copy(ckpt: Path, dest: Path, file_glob: str, marker: Path) -> Path:
    """A copy of the checkpoint dir whose newest tag has `file_glob` replaced by the payload."""
    shutil.copytree(ckpt, dest)
    for f in (dest / "step_00000002").glob(file_glob):
        real = safe_torch_load(str(f))
        tensors = real["module"] if "module" in real else {"x": torch.zeros(1)}
        f.unlink()
        write_payload(f, marker, tensors)
    return dest


def test_real_files_still_load(trained):
    _, ckpt = trained
    files = sorted((ckpt / "step_00000002").glob("*.pt"))
    assert len(files) == 2  # model states and the ZeRO-2 optimizer shard
    for f in files:
        assert isinstance(safe_torch_load(str(f)), dict)


@pytest.mark.parametrize("which", ["mp_rank_*_model_states.pt", "*_optim_states.pt"])
def test_resume_refuses_the_payload(trained, tmp_path, which):
    run, ckpt = trained
    marker = tmp_path / "marker"
    bad = _poisoned_copy(ckpt, tmp_path / "ckpt", which, marker)
    codes = wait_all(
        start_ranks(
            1, run / "cfg.yaml", run / "ds.json", args=(f"--checkpoint.dir={bad}", "--train.steps=3"), log_dir=tmp_path
        )
    )
    log = (tmp_path / "rank0.log").read_text()
    assert codes != [0]
    assert "refusing to load step_00000002/" in log and "--checkpoint.tag=step_00000001" in log
    assert not marker.exists()


def test_init_from_refuses_the_payload(trained, tmp_path):
    run, ckpt = trained
    marker = tmp_path / "marker"
    bad = _poisoned_copy(ckpt, tmp_path / "src", "mp_rank_*_model_states.pt", marker)
    codes = wait_all(
        start_ranks(
            1,
            run / "cfg.yaml",
            run / "ds.json",
            args=(f"--train.init_from={bad}", f"--checkpoint.dir={tmp_path / 'new'}"),
            log_dir=tmp_path,
        )
    )
    assert codes != [0]
    assert "refusing to load" in (tmp_path / "rank0.log").read_text()
    assert not marker.exists()


def test_tools_refuse_the_payload(trained, tmp_path, capsys):
    from tools import convert_checkpoint, evaluate, generate

    _, ckpt = trained
    marker = tmp_path / "marker"
    bad = _poisoned_copy(ckpt, tmp_path / "ckpt", "mp_rank_*_model_states.pt", marker)
    (tmp_path / "text.txt").write_text("some text to score " * 20)
    runs = {
        "convert": lambda: convert_checkpoint.main(["--input", str(bad), "--output", str(tmp_path / "out")]),
        "evaluate": lambda: evaluate.main(
            ["ppl", "--load", str(bad), "--input", str(tmp_path / "text.txt"), "--device", "cpu"]
        ),
        "generate": lambda: generate.main(["--load", str(bad), "--prompt", "hi", "--device", "cpu"]),
    }
    for name, run in runs.items():
        assert run() == 2, name
        assert "refusing to load" in capsys.readouterr().err, name
        assert not marker.exists(), name


def test_hf_bin_refuses_the_payload(tmp_path):
    from megagpt2.config import ModelConfig
    from megagpt2.eval import ModelLoadError, load_model
    from megagpt2.interop import save_hf_dir
    from megagpt2.model import GPT2
    from megagpt2.parallel import ProcessGroups

    cfg = ModelConfig(n_layer=1, n_embd=32, n_head=4, n_positions=32)
    save_hf_dir(GPT2(cfg, ProcessGroups.single()).state_dict(), cfg, str(tmp_path / "hf"))
    (tmp_path / "hf" / "model.safetensors").unlink()
    marker = tmp_path / "marker"
    write_payload(tmp_path / "hf" / "pytorch_model.bin", marker)
    with pytest.raises(ModelLoadError, match="refusing to load .*pytorch_model.bin"):
        load_model(str(tmp_path / "hf"))
    assert not marker.exists()


# -- damaged files ----------------------------------------------------------------------------
def test_truncated_file_names_it_and_the_previous_checkpoint(trained, tmp_path):
    _, ckpt = trained
    shutil.copytree(ckpt, tmp_path / "ckpt")
    f = next((tmp_path / "ckpt" / "step_00000002").glob("mp_rank_*_model_states.pt"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        safe_torch_load(str(f))
    msg = str(e.value)
    assert str(f) in msg and "damaged or truncated" in msg and "--checkpoint.tag=step_00000001" in msg
    f.unlink()
    with pytest.raises(CheckpointError, match="is missing; resume from the previous complete checkpoint"):
        safe_torch_load(str(f))


def test_first_format_damage_is_found_before_loading(trained, tmp_path):
    """A truncated .pt (torch's zip records a CRC-32 per entry) or a missing RNG file fails
    verification, naming the file; resuming falls back to the previous checkpoint."""
    from megagpt2.checkpoint.verify import choose, verify

    _, ckpt = trained
    d = tmp_path / "ckpt"
    shutil.copytree(ckpt, d)
    assert verify(d / "step_00000002") is None
    f = next((d / "step_00000002").glob("*_optim_states.pt"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert str(f) in verify(d / "step_00000002") and "damaged or truncated" in verify(d / "step_00000002")
    logged: list = []
    assert choose(d, ["step_00000001", "step_00000002"], None, True, "checksum", logged.append) == "step_00000001"
    (d / "step_00000001" / "rng" / "rank_00000.safetensors").unlink()
    assert verify(d / "step_00000001").endswith("step_00000001/rng/rank_00000.safetensors is missing")


def test_first_format_resumes_from_a_chosen_tag_and_saves_the_new_format(trained, tmp_path):
    run, ckpt = trained
    shutil.copytree(ckpt, tmp_path / "ckpt")
    codes = wait_all(
        start_ranks(
            1,
            run / "cfg.yaml",
            run / "ds.json",
            args=(f"--checkpoint.dir={tmp_path / 'ckpt'}", "--checkpoint.tag=step_00000001"),
            log_dir=tmp_path,
        )
    )
    log = (tmp_path / "rank0.log").read_text()
    assert codes == [0], log
    assert "resumed from" in log and "step 1" in log and "first checkpoint format" in log
    step2 = tmp_path / "ckpt" / "step_00000002"  # written again by the resumed run
    assert not list(step2.glob("*.pt")) and (step2 / "tensors" / "rank_00000.safetensors").is_file()
