"""Benchmark results as rows: read back from metrics.json by the run report and the closing
summary, so both show the same intervals and the same significance rule.

Kept free of lm-eval and of the rest of the package: the closing summary is printed by a run
hook, which every stage's code depends on.
"""

from __future__ import annotations

from typing import Any

PREFIX = "benchmarks"  # metrics.json: benchmarks/<task>/<metric>/{base,tuned,delta,...}
SIDES = ("base", "tuned")
# A difference counts as real beyond this many standard errors (about 95% two-sided).
SIGNIFICANT_STDERRS = 2.0
Z95 = 1.96  # a 95% interval is the value ± Z95 standard errors


def benchmark_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, metric) from metrics.json: values, stderrs, 95% intervals, whether the
    difference is beyond two standard errors, and the prompt format used."""
    fields: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if parts[0] != PREFIX or len(parts) < 4:
            continue
        fields.setdefault((parts[1], "/".join(parts[2:-1])), {})[parts[-1]] = value
    rows = []
    for (task, metric), f in sorted(fields.items()):
        if "base" not in f or "tuned" not in f:
            continue
        row = {"task": task, "metric": metric, **f}
        row["chat_template"] = metrics.get(f"{PREFIX}/{task}/chat_template")
        row["samples"] = metrics.get(f"{PREFIX}/{task}/samples")
        se = f.get("delta_stderr")
        row["significant"] = se is not None and abs(f["delta"]) > SIGNIFICANT_STDERRS * se
        for side in (*SIDES, "delta"):
            side_se = f.get(f"{side}_stderr")
            row[f"{side}_ci"] = (
                (f[side] - Z95 * side_se, f[side] + Z95 * side_se) if side_se is not None else None
            )
        rows.append(row)
    return rows


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """Closing-summary lines: per task and metric, base and tuned with their 95% intervals."""
    lines = []
    for row in benchmark_rows(metrics):
        cells = [f"{side} {_with_interval(row[side], row.get(f'{side}_stderr'))}" for side in SIDES]
        mark = " *" if row["significant"] else ""
        lines.append(
            f"  {row['task']} {row['metric']}: {cells[0]}, {cells[1]},"
            f" change {row['delta']:+.3f}{mark}"
        )
    if lines:
        lines.insert(0, "Benchmarks (lm-evaluation-harness; ± is the 95% interval, * beyond 2 SE)")
    return lines


def _with_interval(value: float, stderr: float | None) -> str:
    return f"{value:.3f}" if stderr is None else f"{value:.3f} ± {Z95 * stderr:.3f}"
