"""Benchmark suites for the base and the tuned model, run by lm-evaluation-harness.

lm-eval is the engine: its task files, prompts, metrics and standard errors; nothing here scores
anything. What this module adds is the pipeline's side of it:

    parameters            check_tasks               BenchmarkSuite.score(base)  ─┐
    (evaluation.   ──>    every name resolves, ──>  BenchmarkSuite.score(tuned) ─┴─> metrics()
     benchmarks)          every dataset loads,      (the models evaluate_model       │
                          before a model loads       holds, in memory)               v
                                                         check_regression (max_regression)

- Tasks: local YAML files in lm-eval's own format under `evaluation.benchmarks.task_dir`
  (`dataset_path: json` and `dataset_kwargs.data_files`, paths from the project root), then
  lm-eval's own task names, whose data must be in the local datasets cache. Only the local folder
  is indexed when every name is found there: indexing lm-eval's thousands of task files takes
  about half a minute on two cores.
- Prompts are those of training (`prompt_format`): a chat model is prompted through the chat
  template training rendered with (its source, `template.date` as `date_string` and as what
  `strftime_now` returns, `template.system_prompt` as the system message); a base model without
  a template, plainly. Which one is recorded per task (`benchmarks/<task>/chat_template`).
- Results: `benchmarks/<task>/<metric>/{base,tuned,delta}` and their standard errors, the
  difference's as sqrt(base_stderr² + tuned_stderr²), as for two independent samples (both
  models see the same items and tend to get the same ones right, so the paired error is usually
  smaller: a difference beyond two of these is not noise).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft_pipeline.common.benchmark_tasks import data_files, local_tasks
from sft_pipeline.common.config import BenchmarksConfig, TemplateConfig
from sft_pipeline.common.errors import UserError
from sft_pipeline.evaluation.benchmark_table import PREFIX, SIGNIFICANT_STDERRS, benchmark_rows

log = logging.getLogger(__name__)

# Bootstrap resamples for the standard errors of metrics that are not means (BLEU and the like);
# means (accuracy, exact match) get theirs in closed form. lm-eval seeds them, so they repeat.
BOOTSTRAP_ITERS = 1000


class BenchmarkError(UserError, ValueError):
    """A benchmark task cannot run: an unknown name, or a dataset that cannot be read."""


class BenchmarkRegression(UserError):
    """The tuned model is worse than the base beyond `evaluation.max_regression`."""


# --- tasks ----------------------------------------------------------------------------------


@dataclass
class TaskPlan:
    """The checked tasks and the lm-eval task manager that resolves them."""

    tasks: list[str]
    manager: Any  # lm_eval.tasks.TaskManager
    files: dict[str, Path] = field(default_factory=dict)  # local task -> its YAML file


def check_tasks(cfg: BenchmarksConfig, root: Path | None = None) -> TaskPlan | None:
    """Resolve every task name and load every dataset, before any model is loaded; None when no
    task is asked for. Raises BenchmarkError naming the task and what to do."""
    if not cfg.tasks:
        return None
    from lm_eval.tasks import TaskManager

    root = Path.cwd() if root is None else root
    task_dir = root / cfg.task_dir
    found = local_tasks(task_dir)
    for name in cfg.tasks:
        if name in found:
            _check_data_files(name, found[name], root)
    include = [str(task_dir)] if found else None
    manager = TaskManager(include_path=include, include_defaults=False)
    if any(name not in manager.all_tasks for name in cfg.tasks):
        log.info("indexing lm-evaluation-harness's own tasks (about half a minute)")
        manager = TaskManager(include_path=include, include_defaults=True)
    for name in cfg.tasks:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=1, cutoff=0.75)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise BenchmarkError(
                f"evaluation.benchmarks.tasks: unknown task {name!r}{hint}; a task is the "
                f"`task:` name of a YAML file in {cfg.task_dir} (local: "
                f"{', '.join(sorted(found)) or 'none'}) or one of lm-evaluation-harness's own"
            )
        try:
            manager.load([name])
        except Exception as exc:  # whatever the dataset's loader raises, named by task
            raise BenchmarkError(
                f"evaluation.benchmarks.tasks: the dataset of task {name!r} cannot be loaded "
                f"({type(exc).__name__}: {exc}). "
                + (
                    f"Check `dataset_kwargs.data_files` in {found[name]}"
                    if name in found
                    else "Download it once with network access (the run then reads it from the "
                    "local datasets cache), or write a local task in " + cfg.task_dir
                )
            ) from None
    return TaskPlan(list(cfg.tasks), manager, {n: found[n] for n in cfg.tasks if n in found})


def _check_data_files(name: str, task_file: Path, root: Path) -> None:
    for relpath in data_files(task_file):
        if not (root / relpath).is_file():
            raise BenchmarkError(
                f"evaluation.benchmarks.tasks: task {name!r} ({task_file}) reads data file "
                f"{relpath!r}, which does not exist (paths are from the project root); "
                "create it, or fix `dataset_kwargs.data_files`"
            )


# --- prompts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptFormat:
    """How benchmark items are put to the models: training's chat template, or plain text."""

    chat: bool
    name: str  # what the template is, for the log
    template: str | None = None
    template_args: dict[str, Any] = field(default_factory=dict)
    system_prompt: str | None = None
    day: Any = None  # datetime.date the template's `strftime_now` returns

    @contextlib.contextmanager
    def clock(self):
        """The template's date pinned while lm-eval renders (as training rendered it)."""
        if not self.chat:
            yield
            return
        from sft_pipeline.data.templating import pinned_clock

        with pinned_clock(self.template, self.day):
            yield


