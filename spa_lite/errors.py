"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""

from __future__ import annotations


class SpaError(Exception):
    """An error caused by user input or stage order, with a message that says what to do next."""


class DataError(SpaError):
    """Bad input data: names the file, the line (1-based) and the field."""

    def __init__(self, path: object, line: int | None, field: str | None, message: str):
        where = str(path)
        if line is not None:
            where += f":{line}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.field = path, line, field


class StageOrderError(SpaError):
    """A stage was asked to run before the stage it needs, or on artifacts made from another config."""


class DivergedError(SpaError):
    """Training produced a non-finite loss, gradient or weight, or a loss the divergence guard refuses; the
    stage is left incomplete (no adapter, no manifest) with its last checkpoint."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


class StageLockedError(SpaError):
    """Another live process holds the stage directory's lock."""


class InputChangedError(SpaError):
    """An input a stage was made from (base weights, an upstream adapter) is missing, damaged or changed."""
