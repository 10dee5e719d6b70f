"""The run report: one self-contained HTML page to look at after a run.

It reads only the run's reports (metrics, training history and summary, token statistics,
validation report, generations) and draws:

    +-------------------------------------------------------------+
    | header: model, method, steps, rows kept / rejected          |
    | metrics: base | tuned | change, per metric                  |
    | training loss curve          | learning-rate curve          |
    | token-length histogram       | rejected records by reason   |
    | generations: prompt | reference | base | tuned              |
    +-------------------------------------------------------------+

Self-contained means it opens offline and from an e-mail attachment: CSS inline, charts as
base64 PNG data URIs, no script and no link to anything outside the file.
"""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from typing import Any

from jinja2 import Environment

from sft_pipeline.evaluation.benchmark_table import benchmark_rows

# Metric key -> (label, higher is better). The order is the table's.
METRICS = {
    "eval_loss": ("eval loss", False),
    "perplexity": ("perplexity", False),
    "mean_token_accuracy": ("token accuracy", True),
    "exact_match": ("exact match", True),
    "rouge_l": ("ROUGE-L", True),
    "chrf": ("chrF", True),
    "stopped_by_eos": ("stopped by EOS", True),
    "mean_generated_tokens": ("generated tokens (mean)", None),
    "tool_call_parsed": ("tool call parses", True),
    "tool_call_name_match": ("tool call: right function", True),
    "tool_call_exact_match": ("tool call: right function and arguments", True),
}
MAX_GENERATIONS = 20


def render_report(
    metrics: dict[str, Any],
    training_history: list[dict[str, Any]],
    training_summary: dict[str, Any],
    token_stats: dict[str, Any],
    validation_report: dict[str, Any],
    eval_generations: list[dict[str, Any]],
) -> str:
    """The report page as an HTML string."""
    from sft_pipeline.evaluation.plots import plot_token_lengths, plot_training_history

    charts = {
        "Training loss": png_data_uri(plot_training_history(training_history)),
        "Learning rate": png_data_uri(plot_learning_rate(training_history)),
        "Tokens per row": png_data_uri(plot_token_lengths(token_stats)),
    }
    template = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True).from_string(PAGE)
    return template.render(
        facts=run_facts(training_summary or {}, validation_report or {}, token_stats or {}),
        metric_rows=metric_rows(metrics or {}),
        benchmarks=benchmark_report_rows(metrics or {}),
        counts=_counts(metrics or {}),
        charts=charts,
        rejections=rejection_rows(validation_report or {}, token_stats or {}),
        generations=generation_rows(eval_generations or []),
        total_generations=len(eval_generations or []),
    )


def metric_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric both models have: label, values, change and which side is better."""
    rows = []
    for key, (label, higher_better) in METRICS.items():
        base, tuned = metrics.get(f"base/{key}"), metrics.get(f"tuned/{key}")
        if base is None or tuned is None:
            continue
        better = None
        if higher_better is not None and base != tuned:
            better = "tuned" if (tuned > base) == higher_better else "base"
        rows.append(
            {
                "key": key,
                "label": label,
                "base": _fmt(base),
                "tuned": _fmt(tuned),
                "delta": _fmt(tuned - base, signed=True),
                "better": better,
            }
        )
    return rows


def benchmark_report_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The benchmark table: per task and metric, each side with its 95% interval, the change with
    its own, and whether it is beyond two standard errors (the significance the table marks)."""
    rows = []
    for row in benchmark_rows(metrics):
        cells = {}
        for side in ("base", "tuned", "delta"):
            ci, signed = row.get(f"{side}_ci"), side == "delta"
            interval = f"[{_fmt(ci[0], signed=signed)}, {_fmt(ci[1], signed=signed)}]" if ci else ""
            cells[side] = (_fmt(row[side], signed=signed), interval)
        higher = row.get("higher_is_better")
        better = None
        if row["significant"] and higher is not None:
            better = "tuned" if (row["delta"] > 0) == higher else "base"
        rows.append(
            {
                "task": row["task"],
                "metric": row["metric"],
                "prompt": "chat template" if row.get("chat_template") else "plain",
                "samples": row.get("samples"),
                "cells": cells,
                "significant": row["significant"],
                "better": better,
            }
        )
    return rows


