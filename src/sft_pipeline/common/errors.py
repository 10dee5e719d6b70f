"""Errors that stop a run with a message a user can act on.

Every error the user can fix (an input file, a parameter, a model path, the run lock, a stale
`dvc.yaml`, a run that diverged) derives from `UserError`: `kedro run` ends it with its message
in one short block and exit code 1, the traceback going to a log file (`sft_pipeline.run.failure`).
Anything else is a bug and keeps its traceback.

File-level problems (the input cannot be read as records at all) raise `InputFileError`;
record-level problems never raise, they are quarantined by validation. `RejectedFractionError`
stops a run when validation rejected more records than the configured budget allows.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: the message says what, where, what was expected and what to
    do, so no traceback is needed to act on it."""


class InputFileError(UserError, ValueError):
    """An input file (or path) cannot be read as records.

    The message always names the file, and where known the line (or row), the column and the field,
    what was found and what was expected, so the user can fix the file without a debugger.
    """

    def __init__(
        self,
        file: str,
        problem: str,
        *,
        line: int | None = None,
        column: int | None = None,
        field: str | None = None,
        expected: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.file = file
        self.line = line
        self.column = column
        self.field = field
        self.problem = problem
        self.expected = expected
        self.hint = hint
        where = file
        if line is not None:
            where += f", line {line}"
            if column is not None:
                where += f", column {column}"
        message = f"{where}: {problem}"
        if field is not None:
            message += f" (field {field!r})"
        if expected is not None:
            message += f"; expected {expected}"
        if hint is not None:
            message += f". {hint}"
        super().__init__(message)


class RejectedFractionError(UserError, RuntimeError):
    """Validation rejected more records than `validation.max_rejected_fraction` allows."""


class NoTrainingRowsError(UserError, ValueError):
    """Tokenization kept no training row (each was rejected with its reason)."""


class TrainingDivergedError(UserError, RuntimeError):
    """A loss or gradient norm became NaN or infinite: training stopped before that optimizer
    step; the message names the step, the numbers, the checkpoint kept and what to try."""


class NonFiniteWeightsError(UserError, ValueError):
    """A tensor to be merged or exported holds NaN or infinite values; the message names it."""
