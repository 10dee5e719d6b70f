"""This project's log messages as written under a handler that reads markup (Kedro's rich one).

Messages quote templates and records (`[INST]`, `[/INST]`): read as markup, such text is shown
wrongly or stops the run with a markup error. Kedro replaces its handlers whenever it configures
a project's logging, so whoever configures it (a run's hooks, loading the project to check
dvc.yaml) calls `keep_messages_as_written` afterwards.
"""

from __future__ import annotations

import logging


class _AsWritten(logging.Filter):
    """Escape the markup of this package's messages, once per record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("sft_pipeline") and not getattr(record, "as_written", False):
            from rich.markup import escape

            record.msg, record.args = escape(record.getMessage()), None
            record.as_written = True
        return True


_AS_WRITTEN = _AsWritten()


def keep_messages_as_written() -> None:
    """Put the filter on every root handler that reads markup (idempotent)."""
    for handler in logging.getLogger().handlers:
        if getattr(handler, "markup", False) and _AS_WRITTEN not in handler.filters:
            handler.addFilter(_AS_WRITTEN)
