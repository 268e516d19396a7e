"""The two kinds of error every entry point (``refine.py``, ``train.py``, ``build_shards.py``,
``refiner export``/``refiner inspect``) reports as one line, ``error: <message>`` on stderr.

* :class:`SettingError`: a setting, or a file or folder named by a setting, that cannot work (bad range,
  missing checkpoint, output that would replace something). Found before or instead of the work; exit 2.
* :class:`InputsFailed`: the settings were fine but the inputs could not be processed (every image
  unreadable); exit 1, like a run where some images failed.

:func:`refiner.cli.run_cli` applies this contract; library callers simply catch the exceptions.
"""

from __future__ import annotations


class SettingError(ValueError):
    """A setting (or a file/folder it names) that cannot work; entry points exit 2."""


class InputsFailed(RuntimeError):
    """The inputs themselves failed (none could be processed); entry points exit 1."""


class RefineError(SettingError):
    """A sampling setting, checkpoint chain or output location that cannot work; raised before any image is
    refined (:class:`refiner.inference.chain.ChainError` is the chain's own kind)."""
