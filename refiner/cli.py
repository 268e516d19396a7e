"""One command-line contract for every entry point (refine.py, train.py, build_shards.py, the checkpoint CLI).

* exit 0: everything was done;
* exit 1: some inputs failed (reported by the entry point), or :class:`~refiner.errors.InputsFailed`;
* exit 2: a setting (or a file/folder it names) cannot work: :class:`~refiner.errors.SettingError` and its
  subclasses (``CheckpointError``, ``RefineError``, ``ConfigError``, ...), a path that is missing, exists,
  is of the wrong kind or is not writable, and Lightning's ``MisconfigurationException``.

Errors are printed as one line, ``error: <message>``, on stderr, never as a traceback. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable

from refiner.errors import InputsFailed, SettingError

# OSErrors about a path the user named: a setting problem, not a crash.
PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def _setting_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (SettingError, *PATH_ERRORS)
    # Lightning's own "this trainer setting cannot work", if Lightning was imported by the body
    lightning = sys.modules.get("lightning_fabric.utilities.exceptions")
    return errors + ((lightning.MisconfigurationException,) if lightning is not None else ())


def one_line(err: BaseException) -> str:
    """The error as one line: an OSError names its file and reason; other messages keep their first line."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err).strip() or type(err).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def report(err: BaseException) -> None:
    print(f"error: {one_line(err)}", file=sys.stderr, flush=True)


def run_cli(body: Callable[[], int | None]) -> int:
    """Run an entry point's ``body`` (returning an exit code, or None for 0) under the contract above and
    return the exit code; the caller passes it to ``SystemExit``."""
    try:
        return int(body() or 0)
    except InputsFailed as err:
        report(err)
        return 1
    except _setting_errors() as err:
        report(err)
        return 2
