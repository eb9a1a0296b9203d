"""Resume under any layout: a (2, 2, 2) ZeRO-2 run's checkpoint continues in every other layout as
if nothing had changed (docs/checkpoints.md).

The source trains 7 steps at (tp, pp, dp) = (2, 2, 2), 1f1b, ZeRO-2, fp32, clipping active, with a
checkpoint after every step. Every target resumes from its step 4 (or from a later checkpoint of
another target: the reverse direction, the dp 4 -> 2 -> 4 round trip, interleaved -> 1f1b) and
must give the same losses, grad norms and learning rates (1e-6 relative) and, before its first
step, the same optimizer state (fp32 masters, exp_avg, exp_avg_sq, step) bit for bit, captured
through DeepSpeed's own gather functions. Targets: (1,1,1), (1,1,2), (2,1,1), (1,2,2) interleaved,
(2,2,1) with sequence parallelism, (1,1,4), all ZeRO-2, and (1,1,2) with ZeRO-0 and ZeRO-1; then
(1,1,1) -> (2,2,2), dp 4 -> 2 -> 4, interleaved -> 1f1b, and bf16 (1,1,2) -> (2,1,1). Several
targets also find a damaged newer checkpoint (each kind of file), a checkpoint cut short by
kill -9, or a full disk, and fall back. Targets of one world size share one set of spawned ranks.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from tests.ckpt_utils import (
    SAVED,
    assert_continues,
    assert_same_state,
    assert_tied_after_resume,
    full_state,
    job,
    run_config,
    run_jobs,
    seed_dir,
)

TAG4, TAG5 = "step_00000004", "step_00000005"
FROM_222 = "layout changed from tp=2 pp=2 dp=2 ZeRO-2 fp32 1f1b to "


@pytest.fixture(scope="module")
def src(source_222):
    tmp, cfg, results = source_222
    return {"dir": tmp / "ckpt", "prefix": cfg["data"]["path"], "results": results, "state": full_state(results, SAVED)}


def _cfg(src, ckpt: Path, interval: int = 0) -> dict:
    """A target's config: a checkpoint every `interval` steps (0: only at the end, step 7)."""
    return run_config(src["prefix"], ckpt, checkpoint={"interval": interval})


def _damage(d: Path, kind: str) -> str:
    """Damage step 5 of a seeded directory; returns the name of the damaged file."""
    step5 = d / TAG5
    if kind == "tensor file truncated":
        f = step5 / "tensors" / "rank_00003.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    elif kind == "metadata truncated":
        f = step5 / "megagpt2.json"
        f.write_bytes(f.read_bytes()[:100])
    elif kind == "rng file missing":
        f = step5 / "rng" / "rank_00005.safetensors"
        f.unlink()
    else:  # a flipped bit: only the checksum sees it
        f = step5 / "tensors" / "rank_00000.safetensors"
        data = bytearray(f.read_bytes())
        data[-5] ^= 0x10
        f.write_bytes(bytes(data))
    return str(f.relative_to(d))


# -- the spawned runs ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def killed(src, tmp_path_factory):
    """(1, 1, 2) resumes from step 4 and is killed (SIGKILL, every rank) while writing step 5."""
    from megagpt2.checkpoint import find_latest

    d = seed_dir(tmp_path_factory.mktemp("killed") / "ckpt", src["dir"] / TAG4)
    (d / "latest").write_text(TAG4 + "\n")
    with pytest.raises(RuntimeError, match="died without a result"):
        run_jobs(2, [job(_cfg(src, d, interval=5), 2, {}, kill_saving=5)])
    torn = sorted(str(f.relative_to(d / TAG5)) for f in (d / TAG5).rglob("*") if f.is_file())
    return {"dir": d, "latest": (d / "latest").read_text().strip(), "newest": find_latest(str(d)), "torn": torn}


@pytest.fixture(scope="module")
def small_disk(src, tmp_path_factory):
    """A checkpoint directory on a filesystem with room for one checkpoint and a bit: a real tmpfs
    when this process may mount one, else free space reported as that small."""
    d = tmp_path_factory.mktemp("tmpfs")
    size = sum(f.stat().st_size for f in (src["dir"] / TAG4).rglob("*") if f.is_file()) * 3 // 2
    mounted = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True).returncode
        == 0
    )
    seed_dir(d / "ckpt", src["dir"] / TAG4)
    yield d / "ckpt", (None if mounted else size - sum(f.stat().st_size for f in d.rglob("*") if f.is_file()))
    if mounted:
        subprocess.run(["umount", str(d)], check=False)


@pytest.fixture(scope="module")
def world1(src, killed, small_disk):
    disk, fake_free = small_disk
    jobs = [
        job(_cfg(src, disk, interval=5), 1, {}, expect_error=True, fake_free=fake_free),
        job(_cfg(src, killed["dir"], interval=5), 1, {}, capture_at=(5,)),
    ]
    return dict(zip(("enospc", "111"), run_jobs(1, jobs)))


