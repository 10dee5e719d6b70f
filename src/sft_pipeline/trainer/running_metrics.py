"""Token counts and loss sums between two logs: accuracy, token totals and tokens/s per log."""

from __future__ import annotations

import time

import torch


class RunningMetrics:
    """Token counts since the last log (kept as tensors: no device sync per step)."""

    def __init__(self) -> None:
        self.total_tokens = 0
        self.total_supervised = 0
        self.started = None
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = self.correct = self.supervised = self.tokens = 0

    def continue_from(self, log_history: list[dict[str, float]]) -> None:
        logged = [entry for entry in log_history if "num_tokens" in entry]
        if logged:
            self.total_tokens = int(logged[-1]["num_tokens"])
            self.total_supervised = int(logged[-1]["supervised_tokens"])

    def add(self, loss_sum, correct, supervised, tokens) -> None:
        if self.started is None:
            self.started = time.perf_counter()
        self.loss_sum += loss_sum
        self.correct += correct
        self.supervised += supervised
        self.tokens += tokens

    def reduce(self, accelerator) -> None:
        counts = torch.tensor(
            [float(v) for v in (self.loss_sum, self.correct, self.supervised, self.tokens)],
            dtype=torch.float64,
            device=accelerator.device,
        )
        total = accelerator.reduce(counts, reduction="sum").tolist()
        self.loss_sum, self.correct = total[0], int(total[1])
        self.supervised, self.tokens = int(total[2]), int(total[3])

    def flush(self, prefix: str) -> dict[str, float]:
        supervised = int(self.supervised)
        if supervised == 0:
            return {}
        tokens = int(self.tokens)
        self.total_tokens += tokens
        self.total_supervised += supervised
        out = {
            "mean_token_accuracy": float(self.correct) / supervised,
            "num_tokens": float(self.total_tokens),
            "supervised_tokens": float(self.total_supervised),
        }
        now = time.perf_counter()
        if prefix:
            # Token-weighted mean over the whole eval set (Trainer's is a mean of batch means).
            out["loss"] = float(self.loss_sum) / supervised
            self.started = None
        else:
            elapsed = max(now - self.started, 1e-9)
            out["tokens_per_second"] = tokens / elapsed
            out["supervised_tokens_per_second"] = supervised / elapsed
            self.started = now
        self._reset()
        return {prefix + key: value for key, value in out.items()}
