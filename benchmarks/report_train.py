"""The training half of RESULTS.md: the main job's checks, bench_train tables, the speed targets.

Used by benchmarks/gpu_report.py. Targets (issue: speed, measured side by side):
  one H200 (or H100), bf16, seq 1024: megagpt2's best row has MFU >= 45% at 124M and >= 55% at
  1.5B, and, in the same run, >= 1.0x the compiled plain reference and >= 1.5x Hugging Face eager;
  CPU: megagpt2's trainer step within 10% of the plain eager reference (tiny model, one rank);
  anywhere: launch to first step of the real entry within 2x that of a plain script; the main
  job's loss falls and its resumed steps equal the uninterrupted run's.
"""

from __future__ import annotations

import json
from pathlib import Path

MFU_TARGET = {"124m": 0.45, "1.5b": 0.55}
VS_PLAIN_COMPILED, VS_HF_EAGER, CPU_WITHIN, LAUNCH_WITHIN = 1.0, 1.5, 0.10, 2.0
Verdict = tuple[str, bool, str]  # (target, met?, what was measured)


def _rows_ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "ms" in r]


def bench_table(fig: dict) -> list[str]:
    meta = fig["meta"]
    lines = [
        f"{meta['device']}, {meta['dtype']}, torch {meta['torch']}, {meta['date']}; "
        f"peak {meta['peak_tflops']:.4g} TFLOP/s ({meta['peak_source']}); "
        f"median of {meta['iters']} steps after {meta['warmup']} + 1 untimed.",
        "",
        "| shape | row | ms/step | tokens/s | TFLOP/s | MFU | peak GiB | vs plain:compile | first loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in fig["rows"]:
        if "ms" not in r:
            why = f"failed: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"
            lines.append(f"| {r['shape']} | {r['row']} | {why} |" + " |" * 6)
            continue
        ratio = "-" if r["vs_plain_compiled"] != r["vs_plain_compiled"] else f"{r['vs_plain_compiled']:.2f}x"
        lines.append(
            f"| {r['shape']} | {r['row']} | {r['ms']:.2f} | {r['tokens_per_s']:.0f} | {r['tflops']:.3f} | "
            f"{100 * r['mfu']:.1f}% | {r['peak_gib']:.2f} | {ratio} | {r['loss']:.4f} |"
        )
    for r in fig.get("launch", []):
        took = f"{r['seconds']:.1f} s" if "seconds" in r else f"failed: {r['error']}"
        lines.append(f"\nLaunch to first step, {r['what']}: {took}")
    return lines


def bench_targets(fig: dict) -> list[Verdict]:
    """GPU targets per shape (MFU, vs plain compiled, vs HF eager); CPU: trainer vs plain eager."""
    rows = _rows_ok(fig["rows"])
    out: list[Verdict] = []
    if fig["meta"]["device"] == "cpu":
        by = {r["row"]: r for r in rows}
        ours, plain = by.get("megagpt2:torch:flash:eager"), by.get("plain:eager")
        if ours and plain:
            slower = ours["ms"] / plain["ms"] - 1
            out.append(
                (
                    f"CPU ({ours['shape']}): megagpt2's trainer step within {CPU_WITHIN:.0%} of plain eager",
                    slower <= CPU_WITHIN,
                    f"{ours['ms']:.1f} vs {plain['ms']:.1f} ms/step ({slower:+.1%})",
                )
            )
        return out
    for preset, mfu_target in MFU_TARGET.items():
        shape_rows = [r for r in rows if r["shape"].split()[0] == preset]
        ours = [r for r in shape_rows if r["row"].startswith("megagpt2")]
        if not ours:
            continue
        best = max(ours, key=lambda r: r["tokens_per_s"])
        where = f"{preset}, best megagpt2 row {best['row']}"
        out.append((f"{where}: MFU >= {mfu_target:.0%}", best["mfu"] >= mfu_target, f"{100 * best['mfu']:.1f}%"))
        for ref, need in (("plain:compile", VS_PLAIN_COMPILED), ("hf:eager", VS_HF_EAGER)):
            other = next((r for r in shape_rows if r["row"] == ref), None)
            if other is None:
                out.append((f"{where}: >= {need}x {ref}", False, f"no {ref} figure"))
                continue
            ratio = best["tokens_per_s"] / other["tokens_per_s"]
            out.append((f"{where}: >= {need}x {ref}", ratio >= need, f"{ratio:.2f}x"))
    return out


def train_section(train: dict) -> tuple[list[str], list[Verdict]]:
    checks = train["checks"]
    a, b = train["a"], train["b"]
    lines = [
        f"`deepspeed --num_gpus 1 launch/pretrain_gpt2.py --deepspeed_config configs/ds/zero2.json --config "
        f"{train['config']}`, {train['steps']} steps, checkpoint at {train['save_at']}, then a resume in a "
        f"fresh directory holding only that checkpoint.",
        "",
    ]
    for name, run in (("run A", a), ("run B (resume)", b)):
        if run.get("exit_code") is None:
            lines.append(f"- {name}: {run.get('error', 'not run')}")
            continue
        first = run["first_step_s"]
        lines.append(
            f"- {name}: exit code {run['exit_code']}, launch to first step "
            f"{'-' if first is None else f'{first:.1f} s'}, total {run['total_s']:.1f} s"
        )
    shown = [line for line in a.get("log_lines", []) if line.startswith("memory")] + a.get("log_lines", [])[-2:]
    if shown:
        lines += ["", "```"] + shown + ["```"]
    la, lb = train.get("losses_a", {}), train.get("losses_b", {})
    if la:
        lines += ["", "| step | loss A | loss B (resumed) |", "|---:|---:|---:|"]
        for s in sorted(la, key=int):
            lines.append(f"| {s} | {la[s]:.5f} | {lb[s]:.5f} |" if s in lb else f"| {s} | {la[s]:.5f} | |")
    verdicts: list[Verdict] = [
        (
            "main job: the loss falls (mean of the last steps below the first ones)",
            checks["loss_falls"],
            f"{checks.get('first_loss', float('nan')):.4f} -> {checks.get('last_loss', float('nan')):.4f}",
        ),
        (
            f"main job: resumed steps equal the uninterrupted run's within {train['tolerance']:g} (relative)",
            checks["resume_matches"],
            f"resumed at step {checks['resumed_at']}, max relative difference {checks['max_rel_diff']}",
        ),
    ]
    plain = train.get("plain_launch")
    if plain and "seconds" in plain and a.get("first_step_s"):
        ratio = a["first_step_s"] / plain["seconds"]
        verdicts.append(
            (
                f"launch to first step within {LAUNCH_WITHIN:g}x a plain script's",
                ratio <= LAUNCH_WITHIN,
                f"{a['first_step_s']:.1f} s vs {plain['seconds']:.1f} s ({ratio:.2f}x)",
            )
        )
    return lines, verdicts


def training_parts(out_dir: Path, gpu: bool) -> tuple[list[str], list[Verdict]]:
    """Markdown sections and verdicts from train.json and bench_train_*.json in out_dir."""
    parts: list[str] = []
    verdicts: list[Verdict] = []
    train = out_dir / "train.json"
    if train.is_file():
        lines, v = train_section(json.loads(train.read_text()))
        parts += ["## The main job: train, checkpoint, resume", ""] + lines + [""]
        verdicts += v
    for path in sorted(out_dir.glob("bench_train_*.json")):
        fig = json.loads(path.read_text())
        parts += [f"## {path.name}: one optimizer step side by side", ""] + bench_table(fig) + [""]
        verdicts += bench_targets(fig)
    if not gpu:
        parts += ["GPU targets (MFU, vs plain compiled, vs Hugging Face) are not judged: no GPU in this run.", ""]
    return parts, verdicts
