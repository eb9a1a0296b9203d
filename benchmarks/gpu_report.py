"""Turn a gpu_check run's figures into one Markdown report, with every target judged.

    python benchmarks/gpu_report.py OUT_DIR            # writes OUT_DIR/RESULTS.md and prints it

Reads what benchmarks/gpu_check.sh leaves in OUT_DIR (summary.txt, train.json,
bench_train_*.json, bench_kernels_*.json, bench_model_*.json). The training and speed targets are
benchmarks/report_train.py's; the kernel targets (issue: fused kernels) are, on one H200:
  LayerNorm fwd+bwd at hidden 1600: >= 1.3x torch eager and >= 75% of measured copy bandwidth;
  causal softmax fwd+bwd: >= 2x the unfused torch sequence and >= 75% of copy bandwidth
  (judged at every softmax shape benchmarked).
The report is meant to be committed as is under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report_train import training_parts  # noqa: E402

LN_SPEEDUP, SOFTMAX_SPEEDUP, MIN_FRAC_BW = 1.3, 2.0, 0.75
LN_TARGET_HIDDEN = 1600


def judge(rows: list[dict]) -> list[tuple[str, bool, str]]:
    """(target, met?, evidence) for each target row found among the Triton rows."""
    verdicts = []
    for r in rows:
        if r["impl"] != "triton":
            continue
        if r["kernel"] == "layernorm" and r["shape"].endswith(f", {LN_TARGET_HIDDEN})"):
            need = LN_SPEEDUP
        elif r["kernel"] == "softmax":
            need = SOFTMAX_SPEEDUP
        else:
            continue
        what = f"{r['kernel']} {r['shape']}: >= {need}x eager, >= {MIN_FRAC_BW:.0%} of copy bandwidth"
        if "error" in r:
            verdicts.append((what, False, f"failed: {r['error']}"))
            continue
        met = r["speedup_vs_eager"] >= need and r["frac_copy_bw"] >= MIN_FRAC_BW
        verdicts.append((what, met, f"{r['speedup_vs_eager']:.2f}x, {r['frac_copy_bw']:.1%}"))
    return verdicts


def kernel_table(rows: list[dict]) -> list[str]:
    lines = [
        "| kernel | shape | impl | fwd ms | bwd ms | fwd+bwd ms | GB/s | % copy | vs eager | host ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['shape']} | {r['impl']} | failed: {r['error']} |" + " |" * 6)
            continue
        lines.append(
            f"| {r['kernel']} | {r['shape']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['bwd_ms']:.3f} | "
            f"{r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_gbps']:.0f} | {100 * r['frac_copy_bw']:.1f}% | "
            f"{r['speedup_vs_eager']:.2f}x | {r.get('host_ms', float('nan')):.3f} |"
        )
    return lines


def model_table(rows: list[dict]) -> list[str]:
    lines = [
        "| kernels | attention | ms/step | tokens/s | peak GiB | vs torch/torch | first loss |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernels']} | {r['attention']} | failed: {r['error']} |" + " |" * 4)
            continue
        lines.append(
            f"| {r['kernels']} | {r['attention']} | {r['ms']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['peak_gib']:.2f} | {r['speedup']:.2f}x | {r['loss']:.5f} |"
        )
    return lines


def report(out_dir: Path) -> str:
    kernel_files = sorted(out_dir.glob("bench_kernels_*.json"))
    model_files = sorted(out_dir.glob("bench_model_*.json"))
    summary = out_dir / "summary.txt"
    summary_text = summary.read_text().rstrip() if summary.is_file() else ""
    gpu = "mode: GPU" in summary_text or any(
        json.loads(p.read_text())["meta"]["device"] != "cpu" for p in out_dir.glob("bench_*.json")
    )
    train_parts, verdicts = training_parts(out_dir, gpu)
    if not (kernel_files or model_files or train_parts):
        raise SystemExit(
            f"{out_dir}: no figures (train.json, bench_*.json); run benchmarks/gpu_check.sh with OUT={out_dir} first"
        )
    parts = [
        "# megagpt2 on a GPU: figures from benchmarks/gpu_check.sh"
        if gpu
        else "# megagpt2, gpu_check dry run on CPU (tiny shapes): figures from benchmarks/gpu_check.sh --dry-run",
        "",
    ]
    if summary_text:
        parts += ["```", summary_text, "```", ""]
    parts += train_parts
    for path in kernel_files:
        figures = json.loads(path.read_text())
        meta = figures["meta"]
        verdicts += judge(figures["rows"]) if meta["dtype"] == "bf16" else []
        parts += [
            f"## {path.name}: {meta['dtype']} on {meta['device']}, {meta['date']}",
            "",
            f"torch {meta['torch']}, triton {meta['triton']}; copy bandwidth "
            f"{meta['copy_gbps']:.0f} GB/s; timing: {meta.get('timing', 'wall')}.",
            "",
        ]
        parts += kernel_table(figures["rows"]) + [""]
        if figures.get("sweep"):
            parts += (
                ["Tuning sweep (wN: N warps per program; bwd k/SM: LayerNorm backward programs per SM):", ""]
                + kernel_table(figures["sweep"])
                + [""]
            )
    for path in model_files:
        figures = json.loads(path.read_text())
        meta = figures["meta"]
        parts += [
            f"## {path.name}: {meta['config']}, {meta['dtype']}, batch {meta['micro_batch']} x "
            f"{meta['seq']} on {meta['device']}, {meta['date']}",
            "",
        ]
        parts += model_table(figures["rows"]) + [""]
    if verdicts:
        parts += ["## Targets", ""]
        parts += [f"- {'MET' if met else 'MISSED'}: {what} (measured {got})" for what, met, got in verdicts]
        parts.append("")
    return "\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path, help="the OUT directory of a gpu_check.sh run")
    args = p.parse_args(argv)
    text = report(args.out_dir)
    (args.out_dir / "RESULTS.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
