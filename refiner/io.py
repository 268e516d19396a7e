"""Atomic file writes (temp file in the target directory, fsync, ``os.replace``), output-path checks, export
folders that ``--force`` replaces only when they are a previous export (:func:`write_export_folder`), and
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
import re
import secrets
import shutil
import stat
import warnings
from dataclasses import dataclass
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
                      what: str = "output", ours: Callable[[Path], bool] | None = None,
                      kind: str = "file this command writes") -> Path:
    """The file a write to ``out`` will replace or create: ``out`` itself, or, when ``out`` is a symlink, the file it
    points to (written there, so the link is kept and names the new file; :func:`atomic_path` on the link itself would
    replace the link by a file). Raises :class:`OutputPathError`, before anything is written, when ``out`` is one of
    ``inputs`` (any spelling, symlink or hard link), a folder, lies under a file, is a symlink to nothing, or exists
    and ``force`` is not given; and, with ``force``, when the existing file is not ours: ``ours(path)`` is False
    (e.g. not a previous export of this kind, named ``kind`` in the message). Without ``ours`` any file may be
    replaced with ``force``."""
    out = Path(out)
    for source in inputs:
        if same_file(out, source):
            raise OutputPathError(f"{what} {out} is the input {source} (same file); refusing to overwrite the input, "
                                  "choose another output path")
    target, shown = out, str(out)
    if out.is_symlink():
        target = Path(os.path.realpath(out))  # never raises, also on a symlink loop
        shown = f"{out} (a symlink to {target})"
        if not target.exists():
            raise OutputPathError(f"{what} {shown}: the symlink points to nothing; remove it or give another path")
    if target.is_dir():
        raise OutputPathError(f"{what} {shown} is a folder; give a file path")
    blocking = next((p for p in target.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise OutputPathError(f"{what} {shown}: {blocking} is a file, not a folder")
    if target.exists():
        if not force:
            raise OutputPathError(f"{what} {shown} already exists; refusing to replace it (pass --force / "
                                  "force=True to replace it)")
        if ours is not None and not ours(target):
            raise OutputPathError(f"{what} {shown} exists and is not a {kind}; --force replaces only a previous "
                                  "one: move that file or choose another output path")
    return target


def _create_temp_file(path: Path) -> tuple[Path, int]:
    """Create an empty, unused ``.<name>.<random>.tmp`` beside ``path``; returns it and the mode it was given.

    Made with ``os.open(..., O_CREAT | O_EXCL, 0o666)`` rather than ``tempfile.mkstemp``: mkstemp creates 0600 files
    whatever the umask, while here the kernel applies the umask (or the folder's default ACL) itself, so the mode is
    exactly what ``open(path, "w")`` would have made. Nothing reads or changes the process umask (``os.umask`` can
    only be read by setting it, a race with every other thread that creates files meanwhile). The name keeps the
    pattern that :func:`refiner.inference.outputs.remove_stale_temps` clears after a kill."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            return tmp, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)


def _restore_mode(path: Path, mode: int) -> None:
    """Give ``path`` ``mode`` again if a writer replaced it by a file of another mode: safetensors' ``save_file``
    writes through its own 0600 temp file and renames it over the path it is given."""
    if stat.S_IMODE(os.lstat(path).st_mode) != mode:
        os.chmod(path, mode)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it is moved onto ``path`` atomically. The file gets the mode
    a new file there gets (0644 under umask 022, whatever wrote the temp file; see :func:`_create_temp_file`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _create_temp_file(path)
    try:
        yield tmp
        _restore_mode(tmp, mode)
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


# ------------------------------------------------------------------------------------------ export folders
@dataclass(frozen=True)
class ExportLayout:
    """What one kind of export folder holds, so that ``--force`` replaces only a previous export of that kind.

    ``marker``: the manifest file whose presence says "an export of ours" (``refiner_chain.json`` for the diffusers
    export, ``adapter_config.json`` for the peft export). ``patterns``: regular expressions (full match, relative
    POSIX paths) of every entry the export writes, folders included. A folder holding the marker and only entries
    that match is a previous export; anything else in it is *foreign*, and the folder is never replaced.
    """

    marker: str
    patterns: tuple[str, ...]

    def foreign_entry(self, folder: Path) -> str | None:
        """An entry of ``folder`` this export does not write (relative path), or None: the first foreign file in a
        sorted walk (files before subfolders, symlinks not followed), else the first foreign (empty) folder. A
        symlink is always foreign: no export writes one."""
        first_folder = None
        for root, dirs, files in os.walk(folder, followlinks=False):
            dirs.sort()
            here = Path(root)
            for name in sorted(files):
                rel = (here / name).relative_to(folder).as_posix()
                if (here / name).is_symlink() or not self._writes(rel):
                    return rel
            for name in dirs:
                rel = (here / name).relative_to(folder).as_posix()
                if (here / name).is_symlink():
                    return rel
                if first_folder is None and not self._writes(rel):
                    first_folder = rel
        return first_folder

    def _writes(self, rel: str) -> bool:
        return any(re.fullmatch(p, rel) for p in self.patterns)


def check_export_folder(out: str | os.PathLike, layout: ExportLayout, inputs: Iterable[str | os.PathLike] = (),
                        force: bool = False, what: str = "refiner export") -> Path:
    """The folder an export to ``out`` will write: ``out`` itself, or, when ``out`` is a symlink, the folder it points
    to (the link is kept and keeps pointing there). Raises :class:`OutputPathError` (exit 2), before anything is
    written, when:

    * ``out`` exists and ``force`` is not given;
    * ``out`` is a file, or a symlink to nothing;
    * ``out`` (resolved) contains one of ``inputs``, or lies inside one;
    * with ``force``, the existing folder is not a previous export of this kind: it lacks ``layout.marker`` or holds
      an entry the export does not write (the message names it). An empty folder may be replaced.
    """
    out = Path(out)
    target = out.resolve()
    shown = f"{out} (a symlink to {target})" if out.is_symlink() else str(out)
    if out.is_symlink() and not target.exists():
        raise OutputPathError(f"output {shown}: the symlink points to nothing; remove it or make the folder it names")
    for source in inputs:
        src = Path(source).resolve()
        if src == target or target in src.parents:
            raise OutputPathError(f"output {shown} contains the input {source}; choose another output folder")
        if src in target.parents:
            raise OutputPathError(f"output {shown} lies inside the input {source}; choose another output folder")
    if not target.exists():
        blocking = next((p for p in target.parents if p.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise OutputPathError(f"output {shown}: {blocking} is a file, not a folder")
        return target
    if not force:
        raise OutputPathError(f"{shown} already exists; pass --force to replace it")
    if not target.is_dir():
        raise OutputPathError(f"{shown} exists and is not a folder; refusing to replace a file")
    if not any(target.iterdir()):
        return target
    foreign = layout.foreign_entry(target)
    if not (target / layout.marker).is_file():
        held = foreign or min(p.name for p in target.iterdir())
        raise OutputPathError(f"{shown} is not a {what} (it has no {layout.marker}; it holds {held}); --force "
                              "replaces only a previous export: choose another output folder")
    if foreign is not None:
        raise OutputPathError(f"{shown} holds {foreign}, which a {what} does not write; --force replaces only a "
                              "previous export with nothing added: move that file or choose another output folder")
    return target


def write_export_folder(out: str | os.PathLike, layout: ExportLayout, write: Callable[[Path], None], *,
                        inputs: Iterable[str | os.PathLike] = (), force: bool = False,
                        what: str = "refiner export") -> Path:
    """Write an export folder atomically: ``write(tmp)`` fills a fresh folder beside the target, which is checked
    first (:func:`check_export_folder`); its files are fsynced and it is renamed into place. A previous export is
    moved aside, the new one moved in, then the old one deleted; if the move-in fails the old one is put back. On
    any error nothing of the attempt is left behind (no ``.NAME.*.tmp`` / ``.old`` folders) and the old export is
    untouched. Modes follow the umask: folders are made with ``mkdir`` (not ``mkdtemp``, which makes them 0700), and
    every file ends with the mode a new file gets there (:func:`_settle_files`). Returns ``Path(out)``."""
    target = check_export_folder(out, layout, inputs, force, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_sibling(target, "tmp", create=True)
    try:
        write(tmp)
        if not (tmp / layout.marker).is_file():
            raise RuntimeError(f"the {what} writer did not write its manifest {layout.marker}")
        _settle_files(tmp)
        _move_into_place(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Path(out)


def new_folder(parent: str | os.PathLike, prefix: str, suffix: str = "") -> Path:
    """A new empty folder ``<parent>/<prefix><random><suffix>``, made by ``mkdir`` with the mode a new folder gets
    there (0777 minus the umask). ``tempfile.mkdtemp`` makes 0700, and a temporary folder renamed into place keeps
    it: nobody else in the group could read the result."""
    while True:
        candidate = Path(parent) / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def _fresh_sibling(path: Path, suffix: str, create: bool = False) -> Path:
    """An unused name ``.<name>.<random>.<suffix>`` beside ``path`` (made as a folder when ``create``)."""
    if create:
        return new_folder(path.parent, f".{path.name}.", f".{suffix}")
    while True:
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}.{suffix}")
        if not candidate.exists() and not candidate.is_symlink():
            return candidate


def _settle_files(root: Path) -> None:
    """fsync every file under ``root`` and give it the mode a new file gets there: the mode ``mkdir`` gave ``root``
    (the umask, or the parent's default ACL, applied to 0777) without the execute bits, i.e. ``0666 & ~umask``.
    Writers that go through their own temp file (safetensors' ``save_file``: 0600) would otherwise leave files
    nobody else in the group can read; no export writes an executable."""
    file_mode = stat.S_IMODE(root.stat().st_mode) & 0o666
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            _restore_mode(p, file_mode)
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _move_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    old = _fresh_sibling(target, "old")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    try:
        shutil.rmtree(old)
    except OSError as err:  # the new export is in place; say what is left over rather than fail the export
        warnings.warn(f"replaced {target}, but could not delete the previous export moved to {old}: {err}")
