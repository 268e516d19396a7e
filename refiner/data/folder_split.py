"""A user's image folder surveyed and split into training and held-out images, without touching a file of it
(``refiner chain``).

* :func:`survey_folder`: every image of a folder (its direct children) decoded once and sorted by name into usable
  ones, ones smaller than the training size, and unreadable ones; non-image entries are listed apart.
* :func:`pick_val`: which of ``n`` images (sorted by name) are held out: evenly spaced through the sorted list, so the
  held-out set is spread over the folder (names often follow time or subject) and is the same on every run.
* :func:`link_split`: the split written as two folders of symlinks (``train/``, ``val/``) to the user's files.
* :func:`write_resized`: images resized and centre-cropped as the shards hold them (the held-out images to refine).

Folders are built beside their destination and renamed into place (:func:`build_folder`), so a kill leaves a whole
folder or none.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from refiner.data.images import ImageError, load_image, save_png_atomic, scan_images
from refiner.data.shards import fit_size


@dataclass(frozen=True)
class FolderSurvey:
    """``usable``: images whose short side is at least the size asked for, sorted by name. ``small``: ``(path,
    (width, height))`` of the others. ``unreadable``: ``(path, reason)`` of image files that did not decode.
    ``ignored``: ``{"file", "reason"}`` of entries that are not image files (folders, other files)."""

    usable: tuple[Path, ...]
    small: tuple[tuple[Path, tuple[int, int]], ...]
    unreadable: tuple[tuple[Path, str], ...]
    ignored: tuple[dict, ...]


def survey_folder(folder: str | os.PathLike, min_side: int) -> FolderSurvey:
    """Decode every image file directly in ``folder`` and sort it into usable, small and unreadable.

    Raises ``FileNotFoundError`` for a missing folder and ``ValueError`` for a folder without any image file
    (both from :func:`~refiner.data.images.scan_images`)."""
    files, ignored = scan_images(str(folder))
    usable, small, unreadable = [], [], []
    for path in files:
        try:
            h, w = load_image(path).shape[:2]
        except ImageError as err:
            unreadable.append((path, str(err)))
            continue
        if min(h, w) < min_side:
            small.append((path, (w, h)))
        else:
            usable.append(path)
    return FolderSurvey(tuple(usable), tuple(small), tuple(unreadable), tuple(ignored))


def pick_val(n: int, fraction: float, minimum: int, maximum: int) -> list[int]:
    """Indices of the held-out images among ``n`` sorted ones: ``round(n * fraction)`` clamped to
    ``[minimum, maximum]`` (and to ``n - 1``), evenly spaced: index ``floor((i + 0.5) * n / k)`` for ``i < k``."""
    k = max(0, min(n - 1, maximum, max(minimum, round(n * fraction))))
    return [int((i + 0.5) * n / k) for i in range(k)]


def build_folder(dest: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Make the folder ``dest`` (which must not exist) by ``fill(tmp)`` on a temporary folder beside it, then rename it
    into place: it appears complete or not at all. Leftovers of an attempt that was killed are removed first."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for leftover in dest.parent.glob(f".{dest.name}.building-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = dest.parent / f".{dest.name}.building-{os.getpid()}"
    tmp.mkdir()
    try:
        fill(tmp)
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def link_split(dest: str | os.PathLike, train: Sequence[Path], val: Sequence[Path]) -> Path:
    """Write ``dest/train`` and ``dest/val`` as folders of symlinks to the absolute paths of ``train`` and ``val``
    (each keeps its file name, so names must be unique), with :func:`build_folder`. Returns ``dest``."""
    names = [p.name for p in (*train, *val)]
    if len(set(names)) != len(names):
        raise ValueError("link_split needs unique file names")

    def fill(tmp: Path) -> None:
        for split, files in (("train", train), ("val", val)):
            (tmp / split).mkdir()
            for path in files:
                os.symlink(Path(path).resolve(), tmp / split / path.name)

    return build_folder(dest, fill)


def write_resized(dest: str | os.PathLike, files: Sequence[Path], size: int) -> Path:
    """``dest/<stem>.png`` for each file (``<name>.png`` where stems repeat): resized (short side) and centre-cropped
    to ``size x size`` exactly as ``build_shards(size=...)`` does, with :func:`build_folder`. Returns ``dest``."""
    stems = Counter(p.stem for p in files)

    def fill(tmp: Path) -> None:
        for path in files:
            img, _ = fit_size(load_image(path), size, 8, "crop", source=path)
            save_png_atomic(tmp / f"{path.stem if stems[path.stem] == 1 else path.name}.png", img)

    return build_folder(dest, fill)
