"""What a run prints: third-party noise a user can do nothing about filtered out, and a closing
summary (base vs tuned, where the results are) after every run that evaluated.

Each filter matches one known message from one library, so any other warning still shows:

- bitsandbytes, on CPUs with AVX512-BF16, logs at import that the optional `kernels` package
  (a download of prebuilt kernels) is missing; it then uses its own CPU kernels.
- peft reads transformers' deprecated `is_gradient_checkpointing` property when it wraps a
  model, which raises a FutureWarning that names transformers' code, not ours.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from sft_pipeline.common.log_markup import keep_messages_as_written
from sft_pipeline.evaluation import benchmark_table

# Nodes whose run ends with a summary: evaluation writes the metrics, the report shows them.
SUMMARY_NODES = ("evaluate_model", "report_run")
# (metric key, label) of the closing table; the report page has the full set.
SUMMARY_METRICS = (
    ("eval_loss", "eval loss"),
    ("exact_match", "exact match"),
    ("rouge_l", "ROUGE-L"),
    ("stopped_by_eos", "stopped by EOS"),
)
# (catalog dataset, label) of the artifacts a user opens next.
SUMMARY_PATHS = (
    ("run_report", "report"),
    ("merged_model", "merged model"),
    ("metrics", "metrics"),
)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


_BNB_KERNELS = _DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community")


def install_filters() -> None:
    """Silence the known third-party messages above, and keep our own messages as written on
    every handler that reads markup (idempotent)."""
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if _BNB_KERNELS not in bnb.filters:
        bnb.addFilter(_BNB_KERNELS)
    keep_messages_as_written()
    warnings.filterwarnings(
        "ignore",
        message=r"`is_gradient_checkpointing` is deprecated",
        category=FutureWarning,
    )


def summary_table(metrics: dict[str, Any]) -> list[str]:
    """Aligned text rows: metric | base | tuned | change (metrics both models have)."""
    rows = [("metric", "base", "tuned", "change")]
    for key, label in SUMMARY_METRICS:
        base, tuned = metrics.get(f"base/{key}"), metrics.get(f"tuned/{key}")
        if base is None or tuned is None:
            continue
        rows.append((label, f"{base:.4g}", f"{tuned:.4g}", f"{tuned - base:+.4g}"))
    if len(rows) == 1:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return [
        "  "
        + row[0].ljust(widths[0])
        + "".join(f"  {c.rjust(w)}" for c, w in zip(row[1:], widths[1:], strict=True))
        for row in rows
    ]


def export_files(folder: Path) -> list[str]:
    """Files an export wrote (GGUFs, Modelfile), from its export.json."""
    summary = folder / "export.json"
    if not summary.is_file():
        return []
    written = json.loads(summary.read_text(encoding="utf-8"))
    files = [entry["file"] for entry in (written.get("gguf") or {}).values()]
    if written.get("modelfile"):
        files.append(str(written["modelfile"]))
    return files


def _shown(path: Path) -> str:
    """A path relative to the working directory when under it (shorter to read and copy)."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def format_summary(metrics: dict[str, Any], paths: dict[str, Path]) -> str:
    lines = ["", "Result (held-out split)"]
    if metrics:
        lines[-1] += (
            f": {metrics.get('num_eval_rows', '?')} rows scored,"
            f" {metrics.get('num_generation_samples', '?')} prompts generated"
        )
        lines += summary_table(metrics)
        lines += benchmark_table.summary_lines(metrics)
    else:
        lines.append("  no metrics were written")
    labels = dict(SUMMARY_PATHS)
    width = max(len(label) for label in (*labels.values(), "export"))
    for name, label in SUMMARY_PATHS:
        if name in paths and paths[name].exists():
            lines.append(f"{label + ':':<{width + 2}}{_shown(paths[name])}")
    export = paths.get("exported_model")
    if export is not None and (files := export_files(export)):
        lines.append(f"{'export:':<{width + 2}}{_shown(export)} ({', '.join(files)})")
    return "\n".join(lines) + "\n"


def _filepath(catalog: Any, name: str) -> Path | None:
    try:
        filepath = getattr(catalog.get(name), "_filepath", None)
    except Exception:  # a catalog without that entry (a user's own pipeline)
        return None
    return Path(filepath) if filepath is not None else None


class RunOutput:
    """Filters third-party noise when a run starts; prints the summary when it ends."""

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        install_filters()

    @hook_impl
    def after_pipeline_run(self, run_params: Any, pipeline: Any, catalog: Any) -> None:
        if not any(node.name in SUMMARY_NODES for node in pipeline.nodes):
            return
        paths = {
            name: path
            for name in (*dict(SUMMARY_PATHS), "exported_model")
            if (path := _filepath(catalog, name)) is not None
        }
        metrics_file = paths.get("metrics")
        metrics = {}
        if metrics_file is not None and metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        # stdout, not the log: rich's log handler would re-wrap the table's columns.
        sys.stdout.write(format_summary(metrics, paths))
        sys.stdout.flush()