def prompt_format(tokenizer, template: TemplateConfig) -> PromptFormat:
    """Training's prompt format for the tokenizer the data was rendered with: the chat template
    (`template.chat_template`), or plain for a base model rendered with the `plain` layout."""
    from sft_pipeline.data.templating import (
        DATE_STRING_FORMAT,
        FALLBACK_TEMPLATE,
        resolve_template,
        tokenizer_template,
    )

    plain = template.chat_template == FALLBACK_TEMPLATE or (
        template.chat_template == "auto" and not tokenizer_template(tokenizer)
    )
    if plain:
        return PromptFormat(False, "plain text (no chat template)", system_prompt=None)
    source, name = resolve_template(tokenizer, template)
    # The template source travels with each call, so a base tokenizer without this template
    # (a chatml run on a base model) renders exactly what the merged tokenizer carries.
    args = {"chat_template": source, "date_string": template.date.strftime(DATE_STRING_FORMAT)}
    thinking = getattr(template, "enable_thinking", None)  # as training passes it; None: default
    if thinking is not None:
        args["enable_thinking"] = thinking
    return PromptFormat(
        True,
        name,
        template=source,
        template_args=args,
        system_prompt=template.system_prompt,
        day=template.date,
    )


# --- running --------------------------------------------------------------------------------


class BenchmarkSuite:
    """Scores each model handed to it on the checked tasks; `metrics()` compares the two."""

    def __init__(self, plan: TaskPlan, fmt: PromptFormat, cfg: BenchmarksConfig):
        self.plan, self.fmt, self.cfg = plan, fmt, cfg
        self.results: dict[str, dict[str, Any]] = {}

    def score(self, side: str, model, tokenizer) -> dict[str, Any]:
        """lm-eval's results for `model` (already in memory) under `side` ("base"/"tuned")."""
        log.info(
            "benchmarks (%s): %s, prompted with %s",
            side,
            ", ".join(self.plan.tasks),
            self.fmt.name,
        )
        start = time.perf_counter()
        self.results[side] = run_lm_eval(model, tokenizer, self.plan, self.fmt, self.cfg)
        log.info("benchmarks (%s) took %.1f s", side, time.perf_counter() - start)
        return self.results[side]

    def metrics(self) -> dict[str, Any]:
        return compare(self.results["base"], self.results["tuned"], self.fmt.chat)


def prepare_suite(
    cfg: BenchmarksConfig, base_model_dir, template: TemplateConfig
) -> BenchmarkSuite | None:
    """Check the tasks (no model loaded yet) and settle the prompt format from the base's
    tokenizer (the one training rendered the data with); None when no task is asked for."""
    plan = check_tasks(cfg)
    if plan is None:
        return None
    from sft_pipeline.model.loading import load_tokenizer_or_processor

    tokenizer, _processor = load_tokenizer_or_processor(base_model_dir)
    return BenchmarkSuite(plan, prompt_format(tokenizer, template), cfg)


