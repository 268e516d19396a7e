"""The benchmark's setting checks shared by its settings classes (:mod:`refiner.bench.settings`,
:mod:`refiner.bench.artifact_settings`): :class:`BenchError` and checks of lists of values."""

from __future__ import annotations

from typing import Any

from refiner.errors import SettingError
from refiner.settings import require_int

NUM_TIMESTEPS = 1000              # t_starts lie in [1, NUM_TIMESTEPS - 1]; each chain checks its own schedule too


class BenchError(SettingError):
    """A benchmark setting, checkpoint or output folder that cannot work; raised before any compute."""


def ints(name: str, values: Any, minimum: int, maximum: int | None = None, empty: bool = False) -> None:
    """``values`` is a tuple of ints in ``[minimum, maximum]``, non-empty unless ``empty``."""
    if not isinstance(values, tuple) or (not values and not empty):
        raise BenchError(f"{name} must be a {'' if empty else 'non-empty '}list of ints, got {values!r}")
    for v in values:
        require_int(name, v, minimum, maximum)


def strings(prefix: str, block: Any, fields: tuple[str, ...]) -> None:
    """Each of ``fields`` of ``block`` is a non-empty string."""
    for name in fields:
        if not isinstance(getattr(block, name), str) or not getattr(block, name):
            raise BenchError(f"{prefix + '.' if prefix else ''}{name} must be a non-empty string, got "
                             f"{getattr(block, name)!r}")


def names(name: str, values: Any, choices: tuple[str, ...], empty: bool = False) -> None:
    """``values`` is a tuple of names out of ``choices``, non-empty unless ``empty``."""
    if not isinstance(values, tuple) or (not values and not empty) or any(v not in choices for v in values):
        shown = list(values) if isinstance(values, tuple) else values
        raise BenchError(f"{name} must be a {'' if empty else 'non-empty '}subset of {list(choices)}, got {shown}")
