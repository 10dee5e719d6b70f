"""DVC experiments compared by their live training metrics: two `dvc exp run -S` on the shared
tiny project (tests/project_copy.py), each listed by `dvc exp show` with its learning rate, its
tuned eval loss and DVCLive's per-step metrics, and both drawn by `dvc plots diff`."""

from __future__ import annotations

import json

import pytest

from tests import project_copy as pc

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
    pc.run(["dvc", "repro"], root)
    try:
        for name, rate in RATES.items():
            pc.run(
                ["dvc", "exp", "run", "-n", name, "-S", f"{PARAMS}:training.learning_rate={rate}"],
                root,
            )
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
    finally:
        # Leave the shared project at its committed parameters for the next test.
        pc.run(["git", "checkout", "--", PARAMS], root)
