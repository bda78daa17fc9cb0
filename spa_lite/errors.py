"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""

from __future__ import annotations

import errno


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


def expected_failure(e: BaseException) -> str | None:
    """The one line for a failure caused by the environment or the input rather than by spa-lite, or None
    (a bug: the caller shows the traceback).

    Matched by class name along the MRO, so that no library is imported just to test for its errors.
    """
    names = {c.__name__ for c in type(e).__mro__}
    cause = e.__cause__ or e.__context__
    if "OutOfMemoryError" in names:
        first = str(e).splitlines()[0] if str(e) else repr(e)
        return f"out of memory: {first}; lower the batch sizes (`spa-lite plan` estimates them)"
    if "HFValidationError" in names or "RepositoryNotFoundError" in names or "GatedRepoError" in names:
        return f"cannot reach the model or data set on the hub: {str(e).splitlines()[0]} (a local path must exist; " \
               f"set HF_HUB_OFFLINE=1 to work offline)"
    if "SafetensorError" in names:
        return f"damaged safetensors file: {e}"
    if "DatasetGenerationError" in names:
        return f"cannot read the data set: {cause or e}"
    if "UnicodeDecodeError" in names:
        return f"input is not UTF-8 text: {e}"
    if "JSONDecodeError" in names:
        return f"malformed JSON: {e}"
    if "EOFError" in names:
        return f"unexpected end of a file (a truncated download or compressed file?): {e or 'no more data'}"
    if isinstance(e, OSError):
        hint = {errno.ENOSPC: "free some space and rerun the same command to resume (nothing finished is lost)",
                errno.EDQUOT: "free some space and rerun the same command to resume (nothing finished is lost)",
                errno.EACCES: "check the permissions of that path (or choose another --run-dir)",
                errno.EPERM: "check the permissions of that path (or choose another --run-dir)",
                errno.EROFS: "the file system is read-only: choose another --run-dir"}.get(e.errno or -1)
        return f"{e}" + (f"; {hint}" if hint else "")
    return None
