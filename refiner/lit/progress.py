"""Progress bars that stay readable in log files.

Lightning's ``TQDMProgressBar`` redraws on every step. On a terminal that is one line rewritten in
place; in a file (SLURM logs, CI, ``nohup``) every redraw is appended, so a 1,600-step run writes
megabytes of carriage-return redraws. :func:`progress_bar` keeps the per-step bar on a terminal and
redraws only every ``non_tty_refresh_rate`` steps when stdout is not a terminal.
"""

from __future__ import annotations

import sys

from pytorch_lightning.callbacks import TQDMProgressBar


def stdout_is_terminal() -> bool:
    """True when stdout is an interactive terminal (False for files, pipes and closed streams)."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(refresh_rate: int = 1, non_tty_refresh_rate: int = 100) -> TQDMProgressBar:
    """Lightning's TQDM bar (it writes to stdout), redrawn every ``refresh_rate`` steps on a terminal
    and every ``non_tty_refresh_rate`` steps otherwise. Set in ``conf/callbacks/*.yaml``
    (``callbacks.progress_bar.non_tty_refresh_rate=N``)."""
    for name, value in (("refresh_rate", refresh_rate), ("non_tty_refresh_rate", non_tty_refresh_rate)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"progress_bar: {name} must be a positive int, got {value!r}")
    return TQDMProgressBar(refresh_rate=refresh_rate if stdout_is_terminal() else non_tty_refresh_rate)
