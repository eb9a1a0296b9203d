"""A checkpoint is checked before it is trusted: damage names the file and the cause, a damaged
newest checkpoint falls back to the newest one that verifies (or stops, when told to), a full disk
says so and leaves the previous checkpoint newest, a save cut short at any moment never leaves a
newest checkpoint that does not load, and pruning never fails a run. One process (tests/ckpt_utils.py
FakeEngine: a real model and torch optimizer, as DeepSpeed runs them at ZeRO-0)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from megagpt2.checkpoint import store
from megagpt2.checkpoint.files import CheckpointError
from megagpt2.checkpoint.tags import complete_tags, find_latest
from megagpt2.checkpoint.verify import choose, read_meta, verify
from tests.ckpt_utils import FakeEngine, save_fake

S1, S2, S3 = "step_00000001", "step_00000002", "step_00000003"


@pytest.fixture
def two(tmp_path):
    engine = FakeEngine()
    for step in (1, 2):
        engine.train(1)
        save_fake(engine, tmp_path, step)
    return tmp_path, engine


def _loads(path: Path) -> None:
    """Load checkpoint `path` into a fresh engine (raises if it cannot)."""
    from megagpt2.checkpoint.resume import load_tensors
    from megagpt2.parallel import ParallelLayout

    load_tensors(FakeEngine(seed=3), ParallelLayout(), path, read_meta(path))


def _truncate(f: Path, keep: float = 0.5) -> None:
    f.write_bytes(f.read_bytes()[: int(f.stat().st_size * keep)])


DAMAGE = {
    "tensor file truncated": (
        lambda d: _truncate(d / "tensors/rank_00000.safetensors"),
        ["tensors/rank_00000.safetensors", "truncated", "is cut short"],
    ),
    "metadata truncated": (lambda d: _truncate(d / "megagpt2.json"), ["megagpt2.json", "damaged or truncated"]),
    "rng file missing": (
        lambda d: (d / "rng/rank_00000.safetensors").unlink(),
        ["rng/rank_00000.safetensors is missing"],
    ),
    "tensor file missing": (
        lambda d: (d / "tensors/rank_00000.safetensors").unlink(),
        ["tensors/rank_00000.safetensors is missing"],
    ),
    "bit flipped": (
        lambda d: _flip(d / "tensors/rank_00000.safetensors"),
        ["tensors/rank_00000.safetensors: checksum mismatch"],
    ),
    "COMPLETE damaged": (lambda d: (d / "COMPLETE").write_text("{not json"), ["COMPLETE is damaged"]),
}


def _flip(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[-3] ^= 1
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_verify_names_the_damaged_file_and_the_cause(two, kind):
    root, _ = two
    damage, words = DAMAGE[kind]
    assert verify(root / S2) is None
    damage(root / S2)
    problem = verify(root / S2)
    assert problem is not None and all(w in problem for w in words), problem
    assert str(root / S2) in problem
    if kind == "bit flipped":
        assert verify(root / S2, mode="size") is None  # only the checksum sees a flipped bit


def test_a_damaged_newest_checkpoint_falls_back_or_stops(two):
    root, _ = two
    _truncate(root / S2 / "tensors/rank_00000.safetensors")
    tags, logged = complete_tags(str(root)), []
    assert choose(root, tags, None, True, "checksum", logged.append) == S1
    assert any(f"{S2} is damaged" in m and "rank_00000.safetensors" in m for m in logged), logged
    with pytest.raises(
        CheckpointError,
        match=rf"{S2} is damaged: .*rank_00000.safetensors.*--checkpoint.tag={S1}"
        r".*checkpoint.fallback=true",
    ):
        choose(root, tags, None, False, "checksum", logged.append)
    with pytest.raises(CheckpointError, match=rf"checkpoint.tag={S2}: .*truncated"):
        choose(root, tags, S2, True, "checksum", logged.append)
    (root / S1 / "rng/rank_00000.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"no checkpoint in {root} verifies"):
        choose(root, tags, None, True, "checksum", logged.append)


def _rewrite_meta(d: Path, edit) -> None:
    """Edit megagpt2.json and record it in COMPLETE as if it had been written so (a writer bug)."""
    from megagpt2.checkpoint.files import write_text

    meta = json.loads((d / "megagpt2.json").read_text())
    edit(meta)
    rec = write_text(d / "megagpt2.json", json.dumps(meta))
    complete = json.loads((d / "COMPLETE").read_text())
    complete["files"]["megagpt2.json"] = rec
    (d / "COMPLETE").write_text(json.dumps(complete))


def test_inconsistent_metadata_names_the_tensor_and_the_file(two):
    root, _ = two

    def drop_piece(meta):
        meta["tensors"]["h.1.mlp.c_fc.weight"]["pieces"][0]["flat"][1] -= 7

    _rewrite_meta(root / S2, drop_piece)
    problem = verify(root / S2)
    assert problem.startswith(str(root / S2 / "megagpt2.json")) and "tensor h.1.mlp.c_fc.weight" in problem, problem
    assert "missing slice" in problem

    def transpose(meta):
        meta["tensors"]["h.0.mlp.c_fc.weight"]["shape"] = [32, 128]

    _rewrite_meta(root / S1, transpose)
    assert verify(root / S1) is None  # the same number of elements: consistent in itself
    with pytest.raises(
        CheckpointError,
        match=r"megagpt2.json: tensor h.0.mlp.c_fc.weight has shape \(32, 128\) in "
        r"the checkpoint but \(128, 32\) in the model",
    ):
        _loads(root / S1)


# -- a full disk -----------------------------------------------------------------------------------
def test_no_room_is_found_before_writing(two, monkeypatch):
    root, engine = two
    monkeypatch.setattr(store, "free_bytes", lambda d: 4096)
    with pytest.raises(
        CheckpointError,
        match=rf"No space left on device for checkpoint {root / S3}: .* need "
        r".*\(\d+ bytes\) but 4\.0 KiB are free",
    ):
        save_fake(engine, root, 3)
    assert not (root / S3).exists() and find_latest(str(root)) == S2 and verify(root / S2) is None


def test_disk_full_while_writing_removes_the_partial_checkpoint(two, monkeypatch):
    root, engine = two
    write = store.write_safetensors

    def fill_up(path, tensors, metadata=None):
        write(path, tensors, metadata)
        if path.parent.name == "tensors":
            _truncate(path, 0.3)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write(path, tensors, metadata)

    monkeypatch.setattr(store, "write_safetensors", fill_up)
    with pytest.raises(CheckpointError) as e:
        save_fake(engine, root, 3)
    msg = str(e.value)
    assert f"No space left on device writing {root / S3 / 'tensors/rank_00000.safetensors'}" in msg, msg
    assert "need" in msg and f"Removed the partial {root / S3}" in msg and f"newest complete checkpoint is {S2}" in msg
    assert not (root / S3).exists() and (root / "latest").read_text().strip() == S2


# -- interrupted saves -----------------------------------------------------------------------------
class _Killed(BaseException):
    """Stands in for SIGKILL: no except clause of the code under test catches it."""


def test_a_save_cut_short_anywhere_leaves_a_newest_checkpoint_that_loads(two, tmp_path_factory, monkeypatch):
    """Stop the save of step 3 before each file write and halfway through each one; every time the
    newest complete checkpoint verifies and loads, and `latest` names one that does."""
    root, engine = two
    calls: list = []
    for name in ("write_safetensors", "write_text"):
        real = getattr(store, name)
        monkeypatch.setattr(store, name, _counting(real, calls))
    calls.append(None)  # counting run: no interruption
    save_fake(engine, tmp_path_factory.mktemp("count"), 3)
    n = len(calls) - 1
    assert n >= 5  # rng, tensors, megagpt2.json, COMPLETE, latest
    for point in range(2 * n):
        d = tmp_path_factory.mktemp(f"cut{point}")
        shutil.copytree(root, d, dirs_exist_ok=True)
        calls.clear()
        calls.append(point)
        with pytest.raises(_Killed):
            save_fake(engine, d, 3)
        newest = find_latest(str(d))
        assert newest in (S2, S3) and verify(d / newest) is None, (point, newest)
        _loads(d / newest)
        latest = (d / "latest").read_text().strip()
        assert verify(d / latest) is None, (point, latest)


def _counting(real, calls: list):
    """Wrap a file writer: stop at the interruption point calls[0] (even: before the write, odd:
    halfway through it: a torn file, or for an atomic write a torn temporary file)."""

    def write(path, content, *args, **kwargs):
        point, k = calls[0], len(calls) - 1
        calls.append(path)
        if point is None or point // 2 != k:
            return real(path, content, *args, **kwargs)
        if point % 2:
            atomic = kwargs.get("atomic", args[0] if args else True) if isinstance(content, str) else False
            if atomic:
                path.with_name(path.name + ".tmp0").write_text(content[: len(content) // 2])
            else:
                real(path, content, *args, **kwargs)
                _truncate(path, 0.5)
        raise _Killed()

    return write


# -- pruning ---------------------------------------------------------------------------------------
def test_pruning_keeps_the_newest_removes_torn_saves_and_never_fails(two, monkeypatch, capsys):
    root, engine = two
    (root / "step_00000000").mkdir()  # an interrupted save, older than the newest complete one
    engine.train(1)
    save_fake(engine, root, 3, keep_last=2)
    assert complete_tags(str(root)) == [S2, S3] and not (root / "step_00000000").exists()

    def broken(*args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(store.shutil, "rmtree", broken)
    engine.train(1)
    assert save_fake(engine, root, 4, keep_last=2) == "step_00000004"
    assert "warning: could not prune old checkpoints" in capsys.readouterr().err
    assert complete_tags(str(root)) == [S2, S3, "step_00000004"] and verify(root / "step_00000004") is None


# -- resume ----------------------------------------------------------------------------------------
def _resume(root: Path, logged: list, **checkpoint):
    from megagpt2.checkpoint.resume import resume
    from megagpt2.config import Config
    from megagpt2.parallel import ParallelLayout

    layout = {"tp": 1, "pp": 1, "dp": 1, "global_batch": checkpoint.pop("global_batch", 2)}
    cfg = Config()
    cfg.checkpoint.dir = str(root)
    for k, v in checkpoint.items():
        setattr(cfg.checkpoint, k, v)
    engine = FakeEngine(seed=5)
    return resume(engine, ParallelLayout(), cfg, layout, log=logged.append), engine


def test_resume_moves_a_damaged_newest_checkpoint_aside(two):
    root, _ = two
    (root / S2 / "rng/rank_00000.safetensors").unlink()
    logged: list = []
    meta, engine = _resume(root, logged)
    assert meta["tag"] == S1 and engine.global_steps == 1
    assert not (root / S2).exists() and (root / f"{S2}.damaged").is_dir()
    assert any(m.startswith(f"moved the damaged {root / S2} aside") for m in logged), logged
    assert complete_tags(str(root)) == [S1]  # no longer counted, nor tried again


def test_another_global_batch_needs_the_flag(two):
    root, _ = two
    with pytest.raises(
        CheckpointError,
        match=r"global batch of 2 samples and this run has 4.*"
        r"--checkpoint.allow_batch_change=true",
    ):
        _resume(root, [], global_batch=4)
    logged: list = []
    meta, _ = _resume(root, logged, global_batch=4, allow_batch_change=True)
    assert meta["tag"] == S2 and any(m.startswith("warning:") and "global batch" in m for m in logged), logged
