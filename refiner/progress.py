"""Progress bars that stay readable in log files: one redraw per step on a terminal, one line a minute otherwise.

tqdm redraws on every update by default; with its output in a file (nohup, SLURM, CI) a 1,600-image shard build
wrote about 200 redraws into the log. :func:`progress` keeps tqdm on a terminal and, when the stream is not one,
redraws at most every ``NON_TTY_SECONDS`` (tqdm's ``mininterval``), plus the final line. Lightning's training bar
has the same rule by step count (:mod:`refiner.lit.progress`).
"""

from __future__ import annotations

import sys
from typing import Iterable, TextIO

from tqdm import tqdm

NON_TTY_SECONDS = 60.0


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True, stream: TextIO | None = None) -> tqdm:
    """A tqdm bar on ``stream`` (default stderr): normal on a terminal, one redraw a minute in a file, nothing when
    ``enabled`` is false."""
    stream = sys.stderr if stream is None else stream
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, file=stream,
                mininterval=0.1 if is_terminal(stream) else NON_TTY_SECONDS, dynamic_ncols=is_terminal(stream))
