"""What a run leaves to look at: each stage's artifact, a quiet log ending with its result, the
HTML report (rendered in a real headless browser), kedro-viz previews of every artifact kind,
DVCLive's step metrics.

The slow tests share one tiny project run once through `kedro run` (tests/project_copy.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from sft_pipeline.evaluation import report
from sft_pipeline.finetune import tracking
from sft_pipeline.run import output as run_output
from tests import project_copy as pc

# Messages a run printed before they were fixed or filtered; none may come back.
NOISE = (
    "KedroDeprecationWarning",
    "'--pipeline' is deprecated",
    "is_gradient_checkpointing",
    "Union type hint",
    "pin_memory",
    "FutureWarning",
    "kernels-community",
    "`project.license` as a TOML table is deprecated",
)
REPORT = "data/08_reporting/report.html"
RECORDS = 24


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, str]:
    root = pc.make_project(tmp_path_factory.mktemp("outputs") / "project", records=RECORDS)
    pc.set_params(root, {"training": {"report_to": "dvclive"}})
    output = pc.run(["kedro", "run", "--pipelines=sft", "--env", pc.TINY_ENV], root)
    return root, output


# ---------------------------------------------------------------------------------------------
# Fast: the pieces on their own

METRICS = {
    "base/eval_loss": 2.0,
    "tuned/eval_loss": 0.5,
    "base/exact_match": 0.0,
    "tuned/exact_match": 0.75,
    "base/rouge_l": 0.4,
    "tuned/rouge_l": 0.9,
    "base/stopped_by_eos": 0.5,
    "tuned/stopped_by_eos": 1.0,
    "num_eval_rows": 4,
    "num_generation_samples": 4,
}


def test_summary_table_lists_base_tuned_and_change_per_metric(tmp_path: Path) -> None:
    (tmp_path / "report.html").write_text("x")
    export = tmp_path / "export"
    export.mkdir()
    (export / "export.json").write_text(
        json.dumps({"gguf": {"q8_0": {"file": "model-q8_0.gguf"}}, "modelfile": "Modelfile"})
    )
    text = run_output.format_summary(
        METRICS, {"run_report": tmp_path / "report.html", "exported_model": export}
    )
    lines = text.splitlines()
    assert lines[2].split() == ["metric", "base", "tuned", "change"]
    assert lines[3].split() == ["eval", "loss", "2", "0.5", "-1.5"]
    assert any(line.split()[:2] == ["ROUGE-L", "0.4"] for line in lines)
    assert any(line.startswith("report:") and "report.html" in line for line in lines)
    assert any("model-q8_0.gguf, Modelfile" in line for line in lines)
    # A path that does not exist (no merged model in this run) is not listed.
    assert not any(line.startswith("merged model:") for line in lines)


def test_report_marks_the_better_side_and_escapes_generations() -> None:
    page = report.render_report(
        METRICS,
        [
            {"step": 1, "loss": 2.0, "learning_rate": 1e-4},
            {"step": 2, "loss": 1.0, "learning_rate": 0},
        ],
        {"method": "lora", "global_step": 2},
        {"splits": {"train": {"rows_kept": 3, "rejected_rows": [{"reason": "no_supervised"}]}}},
        {"ingested": 5, "rejected": 1, "reasons": {"duplicate": 1}},
        [{"prompt": "<b>hi</b>", "reference": "x", "base_output": "y", "tuned_output": "x"}],
    )
    rows = {r["key"]: r for r in report.metric_rows(METRICS)}
    assert rows["eval_loss"]["better"] == "tuned" and rows["exact_match"]["better"] == "tuned"
    assert "&lt;b&gt;hi&lt;/b&gt;" in page and "<b>hi</b>" not in page
    assert page.count("data:image/png;base64,") == 3
    assert "duplicate" in page and "no_supervised" in page
    # Self-contained: nothing is fetched from anywhere.
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_live_metric_names_keep_splits_apart_and_drop_running_totals() -> None:
    assert tracking.metric_name("loss", evaluation=False) == "train/loss"
    assert tracking.metric_name("tokens_per_second", evaluation=False) == "train/tokens_per_second"
    assert tracking.metric_name("train_tokens_per_second", evaluation=False) is None
    assert tracking.metric_name("eval_loss", evaluation=True) == "eval/loss"


def test_dvclive_is_our_callback_not_transformers_report_to(tmp_path: Path) -> None:
    from sft_pipeline.common.config import TrainingConfig
    from sft_pipeline.finetune.job import report_integrations

    # transformers' own DVCLive callback would rewrite dvc.yaml: it must never be asked for.
    assert report_integrations(["dvclive"]) == ["none"]
    training = TrainingConfig(report_to=["dvclive"], live_dir=str(tmp_path / "live"))
    (callback,) = tracking.live_callbacks(training, resuming=False)
    assert isinstance(callback, tracking.LiveMetrics)
    assert callback.directory == tmp_path / "live"
    assert tracking.live_callbacks(TrainingConfig(report_to="none"), resuming=False) == []


# ---------------------------------------------------------------------------------------------
# Slow: one real run


@pytest.mark.slow
def test_run_is_quiet_and_ends_with_metrics_and_paths(run) -> None:
    _, output = run
    for noise in NOISE:
        assert noise not in output, f"{noise!r} in the run's output:\n{output[-4000:]}"
    tail = output[output.rindex("Result (held-out split)") :].splitlines()
    assert tail[1].split() == ["metric", "base", "tuned", "change"]
    labels = [" ".join(line.split()[:-3]) for line in tail[2:6]]
    assert labels == ["eval loss", "exact match", "ROUGE-L", "stopped by EOS"]
    # stdout (the summary) comes before stderr in `output`: read the labelled lines only.
    labelled = (line.split(":", 1) for line in tail[6:] if ":" in line)
    paths = {label: path.strip() for label, path in labelled if label in ("report", "merged model")}
    assert paths["report"].endswith(REPORT)
    assert paths["merged model"].endswith("data/06_models/merged")
    # The progress of generation, per model.
    assert "generating base" in output and "generating tuned" in output


@pytest.mark.slow
def test_the_run_leaves_each_stage_s_artifact(run) -> None:
    from transformers import AutoModelForCausalLM

    root, _ = run
    data = root / "data"
    report = json.loads((data / "08_reporting/validation_report.json").read_text())
    assert report["ingested"] == RECORDS == report["valid"] + report["rejected"]
    metrics = json.loads((data / "08_reporting/metrics.json").read_text())
    for side in ("base", "tuned"):
        assert metrics[f"{side}/eval_loss"] > 0
    history = json.loads((data / "08_reporting/training_history.json").read_text())
    assert any("loss" in row for row in history)
    generations = (data / "07_model_output/eval_generations.jsonl").read_text().splitlines()
    assert len(generations) == pc.TINY_PARAMS["evaluation"]["max_samples"]
    merged = AutoModelForCausalLM.from_pretrained(data / "06_models/merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert (data / "06_models/merged/README.md").exists()
    assert sorted(p.name for p in (data / "08_reporting/plots").glob("*.png"))


@pytest.mark.slow
def test_dvclive_logs_every_step_with_loss_learning_rate_and_throughput(run) -> None:
    root, _ = run
    live = root / "data/08_reporting/dvclive"
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["step"] == pc.TINY_PARAMS["training"]["max_steps"]
    for name in ("loss", "learning_rate", "tokens_per_second"):
        rows = (live / f"plots/metrics/train/{name}.tsv").read_text().splitlines()
        assert rows[0] == f"step\t{name}"
        assert [int(r.split("\t")[0]) for r in rows[1:]] == [1, 2]
    # DVCLive writes no dvc.yaml and no params file of its own.
    assert not (live / "dvc.yaml").exists() and not (live / "params.yaml").exists()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_report_renders_in_headless_chromium_without_console_errors(run, tmp_path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    root, _ = run
    page = root / REPORT
    shot = tmp_path / "report.png"
    # --dump-dom prints the DOM after the page has run; the screenshot proves it painted.
    args = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1280,2000",
    ]
    shown = subprocess.run(
        [*args, f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    console = [line for line in shown.stderr.splitlines() if ":CONSOLE(" in line]
    assert not console, console
    assert shot.stat().st_size > 20_000
    dom = subprocess.run(
        [*args, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    assert '<table id="metrics">' in dom and 'data-metric="eval_loss"' in dom
    assert dom.count('<img alt="') == 3


@pytest.mark.slow
def test_viz_build_with_previews_has_a_preview_on_each_dataset_kind(run) -> None:
    root, _ = run
    pc.run(["kedro", "viz", "build", "--include-previews"], root, timeout=300)
    site = json.loads((root / "build/api/pipelines/sft").read_text())
    ids = {n["name"]: n["id"] for n in site["nodes"] if n["type"] == "data"}

    def preview(name: str) -> tuple[str, object]:
        node = json.loads((root / "build/api/nodes" / ids[name]).read_text())
        return node.get("preview_type"), node.get("preview")

    for name in ("records", "valid_records", "train_texts", "eval_generations", "train_tokens"):
        kind, table = preview(name)
        assert kind == "TablePreview", name
        assert table["columns"] and 0 < len(table["data"]) <= 5, name
    for name in ("metrics", "token_stats", "validation_report", "base_model"):
        kind, text = preview(name)
        assert kind == "JSONPreview", name
        assert json.loads(text), name
    kind, image = preview("evaluation_plots")
    assert kind == "ImagePreview" and image.startswith("iVBORw0KGgo")  # base64 of a PNG header
    kind, html = preview("run_report")
    assert kind == "HTMLPreview" and '<table id="metrics">' in html


@pytest.mark.parametrize("commits", [False, True], ids=["git-without-commits", "git-with-a-commit"])
def test_dvclive_logs_in_a_dvc_project_whose_git_repository_has_no_commit(
    tmp_path: Path, monkeypatch, commits: bool
) -> None:
    # `git init && dvc init` and a first run before the first commit: DVCLive asks Git for HEAD,
    # which an empty repository does not have. The run must log all the same.
    from types import SimpleNamespace

    for command in (["git", "init", "-q"], [str(pc.VENV_BIN / "dvc"), "init", "-q"]):
        subprocess.run(command, cwd=tmp_path, check=True)
    if commits:
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"],
            cwd=tmp_path,
            check=True,
        )
    monkeypatch.chdir(tmp_path)
    callback = tracking.LiveMetrics(tmp_path / "live")
    state = SimpleNamespace(is_world_process_zero=True, global_step=1)
    callback.on_train_begin(None, state, None)
    callback.on_log(None, state, None, logs={"loss": 1.5, "learning_rate": 1e-3})
    callback.on_train_end(None, state, None)
    summary = json.loads((tmp_path / "live/metrics.json").read_text())
    assert summary["train"]["loss"] == 1.5 and summary["step"] == 1
    assert not (tmp_path / "live/dvc.yaml").exists()


def test_our_messages_quoting_template_text_print_as_written_under_kedros_rich_logging():
    import logging

    import kedro.framework.project  # noqa: F401 (configures Kedro's rich console logging)

    from sft_pipeline.run.output import install_filters

    install_filters()  # what a run's hooks do once Kedro configured its logging
    handler = next(h for h in logging.getLogger().handlers if getattr(h, "markup", False))
    quoted = "[INST] What is 2 + 2? [/INST]"
    record = logging.LogRecord(
        "sft_pipeline.export.ollama", logging.WARNING, __file__, 1, "writes %r", (quoted,), None
    )
    handler.handle(record)  # a markup reading of "[/INST]" stops with a MarkupError
    assert handler.render_message(record, record.getMessage()).plain == f"writes {quoted!r}"