def run_lm_eval(model, tokenizer, plan: TaskPlan, fmt: PromptFormat, cfg: BenchmarksConfig):
    """`lm_eval.simple_evaluate` on a model object: its results dict."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    # Handing over a loaded model is the point here: lm-eval's warnings that it was not given a
    # path (so it will not load or place one) say nothing the user can act on.
    quiet = logging.getLogger(HFLM.__module__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=cfg.batch_size,
            chat_template_args=dict(fmt.template_args),
        )
    finally:
        quiet.setLevel(level)
    with fmt.clock():
        return simple_evaluate(
            lm,
            tasks=list(plan.tasks),
            task_manager=plan.manager,
            num_fewshot=cfg.num_fewshot,
            limit=cfg.limit,
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=False,
            apply_chat_template=fmt.chat,
            fewshot_as_multiturn=fmt.chat,
            system_instruction=fmt.system_prompt,
        )


def task_scores(results: dict[str, Any]) -> dict[str, dict[str, tuple[float, float | None]]]:
    """{task: {metric: (value, stderr or None)}} from lm-eval's results (filter `none` dropped
    from the metric's name; other filters kept: `exact_match,strict-match`)."""
    scores: dict[str, dict[str, tuple[float, float | None]]] = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if not filt or "_stderr" in metric or not isinstance(value, int | float):
                continue
            if isinstance(value, bool):
                continue
            stderr = values.get(f"{metric}_stderr,{filt}")
            name = metric if filt == "none" else f"{metric},{filt}"
            ok = isinstance(stderr, int | float) and math.isfinite(stderr)
            scores.setdefault(task, {})[name] = (float(value), float(stderr) if ok else None)
    return scores


def compare(base: dict[str, Any], tuned: dict[str, Any], chat: bool) -> dict[str, Any]:
    """The flat `benchmarks/...` entries of metrics.json."""
    base_scores, tuned_scores = task_scores(base), task_scores(tuned)
    higher = tuned.get("higher_is_better") or {}
    out: dict[str, Any] = {}
    for task in sorted(base_scores):
        out[f"{PREFIX}/{task}/chat_template"] = chat
        samples = (tuned.get("n-samples") or {}).get(task) or {}
        if "effective" in samples:
            out[f"{PREFIX}/{task}/samples"] = samples["effective"]
        for metric, (b, b_se) in sorted(base_scores[task].items()):
            if metric not in tuned_scores.get(task, {}):
                continue
            t, t_se = tuned_scores[task][metric]
            key = f"{PREFIX}/{task}/{metric}"
            out |= {f"{key}/base": b, f"{key}/tuned": t, f"{key}/delta": t - b}
            if b_se is not None and t_se is not None:
                out |= {f"{key}/base_stderr": b_se, f"{key}/tuned_stderr": t_se}
                out[f"{key}/delta_stderr"] = math.sqrt(b_se**2 + t_se**2)
            hib = (higher.get(task) or {}).get(metric.partition(",")[0])
            if hib is not None:
                out[f"{key}/higher_is_better"] = bool(hib)
    return out


# --- the regression gate ---------------------------------------------------------------


def check_regression(metrics: dict[str, Any], max_regression: float | None) -> None:
    """Raise BenchmarkRegression naming every (task, metric) where the tuned model is worse than
    the base by more than `max_regression` and by more than two standard errors."""
    if max_regression is None:
        return
    breaches = []
    for row in benchmark_rows(metrics):
        higher = row.get("higher_is_better")
        if higher is None:
            continue
        worse = row["base"] - row["tuned"] if higher else row["tuned"] - row["base"]
        se = row.get("delta_stderr") or 0.0
        if worse > max_regression and worse > SIGNIFICANT_STDERRS * se:
            breaches.append(
                f"  {row['task']} {row['metric']}: base {row['base']:.4g}, tuned "
                f"{row['tuned']:.4g} (worse by {worse:.4g}; two standard errors {2 * se:.4g})"
            )
    if breaches:
        raise BenchmarkRegression(
            f"the tuned model regressed beyond evaluation.max_regression={max_regression} on "
            "benchmark task(s):\n" + "\n".join(breaches)
        )
