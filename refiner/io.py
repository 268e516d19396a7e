"""Atomic file writes (temp file in the target directory, fsync, ``os.replace``), output-path checks, and
non-finite floats in JSON (:func:`json_float`).

A kill mid-write leaves the old file (or nothing), never a truncated one. Hand-written because
neither Lightning's ``_atomic_save`` (it streams into the final path) nor the stdlib offers it.

:func:`same_file` and :func:`check_output_path` keep a write from landing on one of its own inputs
(under any spelling, symlink or hard link) or silently replacing an existing file.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from refiner.errors import SettingError


class OutputPathError(SettingError):
    """An output path that would replace an input, an existing file (without force), or is not a file path."""


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True if ``a`` and ``b`` name the same file: the same device and inode when both exist (any path
    spelling, symlink or hard link), otherwise the same fully resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def file_id(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(device, inode)`` of an existing file (following symlinks), None if it does not exist: equal ids are
    the same file under any spelling, symlink or hard link."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_output_path(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), force: bool = False,
                      what: str = "output") -> Path:
    """Refuse an output ``out`` that is one of ``inputs``, that exists (unless ``force``), or that is a
    folder or lies under a file; returns ``Path(out)``. Raises :class:`OutputPathError`."""
    out = Path(out)
    for source in inputs:
        if same_file(out, source):
            raise OutputPathError(f"{what} {out} is the input {source} (same file); refusing to overwrite the input, "
                                  "choose another output path")
    if out.is_dir():
        raise OutputPathError(f"{what} {out} is a folder; give a file path")
    blocking = next((p for p in out.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise OutputPathError(f"{what} {out}: {blocking} is a file, not a folder")
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputPathError(f"{what} {out} already exists; refusing to replace it (pass --force / force=True "
                              "to replace it)")
    return out


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it is moved onto ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(path: str | os.PathLike, save_fn: Callable[[Path], None]) -> None:
    """Call ``save_fn(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        save_fn(tmp)


def json_float(x: float) -> float | str:
    """``x`` itself if finite, else ``"inf"``, ``"-inf"`` or ``"nan"``: JSON has no non-finite numbers
    (``json.dumps`` would write the invalid tokens ``Infinity``/``NaN``)."""
    x = float(x)
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
