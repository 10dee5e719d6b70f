"""Benchmarks through lm-evaluation-harness: task checks before any model loads, the prompt
format training used, base vs tuned with standard errors, the regression gate, the shipped
probe. The end-to-end comparison with lm-eval run directly is in
tests/pipeline/test_pipeline_benchmarks.py."""

from __future__ import annotations

import datetime
import importlib.util
import json
from pathlib import Path

import pytest

from sft_pipeline.common import benchmark_tasks
from sft_pipeline.common.config import (
    BenchmarksConfig,
    ConfigError,
    EvaluationConfig,
    TemplateConfig,
    parse_section,
)
from sft_pipeline.evaluation import benchmark_table, benchmarks
from sft_pipeline.pipelines.sft import nodes
from sft_pipeline.run.output import format_summary

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROBE_TASK = PROJECT_ROOT / "conf/base/benchmarks/sft_probe.yaml"
PROBE_DATA = PROJECT_ROOT / "conf/base/benchmarks/data/probe.jsonl"


def _probe_script():
    spec = importlib.util.spec_from_file_location(
        "make_probe", PROJECT_ROOT / "scripts/make_probe.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_task(folder: Path, name: str, data_file: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data_file}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n",
        encoding="utf-8",
    )
    return path


def _evaluate_without_models(tmp_path: Path, benchmarks_cfg: dict):
    """evaluate_model on model folders that do not exist: an error about a task proves that the
    tasks were checked before any model was loaded."""
    missing = tmp_path / "no-such-model"
    return nodes.evaluate_model(
        missing,
        missing,
        [],
        [],
        [],
        {},
        {"benchmarks": benchmarks_cfg},
        None,
        None,
        {},
    )


# --- the shipped probe ----------------------------------------------------------------------


def test_the_shipped_probe_is_exactly_what_the_script_generates():
    script = _probe_script()
    expected = "".join(
        json.dumps(item, ensure_ascii=False) + "\n"
        for item in script.make_items(script.DEFAULT_ITEMS, seed=0)
    )
    assert PROBE_DATA.read_text(encoding="utf-8") == expected


def test_probe_items_have_four_distinct_choices_with_the_right_answer_among_them():
    items = [json.loads(line) for line in PROBE_DATA.read_text(encoding="utf-8").splitlines()]
    assert len(items) == 300
    assert {i["kind"] for i in items[:2]} == {"arithmetic", "unit_conversion"}
    for item in items:
        assert len(set(item["choices"])) == 4
        question, answer = item["question"], int(item["choices"][item["answer"]])
        if item["kind"] == "arithmetic":
            expression = question.removeprefix("What is ").removesuffix("?")
            for word, symbol in (("plus", "+"), ("minus", "-"), ("times", "*")):
                expression = expression.replace(word, symbol)
            assert eval(expression) == answer  # two integers and one operator
    # The answer's position is spread over the four choices (no position bias to exploit).
    positions = [i["answer"] for i in items]
    assert all(positions.count(p) > 40 for p in range(4))


# --- task files and their DVC deps ----------------------------------------------------------


def test_local_benchmark_files_are_the_named_tasks_files_and_their_data():
    cfg = EvaluationConfig(benchmarks=BenchmarksConfig(tasks=["sft_probe", "hellaswag"]))
    assert benchmark_tasks.local_benchmark_files(cfg, PROJECT_ROOT) == [
        "conf/base/benchmarks/sft_probe.yaml",
        "conf/base/benchmarks/data/probe.jsonl",
    ]
    assert benchmark_tasks.local_benchmark_files(EvaluationConfig(), PROJECT_ROOT) == []


def test_the_default_run_benchmarks_the_probe_on_a_limited_number_of_items():
    import yaml

    params = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_sft.yml").read_text())
    cfg = parse_section(EvaluationConfig, params["evaluation"], "evaluation")
    assert cfg.benchmarks.tasks == ["sft_probe"]
    assert cfg.benchmarks.limit and cfg.benchmarks.limit <= 32
    assert cfg.max_regression is None


