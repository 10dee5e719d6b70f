"""metrics.json's entries from what the two models produced: for the whole held-out split, and
for each source of a mixture. No model and no torch here.

    metrics.json
    |-- num_eval_rows, num_generation_samples, num_supervised_tokens, ...   (counts)
    |-- base/<metric>, tuned/<metric>, delta/<metric>                      (the whole split)
    |-- benchmarks/...                                                      (lm-eval, not here)
    `-- per_source                              (only when the eval rows name two sources)
        `-- <source name>: the same counts and base/tuned/delta entries, on its rows alone

A source's name is its `data.sources` name (by default its path, which may hold `/`), so the
sources are a mapping rather than more `/`-separated keys. Rows whose trained turn reasons add
the `REASONING_METRICS` (the answer alone, the share of closed reasoning blocks) and
`num_reasoning_samples`, wherever they are among the scored rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sft_pipeline.evaluation.metrics import (
    GENERATION_METRICS,
    LOSS_METRICS,
    REASONING_METRICS,
    TOOL_CALL_METRICS,
    generation_scores,
    loss_metrics,
    reasoning_scores,
    tool_call_scores,
)

SIDES = ("base", "tuned")
PER_SOURCE = "per_source"
# The metrics that get a `delta/` entry (tuned minus base).
COMPARED = (*LOSS_METRICS, *GENERATION_METRICS, *TOOL_CALL_METRICS, *REASONING_METRICS)


@dataclass
class LossTotals:
    """Sums over the supervised tokens of some rows, which add up across groups of rows."""

    nll: float = 0.0
    correct: int = 0
    tokens: int = 0

    def add(self, nll: float, correct: int, tokens: int) -> None:
        self.nll += nll
        self.correct += correct
        self.tokens += tokens


@dataclass
class SideOutputs:
    """What one model gave: loss totals per source (`""`: rows of no named source), and its
    generations of the samples and of the tool calls, in their order."""

    losses: dict[str, LossTotals] = field(default_factory=dict)
    generated: list[dict[str, Any]] = field(default_factory=list)
    called: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Scored:
    """The held-out rows evaluation scored: the source of each tokenized row, the generation
    samples (eval_texts rows) and the tool calls (`{"reference", "source"}`)."""

    row_sources: Sequence[str]
    samples: Sequence[dict[str, Any]]
    calls: Sequence[dict[str, Any]]
    reasoning_tags: tuple[str, str] = ("<think>", "</think>")

    def sources(self) -> list[str]:
        """The named sources among the rows, in the order they first appear."""
        found = dict.fromkeys(self.row_sources)
        found.update(dict.fromkeys(s.get("source", "") for s in (*self.samples, *self.calls)))
        return [name for name in found if name]


def split_metrics(scored: Scored, outputs: dict[str, SideOutputs]) -> dict[str, Any]:
    """The flat metrics of the whole split, and `per_source` when the rows name two sources."""
    metrics = subset_metrics(scored, outputs, lambda _source: True)
    sources = scored.sources()
    if len(sources) > 1:
        metrics[PER_SOURCE] = {
            name: dict(sorted(subset_metrics(scored, outputs, lambda s, n=name: s == n).items()))
            for name in sources
        }
    return metrics


def subset_metrics(
    scored: Scored, outputs: dict[str, SideOutputs], keep: Callable[[str], bool]
) -> dict[str, Any]:
    """Counts, base/tuned metrics and their deltas over the rows whose source `keep` accepts."""
    rows = sum(1 for source in scored.row_sources if keep(source))
    samples = [i for i, s in enumerate(scored.samples) if keep(s.get("source", ""))]
    calls = [i for i, c in enumerate(scored.calls) if keep(c.get("source", ""))]
    reasoned = [i for i in samples if scored.samples[i].get("reasoning")]
    metrics: dict[str, Any] = {"num_eval_rows": rows, "num_generation_samples": len(samples)}
    if calls:
        metrics["num_tool_call_samples"] = len(calls)
    if reasoned:
        metrics["num_reasoning_samples"] = len(reasoned)
    for side in SIDES:
        out = outputs[side]
        totals = LossTotals()
        for source, part in out.losses.items():
            if keep(source):
                totals.add(part.nll, part.correct, part.tokens)
        scores = loss_metrics(totals.nll, totals.correct, totals.tokens) if rows else {}
        scores |= generation_scores(
            [out.generated[i] for i in samples], [scored.samples[i]["reference"] for i in samples]
        )
        scores |= tool_call_scores(
            [out.called[i] for i in calls], [scored.calls[i]["reference"] for i in calls]
        )
        scores |= reasoning_scores(
            [out.generated[i] for i in reasoned],
            [scored.samples[i]["prompt"] for i in reasoned],
            [scored.samples[i]["reference"] for i in reasoned],
            scored.reasoning_tags,
        )
        metrics.update({f"{side}/{k}": v for k, v in scores.items()})
    metrics["num_supervised_tokens"] = metrics.pop("base/num_tokens", 0)
    metrics.pop("tuned/num_tokens", None)
    return _with_deltas(metrics)


def _with_deltas(metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` with `delta/<metric>` (tuned minus base) for each compared metric both have."""
    for key in COMPARED:
        if f"base/{key}" in metrics and f"tuned/{key}" in metrics:
            metrics[f"delta/{key}"] = metrics[f"tuned/{key}"] - metrics[f"base/{key}"]
    return metrics
