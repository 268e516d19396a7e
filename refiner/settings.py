"""Checks of setting values shared by the entry points: each raises :class:`~refiner.errors.SettingError` with a
one-line message naming the setting, the value and what is expected."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from refiner.errors import SettingError


def require_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int within ``[minimum, maximum]`` (bools are refused)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise SettingError(f"{name} must be an integer, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise SettingError(f"{name} must be in [{minimum if minimum is not None else '-inf'}, "
                           f"{maximum if maximum is not None else 'inf'}], got {value}")
    return value


def require_number(name: str, value: Any, minimum: float | None = None, maximum: float | None = None) -> float:
    """``value`` as a finite float within ``[minimum, maximum]``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise SettingError(f"{name} must be a finite number, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise SettingError(f"{name} must be in [{minimum if minimum is not None else '-inf'}, "
                           f"{maximum if maximum is not None else 'inf'}], got {value}")
    return float(value)


def require_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise SettingError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_device(value: Any, name: str = "device"):
    """A ``torch.device`` that exists on this machine (``cpu``, ``cuda[:i]`` with CUDA, ``mps`` with MPS)."""
    import torch

    try:
        device = torch.device(str(value))
    except (RuntimeError, ValueError, TypeError) as err:
        raise SettingError(f"{name}={value!r} is not a torch device (expected cpu, cuda, cuda:N or mps)") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingError(f"{name}={value!r} but CUDA is not available on this machine (torch "
                               f"{torch.__version__}); use {name}=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SettingError(f"{name}={value!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise SettingError(f"{name}={value!r} but MPS is not available on this machine; use {name}=cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise SettingError(f"{name}={value!r}: refiner runs on cpu, cuda or mps")
    return device


def check_writable_dir(path: str | os.PathLike, name: str = "output_dir") -> Path:
    """A folder that is, or can be created, and is writable; checked without creating it.

    An existing folder is probed by creating and removing a temporary file in it (so a read-only mount or
    missing rights are found even for root); for a folder still to be created, its nearest existing
    ancestor must be a writable folder.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SettingError(f"{name} {path} is an existing file, not a folder")
    ancestor = next(p for p in (path, *path.parents) if p.exists())
    if not ancestor.is_dir():
        raise SettingError(f"{name} {path}: {ancestor} is a file, not a folder")
    if ancestor == path:
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise SettingError(f"{name} {path} is not writable ({err.strerror or err})") from err
    elif not os.access(ancestor, os.W_OK | os.X_OK):
        raise SettingError(f"{name} {path} cannot be created: {ancestor} is not writable")
    return path