@pytest.fixture(scope="module")
def world4a(src, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("w4a")
    layouts = {
        "122i": {"pp": 2, "schedule": "interleaved", "virtual_stages": 2},
        "221sp": {"tp": 2, "pp": 2, "schedule": "1f1b", "sequence_parallel": True},
        "114": {},
    }
    dirs = {k: seed_dir(tmp / k, src["dir"] / TAG4) for k in layouts}
    jobs = [job(_cfg(src, dirs[k], interval=5), 4, lay, capture_at=(5,)) for k, lay in layouts.items()]
    return {**dict(zip(layouts, run_jobs(4, jobs))), "dirs": dirs}


DAMAGED = {
    "112": ("tensor file truncated", {}, 2),
    "211": ("metadata truncated", {"tp": 2}, 2),
    "112z0": ("rng file missing", {}, 0),
    "112z1": ("bit flipped", {}, 1),
}


@pytest.fixture(scope="module")
def world2(src, world4a, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("w2")
    jobs, names, damaged = [], [], {}
    for name, (kind, layout, stage) in DAMAGED.items():
        d = seed_dir(tmp / name, src["dir"] / TAG4, src["dir"] / TAG5)
        damaged[name] = _damage(d, kind)
        jobs.append(job(_cfg(src, d), 2, layout, stage=stage))
        names.append(name)
    jobs.append(
        job(_cfg(src, tmp / "121"), 2, {"pp": 2, "schedule": "1f1b"}, copy_tags=(world4a["dirs"]["122i"] / TAG5,))
    )
    jobs.append(
        job(_cfg(src, tmp / "112rt", interval=6), 2, {}, capture_at=(6,), copy_tags=(world4a["dirs"]["114"] / TAG5,))
    )
    jobs.append(job(_cfg(src, tmp / "bf16", interval=SAVED), 2, {}, bf16=True, capture_at=(SAVED, 7)))
    jobs.append(job(_cfg(src, tmp / "bf16_211"), 2, {"tp": 2}, bf16=True, copy_tags=(tmp / "bf16" / TAG4,)))
    names += ["121", "112rt", "bf16", "bf16_211"]
    return {**dict(zip(names, run_jobs(2, jobs))), "damaged": damaged, "tmp": tmp}


@pytest.fixture(scope="module")
def world4b(src, world2):
    """dp 4 -> 2 -> 4: (1, 1, 4) again, from the (1, 1, 2) leg's step 6."""
    tmp = world2["tmp"]
    return run_jobs(4, [job(_cfg(src, tmp / "114rt"), 4, {}, copy_tags=(tmp / "112rt" / "step_00000006",))])[0]


@pytest.fixture(scope="module")
def world8(src, killed, world1):
    """The reverse direction: (1, 1, 1) -> (2, 2, 2), from the (1, 1, 1) target's step 5."""
    return run_jobs(
        8,
        [
            job(
                _cfg(src, killed["dir"].parent / "222"),
                8,
                {"tp": 2, "pp": 2, "schedule": "1f1b"},
                copy_tags=(killed["dir"] / TAG5,),
            )
        ],
    )[0]


def _check_resumed(results, src, want_state, first_step: int, to: str, later_rtol=None) -> None:
    assert_same_state(full_state(results, "resumed"), want_state)
    for r in results:
        assert r["resumed"]["steps"] == [float(first_step - 1)]
        assert r["resumed"]["lr"] == src["results"][0]["records"][first_step - 2]["lr"]  # set by step - 1
    assert_continues(results, src["results"], first_step, later_rtol=later_rtol)
    log = results[0]["log"]
    assert any(line.endswith(" to " + to) for line in log if line.startswith("layout changed from ")), log


# -- from the (2, 2, 2) checkpoint ----------------------------------------------------------------
@pytest.mark.parametrize(
    "name,to",
    [
        ("112", "tp=1 pp=1 dp=2 ZeRO-2 fp32"),
        ("211", "tp=2 pp=1 dp=1 ZeRO-2 fp32"),
        ("112z0", "tp=1 pp=1 dp=2 ZeRO-0 fp32"),
        ("112z1", "tp=1 pp=1 dp=2 ZeRO-1 fp32"),
    ],
)
def test_dp2_and_tp2_zero0_1_2_continue_exactly_past_a_damaged_newest_checkpoint(src, world2, name, to):
    """Each resumes from step 4 because its step 5 is damaged (a different file kind each), with
    a message naming the file."""
    results = world2[name]
    _check_resumed(results, src, src["state"], 5, to, later_rtol=1e-4 if "ZeRO-0" in to else None)
    log = results[0]["log"]
    damaged = world2["damaged"][name].split("/", 1)[1]
    assert any(f"{TAG5} is damaged" in line and damaged in line for line in log), log
    assert any(
        line.startswith("resuming from") and line.endswith(f"{TAG4}, the newest checkpoint that verifies")
        for line in log
    ), log


@pytest.mark.parametrize(
    "name,to",
    [
        ("122i", "tp=1 pp=2 dp=2 ZeRO-2 fp32 interleaved virtual stages 2"),
        ("221sp", "tp=2 pp=2 dp=1 ZeRO-2 fp32 1f1b sequence parallel"),
        ("114", "tp=1 pp=1 dp=4 ZeRO-2 fp32"),
    ],
)
def test_pipeline_and_dp4_layouts_continue_exactly(src, world4a, name, to):
    _check_resumed(world4a[name], src, src["state"], 5, to)
    if name != "114":
        assert_tied_after_resume(world4a[name])


def test_111_continues_exactly_after_a_kill_during_a_save(src, killed, world1):
    """kill -9 halfway through step 5's tensor files: `latest` still names step 4, the torn step 5
    has no COMPLETE, and a run under another layout continues exactly from step 4."""
    assert killed["latest"] == killed["newest"] == TAG4
    assert "tensors/rank_00000.safetensors" in killed["torn"] and "COMPLETE" not in killed["torn"], killed["torn"]
    _check_resumed(world1["111"], src, src["state"], 5, "tp=1 pp=1 dp=1 ZeRO-2 fp32")


# -- chains ----------------------------------------------------------------------------------------
def test_interleaved_checkpoint_resumes_as_1f1b(src, world4a, world2):
    results = world2["121"]
    _check_resumed(results, src, full_state(world4a["122i"], 5), 6, "tp=1 pp=2 dp=1 ZeRO-2 fp32 1f1b")
    assert_tied_after_resume(results)


@pytest.mark.slow
def test_dp4_to_dp2_to_dp4_round_trip(src, world4a, world2, world4b):
    _check_resumed(world2["112rt"], src, full_state(world4a["114"], 5), 6, "tp=1 pp=1 dp=2 ZeRO-2 fp32")
    _check_resumed(world4b, src, full_state(world2["112rt"], 6), 7, "tp=1 pp=1 dp=4 ZeRO-2 fp32")


@pytest.mark.slow
def test_111_checkpoint_resumes_as_222(src, world1, world8):
    _check_resumed(world8, src, full_state(world1["111"], 5), 6, "tp=2 pp=2 dp=2 ZeRO-2 fp32 1f1b")
    assert_tied_after_resume(world8)


# -- bf16 ------------------------------------------------------------------------------------------
def test_bf16_layout_change_keeps_the_fp32_masters(world2):
    """(1, 1, 2) -> (2, 1, 1) in bf16 with ZeRO-2: masters and moments bit-identical, the bf16
    weights are the masters rounded, and the losses stay within bf16 noise of the unbroken run."""
    source, target = world2["bf16"], world2["bf16_211"]
    assert_same_state(full_state(target, "resumed"), full_state(source, SAVED))
    assert all(t.dtype == torch.bfloat16 for r in target for t in r["resumed"]["lp"].values())
    want = [x["loss"] for x in source[0]["records"][SAVED:]]
    got = [x["loss"] for x in target[0]["records"]]
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        assert abs(a - b) <= 2e-2 * abs(b), (got, want)
    full_lp = {}
    from megagpt2.parallel.layers import unshard

    for name in target[0]["resumed"]["lp"]:
        pieces = [r["resumed"]["lp"][name] for r in sorted(target, key=lambda r: r["ps"][0])]
        dim, stride = target[0]["params"][name][1:]
        full_lp[name] = pieces[0] if dim is None else unshard(pieces, dim, stride)
    masters = full_state(target, "resumed")
    for name, lp in full_lp.items():
        assert torch.equal(lp, masters[name]["master"].to(torch.bfloat16)), name


def test_hf_export_of_a_bf16_run_takes_the_fp32_masters(world2, tmp_path):
    from megagpt2.interop import load_hf_dir
    from tools import convert_checkpoint

    source = world2["bf16"]
    out = tmp_path / "hf"
    assert convert_checkpoint.main(["--input", str(world2["tmp"] / "bf16"), "--output", str(out), "--to", "hf"]) == 0
    _, exported = load_hf_dir(str(out))
    masters = full_state(source, 7)
    rounded = 0
    for name, entry in masters.items():
        assert exported[name].dtype == torch.float32 and torch.equal(exported[name], entry["master"]), name
        rounded += int(not torch.equal(entry["master"].to(torch.bfloat16).float(), entry["master"]))
    assert rounded > 0  # the masters carry more than bf16 holds: a bf16 export would differ


# -- a full disk -----------------------------------------------------------------------------------
def test_full_disk_says_so_removes_the_partial_save_and_keeps_the_previous(src, small_disk, world1):
    """On a filesystem with no room for step 5 the run stops saying so; step 4 is the newest, intact
    byte for byte (the targets above show that a copy of it resumes exactly)."""
    from megagpt2.checkpoint import find_latest, verify

    disk, _ = small_disk
    err = world1["enospc"][0]["error"]
    assert "No space left" in err and str(disk / TAG5) in err and "bytes" in err, err
    assert world1["enospc"][0]["records"] and not (disk / TAG5).exists()  # step 5 trained, not saved
    assert find_latest(str(disk)) == TAG4 and verify(disk / TAG4) is None
    for f in (src["dir"] / TAG4).rglob("*"):
        if f.is_file():
            assert (disk / TAG4 / f.relative_to(src["dir"] / TAG4)).read_bytes() == f.read_bytes(), f
