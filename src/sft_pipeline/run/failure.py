"""How a run that stops on a user's mistake ends: one short block on the screen, exit code 1.

    $ kedro run --pipelines=sft
    ...
    Error: data/01_raw/demo_sft.jsonl, line 17, column 1: invalid JSON: Expecting value;
    expected one JSON object per line (JSON Lines)
    (InputFileError; the full traceback is in .sft_pipeline/last_error.log, or add --traceback)

The message of a `UserError` already says what, where, what was expected and what to do; the
Kedro and library frames above it help nobody fix an input file, so they go to the log file. An
exception that is not a `UserError` is a bug: it keeps its traceback on the screen.
"""

from __future__ import annotations

import traceback
from pathlib import Path

from sft_pipeline.common.errors import UserError

ERROR_LOG = Path(".sft_pipeline") / "last_error.log"


def user_error(exc: BaseException) -> UserError | None:
    """The `UserError` behind `exc`, following `raise ... from` and implicit chaining."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, UserError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def write_error_log(exc: BaseException, project: Path) -> Path | None:
    """The whole traceback into the project's error log; None when it cannot be written."""
    path = project / ERROR_LOG
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(exc)), encoding="utf-8")
    except OSError:
        return None
    return path


def summary(error: UserError, log_file: Path | None, project: Path) -> str:
    """The block printed instead of a traceback."""
    if log_file is None:
        where = "add --traceback to see it"
    else:
        try:
            shown = log_file.relative_to(project)
        except ValueError:
            shown = log_file
        where = f"the full traceback is in {shown.as_posix()}, or add --traceback"
    return f"Error: {error}\n({type(error).__name__}; {where})"
