"""DVC experiments compared by their live training metrics: a queued learning-rate grid on the
shared tiny project (tests/project_copy.py), run two at a time, each re-running exactly training
and what follows it, listed by `dvc exp show` with its learning rate, its tuned eval loss and
DVCLive's per-step metrics, and both drawn by `dvc plots diff`."""

from __future__ import annotations

import json
import time

import pytest

from tests import project_copy as pc
from tests.repro.test_dvc import DOWNSTREAM_OF_TRAINING

PARAMS = "conf/base/parameters_sft.yml"
LIVE_METRICS = "data/08_reporting/dvclive/metrics.json"
LIVE_LOSS = "data/08_reporting/dvclive/plots/metrics/train/loss.tsv"
RATES = (1e-3, 4e-3)


def _experiments(shown: list[dict]) -> dict[str, dict]:
    return {
        rev["name"]: rev["data"]
        for commit in shown
        for experiment in commit.get("experiments") or []
        for rev in experiment.get("revs") or []
        if rev.get("name")
    }


@pytest.mark.slow
@pytest.mark.long
def test_a_queued_learning_rate_grid_runs_side_by_side_with_live_step_metrics_and_loss(
    tmp_path_factory,
) -> None:
    """`dvc exp run --queue` with a grid (-S with two values), `dvc queue start -j 2`, as the docs
    show: both finish, each re-ran only training and what follows it, with its own parameters,
    metrics and DVCLive per-step series, and `dvc plots diff` draws both."""
    root, _, _ = pc.reproduced_project(tmp_path_factory)
    with pc.restored(root):
        values = ",".join(str(rate) for rate in RATES)
        pc.run(
            ["dvc", "exp", "run", "--queue", "-S", f"{PARAMS}:training.learning_rate={values}"],
            root,
        )
        pc.run(["dvc", "queue", "start", "-j", "2"], root)
        deadline = time.monotonic() + 900
        while True:
            status = pc.run(["dvc", "queue", "status"], root)
            if not any(word in status for word in ("Queued", "Running")):
                break
            assert time.monotonic() < deadline, status
            time.sleep(3)
        assert "Failed" not in status, status
        shown = _experiments(json.loads(pc.run(["dvc", "exp", "show", "--json"], root)))
        names = {}
        tuned_losses = set()
        for name, data in shown.items():
            rate = data["params"][PARAMS]["data"]["training"]["learning_rate"]
            names[rate] = name
            metrics = data["metrics"]
            tuned_losses.add(metrics["data/08_reporting/metrics.json"]["data"]["tuned/eval_loss"])
            live = metrics[LIVE_METRICS]["data"]
            assert live["step"] == pc.TINY_PARAMS["training"]["max_steps"]
            assert {"loss", "learning_rate", "tokens_per_second"} <= set(live["train"])
            # The learning rate re-ran training and what follows it, nothing before.
            assert pc.ran_stages(pc.run(["dvc", "queue", "logs", name], root)) == (
                DOWNSTREAM_OF_TRAINING
            )
        assert sorted(names) == pytest.approx(sorted(RATES)), names
        assert len(tuned_losses) == 2, tuned_losses  # each its own trained model

        # An applied experiment's learning rate reached the trainer (with an override file that
        # sets `training`, only if Kedro merges environments key by key: settings.py).
        pc.run(["dvc", "exp", "apply", names[max(names)]], root)
        effective = pc.read_json(root, "data/06_models/adapter/training_params.json")
        assert effective["training"]["learning_rate"] == pytest.approx(max(RATES))
        html = root / "plots_html"
        pc.run(["dvc", "plots", "show", "-o", str(html)], root)
        assert "training_history.json" in (html / "index.html").read_text()
        plots = json.loads(pc.run(["dvc", "plots", "diff", *names.values(), "--json"], root))
        loss = plots["data"][LIVE_LOSS]
        assert sorted(r for entry in loss for r in entry["revisions"]) == sorted(names.values())
        pc.run(["dvc", "exp", "remove", "--all-commits", "-A"], root)
