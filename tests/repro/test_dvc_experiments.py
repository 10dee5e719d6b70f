"""DVC experiments compared by their live training metrics: two `dvc exp run -S` on the shared
tiny project (tests/project_copy.py), each re-running exactly training and what follows it, listed
by `dvc exp show` with its learning rate, its tuned eval loss and DVCLive's per-step metrics, and
both drawn by `dvc plots diff`."""

from __future__ import annotations

import json

import pytest

from tests import project_copy as pc
from tests.repro.test_dvc import DOWNSTREAM_OF_TRAINING

PARAMS = "conf/base/parameters_sft.yml"
LIVE_METRICS = "data/08_reporting/dvclive/metrics.json"
LIVE_LOSS = "data/08_reporting/dvclive/plots/metrics/train/loss.tsv"
RATES = {"live-lr-1e-3": 1e-3, "live-lr-4e-3": 4e-3}


def _experiments(shown: list[dict]) -> dict[str, dict]:
    return {
        rev["name"]: rev["data"]
        for commit in shown
        for experiment in commit.get("experiments") or []
        for rev in experiment.get("revs") or []
        if rev.get("name")
    }


@pytest.mark.slow
def test_learning_rate_experiments_show_live_step_metrics_and_per_step_loss(
    tmp_path_factory,
) -> None:
    root, _, _ = pc.reproduced_project(tmp_path_factory)
    with pc.restored(root):
        for name, rate in RATES.items():
            out = pc.run(
                ["dvc", "exp", "run", "-n", name, "-S", f"{PARAMS}:training.learning_rate={rate}"],
                root,
            )
            # The learning rate re-runs training and what follows it, nothing before.
            assert pc.ran_stages(out) == DOWNSTREAM_OF_TRAINING, out
            # The new value reached the trainer (with an override file that sets `training`,
            # only if Kedro merges environments key by key: settings.py, merge_strategy soft).
            effective = pc.read_json(root, "data/06_models/adapter/training_params.json")
            assert effective["training"]["learning_rate"] == pytest.approx(rate)
        assert "data/08_reporting/metrics.json" in pc.run(
            ["dvc", "metrics", "show", "--json"], root
        )
        html = root / "plots_html"
        pc.run(["dvc", "plots", "show", "-o", str(html)], root)
        assert "training_history.json" in (html / "index.html").read_text()
        shown = _experiments(json.loads(pc.run(["dvc", "exp", "show", "--json"], root)))
        tuned_losses = set()
        for name, rate in RATES.items():
            data = shown[name]
            training = data["params"][PARAMS]["data"]["training"]
            assert training["learning_rate"] == pytest.approx(rate)
            metrics = data["metrics"]
            tuned_losses.add(metrics["data/08_reporting/metrics.json"]["data"]["tuned/eval_loss"])
            live = metrics[LIVE_METRICS]["data"]
            assert live["step"] == pc.TINY_PARAMS["training"]["max_steps"]
            assert {"loss", "learning_rate", "tokens_per_second"} <= set(live["train"])
        assert len(tuned_losses) == 2, tuned_losses

        plots = json.loads(pc.run(["dvc", "plots", "diff", *RATES, "--json"], root))["data"]
        loss = plots[LIVE_LOSS]
        assert sorted(r for entry in loss for r in entry["revisions"]) == sorted(RATES)


@pytest.mark.slow
def test_a_queued_grid_of_two_runs_side_by_side_and_each_keeps_its_own_results(
    tmp_path_factory,
) -> None:
    import time

    root, _, _ = pc.reproduced_project(tmp_path_factory)
    grid = (2e-3, 6e-3)
    with pc.restored(root):
        values = ",".join(str(rate) for rate in grid)
        pc.run(
            ["dvc", "exp", "run", "--queue", "-S", f"{PARAMS}:training.learning_rate={values}"],
            root,
        )
        pc.run(["dvc", "queue", "start", "-j", "2"], root)
        deadline = time.monotonic() + 600
        while True:
            status = pc.run(["dvc", "queue", "status"], root)
            if not any(word in status for word in ("Queued", "Running")):
                break
            assert time.monotonic() < deadline, status
            time.sleep(3)
        assert "Failed" not in status, status
        shown = json.loads(pc.run(["dvc", "exp", "show", "--json"], root))
        found = {}
        for data in _experiments(shown).values():
            rate = data["params"][PARAMS]["data"]["training"]["learning_rate"]
            metrics = data["metrics"]["data/08_reporting/metrics.json"]["data"]
            found[rate] = metrics["tuned/eval_loss"]
        assert sorted(found) == pytest.approx(sorted(grid)), found
        assert len(set(found.values())) == 2, found  # each its own trained model
        pc.run(["dvc", "queue", "remove", "--all"], root)
        pc.run(["dvc", "exp", "remove", "--all-commits", "-A"], root)
