"""Live training metrics for DVC: a DVCLive logger keyed by the trainer's global step.

transformers' own `DVCLiveCallback` builds `dvclive.Live()` with its defaults, which rewrite the
project's `dvc.yaml` (generated from the Kedro pipeline, so that edit would make it stale), save
a DVC experiment at the end of every `kedro run`, and number rows by log call rather than by
training step. This callback writes the same DVCLive files, under `training.live_dir`, with
none of those side effects:

    <live_dir>/metrics.json                     latest value of every metric (`dvc exp show`)
    <live_dir>/plots/metrics/train/loss.tsv     step  loss           (`dvc plots`)
    <live_dir>/plots/metrics/train/learning_rate.tsv, train/tokens_per_second.tsv, ...
    <live_dir>/plots/metrics/eval/loss.tsv      step  loss           (eval rows, when evaluated)

The files are rewritten at every logging step, so during `dvc exp run` the workspace (or the
queued run's temporary workspace) always holds the progress so far.
"""

from __future__ import annotations

import functools
import logging
import numbers
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from sft_pipeline.common.config import TrainingConfig, as_list

log = logging.getLogger(__name__)

DVCLIVE = "dvclive"


def live_callbacks(training: TrainingConfig, *, resuming: bool) -> list[Any]:
    """The DVCLive callback when `training.report_to` names dvclive and it is installed."""
    from transformers.integrations import is_dvclive_available

    if DVCLIVE not in as_list(training.report_to) or not is_dvclive_available():
        return []
    return [LiveMetrics(Path(training.live_dir), resume=resuming)]


def metric_name(key: str, *, evaluation: bool) -> str | None:
    """`loss` -> `train/loss`, `eval_loss` -> `eval/loss`: one DVC plot folder per split.

    None for transformers' running totals in a step's entry (`train_runtime`,
    `train_tokens_per_second`: averaged from the start, padding included); the trainer's own
    `tokens_per_second` is the step's non-padding throughput.
    """
    if evaluation:
        return "eval/" + key.removeprefix("eval_")
    return None if key.startswith("train_") else "train/" + key


class LiveMetrics(TrainerCallback):
    """Logs every scalar the trainer logs to DVCLive at `state.global_step` (process zero)."""

    def __init__(self, directory: Path, *, resume: bool = False) -> None:
        self.directory = directory
        self.resume = resume
        self.live = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.live is None:
            # dvcyaml=False: dvc.yaml is generated from the pipeline; save_dvc_exp=False: a
            # `kedro run` is not an experiment unless the user runs it through `dvc exp run`.
            self.live = _live_class()(
                dir=str(self.directory),
                resume=self.resume and (self.directory / "metrics.json").is_file(),
                save_dvc_exp=False,
                dvcyaml=False,
                report=None,
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The end-of-training entry (train_samples_per_second, ...) holds run totals, which
        # training_summary.json keeps; every other entry is one step's.
        if self.live is None or not logs or "train_samples_per_second" in logs:
            return
        evaluation = any(key.startswith("eval_") for key in logs)
        self.live.step = state.global_step
        for key, value in logs.items():
            name = metric_name(key, evaluation=evaluation)
            if name is None or isinstance(value, bool) or not isinstance(value, numbers.Number):
                continue
            self.live.log_metric(name, float(value))
        self.live.next_step()

    def on_train_end(self, args, state, control, **kwargs):
        if self.live is not None:
            self.live.end()
            self.live = None


@functools.cache
def _live_class() -> type:
    """`dvclive.Live`, able to start in a Git repository that has no commit yet.

    DVCLive 3.49 asks Git for HEAD before it checks for an empty repository, so `git init`,
    `dvc init` and a first run before the first commit fail with `SCMError: Empty git repo`.
    DVCLive catches the DVC errors of its set-up but not Git's (`scmrepo`'s SCMError); after one,
    it gets what DVCLive gives a project outside Git: the same files, no experiment.
    """
    from dvclive import Live
    from scmrepo.exceptions import SCMError

    class RepositoryTolerantLive(Live):
        def _init_dvc(self) -> None:
            try:
                super()._init_dvc()
            except SCMError as error:
                log.warning(
                    "DVCLive could not read the Git repository (%s); live metrics go to %s "
                    "without DVC experiment tracking",
                    error,
                    self.dir,
                )
                self._dvc_repo = None
                self._save_dvc_exp = False
                self._dvc_file = self._init_dvc_file()

    return RepositoryTolerantLive