def test_benchmark_parameters_are_checked_with_their_key_path():
    with pytest.raises(ConfigError, match=r"evaluation\.benchmarks\.batch_size"):
        parse_section(EvaluationConfig, {"benchmarks": {"batch_size": 0}}, "evaluation")
    with pytest.raises(ConfigError, match=r"evaluation\.benchmarks\.limit"):
        parse_section(EvaluationConfig, {"benchmarks": {"limit": 0}}, "evaluation")
    with pytest.raises(ConfigError, match=r"evaluation\.max_regression"):
        parse_section(EvaluationConfig, {"max_regression": -0.1}, "evaluation")
    with pytest.raises(ConfigError, match=r"did you mean `tasks`"):
        parse_section(EvaluationConfig, {"benchmarks": {"task": ["x"]}}, "evaluation")
    auto = parse_section(EvaluationConfig, {"benchmarks": {"batch_size": "auto"}}, "evaluation")
    assert auto.benchmarks.batch_size == "auto"


# --- errors before any model loads ----------------------------------------------------------


def test_a_missing_data_file_stops_before_any_model_loads_naming_the_task(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_task(tmp_path / "tasks", "my_quiz", "data/quiz.jsonl")
    with pytest.raises(benchmarks.BenchmarkError, match=r"task 'my_quiz'.*'data/quiz\.jsonl'"):
        _evaluate_without_models(tmp_path, {"tasks": ["my_quiz"], "task_dir": "tasks"})


def test_an_unreadable_dataset_stops_before_any_model_loads_naming_the_task(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quiz.jsonl").write_text("this is not json\n", encoding="utf-8")
    _write_task(tmp_path / "tasks", "my_quiz", "quiz.jsonl")
    with pytest.raises(benchmarks.BenchmarkError, match=r"dataset of task 'my_quiz'"):
        _evaluate_without_models(tmp_path, {"tasks": ["my_quiz"], "task_dir": "tasks"})


@pytest.mark.slow  # indexes lm-eval's own tasks (about half a minute on two cores)
def test_a_typo_in_a_task_name_stops_before_any_model_loads_with_the_nearest_name(
    monkeypatch, tmp_path
):
    monkeypatch.chdir(PROJECT_ROOT)
    with pytest.raises(benchmarks.BenchmarkError) as info:
        _evaluate_without_models(tmp_path, {"tasks": ["sft_prob"]})
    assert "unknown task 'sft_prob'" in str(info.value)
    assert "did you mean `sft_probe`" in str(info.value)


# --- prompt format --------------------------------------------------------------------------


def test_a_chat_model_is_prompted_through_trainings_template_with_the_fixed_date(tiny_tokenizer):
    cfg = TemplateConfig(date=datetime.date(2023, 1, 2), system_prompt="Be brief.")
    fmt = benchmarks.prompt_format(tiny_tokenizer, cfg)
    assert fmt.chat
    assert fmt.template == tiny_tokenizer.chat_template
    assert fmt.template_args == {"chat_template": fmt.template, "date_string": "02 Jan 2023"}
    assert fmt.system_prompt == "Be brief."


def test_a_template_that_prints_the_date_sees_template_date_while_lm_eval_renders(tiny_tokenizer):
    template = "{{ strftime_now('%Y-%m-%d') }}|{{ date_string }}|{{ messages[0]['content'] }}"
    cfg = TemplateConfig(chat_template=_template_file(template), date=datetime.date(2023, 1, 2))
    fmt = benchmarks.prompt_format(tiny_tokenizer, cfg)
    with fmt.clock():
        text = tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, **fmt.template_args
        )
    assert text == "2023-01-02|02 Jan 2023|hi"


def _template_file(source: str) -> str:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "dated.jinja"
    path.write_text(source, encoding="utf-8")
    return str(path)


def test_a_base_model_without_a_template_is_prompted_plainly(tiny_tokenizer):
    tokenizer = tiny_tokenizer.__class__.from_pretrained(_saved_without_template(tiny_tokenizer))
    fmt = benchmarks.prompt_format(tokenizer, TemplateConfig())
    assert not fmt.chat and fmt.template_args == {}
    # A chat layout chosen for training (chatml on a base model) is used for benchmarks too.
    chatml = benchmarks.prompt_format(tokenizer, TemplateConfig(chat_template="chatml"))
    assert chatml.chat and "<|im_start|>" in chatml.template_args["chat_template"]


def _saved_without_template(tokenizer) -> str:
    import tempfile

    folder = Path(tempfile.mkdtemp())
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


# --- results, the table and the gate --------------------------------------------------------


def _results(acc: float, acc_se: float, ppl: float, ppl_se: float, n: int = 100) -> dict:
    """The parts of lm-eval's results dict that the comparison reads."""
    return {
        "results": {
            "quiz": {
                "alias": "quiz",
                "acc,none": acc,
                "acc_stderr,none": acc_se,
                "exact_match,strict-match": acc / 2,
                "exact_match_stderr,strict-match": "N/A",
            },
            "lm": {
                "alias": "lm",
                "word_perplexity,none": ppl,
                "word_perplexity_stderr,none": ppl_se,
            },
        },
        "higher_is_better": {
            "quiz": {"acc": True, "exact_match": True},
            "lm": {"word_perplexity": False},
        },
        "n-samples": {"quiz": {"original": 300, "effective": n}, "lm": {"effective": n}},
    }


def test_metrics_hold_base_tuned_difference_and_standard_errors_per_task_and_metric():
    metrics = benchmarks.compare(
        _results(0.5, 0.05, 10.0, 1.0), _results(0.4, 0.03, 9.0, 1.0), True
    )
    key = "benchmarks/quiz/acc"
    assert metrics[f"{key}/base"] == 0.5 and metrics[f"{key}/tuned"] == 0.4
    assert metrics[f"{key}/delta"] == pytest.approx(-0.1)
    assert metrics[f"{key}/base_stderr"] == 0.05 and metrics[f"{key}/tuned_stderr"] == 0.03
    assert metrics[f"{key}/delta_stderr"] == pytest.approx((0.05**2 + 0.03**2) ** 0.5)
    assert metrics["benchmarks/quiz/chat_template"] is True
    assert metrics["benchmarks/quiz/samples"] == 100
    # A filter other than `none` stays in the name; a stderr lm-eval could not give is left out.
    assert metrics["benchmarks/quiz/exact_match,strict-match/tuned"] == 0.2
    assert "benchmarks/quiz/exact_match,strict-match/delta_stderr" not in metrics
    assert metrics["benchmarks/lm/word_perplexity/higher_is_better"] is False


def test_report_and_closing_summary_show_95_percent_intervals_and_mark_significant_changes():
    from sft_pipeline.evaluation.report import benchmark_report_rows, render_report

    metrics = benchmarks.compare(
        _results(0.5, 0.05, 10.0, 1.0), _results(0.2, 0.05, 9.0, 1.0), True
    )
    rows = {(r["task"], r["metric"]): r for r in benchmark_table.benchmark_rows(metrics)}
    acc = rows[("quiz", "acc")]
    assert acc["base_ci"] == pytest.approx((0.5 - 1.96 * 0.05, 0.5 + 1.96 * 0.05))
    assert acc["significant"] and not rows[("lm", "word_perplexity")]["significant"]
    report_rows = {(r["task"], r["metric"]): r for r in benchmark_report_rows(metrics)}
    assert report_rows[("quiz", "acc")]["better"] == "base"
    assert report_rows[("quiz", "acc")]["prompt"] == "chat template"
    page = render_report(metrics, [], {}, {}, {}, [])
    assert 'id="benchmarks"' in page and "[0.402, 0.598]" in page
    summary = format_summary({"base/eval_loss": 1.0, "tuned/eval_loss": 0.9, **metrics}, {})
    assert "quiz acc: base 0.500 ± 0.098, tuned 0.200 ± 0.098, change -0.300 *" in summary


def test_the_gate_fails_naming_the_task_when_tuned_is_worse_beyond_the_amount_and_two_stderrs():
    worse = benchmarks.compare(
        _results(0.5, 0.02, 10.0, 0.1), _results(0.4, 0.02, 12.0, 0.1), False
    )
    with pytest.raises(benchmarks.BenchmarkRegression) as info:
        benchmarks.check_regression(worse, 0.05)
    message = str(info.value)
    assert "quiz acc: base 0.5, tuned 0.4" in message
    # Lower is better for perplexity: 10 -> 12 is a regression too.
    assert "lm word_perplexity: base 10, tuned 12" in message


def test_the_gate_passes_a_drop_within_two_standard_errors_or_within_the_amount():
    noisy = benchmarks.compare(
        _results(0.5, 0.08, 10.0, 1.0), _results(0.4, 0.08, 10.5, 1.0), False
    )
    benchmarks.check_regression(noisy, 0.05)  # 0.1 < 2 * sqrt(2) * 0.08: noise
    small = benchmarks.compare(
        _results(0.5, 0.001, 10.0, 0.01), _results(0.49, 0.001, 10.0, 0.01), False
    )
    benchmarks.check_regression(small, 0.05)  # beyond 2 SE but within the amount
    benchmarks.check_regression(noisy, None)  # off by default
    better = benchmarks.compare(
        _results(0.4, 0.001, 12.0, 0.01), _results(0.5, 0.001, 10.0, 0.01), False
    )
    benchmarks.check_regression(better, 0.0)
