"""Where a refine run may write, and how it writes: never onto an input, and every failed write said in one line.

* :class:`InputFiles`: the run's input images, known by ``(device, inode)`` (any spelling, symlink or hard link) and
  by the directory entries that hold them (the path as given with its folders resolved, and the file it resolves
  to). :meth:`InputFiles.landing_on` names the input a write to a path would replace: a write replaces the *entry*
  ``<folder resolved>/<name>``, so an output folder, or its ``grids/`` subfolder, that is a symlink into the input
  folder lands on the inputs there. :func:`check_no_input_written` applies it to every file a run plans to write,
  before the first write, whatever ``overwrite`` says: ``overwrite=true`` replaces outputs, never inputs.
* :func:`write_file`: an atomic write (:func:`refiner.io.atomic_path`: a temp file beside the target, renamed onto it,
  removed on any error, so no partial file is ever left) that counts the bytes it got onto the disk, so a failure
  (disk full above all) is :class:`OutputWriteError` naming the path and how much was written.
* :class:`DiskFull`: the run-stopping error (exit 1, :class:`~refiner.errors.InputsFailed`) raised after the
  summary was written: once the disk is full every later write would fail too.

Hand-rolled on ``os.write`` rather than ``Path.write_bytes`` because the latter says neither how much was written
nor which of its buffered writes failed.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from refiner.errors import InputsFailed, RefineError
from refiner.io import atomic_path, file_id

CHUNK = 1 << 16
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _entry(path: Path) -> Path:
    """The directory entry a write to ``path`` replaces: its folder resolved (symlinked folders followed), its own
    name kept (a rename replaces a symlink, not what it points to)."""
    path = Path(path).absolute()
    return path.parent.resolve() / path.name


@dataclass(frozen=True)
class InputFiles:
    """The input images of a run, for refusing any write that would land on one (module docstring)."""

    ids: dict[tuple[int, int], Path] = field(default_factory=dict)
    entries: dict[Path, Path] = field(default_factory=dict)

    @classmethod
    def of(cls, paths: Iterable[Path]) -> "InputFiles":
        ids, entries = {}, {}
        for p in paths:
            p = Path(p)
            fid = file_id(p)
            if fid is not None:
                ids.setdefault(fid, p)
            entries.setdefault(_entry(p), p)
            entries.setdefault(p.resolve(), p)
        return cls(ids, entries)

    def landing_on(self, target: Path) -> Path | None:
        """The input that writing ``target`` would replace or alias, or None: the same file (device and inode,
        through any symlink or hard link) or the same directory entry."""
        target = Path(target)
        fid = file_id(target)
        if fid is not None and fid in self.ids:
            return self.ids[fid]
        return self.entries.get(_entry(target)) or self.entries.get(target.resolve())


def check_no_input_written(inputs: InputFiles, targets: Iterable[tuple[Path, str]], output_dir: Path) -> None:
    """Raise :class:`RefineError` (exit 2) naming the first ``(path, what)`` of ``targets`` that would land on an
    input, before anything is written; ``overwrite`` plays no part."""
    for path, what in targets:
        clash = inputs.landing_on(path)
        if clash is not None:
            shown = f"{path} (= {_entry(path)})" if _entry(path) != Path(path).absolute() else str(path)
            raise RefineError(f"output_dir {output_dir}: this run would write {what} {shown}, which is the input "
                              f"image {clash}; inputs are never replaced, not even with overwrite=true: choose an "
                              "output_dir apart from the inputs (and no grids/ link into them)")


class OutputWriteError(OSError):
    """A write of ``total`` bytes to ``path`` that failed after ``written`` of them reached the temp file (which was
    removed: the target holds its old content or nothing)."""

    def __init__(self, path: Path, written: int, total: int, cause: OSError):
        reason = cause.strerror or str(cause)
        super().__init__(cause.errno, f"{reason} (wrote {written} of {total} bytes; the partial file was removed)",
                         str(path))
        self.path, self.written, self.total = Path(path), written, total

    @property
    def disk_full(self) -> bool:
        return self.errno in DISK_FULL_ERRNOS

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


class DiskFull(InputsFailed):
    """The disk filled up: the run stopped there (exit 1). The message names the file and the bytes written."""


def write_file(path: Path, data: bytes, inputs: InputFiles | None = None) -> Path:
    """Write ``data`` to ``path`` atomically, refusing a path that lands on one of ``inputs``
    (:class:`RefineError`); raises :class:`OutputWriteError` on any OS error, with the bytes written so far."""
    path = Path(path)
    clash = inputs.landing_on(path) if inputs is not None else None
    if clash is not None:
        raise RefineError(f"refusing to write {path}: it is the input image {clash}")
    written = 0
    try:
        with atomic_path(path) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
            try:
                view = memoryview(data)
                while written < len(data):
                    written += os.write(fd, view[written:written + CHUNK])
            finally:
                os.close(fd)
    except OutputWriteError:
        raise
    except OSError as err:
        raise OutputWriteError(path, written, len(data), err) from err
    return path