def rejection_rows(
    validation_report: dict[str, Any], token_stats: dict[str, Any]
) -> list[dict[str, Any]]:
    """Rejected records per (stage, reason): validation codes, then tokenization reasons."""
    rows = [
        {"stage": "validation", "reason": reason, "count": count}
        for reason, count in (validation_report.get("reasons") or {}).items()
    ]
    for split, stats in sorted((token_stats.get("splits") or {}).items()):
        reasons = Counter(r.get("reason", "?") for r in stats.get("rejected_rows") or [])
        rows.extend(
            {"stage": f"tokenization ({split})", "reason": reason, "count": count}
            for reason, count in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
        )
    return rows


def generation_rows(generations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for g in generations[:MAX_GENERATIONS]:
        reference = (g.get("reference") or "").strip()
        rows.append(
            {
                "prompt": g.get("prompt", ""),
                "reference": reference,
                "base": g.get("base_output", ""),
                "tuned": g.get("tuned_output", ""),
                "base_match": _matches(g, g.get("base_output") or "", reference),
                "tuned_match": _matches(g, g.get("tuned_output") or "", reference),
                # Vision-language samples: each image's thumbnail (a data: URI) and source.
                "images": list(zip(g.get("thumbnails") or [], g.get("images") or [], strict=False)),
            }
        )
    return rows


def _matches(generation: dict[str, Any], output: str, reference: str) -> bool:
    """Exact match; for a tool-call row, the parsed calls equal the reference calls."""
    if generation.get("task") == "tool_call":
        from sft_pipeline.evaluation.metrics import tool_call_scores

        scores = tool_call_scores([{"text": output}], [json.loads(reference)])
        return scores["tool_call_exact_match"] == 1.0
    return output.strip() == reference


def run_facts(
    summary: dict[str, Any], validation: dict[str, Any], token_stats: dict[str, Any]
) -> list[tuple[str, Any]]:
    """(label, value) pairs for the header line; what a run did not record is left out."""
    splits = token_stats.get("splits") or {}
    facts = [
        ("method", summary.get("method")),
        ("precision", summary.get("precision")),
        ("steps", summary.get("global_step")),
        ("train rows", (splits.get("train") or {}).get("rows_kept")),
        ("eval rows", (splits.get("eval") or {}).get("rows_kept")),
        ("records ingested", validation.get("ingested")),
        ("rejected", validation.get("rejected")),
    ]
    runtime = summary.get("train_runtime_s")
    if runtime:
        facts.append(("training time", f"{runtime:.0f} s"))
    return [(label, value) for label, value in facts if value is not None]


def _counts(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "generation_samples": metrics.get("num_generation_samples"),
        "tool_call_samples": metrics.get("num_tool_call_samples"),
        "supervised_tokens": metrics.get("num_supervised_tokens"),
    }


def _fmt(value: Any, *, signed: bool = False) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def plot_learning_rate(history: list[dict[str, Any]]):
    from sft_pipeline.evaluation.plots import new_figure

    figure, axes = new_figure("Learning rate")
    points = [
        (h["step"], h["learning_rate"]) for h in history or [] if h.get("learning_rate") is not None
    ]
    if points:
        axes.plot(*zip(*points, strict=True), "-", color="tab:green")
    else:
        axes.text(0.5, 0.5, "no learning rate logged", ha="center", va="center")
    axes.set_xlabel("step")
    axes.set_ylabel("learning rate")
    axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return figure


def png_data_uri(figure) -> str:
    """A matplotlib figure as a `data:image/png;base64,...` URI (same figure, same bytes)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>SFT run report</title>
<style>
  body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0;
         color: #1d2330; background: #f5f6f8; }
  main { max-width: 1180px; margin: 0 auto; padding: 24px; }
  h1 { font-size: 22px; margin: 0 0 4px; }
  h2 { font-size: 16px; margin: 28px 0 10px; }
  .facts { color: #566; margin: 0; }
  .facts span { margin-right: 18px; white-space: nowrap; }
  section.card { background: #fff; border: 1px solid #dde1e6; border-radius: 8px;
                 padding: 14px 16px; }
  table { border-collapse: collapse; width: 100%; }
  #generations { table-layout: fixed; }
  img.thumb { max-width: 96px; max-height: 96px; margin: 0 4px 4px 0; }
  th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid #e8eaee;
           vertical-align: top; }
  th { background: #f0f2f5; font-weight: 600; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  td.better { font-weight: 700; color: #0a6b2d; }
  td.significant { background: #fff4d6; }
  .ci { color: #788; font-size: 12px; white-space: nowrap; }
  .grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(360px, 1fr));
          gap: 16px; }
  figure { margin: 0; }
  figure img { width: 100%; height: auto; display: block; }
  pre { margin: 0; white-space: pre-wrap; word-break: break-word;
        font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
  .match { color: #0a6b2d; font-weight: 700; }
  .miss { color: inherit; }
  .empty { color: #788; font-style: italic; }
</style>
</head>
<body>
<main>
<h1>SFT run report</h1>
<p class="facts">
{% for label, value in facts %}<span>{{ label }} <b>{{ value }}</b></span>{% endfor %}
</p>

<h2>Base vs tuned (held-out split)</h2>
<section class="card">
{% if metric_rows %}
<table id="metrics">
  <thead><tr><th>metric</th><th>base</th><th>tuned</th><th>change</th></tr></thead>
  <tbody>
  {% for row in metric_rows %}
    <tr data-metric="{{ row.key }}"><td>{{ row.label }}</td>
      <td class="num{{ ' better' if row.better == 'base' }}">{{ row.base }}</td>
      <td class="num{{ ' better' if row.better == 'tuned' }}">{{ row.tuned }}</td>
      <td class="num">{{ row.delta }}</td></tr>
  {% endfor %}
  </tbody>
</table>
<p class="facts">{{ counts.generation_samples or 0 }} prompts generated greedily;
{% if counts.tool_call_samples %}
  {{ counts.tool_call_samples }} tool calls generated (the prompt up to a reference call);
{% endif %}
  {{ counts.supervised_tokens or 0 }} supervised tokens scored. Bold: the better side.</p>
{% else %}
<p class="empty">No metrics: the run did not evaluate.</p>
{% endif %}
</section>

{% if benchmarks %}
<h2>Benchmarks (lm-evaluation-harness)</h2>
<section class="card">
<table id="benchmarks">
  <thead><tr><th>task</th><th>metric</th><th>prompt</th><th>items</th><th>base</th>
    <th>tuned</th><th>change</th></tr></thead>
  <tbody>
  {% for row in benchmarks %}
    <tr data-task="{{ row.task }}" data-metric="{{ row.metric }}"><td>{{ row.task }}</td>
      <td>{{ row.metric }}</td><td>{{ row.prompt }}</td>
      <td class="num">{{ row.samples if row.samples is not none else '' }}</td>
    {% for side in ('base', 'tuned', 'delta') %}
      <td class="num{{ ' better' if row.better == side }}{{ ' significant' if side == 'delta'
        and row.significant }}">{{ row.cells[side][0] }}
        <span class="ci">{{ row.cells[side][1] }}</span></td>
    {% endfor %}</tr>
  {% endfor %}
  </tbody>
</table>
<p class="facts">Brackets: 95% intervals (± 1.96 standard errors; the change's from both
  sides' errors). Marked: a change beyond two standard errors. Bold: the better side there.</p>
</section>
{% endif %}

<h2>Training and data</h2>
<div class="grid">
{% for title, uri in charts.items() %}
  <section class="card"><figure><img alt="{{ title }}" src="{{ uri }}"></figure></section>
{% endfor %}
  <section class="card">
    <table id="rejections">
      <thead><tr><th>stage</th><th>reason rejected</th><th>records</th></tr></thead>
      <tbody>
      {% for row in rejections %}
        <tr><td>{{ row.stage }}</td><td>{{ row.reason }}</td>
          <td class="num">{{ row.count }}</td></tr>
      {% else %}
        <tr><td colspan="3" class="empty">No record was rejected.</td></tr>
      {% endfor %}
      </tbody>
    </table>
  </section>
</div>

<h2>Sample generations{% if total_generations > generations|length %}
  (first {{ generations|length }} of {{ total_generations }}){% endif %}</h2>
<section class="card">
{% if generations %}
<table id="generations">
  <thead><tr><th>prompt</th><th>reference</th><th>base</th><th>tuned</th></tr></thead>
  <tbody>
  {% for g in generations %}
    <tr><td>{% for src, name in g.images %}<img class="thumb" src="{{ src }}" alt="{{ name }}"
      title="{{ name }}">{% endfor %}<pre>{{ g.prompt }}</pre></td>
      <td><pre>{{ g.reference }}</pre></td>
      <td><pre class="{{ 'match' if g.base_match else 'miss' }}">{{ g.base }}</pre></td>
      <td><pre class="{{ 'match' if g.tuned_match else 'miss' }}">{{ g.tuned }}</pre></td></tr>
  {% endfor %}
  </tbody>
</table>
{% else %}
<p class="empty">No generations (no eval prompt with a reference answer).</p>
{% endif %}
</section>
</main>
</body>
</html>
"""
