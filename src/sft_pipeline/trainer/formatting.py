"""A user's `formatting_func`, called the way it was written: per row or per batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Formatter:
    """Calls `formatting_func` per row (returning a string, TRL today) or per batch (returning a
    list of strings, older TRL), whichever the function does on the first row."""

    def __init__(self, func: Callable, first: dict[str, Any]):
        self.func = func
        try:
            self.batched = not isinstance(func(first), str)
        except Exception as row_error:
            # A batch function indexing a row's strings as lists: it must work on a batch of one,
            # else the function itself is broken and its own error is the one to see.
            try:
                func({key: [value] for key, value in first.items()})
            except Exception:
                raise row_error from None
            self.batched = True

    def __call__(self, rows: list[dict[str, Any]]) -> list[str]:
        if not self.batched:
            return [self._check(self.func(row)) for row in rows]
        texts = self.func({key: [row[key] for row in rows] for key in rows[0]})
        if not isinstance(texts, list) or len(texts) != len(rows):
            raise ValueError(
                "formatting_func must return a string for a row, or a list of one string per "
                f"row for a batch; for a batch of {len(rows)} rows it returned "
                f"{type(texts).__name__} {texts!r:.80}"
            )
        return [self._check(text) for text in texts]

    @staticmethod
    def _check(text: Any) -> str:
        if not isinstance(text, str):
            raise TypeError(f"formatting_func returned {type(text).__name__}, expected str")
        return text
