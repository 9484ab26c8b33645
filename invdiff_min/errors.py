"""The one error boundary of every entry point (train.py, sample.py, python -m invdiff_min.convert / .export).

Inside the library a problem with the input raises an exception whose message names the file or the flag,
what is wrong and the fix (ValueError and its kinds: CheckpointError, DatasetFormatError, RunFolderError, ...;
FileNotFoundError and its kind DatasetLayoutError; ImportError for a missing optional package). At the entry
point (each script's `main`) `exit_on_error` turns those, and the I/O, decode and allocation errors of the
system, into one line, `error: ...`, and exit status 1, instead of a traceback. `INVDIFF_DEBUG=1` shows the
traceback instead.
"""
from __future__ import annotations

import os
from contextlib import contextmanager


class InvDiffError(ValueError):
    """A problem the user can fix; the message says what and how."""


def describe(error: BaseException) -> str:
    """One line for an error at the boundary."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        what = f"{error.filename}: {error.strerror}"            # the system's errors, with the file they concern
        fix = {"PermissionError": "check its permissions", "IsADirectoryError": "pass a file",
               "NotADirectoryError": "pass a folder", "FileExistsError": "pass a new name",
               "OSError": "check the path and the free disk space"}.get(type(error).__name__, "check the path")
        return f"{what} ({fix})"
    if isinstance(error, KeyboardInterrupt):
        return ("interrupted (Ctrl-C); train.py's checkpoints are written whole, then renamed, so --resume "
                "continues a run from its newest one; other outputs of the command may be partial: run it again")
    if (isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in str(error)):                  # the CPU allocator's RuntimeError
        return (f"out of memory ({str(error).splitlines()[0] if str(error) else type(error).__name__}); lower the "
                f"sizes asked for (--n-per-class, --batch-size, --resolution, --num-samples) or use a larger machine")
    text = " ".join(str(error).split()) or type(error).__name__
    return text


HANDLED = (ValueError, OSError, ImportError, MemoryError)


@contextmanager
def exit_on_error():
    """Turn the handled errors raised inside into `error: ...` on stderr and exit status 1 (SystemExit), unless
    INVDIFF_DEBUG=1. Also catches the library's TrainingDiverged and torch's OutOfMemoryError by name (both
    RuntimeErrors), the CPU allocator's RuntimeError by its message, and Ctrl-C; other RuntimeErrors are bugs
    and keep their traceback."""
    try:
        yield
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - filtered just below
        named = (type(e).__name__ in ("TrainingDiverged", "OutOfMemoryError", "SafetensorError")
                 or isinstance(e, KeyboardInterrupt) or "can't allocate memory" in str(e))
        if os.environ.get("INVDIFF_DEBUG") == "1" or not (isinstance(e, HANDLED) or named):
            raise
        raise SystemExit(f"error: {describe(e)}") from None
