"""Benchmarks through `kedro run` equal lm-evaluation-harness run directly on the same models and
task files: a local multiple-choice task (the shipped probe) and a local generation task, with
the chat template (a chat model) and without (a base model without a template). The same
project then shows a benchmark stopping a run with exit code 1, naming the task: a regression
beyond `evaluation.max_regression` (a missing data file stops it before any model loads:
tests/evaluation/test_benchmarks.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import project_copy as pc
from tests.conftest import save_tiny_model

pytestmark = pytest.mark.slow

LIMIT = 6
BATCH_SIZE = 4
GENERATION_TASK = """\
task: tiny_echo
dataset_path: json
dataset_kwargs:
  data_files:
    test: conf/base/benchmarks/data/tiny_echo.jsonl
test_split: test
output_type: generate_until
doc_to_text: "Repeat: {{word}}\\nAnswer:"
doc_to_target: "{{word}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
PROBE_STYLE_TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
WORDS = ["fox", "dog", "Paris", "Alice", "autumn", "wind", "quiet", "leaves"]


def _project(root: Path, chat: bool) -> Path:
    project = pc.make_project(root, records=16, with_model=False)
    model = save_tiny_model(project / pc.TINY_MODEL)
    if not chat:  # a base model: no chat template anywhere in its tokenizer files
        (model / "chat_template.jinja").unlink(missing_ok=True)
        config = json.loads((model / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (model / "tokenizer_config.json").write_text(json.dumps(config))
    tasks = project / "conf/base/benchmarks"
    (tasks / "tiny_echo.yaml").write_text(GENERATION_TASK, encoding="utf-8")
    (tasks / "data/tiny_echo.jsonl").write_text(
        "".join(json.dumps({"word": w}) + "\n" for w in WORDS), encoding="utf-8"
    )
    pc.set_params(
        project,
        {
            "evaluation": {
                "benchmarks": {
                    "tasks": ["sft_probe", "tiny_echo"],
                    "limit": LIMIT,
                    "batch_size": BATCH_SIZE,
                }
            }
        },
    )
    return project


def _kedro(project: Path, *args: str) -> subprocess.CompletedProcess:
    return pc.kedro(project, *args, "--env", pc.TINY_ENV)


_DIRECT = """
import json, os, sys
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from sft_pipeline.evaluation.benchmarks import BOOTSTRAP_ITERS
paths, chat = sys.argv[1].split(os.pathsep), sys.argv[2] == "1"
limit, batch, tasks = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5].split(",")
for path in paths:
    results = simple_evaluate(
        "hf",
        model_args={"pretrained": path, "dtype": "float32"},
        device="cpu",
        batch_size=batch,
        tasks=tasks,
        task_manager=TaskManager(include_path="conf/base/benchmarks", include_defaults=False),
        limit=limit or None,
        bootstrap_iters=BOOTSTRAP_ITERS,
        log_samples=True,
        apply_chat_template=chat,
        fewshot_as_multiturn=chat,
    )
    # Per task, the choice each item's log-likelihoods rank first (multiple choice only).
    picks = {
        task: [max(range(len(s["filtered_resps"])), key=lambda i: s["filtered_resps"][i][0])
               for s in sorted(samples, key=lambda s: s["doc_id"])]
        for task, samples in results["samples"].items()
        if results["configs"][task]["output_type"] == "multiple_choice"
    }
    print("RESULTS=" + json.dumps({"results": results["results"], "picks": picks}))
"""


def _lm_eval_directly(
    project: Path, models: list[Path], chat: bool, tasks=("sft_probe", "tiny_echo"), limit=LIMIT
) -> list[dict]:
    """lm-eval's own `hf` model loading each folder, in a process of its own (as a user runs
    it), one after the other: per model, {"results": lm-eval's results, "picks": {task: the
    choice ranked first, per item}}."""
    paths = os.pathsep.join(str(model) for model in models)
    args = [paths, "1" if chat else "0", str(limit or 0), str(BATCH_SIZE), ",".join(tasks)]
    output = pc.run([sys.executable, "-c", _DIRECT, *args], project)
    lines = [x for x in output.splitlines() if x.startswith("RESULTS=")]
    assert len(lines) == len(models), output[-4000:]
    return [json.loads(line.removeprefix("RESULTS=")) for line in lines]


def _a_task_the_base_answers_perfectly(project: Path) -> None:
    """`base_pick`: two-way items whose answer is the choice the base model ranks first, so the
    base scores 1.0 and any other model about 0.5."""
    tasks = project / "conf/base/benchmarks"
    items = [
        {"question": f"Pick {a}", "choices": [a, b], "answer": 0}
        for a in WORDS
        for b in WORDS
        if a < b
    ]
    data = tasks / "data/base_pick.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    text = PROBE_STYLE_TASK.format(
        name="base_pick", data="conf/base/benchmarks/data/base_pick.jsonl"
    )
    (tasks / "base_pick.yaml").write_text(text, encoding="utf-8")
    [picks] = _lm_eval_directly(project, [project / pc.TINY_MODEL], True, ("base_pick",), None)
    for item, pick in zip(items, picks["picks"]["base_pick"], strict=True):
        item["answer"] = pick
    data.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")


@pytest.mark.parametrize("chat", [True, False], ids=["chat-template", "plain"])
@pytest.mark.long
def test_benchmarks_in_kedro_run_equal_lm_eval_run_directly(tmp_path, chat):
    project = _project(tmp_path / "project", chat)
    start = time.perf_counter()
    run = _kedro(project, "run", "--pipeline=sft")
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    print(f"kedro run: {time.perf_counter() - start:.1f} s")
    for line in (run.stdout + run.stderr).splitlines():
        if "benchmarks (" in line and "took" in line:
            print(line.strip())
    metrics = json.loads((project / "data/08_reporting/metrics.json").read_text())
    assert metrics["benchmarks/sft_probe/chat_template"] is chat
    assert metrics["benchmarks/tiny_echo/chat_template"] is chat
    assert metrics["benchmarks/sft_probe/samples"] == LIMIT

    sides = {"base": pc.TINY_MODEL, "tuned": "data/06_models/merged"}
    directly = _lm_eval_directly(project, [project / model for model in sides.values()], chat)
    for side, run_directly in zip(sides, directly, strict=True):
        direct = run_directly["results"]
        for task, metric in (("sft_probe", "acc"), ("tiny_echo", "exact_match")):
            key = f"benchmarks/{task}/{metric}"
            assert metrics[f"{key}/{side}"] == direct[task][f"{metric},none"], (task, side)
            assert metrics[f"{key}/{side}_stderr"] == direct[task][f"{metric}_stderr,none"]

    # The closing summary shows the probe's base and tuned scores with intervals.
    assert "sft_probe acc: base " in run.stdout
    page = (project / "data/08_reporting/report.html").read_text(encoding="utf-8")
    assert 'data-task="sft_probe"' in page

    if chat:
        # A regression beyond evaluation.max_regression and two standard errors: the tuned
        # model replaced by another random one, on a task the base answers perfectly.
        _a_task_the_base_answers_perfectly(project)
        other = save_tiny_model(tmp_path / "other", seed=1)
        merged = project / "data/06_models/merged"
        (merged / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
        pc.set_params(
            project,
            {"evaluation": {"benchmarks": {"tasks": ["base_pick"], "limit": None}}},
        )
        pc.set_params(project, {"evaluation": {"max_regression": 0.1}})
        failed = _kedro(project, "run", "--pipeline=sft", "--nodes=evaluate_model")
        text = failed.stdout + failed.stderr
        assert failed.returncode == 1, text[-3000:]
        assert "evaluation.max_regression=0.1" in text and "base_pick acc: base 1, tuned" in text
