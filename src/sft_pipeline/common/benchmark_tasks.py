"""The local benchmark tasks: lm-evaluation-harness task files in the project's `conf/`.

Read here without lm-eval (a YAML read), for two callers: `evaluate_model` checks that each
named task's data files exist before any model loads, and `kedro dvc generate` makes a local
task's YAML and data files DVC deps of that stage only (`local_benchmark_files`).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from sft_pipeline.common.config import EvaluationConfig


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads lm-eval task files without running them: `!function` tags become their text."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, tag, node: None)


def local_tasks(task_dir: Path) -> dict[str, Path]:
    """{task name: its YAML file} of the task files directly in `task_dir`."""
    tasks = {}
    for path in sorted(task_dir.glob("*.y*ml")) if task_dir.is_dir() else []:
        content = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)
        if isinstance(content, dict) and isinstance(content.get("task"), str):
            tasks[content["task"]] = path
    return tasks


def data_files(task_file: Path) -> list[str]:
    """The `dataset_kwargs.data_files` a local task reads (as written: from the project root)."""
    content = yaml.load(task_file.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)
    files = ((content or {}).get("dataset_kwargs") or {}).get("data_files") or []
    if isinstance(files, dict):
        files = [
            f for value in files.values() for f in ([value] if isinstance(value, str) else value)
        ]
    return [files] if isinstance(files, str) else [str(f) for f in files]


def local_benchmark_files(cfg: EvaluationConfig, root: Path) -> list[str]:
    """The task files and data files of the local tasks `evaluation.benchmarks.tasks` names:
    DVC deps of `evaluate_model` (a changed item re-runs the evaluation, nothing else)."""
    task_dir = Path(cfg.benchmarks.task_dir)
    found = local_tasks(root / task_dir)
    files = []
    for name in cfg.benchmarks.tasks:
        if name in found:
            files.append((task_dir / found[name].name).as_posix())
            files.extend(data_files(found[name]))
    return list(dict.fromkeys(files))
